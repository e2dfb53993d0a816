"""An independent float64 NumPy reference for CNN-GP kernels on the *full spatial covariance*.

Written from the semantics document only, and formulated differently from both the library and
``tests/reference_impl.py`` (which tracks one number per position):

* the state is, for every pair of images, the full ``[HW, HW]`` covariance between every position of
  one image and every position of the other (``xz``), together with each image's own full covariance
  (``xx``, ``zz``);
* every linear layer is a set of explicit 0/1 *selection matrices* ``A_t`` ``[HW_out, HW_in]``, one per
  window tap ``t`` (a tap outside the image is a zero row: zero padding):

  - convolution:   ``K' = vb + vw / k^2 * sum_t A_t K A_t^T``   (the same tap on both sides)
  - average pool:  ``K' = B K B^T`` with ``B = (1 / k^2) sum_t A_t``  (independent taps on both sides)
  - global pool:   ``K' = mean over all (p, q) of K[p, q]``
  - dense readout: ``K' = vb + vw * mean over p of K[p, p]``

  the window geometry is that of :func:`reference_impl.conv_taps_1d` (asserted position by position);
* nonlinearities act entrywise on the full covariance with the variances taken from each image's own
  covariance diagonal; the exact-diagonal rule sets every same-position entry of an image's own
  covariance (and of an image with itself in a same-set kernel) to the self value after each one:

  - ReLU:          :func:`reference_impl.relu_cov` (``arctan2`` on variances)
  - LeakyReLU(a):  ``phi(u) = (1 + a) / 2 u + (1 - a) / 2 |u|``, so
    ``E = ((1 + a) / 2)^2 c + ((1 - a) / 2)^2 E|u||v|`` with
    ``E|u||v| = (2 / pi) (sqrt(v1 v2 - c^2) + c * arctan2(c, sqrt(v1 v2 - c^2)))``; self ``v (1 + a^2) / 2``
  - Erf:           ``(2 / pi) arcsin(2 c / sqrt((1 + 2 v1) (1 + 2 v2)))``; self ``(2 / pi) arcsin(2 v / (1 + 2 v))``
  - any other function ``fn`` (GELU, Elementwise): :func:`quadrature_cov`, a Gauss-Hermite product rule on the
    grid turned by the covariance's symmetric square root (the library turns it by the Cholesky factor)

Architectures are plain data::

    ("seq", [layer, ...])
    ("conv", {"k": 3, "stride": 1, "padding": "same" | int, "dilation": 1, "vw": 1.0, "vb": 0.0})
    ("relu",)   ("leaky_relu", alpha)   ("erf",)   ("fn", numpy_function)
    ("avgpool", {"k": 2, "stride": None, "padding": 0})     # stride None means k
    ("gap",)
    ("dense", {"vw": 1.0, "vb": 0.0})
    ("sum", [branch, ...])

Public functions: :func:`kernel` (``[N1, N2]``; ``Z=None`` is the same-set kernel with the exact
diagonal), :func:`kernel_diag` (``[N]``), :func:`output_size`, :func:`pool_matrix` and
:func:`tap_matrices`. :func:`describe` (the only part that knows the library) turns a gpytorch_cnngp
layer tree into this plain data by reading public attributes.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
from reference_impl import conv_taps_1d, relu_cov

__all__ = ["kernel", "kernel_diag", "output_size", "pool_matrix", "tap_matrices", "describe"]


# ----------------------------------------------------------------------------------------------
# geometry: tap-aligned windows and their selection matrices
# ----------------------------------------------------------------------------------------------
@cache
def aligned_taps_1d(n: int, k: int, stride: int, padding, dilation: int) -> tuple[tuple[int, ...], ...]:
    """``[n_out][k]``: the input index read by tap ``t`` of output ``i`` along one axis, ``-1`` off the image.

    Same geometry as :func:`reference_impl.conv_taps_1d` (checked here), but every tap keeps its slot,
    so that a pooling layer can pair tap ``t`` of one side with tap ``t'`` of the other.
    """
    if padding == "same":
        anchors = list(range(0, n, stride))
        offsets = [(t - (k - 1) // 2) * dilation for t in range(k)]
    else:
        n_out = (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        anchors = [i * stride - padding for i in range(max(n_out, 0))]
        offsets = [t * dilation for t in range(k)]
    table = tuple(tuple(a + o if 0 <= a + o < n else -1 for o in offsets) for a in anchors)
    expected = conv_taps_1d(n, k, stride, padding, dilation)  # raises when the window does not fit
    assert tuple(tuple(i for i in row if i >= 0) for row in table) == expected, (n, k, stride, padding, dilation)
    return table


@cache
def _tap_matrices(h: int, w: int, k: int, stride: int, padding, dilation: int):
    rows = aligned_taps_1d(h, k, stride, padding, dilation)
    cols = aligned_taps_1d(w, k, stride, padding, dilation)
    ho, wo = len(rows), len(cols)
    mats = []
    for ti in range(k):
        for tj in range(k):
            a = np.zeros((ho * wo, h * w))
            for i in range(ho):
                for j in range(wo):
                    r, c = rows[i][ti], cols[j][tj]
                    if r >= 0 and c >= 0:
                        a[i * wo + j, r * w + c] = 1.0
            mats.append(a)
    return ho, wo, tuple(mats)


def tap_matrices(h: int, w: int, k: int, stride: int = 1, padding="same", dilation: int = 1):
    """``(h_out, w_out, [A_t])``: one 0/1 ``[h_out * w_out, h * w]`` matrix per tap ``t`` of a k x k window
    (row-major positions ``p = i * W + j``)."""
    return _tap_matrices(h, w, k, stride, padding, dilation)


def pool_matrix(h: int, w: int, k: int, stride: int | None = None, padding: int = 0):
    """``(h_out, w_out, B)``: the averaging matrix of torch's ``AvgPool2d(k, stride, padding)`` with
    ``count_include_pad=True`` (padding taps count in the ``1 / k^2`` but read nothing)."""
    stride = k if stride is None else stride
    ho, wo, mats = tap_matrices(h, w, k, stride, padding, 1)
    return ho, wo, sum(mats) / (k * k)


# ----------------------------------------------------------------------------------------------
# pair and self expectations of the nonlinearities
# ----------------------------------------------------------------------------------------------
def _abs_cov(c, v1, v2):
    """E[|u| |v|] for centred Gaussians (variances v1, v2, covariance c); 0 where a variance is 0."""
    root = np.sqrt(np.maximum(v1 * v2 - c * c, 0.0))
    return (2.0 / math.pi) * (root + c * np.arctan2(c, root))


def leaky_relu_cov(c, v1, v2, alpha: float):
    """E[phi(u) phi(v)] for phi(u) = u (u > 0), alpha u (u <= 0), via phi = (1+a)/2 u + (1-a)/2 |u|."""
    return ((1.0 + alpha) / 2.0) ** 2 * c + ((1.0 - alpha) / 2.0) ** 2 * _abs_cov(c, v1, v2)


def erf_cov(c, v1, v2):
    """E[erf(u) erf(v)] for centred Gaussians (Williams 1997)."""
    return (2.0 / math.pi) * np.arcsin(2.0 * c / np.sqrt((1.0 + 2.0 * v1) * (1.0 + 2.0 * v2)))


def _sqrt_2x2(v1, v2, c):
    """The symmetric square root ``[[a, b], [b, d]]`` of ``[[v1, c], [c, v2]]`` (positive semi-definite), entrywise:
    ``sqrt(M) = (M + sqrt(det M) I) / sqrt(tr M + 2 sqrt(det M))``."""
    root_det = np.sqrt(np.maximum(v1 * v2 - c * c, 0.0))
    t = np.sqrt(v1 + v2 + 2.0 * root_det)
    safe = np.where(t > 0, t, 1.0)
    a = np.where(t > 0, (v1 + root_det) / safe, 0.0)
    d = np.where(t > 0, (v2 + root_det) / safe, 0.0)
    b = np.where(t > 0, c / safe, 0.0)
    return a, b, d


def quadrature_cov(fn, c, v1, v2, degree: int = 64):
    """``E[fn(u) fn(v)]`` over ``(u, v) ~ N(0, [[v1, c], [c, v2]])`` by a Gauss-Hermite product rule on the grid
    rotated and scaled by the covariance's *symmetric* square root (the library uses its Cholesky factor, in
    correlation form): ``(u, v) = sqrt(2) sqrt(M) (t_i, t_j)``. ``fn`` maps float64 arrays to arrays."""
    c, v1, v2 = np.broadcast_arrays(*(np.asarray(t, dtype=np.float64) for t in (c, v1, v2)))
    a, b, d = _sqrt_2x2(v1, v2, c)
    t, w = np.polynomial.hermite.hermgauss(degree)
    out = np.zeros(c.shape)
    root2 = math.sqrt(2.0)
    for ti, wi in zip(t, w, strict=True):
        u_part_a, v_part_b = a * ti, b * ti
        for tj, wj in zip(t, w, strict=True):
            u = root2 * (u_part_a + b * tj)
            v = root2 * (v_part_b + d * tj)
            out += (wi * wj) * fn(u) * fn(v)
    return out / math.pi


def quadrature_var(fn, v, degree: int = 120):
    """``E[fn(u)^2]`` for ``u ~ N(0, v)`` by a one-dimensional Gauss-Hermite rule."""
    t, w = np.polynomial.hermite.hermgauss(degree)
    s = np.sqrt(np.maximum(np.asarray(v, dtype=np.float64), 0.0))
    out = np.zeros(s.shape)
    for ti, wi in zip(t, w, strict=True):
        f = fn(math.sqrt(2.0) * ti * s)
        out += wi * f * f
    return out / math.sqrt(math.pi)


def relu_derivative_cov(c, v1, v2):
    """E[H(u) H(v)] (H the step function, H(0) = 0): the orthant probability ``(pi - theta) / (2 pi)``."""
    root = np.sqrt(np.maximum(v1 * v2 - c * c, 0.0))
    return np.where(v1 * v2 > 0, (math.pi - np.arctan2(root, c)) / (2.0 * math.pi), 0.0)


def leaky_relu_derivative_cov(c, v1, v2, alpha: float):
    """E[phi'(u) phi'(v)] with ``phi' = p + q sign(u)``, ``p, q = (1 +- alpha) / 2`` and ``sign(0) = -1`` (so
    ``phi'(0) = alpha``, as autograd has it), through ``E[sign u sign v] = (2 / pi) arcsin(rho)``."""
    p, q = (1.0 + alpha) / 2.0, (1.0 - alpha) / 2.0
    e1, e2 = np.where(v1 > 0, 0.0, -1.0), np.where(v2 > 0, 0.0, -1.0)
    both = (v1 > 0) & (v2 > 0)
    rho = np.where(both, c / np.sqrt(np.where(both, v1 * v2, 1.0)), 0.0)
    signs = np.where(both, (2.0 / math.pi) * np.arcsin(np.clip(rho, -1.0, 1.0)), -e1 - e2 - 1.0)
    return p * p + p * q * (e1 + e2) + q * q * signs


