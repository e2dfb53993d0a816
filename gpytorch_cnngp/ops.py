"""Tensor math behind the layers: uniform window sums, offset maps and the ReLU Gaussian expectation.

Covariance maps are laid out spatial dimensions first, ``[H, W, ...]``, with any trailing
dimensions: self terms ``[H, W, N]``, matched pairs ``[H, W, N]`` and pair blocks ``[H, W, N1, N2]``.
With the images innermost, elementwise steps vectorise along contiguous runs of pairs, and window
sums along H and W are plain matrix products or shifts of whole contiguous blocks. Nothing here knows
about tiles or GPyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Window",
    "window_sum",
    "diagonal_window_sum",
    "window_sum_both_sides",
    "Offsets",
    "offset_window_sum",
    "offset_pool",
    "position_diagonal",
    "same_location",
    "relu_expectation",
    "relu_derivative_expectation",
    "relu_poly_coefficients",
    "relu_derivative_poly_coefficients",
    "relu_derivative_expectation_poly",
    "relu_expectation_fast",
    "relu_expectation_poly",
    "relu_expectation_forward",
    "safe_sqrt",
    "arc_cosine_j",
]

_INV_2PI = 0.5 / math.pi


@dataclass(frozen=True)
class Window:
    """Geometry of a uniform convolution window along one spatial axis.

    Output position ``o`` sums the inputs at ``o * stride - pad_before + i * dilation`` for
    ``i = 0 .. size - 1``; positions that fall in the padding contribute zero.
    """

    size: int
    stride: int = 1
    dilation: int = 1
    pad_before: int = 0
    pad_after: int = 0

    def out_size(self, n: int) -> int:
        span = self.dilation * (self.size - 1) + 1
        return (n + self.pad_before + self.pad_after - span) // self.stride + 1

    def is_identity(self) -> bool:
        return self.size == 1 and self.stride == 1 and self.pad_before == 0 and self.pad_after == 0


@lru_cache(maxsize=256)
def _window_matrix_cpu64(win: Window, n: int) -> Tensor:
    out = win.out_size(n)
    mat = torch.zeros(out, n, dtype=torch.float64)
    for o in range(out):
        for i in range(win.size):
            q = o * win.stride - win.pad_before + i * win.dilation
            if 0 <= q < n:
                mat[o, q] = 1.0
    return mat


_matrix_cache: dict[tuple, Tensor] = {}


def window_matrix(win: Window, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``[out, n]`` 0/1 matrix whose rows select each output's window (zero padding drops out)."""
    key = (win, n, dtype, str(device))
    mat = _matrix_cache.get(key)
    if mat is None:
        mat = _window_matrix_cpu64(win, n).to(dtype=dtype, device=device)
        if len(_matrix_cache) > 512:
            _matrix_cache.clear()
        _matrix_cache[key] = mat
    return mat


def _sum_along(m: Tensor, win: Window, dim: int) -> Tensor:
    """Window sum along ``dim`` (0 or 1) as padded strided slices: fusable by ``torch.compile``."""
    out = win.out_size(m.shape[dim])
    if win.pad_before or win.pad_after:
        pad = [0, 0] * (m.dim() - 1 - dim) + [win.pad_before, win.pad_after]
        m = F.pad(m, pad)
    total = None
    last = (out - 1) * win.stride + 1
    for i in range(win.size):
        part = m.narrow(dim, i * win.dilation, last)
        if win.stride != 1:
            part = part[:: win.stride] if dim == 0 else part[:, :: win.stride]
        total = part if total is None else total + part
    return total


