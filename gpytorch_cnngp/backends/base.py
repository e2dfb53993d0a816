"""The interface every backend implements: run the pair pass of one tile of image pairs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from ..layers.base import Layer
    from ..state import Hyper, Requirements

__all__ = ["Backend", "BlockFn", "VjpFn", "SelfTerms", "TraceSlices", "Traces", "SelfFn"]


class SelfTerms:
    """Each image's self terms for one kernel call as a backend's blocks read them: the traces (the standard
    deviations every nonlinearity sees) of a tile's first set (:meth:`rows`) and second set (:meth:`columns`).
    The engine asks for them tile by tile, so a backend may compute them when asked instead of all at once."""

    def rows(self, i0: int, i1: int) -> object:
        """The traces of images ``i0:i1`` as the first set of a block (what :data:`BlockFn` gets as ``trace_x``)."""
        raise NotImplementedError

    def columns(self, j0: int, j1: int) -> object:
        """The traces of images ``j0:j1`` as the second set of a block (``trace_z``)."""
        raise NotImplementedError


class TraceSlices(list):
    """One side's traces for a tile (a list of tensors) with the memo in which
    :meth:`~gpytorch_cnngp.state.Pass.derived` keeps what layers compute from them."""

    def __init__(self, traces: list[Tensor], memo: dict) -> None:
        super().__init__(traces)
        self.memo = memo


def _nbytes(value: object) -> int:
    if isinstance(value, Tensor):
        return value.element_size() * value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


class Traces(SelfTerms):
    """Self terms from :func:`gpytorch_cnngp.passes.self_pass`: one ``[h, w, n]`` trace per nonlinearity,
    sliced along the images for either side.

    What layers derive from a tile's traces (:meth:`~gpytorch_cnngp.state.Pass.derived`) is kept per range of
    images, for either side (a square tile on the diagonal of ``K(X, X)`` shares it between its two): for the last
    range of rows, which a row of tiles shares, and for other ranges while the kept ones take at most
    ``keep_bytes`` (the memory the tiles leave of the budget): each image's once per call, not once per tile."""

    def __init__(self, traces: list[Tensor], keep_bytes: int = 0) -> None:
        self.traces = traces
        self.keep_bytes = keep_bytes
        self._rows: tuple[int, int, dict] | None = None
        self._memos: dict[tuple[int, int], dict] = {}

    def _slices(self, i0: int, i1: int, memo: dict) -> TraceSlices:
        return TraceSlices([t[..., i0:i1] for t in self.traces], memo)

    def _memo(self, i0: int, i1: int) -> dict:
        memo = self._memos.get((i0, i1))
        if memo is None:
            if _nbytes(self._memos) > self.keep_bytes:  # over the memory left: keep only the newest (and the rows')
                self._memos.clear()
            memo = self._memos[(i0, i1)] = {}
        return memo

    def rows(self, i0: int, i1: int) -> TraceSlices:
        if self._rows is None or self._rows[:2] != (i0, i1):
            self._rows = (i0, i1, self._memo(i0, i1))
        return self._slices(i0, i1, self._rows[2])

    def columns(self, j0: int, j1: int) -> TraceSlices:
        return self._slices(j0, j1, self._memo(j0, j1))


#: ``own(x, both)``: the self terms of images ``x`` ``[H, W, C, n]``; ``both``: they will be read as either
#: side (a symmetric ``K(X, X)``), else only as the side the engine asks for.
SelfFn = Callable[[Tensor, bool], SelfTerms]

#: ``block(x, z, trace_x, trace_z, same)``: the kernel block ``[n1, n2]`` of images ``x`` ``[H, W, C, n1]``
#: and ``z`` ``[H, W, C, n2]`` given their self traces (a :class:`SelfTerms`' ``rows`` and ``columns``);
#: ``same``: a square block of an image set with itself, whose diagonal the engine then replaces by the
#: self values.
BlockFn = Callable[[Tensor, Tensor, object, object, bool], Tensor]

#: ``vjp(x, z, trace_x, trace_z, same, grad)``: the gradients of ``(grad * block).sum()`` with respect to the
#: hyperparameter values (in ``hyper.params`` order), to ``trace_x`` and to ``trace_z`` (``None`` where there is
#: none; with ``same``, ``trace_z`` is ``trace_x`` and its gradient may come in either list).
VjpFn = Callable[
    [Tensor, Tensor, list[Tensor], list[Tensor], bool, Tensor],
    tuple[list[Tensor | None], list[Tensor | None], list[Tensor | None]],
]


class Backend:
    """A way to run the pair pass: eager torch, ``torch.compile`` or the native CPU kernel.

    The engine tiles and checks; a backend only says whether it can run a network
    (:meth:`unsupported`), how much memory a pair of its tile takes (:attr:`workspace_factor`), its
    preferred CPU tile (:attr:`cpu_tile`), and gives the function that computes one tile
    (:meth:`block_fn`) and, if it differentiates, the one that back-propagates into a tile's
    hyperparameters and traces (:meth:`block_vjp`). :func:`gpytorch_cnngp.backends.choose` picks one for
    each call.
    """

    name: ClassVar[str]
    #: working copies of one pair's largest map that a tile holds at once (measured upper bounds)
    workspace_factor: ClassVar[int]
    #: default tile edge on a CPU (GPUs take the largest tile that fits the budget)
    cpu_tile: ClassVar[int]
    #: extra working copies of one pair's largest map per layer when a tile is differentiated
    grad_workspace_per_layer: ClassVar[int] = 0

    @classmethod
    def pair_area(cls, info) -> int:
        """Entries of the largest map one pair of a tile holds (a :class:`~gpytorch_cnngp.tiling.NetworkInfo`
        gives the map sizes); :attr:`workspace_factor` copies of it are budgeted per pair."""
        return info.largest

    @classmethod
    def unsupported(
        cls,
        model: Layer,
        size: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        ntk: bool = False,
        grad: bool = False,
    ) -> str | None:
        """Why this backend cannot run ``model`` on ``size`` images here (naming the layer), or ``None``;
        ``ntk``: with the neural tangent kernel beside the NNGP; ``grad``: and back-propagate into the
        hyperparameters (:meth:`block_vjp`)."""
        return "it computes kernels, not their gradients" if grad else None

    @classmethod
    def self_fn(
        cls, model: Layer, size: tuple[int, int], hyper: Hyper, requirements: Requirements, ntk: bool = False
    ) -> SelfFn | None:
        """The backend's own self pass for a forward call without gradients, or ``None``: the engine then runs
        :func:`gpytorch_cnngp.passes.self_pass` and slices its :class:`Traces`."""
        return None

    @classmethod
    def block_fn(
        cls, model: Layer, size: tuple[int, int], hyper: Hyper, requirements: Requirements, tile: int, ntk: bool = False
    ) -> BlockFn:
        """The function computing one tile of this call (hyperparameters fixed for the call); with ``ntk`` the
        tile is ``[2, n1, n2]`` (NNGP, NTK)."""
        raise NotImplementedError

    @classmethod
    def block_vjp(
        cls, model: Layer, size: tuple[int, int], hyper: Hyper, requirements: Requirements, ntk: bool = False
    ) -> VjpFn:
        """The function back-propagating a tile's gradient (see :data:`VjpFn`); ``hyper`` holds the values
        to differentiate by. Only for calls :meth:`unsupported` accepts with ``grad=True``."""
        raise NotImplementedError
