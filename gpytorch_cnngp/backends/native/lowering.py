"""Lowering for the native kernel: a layer tree to a :class:`NativeProgram`, a few instructions on map registers.

A same-location network (:class:`~gpytorch_cnngp.Conv2d`, :class:`~gpytorch_cnngp.Dense`,
:class:`~gpytorch_cnngp.ReLU`, :class:`~gpytorch_cnngp.LeakyReLU`, :class:`~gpytorch_cnngp.Sum`,
:class:`~gpytorch_cnngp.Sequential`) becomes one map per layer: window sums, nonlinearities that read their
layer's trace slot, sums of branches, on registers that maps share once their last reader has run
(:func:`_allocate`); a sum of branches that follows a window sum may be done in that window sum's store
(``lower(..., fuse=True)``, the NNGP's forward only, :func:`_fuse_sums`).

A pooled network (:class:`~gpytorch_cnngp.AvgPool2d`, :class:`~gpytorch_cnngp.GlobalAvgPool2d`, outside
:class:`~gpytorch_cnngp.Sum` branches) is lowered by :class:`_Lowering` to the same instructions on maps of
spatial offsets: between two pools each offset ``d`` the next pool reads runs through the layers on its own, on
the rectangle of positions ``p`` with ``p + d`` inside the map, and is added into that pool's outputs at once
(:class:`~gpytorch_cnngp.state.SpatialPlan` says which offsets; :func:`_rect` where each lies). Its self pass runs
offset ``(0, 0)`` first in each stage, whose nonlinearities record the deviations that the image's other offsets
then read. A window sum (stride 1, at most three rows) that only the nonlinearity after it reads is flagged so
that the pairs run the two row by row (:func:`_fuse_nonlins`): an offset's map at the input's size outgrows L1.

What each layer lowers to is the table :data:`_LAYERS` (layers between pools) and :data:`_POOLS` (pools). This
module only describes programs: it knows nothing of how the kernel is built (:mod:`.build`) or called
(:mod:`.run`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...layers import AvgPool2d, Conv2d, Dense, GlobalAvgPool2d, Layer, LeakyReLU, ReLU, Sequential, Sum
from ...state import Hyper, SpatialPlan

__all__ = ["NativeProgram", "Unsupported", "lower", "unsupported"]

# the instruction layout compiled into native_kernel.cpp: the opcodes, the fields per instruction, a flag
_OP_INPUT, _OP_CONV, _OP_NONLIN, _OP_ADD, _OP_OUTPUT, _OP_ZERO, _OP_POOL = range(7)
_FIELDS = 22
_NTK_IN_ZERO = 1  # instruction flag: the source's NTK map is the input's (zero)
_FUSE_NONLIN = 2  # instruction flag: the pairs run this window sum and the nonlinearity after it row by row
# the most window rows such a fused window sum may have: a sum of more is a running sum along H in the separate
# pass, whose additions (and so bits) a sum by taps would not repeat
_FUSE_MAX_TAPS = 3


class Unsupported(Exception):
    """The layer tree has a layer the native kernel does not implement (the message names it)."""


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


def _readers(instrs: list[_Instr]) -> dict[int, int]:
    """How many instructions read each register (as ``a`` or ``b``)."""
    readers: dict[int, int] = {}
    for ins in instrs:
        for r in (ins.a, ins.b):
            if r >= 0:
                readers[r] = readers.get(r, 0) + 1
    return readers


def _fuse_sums(instrs: list[_Instr]) -> list[_Instr]:
    """A sum whose one operand the window sum just before it made, and nothing else reads, done in that window
    sum's store (``b``: the map it adds): one pass over the maps less per residual block. The same bits, since
    the store adds the same two values."""
    readers = _readers(instrs)
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


def _fuse_nonlins(instrs: list[_Instr], code: Tensor) -> int:
    """Flag (in ``code``, the allocated instructions) each window sum with stride and dilation 1 whose map only
    the nonlinearity right after it reads, so that the pairs run the two row by row (``conv_nonlin`` in
    native_kernel.cpp: the offsets' maps of a pooled network outgrow L1, a few rows do not). Returns the
    scratch those need, in positions: a ring of window rows and an output row, for the NNGP and the NTK."""
    readers = _readers(instrs)
    scratch = 0
    for k in range(len(instrs) - 1):
        conv, nonlin = instrs[k], instrs[k + 1]
        kh, kw, sh, sw, dh, dw = conv.window[:6]
        if (
            conv.op == _OP_CONV
            and nonlin.op == _OP_NONLIN
            and nonlin.a == conv.dst
            and readers.get(conv.dst) == 1
            and conv.b < 0
            and (sh, sw, dh, dw) == (1, 1, 1, 1)
            and kh <= _FUSE_MAX_TAPS
            # the nonlinearity writes rows the window sum may still have to read
            and int(code[k + 1, 1]) != int(code[k, 2])
        ):
            code[k, 18] |= _FUSE_NONLIN
            scratch = max(scratch, (2 * kh + 2) * conv.out_hw[1])
    return scratch


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
        if self.pooled and self.reuse:
            self.tmp_area = max(self.tmp_area, _fuse_nonlins(self.instrs, code))
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
