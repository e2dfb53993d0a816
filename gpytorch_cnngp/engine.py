"""The kernel engine: input checks, self terms, tiling under a memory budget, symmetric Gram
matrices, the compiled path, and memory-bounded gradients. The only module that knows about tiles.
"""

from __future__ import annotations

import gc
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from . import settings
from .devices import parse_device
from .layers.base import Context, Layer
from .memory import keep_freed_memory
from .ops import first_order_only

__all__ = ["gram", "gram_diag", "self_pass", "hyperparameters", "estimate_tile_size", "native_ready", "GramPlan"]

HyperMap = Mapping[int, Mapping[str, Tensor]]

# ---------------------------------------------------------------------------------------------
# validation


def _check_images(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [N, C, H, W], got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"{name} must have shape [N, C, H, W] (4 dimensions), got {x.ndim} with shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name} has an empty channel or spatial dimension: shape {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or infinite values (first in image {bad})")


def check_architecture(model: Layer, size: tuple[int, int]) -> None:
    """Raise a ValueError unless ``model`` reduces a ``size`` image to a 1x1 map."""
    if not isinstance(model, Layer):
        raise ValueError(f"model must be a gpytorch_cnngp layer, got {type(model).__name__}")
    out = model.out_size(size)
    if tuple(out) != (1, 1):
        raise ValueError(
            f"the architecture maps a {size[0]}x{size[1]} input to a {out[0]}x{out[1]} output; its last layer "
            f"must reduce it to 1x1 (e.g. end with Dense(), GlobalAvgPool2d() or "
            f"Conv2d(kernel_size={out[0]}, padding=0))"
        )


def _prepare(model, x, z, dtype, device) -> tuple[Tensor, Tensor | None]:
    _check_images("X", x)
    if z is not None:
        _check_images("Z", z)
        if z.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"X and Z must have the same channels and image size, got {tuple(x.shape[1:])} and {tuple(z.shape[1:])}"
            )
    check_architecture(model, (x.shape[2], x.shape[3]))
    dtype = dtype or x.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if dtype in (torch.float16, torch.bfloat16):
        # kernel values span many orders of magnitude (about 1e12 for the paper's networks): half precision
        # overflows or loses them silently
        raise ValueError(
            f"{dtype} is too narrow for CNN-GP kernels (their values overflow or lose precision); compute in "
            "float32 or float64: pass dtype=torch.float32, or convert the images"
        )
    device = parse_device(device) if device is not None else x.device
    x = x.to(device=device, dtype=dtype)
    z = z.to(device=device, dtype=dtype) if z is not None else None
    return x, z


# ---------------------------------------------------------------------------------------------
# hyperparameters


def hyperparameters(model: Layer) -> list[tuple[Layer, str]]:
    """Every ``(layer, name)`` hyperparameter of ``model`` in a fixed order; shared layers appear once."""
    seen, out = set(), []
    for layer in model.kernel_layers():
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.extend((layer, name) for name in layer.hyperparameter_names)
    return out


def _hyper_map(
    model: Layer, dtype: torch.dtype, device: torch.device, override: Mapping | None = None
) -> tuple[dict[int, dict[str, Tensor]], list[tuple[Layer, str]]]:
    """Hyperparameter tensors per layer id, in the working dtype; ``override[layer][name]`` wins."""
    params = hyperparameters(model)
    out: dict[int, dict[str, Tensor]] = {}
    for layer, name in params:
        value = None
        if override is not None and layer in override and name in override[layer]:
            value = override[layer][name]
        if value is None:
            value = getattr(layer, name)
        out.setdefault(id(layer), {})[name] = value.to(device=device, dtype=dtype)
    return out, params


# ---------------------------------------------------------------------------------------------
# the two passes


def spatial_first(x: Tensor) -> Tensor:
    """Images ``[N, C, H, W]`` in the engine's layout ``[H, W, C, N]`` (images innermost)."""
    return x.permute(2, 3, 1, 0).contiguous()


def _channel_mean(total: Tensor, channels: int) -> Tensor:
    return total if channels == 1 else total.div_(channels)  # einsum's fresh output: safe in place


def _input_matched(x: Tensor, z: Tensor, full: bool = False) -> Tensor:
    # channel mean of x_c[p] z_c[p] for matched images: [H, W, N]; full: of x_c[p] z_c[q], [H, W, H, W, N]
    if full:
        return _channel_mean(torch.einsum("hwcn,HWcn->hwHWn", x, z), x.shape[2])
    return (x * z).mean(2)


