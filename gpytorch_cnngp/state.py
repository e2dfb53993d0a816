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
first and the images last: ``[H, W, ...]`` on the same-location path, ``[H, W, H, W, ...]`` on the full
path that pooling needs (see :mod:`gpytorch_cnngp.ops`).

This module knows nothing of tiles, backends or GPyTorch; it only relies on the layer protocol
(``kernel_layers()``, ``hyperparameter_names``, ``needs_full()``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["CovState", "Hyper", "KernelLayer", "Pass", "Requirements", "hyperparameters"]


class KernelLayer(Protocol):
    """What the passes need of a layer (:class:`gpytorch_cnngp.layers.Layer` implements it)."""

    hyperparameter_names: tuple[str, ...]

    def propagate(self, state: CovState) -> CovState: ...

    def children_layers(self) -> Iterator[KernelLayer]: ...

    def kernel_layers(self) -> Iterator[KernelLayer]: ...

    def needs_full(self) -> bool: ...


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


@dataclass
class Pass:
    """One traversal of the layer tree: its mode, hyperparameters, requirements and tape.

    :ivar mode: ``"self"`` (variances of single images) or ``"pair"`` (covariances between images).
    :ivar hyper: the network's :class:`Hyper`.
    :ivar requirements: the network's :class:`Requirements`.
    :ivar trace_x, trace_z: pair pass: the recorded standard deviations of the two sides, shaped to
        broadcast against the pair maps (``[h, w, n1, 1]`` and ``[h, w, 1, n2]`` for a block).
    :ivar same: pair pass on a square block whose ``(a, a)`` pairs are an image with itself; those
        entries are set exactly to the self values after every nonlinearity.
    :ivar compiled: the pass runs inside ``torch.compile`` (forward only); layers may then use
        vectorisable approximations whose error is far below the dtype's resolution.
    :ivar window_method: ``"matmul"`` or ``"slices"``, see :func:`gpytorch_cnngp.ops.window_sum`.
    :ivar pair_ndim: trailing image dimensions of the maps (1 for ``[.., n]``, 2 for ``[.., n1, n2]``).
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
    trace: list[Tensor] = field(default_factory=list)
    _slot: int = field(default=0, repr=False)

    def record(self, s: Tensor) -> None:
        """Self pass: keep a nonlinearity's input standard deviations for the pair passes."""
        self.trace.append(s)

    def recall(self) -> tuple[Tensor, Tensor]:
        """Pair pass: the next nonlinearity's recorded standard deviations of both sides."""
        slot = self._slot
        self._slot += 1
        return self.trace_x[slot], self.trace_z[slot]


@dataclass(frozen=True)
class CovState:
    """The covariance state between two layers: the map and the pass it belongs to.

    :ivar nngp: the map: variances (self pass) or covariances (pair pass) of the pre-activations,
        ``[H, W, ...]`` or, on the full path, ``[H, W, H, W, ...]``.
    :ivar run: the :class:`Pass` this state belongs to.
    :ivar keep_full: a layer after the current one needs full spatial covariances, so containers must
        not reduce the map to its same-location part yet.
    :ivar ntk: the neural tangent kernel's map, of the same shape, when the pass computes it (else ``None``).
    """

    nngp: Tensor
    run: Pass
    keep_full: bool = False
    ntk: Tensor | None = None

    @property
    def full(self) -> bool:
        """Whether the map is a full spatial covariance ``[H, W, H, W, ...]`` (else ``[H, W, ...]``)."""
        return self.nngp.dim() == 4 + self.run.pair_ndim

    def hyper(self, layer: Layer, name: str) -> Tensor:
        """``layer``'s hyperparameter ``name`` for this pass."""
        return self.run.hyper(layer, name)

    def replace(self, **changes: Any) -> CovState:
        """A new state with some fields changed (``nngp=...``, ``ntk=...``, ``keep_full=...``)."""
        return replace(self, **changes)

    def map(self, fn) -> CovState:
        """The same linear map ``fn`` applied to every map the state carries (pooling, sums of positions)."""
        return replace(self, nngp=fn(self.nngp), ntk=None if self.ntk is None else fn(self.ntk))
