"""Running a lowered program in the loaded native kernel: the calls into the library and the layouts they read.

``native_kernel.cpp`` runs a :class:`~gpytorch_cnngp.backends.native.lowering.NativeProgram` for a block of 16
(float32) or 8 (float64) pairs at a time, one SIMD lane per pair (:data:`LANES`), so a thread keeps all of a
block's maps in its own cache from the first layer to the last. It computes the same formulas as the compiled
``torch`` path (:func:`gpytorch_cnngp.ops.relu_expectation_poly`, the same window sums, taken as running sums for
stride-1 windows of four taps or more), and with ``ntk`` the neural tangent kernel's map beside the NNGP's in the
same registers (:func:`gpytorch_cnngp.ops.relu_derivative_expectation_poly` for the (leaky) ReLU's factor).

This module packs the images and traces into the kernel's layouts and calls its entry points: the pair pass
(:func:`run_block`), its reverse mode (:func:`run_block_vjp`) and the self pass (:func:`self_terms`), which runs
the same program on single images, one per lane, and writes each nonlinearity's standard deviations and their
inverses straight into the layouts the pair pass reads, so a forward call packs no traces in Python. It takes
the loaded library as an argument (:func:`~gpytorch_cnngp.backends.native.build.load_library` gives it) and
knows nothing of how it was built.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from ...ops import relu_derivative_poly_coefficients, relu_poly_coefficients
from ..base import SelfTerms
from .lowering import NativeProgram

__all__ = ["LANES", "PackedTraces", "run_block", "run_block_vjp", "self_terms"]

#: pairs per block (512 bits of lanes: one AVX-512 vector, or two AVX2 ones), as compiled into native_kernel.cpp
LANES = {torch.float32: 16, torch.float64: 8}


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _pack_traces(
    lib: ctypes.CDLL, traces: list[Tensor], n: int, dtype: torch.dtype, right: bool, threads: int
) -> Tensor:
    """The traces' standard deviations and their inverses in the kernel's layout, packed by the kernel itself (one
    pass, all threads): the first set ``[n, positions, 2]``, the second ``[groups, positions, 2, lanes]`` with zero
    padding lanes (black images). One zero position for a network without nonlinearities, so that the kernel always
    gets a buffer."""
    lanes = LANES[dtype]
    groups = -(-n // lanes)
    positions = sum(t.shape[0] * t.shape[1] for t in traces)
    shape = (groups, max(positions, 1), 2, lanes) if right else (n, max(positions, 1), 2)
    if not traces:
        return torch.zeros(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    rows = []
    for t in traces:
        t = t.to(dtype)
        # a tile's slice [h, w, n] of a trace: rows of images, one per position, a constant stride apart
        if t.stride(-1) != 1 or t.stride(0) != t.shape[1] * t.stride(1):
            t = t.contiguous()
        rows.append(t)
    pointers = (ctypes.c_void_p * len(rows))(*[t.data_ptr() for t in rows])
    strides = torch.tensor([t.stride(1) for t in rows], dtype=torch.int64)
    areas = torch.tensor([t.shape[0] * t.shape[1] for t in rows], dtype=torch.int32)
    fn = lib.cnngp_pack_f64 if dtype == torch.float64 else lib.cnngp_pack_f32
    _check(fn(pointers, _ptr(strides), _ptr(areas), len(rows), n, int(right), _ptr(out), int(threads)))
    return out


def _pack_left(x: Tensor) -> Tensor:
    """First set: images ``[n, H, W, C]``, one image per row."""
    return x.permute(3, 0, 1, 2).contiguous()


def _pack_right(z: Tensor, lanes: int) -> Tensor:
    """Second set, zero-padded to whole lane groups (black images): images ``[g, H, W, C, lanes]``."""
    n = z.shape[-1]
    groups = -(-n // lanes)
    if groups * lanes != n:
        z = torch.nn.functional.pad(z, (0, groups * lanes - n))
    return z.reshape(*z.shape[:-1], groups, lanes).movedim(-2, 0).contiguous()


def run_block(
    lib: ctypes.CDLL,
    program: NativeProgram,
    params: Tensor,
    x: Tensor,
    z: Tensor,
    trace_x: list[Tensor],
    trace_z: list[Tensor],
    n_threads: int,
    ntk: bool = False,
    same: bool = False,
) -> Tensor:
    """Kernel block ``[n1, n2]`` for images ``x`` ``[H, W, C, n1]`` and ``z`` ``[H, W, C, n2]``
    (CPU, float32 or float64) given their self traces (``[h, w, n]`` standard deviations per slot);
    ``[2, n1, n2]`` (NNGP, NTK) with ``ntk``. ``same``: ``z`` is ``x`` (a square tile on the diagonal of
    ``K(X, X)``): only the pairs on and above the diagonal are computed (about half), the others mirrored."""
    packed = _Packed(lib, program, params, x, z, trace_x, trace_z, n_threads)
    out = torch.empty(*((2,) if ntk else ()), packed.n1, packed.padded, dtype=x.dtype)
    fn = lib.cnngp_run_f64 if x.dtype == torch.float64 else lib.cnngp_run_f32
    _check(fn(*packed.arguments(), _ptr(out), int(ntk), int(same), int(n_threads)))
    out = out[..., : packed.n2]
    # below the diagonal: the blocks skipped (never written) and their lanes' pairs j < i
    return torch.triu(out) + torch.triu(out, 1).transpose(-1, -2) if same else out


def run_block_vjp(
    lib: ctypes.CDLL,
    program: NativeProgram,
    params: Tensor,
    x: Tensor,
    z: Tensor,
    trace_x: list[Tensor],
    trace_z: list[Tensor],
    grad: Tensor,
    n_threads: int,
    same: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The gradient of ``(grad * K).sum()``, ``K`` the NNGP block of :func:`run_block` (``program`` lowered with
    ``reuse=False``), with respect to the parameter vector and to the traces' standard deviations: ``[P]``,
    and one ``[h, w, n1]`` / ``[h, w, n2]`` tensor per trace slot. Reverse mode, one block of pairs at a time.
    ``same``: as in :func:`run_block`, the pairs on and above the diagonal alone, each weighted by its own gradient
    and its mirror's (``K`` is symmetric: the same sum)."""
    packed = _Packed(lib, program, params, x, z, trace_x, trace_z, n_threads)
    n1, n2, padded, lanes = packed.n1, packed.n2, packed.padded, LANES[x.dtype]
    if same:  # each pair's weight and its mirror's on and above the diagonal; zero below (lanes of blocks that run)
        grad = torch.triu(grad) + torch.tril(grad, -1).transpose(-1, -2)
    g_out = grad.to(x.dtype).contiguous()
    if padded != n2:  # the padding lanes (black images) contribute nothing
        g_out = torch.nn.functional.pad(g_out, (0, padded - n2))
    n_trace = packed.n_trace
    g_params = x.new_zeros(max(params.numel(), 1))
    g_tx = x.new_empty(n1, max(n_trace, 1))
    g_tz = x.new_empty(padded // lanes, max(n_trace, 1), lanes)
    fn = lib.cnngp_vjp_f64 if x.dtype == torch.float64 else lib.cnngp_vjp_f32
    args = (_ptr(g_out), params.numel(), _ptr(g_params), _ptr(g_tx), _ptr(g_tz), int(same), int(n_threads))
    _check(fn(*packed.arguments(), *args))
    g_tz = g_tz.transpose(0, 1).reshape(max(n_trace, 1), padded)[:, :n2]  # [positions, n2]
    slots_x, slots_z, offset = [], [], 0
    for t, area in zip(trace_x, program.slot_areas, strict=True):
        slots_x.append(g_tx[:, offset : offset + area].t().reshape(*t.shape[:-1], n1))
        slots_z.append(g_tz[offset : offset + area].reshape(*t.shape[:-1], n2))
        offset += area
    return g_params[: params.numel()], slots_x, slots_z


class PackedTraces:
    """Traces already in the kernel's layout (from :func:`self_terms`): ``[n, positions, 2]`` for the first set,
    ``[groups, positions, 2, lanes]`` for the second."""

    def __init__(self, data: Tensor) -> None:
        self.data = data


def _packed(lib, traces, n: int, dtype: torch.dtype, right: bool, n_threads: int) -> Tensor:
    """One side's traces in the kernel's layout: as given if the kernel's self pass made them, else packed."""
    if isinstance(traces, PackedTraces):
        return traces.data
    return _pack_traces(lib, traces, n, dtype, right, n_threads)


def _coefficients(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return (
        torch.tensor(relu_poly_coefficients(dtype), dtype=dtype),
        torch.tensor(relu_derivative_poly_coefficients(dtype), dtype=dtype),
    )


class _Packed:
    """The arguments both entry points share: the program, the packed images and traces, the coefficients."""

    def __init__(self, lib, program, params, x, z, trace_x, trace_z, n_threads) -> None:
        dtype = x.dtype
        lanes = LANES[dtype]
        self.h, self.w, self.c, self.n1 = x.shape
        self.n2 = z.shape[-1]
        self.padded = -(-self.n2 // lanes) * lanes
        self.program, self.params = program, params
        self.xs, self.zs = _pack_left(x), _pack_right(z, lanes)
        self.tx = _packed(lib, trace_x, self.n1, dtype, False, n_threads)
        self.tz = _packed(lib, trace_z, self.n2, dtype, True, n_threads)
        self.offsets = program.slot_offsets
        self.n_trace = sum(program.slot_areas)
        self.coefs, self.dcoefs = _coefficients(dtype)

    def arguments(self) -> tuple:
        p = self.program
        return (
            _ptr(p.code), p.code.shape[0], p.reg_area, p.tmp_area, p.n_regs, _ptr(p.reg_off),
            _ptr(self.xs), _ptr(self.zs), self.h, self.w, self.c, self.n1, self.padded,
            _ptr(self.tx), _ptr(self.tz), _ptr(self.offsets), self.n_trace,
            _ptr(self.params), _ptr(self.coefs), _ptr(self.dcoefs), len(self.coefs), len(self.dcoefs),
        )  # fmt: skip


def self_terms(
    lib: ctypes.CDLL,
    program: NativeProgram,
    params: Tensor,
    x: Tensor,
    n_threads: int,
    left: bool = True,
    right: bool = True,
    ntk: bool = False,
    final: bool = False,
) -> tuple[PackedTraces | None, PackedTraces | None, Tensor | None]:
    """The self pass of images ``x`` ``[H, W, C, n]`` in the kernel: their traces packed as the first set
    (``left``) and as the second (``right``), each ``None`` if not asked for, and with ``final`` ``k(x, x)``
    ``[n]`` (``[2, n]`` with ``ntk``: NNGP, NTK), else ``None``. (The engine takes the images' own values from
    :func:`~gpytorch_cnngp.passes.self_pass`, so that the diagonal of ``K(X, X)`` is the same whatever the
    backend; these agree with them to rounding.)"""
    dtype, lanes = x.dtype, LANES[x.dtype]
    h, w, c, n = x.shape
    n_trace = sum(program.slot_areas)
    positions = max(n_trace, 1)
    groups = -(-n // lanes)
    alloc = torch.zeros if n_trace == 0 else torch.empty  # a network without nonlinearities: one zero position
    tx = alloc(n, positions, 2, dtype=dtype) if left else None
    # a pooled network's offsets read the standard deviations of their layer's same-location map from this layout
    tz = alloc(groups, positions, 2, lanes, dtype=dtype) if right or program.pooled else None
    own = torch.empty(*((2,) if ntk else ()), n, dtype=dtype) if final else None
    coefs, dcoefs = _coefficients(dtype)
    p = program
    images, offsets = _pack_right(x, lanes), p.slot_offsets  # held until the call returns
    fn = lib.cnngp_self_f64 if dtype == torch.float64 else lib.cnngp_self_f32
    status = fn(
        _ptr(p.code), p.code.shape[0], p.reg_area, p.tmp_area, p.n_regs, _ptr(p.reg_off), _ptr(images), h, w, c, n,
        _ptr(offsets), n_trace, _ptr(params), _ptr(coefs), _ptr(dcoefs), len(coefs), len(dcoefs),
        _ptr(tx) if left else None, _ptr(tz) if tz is not None else None, _ptr(own) if final else None, int(ntk),
        int(n_threads),
    )  # fmt: skip
    _check(status)
    return (PackedTraces(tx) if left else None), (PackedTraces(tz) if right else None), own


class _NativeTerms(SelfTerms):
    """Self terms computed by the kernel when the engine asks for a tile's, kept for the last range of each
    side: a row of tiles reuses its first set's, and for ``K(X, X)`` the rows come with the other layout, which
    the square tile on the diagonal reads as its columns. Costs about what one tile's self pass does, so memory
    stays bounded by the tile."""

    def __init__(self, compute, x: Tensor, both: bool) -> None:
        self.compute, self.x, self.both = compute, x, both
        self.cache: dict[str, tuple[int, int, PackedTraces]] = {}

    def _get(self, side: str, i0: int, i1: int) -> PackedTraces:
        hit = self.cache.get(side)
        if hit is not None and hit[:2] == (i0, i1):
            return hit[2]
        # a row of tiles asks for its rows once and for many columns: only the rows bring the other layout along
        # (for the square tile on the diagonal of K(X, X), whose columns are the same images)
        want_left = side == "rows"
        want_right = side == "columns" or self.both
        left, right, _ = self.compute(self.x[..., i0:i1], want_left, want_right)
        if want_left:
            self.cache["rows"] = (i0, i1, left)
        if want_right:
            self.cache["columns"] = (i0, i1, right)
        return self.cache[side][2]

    def rows(self, i0: int, i1: int) -> PackedTraces:
        return self._get("rows", i0, i1)

    def columns(self, j0: int, j1: int) -> PackedTraces:
        return self._get("columns", j0, j1)


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(
            f"the native kernel failed with status {status} (2: bad block shape, 3: out of memory, "
            "4: bad coefficients, 5: no gradients of the NTK, 6: a fused sum in a program for the NTK or the "
            "gradients, 7: no gradients of a pooled network)"
        )
