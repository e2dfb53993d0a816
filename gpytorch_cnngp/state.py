"""What flows from layer to layer: the covariance state, its pass, and the network's hyperparameters.

A network's kernel is computed in two passes over the same layer tree (see :mod:`gpytorch_cnngp.passes`):

* the **self pass** propagates each image's own variance map ``v[h, w, n]``; every nonlinearity
  *records* the standard deviation map it sees, and the pass ends with ``k(x, x)``;
* the **pair pass** propagates covariance maps ``c[h, w, ...]`` between two images (a block of pairs
  ``[h, w, n1, n2]`` or matched pairs ``[h, w, n]``); each nonlinearity *recalls* the recorded
  standard deviations of both sides, in the same traversal order.

A layer receives a :class:`CovState` and returns the next one: :meth:`CovState.replace` makes a new
state, the pass it belongs to (:class:`Pass`) is shared. A state carries the NNGP map and, when the pass
computes it, the neural tangent kernel's map beside it (``ntk``), so that a second kernel needs no new
signature in any layer. Only the pass's tape of standard deviations is
mutable, and only through :meth:`Pass.record` and :meth:`Pass.recall`. Maps keep the spatial dimensions
first and the images last: ``[H, W, ...]`` on the same-location path; where a later layer pools, covariances
between positions either as one map per spatial offset the readout needs, ``[H, W, O, ...]``
(:class:`SpatialPlan`, :class:`~gpytorch_cnngp.ops.Offsets`), or as every pair of positions,
``[H, W, H, W, ...]`` (the full path, see :mod:`gpytorch_cnngp.ops`). The state names its maps' layout
(:mod:`gpytorch_cnngp.layout`) and hands them to it for whatever depends on it, so layers never branch on it.

This module knows nothing of tiles, backends or GPyTorch; it only relies on the layer protocol
(``kernel_layers()``, ``hyperparameter_names``, ``needs_full()``, ``out_size()``, ``offsets_needed()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from . import settings
from .layout import SAME_LOCATION, Layout, layout_of
from .ops import Offsets

__all__ = ["CovState", "Hyper", "KernelLayer", "Pass", "Requirements", "SpatialPlan", "enter", "hyperparameters"]

#: offsets as sets of ``(dy, dx)``, what a layer's :meth:`offsets_needed` takes and returns
OffsetSet = frozenset[tuple[int, int]]
ZERO_OFFSET: OffsetSet = frozenset({(0, 0)})


class KernelLayer(Protocol):
    """What the passes need of a layer (:class:`gpytorch_cnngp.layers.Layer` implements it)."""

    hyperparameter_names: tuple[str, ...]

    def propagate(self, state: CovState) -> CovState: ...

    def children_layers(self) -> Iterator[KernelLayer]: ...

    def kernel_layers(self) -> Iterator[KernelLayer]: ...

    def needs_full(self) -> bool: ...

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]: ...

    def offsets_needed(self, out: OffsetSet, in_size: tuple[int, int], rule=None) -> OffsetSet: ...


Layer = KernelLayer  # the name the annotations below read best with


def hyperparameters(model: Layer) -> list[tuple[Layer, str]]:
    """Every ``(layer, name)`` hyperparameter of ``model`` in a fixed order; shared layers appear once."""
    seen, out = set(), []
    for layer in model.kernel_layers():
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.extend((layer, name) for name in layer.hyperparameter_names)
    return out


@dataclass(frozen=True)
class Hyper:
    """The hyperparameter values of one network: one tensor per ``(layer, name)``, in a fixed order.

    Made once per call from the layers' own values (:meth:`of`), optionally overridden (the GPyTorch
    kernel's learned variances); layers read it with ``state.hyper(self, name)``; the native backend
    reads it by ``(layer, name)``; the differentiable engine swaps its values (:meth:`with_values`).
    """

    params: tuple[tuple[Layer, str], ...]
    values: tuple[Tensor, ...]
    _index: dict[tuple[int, str], int] = field(repr=False, compare=False)

    @classmethod
    def of(
        cls,
        model: Layer,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        override: Hyper | Mapping[Layer, Mapping[str, Tensor]] | None = None,
    ) -> Hyper:
        """The values of ``model``'s hyperparameters in ``dtype`` on ``device``.

        :param override: a :class:`Hyper` of the same network or ``{layer: {name: tensor}}``; its
            values replace the layers' own.
        """
        params = hyperparameters(model)
        device = torch.device(device) if device is not None else None
        values = []
        for layer, name in params:
            value = None
            if isinstance(override, Hyper):
                value = override.get(layer, name)
            elif override is not None and layer in override and name in override[layer]:
                value = override[layer][name]
            if value is None:
                value = getattr(layer, name)
            if (dtype is not None and value.dtype != dtype) or (device is not None and value.device != device):
                value = value.to(device=device, dtype=dtype)
            values.append(value)
        return cls._make(tuple(params), tuple(values))

    @classmethod
    def _make(cls, params: tuple[tuple[Layer, str], ...], values: tuple[Tensor, ...]) -> Hyper:
        if len(params) != len(values):
            raise ValueError(f"{len(params)} hyperparameters but {len(values)} values")
        index = {(id(layer), name): k for k, (layer, name) in enumerate(params)}
        return cls(params, values, index)

    def __call__(self, layer: Layer, name: str) -> Tensor:
        """The value of ``layer``'s hyperparameter ``name`` (a KeyError names a layer not in the network)."""
        try:
            return self.values[self._index[(id(layer), name)]]
        except KeyError:
            raise KeyError(f"{type(layer).__name__} has no hyperparameter {name!r} in this network") from None

    def position(self, layer: Layer, name: str) -> int:
        """The index of ``layer``'s hyperparameter ``name`` in :attr:`params` and :attr:`values`."""
        try:
            return self._index[(id(layer), name)]
        except KeyError:
            raise KeyError(f"{type(layer).__name__} has no hyperparameter {name!r} in this network") from None

    def get(self, layer: Layer, name: str) -> Tensor | None:
        k = self._index.get((id(layer), name))
        return None if k is None else self.values[k]

    def with_values(self, values) -> Hyper:
        """The same hyperparameters with other tensors (e.g. leaves that require grad)."""
        return Hyper._make(self.params, tuple(values))

    @property
    def requires_grad(self) -> bool:
        return any(v.requires_grad for v in self.values)


