"""Convolution: a uniform-window average of the covariance map, scaled and shifted."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import Window
from ..state import CovState
from .base import FiniteBuild, ScaledAffine, WeightedLayer, check_variance

__all__ = ["Conv2d", "WeightedLayer", "check_variance"]  # the last two live in .base


class Conv2d(WeightedLayer):
    r"""Convolution with i.i.d. Gaussian weights, as a map on covariances.

    Each output position averages the covariance over its window (uniform weights, zero padding
    counted in the ``k^2`` denominator):

    .. math::
        K'[p] = \sigma_b^2 + \frac{\sigma_w^2}{k^2} \sum_{q \in \mathrm{window}(p)} K[q], \qquad
        \Theta'[p] = K'[p] + \frac{\sigma_w^2}{k^2} \sum_{q \in \mathrm{window}(p)} \Theta[q]

    (:math:`\Theta` the neural tangent kernel, NTK parameterisation).

    On the full spatial path (before a pooling layer) the covariance between positions ``p`` and
    ``q`` sums the pairs of inputs under the same tap ``t``:
    :math:`K'[p, q] = \sigma_b^2 + \sigma_w^2 k^{-2} \sum_t K[p + t, q + t]`.

    The finite layer draws weights from ``N(0, var_weight / (C_in k^2))`` and biases from
    ``N(0, var_bias)``; the paper's hidden layers therefore use ``var_weight = sigma_w^2 * k^2``.

    :param kernel_size: window width ``k`` (square windows).
    :param stride: as in :func:`torch.nn.functional.conv2d`.
    :param padding: ``"same"`` (``dilation * (k // 2)`` on each side; for even ``k`` one fewer
        before than after, as TensorFlow's SAME) or a non-negative integer applied on every side.
    :param dilation: spacing of the window's taps.
    :param var_weight: weight variance :math:`\sigma_w^2` (times ``C_in k^2`` per weight, see above).
    :param var_bias: bias variance :math:`\sigma_b^2`.
    :param in_channel_multiplier, out_channel_multiplier: scale the finite layer's channel counts;
        they do not change the kernel.

    Example:
        >>> from gpytorch_cnngp import Conv2d, ReLU, Sequential
        >>> model = Sequential(Conv2d(3), ReLU(), Conv2d(kernel_size=8, padding=0))
        >>> model(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 4])
    """

    def __init__(
        self,
        kernel_size: int,
        stride: int = 1,
        padding: int | str = "same",
        dilation: int = 1,
        var_weight: float | Tensor = 1.0,
        var_bias: float | Tensor = 0.0,
        in_channel_multiplier: int = 1,
        out_channel_multiplier: int = 1,
    ):
        super().__init__()
        for name, value in (
            ("kernel_size", kernel_size),
            ("stride", stride),
            ("dilation", dilation),
            ("in_channel_multiplier", in_channel_multiplier),
            ("out_channel_multiplier", out_channel_multiplier),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Conv2d {name} must be an integer >= 1, got {value!r}")
        if isinstance(padding, str):
            if padding != "same":
                raise ValueError(f"Conv2d padding must be 'same' or a non-negative integer, got {padding!r}")
            before = dilation * ((kernel_size - 1) // 2)
            after = dilation * (kernel_size // 2)
        elif isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"Conv2d padding must be 'same' or a non-negative integer, got {padding!r}")
        else:
            before = after = padding
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.in_channel_multiplier = in_channel_multiplier
        self.out_channel_multiplier = out_channel_multiplier
        self.window = Window(kernel_size, stride, dilation, before, after)
        self._init_variances(var_weight, var_bias)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}, "
            f"dilation={self.dilation}, var_weight={float(self.var_weight):.6g}, var_bias={float(self.var_bias):.6g}"
        )

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = (self.window.out_size(n) for n in size)
        if h < 1 or w < 1:
            raise ValueError(
                f"Conv2d(kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}, "
                f"dilation={self.dilation}) does not fit a {size[0]}x{size[1]} input"
            )
        return h, w

    def offsets_needed(self, out: frozenset, in_size: tuple[int, int], rule=None) -> frozenset:
        # both positions move together under each tap, so only the stride scales offsets (dilation does not)
        s = self.window.stride
        return frozenset((s * dy, s * dx) for dy, dx in out)

    def propagate(self, state: CovState) -> CovState:
        scale = state.hyper(self, "var_weight") / (self.kernel_size * self.kernel_size)
        bias = state.hyper(self, "var_bias")
        nngp = state.window_sum(state.nngp, self.window, scale, bias)
        if state.ntk is None:
            return state.output(nngp)
        # NTK parameterisation: the weights' and bias' own gradients give the new NNGP, the earlier layers'
        # come through the same window average
        return state.output(nngp, state.window_sum(state.ntk, self.window, scale).add_(nngp))

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        c_in = in_channels * self.in_channel_multiplier
        c_out = out_channels * self.out_channel_multiplier
        if c_in != incoming:
            raise ValueError(
                f"{self!r} expects {c_in} input channels ({in_channels} x in_channel_multiplier "
                f"{self.in_channel_multiplier}) but the previous layer gives {incoming}"
            )
        var_w = float(self.var_weight.detach())
        var_b = float(self.var_bias.detach())
        win = self.window
        padding = win.pad_before if win.pad_before == win.pad_after else 0
        if build.parameterization == "ntk":
            conv = self._ntk_conv(c_in, c_out, padding, var_w, var_b, build)
        else:
            conv = self._standard_conv(c_in, c_out, padding, var_w, var_b, build)
        if win.pad_before != win.pad_after:
            # Asymmetric ("same" with even k): pad explicitly so the semantics survive training.
            pad = (win.pad_before, win.pad_after, win.pad_before, win.pad_after)
            return nn.Sequential(nn.ZeroPad2d(pad), conv), c_out
        return conv, c_out

    def _ntk_conv(self, c_in: int, c_out: int, padding: int, var_w: float, var_b: float, build: FiniteBuild):
        shape = (c_out, c_in, self.kernel_size, self.kernel_size)
        weight = torch.randn(shape, generator=build.generator, dtype=build.dtype, device=build.device)
        bias = (
            torch.randn(c_out, generator=build.generator, dtype=build.dtype, device=build.device) if var_b > 0 else None
        )
        stride, dilation = self.stride, self.dilation

        def op(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return nn.functional.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation)

        return ScaledAffine(op, weight, bias, math.sqrt(var_w / (c_in * self.kernel_size**2)), math.sqrt(var_b))

    def _standard_conv(self, c_in: int, c_out: int, padding: int, var_w: float, var_b: float, build: FiniteBuild):
        conv = nn.Conv2d(
            c_in,
            c_out,
            self.kernel_size,
            stride=self.stride,
            padding=padding,
            dilation=self.dilation,
            bias=var_b > 0,
            dtype=build.dtype,
            device=build.device,
        )
        with torch.no_grad():
            std = math.sqrt(var_w / (c_in * self.kernel_size**2))
            conv.weight.normal_(0.0, 1.0, generator=build.generator).mul_(std)
            if conv.bias is not None:
                conv.bias.normal_(0.0, 1.0, generator=build.generator).mul_(math.sqrt(var_b))
        return conv
