"""The layer protocol: how a layer maps one covariance state to the next.

A network's kernel is computed in two passes over the same layer tree:

* the **self pass** propagates each image's own variance map ``v[h, w, n]``; every nonlinearity
  records the standard deviation map it sees (``trace``), and the pass ends with ``k(x, x)``;
* the **pair pass** propagates covariance maps ``c[h, w, ...]`` between two images (a block of pairs
  ``[h, w, n1, n2]`` or matched pairs ``[h, w, n]``); each nonlinearity reads back the recorded
  standard deviations of both sides in the same traversal order.

Maps keep the spatial dimensions first and the images last (see :mod:`gpytorch_cnngp.ops`).

Linear layers apply the same map in both passes. Recording self terms once per image means the pair
pass never recomputes them, whichever block of pairs it works on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Layer", "Context", "FiniteBuild"]


@dataclass
class Context:
    """What a layer may need besides its input map during one pass.

    :ivar mode: ``"self"`` (variances of single images) or ``"pair"`` (covariances between images).
    :ivar hyper: hyperparameter tensors per layer, keyed by ``id(layer)``; a layer reads its values
        through :meth:`Layer.hyper` so that a caller (e.g. the GPyTorch kernel) can substitute them.
    :ivar trace: self pass: list to append each nonlinearity's input standard deviations to.
    :ivar trace_x, trace_z: pair pass: recorded standard deviations of the two sides, shaped to
        broadcast against the pair maps (``[h, w, n1, 1]`` and ``[h, w, 1, n2]`` for a block).
    :ivar same: pair pass on a square block whose ``(a, a)`` pairs are an image with itself; those
        entries are set exactly to the self values after every nonlinearity.
    :ivar compiled: the pass runs inside ``torch.compile`` (forward only); layers may then use
        vectorisable approximations whose error is far below the dtype's resolution.
    :ivar window_method: ``"matmul"`` or ``"slices"``, see :func:`gpytorch_cnngp.ops.window_sum`.
    :ivar pair_ndim: number of trailing image dimensions of the maps (1 for ``[.., n]``, 2 for a block
        ``[.., n1, n2]``); the leading ones are spatial: 2 on the same-location path ``[H, W, ..]``,
        4 on the full path ``[H, W, H, W, ..]`` (see :meth:`is_full`).
    :ivar keep_full: a layer after the current one needs full spatial covariances, so containers
        must not reduce the map to its same-location part yet.
    """

    mode: str
    hyper: Mapping[int, Mapping[str, Tensor]]
    trace: list[Tensor] | None = None
    trace_x: list[Tensor] | None = None
    trace_z: list[Tensor] | None = None
    same: bool = False
    compiled: bool = False
    window_method: str = "matmul"
    pair_ndim: int = 1
    keep_full: bool = False
    _slot: int = field(default=0, repr=False)

    def is_full(self, m: Tensor) -> bool:
        """Whether ``m`` is a full spatial covariance ``[H, W, H, W, ...]`` (else ``[H, W, ...]``)."""
        return m.dim() == 4 + self.pair_ndim

    def next_slot(self) -> int:
        slot = self._slot
        self._slot += 1
        return slot


@dataclass
class FiniteBuild:
    """Channel bookkeeping while building a finite network (see :meth:`Layer.build_nn`)."""

    channels: int
    generator: torch.Generator | None = None
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    #: spatial size of the map arriving at the layer being built, when the caller gave the input size
    size: tuple[int, int] | None = None


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

    def propagate(self, m: Tensor, ctx: Context) -> Tensor:
        """Map a covariance (pair mode) or variance (self mode) map ``[H, W, ...]`` to the next."""
        raise NotImplementedError

    def children_layers(self) -> Iterator[Layer]:
        return iter(())

    def needs_full(self) -> bool:
        """Whether this layer (or one inside it) needs covariances between different positions.

        Pooling does; convolutions and pointwise layers only need same-location terms unless a later
        layer needs the full covariance. The engine then carries ``[H, W, H, W, ...]`` maps up to the
        last such layer and the cheap ``[H, W, ...]`` maps after it.
        """
        return any(child.needs_full() for child in self.children_layers())

    def has_weights(self) -> bool:
        """Whether the finite network of this layer has weights (and so sets its channel count)."""
        return bool(self.hyperparameter_names) or any(child.has_weights() for child in self.children_layers())

    def hyper(self, ctx: Context, name: str) -> Tensor:
        return ctx.hyper[id(self)][name]

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
        """
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
        build = FiniteBuild(channels=channels, generator=generator, dtype=dtype, device=device, size=input_size)
        module, _ = self.build_nn(in_channels, out_channels, in_channels, build)
        return nn.Sequential(module, nn.Flatten(start_dim=1))

    # --- kernel entry point ----------------------------------------------------------------
    def forward(self, x: Tensor, z: Tensor | None = None, same: bool = False, diag: bool = False) -> Tensor:
        """The kernel: ``[N1, N2]`` for ``(X, Z)``, ``[N1, N1]`` for ``X`` alone, ``[N]`` with ``diag``.

        ``model(X)`` and ``model(X, X, same=True)`` treat both sides as the same images: the result
        is exactly symmetric and its diagonal is exactly the self variance. ``model(X, Z)`` with
        ``diag=True`` gives ``k(x_i, z_i)`` for sets of equal length.
        """
        from ..engine import gram, gram_diag

        if diag:
            return gram_diag(self, x, z)
        if z is None or same:
            if same and z is not None and z is not x and not torch.equal(z, x):
                raise ValueError("same=True requires Z to be X (or None)")
            return gram(self, x)
        return gram(self, x, z)
