"""Planning a Gram matrix: tile sizes under a memory budget, and the order of the tiles.

The only module that sizes tiles. The engine asks it for a :class:`GramPlan` once per call; what one
pair of a tile costs comes from the backend (:attr:`~gpytorch_cnngp.backends.Backend.workspace_factor`)
and from the network's map sizes, found once per network by a shape-only self pass.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import settings
from .backends import BACKENDS
from .layers.base import Layer
from .passes import self_pass
from .state import Hyper, Requirements

__all__ = ["GramPlan", "estimate_tile_size", "network_info", "tiles", "default_budget"]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class NetworkInfo:
    """What a network's layer tree fixes for every call: its requirements and its map sizes per image.

    :ivar requirements: :class:`~gpytorch_cnngp.state.Requirements` (the full spatial path).
    :ivar largest: the largest map area of one pair (squared on the full path).
    :ivar trace_area: the total area of the recorded self-trace slots of one image.
    :ivar local_largest: the largest same-location map area (what a backend that keeps a pair's spatial maps
        in per-thread buffers holds per pair: its repacked traces).
    """

    requirements: Requirements
    largest: int
    trace_area: int
    local_largest: int = 0


_NETWORKS: OrderedDict[tuple, NetworkInfo] = OrderedDict()


def network_info(model: Layer, size: tuple[int, int]) -> NetworkInfo:
    """The :class:`NetworkInfo` of ``model`` for ``size`` images, remembered per layer tree.

    Map sizes come from the self pass on a shape-only ("meta") tensor, about 20 ms for a ResNet-32, so
    results are kept per model and layer tree (hyperparameter values do not change shapes; replacing or
    re-wiring a layer does, and changes the key).
    """
    # a window is a plain attribute (in the module's __dict__); getattr would take torch's slow path on every layer
    modules = model.named_modules()
    key = (tuple(size), tuple((name, id(m), type(m), m.__dict__.get("window")) for name, m in modules))
    if key in _NETWORKS:
        _NETWORKS.move_to_end(key)
        return _NETWORKS[key]
    requirements = Requirements(model)
    meta = torch.device("meta")
    trace, _ = self_pass(
        model, torch.empty(*size, 1, 1, device=meta), Hyper.of(model, torch.float32, meta), requirements=requirements
    )
    areas = [t.shape[0] * t.shape[1] for t in trace]
    largest = local_largest = max([size[0] * size[1], *areas])
    if requirements.full:  # maps [H, W, H, W] up to the last pooling layer, or [H, W, offsets] (either path)
        plan = requirements.offset_plan(model, size)
        largest = max(largest * largest, 0 if plan is None else plan.largest)
    info = NetworkInfo(requirements, largest, sum(areas), local_largest)
    _NETWORKS[key] = info
    if len(_NETWORKS) > 32:
        _NETWORKS.popitem(last=False)
    return info


def default_budget(device: torch.device) -> int:
    """Bytes per call when none is given: ``settings.memory_budget``, else 60% of free GPU memory, or a
    quarter of RAM up to 4 GiB on a CPU."""
    chosen = settings.memory_budget.value()
    if chosen is not None:
        return int(chosen)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(min(total // 4, 4 << 30))


@dataclass
class GramPlan:
    """How a Gram matrix will be computed (see :func:`estimate_tile_size`)."""

    tile_size: int
    memory_budget: int
    trace_bytes: int
    pair_bytes: int
    backend: str = "eager"


def estimate_tile_size(
    model: Layer,
    image_size: tuple[int, int],
    n_images: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    memory_budget: int | None = None,
    tile_size: int | None = None,
    backend: str = "eager",
    grad: bool = False,
    info: NetworkInfo | None = None,
) -> GramPlan:
    """Choose the tile edge so that self traces plus one tile's workspace fit ``memory_budget`` bytes.

    :param backend: the name of the backend that runs the tiles (its working copies per pair).
    :param grad: the tiles are differentiated (each layer keeps its maps for the backward pass).
    :param info: ``network_info(model, image_size)`` if the caller has it already.
    """
    device = torch.device(device)
    budget = int(memory_budget) if memory_budget is not None else default_budget(device)
    if budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    info = info if info is not None else network_info(model, image_size)
    item = _itemsize(dtype)
    trace_bytes = n_images * info.trace_area * item
    runner = BACKENDS[backend]
    factor = runner.workspace_factor
    if grad:
        factor += runner.grad_workspace_per_layer * sum(1 for _ in model.kernel_layers())
    pair_bytes = runner.pair_area(info) * item * factor
    free = budget - trace_bytes
    max_pairs = free // pair_bytes if free > 0 else 0
    if max_pairs < 1:
        raise ValueError(
            f"memory_budget of {budget / 2**20:.1f} MiB is too small: the self terms of {n_images} images take "
            f"{trace_bytes / 2**20:.1f} MiB and one pair needs {pair_bytes / 2**10:.1f} KiB more"
        )
    fit = max(1, math.isqrt(int(max_pairs)))
    if tile_size is None:
        tile_size = fit if device.type == "cuda" else min(fit, runner.cpu_tile)
    else:
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
        if tile_size > fit:
            raise ValueError(
                f"tile_size={tile_size} needs {tile_size**2 * pair_bytes / 2**20:.1f} MiB per tile, more than the "
                f"memory_budget of {budget / 2**20:.1f} MiB allows (at most {fit})"
            )
    return GramPlan(tile_size, budget, trace_bytes, pair_bytes, backend)


# Images per eager self-pass chunk: on a CPU, maps of a few hundred images stay in cache between the pass's many
# small operations (a ResNet-32 GP's self values of 2000 images: 50 ms in chunks of 256, 220 ms in one chunk); on a
# GPU, a few thousand fill it
CPU_SELF_CHUNK = 256
SELF_CHUNK = 4096


def self_chunk(device: torch.device | str, bound: int | None = None) -> int:
    """Images per chunk of the eager self pass on ``device``: :data:`CPU_SELF_CHUNK` on a CPU, else
    :data:`SELF_CHUNK`, and at most ``bound`` (what memory allows). Each image is computed alone, but a matrix
    product may round differently for another number of columns, so ``gram``'s diagonal and ``gram_diag`` take
    their chunks from here alike."""
    cap = CPU_SELF_CHUNK if torch.device(device).type == "cpu" else SELF_CHUNK
    return cap if bound is None else max(1, min(int(bound), cap))


def tiles(n1: int, n2: int, tile: int, symmetric: bool) -> Iterator[tuple[int, int, int, int]]:
    """The tiles ``(i0, i1, j0, j1)`` of an ``[n1, n2]`` matrix, row by row; ``symmetric``: on and above
    the diagonal only."""
    for i0 in range(0, n1, tile):
        for j0 in range(i0 if symmetric else 0, n2, tile):
            yield i0, min(i0 + tile, n1), j0, min(j0 + tile, n2)