def erf_derivative_cov(c, v1, v2):
    """E[erf'(u) erf'(v)] = (4 / pi) det(I + 2 Sigma)^(-1/2)."""
    return (4.0 / math.pi) / np.sqrt((1.0 + 2.0 * v1) * (1.0 + 2.0 * v2) - 4.0 * c * c)


def _nonlinearity(layer):
    """(pair f(c, v1, v2), self g(v), and the same two for the derivative) of a nonlinearity layer."""
    kind = layer[0]
    if kind == "fn":  # any elementwise function (and its derivative), by quadrature
        fn, fprime = layer[1], layer[2]
        return (
            (lambda c, v1, v2: quadrature_cov(fn, c, v1, v2)),
            (lambda v: quadrature_var(fn, v)),
            (lambda c, v1, v2: quadrature_cov(fprime, c, v1, v2)),
            (lambda v: quadrature_var(fprime, v)),
        )
    if kind == "relu":
        return relu_cov, lambda v: v / 2.0, relu_derivative_cov, lambda v: np.where(v > 0, 0.5, 0.0)
    if kind == "leaky_relu":
        a = float(layer[1])
        return (
            (lambda c, v1, v2: leaky_relu_cov(c, v1, v2, a)),
            (lambda v: v * (1.0 + a * a) / 2.0),
            (lambda c, v1, v2: leaky_relu_derivative_cov(c, v1, v2, a)),
            (lambda v: leaky_relu_derivative_cov(v, v, v, a)),
        )
    if kind == "erf":
        return (
            erf_cov,
            lambda v: (2.0 / math.pi) * np.arcsin(2.0 * v / (1.0 + 2.0 * v)),
            erf_derivative_cov,
            lambda v: (4.0 / math.pi) / np.sqrt(1.0 + 4.0 * v),
        )
    return None