def _input_pair(x: Tensor, z: Tensor, full: bool = False) -> Tensor:
    # channel mean of x_c[p] z_c[p] for every pair: [H, W, n1, n2]; full: [H, W, H, W, n1, n2]
    if full:
        return _channel_mean(torch.einsum("hwca,HWcb->hwHWab", x, z), x.shape[2])
    if x.shape[2] == 1:
        return x[:, :, 0, :, None] * z[:, :, 0, None, :]
    return torch.matmul(x.transpose(2, 3), z) / x.shape[2]


def self_pass(model: Layer, x: Tensor, hyper: HyperMap, window_method: str = "matmul") -> tuple[list[Tensor], Tensor]:
    """Variances of single images ``x`` ``[H, W, C, N]`` through ``model``.

    :return: the recorded trace (one ``[h, w, N]`` standard-deviation map per nonlinearity) and
        ``k(x, x)`` of shape ``[N]``.
    """
    ctx = Context(mode="self", hyper=hyper, trace=[], window_method=window_method)
    out = model.propagate(_input_matched(x, x, model.needs_full()), ctx)
    return ctx.trace, out.reshape(x.shape[-1])


def _pair_block(
    model: Layer,
    x: Tensor,
    z: Tensor,
    trace_x: list[Tensor],
    trace_z: list[Tensor],
    hyper: HyperMap,
    same: bool,
    compiled: bool,
    window_method: str,
) -> Tensor:
    """Kernel block ``[n1, n2]`` between images ``x`` ``[H, W, C, n1]`` and ``z`` ``[H, W, C, n2]``
    given their sliced self traces (``[h, w, n1]`` and ``[h, w, n2]`` per nonlinearity)."""
    ctx = Context(
        mode="pair",
        hyper=hyper,
        trace_x=[t[..., :, None] for t in trace_x],
        trace_z=[t[..., None, :] for t in trace_z],
        same=same,
        compiled=compiled,
        window_method=window_method,
        pair_ndim=2,
    )
    out = model.propagate(_input_pair(x, z, model.needs_full()), ctx)
    return out.reshape(x.shape[-1], z.shape[-1])


def _paired(model, x, z, trace_x, trace_z, hyper, window_method) -> Tensor:
    """``k(x_i, z_i)`` for matched pairs: maps ``[H, W, N]`` on both sides."""
    ctx = Context(mode="pair", hyper=hyper, trace_x=trace_x, trace_z=trace_z, window_method=window_method)
    out = model.propagate(_input_matched(x, z, model.needs_full()), ctx)
    return out.reshape(x.shape[-1])


_compiled_block = None


def _compiled_pair_block():
    global _compiled_block
    if _compiled_block is None:
        import torch._dynamo

        # One graph per architecture, dtype, device and tile shape: static shapes generate much faster
        # loops than dynamic ones, so edge tiles are padded to the full tile size (see _fill).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # Let the C++ compiler fuse multiply-adds (the ReLU's polynomial is mostly those): about 5%
        # faster on CPU and, if anything, more accurate. Only this graph is affected.
        _compiled_block = torch.compile(
            _pair_block, dynamic=False, options={"cpp.enable_floating_point_contract_flag": "fast"}
        )
    return _compiled_block


def _pad_last(t: Tensor, size: int) -> Tensor:
    """Zero-pad the last dimension to ``size`` (padding images are black: zero variance, zero output)."""
    missing = size - t.shape[-1]
    return t if missing == 0 else torch.nn.functional.pad(t, (0, missing))


# ---------------------------------------------------------------------------------------------
# planning: tile sizes and memory


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_MAP_SIZES: OrderedDict[tuple, tuple[int, int]] = OrderedDict()


def _map_sizes(model: Layer, size: tuple[int, int]) -> tuple[int, int]:
    """(largest map area, total area of the recorded self-trace slots) for one image.

    Found by running the self pass on a shape-only ("meta") tensor, which costs about 20 ms for a
    ResNet-32, so results are remembered per model and layer tree (hyperparameter values do not
    change shapes; replacing or re-wiring a layer does, and changes the key).
    """
    key = (tuple(size), tuple((name, id(m), type(m), getattr(m, "window", None)) for name, m in model.named_modules()))
    if key in _MAP_SIZES:
        _MAP_SIZES.move_to_end(key)
        return _MAP_SIZES[key]
    result = _measure_map_sizes(model, size)
    _MAP_SIZES[key] = result
    if len(_MAP_SIZES) > 32:
        _MAP_SIZES.popitem(last=False)
    return result


