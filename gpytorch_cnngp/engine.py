"""The kernel engine: input checks, self terms, tiled symmetric Gram matrices, the diagonal, and
memory-bounded gradients.

It runs the pure passes of :mod:`gpytorch_cnngp.passes` tile by tile, in the tiles that
:mod:`gpytorch_cnngp.tiling` plans, each tile through the backend that :func:`gpytorch_cnngp.backends.choose`
picks. Importing it installs :func:`gram`/:func:`gram_diag` behind ``Layer.forward`` (``model(X, Z)``).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor

from .backends import Backend, choose, resolve, self_values
from .backends.base import Traces
from .devices import parse_device
from .layers.base import Layer, set_evaluator
from .memory import keep_freed_memory
from .ops import first_order_only
from .passes import paired, self_pass, spatial_first
from .progress import progress_bar
from .state import Hyper, Requirements
from .tiling import GramPlan, estimate_tile_size, network_info, self_chunk, tiles

__all__ = ["gram", "gram_diag", "check_architecture"]

HyperArg = Hyper | Mapping[Layer, Mapping[str, Tensor]] | None

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


# ---------------------------------------------------------------------------------------------
# the tiled computation


def _self_pass_chunked(
    model, x, hyper: Hyper, chunk: int, req: Requirements, ntk: bool = False
) -> tuple[list[Tensor], Tensor]:
    """:func:`self_pass` over ``x`` ``[H, W, C, N]`` in chunks of images (bounded memory)."""
    parts = [
        self_pass(model, x[..., i0 : i0 + chunk], hyper, requirements=req, ntk=ntk)
        for i0 in range(0, x.shape[-1], chunk)
    ]
    if len(parts) == 1:
        return parts[0]
    traces = [torch.cat(slot, dim=-1) for slot in zip(*(trace for trace, _ in parts), strict=True)]
    return traces, torch.cat([final for _, final in parts], dim=-1)


def _fill(
    model,
    x,
    z,
    hyper: Hyper,
    plan: GramPlan,
    backend: type[Backend],
    req: Requirements,
    progress: bool,
    ntk: bool = False,
    own_values: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Forward computation of the Gram matrix of images ``[H, W, C, N]``; ``z is None``: ``K(x, x)``.
    With ``ntk``: ``[2, N1, N2]``, the NNGP and the NTK. ``own_values``: where the diagonal of ``K(x, x)`` comes
    from (:func:`~gpytorch_cnngp.backends.self_values`; ``None``: the eager self pass)."""
    symmetric = z is None
    size = (x.shape[0], x.shape[1])
    zz = x if symmetric else z
    chunk = self_chunk(x.device, plan.tile_size**2 // 4)
    own = None if torch.is_grad_enabled() else backend.self_fn(model, size, hyper, req, ntk)
    if own is not None:  # the backend's own traces; the diagonal from own_values (gram_diag's), else the eager pass
        terms_x = own(x, symmetric)
        terms_z = terms_x if symmetric else own(z, False)
        final_x = None
        if symmetric:
            final_x = own_values(x) if own_values else _self_pass_chunked(model, x, hyper, chunk, req, ntk)[1]
    else:
        trace_x, final_x = _self_pass_chunked(model, x, hyper, chunk, req, ntk)
        if symmetric and own_values is not None:
            final_x = _with_gradients(own_values, x, final_x)
        # what layers derive from the traces may be kept across tiles in the memory the tiles leave
        keep = max(0, plan.memory_budget - plan.trace_bytes - plan.tile_size**2 * plan.pair_bytes)
        terms_x = Traces(trace_x, keep)
        terms_z = terms_x if symmetric else Traces(_self_pass_chunked(model, z, hyper, chunk, req, ntk)[0], keep)
    n1, n2 = x.shape[-1], zz.shape[-1]
    out = torch.empty(*((2,) if ntk else ()), n1, n2, dtype=x.dtype, device=x.device)
    block_fn = backend.block_fn(model, size, hyper, req, plan.tile_size, ntk)
    bar = progress_bar(progress, n1 * n2, "kernel", "entries", required=True, smoothing=0.05)
    try:
        with _gc_paused():
            for i0, i1, j0, j1 in tiles(n1, n2, plan.tile_size, symmetric):
                on_diag = symmetric and i0 == j0
                block = block_fn(x[..., i0:i1], zz[..., j0:j1], terms_x.rows(i0, i1), terms_z.columns(j0, j1), on_diag)
                if on_diag:
                    # the formulas are already mirror-symmetric; this guards against any rounding asymmetry
                    block = block * 0.5 + block.transpose(-1, -2) * 0.5
                    # exactly the self variances (backends other than eager leave the same-image rule to this)
                    block.diagonal(dim1=-2, dim2=-1).copy_(final_x[..., i0:i1])
                out[..., i0:i1, j0:j1] = block
                if symmetric and not on_diag:
                    out[..., j0:j1, i0:i1] = block.transpose(-1, -2)
                if bar is not None:
                    bar.update((i1 - i0) * (j1 - j0) * (1 if on_diag or not symmetric else 2))
    finally:
        if bar is not None:
            bar.close()
    return out


def _with_gradients(own_values: Callable[[Tensor], Tensor], x: Tensor, eager: Tensor) -> Tensor:
    """The images' own values ``own_values(x)`` carrying the gradients of the eager self pass's ``eager`` (their
    difference from themselves adds an exact zero)."""
    with torch.no_grad():
        values = own_values(x.detach())
    return values + (eager - eager.detach()) if eager.requires_grad else values


class _TiledGram(torch.autograd.Function):
    """Gram matrix whose backward recomputes one tile at a time (memory bounded by the tile size).

    Inputs after the fixed arguments are the hyperparameter tensors in ``hyper.params`` order. The
    backward first rebuilds the self traces with their graph, then back-propagates each tile into
    the hyperparameters and into detached trace slices (the backend's :meth:`~Backend.block_vjp`), and
    finally pushes the accumulated trace gradients through the self pass once.
    """

    @staticmethod
    def forward(ctx, model, x, z, hyper, plan, backend, req, progress, ntk, own_values, *values):
        ctx.model, ctx.x, ctx.z, ctx.hyper, ctx.plan, ctx.req, ctx.ntk = model, x, z, hyper, plan, req, ntk
        ctx.backend = backend
        ctx.save_for_backward(*values)
        with torch.no_grad():
            return _fill(model, x, z, hyper.with_values(values), plan, backend, req, progress, ntk, own_values)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        model, x, z, plan, req, ntk = ctx.model, ctx.x, ctx.z, ctx.plan, ctx.req, ctx.ntk
        leaves = [v.detach().requires_grad_(True) for v in ctx.saved_tensors]
        symmetric = z is None
        with torch.enable_grad():
            hyper = ctx.hyper.with_values(leaves)
            chunk = self_chunk(x.device, plan.tile_size**2 // 4)
            trace_x, final_x = _self_pass_chunked(model, x, hyper, chunk, req, ntk)
            if symmetric:
                zz, trace_z = x, trace_x
                # the diagonal of K(x, x) is the self pass's final output
                grad_sym = grad_out + grad_out.transpose(-1, -2)
            else:
                zz = z
                trace_z, _ = _self_pass_chunked(model, z, hyper, chunk, req, ntk)
            g_tx = [torch.zeros_like(t) for t in trace_x]
            g_tz = g_tx if symmetric else [torch.zeros_like(t) for t in trace_z]
            g_hyper = [torch.zeros_like(v) for v in leaves]
            vjp = ctx.backend.block_vjp(model, (x.shape[0], x.shape[1]), hyper, req, ntk)
            for i0, i1, j0, j1 in tiles(x.shape[-1], zz.shape[-1], plan.tile_size, symmetric):
                on_diag = symmetric and i0 == j0
                tx = [t[..., i0:i1].detach() for t in trace_x]
                tz = tx if on_diag else [t[..., j0:j1].detach() for t in trace_z]
                if on_diag:
                    # the block fills both triangles of its square; its diagonal comes from the self pass
                    off = 1.0 - torch.eye(i1 - i0, dtype=x.dtype, device=x.device)
                    g_block = grad_out[..., i0:i1, j0:j1] * off
                elif symmetric:
                    g_block = grad_sym[..., i0:i1, j0:j1]  # the block and its mirror image
                else:
                    g_block = grad_out[..., i0:i1, j0:j1]
                grads_h, grads_x, grads_z = vjp(x[..., i0:i1], zz[..., j0:j1], tx, tz, on_diag, g_block)
                for k, g in enumerate(grads_h):
                    if g is not None:
                        g_hyper[k] += g
                for slot, (gx, gz) in enumerate(zip(grads_x, grads_z, strict=True)):
                    if gx is not None:
                        g_tx[slot][..., i0:i1] += gx
                    if gz is not None:
                        g_tz[slot][..., j0:j1] += gz
            outputs, out_grads = list(trace_x), list(g_tx)
            if symmetric:
                outputs.append(final_x)
                out_grads.append(grad_out.diagonal(dim1=-2, dim2=-1))
            else:
                outputs += trace_z
                out_grads += g_tz
            pairs = [(o, g) for o, g in zip(outputs, out_grads, strict=True) if o.requires_grad]
            if pairs:
                more = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
                for k, g in enumerate(more):
                    if g is not None:
                        g_hyper[k] += g
        return (None, None, None, None, None, None, None, None, None, None, *g_hyper)


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
    backend: str = "auto",
    hyper: HyperArg = None,
    get: str | tuple[str, ...] = "nngp",
) -> Tensor | tuple[Tensor, ...]:
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
    :param backend: how each tile's pair pass runs (:mod:`gpytorch_cnngp.backends`): ``"eager"`` (plain
        torch), ``"inductor"`` (``torch.compile``: faster than eager after a compilation once per
        architecture, dtype and tile size), ``"native"`` (the native CPU kernel for float32/float64
        networks of ``Conv2d``, ``Dense``, ``ReLU``, ``LeakyReLU``, ``Sum`` and ``Sequential``, the paper's
        three among them: built once per machine, the fastest on a CPU; the README's Performance table
        compares them), or
        ``"auto"`` (default): the native kernel from ``settings.auto_native_pairs`` (16) pairs on where it
        runs, ``torch.compile`` from ``settings.auto_compile_pairs`` (4 million) pairs on for networks without
        pooling, else eager (see :func:`gpytorch_cnngp.backends.choose` and
        :class:`gpytorch_cnngp.settings.compile_mode`). An explicit backend that cannot run the network
        raises a ValueError naming the layer. Gradients with respect to the hyperparameters run natively
        where the native kernel runs the network (the NNGP), else eagerly; those with respect to the images
        always run eagerly.
    :param hyper: a :class:`~gpytorch_cnngp.state.Hyper` or ``{layer: {"var_weight": tensor, ...}}``
        overriding the layers' own values.
    :param get: ``"nngp"`` (the CNN-GP kernel), ``"ntk"`` (the neural tangent kernel of the network in the NTK
        parameterisation), or a tuple of both, computed in one pass and returned in that order. Every backend
        computes the NTK where it computes the NNGP (``torch.compile`` excepted for ``Elementwise``).
    :return: ``[N1, N2]`` tensor (a tuple of them for a tuple ``get``). When hyperparameters require grad,
        the backward pass recomputes one tile at a time, so it needs no more memory than the forward.
    """
    requested = resolve(backend)
    kinds, ntk = _kinds(get)
    x, z = _prepare(model, X, Z, dtype, device)
    hyper_values = Hyper.of(model, x.dtype, x.device, hyper)
    n1 = x.shape[0]
    n2 = n1 if z is None else z.shape[0]
    grad = torch.is_grad_enabled() and hyper_values.requires_grad
    input_grad = torch.is_grad_enabled() and (x.requires_grad or (z is not None and z.requires_grad))
    size = (x.shape[2], x.shape[3])
    info = network_info(model, size)
    chosen = choose(requested, model, size, x.dtype, x.device, n1 * n2, grad, info.requirements, ntk, input_grad)
    plan = estimate_tile_size(
        model,
        size,
        n1 + (0 if z is None else n2),
        x.dtype,
        x.device,
        memory_budget=memory_budget,
        tile_size=tile_size,
        backend=chosen.name,
        grad=grad or input_grad,
        info=info,
    )
    if n1 == 0 or n2 == 0:
        return _select(torch.zeros(*((2,) if ntk else ()), n1, n2, dtype=x.dtype, device=x.device), kinds, ntk)
    if x.device.type == "cpu":
        keep_freed_memory()
    x = spatial_first(x)
    z = None if z is None else spatial_first(z)
    req = info.requirements
    # the diagonal's values (gram_diag's); differentiated, its gradients go through the eager self pass
    own_values = self_values(model, size, x.dtype, x.device, hyper_values, req, ntk) if z is None else None
    if input_grad:
        # Gradients with respect to the images: plain autograd through every tile.
        out = _fill(model, x, z, hyper_values, plan, chosen, req, progress, ntk, own_values)
    elif grad:
        args = (model, x, z, hyper_values, plan, chosen, req, progress, ntk, own_values)
        out = _TiledGram.apply(*args, *hyper_values.values)
    else:
        with torch.no_grad():
            out = _fill(model, x, z, hyper_values, plan, chosen, req, progress, ntk, own_values)

    def wide() -> Tensor:
        return _stacked(
            gram(
                model,
                X,
                Z,
                tile_size=tile_size,
                memory_budget=memory_budget,
                device=x.device,
                dtype=torch.float64,
                progress=progress,
                backend="eager" if requested == "eager" else "auto",
                hyper=hyper,
                get=("nngp", "ntk") if ntk else "nngp",
            )
        )

    def diagonal() -> Tensor:
        # computed in float64 and rounded, K(X, X) keeps gram_diag's values on its diagonal, as it does unrounded
        both = ("nngp", "ntk") if ntk else "nngp"
        return _stacked(gram_diag(model, X, device=x.device, dtype=x.dtype, hyper=hyper, get=both))

    return _select(_in_range(out, wide, diagonal if z is None else None), kinds, ntk)


_KINDS = ("nngp", "ntk")


def _kinds(get) -> tuple[tuple[str, ...] | str, bool]:
    """``get`` checked, and whether the pass must carry the NTK."""
    names = (get,) if isinstance(get, str) else tuple(get) if isinstance(get, (tuple, list)) else None
    if not names or any(name not in _KINDS for name in names):
        raise ValueError(f"get must be 'nngp', 'ntk' or a tuple of them, got {get!r}")
    return (get if isinstance(get, str) else names), "ntk" in names


def _stacked(result) -> Tensor:
    return torch.stack(result) if isinstance(result, tuple) else result


def _select(out: Tensor, kinds, ntk: bool):
    """The kernels asked for, from the pass's output (``[2, ...]``: NNGP, NTK, when it carried the NTK)."""
    if not ntk:
        return out if isinstance(kinds, str) else tuple(out for _ in kinds)
    pick = {"nngp": 0, "ntk": 1}
    return out[pick[kinds]] if isinstance(kinds, str) else tuple(out[pick[k]] for k in kinds)