class Requirements:
    """Which layers of a network must keep full spatial covariances: decided once per network.

    ``needs(layer)`` is ``layer.needs_full()`` (a pooling layer, or a container holding one),
    memoised over one traversal of the tree, so containers ask it per child without walking the tree
    again on every pass.
    """

    def __init__(self, model: Layer) -> None:
        self._needs: dict[int, bool] = {}
        self._plans: dict[tuple[int, int], SpatialPlan | None] = {}
        self._visit(model)
        self.full = self._needs[id(model)]

    def _visit(self, layer: Layer) -> bool:
        key = id(layer)
        if key not in self._needs:
            children = [self._visit(child) for child in layer.children_layers()]
            # a leaf says whether it needs the full path (pooling does); a container needs it if a child does
            self._needs[key] = any(children) if children else bool(layer.needs_full())
        return self._needs[key]

    def needs(self, layer: Layer) -> bool:
        return self._needs[id(layer)]

    def plan(self, model: Layer, size: tuple[int, int]) -> SpatialPlan | None:
        """The offsets each layer carries for ``size`` images, or ``None`` where the passes keep today's maps:
        same-location networks, ``settings.spatial_path("full")``, a layer without an offset rule, and under
        ``"auto"`` a network where some layer would carry more offsets than its map has positions (the full
        map ``[H, W, H, W]`` is then the smaller one)."""
        if not self.full:
            return None
        mode = settings.spatial_path.value()
        if mode == "full":
            return None
        plan = self.offset_plan(model, size)
        if plan is None or (mode == "auto" and plan.worst > 1.0):
            return None
        return plan

    def offset_plan(self, model: Layer, size: tuple[int, int]) -> SpatialPlan | None:
        """The :class:`SpatialPlan` of a pooled network for ``size`` images whatever the setting (``None``
        without pooling or where a layer has no offset rule); made once per size."""
        if not self.full:
            return None
        size = (int(size[0]), int(size[1]))
        if size not in self._plans:
            try:
                self._plans[size] = SpatialPlan(model, size)
            except NotImplementedError:
                self._plans[size] = None
        return self._plans[size]