# ----------------------------------------------------------------------------------------------
# the state and its propagation
# ----------------------------------------------------------------------------------------------
class _State:
    """``xz`` [N1, N2, HW, HW] (or None), ``xx`` [N1, HW, HW], ``zz`` [N2, HW, HW], map shape ``hw``;
    ``same``: Z is X (then zz is xx, and xz[a, a] is image a with itself)."""

    def __init__(self, xz, xx, zz, hw, same, t=None):
        self.xz, self.xx, self.zz, self.hw, self.same = xz, xx, zz, hw, same
        self.t = t  # the neural tangent kernel's blocks, as a state of their own (None: not computed)

    def map(self, fn, hw):
        """Apply the same linear map ``fn`` to every covariance block (and every tangent block)."""
        xx = fn(self.xx)
        zz = xx if self.same else fn(self.zz)
        xz = None if self.xz is None else fn(self.xz)
        return _State(xz, xx, zz, hw, self.same, None if self.t is None else self.t.map(fn, hw))

    def combine(self, other, op):
        """Blockwise ``op(self, other)`` of two states of the same shape (tangent blocks dropped)."""
        xx = op(self.xx, other.xx)
        zz = xx if self.same else op(self.zz, other.zz)
        xz = None if self.xz is None else op(self.xz, other.xz)
        return _State(xz, xx, zz, self.hw, self.same)