def _in_range(out: Tensor, wide: Callable[[], Tensor], diagonal: Callable[[], Tensor] | None = None) -> Tensor:
    """``out`` when its values are within its dtype's range; else the same kernel computed in float64 (``wide``) and,
    if it fits, cast back.

    Deep float32 networks overflow inside (a window sum is its window's size times larger than the values it
    gives) although their kernel values fit float32: those are computed in float64 instead. Values that do not
    fit the dtype are an error, never infinities. Likewise at the other end: kernel values below the dtype's
    smallest normal number (tiny images, networks without biases) lose their digits and then become zeros, so
    values that float64 finds non-negligible (above the dtype's epsilon times the largest) but below that
    number are an error too, and zeros that float64 shows to be underflow are replaced by its values.
    ``diagonal`` (a square ``K(X, X)``) gives the values its diagonal takes after a cast from float64: those of
    ``gram_diag``, whose own self pass may fit the dtype where the pairs did not, and which rounding the float64
    diagonal would miss by an ulp or so.
    """
    if out.numel() == 0:
        return out
    finite = bool(torch.isfinite(out).all())
    info = torch.finfo(out.dtype)
    if finite and not bool((out.detach().abs() < info.tiny).any()):
        return out
    if finite:
        # zeros or subnormal numbers: exact zeros (blank images without biases) or underflow?
        values = out if out.dtype == torch.float64 else wide()
        magnitude = values.detach().abs()
        peak = float(magnitude.max())
        lost = (magnitude < info.tiny) & (magnitude > info.eps * peak)
        if bool(lost.any()):
            smallest = float(magnitude[lost].min())
            fix = (
                "scale the images up"
                if out.dtype == torch.float64
                else ("compute in float64 (dtype=torch.float64, or .double() the images), or scale the images up")
            )
            raise ValueError(
                f"kernel values as small as {smallest:.3g} are below the range of {out.dtype} (smallest normal "
                f"number {info.tiny:.3g}) and lose their digits: {fix}"
            )
        if values is out or not bool(((magnitude >= info.tiny) & (out.detach().abs() < info.tiny)).any()):
            return out
        values = values.to(out.dtype)  # zeros in this dtype that float64 computes as numbers it can hold
        if diagonal is not None:
            values = torch.diagonal_scatter(values, diagonal(), dim1=-2, dim2=-1)
        return values
    if out.dtype != torch.float64:
        values = wide()
        limit = info.max
        if bool(torch.isfinite(values).all()):
            peak = float(values.detach().abs().max())
            if peak <= limit:
                values = values.to(out.dtype)
                if diagonal is not None:
                    values = torch.diagonal_scatter(values, diagonal(), dim1=-2, dim2=-1)
                return values
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
    hyper: HyperArg = None,
    chunk_size: int | None = None,
    get: str | tuple[str, ...] = "nngp",
) -> Tensor | tuple[Tensor, ...]:
    """``k(x_i, x_i)`` for every image (``[N]``), or ``k(x_i, z_i)`` for two sets of equal length.

    Costs O(N): one pass of single images (matched pairs when ``Z`` is given). For ``X`` alone its values are the
    native kernel's where that runs the network, else eager (:func:`~gpytorch_cnngp.backends.self_values`), in
    chunks of ``chunk_size`` images (default: 256 on a CPU, 4096 elsewhere; :func:`gram` takes the diagonal of
    ``K(X, X)`` from the same pass, chunked alike, so that it is these values to the bit); differentiated, the
    gradients go through the eager pass. Matched pairs run eagerly.
    ``get``: as in :func:`gram`.
    """
    kinds, ntk = _kinds(get)
    x, z = _prepare(model, X, Z, dtype, device)
    if z is not None and z.shape[0] != x.shape[0]:
        raise ValueError(f"diag=True needs X and Z of the same length, got {x.shape[0]} and {z.shape[0]}")
    hyper_values = Hyper.of(model, x.dtype, x.device, hyper)
    if x.shape[0] == 0:
        return _select(torch.zeros(*((2,) if ntk else ()), 0, dtype=x.dtype, device=x.device), kinds, ntk)
    req = network_info(model, (x.shape[2], x.shape[3])).requirements
    if chunk_size is None:
        chunk_size = self_chunk(x.device)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of images, got {chunk_size}")
    grad = torch.is_grad_enabled() and (hyper_values.requires_grad or x.requires_grad)
    size = (x.shape[2], x.shape[3])
    own_values = None if z is not None else self_values(model, size, x.dtype, x.device, hyper_values, req, ntk)
    outs = []
    for i0 in range(0, x.shape[0], chunk_size):
        xi = spatial_first(x[i0 : i0 + chunk_size])
        if own_values is not None and not grad:
            outs.append(own_values(xi))
            continue
        trace_x, final_x = self_pass(model, xi, hyper_values, requirements=req, ntk=ntk)
        if z is None:
            outs.append(final_x if own_values is None else _with_gradients(own_values, xi, final_x))
            continue
        zi = spatial_first(z[i0 : i0 + chunk_size])
        trace_z, _ = self_pass(model, zi, hyper_values, requirements=req, ntk=ntk)
        outs.append(paired(model, xi, zi, trace_x, trace_z, hyper_values, requirements=req, ntk=ntk))
    out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]

    def wide() -> Tensor:
        both = ("nngp", "ntk") if ntk else "nngp"
        wider = gram_diag(
            model, X, Z, device=x.device, dtype=torch.float64, hyper=hyper, chunk_size=chunk_size, get=both
        )
        return _stacked(wider)

    return _select(_in_range(out, wide), kinds, ntk)


def _evaluate(model: Layer, x: Tensor, z: Tensor | None, diag: bool, get="nngp") -> Tensor | tuple[Tensor, ...]:
    return gram_diag(model, x, z, get=get) if diag else gram(model, x, z, get=get)


set_evaluator(_evaluate)