class SpatialPlan:
    """The spatial offsets every layer of a pooled network carries for one input size, decided once from the
    readout backwards through each layer's :meth:`offsets_needed` rule.

    A layer whose output must carry the offsets ``want`` (an :class:`~gpytorch_cnngp.ops.Offsets`, ``None``
    for the same-location map alone) needs ``needed(layer, size, want)`` at its input. Offset sets are clipped
    to the map (an offset at least as large as the map only meets positions outside it), always hold
    ``(0, 0)``, and are made once per size and set, so layers compare them by identity.

    :ivar input: the offsets of the network's input map (``None``: same-location).
    :ivar worst: the largest ratio of a layer's offset count to its map's positions (above 1 an offset map
        ``[H, W, O]`` is larger than the full map ``[H, W, H, W]``).
    :ivar largest: the largest offset map of one pair, ``H W O`` entries.
    """

    def __init__(self, model: Layer, size: tuple[int, int]) -> None:
        self._sets: dict[tuple, Offsets] = {}
        self._needed: dict[tuple, Offsets | None] = {}
        self._chains: dict[tuple, list[Offsets | None]] = {}
        self.input = self.needed(model, size, None)
        shapes = [(o.size[0] * o.size[1], len(o)) for o in self._sets.values()]
        self.worst = max((n / area for area, n in shapes), default=0.0)
        self.largest = max((area * n for area, n in shapes), default=size[0] * size[1])

    def offsets(self, size: tuple[int, int], wanted) -> Offsets | None:
        """The one :class:`~gpytorch_cnngp.ops.Offsets` of ``wanted`` clipped to a ``size`` map (``None``:
        only ``(0, 0)``)."""
        h, w = size
        kept = frozenset(d for d in wanted if abs(d[0]) < h and abs(d[1]) < w) | ZERO_OFFSET
        if kept == ZERO_OFFSET:
            return None
        key = (size, kept)
        if key not in self._sets:
            self._sets[key] = Offsets(size, kept)
        return self._sets[key]

    def same_location(self, size: tuple[int, int]) -> Offsets:
        """The set of ``(0, 0)`` alone, as an :class:`~gpytorch_cnngp.ops.Offsets` (for layers that read only
        the same-location map but give other offsets)."""
        key = (size, None)
        if key not in self._sets:
            self._sets[key] = Offsets(size, ZERO_OFFSET)
        return self._sets[key]

    def needed(self, layer: Layer, size: tuple[int, int], want: Offsets | None) -> Offsets | None:
        """The offsets ``layer`` needs at its input of ``size`` to give the offsets ``want`` at its output."""
        key = (id(layer), size, id(want))
        if key not in self._needed:
            out = ZERO_OFFSET if want is None else frozenset(want.offsets)
            self._needed[key] = self.offsets(size, layer.offsets_needed(out, size, self._rule))
        return self._needed[key]

    def _rule(self, layer: Layer, out: OffsetSet, size: tuple[int, int]) -> OffsetSet:
        """What containers ask of their children (through the plan, so that every set is recorded)."""
        out_size = layer.out_size(size)
        found = self.needed(layer, size, self.offsets(out_size, out))
        return ZERO_OFFSET if found is None else frozenset(found.offsets)

    def chain(self, layers, size: tuple[int, int], want: Offsets | None) -> list[Offsets | None]:
        """The offsets each of ``layers`` (in series, the first taking ``size`` maps) must give at its output
        so that the last gives ``want``."""
        key = (tuple(id(layer) for layer in layers), size, id(want))
        if not layers:
            return []
        if key not in self._chains:
            sizes = [size]
            for layer in layers[:-1]:
                sizes.append(layer.out_size(sizes[-1]))
            wants = [want]
            for layer, in_size in zip(reversed(layers[1:]), reversed(sizes[1:]), strict=True):
                wants.append(self.needed(layer, in_size, wants[-1]))
            self._chains[key] = wants[::-1]
        return self._chains[key]


def enter(layer: Layer, state: CovState, want: Offsets | None) -> CovState:
    """``layer.propagate`` on the offset path: the input reduced to what ``layer`` reads (its same-location
    map when it needs no other offset), the output giving exactly the offsets ``want``."""
    plan = state.run.plan
    needs = plan.needed(layer, state.size, want)
    if needs is None:
        state = state.at(SAME_LOCATION)
        if want is not None:  # a layer that reads only d = 0 but gives other offsets (a bias, a strided window)
            state = state.at(layout_of(plan.same_location(state.size)))
    return layer.propagate(state.replace(want=want)).at(layout_of(want))