def _with_tangent(new: _State, st: _State, linear) -> _State:
    """A weighted layer in the NTK parameterisation: ``Theta' = linear(Theta) + K'`` (``K'`` the new NNGP,
    bias included: the gradients of this layer's own weights and bias)."""
    if st.t is not None:
        new.t = st.t.map(linear, new.hw).combine(new, np.add)
    return new


def _diag_positions(m):
    """View of the same-position entries K[..., p, p]."""
    return np.einsum("...pp->...p", m)


def _apply_nonlinearity(f, g, df, dg, st: _State) -> _State:
    out = _expectations(f, g, st)
    if st.t is not None:  # Theta' = Theta * E[phi'(u) phi'(v)]
        out.t = st.t.combine(_expectations(df, dg, st), np.multiply)
    return out


def _expectations(f, g, st: _State) -> _State:
    def own(m):  # an image with itself, full [HW, HW]: pair formula, then self values on p == q
        v = _diag_positions(m).copy()
        out = f(m, v[..., :, None], v[..., None, :])
        idx = np.arange(m.shape[-1])
        out[..., idx, idx] = g(v)
        return out, v

    xx, vx = own(st.xx)
    zz, vz = (xx, vx) if st.same else own(st.zz)
    xz = None
    if st.xz is not None:
        xz = f(st.xz, vx[:, None, :, None], vz[None, :, None, :])
        if st.same:
            idx = np.arange(xz.shape[-1])
            for a in range(xz.shape[0]):  # exact diagonal: image a with itself, same position
                xz[a, a, idx, idx] = g(vx[a])
    return _State(xz, xx, zz, st.hw, st.same)


