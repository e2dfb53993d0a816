"""The native CPU path: a layer tree lowered to a few map instructions, run by a small C++ kernel.

``torch.compile`` fuses each layer into loops over the whole tile, so every layer streams the tile's
maps through memory and the threads meet at a barrier after each loop. The pair pass of a
same-location network has a simpler shape that those loops cannot exploit: every pair is
independent, and one pair's maps are a few kilobytes. This module lowers such a network
(:class:`~gpytorch_cnngp.Conv2d`, :class:`~gpytorch_cnngp.Dense`, :class:`~gpytorch_cnngp.ReLU`,
:class:`~gpytorch_cnngp.LeakyReLU`, :class:`~gpytorch_cnngp.Sum`, :class:`~gpytorch_cnngp.Sequential`, and the
pools below)
to instructions on map registers; ``native_kernel.cpp`` runs them for a block of 16 (float32) or 8
(float64) pairs at a time, one SIMD lane per pair, so a thread keeps all of a block's maps in its
own cache from the first layer to the last. It computes the same formulas as the compiled
``torch`` path (:func:`gpytorch_cnngp.ops.relu_expectation_poly`, the same window sums, taken as
running sums for stride-1 windows of four taps or more), and with ``ntk`` the neural tangent kernel's
map beside the NNGP's in the same registers (:func:`gpytorch_cnngp.ops.relu_derivative_expectation_poly`
for the (leaky) ReLU's factor). Its self pass (:func:`self_terms`) runs the same program on single images, one
per lane, and writes each nonlinearity's standard deviations and their inverses straight into the layouts the
pair pass reads, so a forward call packs no traces in Python; a sum of branches that follows a window sum is
done in that window sum's store (``lower(..., fuse=True)``, the NNGP's forward only).

A pooled network (:class:`~gpytorch_cnngp.AvgPool2d`, :class:`~gpytorch_cnngp.GlobalAvgPool2d`, outside
:class:`~gpytorch_cnngp.Sum` branches) is lowered by :class:`_Lowering` to the same instructions on maps of
spatial offsets: between two pools each offset ``d`` the next pool reads runs through the layers on its own, on
the rectangle of positions ``p`` with ``p + d`` inside the map, and is added into that pool's outputs at once
(:class:`~gpytorch_cnngp.state.SpatialPlan` says which offsets; :func:`_rect` where each lies). Its self pass runs
offset ``(0, 0)`` first in each stage, whose nonlinearities record the deviations that the image's other offsets
then read.

The kernel is compiled on first use with the system C++ compiler (``$CXX`` or ``g++``; the same one
``torch.compile`` needs on CPU) for this machine's instruction set, and cached under
``$CNNGP_CACHE_DIR`` (default ``~/.cache/gpytorch_cnngp/native``), keyed by the source, the compiler
flags and the CPU. ``CNNGP_NATIVE=0`` turns the path off; if the compiler is missing or fails,
``backend="auto"`` warns once and uses another backend, and ``backend="native"`` is an error. Layer math
knows nothing of this module.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import settings
from ..layers import AvgPool2d, Conv2d, Dense, GlobalAvgPool2d, Layer, LeakyReLU, ReLU, Sequential, Sum
from ..ops import relu_derivative_poly_coefficients, relu_poly_coefficients
from ..passes import pair_block, self_pass, spatial_first
from ..state import Hyper, SpatialPlan
from .base import Backend, BlockFn, SelfFn, SelfTerms, VjpFn

__all__ = [
    "Native",
    "NativeProgram",
    "lower",
    "unsupported",
    "native_enabled",
    "load_library",
    "run_block",
    "run_block_vjp",
    "LANES",
]

_SOURCE = Path(__file__).with_name("native_kernel.cpp")
_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",
    "-ffp-contract=fast",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
]
#: pairs per block (512 bits of lanes: one AVX-512 vector, or two AVX2 ones), as compiled into native_kernel.cpp
LANES = {torch.float32: 16, torch.float64: 8}
_OP_INPUT, _OP_CONV, _OP_NONLIN, _OP_ADD, _OP_OUTPUT, _OP_ZERO, _OP_POOL = range(7)
_FIELDS = 22
_NTK_IN_ZERO = 1  # instruction flag: the source's NTK map is the input's (zero)


class Unsupported(Exception):
    """The layer tree has a layer the native kernel does not implement (the message names it)."""


# ---------------------------------------------------------------------------------------------
# lowering


@dataclass
class _Instr:
    op: int
    dst: int
    a: int = -1
    b: int = -1
    in_hw: tuple[int, int] = (0, 0)
    out_hw: tuple[int, int] = (0, 0)
    window: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 0, 0)  # kh, kw, sh, sw, dh, dw, pad top, pad left
    param: int = -1  # index of the instruction's first value in the parameter vector
    slot: int = -1  # trace slot of a nonlinearity
    flags: int = 0
    # a spatial offset's map (see native_kernel.cpp): where the first and second image's values start, and the
    # row length of the map they come from (-1: the instruction's input width, the same-location map)
    xoff: int = 0
    zoff: int = 0
    full_w: int = -1


@dataclass
class NativeProgram:
    """A lowered network: instructions with physical registers, and how to fill the parameter vector.

    ``params`` lists, per parameter value, ``(layer, kind)`` where ``kind`` names how the value is
    computed from the layer's hyperparameters at call time (values are not compiled in, so changing
    a variance needs no new program).
    """

    code: Tensor  # int32 [n_instr, 22]
    n_regs: int
    reg_off: Tensor  # int64 [n_regs + 1]: each register's first position
    reg_area: int
    tmp_area: int
    slot_areas: list[int]  # positions of each nonlinearity's trace, in slot order
    params: list[tuple[Layer | None, str | float, int]]
    slopes: list[tuple[Layer, float]]  # the negative slopes whose constants are in params (see _memoised)
    pooled: bool = False  # spatial offsets (a pooled network): no self pass or gradients in the kernel
    # parameter_vector's gather per (hyperparameter list, dtype), and its last result (one call asks for it
    # once for the self terms and once for the pairs)
    _gathers: dict = field(default_factory=dict, repr=False, compare=False)
    _last: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def slot_offsets(self) -> Tensor:
        """int32 ``[slots]``: the first trace position of each slot."""
        return torch.tensor([0, *self.slot_areas], dtype=torch.int64).cumsum(0)[:-1].to(torch.int32)

    def hyper_gradients(self, hyper: Hyper, g_params: Tensor) -> list[Tensor]:
        """Gradients with respect to ``hyper``'s values from those with respect to the parameter vector
        (the chain rule through :meth:`parameter_vector`; constants have none)."""
        out = [torch.zeros_like(v) for v in hyper.values]
        for k, (layer, name, divisor) in enumerate(self.params):
            if layer is not None:
                i = hyper.position(layer, name)
                out[i] = out[i] + (g_params[k] / divisor).to(out[i].dtype)
        return out

    def parameter_vector(self, hyper: Hyper, dtype: torch.dtype) -> Tensor:
        """The per-call parameter values in ``dtype``: ``hyper(layer, name) / divisor`` for each
        hyperparameter entry ``(layer, name, divisor)``, and ``value`` for each ``(None, value, 1)``."""
        if not self.params:
            return torch.zeros(1, dtype=dtype)
        last = self._last
        if last is not None and last[0] is hyper and last[1] == dtype:
            return last[2]
        gather = self._gathers.get((hyper.params, dtype))
        if gather is None:
            index = [0 if layer is None else hyper.position(layer, name) for layer, name, _ in self.params]
            constant = [0.0 if layer is not None else name for layer, name, _ in self.params]
            gather = (
                torch.tensor(index),
                torch.tensor([layer is None for layer, _, _ in self.params]),
                torch.tensor(constant, dtype=dtype),
                torch.tensor([divisor for _, _, divisor in self.params], dtype=dtype),
            )
            if len(self._gathers) >= 8:
                self._gathers.clear()
            self._gathers[(hyper.params, dtype)] = gather
        index, is_constant, constant, divisors = gather
        # one stack, one gather and one division instead of a few torch operations per entry
        with torch.no_grad():
            try:
                values = torch.stack(hyper.values).reshape(-1)
            except RuntimeError:  # values of different shapes (all hold one number)
                values = torch.stack([v.reshape(()) for v in hyper.values])
            values = values.to(device="cpu", dtype=dtype)
            if values.numel() != len(hyper.values):
                raise ValueError("every hyperparameter must hold one number")
            vector = torch.where(is_constant, constant, values[index] / divisors)
        self._last = (hyper, dtype, vector)
        return vector


def _describe(layer: Layer, what: str) -> str:
    return f"{type(layer).__name__} ({what})"


def _fuse_sums(instrs: list[_Instr]) -> list[_Instr]:
    """A sum whose one operand the window sum just before it made, and nothing else reads, done in that window
    sum's store (``b``: the map it adds): one pass over the maps less per residual block. The same bits, since
    the store adds the same two values."""
    readers: dict[int, int] = {}
    for ins in instrs:
        for r in (ins.a, ins.b):
            if r >= 0:
                readers[r] = readers.get(r, 0) + 1
    out: list[_Instr] = []
    for ins in instrs:
        prev = out[-1] if out else None
        if (
            ins.op == _OP_ADD
            and prev is not None
            and prev.op == _OP_CONV
            and prev.b < 0
            and ins.a != ins.b
            and prev.dst in (ins.a, ins.b)
            and readers[prev.dst] == 1
        ):
            prev.b = ins.b if prev.dst == ins.a else ins.a
            prev.dst = ins.dst
            continue
        out.append(ins)
    return out


def _flat(layer: Layer) -> list[Layer]:
    """The layers of ``layer`` in series, nested :class:`Sequential` containers opened."""
    if type(layer) is Sequential:
        return [inner for child in layer.layers for inner in _flat(child)]
    return [layer]


def _top_paths(model: Layer) -> list[tuple]:
    """The tree path of each of :func:`_flat`'s layers (as :meth:`_Lowering._assign_slots` keys them)."""
    if type(model) is not Sequential:
        return [()]
    out = []
    for k, child in enumerate(model.layers):
        out += [(k, *sub) for sub in _top_paths(child)]
    return out