def window_sum(m: Tensor, win_h: Window, win_w: Window, method: str = "matmul", scale: Tensor | None = None) -> Tensor:
    """``scale`` times the sum of ``m`` ``[H, W, ...]`` over each output's window in H and W.

    ``method="matmul"`` writes each axis' window as a 0/1 matrix and applies them as matrix products
    (one GEMM over H, a batch of GEMMs over W), with ``scale`` folded into the last (small) matrix:
    fast in eager mode on any device, and it handles stride, dilation, even windows and padding
    alike. ``method="slices"`` adds shifted strided slices, which ``torch.compile`` fuses into one
    loop. Both sum exactly the same terms.
    """
    h, w = m.shape[0], m.shape[1]
    rest = m.shape[2:]
    size = math.prod(rest)
    if method == "matmul":
        if not win_w.is_identity():
            mat = window_matrix(win_w, w, m.dtype, m.device)
            if win_h.is_identity() and scale is not None:
                mat, scale = mat * scale, None
            m = torch.matmul(mat, m.reshape(h, w, size)).reshape(h, mat.shape[0], *rest)
            w = mat.shape[0]
        if not win_h.is_identity():
            mat = window_matrix(win_h, h, m.dtype, m.device)
            if scale is not None:
                mat, scale = mat * scale, None
            m = torch.matmul(mat, m.reshape(h, w * size)).reshape(mat.shape[0], w, *rest)
        return m if scale is None else m * scale
    if method == "slices":
        if not win_h.is_identity():
            m = _sum_along(m, win_h, 0)
        if not win_w.is_identity():
            m = _sum_along(m, win_w, 1)
        return m if scale is None else m * scale
    raise ValueError(f"unknown window_sum method {method!r}; expected 'matmul' or 'slices'")


# --- full spatial covariances --------------------------------------------------------------------
#
# Pooling needs covariances between different positions, K[p, q] for position p of one image and q of
# the other. Such maps are laid out [H, W, H, W, ...]: the first two dimensions index the first image's
# positions, the next two the second's.


def position_diagonal(m: Tensor) -> Tensor:
    """View ``[..., H * W]`` of the same-location entries ``m[p, p]`` of a contiguous full map."""
    h, w = m.shape[0], m.shape[1]
    return m.view(h * w, h * w, *m.shape[4:]).diagonal(0, 0, 1)


def same_location(m: Tensor) -> Tensor:
    """The same-location map ``[H, W, ...]`` of a full map ``[H, W, H, W, ...]``."""
    h, w = m.shape[0], m.shape[1]
    return position_diagonal(m.contiguous()).movedim(-1, 0).reshape(h, w, *m.shape[4:])


