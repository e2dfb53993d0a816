"""The ReLU layer against Gauss-Hermite quadrature of E[relu(u) relu(v)], (u, v) centred Gaussian.

Quadrature: a 2-D tensor-product Gauss-Hermite rule (``numpy.polynomial.hermite.hermgauss``, n = 360
nodes per axis, the largest n for which hermgauss is stable; float64) over whitened coordinates
``u = s1 a``, ``v = (c / s1) a + sqrt(v2 - c^2 / v1) b`` with a, b i.i.d. N(0, 1).

Tolerance. The integrand has kinks (along u = 0 and v = 0), so the rule converges only like 1/n, not
spectrally. Its error is largest at rho = 0, where the 2-D rule is the square of the 1-D rule for
E[relu(a)] = 1/sqrt(2 pi) and the error is known without any 2-D formula: 0.1311 / n * s1 s2
= 3.64e-4 * s1 s2 at n = 360 (checked by ``test_quadrature_error_bound_at_zero_correlation``; a sweep of
201 correlations over [-1, 1] found n * error <= 0.1311 everywhere, largest at rho = 0). We use

    |got - Q(360)| <= ATOL * s1 * s2,   ATOL = 5e-4   (~1.4 x the worst quadrature error).

This is loose for rounding but tight for the formula: a factor 2, a dropped sqrt(1 - rho^2) term or
arccos(-rho) for arccos(rho) move the value by >= 1e-2 * s1 s2 somewhere on the grid. For the float64
op we also check that the quadrature *converges towards* the library value: the error of Q(360) is at
most 0.8 x that of Q(180) (1/n convergence gives ~0.5; the sweep's worst ratio is 0.73), which a
constant formula error would break. Exactness to 1e-10 is checked against the float64 reference in
test_reference_agreement.py; this file checks that the closed form is the right expectation.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch

from gpytorch_cnngp import Conv2d, ReLU, Sequential, ops

ATOL = 5e-4
N_FINE, N_COARSE = 360, 180
VARIANCES = [0.3, 1.0, 2.2, 5.0]
CORRELATIONS = [-0.999999, -0.999, -0.99, -0.9, -0.5, -0.2, 0.0, 0.3, 0.6, 0.9, 0.99, 0.999, 0.999999]


@cache
def _rule(n: int):
    x, w = np.polynomial.hermite.hermgauss(n)
    # weight exp(-x^2) -> standard normal: nodes * sqrt(2), weights / sqrt(pi)
    return x * math.sqrt(2.0), w / math.sqrt(math.pi)


def _product_rule(v1: float, v2: float, c: float, n: int) -> float:
    x, w = _rule(n)
    a, b = x[:, None], x[None, :]
    s1 = math.sqrt(v1)
    l21 = c / s1
    l22 = math.sqrt(max(v2 - l21 * l21, 0.0))
    u = s1 * a
    v = l21 * a + l22 * b
    return float(np.sum((w[:, None] * w[None, :]) * np.maximum(u, 0.0) * np.maximum(v, 0.0)))


@cache
def quadrature(v1: float, v2: float, c: float, n: int = N_FINE) -> float:
    """E[relu(u) relu(v)] for Var u = v1, Var v = v2, Cov(u, v) = c, by the n x n Gauss-Hermite rule."""
    return _product_rule(v1, v2, c, n)


def _grid():
    cases = []
    for v1 in VARIANCES:
        for v2 in VARIANCES:
            for rho in CORRELATIONS:
                cases.append((v1, v2, rho * math.sqrt(v1 * v2)))
    return cases


GRID = _grid()


def test_quadrature_error_bound_at_zero_correlation():
    """The basis of ATOL: at rho = 0 the exact value is E[relu(a)]^2 = 1 / (2 pi), no 2-D formula needed."""
    x, w = _rule(N_FINE)
    one_d = float(np.sum(w * np.maximum(x, 0.0)))
    assert one_d**2 == pytest.approx(quadrature(1.0, 1.0, 0.0), rel=1e-12)
    err = quadrature(1.0, 1.0, 0.0) - 1.0 / (2.0 * math.pi)
    assert 0.13 / N_FINE < err < 0.132 / N_FINE < ATOL


def test_quadrature_sanity():
    """The quadrature itself: rho = 0 factorises, E[relu(u)^2] = v / 2, E[relu(u) relu(-u)] = 0."""
    for v1, v2 in [(0.3, 5.0), (1.0, 1.0), (2.2, 0.3)]:
        assert quadrature(v1, v2, 0.0) == pytest.approx(math.sqrt(v1 * v2) / (2 * math.pi), abs=ATOL)
        assert quadrature(v1, v1, v1) == pytest.approx(v1 / 2, abs=ATOL * v1)
        assert abs(quadrature(v1, v1, -v1)) <= ATOL * v1


def test_relu_expectation_op_against_quadrature():
    v1 = torch.tensor([g[0] for g in GRID], dtype=torch.float64)
    v2 = torch.tensor([g[1] for g in GRID], dtype=torch.float64)
    c = torch.tensor([g[2] for g in GRID], dtype=torch.float64)
    got = ops.relu_expectation(c, v1.sqrt(), v2.sqrt()).numpy()
    want = np.array([quadrature(*g) for g in GRID])
    scale = np.sqrt(v1.numpy() * v2.numpy())
    bad = np.abs(got - want) > ATOL * scale
    assert not bad.any(), [(GRID[i], got[i], want[i]) for i in np.flatnonzero(bad)[:5]]
    # the quadrature converges towards the library's values as n doubles
    coarse = np.array([quadrature(*g, n=N_COARSE) for g in GRID])
    slow = np.abs(got - want) > 0.8 * np.abs(got - coarse) + 1e-9 * scale
    assert not slow.any(), [(GRID[i], got[i], want[i], coarse[i]) for i in np.flatnonzero(slow)[:5]]


def test_relu_expectation_op_broadcasts():
    """A [3, 1] covariance against [1, 4]-shaped standard deviations gives a [3, 4] result."""
    s1 = torch.tensor([[0.7], [1.3], [2.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.5, 1.0, 1.7, 2.2]], dtype=torch.float64)
    rho = torch.tensor([[-0.4], [0.1], [0.8]], dtype=torch.float64)
    c = rho * s1 * s2
    got = ops.relu_expectation(c, s1, s2)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            want = quadrature(float(s1[i, 0]) ** 2, float(s2[0, j]) ** 2, float(c[i, j]))
            assert abs(float(got[i, j]) - want) <= ATOL * float(s1[i, 0] * s2[0, j])


@pytest.mark.parametrize("s1, s2", [(0.5, 2.0), (1.0, 1.0), (2.3, 0.7)])
def test_relu_expectation_at_perfect_correlation(s1, s2):
    """rho = +1: E = s1 s2 / 2; rho = -1: E = 0 (u and v never both positive)."""
    t1, t2 = torch.tensor(s1, dtype=torch.float64), torch.tensor(s2, dtype=torch.float64)
    plus = float(ops.relu_expectation(t1 * t2, t1, t2))
    minus = float(ops.relu_expectation(-t1 * t2, t1, t2))
    assert plus == pytest.approx(quadrature(s1**2, s2**2, s1 * s2), abs=ATOL * s1 * s2)
    assert plus == pytest.approx(s1 * s2 / 2, rel=1e-12)
    assert abs(minus) <= 1e-12 * s1 * s2


def test_relu_expectation_zero_variance():
    zero = torch.zeros(2, dtype=torch.float64)
    s = torch.tensor([0.0, 1.5], dtype=torch.float64)
    assert torch.equal(ops.relu_expectation(zero, s, torch.zeros(2, dtype=torch.float64)), zero)


# ----------------------------------------------------------------------------------------------
# the layer end to end: Sequential(Conv2d(1), ReLU(), Conv2d(1)) on 1x1 images
# ----------------------------------------------------------------------------------------------
# With two channels and 1x1 images the input kernel is K0(x, z) = (x_0 z_0 + x_1 z_1) / 2, so
#   x = sqrt(2 v1) (1, 0),   z = sqrt(2 v2) (rho, sqrt(1 - rho^2))
# give Var = v1, v2 and Cov = rho sqrt(v1 v2) exactly as the pre-activation covariance of the ReLU
# after Conv2d(1) with var_weight=1, var_bias=0. The last Conv2d(1) (var_weight=VW, var_bias=VB) maps
# E to VB + VW * E.
def _images(v, rho):
    v = np.asarray(v, dtype=np.float64)
    rho = np.asarray(rho, dtype=np.float64)
    img = np.stack([np.sqrt(2 * v) * rho, np.sqrt(2 * v) * np.sqrt(1 - rho**2)], axis=1)
    return torch.from_numpy(img[:, :, None, None])  # [N, 2, 1, 1]


def _model(vw=1.0, vb=0.0, first_vw=1.0, first_vb=0.0):
    return Sequential(Conv2d(1, var_weight=first_vw, var_bias=first_vb), ReLU(), Conv2d(1, var_weight=vw, var_bias=vb))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relu_layer_matched_pairs_against_quadrature(dtype):
    v1 = np.array([g[0] for g in GRID])
    v2 = np.array([g[1] for g in GRID])
    rho = np.array([g[2] for g in GRID]) / np.sqrt(v1 * v2)
    X = _images(v1, np.ones_like(v1)).to(dtype)  # x = sqrt(2 v1) (1, 0)
    Z = _images(v2, rho).to(dtype)
    vw, vb = 1.7, 0.2
    with torch.no_grad():
        got = _model(vw, vb)(X, Z, diag=True).double().numpy()
    want = vb + vw * np.array([quadrature(*g) for g in GRID])
    bad = np.abs(got - want) > vw * ATOL * np.sqrt(v1 * v2)
    assert not bad.any(), [(GRID[i], got[i], want[i]) for i in np.flatnonzero(bad)[:5]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relu_layer_blocks_against_quadrature(dtype):
    """K(X, Z), K(X, X) and the self values of a small set, every pair by quadrature."""
    xs = _images([0.3, 1.0, 2.2, 5.0], [1.0, 0.6, -0.3, -0.95]).to(dtype)
    zs = _images([0.7, 4.0, 1.5], [0.999, -0.999999, 0.0]).to(dtype)

    def cov(a, b):  # pre-activation covariance: channel mean of the products (on the dtype's values)
        return float((a.double() * b.double()).sum()) / 2

    def want(a, b):
        return quadrature(cov(a, a), cov(b, b), cov(a, b))

    model = _model()
    with torch.no_grad():
        Kxz = model(xs, zs).double().numpy()
        Kxx = model(xs).double().numpy()
        Kd = model(xs, diag=True).double().numpy()
    for i in range(len(xs)):
        vi = cov(xs[i], xs[i])
        assert Kd[i] == pytest.approx(vi / 2, rel=1e-6 if dtype == torch.float32 else 1e-14)
        assert Kxx[i, i] == pytest.approx(vi / 2, rel=1e-6 if dtype == torch.float32 else 1e-14)
        for j in range(len(zs)):
            tol = ATOL * math.sqrt(vi * cov(zs[j], zs[j]))
            assert abs(Kxz[i, j] - want(xs[i], zs[j])) <= tol, (i, j)
        for j in range(len(xs)):
            if j != i:
                tol = ATOL * math.sqrt(vi * cov(xs[j], xs[j]))
                assert abs(Kxx[i, j] - want(xs[i], xs[j])) <= tol, (i, j)


def test_relu_layer_with_bias_before_the_relu():
    """Conv2d(1, var_weight=2, var_bias=0.5) first: pre-activation Cov = 0.5 + 2 K0 (bias is shared)."""
    X = _images([0.4, 1.2], [1.0, 1.0])
    Z = _images([2.0, 0.8], [0.2, -0.7])
    with torch.no_grad():
        got = _model(first_vw=2.0, first_vb=0.5)(X, Z).numpy()
    for i in range(2):
        for j in range(2):
            k0 = lambda a, b: float((a * b).sum()) / 2  # noqa: E731
            v1 = 0.5 + 2 * k0(X[i], X[i])
            v2 = 0.5 + 2 * k0(Z[j], Z[j])
            c = 0.5 + 2 * k0(X[i], Z[j])
            assert abs(got[i, j] - quadrature(v1, v2, c)) <= ATOL * math.sqrt(v1 * v2)


# ----------------------------------------------------------------------------------------------
# the arccos-free form of the compiled path against a 40-digit evaluation of the textbook formula
# ----------------------------------------------------------------------------------------------
# ops.relu_expectation_poly writes J(rho) = pi max(rho, 0) + (1 - a)^(3/2) R(a), a = |rho|, with a
# fitted polynomial R. The reference evaluates s1 s2 (sqrt(1 - rho^2) + (pi - arccos rho) rho) / (2 pi)
# in mpmath at 40 digits for the exact (float64 or float32) inputs. Tolerance: rtol relative (float64
# 4e-15, a few ulp, the fit's own error being 1e-16; float32 1e-6, its fit being good to 1.8e-8) plus
# what the rounding of rho = c / (s1 s2) itself implies, |dE/drho| 8 eps = s1 s2 (pi - arccos rho) / (2 pi)
# 8 eps (and s1 s2 (16 eps)^(3/2) at rho = -1): near rho = -1, where E ~ (1 + rho)^(3/2) -> 0, no
# formula can beat that conditioning.


def _poly_cases(dtype):
    near = [10.0**-k for k in range(1, 16 if dtype == torch.float64 else 8)]
    rho = sorted({*np.linspace(-1.0, 1.0, 401).tolist(), *[1 - e for e in near], *[-1 + e for e in near]})
    s1 = torch.tensor([0.3, 1.0, 7.5], dtype=dtype)[:, None, None]
    s2 = torch.tensor([0.05, 1.0, 2.0], dtype=dtype)[None, :, None]
    rho_t = torch.tensor(rho, dtype=dtype)[None, None, :]
    c = rho_t * s1 * s2
    return c, s1, s2


def _mp_reference(c: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> np.ndarray:
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    c, s1, s2 = torch.broadcast_tensors(c.double(), s1.double(), s2.double())
    out = np.empty(c.shape)
    for idx in np.ndindex(*c.shape):
        cc, a, b = (mpmath.mpf(float(t[idx])) for t in (c, s1, s2))
        rho = max(min(cc / (a * b), mpmath.mpf(1)), mpmath.mpf(-1))  # rounding of c = rho s1 s2 may overshoot
        j = mpmath.sqrt(1 - rho * rho) + (mpmath.pi - mpmath.acos(rho)) * rho
        out[idx] = float(a * b * j / (2 * mpmath.pi))
    return out


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 4e-15), (torch.float32, 1e-6)])
def test_relu_expectation_poly_against_40_digit_reference(dtype, rtol):
    c, s1, s2 = _poly_cases(dtype)
    got = ops.relu_expectation_poly(c, s1, s2, 1.0 / s1, 1.0 / s2).double().numpy()
    want = _mp_reference(c, s1, s2)
    rho = (c / (s1 * s2)).double().clamp(-1, 1).numpy()
    scale = (s1 * s2).double().expand_as(c).numpy()
    slope = scale * (math.pi - np.arccos(rho)) / (2 * math.pi)
    err = np.abs(got - want)
    eps = torch.finfo(dtype).eps
    # (at rho = -1 the slope vanishes and a rounding of rho by d moves E by about s1 s2 d^(3/2))
    bad = err > rtol * np.abs(want) + slope * 8 * eps + scale * (16 * eps) ** 1.5
    assert not bad.any(), (rho[bad][:5], got[bad][:5], want[bad][:5])


def test_relu_expectation_poly_zero_variance_and_identical_images():
    s = torch.tensor([0.0, 1.5, 3.0], dtype=torch.float64)
    inv = ops.inverse_std(s)
    nothing = torch.zeros(3, dtype=torch.float64)  # a black image: zero variance, zero covariance
    assert torch.equal(ops.relu_expectation_poly(nothing, nothing, s, nothing, inv), nothing)
    same = ops.relu_expectation_poly(s * s, s, s, inv, inv)
    torch.testing.assert_close(same, s * s / 2, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize(
    "name, degree, max_err",
    [("_R_POLY32", 6, 1.9e-8), ("_R_POLY64", 16, 1.5e-16), ("_A_POLY32", 8, 2.7e-9), ("_A_POLY64", 16, 8.5e-16)],
)
def test_relu_poly_coefficients_are_the_documented_fit(name, degree, max_err):
    """The stored coefficients are the Chebyshev-node interpolants of tests/relu_poly_fit.py, whose
    error against a 40-digit R (or A) is as stated in ops (so a mistyped coefficient cannot hide)."""
    pytest.importorskip("mpmath")
    from relu_poly_fit import FUNCTIONS, fit, max_relative_error

    function = FUNCTIONS[name[1]]
    stored = getattr(ops, name)
    assert len(stored) == degree + 1
    np.testing.assert_allclose(stored, fit(degree, function), rtol=1e-12, atol=0.0)
    assert max_relative_error(list(stored), points=401, function=function) <= max_err


def test_relu_derivative_poly_equals_the_arccos_form():
    """(pi - arccos rho) / (2 pi) without arccos, over the whole range of rho, at zero variances and at rho = +-1."""
    gen = torch.Generator().manual_seed(3)
    s1 = torch.rand(4000, generator=gen, dtype=torch.float64) + 0.1
    s2 = torch.rand(4000, generator=gen, dtype=torch.float64) + 0.1
    rho = torch.cat([torch.linspace(-1, 1, 2001, dtype=torch.float64), torch.rand(1999, generator=gen) * 2 - 1])
    c = rho * s1 * s2
    s2[:5] = 0.0  # a black image: the factor is 0 (relu'(0) = 0)
    c[:5] = 0.0
    want = ops.relu_derivative_expectation(c, s1, s2)
    got = ops.relu_derivative_expectation_poly(c, ops.inverse_std(s1), ops.inverse_std(s2))
    torch.testing.assert_close(got, want, rtol=1e-14, atol=5e-15)
    assert torch.equal(want[:5], torch.zeros(5, dtype=torch.float64))
    # float32: the factor's slope 1 / (2 pi sqrt(1 - rho^2)) times a few roundings of rho, and at |rho| = 1,
    # where that slope is infinite, sqrt(2 eps) / (2 pi)
    eps = float(torch.finfo(torch.float32).eps)
    s1f, s2f = s1.float(), s2.float()
    got = ops.relu_derivative_expectation_poly(c.float(), ops.inverse_std(s1f), ops.inverse_std(s2f)).double()
    slope = 1.0 / (2 * math.pi * (1.0 - rho * rho).clamp_min(1e-300).sqrt())
    allowed = (4 * eps * slope).clamp_max((2 * eps) ** 0.5 / math.pi) + 2 * eps
    assert ((got - want).abs() <= allowed).all()