def _spec(spec: dict, defaults: dict) -> dict:
    out = dict(defaults)
    out.update(spec)
    return out


def _apply(layer, st: _State) -> _State:
    kind = layer[0]
    if kind == "seq":
        for sub in layer[1]:
            st = _apply(sub, st)
        return st
    if kind == "sum":
        outs = [_apply(branch, st) for branch in layer[1]]
        if len({o.hw for o in outs}) != 1:
            raise ValueError("sum branches give different shapes")
        total = outs[0]
        for o in outs[1:]:
            t = None if total.t is None else total.t.combine(o.t, np.add)
            total = total.combine(o, np.add)
            total.t = t
        return total
    if kind == "conv":
        s = _spec(layer[1], {"stride": 1, "padding": "same", "dilation": 1, "vw": 1.0, "vb": 0.0})
        k = s["k"]
        ho, wo, mats = tap_matrices(*st.hw, k, s["stride"], s["padding"], s["dilation"])

        def linear(m):
            return float(s["vw"]) / (k * k) * sum(a @ m @ a.T for a in mats)  # the same tap on both sides

        return _with_tangent(st.map(lambda m: float(s["vb"]) + linear(m), (ho, wo)), st, linear)
    if kind == "avgpool":
        s = _spec(layer[1], {"stride": None, "padding": 0})
        ho, wo, b = pool_matrix(*st.hw, s["k"], s["stride"], s["padding"])
        return st.map(lambda m: b @ m @ b.T, (ho, wo))  # independent taps on both sides
    if kind == "gap":
        return st.map(lambda m: m.mean(axis=(-2, -1))[..., None, None], (1, 1))
    if kind == "dense":
        s = _spec(layer[1], {"vw": 1.0, "vb": 0.0})

        def linear(m):
            return (float(s["vw"]) * _diag_positions(m).mean(axis=-1))[..., None, None]

        return _with_tangent(st.map(lambda m: float(s["vb"]) + linear(m), (1, 1)), st, linear)
    nl = _nonlinearity(layer)
    if nl is not None:
        return _apply_nonlinearity(*nl, st)
    raise ValueError(f"unknown layer {layer!r}")


def _own_covariance(X):
    n, c, h, w = X.shape
    flat = X.reshape(n, c, h * w)
    return np.einsum("ncp,ncq->npq", flat, flat) / c


def _zero_tangent(st: _State) -> _State:
    st.t = st.map(np.zeros_like, st.hw)  # the input has no parameters
    st.t.t = None
    return st


def kernel(arch, X, Z=None, ntk: bool = False) -> np.ndarray:
    """``[N1, N2]`` kernel; with ``Z=None`` the same-set ``[N, N]`` kernel (exact diagonal). ``ntk``: the neural
    tangent kernel (NTK parameterisation) instead of the NNGP."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 4:
        raise ValueError("inputs must be [N, C, H, W]")
    n1, c, h, w = X.shape
    fx = X.reshape(n1, c, h * w)
    xx = _own_covariance(X)
    if Z is None:
        xz = np.einsum("acp,bcq->abpq", fx, fx) / c
        for a in range(n1):
            xz[a, a] = xx[a]
        st = _State(xz, xx, xx, (h, w), True)
    else:
        Z = np.asarray(Z, dtype=np.float64)
        if Z.shape[1:] != X.shape[1:]:
            raise ValueError("X and Z must have the same C, H, W")
        fz = Z.reshape(Z.shape[0], c, h * w)
        st = _State(np.einsum("acp,bcq->abpq", fx, fz) / c, xx, _own_covariance(Z), (h, w), False)
    st = _apply(arch, _zero_tangent(st) if ntk else st)
    if st.hw != (1, 1):
        raise ValueError(f"the architecture does not end in a 1x1 map (got {st.hw})")
    return (st.t if ntk else st).xz[..., 0, 0]


def kernel_diag(arch, X, ntk: bool = False) -> np.ndarray:
    """``[N]`` self values k(x_n, x_n), from each image's own covariance only (``ntk``: of the NTK)."""
    X = np.asarray(X, dtype=np.float64)
    st = _State(None, _own_covariance(X), None, X.shape[2:], True)
    st = _apply(arch, _zero_tangent(st) if ntk else st)
    if st.hw != (1, 1):
        raise ValueError(f"the architecture does not end in a 1x1 map (got {st.hw})")
    return (st.t if ntk else st).xx[:, 0, 0]