def _valid_taps(win: Window, n: int) -> list[tuple[int, int, int]]:
    """Per tap: ``(first output, end output, first input)`` of the outputs whose tap is inside the image."""
    out, taps = win.out_size(n), []
    for t in range(win.size):
        offset = t * win.dilation - win.pad_before  # input index of output o is o * stride + offset
        lo = max(0, -(offset // win.stride)) if offset < 0 else 0
        hi = min(out, (n - 1 - offset) // win.stride + 1) if n - 1 - offset >= 0 else 0
        if lo < hi:
            taps.append((lo, hi, lo * win.stride + offset))
    return taps


def _joint_sum(m: Tensor, win: Window, a: int, b: int) -> Tensor:
    """Sum over one window tap shared by dimensions ``a`` and ``b`` (same length, same geometry)."""
    n = m.shape[a]
    out_n = win.out_size(n)

    def index(dim_slice: slice) -> tuple[slice, ...]:
        idx = [slice(None)] * m.dim()
        idx[a] = idx[b] = dim_slice
        return tuple(idx)

    def source(lo: int, hi: int, start: int) -> Tensor:
        return m[index(slice(start, start + (hi - lo - 1) * win.stride + 1, win.stride))]

    taps = _valid_taps(win, n)
    # start from a tap that covers every output (the centre one when there is one): no zero fill
    full = next((t for t in taps if t[0] == 0 and t[1] == out_n), None)
    if full is not None:
        total = source(*full).clone()
    else:
        shape = list(m.shape)
        shape[a] = shape[b] = out_n
        total = m.new_zeros(shape)
    for tap in taps:
        if tap is not full:
            total[index(slice(tap[0], tap[1]))] += source(*tap)
    return total


def diagonal_window_sum(m: Tensor, win_h: Window, win_w: Window, scale: Tensor | None = None) -> Tensor:
    """Convolution window sum of a full map: ``out[p, q] = scale * sum_t m[p + t, q + t]``.

    Both images see the same weight at tap ``t``, so the two positions move together: each offset
    ``q - p`` is an independent box filter. Summed separably (H taps, then W taps), this costs
    ``2 k`` additions per output entry rather than the ``k^4`` of a dense 4-D convolution.
    """
    if not win_h.is_identity():
        m = _joint_sum(m, win_h, 0, 2)
    if not win_w.is_identity():
        m = _joint_sum(m, win_w, 1, 3)
    return m if scale is None else m * scale


def window_sum_both_sides(
    m: Tensor, win_h: Window, win_w: Window, method: str = "matmul", scale: Tensor | None = None
) -> Tensor:
    """Independent window sums on each image's positions of a full map (pooling): ``A m A^T``."""
    m = window_sum(m, win_h, win_w, method)
    m = window_sum(m.movedim((2, 3), (0, 1)), win_h, win_w, method, scale)
    return m.movedim((0, 1), (2, 3)).contiguous()


# --- covariances at spatial offsets ----------------------------------------------------------------
#
# A convolution with shared weights moves both positions of a covariance together, and a pointwise
# nonlinearity acts entry by entry, so each offset d = q - p evolves on its own between pooling layers. The
# offset layout keeps only the offsets a later layer needs: [H, W, O, ...] with m[p, i] = K(p, p + d_i), zero
# where p + d_i lies outside the map (which is what zero padding reads there).


class Offsets:
    """The spatial offsets ``d = q - p`` a map of size ``(H, W)`` carries, in a fixed order (``(0, 0)`` always
    among them), and the index tensors of its layout ``[H, W, O, ...]``, made once per device.

    Instances are made once per network and size (:class:`gpytorch_cnngp.state.SpatialPlan`) and compared by
    identity.
    """

    def __init__(self, size: tuple[int, int], offsets) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.offsets = tuple(sorted(offsets))
        self.index = {d: i for i, d in enumerate(self.offsets)}
        if (0, 0) not in self.index:
            raise ValueError("an offset set must hold (0, 0), the same-location map")
        self.zero = self.index[(0, 0)]
        self._cache: dict[tuple, Any] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def __repr__(self) -> str:
        return f"Offsets({self.size[0]}x{self.size[1]}, {len(self)} offsets)"

    def _cached(self, key: tuple, make) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def mask(self, m: Tensor, pair_ndim: int) -> Tensor:
        """``[H, W, O, 1, ...]`` in ``m``'s dtype: 1 where ``p + d`` lies inside the map, else 0."""

        def make() -> Tensor:
            h, w = self.size
            dy = torch.tensor([d[0] for d in self.offsets])
            dx = torch.tensor([d[1] for d in self.offsets])
            inside_y = (torch.arange(h)[:, None] + dy >= 0) & (torch.arange(h)[:, None] + dy < h)
            inside_x = (torch.arange(w)[:, None] + dx >= 0) & (torch.arange(w)[:, None] + dx < w)
            return (inside_y[:, None, :] & inside_x[None, :, :]).to(dtype=m.dtype, device=m.device)

        mask = self._cached(("mask", m.dtype, m.device), make)
        return mask.view(*mask.shape, *([1] * pair_ndim))

    def shifted(self, s: Tensor) -> Tensor:
        """``s`` ``[H, W, ...]`` seen from each offset: ``[H, W, O, ...]`` holding ``s[p + d]`` (0 outside)."""
        h, w = self.size
        rest = s.shape[2:]

        def make() -> Tensor:
            ys, xs = torch.arange(h)[:, None, None], torch.arange(w)[None, :, None]
            dy = torch.tensor([d[0] for d in self.offsets])
            dx = torch.tensor([d[1] for d in self.offsets])
            qy, qx = ys + dy, xs + dx
            inside = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
            return torch.where(inside, qy * w + qx, h * w).reshape(-1).to(s.device)

        index = self._cached(("shift", s.device), make)
        flat = torch.cat([s.reshape(h * w, *rest), s.new_zeros(1, *rest)])
        return flat.index_select(0, index).view(h, w, len(self), *rest)

    def gather(self, m: Tensor, key: tuple, targets) -> Tensor:
        """The maps of offsets ``targets`` (a sequence of ``(dy, dx)``) from ``m`` ``[H, W, O, ...]`` laid out
        by this set, along dimension 2; an offset this set lacks gives zeros (it lies outside the map).
        ``key`` names ``targets`` in the index cache (callers pass the destination set and the rule)."""

        def make() -> tuple[Tensor | None, bool]:
            n = len(self)
            found = [self.index.get(tuple(t), n) for t in targets]
            if found == list(range(n)):  # the same offsets in the same order: nothing to move
                return None, False
            return torch.tensor(found, device=m.device), n in found

        index, missing = self._cached(("gather", key, m.device), make)
        if index is None:
            return m
        if missing:
            pad = m.new_zeros(*m.shape[:2], 1, *m.shape[3:])
            m = torch.cat([m, pad], dim=2)
        return m.index_select(2, index)

    def select(self, m: Tensor, source: Offsets) -> Tensor:
        """``m`` laid out by ``source`` with this set's offsets (a subset of ``source``'s)."""
        if source is self:
            return m
        return source.gather(m, ("select", self), self.offsets)


def offset_window_sum(
    m: Tensor, source: Offsets, target: Offsets, win_h: Window, win_w: Window, method: str, scale: Tensor | None
) -> Tensor:
    """A convolution's window sum on offset maps: output offset ``D`` is the same-location window sum of the
    input offset ``stride * D`` (both positions move together under each tap; dilation moves both alike).
    Entries whose ``P + D`` lies outside the output still need the caller's mask."""
    sh, sw = win_h.stride, win_w.stride
    if source is target and sh == 1 and sw == 1:
        picked = m
    else:
        picked = source.gather(m, ("conv", target, sh, sw), [(sh * dy, sw * dx) for dy, dx in target.offsets])
    return window_sum(picked, win_h, win_w, method, scale)


@lru_cache(maxsize=1024)
def _tap_matrix_cpu64(win: Window, n: int, shift: int) -> Tensor:
    """``[out, n]``: row ``o`` selects the window's taps ``a`` whose partner ``a + shift`` is a tap too."""
    out = win.out_size(n)
    mat = torch.zeros(out, n, dtype=torch.float64)
    for o in range(out):
        for a in range(max(0, -shift), min(win.size, win.size - shift)):
            q = o * win.stride - win.pad_before + a * win.dilation
            if 0 <= q < n:
                mat[o, q] = 1.0
    return mat


def _tap_matrix(win: Window, n: int, shift: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = ("taps", win, n, shift, dtype, str(device))
    mat = _matrix_cache.get(key)
    if mat is None:
        mat = _tap_matrix_cpu64(win, n, shift).to(dtype=dtype, device=device)
        if len(_matrix_cache) > 512:
            _matrix_cache.clear()
        _matrix_cache[key] = mat
    return mat


def offset_pool(m: Tensor, source: Offsets, target: Offsets, win: Window, scale: float) -> Tensor:
    """Average pooling on offset maps (both images' windows taken independently).

    Output offset ``D`` at ``P`` sums ``K(s P + a, s (P + D) + b)`` over taps ``a, b``: grouped by ``e = b - a``,
    it is the input offset ``s D + e`` summed over the taps ``a`` whose ``a + e`` is a tap too, per axis.
    Entries whose ``P + D`` lies outside the output still need the caller's mask.
    """
    (h, w), k, s = source.size, win.size, win.stride
    rest = m.shape[3:]
    size = len(target) * math.prod(rest)
    total = None
    for ey in range(-(k - 1), k):
        rows = _tap_matrix(win, h, ey, m.dtype, m.device)
        for ex in range(-(k - 1), k):
            cols = _tap_matrix(win, w, ex, m.dtype, m.device)
            targets = [(s * dy + ey, s * dx + ex) for dy, dx in target.offsets]
            part = source.gather(m, ("pool", target, win, ey, ex), targets)
            part = torch.matmul(cols, part.reshape(h, w, size))
            part = torch.matmul(rows, part.reshape(h, -1)).reshape(rows.shape[0], cols.shape[0], len(target), *rest)
            total = part if total is None else total.add_(part)
    return total.mul_(scale)


# --- arc-cosine expectation --------------------------------------------------------------------
#
# For (u, v) ~ N(0, [[s1^2, c], [c, s2^2]]) and rho = c / (s1 s2),
#   E[relu(u) relu(v)] = s1 s2 J(rho) / (2 pi),  J(rho) = sqrt(1 - rho^2) + (pi - arccos(rho)) rho.
# J is smooth on [-1, 1] with J'(rho) = pi - arccos(rho), so the derivatives
#   d/dc  = (pi - arccos rho) / (2 pi),   d/ds1 = s2 sqrt(1 - rho^2) / (2 pi)
# are finite everywhere, including rho = 1 (identical images) where autograd through arccos and
# sqrt(1 - rho^2) separately would give inf - inf. Working with s1 s2 instead of v1 v2 keeps every
# intermediate within the range of the result, so nothing overflows when the kernel itself fits.

# The compiled path avoids arccos altogether. With a = |rho|, J(rho) - pi max(rho, 0) is the same
# even function sqrt(1 - a^2) - a arccos(a) on both sides (J(-a) = J(a) - pi a), and it vanishes like
# (1 - a)^(3/2) at a = 1, where J'' has its square-root singularity. Dividing that power out leaves a
# function analytic on [0, 1]:
#   J(rho) = pi max(rho, 0) + (1 - a)^(3/2) R(a),   R(a) = (sqrt(1 - a^2) - a arccos a) / (1 - a)^(3/2),
# with R(0) = 1 and R(1) = 2 sqrt(2) / 3. A polynomial fits R to a small relative error, so for a given
# rho the result is good to a few ulp everywhere, with no cancellation near rho = -1 (the textbook form
# subtracts two nearly equal terms there). One square root and one short polynomial: no library arccos,
# no branches, and it fuses into a single vectorised loop under torch.compile (about twice as fast there
# as the arccos form with a polynomial arccos).
#
# Coefficients: our fits by interpolation at Chebyshev nodes on [0, 1] in 60-digit arithmetic.
# Max relative error of R with the coefficients as stored: 1.8e-8 (degree 6, float32: below its half-ulp,
# 6e-8; each degree is one multiply-add per pair and position, the native kernel's bound) and 1.0e-16
# (degree 16, float64). tests/relu_poly_fit.py reproduces them.
_R_POLY32 = (
    0.9999999820702332,
    -0.07079455766464221,
    0.018776210175684788,
    -0.007554756387095382,
    0.003378330698226044,
    -0.0012306278442145908,
    0.0002344713665398918,
)
_R_POLY64 = (
    1.0,
    -0.07079632679486807,
    0.018805509804893886,
    -0.007743112634115554,
    0.00398719963411662,
    -0.002350308428493205,
    0.0015159690813432883,
    -0.0010416946291698715,
    0.000747207468678863,
    -0.0005460653966222053,
    0.0003913542553565739,
    -0.0002601378887500449,
    0.00014973967455570396,
    -6.911949786934055e-05,
    2.3357210958000973e-05,
    -5.048444762324465e-06,
    5.181668111157759e-07,
)


# The derivative expectation (pi - arccos rho) / (2 pi), which multiplies the NTK, has the same shape: with
# a = |rho| it is 1/2 - q for rho > 0 and q otherwise, q = arccos(a) / (2 pi) = sqrt(1 - a) A(a) / (2 pi), and
#   A(a) = arccos(a) / sqrt(1 - a)
# is analytic on [0, 1] (A(0) = pi / 2, A(1) = sqrt 2): again one square root (shared with R's) and one
# polynomial. Fitted as R; max relative error 2.6e-9 (degree 8, float32) and 8.4e-16 (degree 16, float64).
_A_POLY32 = (
    1.570796322643815,
    -0.2146011607316858,
    0.08903013693965323,
    -0.05059357388390752,
    0.03257117017408731,
    -0.02072766525325272,
    0.011028380666317037,
    -0.003974577703820064,
    0.0006845318166245465,
)
_A_POLY64 = (
    1.5707963267948954,
    -0.21460183660182866,
    0.0890486224781379,
    -0.05079281184732053,
    0.03368123219816827,
    -0.02437365322246755,
    0.018666751652338415,
    -0.014854289462978544,
    0.012083057280460375,
    -0.00980969602427563,
    0.0076416976974388534,
    -0.0054043323235331165,
    0.0032500530152205155,
    -0.0015461442592397717,
    0.0005334320338027516,
    -0.00011697848169483264,
    1.2131445971917302e-05,
)

# R / (2 pi), the form the ReLU uses (scaled once here rather than on every call)
_R_OVER_2PI32 = tuple(k * _INV_2PI for k in _R_POLY32)
_R_OVER_2PI64 = tuple(k * _INV_2PI for k in _R_POLY64)
_A_OVER_2PI32 = tuple(k * _INV_2PI for k in _A_POLY32)
_A_OVER_2PI64 = tuple(k * _INV_2PI for k in _A_POLY64)


def relu_poly_coefficients(dtype: torch.dtype) -> tuple[float, ...]:
    """The coefficients of ``R(a) / (2 pi)`` in :func:`relu_expectation_poly` for ``dtype`` (lowest order first)."""
    return _R_OVER_2PI64 if dtype == torch.float64 else _R_OVER_2PI32


def relu_derivative_poly_coefficients(dtype: torch.dtype) -> tuple[float, ...]:
    """The coefficients of ``A(a) / (2 pi)`` in :func:`relu_derivative_expectation_poly` for ``dtype`` (lowest
    order first)."""
    return _A_OVER_2PI64 if dtype == torch.float64 else _A_OVER_2PI32


def _horner(t: Tensor, coefs: tuple[float, ...]) -> Tensor:
    p = t * coefs[-1] + coefs[-2]
    for coef in reversed(coefs[:-2]):
        p = p * t + coef
    return p


def relu_expectation_poly(c: Tensor, s1: Tensor, s2: Tensor, inv1: Tensor, inv2: Tensor) -> Tensor:
    """Forward-only :func:`relu_expectation` without arccos, for compiled code (see the note above).

    ``E = max(c, 0) / 2 + s1 s2 (1 - a)^(3/2) R(a) / (2 pi)`` with ``a = min(|c| / (s1 s2), 1)``;
    ``inv1, inv2`` are the precomputed ``1 / s`` (0 where ``s = 0``, which makes the second term 0).
    Written for ``torch.compile``: eagerly its polynomial costs one pass over memory per coefficient.
    """
    coefs = relu_poly_coefficients(c.dtype)
    a = (c.abs() * inv1 * inv2).clamp_max(1.0)
    u = 1.0 - a
    return c.clamp_min(0.0) * 0.5 + (s1 * s2) * (u * u.sqrt()) * _horner(a, coefs)


def relu_derivative_expectation_poly(c: Tensor, inv1: Tensor, inv2: Tensor) -> Tensor:
    """Forward-only :func:`relu_derivative_expectation` without arccos (the form the native kernel computes).

    ``(pi - arccos rho) / (2 pi)`` is ``1/2 - q`` for ``c > 0`` and ``q`` otherwise, ``q = sqrt(1 - a) A(a) / (2 pi)``
    with ``a = min(|c| / (s1 s2), 1)``; 0 where a variance is 0 (``inv1`` or ``inv2`` is 0).
    """
    a = (c.abs() * inv1 * inv2).clamp_max(1.0)
    q = (1.0 - a).sqrt() * _horner(a, relu_derivative_poly_coefficients(c.dtype))
    d = torch.where(c > 0, 0.5 - q, q)
    return torch.where(inv1 * inv2 > 0, d, 0.0)


def _correlation(c: Tensor, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    scale = s1 * s2
    # |c| <= s1 s2 holds exactly (Cauchy-Schwarz); the clamp only removes rounding overshoot.
    # Where a variance is zero the covariance is zero too and the output is zero for any rho.
    positive = scale > 0
    rho = torch.where(positive, c / torch.where(positive, scale, 1.0), 0.0).clamp(-1.0, 1.0)
    return rho, scale


def arc_cosine_j(rho: Tensor) -> Tensor:
    """``J(rho) = sqrt(1 - rho^2) + (pi - arccos(rho)) rho`` for ``rho`` in [-1, 1]."""
    return torch.sqrt((1.0 - rho * rho).clamp_min(0.0)) + (math.pi - torch.acos(rho)) * rho


def relu_expectation_nograd(c: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    """Forward value of :func:`relu_expectation` as plain tensor code."""
    rho, scale = _correlation(c, s1, s2)
    return scale * arc_cosine_j(rho) * _INV_2PI


def inverse_std(s: Tensor) -> Tensor:
    """``1 / s`` where ``s > 0``, else 0 (a zero variance then gives correlation 0 and output 0)."""
    return torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)


def relu_expectation_fast(c: Tensor, s1: Tensor, s2: Tensor, inv1: Tensor, inv2: Tensor) -> Tensor:
    """Forward-only :func:`relu_expectation` with the per-image ``1 / s`` precomputed.

    Written for few, cheap passes over memory in eager mode: one side at a time is broadcast into a
    fresh buffer (an outer product of two broadcast operands is several times slower), then every
    step works in place; ``c`` is not modified. Compiled code uses :func:`relu_expectation_poly`.
    """
    rho = (c * inv1).mul_(inv2).clamp_(-1.0, 1.0)
    angle = torch.acos(rho)
    minus_slope = angle.sub_(math.pi).mul_(rho)  # -(pi - arccos rho) rho
    j = rho.mul_(rho).neg_().add_(1.0).clamp_min_(0.0).sqrt_().sub_(minus_slope)
    return j.mul_(s1).mul_(s2).mul_(_INV_2PI)


def relu_expectation_forward(c: Tensor, s1: Tensor, s2: Tensor, compiled: bool = False) -> Tensor:
    """Forward-only :func:`relu_expectation`: :func:`relu_expectation_poly` when the code is being
    compiled (one fused loop), :func:`relu_expectation_fast` otherwise (eager ``torch.acos`` is one pass)."""
    fn = relu_expectation_poly if compiled else relu_expectation_fast
    return fn(c, s1, s2, inverse_std(s1), inverse_std(s2))


class SecondDerivativeError(RuntimeError):
    """A second derivative (``create_graph=True``) was asked through a kernel computation."""


def first_order_only(backward):
    """Like ``torch.autograd.function.once_differentiable``, but a backward asked to build a graph refuses.

    ``once_differentiable`` only traps a second differentiation when the incoming gradient itself requires
    grad; when it does not (``K.sum()``, a fixed weighting), the first derivative comes back as a constant and a
    second derivative through it is silently wrong. A backward run with ``create_graph=True`` runs with grad
    mode on, which is what is checked here.
    """
    inner = torch.autograd.function.once_differentiable(backward)

    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise SecondDerivativeError(
                "second derivatives (create_graph=True) through CNN-GP kernels are not supported: their backward "
                "passes give first derivatives only. Use finite differences of the gradient, or leave "
                "create_graph off"
            )
        return inner(ctx, *grads)

    wrapper.__name__ = getattr(backward, "__name__", "backward")
    wrapper.__doc__ = backward.__doc__
    return wrapper


class _ReLUExpectation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
        ctx.save_for_backward(c, s1, s2)
        return relu_expectation_nograd(c, s1, s2)

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor):
        c, s1, s2 = ctx.saved_tensors
        rho, _ = _correlation(c, s1, s2)
        g_c = g_s1 = g_s2 = None
        if ctx.needs_input_grad[0]:
            g_c = (grad * (math.pi - torch.acos(rho)) * _INV_2PI).sum_to_size(c.shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            sine = grad * torch.sqrt((1.0 - rho * rho).clamp_min(0.0)) * _INV_2PI
            if ctx.needs_input_grad[1]:
                g_s1 = (sine * s2).sum_to_size(s1.shape)
            if ctx.needs_input_grad[2]:
                g_s2 = (sine * s1).sum_to_size(s2.shape)
        return g_c, g_s1, g_s2


def relu_expectation(c: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    """``E[relu(u) relu(v)]`` for centred Gaussians with covariance ``c`` and standard deviations ``s1, s2``.

    Inputs broadcast against each other. Gradients are finite everywhere, including perfectly
    correlated pairs (``c = s1 s2``) and zero variances.
    """
    if torch.is_grad_enabled() and (c.requires_grad or s1.requires_grad or s2.requires_grad):
        return _ReLUExpectation.apply(c, s1, s2)
    return relu_expectation_nograd(c, s1, s2)


def _relu_derivative_nograd(c: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    rho, scale = _correlation(c, s1, s2)
    return torch.where(scale > 0, (math.pi - torch.acos(rho)) * _INV_2PI, 0.0)


class _ReLUDerivativeExpectation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
        ctx.save_for_backward(c, s1, s2)
        return _relu_derivative_nograd(c, s1, s2)

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor):
        c, s1, s2 = ctx.saved_tensors
        # dE/drho = 1 / (2 pi sqrt(1 - rho^2)): infinite at |rho| = 1, where rho stays 1 under any change of the
        # variances (identical images), so the partial derivatives are taken as 0 there (the total is 0)
        r = torch.sqrt(((s1 * s2) ** 2 - c * c).clamp_min(0.0))
        inv = torch.where(r > 0, _INV_2PI / torch.where(r > 0, r, 1.0), 0.0)
        g_c = g_s1 = g_s2 = None
        if ctx.needs_input_grad[0]:
            g_c = (grad * inv).sum_to_size(c.shape)
        if ctx.needs_input_grad[1]:
            g_s1 = (-grad * c * inv * inverse_std(s1)).sum_to_size(s1.shape)
        if ctx.needs_input_grad[2]:
            g_s2 = (-grad * c * inv * inverse_std(s2)).sum_to_size(s2.shape)
        return g_c, g_s1, g_s2


def relu_derivative_expectation(c: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    """``E[relu'(u) relu'(v)] = (pi - arccos rho) / (2 pi)``, ``rho = c / (s1 s2)``: what a ReLU multiplies the
    neural tangent kernel by. ``relu'(0) = 0`` (as autograd has it), so it is 0 where a variance is zero.
    Gradients are finite everywhere (0 at ``|rho| = 1``, where ``rho`` cannot move)."""
    if torch.is_grad_enabled() and (c.requires_grad or s1.requires_grad or s2.requires_grad):
        return _ReLUDerivativeExpectation.apply(c, s1, s2)
    return _relu_derivative_nograd(c, s1, s2)


class _SafeSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        s = torch.sqrt(v)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor) -> Tensor:
        (s,) = ctx.saved_tensors
        positive = s > 0
        # d sqrt(v)/dv is infinite at v = 0; there the variance only ever multiplies zero
        # sensitivities, so we use the zero subgradient and keep every gradient finite.
        return torch.where(positive, grad / (2.0 * torch.where(positive, s, 1.0)), 0.0)


def safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` whose derivative at ``v = 0`` is taken as 0 instead of infinity."""
    if torch.is_grad_enabled() and v.requires_grad:
        return _SafeSqrt.apply(v)
    return torch.sqrt(v)