def _measure_map_sizes(model: Layer, size: tuple[int, int]) -> tuple[int, int]:
    meta = torch.device("meta")
    hyper, _ = _hyper_map(model, torch.float32, meta)
    trace, _ = self_pass(model, torch.empty(*size, 1, 1, device=meta), hyper)
    areas = [t.shape[0] * t.shape[1] for t in trace]
    largest = max([size[0] * size[1], *areas])
    if model.needs_full():  # maps [H, W, H, W] up to the last pooling layer
        largest = largest * largest
    return largest, sum(areas)


def _default_budget(device: torch.device) -> int:
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


# Working copies of one pair map that a block holds at once, per path (measured upper bounds).
_WORKSPACE_FACTOR = {False: 8, True: 6}
# Default tile edge: small blocks stay in cache on CPU; GPUs want large ones.
_CPU_TILE = 32
# The native kernel keeps a pair's maps in per-thread registers, so a tile costs only its slices of
# the inputs and traces (repacked per tile) plus the output; larger tiles amortise that repacking.
_NATIVE_TILE = 256


@dataclass
class GramPlan:
    """How a Gram matrix will be computed (see :func:`estimate_tile_size`)."""

    tile_size: int
    memory_budget: int
    trace_bytes: int
    pair_bytes: int
    compiled: bool
    native: bool = False


def estimate_tile_size(
    model: Layer,
    image_size: tuple[int, int],
    n_images: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    memory_budget: int | None = None,
    tile_size: int | None = None,
    compiled: bool = False,
    grad: bool = False,
    native: bool = False,
) -> GramPlan:
    """Choose the tile edge so that self traces plus one tile's workspace fit ``memory_budget`` bytes."""
    device = torch.device(device)
    budget = int(memory_budget) if memory_budget is not None else _default_budget(device)
    if budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    largest, trace_area = _map_sizes(model, image_size)
    item = _itemsize(dtype)
    trace_bytes = n_images * trace_area * item
    depth = sum(1 for _ in model.kernel_layers())
    factor = _WORKSPACE_FACTOR[compiled] + (3 * depth if grad else 0)
    # native: about one map per pair (the repacked traces of a tile's rows and columns), generously
    pair_bytes = largest * item * (1 if native else factor)
    free = budget - trace_bytes
    max_pairs = free // pair_bytes if free > 0 else 0
    if max_pairs < 1:
        raise ValueError(
            f"memory_budget of {budget / 2**20:.1f} MiB is too small: the self terms of {n_images} images take "
            f"{trace_bytes / 2**20:.1f} MiB and one pair needs {pair_bytes / 2**10:.1f} KiB more"
        )
    fit = max(1, math.isqrt(int(max_pairs)))
    if tile_size is None:
        tile_size = fit if device.type == "cuda" else min(fit, _NATIVE_TILE if native else _CPU_TILE)
    else:
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
        if tile_size > fit:
            raise ValueError(
                f"tile_size={tile_size} needs {tile_size**2 * pair_bytes / 2**20:.1f} MiB per tile, more than the "
                f"memory_budget of {budget / 2**20:.1f} MiB allows (at most {fit})"
            )
    return GramPlan(tile_size, budget, trace_bytes, pair_bytes, compiled, native)


def _tiles(n1: int, n2: int, tile: int, symmetric: bool) -> Iterator[tuple[int, int, int, int]]:
    for i0 in range(0, n1, tile):
        for j0 in range(i0 if symmetric else 0, n2, tile):
            yield i0, min(i0 + tile, n1), j0, min(j0 + tile, n2)


def _use_compile(compile: bool | None, n_pairs: int, grad: bool, full: bool = False) -> bool:
    if grad:
        return False
    if compile is None:
        mode = settings.compile_mode.value()
        if mode != "auto":
            return mode == "on"
        # full spatial covariance maps (pooling) run about twice as fast eagerly as compiled
        return n_pairs >= settings.auto_compile_pairs.value() and not full
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None, got {compile!r}")
    return compile