def output_size(arch, size: int) -> int:
    """Spatial side after the architecture, for a square input of side ``size``."""
    kind = arch[0]
    if kind == "seq":
        for sub in arch[1]:
            size = output_size(sub, size)
        return size
    if kind == "sum":
        sizes = {output_size(b, size) for b in arch[1]}
        if len(sizes) != 1:
            raise ValueError("sum branches give different sizes")
        return sizes.pop()
    if kind == "conv":
        s = _spec(arch[1], {"stride": 1, "padding": "same", "dilation": 1})
        return len(aligned_taps_1d(size, s["k"], s["stride"], s["padding"], s["dilation"]))
    if kind == "avgpool":
        s = _spec(arch[1], {"stride": None, "padding": 0})
        return pool_matrix(size, size, s["k"], s["stride"], s["padding"])[0]
    if kind in ("gap", "dense"):
        return 1
    if _nonlinearity(arch) is not None:
        return size
    raise ValueError(f"unknown layer {arch!r}")


# ----------------------------------------------------------------------------------------------
# library layer tree -> plain data (public attributes only; the math above never sees the library)
# ----------------------------------------------------------------------------------------------
def describe(layer):
    """The plain-data description of a gpytorch_cnngp layer tree."""
    import gpytorch_cnngp as g

    if isinstance(layer, g.Sequential):
        return ("seq", [describe(sub) for sub in layer.layers])
    if isinstance(layer, g.Sum):
        return ("sum", [describe(branch) for branch in layer.branches])
    if isinstance(layer, g.LeakyReLU):
        return ("leaky_relu", float(layer.negative_slope))
    if isinstance(layer, g.ReLU):
        return ("relu",)
    if isinstance(layer, g.Erf):
        return ("erf",)
    if isinstance(layer, g.GELU):
        cdf = lambda u: 0.5 * (1.0 + _erf(u / math.sqrt(2.0)))  # noqa: E731
        pdf = lambda u: np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)  # noqa: E731
        return ("fn", lambda u: u * cdf(u), lambda u: cdf(u) + u * pdf(u))
    if isinstance(layer, g.Elementwise):
        fn = layer.fn
        return ("fn", lambda u: fn(torch.from_numpy(np.ascontiguousarray(u))).numpy(), lambda u: _autograd(fn, u))
    if isinstance(layer, g.Conv2d):
        return (
            "conv",
            {
                "k": layer.kernel_size,
                "stride": layer.stride,
                "padding": layer.padding,
                "dilation": layer.dilation,
                "vw": float(layer.var_weight),
                "vb": float(layer.var_bias),
            },
        )
    if isinstance(layer, g.AvgPool2d):
        return ("avgpool", {"k": layer.kernel_size, "stride": layer.stride, "padding": layer.padding})
    if isinstance(layer, g.GlobalAvgPool2d):
        return ("gap",)
    if isinstance(layer, g.Dense):
        return ("dense", {"vw": float(layer.var_weight), "vb": float(layer.var_bias)})
    raise TypeError(f"no reference description for {type(layer).__name__}")


def _autograd(fn, u):
    """``fn'(u)`` of a float64 array, by torch autograd (the derivative of the user's function only)."""
    t = torch.from_numpy(np.ascontiguousarray(u)).requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(t).sum(), t)
    return grad.numpy()


def _erf(u):
    """erf of a float64 array (torch only evaluates the function; the kernel math stays here)."""
    return torch.special.erf(torch.from_numpy(np.ascontiguousarray(u))).numpy()
