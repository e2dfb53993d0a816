"""An independent float64 NumPy reference for CNN-GP kernels, written from the semantics document only.

It deliberately shares no code and no formulation with the library:

* an architecture is plain data::

      ("seq", [layer, ...])
      ("conv", {"k": 3, "stride": 1, "padding": "same" | int, "dilation": 1, "vw": 1.0, "vb": 0.0})
      ("relu",)
      ("sum", [branch, ...])

* a convolution is an explicit Python loop over output positions; each position's window is
  enumerated offset by offset with index arithmetic (padding, stride, dilation, even-``k`` "same"),
  taps that fall outside the image are dropped (zero padding) but the sum is still divided by ``k^2``;
* the ReLU uses ``theta = arctan2(sqrt(max(v1 v2 - c^2, 0)), c)`` on variances (never standard
  deviations or ``arccos``);
* for a kernel of a set with itself the diagonal pairs are set to the self values ``xx / 2`` after
  every ReLU (the exact-diagonal rule).

Public functions: :func:`kernel` (``[N1, N2]``, or ``[N, N]`` same-set when ``Z is None``),
:func:`kernel_diag` (``[N]`` self values) and :func:`output_size`.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

__all__ = ["kernel", "kernel_diag", "output_size", "conv_taps_1d"]


# ----------------------------------------------------------------------------------------------
# geometry: which input indices a 1-D window of an output index covers
# ----------------------------------------------------------------------------------------------
def _relative_offsets(k: int, dilation: int, padding) -> list[int]:
    """Offsets of the taps relative to the window's anchor.

    "same": the anchor is the output's centre pixel ``i * stride``; the offsets run from
    ``-(k - 1) // 2`` to ``k // 2`` (odd k: symmetric; even k: one fewer before, one more after), each
    times the dilation. Integer padding P (torch semantics): the anchor is ``i * stride - P`` and the
    offsets are ``0, d, 2d, ..., (k - 1) d``.
    """
    if padding == "same":
        first = -((k - 1) // 2)
        return [(first + t) * dilation for t in range(k)]
    return [t * dilation for t in range(k)]


@cache
def conv_taps_1d(n: int, k: int, stride: int, padding, dilation: int) -> tuple[tuple[int, ...], ...]:
    """For each output index along one axis of length ``n``, the in-image input indices of its window."""
    offsets = _relative_offsets(k, dilation, padding)
    if padding == "same":
        anchors = list(range(0, n, stride))  # a centre for every stride-th input pixel
    else:
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"bad padding {padding!r}")
        span = dilation * (k - 1) + 1
        anchors = []
        start = -padding
        while start + span <= n + padding:  # the whole window must fit inside the padded input
            anchors.append(start)
            start += stride
    if not anchors:
        raise ValueError(f"window k={k}, stride={stride}, padding={padding}, dilation={dilation} does not fit n={n}")
    taps = []
    for anchor in anchors:
        taps.append(tuple(anchor + off for off in offsets if 0 <= anchor + off < n))
    return tuple(taps)


@cache
def _window_index_lists(h: int, w: int, k: int, stride: int, padding, dilation: int):
    """Per output position (i, j): the row and column index arrays of its in-image taps."""
    rows = conv_taps_1d(h, k, stride, padding, dilation)
    cols = conv_taps_1d(w, k, stride, padding, dilation)
    table = []
    for i, rt in enumerate(rows):
        for j, ct in enumerate(cols):
            rr = [r for r in rt for _ in ct]
            cc = [c for _ in rt for c in ct]
            table.append((i, j, np.array(rr, dtype=np.intp), np.array(cc, dtype=np.intp)))
    return len(rows), len(cols), table


def _conv_map(m: np.ndarray, spec: dict) -> np.ndarray:
    """``vb + vw / k^2 * sum over the window`` applied to a map ``[..., H, W]``."""
    k = spec["k"]
    h, w = m.shape[-2:]
    ho, wo, table = _window_index_lists(h, w, k, spec["stride"], spec["padding"], spec["dilation"])
    out = np.zeros(m.shape[:-2] + (ho, wo), dtype=np.float64)
    for i, j, rr, cc in table:  # explicit loop over output positions
        if rr.size:
            out[..., i, j] = m[..., rr, cc].sum(axis=-1)
    return spec["vb"] + (spec["vw"] / (k * k)) * out


# ----------------------------------------------------------------------------------------------
# ReLU
# ----------------------------------------------------------------------------------------------
def relu_cov(c: np.ndarray, v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """E[relu(u) relu(v)] for centred Gaussians with Var u = v1, Var v = v2, Cov = c."""
    root = np.sqrt(np.maximum(v1 * v2 - c * c, 0.0))
    theta = np.arctan2(root, c)
    return (root + (math.pi - theta) * c) / (2.0 * math.pi)


# ----------------------------------------------------------------------------------------------
# propagation of the state (xz, xx, zz)
# ----------------------------------------------------------------------------------------------
class _State:
    """``xz`` [N1, N2, H, W], ``xx`` [N1, H, W], ``zz`` [N2, H, W]; ``same``: Z is X (then zz is xx)."""

    def __init__(self, xz, xx, zz, same):
        self.xz, self.xx, self.zz, self.same = xz, xx, zz, same


def _apply(layer, st: _State) -> _State:
    kind = layer[0]
    if kind == "seq":
        for sub in layer[1]:
            st = _apply(sub, st)
        return st
    if kind == "conv":
        spec = _full_spec(layer[1])
        xx = _conv_map(st.xx, spec)
        zz = xx if st.same else _conv_map(st.zz, spec)
        xz = None if st.xz is None else _conv_map(st.xz, spec)
        return _State(xz, xx, zz, st.same)
    if kind == "relu":
        xx = st.xx / 2.0
        zz = xx if st.same else st.zz / 2.0
        if st.xz is None:
            return _State(None, xx, zz, st.same)
        xz = relu_cov(st.xz, st.xx[:, None], st.zz[None, :])
        if st.same:
            for a in range(xx.shape[0]):  # exact diagonal: an image with itself
                xz[a, a] = xx[a]
        return _State(xz, xx, zz, st.same)
    if kind == "sum":
        outs = [_apply(branch, st) for branch in layer[1]]
        xz, xx, zz = outs[0].xz, outs[0].xx.copy(), outs[0].zz.copy()
        for o in outs[1:]:
            if o.xx.shape != xx.shape:
                raise ValueError("sum branches give different shapes")
            if xz is not None:
                xz = xz + o.xz
            xx = xx + o.xx
            zz = zz + o.zz
        if st.same:
            zz = xx
        return _State(xz, xx, zz, st.same)
    raise ValueError(f"unknown layer {layer!r}")


def _full_spec(spec: dict) -> dict:
    out = {"stride": 1, "padding": "same", "dilation": 1, "vw": 1.0, "vb": 0.0}
    out.update(spec)
    out["vw"], out["vb"] = float(out["vw"]), float(out["vb"])
    return out


def _input_state(X: np.ndarray, Z: np.ndarray | None) -> _State:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 4:
        raise ValueError("inputs must be [N, C, H, W]")
    C = X.shape[1]
    xx = (X * X).sum(axis=1) / C
    if Z is None:
        xz = np.einsum("achw,bchw->abhw", X, X) / C
        for a in range(X.shape[0]):
            xz[a, a] = xx[a]
        return _State(xz, xx, xx, True)
    Z = np.asarray(Z, dtype=np.float64)
    zz = (Z * Z).sum(axis=1) / C
    xz = np.einsum("achw,bchw->abhw", X, Z) / C
    return _State(xz, xx, zz, False)


def kernel(arch, X, Z=None) -> np.ndarray:
    """``[N1, N2]`` kernel; with ``Z=None`` the same-set ``[N, N]`` kernel (exact diagonal)."""
    st = _apply(arch, _input_state(X, Z))
    if st.xz.shape[-2:] != (1, 1):
        raise ValueError(f"the architecture does not end in a 1x1 map (got {st.xz.shape[-2:]})")
    return st.xz[..., 0, 0]


def kernel_diag(arch, X) -> np.ndarray:
    """``[N]`` self values k(x_n, x_n), from the self terms only."""
    X = np.asarray(X, dtype=np.float64)
    C = X.shape[1]
    xx = (X * X).sum(axis=1) / C
    st = _apply(arch, _State(None, xx, xx, True))  # self terms only, no pair maps
    if st.xx.shape[-2:] != (1, 1):
        raise ValueError(f"the architecture does not end in a 1x1 map (got {st.xx.shape[-2:]})")
    return st.xx[:, 0, 0]


def output_size(arch, size: int) -> int:
    """Spatial size (square maps) after the architecture, for a square input of side ``size``."""
    kind = arch[0]
    if kind == "seq":
        for sub in arch[1]:
            size = output_size(sub, size)
        return size
    if kind == "conv":
        s = _full_spec(arch[1])
        return len(conv_taps_1d(size, s["k"], s["stride"], s["padding"], s["dilation"]))
    if kind == "relu":
        return size
    if kind == "sum":
        sizes = {output_size(b, size) for b in arch[1]}
        if len(sizes) != 1:
            raise ValueError("sum branches give different sizes")
        return sizes.pop()
    raise ValueError(f"unknown layer {arch!r}")
