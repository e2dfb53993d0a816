"""How a covariance map is laid out, and the operations whose form depends on it.

A map flowing between layers keeps its spatial dimensions first and the images last, in one of three layouts:

* :class:`SameLocation`: ``[H, W, ...]``, the covariance of each position with the same position;
* :class:`Full`: ``[H, W, H, W, ...]``, every pair of positions ``(p, q)``;
* :class:`PerOffset`: ``[H, W, O, ...]``, the covariance of ``p`` with ``p + d`` for each offset ``d`` of an
  :class:`~gpytorch_cnngp.ops.Offsets` (zero where ``p + d`` leaves the map).

A layer asks its state's layout for what it needs (a convolution's window sum, the own variances a
nonlinearity reads, a pool's combination, ...) and keeps only its own math: scales, biases, which window.
Each operation takes the input map in this layout and gives the map in the ``target`` layout the caller
names (the state knows it: :attr:`gpytorch_cnngp.state.CovState.target`). The tensor math itself lives in
:mod:`gpytorch_cnngp.ops`; this module knows nothing of passes, tiles, backends or GPyTorch.

Where a same-location map must take part in a pool on the offset path (a map of one position, a window of one
tap, where the plan found no other offset needed), it becomes the offset map of ``(0, 0)`` alone; the caller
hands over ``single(size)``, the plan's set of ``(0, 0)`` for a ``size`` map, or ``None`` off that path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .ops import (
    Offsets,
    Window,
    diagonal_window_sum,
    offset_pool,
    offset_window_sum,
    position_diagonal,
    same_location,
    window_sum,
    window_sum_both_sides,
)

__all__ = ["Layout", "SameLocation", "Full", "PerOffset", "SAME_LOCATION", "FULL", "layout_of"]

#: ``single(size)``: the offset set of ``(0, 0)`` alone for a ``size`` map (``None`` off the offset path)
Single = Callable[[tuple[int, int]], Offsets] | None

#: a pointwise expectation ``fn(c, s1, s2, compiled)`` of a nonlinearity
PairFn = Callable[[Tensor, Tensor, Tensor, bool], Tensor]

#: a nonlinearity's exact value for a position with itself, ``fn(v, s)``
OwnFn = Callable[[Tensor, Tensor], Tensor]


def _pooled_size(m: Tensor, win: Window) -> tuple[int, int]:
    return win.out_size(int(m.shape[0])), win.out_size(int(m.shape[1]))


def _needs_positions(what: str) -> RuntimeError:
    # the engine starts on a spatial layout whenever a layer needs one; only a hand-made state gets here
    return RuntimeError(
        f"{what} needs covariances between positions, which a same-location map lacks; compute kernels through "
        "gpytorch_cnngp.gram"
    )


class Layout:
    """The operations whose form depends on the layout; one instance per layout (see the module docstring).

    ``m`` is always a map in this layout; ``pair_ndim`` is the number of trailing image dimensions (1 for
    ``[.., n]``, 2 for ``[.., n1, n2]``).
    """

    def convert(self, m: Tensor, target: Layout) -> Tensor:
        """The same covariances in ``target`` (the same-location map, or a subset of this map's offsets)."""
        raise ValueError(f"a {self} map cannot give a {target} map")

    def own_variances(self, m: Tensor) -> Tensor:
        """The same-location map ``[H, W, ...]``: each position with itself (what a nonlinearity records)."""
        raise NotImplementedError

    def place(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        """Same-location maps ``[H, W, ...]`` of the two sides (standard deviations, or anything per image and
        position) where every entry of this layout reads them: ``s1`` at the first position, ``s2`` at the second
        (zero outside the map)."""
        raise NotImplementedError

    def pointwise(self, m: Tensor, s1: Tensor, s2: Tensor, fn: PairFn, compiled: bool) -> Tensor:
        """``fn(c, s1, s2, compiled)`` at every entry, ``s1`` and ``s2`` placed by :meth:`place`."""
        return fn(m, *self.place(s1, s2), compiled)

    def self_map(self, m: Tensor, s: Tensor, pair: PairFn, own: OwnFn, compiled: bool) -> Tensor:
        """A nonlinearity on one image's map: ``pair`` between positions, exactly ``own(v, s)`` where a position
        meets itself."""
        v = self.own_variances(m)  # read before the pair values: the order autograd sums the gradients of m in
        out = self.pointwise(m, s, s, pair, compiled)
        self._write_own(out, own(v, s))
        return out

    def _write_own(self, out: Tensor, value: Tensor) -> None:
        raise NotImplementedError

    def write_same_image(self, out: Tensor, value: Tensor) -> None:
        """On a square block ``[.., n, n]`` of an image set with itself: ``value`` ``[H, W, n]`` into the entries of
        each image and position with themselves."""
        raise NotImplementedError

    def window_sum(
        self, m: Tensor, target: Layout, win: Window, method: str, scale: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        """A convolution: ``scale`` times the sum over ``win``'s taps, both positions moved together by each tap,
        plus ``bias``; a fresh tensor in ``target``, zero where ``target`` has no entry."""
        raise NotImplementedError

    def mask_(self, m: Tensor, pair_ndim: int) -> Tensor:
        """``m`` (in this layout) with the entries the layout lacks set to zero, in place."""
        return m

    def readout(self, m: Tensor) -> Tensor:
        """A dense readout's sum: the mean over positions of the same-location map, ``[1, 1, ...]`` as a 1x1 map of
        this layout (the same-location one for :class:`PerOffset`: a 1x1 map has no other offset)."""
        raise NotImplementedError

    def pool(self, m: Tensor, target: Layout, win: Window, method: str, scale: float, single: Single) -> Tensor:
        """Average pooling: ``scale`` times the sum over ``win``'s taps on each image's positions independently;
        a fresh tensor in ``target``."""
        raise NotImplementedError

    def global_mean(self, m: Tensor, single: Single) -> Tensor:
        """The mean over every pair of positions, as a 1x1 map (the same-location one for :class:`PerOffset`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


@dataclass(frozen=True, repr=False)
class SameLocation(Layout):
    """``[H, W, ...]``: each position with itself only."""

    def convert(self, m: Tensor, target: Layout) -> Tensor:
        if isinstance(target, SameLocation):
            return m
        if isinstance(target, PerOffset) and target.offsets.offsets == ((0, 0),):
            return m.unsqueeze(2)  # the offset (0, 0) alone is the same map
        return super().convert(m, target)

    def own_variances(self, m: Tensor) -> Tensor:
        return m

    def place(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        return s1, s2

    def self_map(self, m: Tensor, s: Tensor, pair: PairFn, own: OwnFn, compiled: bool) -> Tensor:
        return own(m, s)  # every entry is a position with itself

    def write_same_image(self, out: Tensor, value: Tensor) -> None:
        out.diagonal(0, -2, -1).copy_(value)

    def window_sum(
        self, m: Tensor, target: Layout, win: Window, method: str, scale: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        out = window_sum(m, win, win, method, scale)
        # the window sums return fresh tensors when given a scale, and neither matmul nor mul keeps its output for
        # the backward pass, so the bias can be added in place (one pass, no allocation)
        return out if bias is None else out.add_(bias)

    def readout(self, m: Tensor) -> Tensor:
        return m.mean(dim=(0, 1), keepdim=True)

    def pool(self, m: Tensor, target: Layout, win: Window, method: str, scale: float, single: Single) -> Tensor:
        if single is None:
            raise _needs_positions("average pooling")
        source = PerOffset(single((int(m.shape[0]), int(m.shape[1]))))
        return source.pool(self.convert(m, source), target, win, method, scale, single)

    def global_mean(self, m: Tensor, single: Single) -> Tensor:
        if single is None:
            raise _needs_positions("global average pooling")
        source = PerOffset(single((int(m.shape[0]), int(m.shape[1]))))
        return source.global_mean(self.convert(m, source), single)


@dataclass(frozen=True, repr=False)
class Full(Layout):
    """``[H, W, H, W, ...]``: every pair of positions, the first image's two dimensions first."""

    def convert(self, m: Tensor, target: Layout) -> Tensor:
        if isinstance(target, Full):
            return m
        if isinstance(target, SameLocation):
            return same_location(m)
        return super().convert(m, target)

    def own_variances(self, m: Tensor) -> Tensor:
        return same_location(m)

    def place(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        return s1[:, :, None, None], s2[None, None]

    def _write_own(self, out: Tensor, value: Tensor) -> None:
        position_diagonal(out).copy_(value.flatten(0, 1).movedim(0, -1))

    def write_same_image(self, out: Tensor, value: Tensor) -> None:
        # entries (p, p, a, a): each position of image a with itself, as [n, H * W]
        hw = value.shape[0] * value.shape[1]
        target = out.view(hw, hw, *out.shape[4:]).diagonal(0, -2, -1).diagonal(0, 0, 1)
        target.copy_(value.reshape(hw, -1).t())

    def window_sum(
        self, m: Tensor, target: Layout, win: Window, method: str, scale: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        out = diagonal_window_sum(m, win, win, scale)  # fresh when given a scale, as window_sum
        return out if bias is None else out.add_(bias)

    def readout(self, m: Tensor) -> Tensor:
        return same_location(m).mean(dim=(0, 1), keepdim=True)[:, :, None, None]

    def pool(self, m: Tensor, target: Layout, win: Window, method: str, scale: float, single: Single) -> Tensor:
        return window_sum_both_sides(m, win, win, method, scale)

    def global_mean(self, m: Tensor, single: Single) -> Tensor:
        return m.mean(dim=(0, 1, 2, 3), keepdim=True)


@dataclass(frozen=True, repr=False)
class PerOffset(Layout):
    """``[H, W, O, ...]``: position ``p`` with ``p + d`` for each offset ``d`` of :attr:`offsets`, zero where ``p + d``
    leaves the map. Two instances are the same layout when they hold the same :class:`~gpytorch_cnngp.ops.Offsets`
    object (the plan makes one per size and set)."""

    offsets: Offsets

    def __repr__(self) -> str:
        return f"PerOffset({self.offsets!r})"

    def convert(self, m: Tensor, target: Layout) -> Tensor:
        if isinstance(target, SameLocation):
            return m.select(2, self.offsets.zero)
        if isinstance(target, PerOffset):
            return target.offsets.select(m, self.offsets)
        return super().convert(m, target)

    def own_variances(self, m: Tensor) -> Tensor:
        return m.select(2, self.offsets.zero)

    def place(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        return s1[:, :, None], self.offsets.shifted(s2)

    def self_map(self, m: Tensor, s: Tensor, pair: PairFn, own: OwnFn, compiled: bool) -> Tensor:
        out = self.pointwise(m, s, s, pair, compiled)  # (the offset path has always read v after the pair values)
        self._write_own(out, own(self.own_variances(m), s))
        return out

    def _write_own(self, out: Tensor, value: Tensor) -> None:
        out.select(2, self.offsets.zero).copy_(value)

    def write_same_image(self, out: Tensor, value: Tensor) -> None:
        out.select(2, self.offsets.zero).diagonal(0, -2, -1).copy_(value)

    def window_sum(
        self, m: Tensor, target: Layout, win: Window, method: str, scale: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        if isinstance(target, SameLocation):  # output offset 0 reads input offset 0
            return SAME_LOCATION.window_sum(self.own_variances(m), target, win, method, scale, bias)
        # output offset D from input offset stride * D; the bias where P + D is inside, as the mask leaves it
        out = offset_window_sum(m, self.offsets, target.offsets, win, win, method, scale)
        if bias is not None:
            out.add_(bias)
        return target.mask_(out, m.dim() - 3)

    def mask_(self, m: Tensor, pair_ndim: int) -> Tensor:
        return m.mul_(self.offsets.mask(m, pair_ndim))

    def readout(self, m: Tensor) -> Tensor:
        return m.select(2, self.offsets.zero).mean(dim=(0, 1), keepdim=True)

    def pool(self, m: Tensor, target: Layout, win: Window, method: str, scale: float, single: Single) -> Tensor:
        if isinstance(target, SameLocation):  # the offset (0, 0), which no position leaves: nothing to mask
            return offset_pool(m, self.offsets, single(_pooled_size(m, win)), win, scale).squeeze(2)
        return target.mask_(offset_pool(m, self.offsets, target.offsets, win, scale), m.dim() - 3)

    def global_mean(self, m: Tensor, single: Single) -> Tensor:
        # every pair of positions is one offset at one position, or outside the map (zero there)
        area = int(m.shape[0]) * int(m.shape[1])
        return m.sum(dim=(0, 1, 2), keepdim=True).squeeze(2).div_(area * area)


SAME_LOCATION: Layout = SameLocation()
FULL: Layout = Full()


def layout_of(offsets: Offsets | None) -> Layout:
    """The layout of maps carrying ``offsets`` (``None``: the same-location map)."""
    return SAME_LOCATION if offsets is None else PerOffset(offsets)