@dataclass
class Pass:
    """One traversal of the layer tree: its mode, hyperparameters, requirements and tape.

    :ivar mode: ``"self"`` (variances of single images) or ``"pair"`` (covariances between images).
    :ivar hyper: the network's :class:`Hyper`.
    :ivar requirements: the network's :class:`Requirements`.
    :ivar trace_x, trace_z: pair pass: the recorded standard deviations of the two sides, ``[h, w, n1]`` and
        ``[h, w, n2]`` per nonlinearity (:meth:`recall` gives them shaped by :meth:`shaped`).
    :ivar same: pair pass on a square block whose ``(a, a)`` pairs are an image with itself; those
        entries are set exactly to the self values after every nonlinearity.
    :ivar compiled: the pass runs inside ``torch.compile`` (forward only); layers may then use
        vectorisable approximations whose error is far below the dtype's resolution.
    :ivar window_method: ``"matmul"`` or ``"slices"``, see :func:`gpytorch_cnngp.ops.window_sum`.
    :ivar pair_ndim: trailing image dimensions of the maps (1 for ``[.., n]``, 2 for ``[.., n1, n2]``).
    :ivar plan: the offsets a pooled network's maps carry (:class:`SpatialPlan`), or ``None``: same-location
        maps, and full maps ``[H, W, H, W, ...]`` up to the last pooling layer.
    :ivar memo_x, memo_z: pair pass: where :meth:`derived` keeps what it computes from each side's traces, given by
        the engine so that it outlives the tile (``None``: computed for this pass alone).
    """

    mode: str
    hyper: Hyper
    requirements: Requirements
    trace_x: list[Tensor] | None = None
    trace_z: list[Tensor] | None = None
    same: bool = False
    compiled: bool = False
    window_method: str = "matmul"
    pair_ndim: int = 1
    plan: SpatialPlan | None = None
    trace: list[Tensor] = field(default_factory=list)
    memo_x: dict | None = None
    memo_z: dict | None = None
    _slot: int = field(default=0, repr=False)

    def record(self, s: Tensor) -> None:
        """Self pass: keep a nonlinearity's input standard deviations for the pair passes."""
        self.trace.append(s)

    def recall(self) -> tuple[Tensor, Tensor]:
        """Pair pass: the next nonlinearity's recorded standard deviations of both sides."""
        slot = self._slot
        self._slot += 1
        return self.shaped(self.trace_x[slot], self.trace_z[slot])

    def shaped(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Pair pass: maps per image of the two sides (``[..., n1]`` and ``[..., n2]``: the traces, or what a layer
        derives from them) shaped to broadcast against the pair maps: ``[..., n1, 1]`` and ``[..., 1, n2]`` for a
        block (``pair_ndim`` 2), as they are for matched pairs."""
        return (x[..., :, None], z[..., None, :]) if self.pair_ndim == 2 else (x, z)

    def derived(self, key: str, fn: Callable[[Tensor], object]) -> tuple[object, object]:
        """Pair pass: ``fn`` of each side's standard deviations recorded by the nonlinearity last recalled
        (``[h, w, n]``, unshaped; :meth:`shaped` shapes what it gives): what a layer computes per image and position
        (a series' coefficients), once per call and range of images where the engine keeps the results across tiles
        (:attr:`memo_x`; a square tile's two sides may share one)."""
        slot = self._slot - 1
        out = []
        for trace, memo in ((self.trace_x, self.memo_x), (self.trace_z, self.memo_z)):
            if memo is None:
                out.append(fn(trace[slot]))
                continue
            if (slot, key) not in memo:
                memo[(slot, key)] = fn(trace[slot])
            out.append(memo[(slot, key)])
        return out[0], out[1]


@dataclass(frozen=True)
class CovState:
    """The covariance state between two layers: the map, its layout and the pass it belongs to.

    :ivar nngp: the map: variances (self pass) or covariances (pair pass) of the pre-activations, laid out by
        :attr:`layout`.
    :ivar run: the :class:`Pass` this state belongs to.
    :ivar keep_full: a layer after the current one needs full spatial covariances, so containers must
        not reduce the map to its same-location part yet.
    :ivar ntk: the neural tangent kernel's map, of the same shape, when the pass computes it (else ``None``).
    :ivar layout: how the maps are laid out (:mod:`gpytorch_cnngp.layout`): same-location ``[H, W, ...]``, full
        ``[H, W, H, W, ...]`` or, on the offset path (``run.plan``), per offset ``[H, W, O, ...]``.
    :ivar want: on the offset path, the offsets the current layer must give at its output (``None``: the
        same-location map alone).
    """

    nngp: Tensor
    run: Pass
    keep_full: bool = False
    ntk: Tensor | None = None
    layout: Layout = SAME_LOCATION
    want: Offsets | None = None

    @property
    def size(self) -> tuple[int, int]:
        """The map's spatial size ``(H, W)``."""
        return int(self.nngp.shape[0]), int(self.nngp.shape[1])

    @property
    def target(self) -> Layout:
        """The layout the current layer gives: on the offset path that of :attr:`want`, else the input's (a full
        map stays full until a container drops it)."""
        return self.layout if self.run.plan is None else layout_of(self.want)

    def at(self, layout: Layout) -> CovState:
        """The same covariances laid out by ``layout`` (the same-location map, or a subset of the offsets)."""
        if layout == self.layout:
            return self
        source = self.layout
        return self.map(lambda m: source.convert(m, layout)).replace(layout=layout)

    def output(self, nngp: Tensor, ntk: Tensor | None = None) -> CovState:
        """The layer's result: maps already in :attr:`target`."""
        return replace(self, nngp=nngp, ntk=ntk, layout=self.target)

    def each(self, fn) -> CovState:
        """The layer's result when it maps every map the state carries alike: ``fn(m)``, in :attr:`target`."""
        return self.output(fn(self.nngp), None if self.ntk is None else fn(self.ntk))

    def masked(self, nngp: Tensor, ntk: Tensor | None = None) -> CovState:
        """The layer's result from maps in :attr:`target` whose entries it lacks (``p + d`` outside the map on the
        offset path) may hold anything: those are set to zero, in place."""
        target, pair_ndim = self.target, self.run.pair_ndim
        nngp = target.mask_(nngp, pair_ndim)
        return replace(self, nngp=nngp, ntk=None if ntk is None else target.mask_(ntk, pair_ndim), layout=target)

    # --- the layout's operations on this state's maps (see :class:`gpytorch_cnngp.layout.Layout`) ---------
    def window_sum(self, m: Tensor, window, scale: Tensor, bias: Tensor | None = None) -> Tensor:
        """A convolution's window sum of ``m`` (both positions moved together) times ``scale`` plus ``bias``, in
        :attr:`target`."""
        return self.layout.window_sum(m, self.target, window, self.run.window_method, scale, bias)

    def pool(self, m: Tensor, window, scale: float) -> Tensor:
        """Average pooling of ``m``: ``scale`` times the sum over ``window`` on each image's positions, in
        :attr:`target`."""
        return self.layout.pool(m, self.target, window, self.run.window_method, scale, self._single())

    def global_mean(self, m: Tensor) -> Tensor:
        """The mean of ``m`` over every pair of positions, as a 1x1 map in :attr:`target`."""
        return self.layout.global_mean(m, self._single())

    def readout(self, m: Tensor) -> Tensor:
        """The mean over positions of ``m``'s same-location map, as a 1x1 map in :attr:`target`."""
        return self.layout.readout(m)

    def _single(self):
        plan = self.run.plan
        return None if plan is None else plan.same_location

    def hyper(self, layer: Layer, name: str) -> Tensor:
        """``layer``'s hyperparameter ``name`` for this pass."""
        return self.run.hyper(layer, name)

    def replace(self, **changes: Any) -> CovState:
        """A new state with some fields changed (``nngp=...``, ``ntk=...``, ``keep_full=...``)."""
        return replace(self, **changes)

    def map(self, fn) -> CovState:
        """The same linear map ``fn`` applied to every map the state carries (pooling, sums of positions)."""
        return replace(self, nngp=fn(self.nngp), ntk=None if self.ntk is None else fn(self.ntk))
