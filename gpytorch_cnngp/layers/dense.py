"""A fully connected readout of a whole feature map."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..state import CovState
from .base import FiniteBuild, ScaledAffine, WeightedLayer

__all__ = ["Dense"]


class Dense(WeightedLayer):
    r"""Flattens the ``C x H x W`` map and applies a fully connected layer with Gaussian weights.

    Weights are i.i.d. ``N(0, var_weight / (C H W))`` and biases ``N(0, var_bias)``, so only the
    same-location covariances survive the sum over inputs:

    .. math::
        K' = \sigma_b^2 + \frac{\sigma_w^2}{HW} \sum_{p} K[p, p].

    This is what the paper's code writes as a convolution with a window the size of the map and no
    padding; it does not need the full spatial covariance. The output is a 1x1 map.

    Example:
        >>> from gpytorch_cnngp import Conv2d, Dense, ReLU, Sequential
        >>> model = Sequential(Conv2d(3), ReLU(), Dense(var_weight=2.0, var_bias=0.1))
        >>> model(torch.rand(4, 1, 6, 6)).shape
        torch.Size([4, 4])
    """

    def __init__(self, var_weight: float | Tensor = 1.0, var_bias: float | Tensor = 0.0):
        super().__init__()
        self._init_variances(var_weight, var_bias)

    def extra_repr(self) -> str:
        return f"var_weight={float(self.var_weight):.6g}, var_bias={float(self.var_bias):.6g}"

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return 1, 1

    def offsets_needed(self, out: frozenset, in_size: tuple[int, int], rule=None) -> frozenset:
        return frozenset({(0, 0)})  # only same-location covariances survive the sum over inputs

    def propagate(self, state: CovState) -> CovState:
        weight, bias = state.hyper(self, "var_weight"), state.hyper(self, "var_bias")
        nngp = state.readout(state.nngp) * weight + bias
        if state.ntk is None:
            return state.output(nngp)
        return state.output(nngp, state.readout(state.ntk) * weight + nngp)  # as Conv2d

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        var_w = float(self.var_weight.detach())
        var_b = float(self.var_bias.detach())
        if build.parameterization == "ntk":
            if build.size is None:
                raise ValueError("parameterization='ntk' with a Dense layer needs input_size=(H, W) in .nn()")
            fan_in = incoming * build.size[0] * build.size[1]
            kw = {"generator": build.generator, "dtype": build.dtype, "device": build.device}
            weight = torch.randn(out_channels, fan_in, **kw)
            bias = torch.randn(out_channels, **kw) if var_b > 0 else None
            linear = ScaledAffine(nn.functional.linear, weight, bias, math.sqrt(var_w / fan_in), math.sqrt(var_b))
        elif build.size is not None:
            fan_in = incoming * build.size[0] * build.size[1]
            linear = nn.Linear(fan_in, out_channels, bias=var_b > 0, device=build.device, dtype=build.dtype)
            _gaussian_init(linear, var_w, var_b, build.generator)
        else:
            linear = _GaussianLazyLinear(out_channels, var_w, var_b, build)
        return nn.Sequential(nn.Flatten(start_dim=1), linear, nn.Unflatten(1, (out_channels, 1, 1))), out_channels


def _gaussian_init(linear: nn.Linear, var_weight: float, var_bias: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        linear.weight.normal_(0.0, 1.0, generator=generator).mul_(math.sqrt(var_weight / linear.in_features))
        if linear.bias is not None:
            linear.bias.normal_(0.0, 1.0, generator=generator).mul_(math.sqrt(var_bias))


class _GaussianLazyLinear(nn.LazyLinear):
    """A linear layer whose input size is read from its first input, initialised as :class:`Dense` says.

    Its random numbers come from a generator seeded at build time from the build's generator, so the
    network is fixed by the caller's seed whatever else draws from that generator before the first call.
    """

    def __init__(self, out_features: int, var_weight: float, var_bias: float, build: FiniteBuild):
        self._init = None  # LazyLinear's constructor calls reset_parameters before we are set up
        super().__init__(out_features, bias=var_bias > 0, device=build.device, dtype=build.dtype)
        seed = int(torch.randint(0, 2**62, (), generator=build.generator, device=_generator_device(build.generator)))
        self._init = (var_weight, var_bias, seed)

    def reset_parameters(self) -> None:
        if self._init is None or self.has_uninitialized_params() or self.in_features == 0:
            return
        var_weight, var_bias, seed = self._init
        generator = torch.Generator(device=self.weight.device).manual_seed(seed)
        _gaussian_init(self, var_weight, var_bias, generator)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")