def _rect(d: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where offset ``d``'s map lies in a ``size`` map: the first position ``p`` with ``p`` and ``p + d`` both
    inside, and the rectangle's height and width (zero when the offset leaves the map)."""
    (dy, dx), (h, w) = d, size
    return (max(0, -dy), max(0, -dx)), (max(0, h - abs(dy)), max(0, w - abs(dx)))


def _offset_in(layer: Layer, d: tuple[int, int]) -> tuple[int, int]:
    """The one input offset a layer that does not pool reads for its output offset ``d`` (see :data:`_LAYERS`)."""
    return _LAYERS[type(layer)][1](layer, d)


def _offsets_back(layers: list[Layer], d: tuple[int, int]) -> list[tuple[int, int]]:
    """The output offset each of ``layers`` (in series) gives so that the last gives ``d``."""
    outs = [d] if layers else []
    for layer in reversed(layers[1:]):
        outs.append(_offset_in(layer, outs[-1]))
    return outs[::-1]


def _series_offset(layer: Sequential, d: tuple[int, int]) -> tuple[int, int]:
    for child in reversed(layer.layers):
        d = _offset_in(child, d)
    return d


def _sum_offset(layer: Sum, d: tuple[int, int]) -> tuple[int, int]:
    found = {_offset_in(branch, d) for branch in layer.branches}
    if len(found) != 1:  # pragma: no cover - branches of one Sum have the same strides (their sizes agree)
        raise Unsupported(_describe(layer, "branches that move offsets differently"))
    return found.pop()


class _Lowering:
    """A network lowered to instructions on maps of spatial offsets (see :class:`gpytorch_cnngp.state.SpatialPlan`).

    Between two pooling layers each offset ``d`` evolves on its own through the same window sums and
    nonlinearities as the same-location map, on the rectangle of positions ``p`` with ``p`` and ``p + d``
    inside the map: a window sum on that rectangle with zeros outside it is the convolution (outside lie the
    padding of either image), with its padding moved by the rectangles' corners. So the program runs, stage by
    stage, each offset the next pooling layer reads through the stage's layers and adds it at once into that
    pool's output offsets (``OP_POOL``: for an average pool's offset ``D`` and tap difference ``e = d - s D``, a
    window of the ``k - |e|`` taps ``a`` with ``a + e`` in the window too), which are the next stage's inputs.
    One offset's maps live only while it runs, so a block holds the pools' outputs and one offset's maps. A
    network without pools is the one stage of offset ``(0, 0)``, the same-location map.

    What each layer lowers to is :data:`_LAYERS` (layers between pools) and :data:`_POOLS` (pools).
    """

    def __init__(self, model: Layer, size: tuple[int, int], reuse: bool = True, fuse: bool = False) -> None:
        self.instrs: list[_Instr] = []
        self.params: list[tuple[Layer | None, str | float, int]] = []
        self.n_vregs = 0
        self.slot_areas: list[int] = []
        self.areas: list[int] = []
        self.tmp_area = 0
        self.zero_ntk: set[int] = set()  # registers whose NTK map is zero (the input's)
        self.slopes: list[tuple[Layer, float]] = []
        self.model, self.size, self.reuse, self.fuse = model, size, reuse, fuse
        self.layers = _flat(model)
        self.pooled = any(type(layer) in _POOLS for layer in self.layers)
        self.plan = SpatialPlan(model, size) if self.pooled else None
        self.slots: dict[tuple, int] = {}
        self.constants: dict[float, int] = {}
        self._assign_slots(model, size, ())

    def new_reg(self, hw: tuple[int, int]) -> int:
        self.n_vregs += 1
        self.areas.append(hw[0] * hw[1])
        return self.n_vregs - 1

    def param(self, *entries: tuple[Layer | None, str | float, int]) -> int:
        self.params.extend(entries)
        return len(self.params) - len(entries)

    def _assign_slots(self, layer: Layer, size: tuple[int, int], path: tuple) -> tuple[int, int]:
        """Trace slots in the self pass's order (one per nonlinearity in the tree), keyed by the layer's path."""
        if type(layer) is Sequential:
            for k, child in enumerate(layer.layers):
                size = self._assign_slots(child, size, (*path, k))
            return size
        if type(layer) is Sum:
            for k, branch in enumerate(layer.branches):
                out = self._assign_slots(branch, size, (*path, k))
            return out
        if type(layer) in (ReLU, LeakyReLU):
            self.slots[path] = len(self.slot_areas)
            self.slot_areas.append(size[0] * size[1])
        return layer.out_size(size)

    def constant(self, value: float) -> int:
        """A pool's scale, followed by a zero: the reverse mode treats a pool as a window sum with a bias, whose
        two gradients then go to these constants (which no hyperparameter reads)."""
        if value not in self.constants:
            self.constants[value] = self.param((None, value, 1), (None, 0.0, 1))
        return self.constants[value]

    def program(self) -> NativeProgram:
        layers, size = self.layers, self.size
        sizes = [size]
        for layer in layers:
            sizes.append(layer.out_size(sizes[-1]))
        # the offsets each layer's output carries (same-location networks: (0, 0) alone)
        wants = self.plan.chain(layers, size, None) if self.pooled else [None] * len(layers)
        paths = _top_paths(self.model)
        source: dict[tuple[int, int], int] | None = None  # None: the images
        start, last = 0, -1
        while start <= len(layers):
            stop = next((k for k in range(start, len(layers)) if type(layers[k]) in _POOLS), len(layers))
            local = list(zip(layers[start:stop], paths[start:stop], sizes[start:stop], strict=True))
            if stop == len(layers):  # the readout: offset (0, 0) of a 1x1 map
                last = self._chain(local, (0, 0), sizes[start], source)
                break
            pool, pool_in, pool_out = layers[stop], sizes[stop], sizes[stop + 1]
            targets = self.plan.needed(pool, pool_in, wants[stop])
            outputs = [(0, 0)] if wants[stop] is None else list(wants[stop].offsets)
            accs = {}
            for big_d in outputs:
                hw = _rect(big_d, pool_out)[1]
                accs[big_d] = self.new_reg(hw)
                self.instrs.append(_Instr(_OP_ZERO, accs[big_d], in_hw=hw, out_hw=hw))
            # (0, 0) first: in the self pass its nonlinearities record the deviations the other offsets read
            for d in [(0, 0)] if targets is None else sorted(targets.offsets, key=lambda e: e != (0, 0)):
                reg = self._chain(local, d, sizes[start], source)
                if reg is not None:
                    getattr(self, _POOLS[type(pool)])(pool, reg, d, pool_in, pool_out, accs)
            source, start = accs, stop + 1
            if start == len(layers):  # a network that ends with its pool
                last = accs[(0, 0)]
                break
        if self.areas[last] != 1:  # pragma: no cover - check_architecture runs first
            raise ValueError("the network's output map is not 1x1")
        self.instrs.append(_Instr(_OP_OUTPUT, -1, last, in_hw=(1, 1), out_hw=(1, 1)))
        if self.fuse:
            self.instrs = _fuse_sums(self.instrs)
        # registers as large as the largest map for the reverse mode of same-location networks, which addresses
        # them so; a pooled network's many small offset maps each get its own size
        code, n_regs, reg_off = _allocate(self, self.reuse, uniform=not self.pooled)
        return NativeProgram(
            code, n_regs, reg_off, max(self.areas), max(self.tmp_area, 1), self.slot_areas, self.params, self.slopes,
            pooled=self.pooled,
        )  # fmt: skip

    def _chain(self, local, d: tuple[int, int], size: tuple[int, int], source) -> int | None:
        """Offset ``d`` of the last of ``local`` (layers in series, from ``size`` maps), from the stage's input:
        the images (``source`` None) or the previous pool's outputs. ``None`` for a map outside the rectangle
        of positions (it only meets padding)."""
        outs = _offsets_back([layer for layer, _, _ in local], d)
        first = _offset_in(local[0][0], outs[0]) if local else d
        origin, hw = _rect(first, size)
        if hw[0] == 0 or hw[1] == 0:
            reg = None
        elif source is None:
            reg = self.new_reg(hw)
            w = size[1]
            xoff = origin[0] * w + origin[1]
            zoff = (origin[0] + first[0]) * w + origin[1] + first[1]
            self.instrs.append(_Instr(_OP_INPUT, reg, in_hw=hw, out_hw=hw, xoff=xoff, zoff=zoff))
            self.zero_ntk.add(reg)
        else:
            reg = source.get(first)
        for (layer, path, in_size), out in zip(local, outs, strict=True):
            reg = self.emit(layer, path, reg, out, in_size)
        return reg

    def emit(self, layer: Layer, path: tuple, reg: int | None, d: tuple[int, int], size: tuple[int, int]):
        """Emit ``layer`` (between pools) for its output offset ``d`` from ``reg``, its input map at the offset it
        reads (``None``: a map outside every position); returns the output's register."""
        return getattr(self, _LAYERS[type(layer)][0])(layer, path, reg, d, size)

    def _series(self, layer: Sequential, path, reg, d, size):
        children = list(layer.layers)
        outs = _offsets_back(children, d)
        for k, (child, out) in enumerate(zip(children, outs, strict=True)):
            reg = self.emit(child, (*path, k), reg, out, size)
            size = child.out_size(size)
        return reg

    def _sum(self, layer: Sum, path, reg, d, size):
        hw = _rect(d, layer.out_size(size))[1]
        regs = [self.emit(b, (*path, k), reg, d, size) for k, b in enumerate(layer.branches)]
        total = regs[0]
        for other in regs[1:]:
            dst = self.new_reg(hw)
            self.instrs.append(_Instr(_OP_ADD, dst, total, other, hw, hw))
            if total in self.zero_ntk and other in self.zero_ntk:
                self.zero_ntk.add(dst)
            total = dst
        return total

    def _window(self, layer: Conv2d | Dense, path, reg, d, size):
        """A convolution (or a dense readout, a window over the whole map): ``b + w / k^2 * sum``."""
        origin, hw = _rect(d, layer.out_size(size))
        in_origin, in_hw = _rect(_offset_in(layer, d), size)
        if reg is None:
            in_hw = (0, 0)
        if type(layer) is Conv2d:
            win, k2 = layer.window, layer.kernel_size * layer.kernel_size
            s = win.stride
            pt = win.pad_before + in_origin[0] - s * origin[0]
            pl = win.pad_before + in_origin[1] - s * origin[1]
            geometry = (win.size, win.size, s, s, win.dilation, win.dilation, pt, pl)
        else:
            k2 = size[0] * size[1]
            geometry = (size[0], size[1], 1, 1, 1, 1, 0, 0)
        dst = self.new_reg(hw)
        # + the running sum's row; the transposed sum of the gradients runs on the mirrored shape
        self.tmp_area = max(self.tmp_area, (in_hw[0] + 1) * hw[1], (hw[0] + 1) * in_hw[1])
        p = self.param((layer, "var_weight", k2), (layer, "var_bias", 1))
        flags = _NTK_IN_ZERO if reg is None or reg in self.zero_ntk else 0
        source = dst if reg is None else reg  # an empty map is never read
        self.instrs.append(_Instr(_OP_CONV, dst, source, -1, in_hw, hw, geometry, p, flags=flags))
        return dst

    def _nonlin(self, layer: ReLU | LeakyReLU, path, reg, d, size):
        """NNGP k1 J + k2 c, as LeakyReLU.pair_map; NTK factor k1 D + k3 (h1 + h2) + k4, as pair_derivative_map."""
        origin, hw = _rect(d, size)
        dst = self.new_reg(hw)
        alpha = 0.0 if type(layer) is ReLU else layer.negative_slope
        if type(layer) is LeakyReLU:
            self.slopes.append((layer, alpha))
        p = self.param(
            (None, (1.0 - alpha) ** 2, 1), (None, alpha, 1), (None, alpha * (1.0 - alpha), 1), (None, alpha**2, 1)
        )
        w = size[1]
        xoff = origin[0] * w + origin[1]
        zoff = (origin[0] + d[0]) * w + origin[1] + d[1]
        self.instrs.append(
            _Instr(_OP_NONLIN, dst, reg, -1, hw, hw, param=p, slot=self.slots[path], xoff=xoff, zoff=zoff, full_w=w)
        )
        if reg in self.zero_ntk:
            self.zero_ntk.add(dst)
        return dst

    def _global_pool(self, pool: GlobalAvgPool2d, reg: int, d, in_size, out_size, accs: dict) -> None:
        """Every offset's whole rectangle into the one output, over (H W)^2."""
        in_hw = _rect(d, in_size)[1]
        area = in_size[0] * in_size[1]
        p = self.constant(1.0 / (area * area))
        geometry = (in_hw[0], in_hw[1], 1, 1, 1, 1, 0, 0)
        self.tmp_area = max(self.tmp_area, in_hw[0] + 1, 2 * in_hw[1])
        self.instrs.append(_Instr(_OP_POOL, accs[(0, 0)], reg, -1, in_hw, (1, 1), geometry, p))

    def _avg_pool(self, pool: AvgPool2d, reg: int, d, in_size, out_size, accs: dict) -> None:
        """Offset ``d``'s map into each output offset ``D`` with ``|d - s D| < k``, over ``k^4``."""
        in_origin, in_hw = _rect(d, in_size)
        k, s, pad = pool.kernel_size, pool.stride, pool.padding
        p = self.constant(1.0 / k**4)

        def candidates(n: int) -> range:  # output offsets D with |n - s D| < k
            return range(-((k - 1 - n) // s), (n + k - 1) // s + 1)

        for big_y in candidates(d[0]):
            for big_x in candidates(d[1]):
                big_d = (big_y, big_x)
                if big_d not in accs:
                    continue
                ey, ex = d[0] - s * big_y, d[1] - s * big_x
                origin, hw = _rect(big_d, out_size)
                pt = pad + in_origin[0] - s * origin[0] - max(0, -ey)
                pl = pad + in_origin[1] - s * origin[1] - max(0, -ex)
                geometry = (k - abs(ey), k - abs(ex), s, s, 1, 1, pt, pl)
                self.tmp_area = max(self.tmp_area, (in_hw[0] + 1) * hw[1], (hw[0] + 1) * in_hw[1])
                self.instrs.append(_Instr(_OP_POOL, accs[big_d], reg, -1, in_hw, hw, geometry, p))


#: What each layer between pools lowers to: its :class:`_Lowering` method, and the one input offset it reads for
#: an output offset ``d`` (a convolution with stride ``s``: ``s d``; a dense readout: ``(0, 0)``).
_LAYERS = {
    Sequential: ("_series", _series_offset),
    Sum: ("_sum", _sum_offset),
    Conv2d: ("_window", lambda layer, d: (layer.window.stride * d[0], layer.window.stride * d[1])),
    Dense: ("_window", lambda layer, d: (0, 0)),
    ReLU: ("_nonlin", lambda layer, d: d),
    LeakyReLU: ("_nonlin", lambda layer, d: d),
}
#: ... and each pooling layer: the :class:`_Lowering` method that adds one input offset into its outputs.
_POOLS = {AvgPool2d: "_avg_pool", GlobalAvgPool2d: "_global_pool"}


def _lower(model: Layer, size: tuple[int, int], reuse: bool = True, fuse: bool = False) -> NativeProgram:
    reason = unsupported(model, size)
    if reason is not None:
        raise Unsupported(reason)
    return _Lowering(model, tuple(size), reuse, fuse).program()


def lower(model: Layer, size: tuple[int, int], reuse: bool = True, fuse: bool = False) -> NativeProgram | None:
    """The native program of ``model`` for ``size`` images, or ``None`` if a layer is not supported
    (nonlinearities other than (Leaky)ReLU, a pool inside a branch of a ``Sum``).

    :param reuse: share registers between maps whose lives do not overlap; the gradient's program keeps
        every map (``reuse=False``) for its backward sweep.
    :param fuse: do sums of branches in the store of the window sum before them (the NNGP's forward only:
        neither the NTK nor the reverse mode knows such window sums).
    """
    try:
        return _lower(model, size, reuse, fuse)
    except Unsupported:
        return None


def unsupported(model: Layer, size: tuple[int, int]) -> str | None:
    """Why the native kernel cannot run ``model`` (naming the first layer it lacks), or ``None`` if it can."""
    for layer in model.kernel_layers():
        if type(layer) not in _LAYERS and type(layer) not in _POOLS:
            return _describe(layer, "a layer the native kernel does not implement")
    for top in _flat(model):
        if type(top) not in _POOLS and top.needs_full():
            pool = next(x for x in top.kernel_layers() if type(x) in _POOLS)
            return _describe(pool, "a pooling layer inside a branch of a Sum, which the native kernel lacks")
    return None


# programs per network: keyed by the engine's Requirements of the layer tree (one per tree and image size, see
# gpytorch_cnngp.tiling.network_info), so a call lowers the network once instead of once per use
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _memoised(
    model: Layer, size: tuple[int, int], requirements, reuse: bool = True, fuse: bool = False
) -> NativeProgram:
    """:func:`lower` remembered per :class:`~gpytorch_cnngp.state.Requirements` (a new layer tree has new
    requirements; a changed negative slope, the one value lowering reads from a layer, lowers again)."""
    if requirements is None:
        return lower(model, size, reuse, fuse)
    programs = _PROGRAMS.setdefault(requirements, {})
    key = (id(model), tuple(size), reuse, fuse)
    program = programs.get(key)
    if program is None or any(layer.negative_slope != alpha for layer, alpha in program.slopes):
        program = programs[key] = lower(model, size, reuse, fuse)
    return program


def _allocate(low: _Lowering, reuse: bool = True, uniform: bool = True) -> tuple[Tensor, int, Tensor]:
    """Assign physical registers by linear scan: a register is reused once its last reader has run
    (``reuse=False``: every map keeps its own register). ``uniform``: every register as large as the largest
    map (the reverse mode's layout); else each as large as the largest map it holds, a free register of the
    right size preferred (the many small maps of a pooled network's offsets). Returns the instructions, the
    register count and each register's first position."""
    last_use: dict[int, int] = {}
    for k, ins in enumerate(low.instrs):
        for r in (ins.a, ins.b, ins.dst if ins.op == _OP_POOL else -1):
            if r >= 0:
                last_use[r] = k
    phys: dict[int, int] = {}
    capacity: list[int] = []
    free: dict[int, list[int]] = {}  # capacity -> free registers (uniform: all under one key)

    def take(area: int) -> int:
        key = 0 if uniform else area
        if free.get(key):
            return free[key].pop()
        larger = [c for c, regs in free.items() if regs and c >= key]
        if larger:
            return free[min(larger)].pop()
        smaller = [c for c, regs in free.items() if regs]
        if smaller:
            return free[max(smaller)].pop()
        capacity.append(0)
        return len(capacity) - 1

    def release(reg: int) -> None:
        free.setdefault(0 if uniform else capacity[reg], []).append(reg)

    rows = []
    for k, ins in enumerate(low.instrs):
        dst = -1
        if ins.op == _OP_POOL:  # adds to its destination, made by an OP_ZERO
            dst = phys[ins.dst]
        elif ins.dst >= 0:
            area = low.areas[ins.dst]
            if reuse and ins.op == _OP_NONLIN and last_use.get(ins.a) == k:
                dst = phys[ins.a]  # in place
            elif reuse:
                dst = take(area)
            else:
                capacity.append(0)
                dst = len(capacity) - 1
            capacity[dst] = max(capacity[dst], area)
            phys[ins.dst] = dst
        a = phys[ins.a] if ins.a >= 0 else -1
        b = phys[ins.b] if ins.b >= 0 else -1
        for r in {ins.a, ins.b, ins.dst if ins.op == _OP_POOL else -1} - {-1}:
            if last_use.get(r) == k and (phys[r] != dst or ins.op == _OP_POOL and r == ins.dst):
                release(phys[r])
        if ins.dst >= 0 and ins.dst not in last_use and ins.op != _OP_OUTPUT:
            release(dst)  # never read (cannot happen for a connected network)
        kh, kw, sh, sw, dh, dw, pt, pl = ins.window
        full_w = ins.in_hw[1] if ins.full_w < 0 else ins.full_w
        rows.append(
            [ins.op, dst, a, b, *ins.in_hw, *ins.out_hw, kh, kw, sh, sw, dh, dw, pt, pl, ins.param, ins.slot, ins.flags]
            + [ins.xoff, ins.zoff, full_w]
        )
    n_phys = max(len(capacity), 1)
    if uniform:
        sizes = [max(low.areas)] * n_phys
    else:
        sizes = [max(c, 1) for c in capacity] or [1]
    reg_off = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)
    return torch.tensor(rows, dtype=torch.int32), n_phys, reg_off


# ---------------------------------------------------------------------------------------------
# building and loading the kernel


def native_enabled() -> bool:
    """Whether the native path may be used (:class:`gpytorch_cnngp.settings.native`, ``CNNGP_NATIVE``)."""
    return bool(settings.native.value())


def _cache_dir() -> Path:
    return settings.cache_dir.value() / "native"


def _cpu_signature() -> str:
    # -march=native code may not run on another CPU: a cache shared between machines keys on this
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [line for line in fh if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


# the kernel's functions this module calls (each returns a status: 0 or an error code for _check)
ENTRY_POINTS = (
    "cnngp_run_f32",
    "cnngp_run_f64",
    "cnngp_vjp_f32",
    "cnngp_vjp_f64",
    "cnngp_pack_f32",
    "cnngp_pack_f64",
    "cnngp_self_f32",
    "cnngp_self_f64",
)

_LIB: ctypes.CDLL | None = None
_LIB_ERROR: str | None = None


def load_library() -> ctypes.CDLL | None:
    """The compiled kernel (building it on first use), or ``None`` with a warning if that fails."""
    global _LIB, _LIB_ERROR
    if _LIB is not None or _LIB_ERROR is not None:
        return _LIB
    try:
        lib = _build_and_load()
        _self_test(lib)
        _LIB = lib
    except (OSError, subprocess.SubprocessError, RuntimeError) as err:
        _LIB_ERROR = str(err)
        warnings.warn(
            f"gpytorch_cnngp: the native CPU kernel could not be built ({err}); using the eager or torch.compile "
            "backend instead. Set CNNGP_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _LIB


def _target(source: bytes, compiler: str, flags: list[str]) -> Path:
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode() + _cpu_signature().encode()).hexdigest()[:20]
    return _cache_dir() / f"cnngp_native_{key}.so"


def _compile(compiler: str, flags: list[str], target: Path) -> str | None:
    """Build the kernel into ``target``; the compiler's complaint if it fails."""
    # build under a temporary name and rename: concurrent processes (e.g. Dask workers) never
    # load a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return proc.stderr.strip()[-500:]
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_and_load() -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CXX", "g++")
    # without an OpenMP runtime to link (some clang installations), the kernel makes its threads with std::thread
    variants = [_FLAGS, [("-fopenmp-simd" if f == "-fopenmp" else f) for f in _FLAGS]]
    target = next((t for t in (_target(source, compiler, v) for v in variants) if t.exists()), None)
    if target is None:
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler {compiler!r} on PATH")
        _cache_dir().mkdir(parents=True, exist_ok=True)
        print(
            f"gpytorch_cnngp: building the native CPU kernel for this machine with {compiler} (once, a few seconds; "
            f"cached in {_cache_dir()})",
            file=sys.stderr,
            flush=True,
        )
        for flags in variants:
            target = _target(source, compiler, flags)
            error = _compile(compiler, flags, target)
            if error is None:
                break
        else:
            raise RuntimeError(f"{compiler} failed: {error}")
    lib = ctypes.CDLL(str(target))
    if lib.cnngp_fields() != _FIELDS:
        raise RuntimeError("the native kernel's instruction layout does not match this version")
    for dtype, lanes in LANES.items():
        if lib.cnngp_lanes(int(dtype == torch.float64)) != lanes:
            raise RuntimeError("the native kernel's lane count does not match this version")
    for name in ENTRY_POINTS:
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
    return lib


def _self_test(lib: ctypes.CDLL) -> None:
    """Check the freshly loaded kernel against the eager float64 path on tiny networks that use
    every instruction (a compiler that miscompiles the kernel must not give wrong kernels)."""
    model = Sequential(
        Conv2d(3, stride=2, var_bias=0.2),
        LeakyReLU(0.1),
        Sum([Sequential(), Sequential(ReLU(), Conv2d(2, dilation=2, var_weight=1.5))]),
        ReLU(),
        Dense(var_weight=2.0, var_bias=0.1),
    )
    gen = torch.Generator().manual_seed(0)
    images = spatial_first(torch.rand(5, 2, 7, 7, generator=gen, dtype=torch.float64))
    program, fused = lower(model, (7, 7)), lower(model, (7, 7), fuse=True)
    pooled_model = Sequential(
        Conv2d(3, stride=2, var_bias=0.2),
        LeakyReLU(0.1),
        AvgPool2d(2, stride=1),
        Conv2d(2),
        ReLU(),
        GlobalAvgPool2d(),
        Dense(var_bias=0.1),
    )
    pooled = lower(pooled_model, (7, 7))
    for dtype in LANES:
        hyper = Hyper.of(model, dtype, "cpu")
        x = images.to(dtype)
        with torch.no_grad():
            trace, want_self = self_pass(model, x, hyper)
            tx, tz = [t[..., :2] for t in trace], [t[..., 2:] for t in trace]
            want = pair_block(model, x[..., :2], x[..., 2:], tx, tz, hyper, ntk=True)
        params = program.parameter_vector(hyper, dtype)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        # the fast path too: fused sums, and traces from the kernel's own self pass
        left = self_terms(lib, fused, params, x[..., :2], 2, right=False)[0]
        right = self_terms(lib, fused, params, x[..., 2:], 2, left=False)[1]
        for what, prog, ntk, sides, expected in (
            ("", program, False, (tx, tz), want[0]),
            (" for the NTK", program, True, (tx, tz), want),
            (" with its own self pass", fused, False, (left, right), want[0]),
        ):
            got = run_block(lib, prog, params, x[..., :2], x[..., 2:], *sides, 2, ntk=ntk)
            if not torch.allclose(got, expected, rtol=tol, atol=0.0):
                raise RuntimeError(
                    f"its self-test failed in {dtype}{what} (largest difference "
                    f"{float((got - expected).abs().max()):.3g})"
                )
        own = self_terms(lib, fused, params, x, 2, final=True)[2]
        if not torch.allclose(own, want_self, rtol=tol, atol=0.0):
            raise RuntimeError(f"its self-test failed in {dtype} for the images' own values")
        # spatial offsets: a strided window, a pool that overlaps, a global pool
        params = pooled.parameter_vector(pooled_hyper := Hyper.of(pooled_model, dtype, "cpu"), dtype)
        with torch.no_grad():
            trace, _ = self_pass(pooled_model, x, pooled_hyper)
            tx, tz = [t[..., :2] for t in trace], [t[..., 2:] for t in trace]
            want = pair_block(pooled_model, x[..., :2], x[..., 2:], tx, tz, pooled_hyper, ntk=True)
        got = run_block(lib, pooled, params, x[..., :2], x[..., 2:], tx, tz, 2, ntk=True)
        if not torch.allclose(got, want, rtol=tol, atol=0.0):
            raise RuntimeError(
                f"its self-test failed in {dtype} for a pooled network (largest difference "
                f"{float((got - want).abs().max()):.3g})"
            )


# ---------------------------------------------------------------------------------------------
# running


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
) -> Tensor:
    """Kernel block ``[n1, n2]`` for images ``x`` ``[H, W, C, n1]`` and ``z`` ``[H, W, C, n2]``
    (CPU, float32 or float64) given their self traces (``[h, w, n]`` standard deviations per slot);
    ``[2, n1, n2]`` (NNGP, NTK) with ``ntk``."""
    packed = _Packed(lib, program, params, x, z, trace_x, trace_z, n_threads)
    out = torch.empty(*((2,) if ntk else ()), packed.n1, packed.padded, dtype=x.dtype)
    fn = lib.cnngp_run_f64 if x.dtype == torch.float64 else lib.cnngp_run_f32
    _check(fn(*packed.arguments(), _ptr(out), int(ntk), int(n_threads)))
    return out[..., : packed.n2]


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
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The gradient of ``(grad * K).sum()``, ``K`` the NNGP block of :func:`run_block` (``program`` lowered with
    ``reuse=False``), with respect to the parameter vector and to the traces' standard deviations: ``[P]``,
    and one ``[h, w, n1]`` / ``[h, w, n2]`` tensor per trace slot. Reverse mode, one block of pairs at a time."""
    packed = _Packed(lib, program, params, x, z, trace_x, trace_z, n_threads)
    n1, n2, padded, lanes = packed.n1, packed.n2, packed.padded, LANES[x.dtype]
    g_out = grad.to(x.dtype).contiguous()
    if padded != n2:  # the padding lanes (black images) contribute nothing
        g_out = torch.nn.functional.pad(g_out, (0, padded - n2))
    n_trace = packed.n_trace
    g_params = x.new_zeros(max(params.numel(), 1))
    g_tx = x.new_empty(n1, max(n_trace, 1))
    g_tz = x.new_empty(padded // lanes, max(n_trace, 1), lanes)
    fn = lib.cnngp_vjp_f64 if x.dtype == torch.float64 else lib.cnngp_vjp_f32
    _check(fn(*packed.arguments(), _ptr(g_out), params.numel(), _ptr(g_params), _ptr(g_tx), _ptr(g_tz), int(n_threads)))
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


# ---------------------------------------------------------------------------------------------
# the backend


class Native(Backend):
    """The native CPU kernel: networks of ``Conv2d``, ``Dense``, ``ReLU``, ``LeakyReLU``, ``Sum``, ``Sequential``,
    ``AvgPool2d`` and ``GlobalAvgPool2d`` (pools outside ``Sum`` branches) in float32/float64 on a CPU, the NNGP and
    the NTK, and the NNGP's gradients with respect to the hyperparameters (reverse mode per block of pairs); the
    fastest backend on a CPU."""

    name = "native"
    # about one map per pair: the repacked traces of a tile's rows and columns
    workspace_factor = 1
    # a pair's maps stay in per-thread registers, so a tile costs only its slices of the inputs and traces;
    # larger tiles amortise that repacking
    cpu_tile = 256

    @classmethod
    def pair_area(cls, info) -> int:
        # per pair only the repacked traces: the spatial offsets' maps live in each thread's registers
        return info.local_largest or info.largest

    @classmethod
    def unsupported(cls, model, size, dtype, device, ntk=False, grad=False) -> str | None:
        if grad and ntk:
            return "its gradients cover the NNGP, not the NTK"
        if torch.device(device).type != "cpu":
            return f"it runs on CPUs only, not {device}"
        if dtype not in LANES:
            return f"it computes in float32 or float64, not {dtype}"
        if not native_enabled():
            return "it is switched off (settings.native(False) or CNNGP_NATIVE=0)"
        reason = unsupported(model, size)
        if reason is not None:
            return f"the network has {reason}"
        if load_library() is None:
            return f"the kernel could not be built on this machine ({_LIB_ERROR})"
        return None

    @classmethod
    def self_fn(cls, model, size, hyper, requirements, ntk=False) -> SelfFn | None:
        lib = load_library()
        program = _memoised(model, size, requirements, fuse=not ntk)
        threads = torch.get_num_threads()

        def own(x: Tensor, both: bool) -> SelfTerms:
            params = program.parameter_vector(hyper, x.dtype)

            def compute(images: Tensor, left: bool, right: bool):
                return self_terms(lib, program, params, images, threads, left, right, ntk)

            return _NativeTerms(compute, x, both)

        return own

    @classmethod
    def block_fn(cls, model, size, hyper, requirements, tile, ntk=False) -> BlockFn:
        lib = load_library()
        program = _memoised(model, size, requirements, fuse=not ntk)
        threads = torch.get_num_threads()

        def block(x, z, trace_x, trace_z, same):
            # like the compiled backend, the same-image rule is left to the engine's diagonal fix; the parameter
            # vector is made once per call (the program keeps it for this Hyper)
            params = program.parameter_vector(hyper, x.dtype)
            return run_block(lib, program, params, x, z, trace_x, trace_z, threads, ntk)

        return block

    @classmethod
    def block_vjp(cls, model, size, hyper, requirements, ntk=False) -> VjpFn:
        if ntk:  # pragma: no cover - choose() never picks this backend for the NTK's gradients
            raise ValueError("the native kernel's gradients cover the NNGP only")
        lib = load_library()
        program = _memoised(model, size, requirements, reuse=False)
        detached = hyper.with_values(v.detach() for v in hyper.values)
        threads = torch.get_num_threads()

        def vjp(x, z, trace_x, trace_z, same, grad):
            # the engine zeroes the gradient of a square block's diagonal (it comes from the self values), so
            # the same-image rule needs no adjoint here
            params = program.parameter_vector(detached, x.dtype)
            tx = [t.detach() for t in trace_x]
            tz = [t.detach() for t in trace_z]
            g_params, g_tx, g_tz = run_block_vjp(lib, program, params, x.detach(), z.detach(), tx, tz, grad, threads)
            return program.hyper_gradients(detached, g_params), g_tx, g_tz

        return vjp