def _native_program(
    model: Layer,
    size: tuple[int, int],
    compile: bool | None,
    compiled: bool,
    n_pairs: int,
    grad: bool,
    device: torch.device,
    dtype: torch.dtype,
):
    """The lowered native program when the pair pass should run in the native CPU kernel, else ``None``.

    Used for forward computations on CPU in float32/float64 that are compiled (``compile=True``, or
    ``None`` from ``settings.auto_native_pairs`` pairs on), for networks the kernel supports; otherwise, and
    if the kernel cannot be built, the engine keeps ``torch.compile`` or the eager path.
    """
    from . import native

    if grad or device.type != "cpu" or dtype not in native.LANES or not settings.native.value():
        return None
    auto = compile is None and settings.compile_mode.value() == "auto"
    wanted = compiled or (auto and n_pairs >= settings.auto_native_pairs.value())
    if not wanted:
        return None
    program = native.lower(model, size)
    if program is None or native.load_library() is None:
        return None
    return program


def native_ready(
    model: Layer, image_size: tuple[int, int], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> bool:
    """Whether ``gram(..., compile=True)`` runs ``model``'s pair pass in the native CPU kernel here.

    True for CPU float32/float64 networks that :mod:`gpytorch_cnngp.native` supports, unless
    ``CNNGP_NATIVE=0``, once the kernel has been built (or found in the cache) and passed its
    self-test; this call does that build, so it can take a few seconds the first time on a machine.
    """
    dev = torch.device(device)
    return _native_program(model, tuple(image_size), True, True, 0, False, dev, dtype) is not None


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the tile loop, restoring its state afterwards.

    Each tile allocates many short-lived Python objects (slices, the compiled graph's buffer lists),
    which trigger collections that walk the whole heap of a torch process: about 5% of a compiled
    ResNet-32 GP's time. Tensors are still freed by reference counting as usual; cycles made meanwhile
    are collected after the loop.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:  # pragma: no cover - tqdm is in the experiments extra
        raise ImportError("progress=True needs tqdm: pip install 'gpytorch-cnngp[experiments]'") from err
    return tqdm(total=total, desc=desc, unit="entries", unit_scale=True, smoothing=0.05)


# ---------------------------------------------------------------------------------------------
# the tiled computation


def _self_pass_chunked(model, x, hyper, chunk: int, window_method: str) -> tuple[list[Tensor], Tensor]:
    """:func:`self_pass` over ``x`` ``[H, W, C, N]`` in chunks of images (bounded memory)."""
    parts = [self_pass(model, x[..., i0 : i0 + chunk], hyper, window_method) for i0 in range(0, x.shape[-1], chunk)]
    if len(parts) == 1:
        return parts[0]
    traces = [torch.cat(slot, dim=-1) for slot in zip(*(trace for trace, _ in parts), strict=True)]
    return traces, torch.cat([final for _, final in parts])


def _fill(model, x, z, hyper, plan: GramPlan, compiled: bool, progress: bool, program=None) -> Tensor:
    """Forward computation of the Gram matrix of images ``[H, W, C, N]``; ``z is None``: ``K(x, x)``.

    ``program``: a lowered native program (:mod:`gpytorch_cnngp.native`) to run each tile with.
    """
    symmetric = z is None
    chunk = max(1, plan.tile_size**2 // 4)
    trace_x, final_x = _self_pass_chunked(model, x, hyper, chunk, "matmul")
    if symmetric:
        zz, trace_z = x, trace_x
    else:
        zz = z
        trace_z, _ = _self_pass_chunked(model, z, hyper, chunk, "matmul")
    n1, n2 = x.shape[-1], zz.shape[-1]
    out = torch.empty(n1, n2, dtype=x.dtype, device=x.device)
    if program is not None:
        from . import native

        lib = native.load_library()
        params = program.parameter_vector(hyper, x.dtype)
        threads = torch.get_num_threads()
    block_fn = _compiled_pair_block() if compiled and program is None else _pair_block
    method = "slices" if compiled else "matmul"
    size = plan.tile_size
    bar = _progress(progress, n1 * n2, "kernel")
    try:
        with _gc_paused():
            for i0, i1, j0, j1 in _tiles(n1, n2, size, symmetric):
                on_diag = symmetric and i0 == j0
                if program is not None:
                    # like the compiled path, the same-image rule is left to the diagonal fix below
                    block = native.run_block(
                        lib,
                        program,
                        params,
                        x[..., i0:i1],
                        zz[..., j0:j1],
                        [t[..., i0:i1] for t in trace_x],
                        [t[..., j0:j1] for t in trace_z],
                        threads,
                    )
                elif compiled:
                    # one static shape for every tile; the same-image rule inside the network only affects
                    # diagonal entries, which are replaced by the self values below, so it is skipped here
                    block = block_fn(
                        model,
                        _pad_last(x[..., i0:i1], size),
                        _pad_last(zz[..., j0:j1], size),
                        [_pad_last(t[..., i0:i1], size) for t in trace_x],
                        [_pad_last(t[..., j0:j1], size) for t in trace_z],
                        hyper,
                        False,
                        compiled,
                        method,
                    )[: i1 - i0, : j1 - j0]
                else:
                    block = block_fn(
                        model,
                        x[..., i0:i1],
                        zz[..., j0:j1],
                        [t[..., i0:i1] for t in trace_x],
                        [t[..., j0:j1] for t in trace_z],
                        hyper,
                        on_diag,
                        compiled,
                        method,
                    )
                if on_diag:
                    # the formulas are already mirror-symmetric; this guards against any rounding asymmetry
                    block = block * 0.5 + block.transpose(0, 1) * 0.5
                out[i0:i1, j0:j1] = block
                if symmetric and not on_diag:
                    out[j0:j1, i0:i1] = block.transpose(0, 1)
                if bar is not None:
                    bar.update(block.numel() * (1 if on_diag or not symmetric else 2))
    finally:
        if bar is not None:
            bar.close()
    if symmetric:
        out.diagonal().copy_(final_x)
    return out


class _TiledGram(torch.autograd.Function):
    """Gram matrix whose backward recomputes one tile at a time (memory bounded by the tile size).

    Inputs after the fixed arguments are the hyperparameter tensors in ``params`` order. The
    backward first rebuilds the self traces with their graph, then back-propagates each tile into
    the hyperparameters and into detached trace slices, and finally pushes the accumulated trace
    gradients through the self pass once.
    """

    @staticmethod
    def forward(ctx, model, x, z, params, plan, progress, *values):
        hyper = _rebuild_hyper(params, values)
        ctx.model, ctx.x, ctx.z, ctx.params, ctx.plan = model, x, z, params, plan
        ctx.save_for_backward(*values)
        with torch.no_grad():
            return _fill(model, x, z, hyper, plan, compiled=False, progress=progress)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        model, x, z, params, plan = ctx.model, ctx.x, ctx.z, ctx.params, ctx.plan
        leaves = [v.detach().requires_grad_(True) for v in ctx.saved_tensors]
        symmetric = z is None
        with torch.enable_grad():
            hyper = _rebuild_hyper(params, leaves)
            chunk = max(1, plan.tile_size**2 // 4)
            trace_x, final_x = _self_pass_chunked(model, x, hyper, chunk, "matmul")
            if symmetric:
                zz, trace_z = x, trace_x
                # the diagonal of K(x, x) is the self pass's final output
                grad_sym = grad_out + grad_out.transpose(0, 1)
            else:
                zz = z
                trace_z, _ = _self_pass_chunked(model, z, hyper, chunk, "matmul")
            g_tx = [torch.zeros_like(t) for t in trace_x]
            g_tz = g_tx if symmetric else [torch.zeros_like(t) for t in trace_z]
            g_hyper = [torch.zeros_like(v) for v in leaves]
            for i0, i1, j0, j1 in _tiles(x.shape[-1], zz.shape[-1], plan.tile_size, symmetric):
                on_diag = symmetric and i0 == j0
                tx = [t[..., i0:i1].detach().requires_grad_(True) for t in trace_x]
                tz = tx if on_diag else [t[..., j0:j1].detach().requires_grad_(True) for t in trace_z]
                block = _pair_block(model, x[..., i0:i1], zz[..., j0:j1], tx, tz, hyper, on_diag, False, "matmul")
                if on_diag:
                    # the block fills both triangles of its square; its diagonal comes from the self pass
                    g_block = grad_out[i0:i1, j0:j1] * (1.0 - torch.eye(i1 - i0, dtype=x.dtype, device=x.device))
                elif symmetric:
                    g_block = grad_sym[i0:i1, j0:j1]  # the block and its mirror image
                else:
                    g_block = grad_out[i0:i1, j0:j1]
                inputs = leaves + tx + ([] if on_diag else tz)
                grads = torch.autograd.grad(block, inputs, g_block, allow_unused=True)
                for k in range(len(leaves)):
                    if grads[k] is not None:
                        g_hyper[k] += grads[k]
                n = len(leaves)
                for slot in range(len(tx)):
                    if grads[n + slot] is not None:
                        g_tx[slot][..., i0:i1] += grads[n + slot]
                if not on_diag:
                    for slot in range(len(tz)):
                        g = grads[n + len(tx) + slot]
                        if g is not None:
                            g_tz[slot][..., j0:j1] += g
            outputs, out_grads = list(trace_x), list(g_tx)
            if symmetric:
                outputs.append(final_x)
                out_grads.append(grad_out.diagonal())
            else:
                outputs += trace_z
                out_grads += g_tz
            pairs = [(o, g) for o, g in zip(outputs, out_grads, strict=True) if o.requires_grad]
            if pairs:
                more = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
                for k, g in enumerate(more):
                    if g is not None:
                        g_hyper[k] += g
        return (None, None, None, None, None, None, *g_hyper)


def _rebuild_hyper(params: list[tuple[Layer, str]], values) -> dict[int, dict[str, Tensor]]:
    out: dict[int, dict[str, Tensor]] = {}
    for (layer, name), value in zip(params, values, strict=True):
        out.setdefault(id(layer), {})[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# public entry points


def gram(
    model: Layer,
    X: Tensor,
    Z: Tensor | None = None,
    *,
    tile_size: int | None = None,
    memory_budget: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    compile: bool | None = None,
    hyper: Mapping | None = None,
) -> Tensor:
    """Kernel matrix of ``model`` between images ``X`` ``[N1, C, H, W]`` and ``Z`` ``[N2, C, H, W]``.

    With ``Z=None`` this is the symmetric ``K(X, X)``: only tiles on and above the diagonal are
    computed and mirrored, and the diagonal is exactly the self variance ``model(X, diag=True)``.
    Each image's self terms are computed once and shared by all tiles. Peak memory is bounded by
    ``memory_budget`` (bytes; default a quarter of RAM up to 4 GiB on CPU, 60% of free GPU memory)
    plus the ``[N1, N2]`` result.

    :param tile_size: edge of the square blocks of pairs computed at once (default: fits the budget,
        capped for cache efficiency on CPU).
    :param device, dtype: where and in which precision to compute (default: those of ``X``); the
        result lives there.
    :param progress: show a progress bar with the rate in kernel entries per second (needs tqdm).
    :param compile: run each tile's pair pass compiled. On CPU, for float32/float64 networks of
        ``Conv2d``, ``Dense``, ``ReLU``, ``LeakyReLU``, ``Sum`` and ``Sequential`` (the paper's three
        among them), that is the native kernel of :mod:`gpytorch_cnngp.native` (built once per machine
        in a few seconds; 4-10 times faster than eager). Otherwise, and on GPUs, it is
        ``torch.compile`` (fused C++/OpenMP loops on CPU, Triton on GPU): 2-3 times faster than eager
        after 15-60 s of compilation once per architecture, dtype and tile size. ``None`` follows
        :class:`gpytorch_cnngp.settings.compile_mode`: by default the native kernel from
        ``settings.auto_native_pairs`` (16) pairs and ``torch.compile`` from ``settings.auto_compile_pairs``
        (4 million), except for networks with pooling, whose full-covariance maps run faster eagerly;
        gradients always use the eager path. ``settings.native(False)`` (``CNNGP_NATIVE=0``) switches the
        native kernel off.
    :param hyper: ``{layer: {"var_weight": tensor, ...}}`` overriding the layers' own values.
    :return: ``[N1, N2]`` tensor. When hyperparameters require grad, the backward pass recomputes
        one tile at a time, so it needs no more memory than the forward.
    """
    x, z = _prepare(model, X, Z, dtype, device)
    hmap, params = _hyper_map(model, x.dtype, x.device, hyper)
    values = [hmap[id(layer)][name] for layer, name in params]
    n1 = x.shape[0]
    n2 = n1 if z is None else z.shape[0]
    grad = torch.is_grad_enabled() and any(v.requires_grad for v in values)
    input_grad = torch.is_grad_enabled() and (x.requires_grad or (z is not None and z.requires_grad))
    compiled = _use_compile(compile, n1 * n2, grad or input_grad, model.needs_full())
    size = (x.shape[2], x.shape[3])
    program = _native_program(model, size, compile, compiled, n1 * n2, grad or input_grad, x.device, x.dtype)
    plan = estimate_tile_size(
        model,
        (x.shape[2], x.shape[3]),
        n1 + (0 if z is None else n2),
        x.dtype,
        x.device,
        memory_budget=memory_budget,
        tile_size=tile_size,
        compiled=compiled,
        grad=grad or input_grad,
        native=program is not None,
    )
    if n1 == 0 or n2 == 0:
        return torch.zeros(n1, n2, dtype=x.dtype, device=x.device)
    if x.device.type == "cpu":
        keep_freed_memory()
    x = spatial_first(x)
    z = None if z is None else spatial_first(z)
    if input_grad:
        # Gradients with respect to the images: plain autograd through every tile.
        out = _fill(model, x, z, hmap, plan, compiled=False, progress=progress)
    elif grad:
        out = _TiledGram.apply(model, x, z, params, plan, progress, *values)
    else:
        with torch.no_grad():
            out = _fill(model, x, z, hmap, plan, compiled=compiled, progress=progress, program=program)

    def wide() -> Tensor:
        return gram(
            model,
            X,
            Z,
            tile_size=tile_size,
            memory_budget=memory_budget,
            device=x.device,
            dtype=torch.float64,
            progress=progress,
            compile=compile,
            hyper=hyper,
        )

    return _in_range(out, wide)


def _in_range(out: Tensor, wide: Callable[[], Tensor]) -> Tensor:
    """``out`` when it is finite; else the same kernel computed in float64 (``wide``) and, if it fits, cast back.

    Deep float32 networks overflow inside (a window sum is its window's size times larger than the values it
    gives) although their kernel values fit float32: those are computed in float64 instead. Values that do not
    fit the dtype are an error, never infinities.
    """
    if out.numel() == 0 or bool(torch.isfinite(out).all()):
        return out
    if out.dtype != torch.float64:
        values = wide()
        limit = torch.finfo(out.dtype).max
        if bool(torch.isfinite(values).all()):
            peak = float(values.detach().abs().max())
            if peak <= limit:
                return values.to(out.dtype)
            raise ValueError(
                f"kernel values reach {peak:.3g}, beyond the range of {out.dtype} ({limit:.3g}): compute in "
                "float64 (dtype=torch.float64, or .double() the images)"
            )
    raise ValueError(
        "kernel values overflow even float64 (they grow about like the product of the layers' var_weight): "
        "use fewer layers or smaller var_weight"
    )


def gram_diag(
    model: Layer,
    X: Tensor,
    Z: Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    hyper: Mapping | None = None,
    chunk_size: int = 4096,
) -> Tensor:
    """``k(x_i, x_i)`` for every image (``[N]``), or ``k(x_i, z_i)`` for two sets of equal length.

    Costs O(N): one pass of single images (matched pairs when ``Z`` is given).
    """
    x, z = _prepare(model, X, Z, dtype, device)
    if z is not None and z.shape[0] != x.shape[0]:
        raise ValueError(f"diag=True needs X and Z of the same length, got {x.shape[0]} and {z.shape[0]}")
    hmap, _ = _hyper_map(model, x.dtype, x.device, hyper)
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=x.dtype, device=x.device)
    outs = []
    for i0 in range(0, x.shape[0], chunk_size):
        xi = spatial_first(x[i0 : i0 + chunk_size])
        trace_x, final_x = self_pass(model, xi, hmap)
        if z is None:
            outs.append(final_x)
            continue
        zi = spatial_first(z[i0 : i0 + chunk_size])
        trace_z, _ = self_pass(model, zi, hmap)
        outs.append(_paired(model, xi, zi, trace_x, trace_z, hmap, "matmul"))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]

    def wide() -> Tensor:
        return gram_diag(model, X, Z, device=x.device, dtype=torch.float64, hyper=hyper, chunk_size=chunk_size)

    return _in_range(out, wide)
