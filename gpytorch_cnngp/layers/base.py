"""The layer protocol and the shared base classes of the layers.

A layer maps one covariance state (:class:`~gpytorch_cnngp.state.CovState`) to the next in the two
passes of :mod:`gpytorch_cnngp.state` (the self pass records what nonlinearities need; the pair pass
recalls it), reports its output size, and builds its finite torch layer. It knows nothing of tiles,
backends or GPyTorch: the kernel engine runs the passes, and :meth:`Layer.forward` is only a facade
that hands the call to it.

Shared bases: :class:`WeightedLayer` (validated ``var_weight``/``var_bias``) and
:class:`Nonlinearity` (a pointwise map given by its self and pair expectations; the self trace and
the exact diagonal of same-image pairs are handled here once).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops import safe_sqrt
from ..state import CovState

__all__ = ["Layer", "FiniteBuild", "Nonlinearity", "WeightedLayer", "check_variance", "set_evaluator"]

#: The kernel evaluator behind ``model(X, Z)``, installed by :mod:`gpytorch_cnngp.engine` when the
#: package is imported, so that layer math never imports the engine that runs it.
_evaluate: Callable[..., Tensor] | None = None


def set_evaluator(fn: Callable[..., Tensor]) -> None:
    """Install ``fn(model, x, z, diag, get)`` as what :meth:`Layer.forward` calls (done by the engine)."""
    global _evaluate
    _evaluate = fn


@dataclass
class FiniteBuild:
    """Channel bookkeeping while building a finite network (see :meth:`Layer.build_nn`)."""

    channels: int
    generator: torch.Generator | None = None
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    #: spatial size of the map arriving at the layer being built, when the caller gave the input size
    size: tuple[int, int] | None = None
    #: ``"standard"`` (weights drawn with their variance) or ``"ntk"`` (standard normal weights, scaled in forward)
    parameterization: str = "standard"


class ScaledAffine(nn.Module):
    """A layer in the NTK parameterisation: ``op(x, w_std * W, b_std * b)`` with ``W`` and ``b`` standard normal.

    The parameters are what gradient descent trains; their scale sits in ``forward``, so the network's
    parameter Jacobian gives the neural tangent kernel of the infinite-width limit (Jacot et al., 2018).
    """

    def __init__(self, op, weight: Tensor, bias: Tensor | None, w_std: float, b_std: float) -> None:
        super().__init__()
        self.op, self.w_std, self.b_std = op, w_std, b_std
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x, self.weight * self.w_std, None if self.bias is None else self.bias * self.b_std)


class Layer(nn.Module):
    """Base class of all kernel layers.

    A layer is an ``nn.Module`` so that it moves with ``.to()`` and nests in containers, but its
    ``forward`` computes the kernel of the network it describes:
    ``model(X)``, ``model(X, Z)``, ``model(X, X, same=True)`` and ``model(X, diag=True)`` (see
    :func:`gpytorch_cnngp.gram`). Subclasses implement :meth:`out_size`, :meth:`propagate` and
    :meth:`build_nn`.
    """

    #: names of the hyperparameters this layer owns (tensors, exposed as properties)
    hyperparameter_names: tuple[str, ...] = ()

    # --- kernel math -----------------------------------------------------------------------
    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Spatial size of this layer's output for an input of ``size = (H, W)``."""
        raise NotImplementedError

    def propagate(self, state: CovState) -> CovState:
        """The next covariance state: ``state.nngp`` is a covariance (pair pass) or variance (self pass) map laid
        out by ``state.layout`` (same-location ``[H, W, ...]``, full ``[H, W, H, W, ...]`` or per offset
        ``[H, W, O, ...]``, see :mod:`gpytorch_cnngp.layout`); the output is laid out by ``state.target``. Read
        hyperparameters with ``state.hyper(self, name)``, ask the state for what depends on the layout
        (``state.window_sum``, ``state.pool``, ``state.readout``, ``state.layout.own_variances``, ...) and return
        ``state.output(nngp, ntk)`` (``state.masked(...)`` where entries the target lacks may be non-zero)."""
        raise NotImplementedError

    def children_layers(self) -> Iterator[Layer]:
        return iter(())

    def needs_full(self) -> bool:
        """Whether this layer (or one inside it) needs covariances between different positions.

        Pooling does; convolutions and pointwise layers only need same-location terms unless a later
        layer needs the full covariance. The engine then carries the offsets each layer needs
        (:meth:`offsets_needed`), or ``[H, W, H, W, ...]`` maps, up to the last such layer and the cheap
        ``[H, W, ...]`` maps after it.
        """
        return any(child.needs_full() for child in self.children_layers())

    def offsets_needed(self, out: frozenset, in_size: tuple[int, int], rule=None) -> frozenset:
        """The spatial offsets ``d = q - p`` (``(dy, dx)`` pairs) this layer needs between the positions of its
        input, of size ``in_size``, to give the offsets ``out`` at its output.

        A layer that reads each position alone needs what it gives; a strided window reads ``stride * d``;
        a pooling layer mixes offsets. The plan clips the answer to the map and adds ``(0, 0)``. Containers
        ask their children through ``rule(child, out, in_size)`` (given by the plan). A layer without a rule
        keeps its network on the full maps ``[H, W, H, W]``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no offset rule")

    def has_weights(self) -> bool:
        """Whether the finite network of this layer has weights (and so sets its channel count)."""
        return bool(self.hyperparameter_names) or any(child.has_weights() for child in self.children_layers())

    def kernel_layers(self) -> Iterator[Layer]:
        """This layer and every layer below it, depth first (shared instances appear once each time)."""
        yield self
        for child in self.children_layers():
            yield from child.kernel_layers()

    # --- finite network --------------------------------------------------------------------
    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        """The finite layer and its number of output channels.

        ``in_channels``/``out_channels`` are the base counts this position gets (before channel
        multipliers); ``incoming`` is the number of channels actually arriving.
        """
        raise NotImplementedError

    def nn(
        self,
        channels: int,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        input_size: int | tuple[int, int] | None = None,
        parameterization: str = "standard",
    ) -> nn.Module:
        """A randomly initialised finite network with this architecture.

        Weights are drawn from ``N(0, var_weight / (C_in k^2))`` and biases from ``N(0, var_bias)``
        (no bias when ``var_bias == 0``), so that as ``channels`` grows the outputs over random draws
        become Gaussian with covariance ``self(X, Z)`` (except for sums after a nonlinearity, see
        :class:`~gpytorch_cnngp.Sum`, and nonlinearities applied to the raw input, whose pixels are
        not Gaussian). The first layer with weights takes ``in_channels``, the last gives
        ``out_channels`` and the others ``channels``, each scaled by the layer's channel multipliers.
        The module maps ``[N, in_channels, H, W]`` to ``[N, out_channels]``.

        A :class:`~gpytorch_cnngp.Dense` layer's weight shape depends on the image size: with
        ``input_size=(H, W)`` (or ``H`` for square images) it is created here; without, on the first
        forward call, from random numbers reserved from ``generator`` at build time (so a seed still
        fixes the whole network).

        ``parameterization="ntk"``: every weight and bias is standard normal and scaled in the forward pass
        (:class:`ScaledAffine`), so the network's outputs have the same distribution and its parameter Jacobian
        ``J J^T`` (the empirical neural tangent kernel) approaches ``self(X, Z, get="ntk")`` as ``channels``
        grows. It needs ``input_size`` when the network has a :class:`~gpytorch_cnngp.Dense` layer.
        """
        if parameterization not in ("standard", "ntk"):
            raise ValueError(f"parameterization must be 'standard' or 'ntk', got {parameterization!r}")
        for name, value in (
            ("channels", channels),
            ("in_channels", in_channels),
            ("out_channels", out_channels),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if input_size is not None:
            size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
                raise ValueError(f"input_size must be a positive integer or (H, W), got {input_size!r}")
            self.out_size(size)  # raises if the architecture does not fit
            input_size = size
        build = FiniteBuild(
            channels=channels,
            generator=generator,
            dtype=dtype,
            device=device,
            size=input_size,
            parameterization=parameterization,
        )
        module, _ = self.build_nn(in_channels, out_channels, in_channels, build)
        return nn.Sequential(module, nn.Flatten(start_dim=1))

    # --- kernel entry point ----------------------------------------------------------------
    def forward(
        self, x: Tensor, z: Tensor | None = None, same: bool = False, diag: bool = False, get: str | tuple = "nngp"
    ) -> Tensor | tuple[Tensor, ...]:
        """The kernel: ``[N1, N2]`` for ``(X, Z)``, ``[N1, N1]`` for ``X`` alone, ``[N]`` with ``diag``;
        ``get="ntk"`` for the neural tangent kernel, ``get=("nngp", "ntk")`` for both from one pass.

        ``model(X)`` and ``model(X, X, same=True)`` treat both sides as the same images: the result
        is exactly symmetric and its diagonal is exactly the self variance. ``model(X, Z)`` with
        ``diag=True`` gives ``k(x_i, z_i)`` for sets of equal length. A facade: the work is
        :func:`gpytorch_cnngp.gram` (or :func:`~gpytorch_cnngp.gram_diag` with ``diag``), with their
        defaults; call those for tiles, budgets, backends or progress bars.
        """
        if _evaluate is None:  # pragma: no cover - importing gpytorch_cnngp installs the engine
            raise RuntimeError("no kernel engine installed: import gpytorch_cnngp first")
        if not diag and same and z is not None and z is not x and not torch.equal(z, x):
            raise ValueError("same=True requires Z to be X (or None)")
        if not diag and same:
            z = None
        return _evaluate(self, x, z, diag, get)


def check_variance(name: str, value) -> Tensor:
    """Validate a variance hyperparameter: a finite non-negative scalar (float or 0-d tensor)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise ValueError(f"{name} must be a real number or a scalar tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            value = value.to(torch.get_default_dtype())
        tensor = value.reshape(())
    else:
        tensor = torch.tensor(float(value), dtype=torch.float64)
    scalar = float(tensor.detach())
    if not math.isfinite(scalar):
        raise ValueError(f"{name} must be finite, got {scalar}")
    if scalar < 0:
        raise ValueError(f"{name} must be non-negative, got {scalar}")
    return tensor


class WeightedLayer(Layer):
    """A layer with Gaussian weights and biases: validated ``var_weight``/``var_bias`` tensors.

    They are buffers (they move with ``.to()``); assigning a float or a tensor validates it, and a
    tensor with ``requires_grad=True`` makes the kernel differentiable with respect to it.
    """

    hyperparameter_names = ("var_weight", "var_bias")

    def _init_variances(self, var_weight: float | Tensor, var_bias: float | Tensor) -> None:
        self.register_buffer("_var_weight", check_variance("var_weight", var_weight))
        self.register_buffer("_var_bias", check_variance("var_bias", var_bias))

    @property
    def var_weight(self) -> Tensor:
        return self._var_weight

    @var_weight.setter
    def var_weight(self, value: float | Tensor) -> None:
        self._var_weight = check_variance("var_weight", value)

    @property
    def var_bias(self) -> Tensor:
        return self._var_bias

    @var_bias.setter
    def var_bias(self, value: float | Tensor) -> None:
        self._var_bias = check_variance("var_bias", value)


class Nonlinearity(Layer):
    """A pointwise nonlinearity ``phi``; maps covariances of pre-activations to those of activations.

    Subclasses implement :meth:`self_map` (``v -> E[phi(u)^2]`` for ``u ~ N(0, v)``) and
    :meth:`pair_map` (``E[phi(u) phi(u')]`` from the covariance ``c`` and the standard deviations of
    both sides), and :meth:`build_nn`; for the neural tangent kernel also :meth:`self_derivative_map` and
    :meth:`pair_derivative_map` (the same expectations of ``phi'``, by which the NTK is multiplied). This
    class records and recalls the standard deviations and sets the exact diagonal of same-image pairs, so a
    new nonlinearity needs nothing else.
    """

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def offsets_needed(self, out: frozenset, in_size: tuple[int, int], rule=None) -> frozenset:
        # each entry alone, plus the same-location variances (the standard deviations it records)
        return out | {(0, 0)}

    def self_map(self, v: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError

    def pair_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        raise NotImplementedError

    def self_derivative_map(self, v: Tensor, s: Tensor) -> Tensor:
        """``E[phi'(u)^2]`` for ``u ~ N(0, v)`` (``s = sqrt(v)``)."""
        raise NotImplementedError(f"{type(self).__name__} has no neural tangent kernel rule")

    def pair_derivative_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        """``E[phi'(u) phi'(u')]`` from the covariance and the standard deviations of both sides."""
        raise NotImplementedError(f"{type(self).__name__} has no neural tangent kernel rule")

    def pair_functions(self, state: CovState) -> tuple[Callable, Callable]:
        """The pair expectations ``state``'s pass uses, the NNGP's and the NTK factor's: :meth:`pair_map` and
        :meth:`pair_derivative_map`, or versions of them that read what the layer derives per image from the
        traces (:meth:`~gpytorch_cnngp.state.Pass.derived`) and places by ``state.layout``."""
        return self.pair_map, self.pair_derivative_map

    def _maps(self, state: CovState, sides: tuple[Tensor, ...], pair, own) -> Tensor:
        """The pair expectation ``pair(c, s1, s2, compiled)`` at every entry of the state's layout (the first side's
        standard deviation at the first position, the second's at the second), with the exact self values
        ``own(v, s)`` where an image meets itself at one position. ``sides``: the recorded standard deviations
        (``(s,)`` in the self pass, ``(s_x, s_z)`` in a pair pass)."""
        m, layout, run = state.nngp, state.layout, state.run
        if run.mode == "self":
            (s,) = sides
            return layout.self_map(m, s, pair, own, run.compiled)
        sx, sz = sides
        out = layout.pointwise(m, sx, sz, pair, run.compiled)
        if run.same:
            # An image with itself: use the self value instead of the pair formula at rho ~ 1, which rounding spoils.
            s = sx.squeeze(-1)  # [H, W, n, 1] -> [H, W, n]
            layout.write_same_image(out, own(s * s, s))
        return out

    def propagate(self, state: CovState) -> CovState:
        state = state.at(state.target)  # only the entries the output carries
        run = state.run
        if run.mode == "self":
            s = safe_sqrt(state.layout.own_variances(state.nngp))
            run.record(s)
            sides = (s,)
        else:
            sides = run.recall()
        pair, pair_derivative = self.pair_functions(state)
        nngp = self._maps(state, sides, pair, self.self_map)
        ntk = None
        if state.ntk is not None:
            ntk = state.ntk * self._maps(state, sides, pair_derivative, self.self_derivative_map)
        return state.masked(nngp, ntk)  # zero where p + d leaves the map (offset maps)
