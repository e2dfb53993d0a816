"""Erf and LeakyReLU: their Gaussian expectations against numerical quadrature, closed-form special
cases (LeakyReLU(0) is ReLU, LeakyReLU(1) the identity, Erf's small-variance limit), the independent
reference (tests/reference_full.py), gradients (finite at degenerate images, equal to central finite
differences) and argument errors.

Quadrature (all float64, independent of both library and reference):

* 2-D Gauss-Hermite (``numpy.polynomial.hermite_e.hermegauss``) of ``E[phi(u) phi(v)]`` with
  ``u = s1 g1``, ``v = s2 (rho g1 + sqrt(1 - rho^2) g2)``. For the smooth erf it converges
  exponentially: 160 nodes per axis reach ~3e-13 on this grid, so the bound is 1e-10. For the kinked
  LeakyReLU it converges only like 1/n (the kinks cut through the node grid): 160 nodes leave up to
  3.3e-3 of ``sqrt(v1 v2)``, so the bound there is 5e-3 of ``sqrt(v1 v2)``;
* therefore LeakyReLU is also checked against a piecewise Gauss-Legendre rule in polar coordinates:
  phi is positively homogeneous, so ``E = E[R^2] / (2 pi) * int phi(s1 cos t) phi(s2 (rho cos t +
  sqrt(1 - rho^2) sin t)) dt`` with ``E[R^2] = 2``; the integrand is a smooth trigonometric product
  between the kink angles, where the rule is split, and 40 nodes per piece give ~1e-15, bound 1e-12.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss
from reference_full import describe, kernel
from reference_helpers import entry_rel_err

from gpytorch_cnngp import GELU, AvgPool2d, Conv2d, Dense, Erf, GlobalAvgPool2d, LeakyReLU, ReLU, Sequential, Sum

F64 = torch.float64

erf = np.vectorize(math.erf)

VARIANCES = [0.0, 0.05, 0.7, 3.0]
RHOS = [-1.0, -0.999, -0.6, 0.0, 0.3, 0.95, 1.0]
SLOPES = [0.01, 0.2, -0.5, -1.0, 1.5]


def _gauss_hermite(phi, v1, v2, rho, n=160):
    g, w = hermegauss(n)
    w = w / w.sum()  # weights of the standard normal
    g1, g2 = np.meshgrid(g, g, indexing="ij")
    u = math.sqrt(v1) * g1
    v = math.sqrt(v2) * (rho * g1 + math.sqrt(max(1.0 - rho * rho, 0.0)) * g2)
    return float((np.outer(w, w) * phi(u) * phi(v)).sum())


def _polar_legendre(phi, v1, v2, rho, n=40):
    """(1 / pi) * integral over [0, 2 pi] of phi(s1 cos t) phi(s2 (rho cos t + r sin t)), split at kinks."""
    r = math.sqrt(max(1.0 - rho * rho, 0.0))
    cuts = [0.0, 2 * math.pi, math.pi / 2, 3 * math.pi / 2]
    cuts += [math.atan2(rho, -r) % (2 * math.pi), math.atan2(-rho, r) % (2 * math.pi)]
    cuts = sorted(set(cuts))
    x, w = leggauss(n)
    total = 0.0
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        t = (a + b) / 2 + (b - a) / 2 * x
        f = phi(math.sqrt(v1) * np.cos(t)) * phi(math.sqrt(v2) * (rho * np.cos(t) + r * np.sin(t)))
        total += (b - a) / 2 * float((w * f).sum())
    return total / math.pi


def _leaky(alpha):
    return lambda t: np.where(t > 0, t, alpha * t)


def _grid():
    """(v1, v2, rho) triples; rho is irrelevant (and taken as 0) where a variance is 0."""
    out = []
    for v1 in VARIANCES:
        for v2 in VARIANCES:
            for rho in RHOS if v1 > 0 and v2 > 0 else [0.0]:
                out.append((v1, v2, rho))
    return out


GRID = _grid()


def _images_for(grid):
    """Two-channel 1x1 images realising the input covariances: x = sqrt(2 v1) (1, 0) and
    z = sqrt(2 v2) (rho, sqrt(1 - rho^2)) give K0(x, x) = v1, K0(z, z) = v2, K0(x, z) = rho sqrt(v1 v2)."""
    x = np.zeros((len(grid), 2, 1, 1))
    z = np.zeros((len(grid), 2, 1, 1))
    for i, (v1, v2, rho) in enumerate(grid):
        x[i, :, 0, 0] = math.sqrt(2 * v1) * np.array([1.0, 0.0])
        z[i, :, 0, 0] = math.sqrt(2 * v2) * np.array([rho, math.sqrt(max(1 - rho * rho, 0.0))])
    return torch.from_numpy(x), torch.from_numpy(z)


def _one_layer(phi_layer):
    return Sequential(Conv2d(1, var_weight=1.0), phi_layer, Dense(var_weight=1.0, var_bias=0.0))


def _library_on_grid(phi_layer, grid):
    model = _one_layer(phi_layer)
    x, z = _images_for(grid)
    with torch.no_grad():
        pairs = model(x, z, diag=True).numpy()
        selfs = model(x, diag=True).numpy()
    return pairs, selfs


# ----------------------------------------------------------------------------------------------
# quadrature
# ----------------------------------------------------------------------------------------------
def test_erf_pairs_and_self_values_against_gauss_hermite():
    pairs, selfs = _library_on_grid(Erf(), GRID)
    for (v1, v2, rho), got in zip(GRID, pairs, strict=True):
        want = _gauss_hermite(erf, v1, v2, rho)
        assert abs(got - want) <= 1e-10, (v1, v2, rho, got, want)
    for (v1, _, _), got in zip(GRID, selfs, strict=True):
        want = _gauss_hermite(erf, v1, v1, 1.0)
        assert abs(got - want) <= 1e-10, (v1, got, want)


@pytest.mark.parametrize("alpha", SLOPES)
def test_leaky_relu_pairs_and_self_values_against_quadrature(alpha):
    pairs, selfs = _library_on_grid(LeakyReLU(alpha), GRID)
    phi = _leaky(alpha)
    for (v1, v2, rho), got in zip(GRID, pairs, strict=True):
        scale = math.sqrt(v1 * v2)
        if scale == 0.0:
            assert got == 0.0, (v1, v2, got)  # a zero-variance side is identically 0
            continue
        polar = _polar_legendre(phi, v1, v2, rho)
        assert abs(got - polar) <= 1e-12 * scale, (alpha, v1, v2, rho, got, polar)
        hermite = _gauss_hermite(phi, v1, v2, rho)
        assert abs(got - hermite) <= 5e-3 * scale, (alpha, v1, v2, rho, got, hermite)
    for (v1, _, _), got in zip(GRID, selfs, strict=True):
        # E[phi(u)^2] = E[u^2 (1 if u > 0 else alpha^2)] = v (1 + alpha^2) / 2, and by quadrature
        assert got == pytest.approx(v1 * (1 + alpha * alpha) / 2, rel=1e-14, abs=0.0)
        assert got == pytest.approx(_polar_legendre(phi, v1, v1, 1.0), rel=1e-12, abs=1e-300)


def test_quadrature_rules_agree_with_each_other():
    """The two rules used for LeakyReLU check each other on a smooth case (phi(u) = u: E = c)."""
    for v1, v2, rho in [(0.7, 3.0, 0.3), (0.05, 0.7, -0.6)]:
        c = rho * math.sqrt(v1 * v2)
        assert _polar_legendre(lambda t: t, v1, v2, rho) == pytest.approx(c, rel=1e-13)
        assert _gauss_hermite(lambda t: t, v1, v2, rho) == pytest.approx(c, rel=1e-12)


def test_reference_formulas_agree_with_quadrature():
    """The reference's closed forms are checked by the same quadrature (so both sides are anchored)."""
    from reference_full import erf_cov, leaky_relu_cov

    for v1, v2, rho in GRID:
        if v1 == 0 or v2 == 0:
            continue
        c = rho * math.sqrt(v1 * v2)
        assert abs(erf_cov(c, v1, v2) - _gauss_hermite(erf, v1, v2, rho)) <= 1e-10
        for alpha in (0.2, -1.0):
            want = _polar_legendre(_leaky(alpha), v1, v2, rho)
            assert abs(leaky_relu_cov(c, v1, v2, alpha) - want) <= 1e-12 * math.sqrt(v1 * v2)


# ----------------------------------------------------------------------------------------------
# closed-form special cases and the reference
# ----------------------------------------------------------------------------------------------
def _images(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g, dtype=F64)


def _net(nonlinearity, pooled: bool):
    layers = [Conv2d(3, var_weight=2.0, var_bias=0.1), copy.deepcopy(nonlinearity)]
    layers += [AvgPool2d(2)] if pooled else [Conv2d(2, stride=2, var_weight=1.5)]
    layers += [Conv2d(3, var_weight=1.7, var_bias=0.2), copy.deepcopy(nonlinearity)]
    layers += [GlobalAvgPool2d(), Dense(1.2, 0.1)] if pooled else [Conv2d(3, padding=0, var_weight=1.2)]
    return Sequential(*layers)


def _all_kernels(model, x, z):
    with torch.no_grad():
        return [model(x), model(x, z), model(x, diag=True), model(x, z[: len(x)], diag=True)]


@pytest.mark.parametrize("pooled", [False, True], ids=["positionwise", "pooled"])
def test_leaky_relu_zero_slope_is_relu(pooled):
    x, z = _images(3, 2, 6, seed=1), _images(4, 2, 6, seed=2)
    got = _all_kernels(_net(LeakyReLU(0.0), pooled), x, z)
    want = _all_kernels(_net(ReLU(), pooled), x, z)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("pooled", [False, True], ids=["positionwise", "pooled"])
def test_leaky_relu_unit_slope_is_identity(pooled):
    """LeakyReLU(1) is u -> u: the kernel of the network without it (a Sequential() in its place)."""
    x, z = _images(3, 2, 6, seed=3), _images(4, 2, 6, seed=4)
    got = _all_kernels(_net(LeakyReLU(1.0), pooled), x, z)
    want = _all_kernels(_net(Sequential(), pooled), x, z)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)


def test_leaky_relu_minus_one_is_abs_closed_form():
    """LeakyReLU(-1) is |u|: E|u||v| = (2 / pi) (sqrt(v1 v2 - c^2) + c arcsin(c / sqrt(v1 v2)))."""
    x, z = _images_for([(0.7, 2.0, 0.3), (1.5, 0.2, -0.8)])
    with torch.no_grad():
        got = _one_layer(LeakyReLU(-1.0))(x, z, diag=True).numpy()
    for g, (v1, v2, rho) in zip(got, [(0.7, 2.0, 0.3), (1.5, 0.2, -0.8)], strict=True):
        c = rho * math.sqrt(v1 * v2)
        want = 2 / math.pi * (math.sqrt(v1 * v2 - c * c) + c * math.asin(rho))
        assert g == pytest.approx(want, rel=1e-13)


def test_erf_small_variance_limit():
    """erf(u) = (2 / sqrt(pi)) u + O(u^3): at tiny scale the kernel is (4 / pi) times the linear one."""
    x, z = _images(3, 2, 6, seed=5) * 1e-5, _images(2, 2, 6, seed=6) * 1e-5
    erf_net = Sequential(Conv2d(3, var_weight=2.0), Erf(), Conv2d(6, padding=0))
    linear = Sequential(Conv2d(3, var_weight=2.0), Conv2d(6, padding=0))
    with torch.no_grad():
        ratio = erf_net(x, z) / linear(x, z)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 4 / math.pi), rtol=1e-8, atol=0.0)


def test_erf_exact_self_values_on_identical_images():
    """Same-set diagonal is the self value (2 / pi) arcsin(2 v / (1 + 2 v)) for a 1x1 image."""
    x = torch.tensor([0.3, 1.7, 0.3], dtype=F64).reshape(3, 1, 1, 1)  # images 0 and 2 identical
    with torch.no_grad():
        K = _one_layer(Erf())(x)
    v = x.reshape(3) ** 2
    want = 2 / math.pi * torch.asin(2 * v / (1 + 2 * v))
    torch.testing.assert_close(K.diagonal(), want, rtol=1e-14, atol=0.0)
    # two distinct but identical images are an ordinary pair (rho = 1), equal to the self value up to rounding
    assert float(K[0, 2]) == pytest.approx(float(K[0, 0]), rel=1e-14)


def test_nonlinearities_positionwise_path_against_reference():
    """No pooling: Erf / LeakyReLU in a conv net with a conv readout (the per-position path) and with
    a Dense readout; the reference computes the full covariance regardless."""
    body = Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        Erf(),
        Sum([Sequential(), Sequential(Conv2d(3, var_weight=1.5, var_bias=0.2), LeakyReLU(-0.3))]),
        LeakyReLU(0.1),
        Conv2d(2, stride=2, var_weight=1.7),
        Erf(),
    )
    x, z = _images(4, 2, 7, seed=7), _images(3, 2, 7, seed=8)
    for model in (Sequential(body, Conv2d(4, padding=0, var_weight=1.3)), Sequential(body, Dense(1.3, 0.2))):
        arch = describe(model)
        with torch.no_grad():
            assert entry_rel_err(model(x, z).numpy(), kernel(arch, x.numpy(), z.numpy())) <= 1e-10
            assert entry_rel_err(model(x).numpy(), kernel(arch, x.numpy())) <= 1e-10


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooled", [False, True], ids=["positionwise", "pooled"])
@pytest.mark.parametrize("name", ["erf", "leaky", "gelu"])
@pytest.mark.parametrize("zero_bias", [False, True], ids=["bias", "no_bias"])
def test_gradients_finite_on_degenerate_images(name, pooled, zero_bias):
    model = _net({"erf": Erf(), "leaky": LeakyReLU(0.2), "gelu": GELU()}[name], pooled)
    leaves = []
    for layer in model.kernel_layers():
        if isinstance(layer, (Conv2d, Dense)):
            w = torch.tensor(1.5, dtype=F64, requires_grad=True)
            b = torch.tensor(0.0 if zero_bias else 0.3, dtype=F64, requires_grad=True)
            layer.var_weight, layer.var_bias = w, b
            leaves += [w, b]
    a = _images(1, 2, 6, seed=9)[0]
    zero = torch.zeros_like(a)
    for images in (torch.stack([a, a]), torch.stack([zero, zero]), torch.stack([zero, a, 2 * a, a])):
        x = images.clone().requires_grad_(True)
        for out in (model(x), model(x, x), model(x, diag=True), model(x, x, diag=True)):
            assert torch.isfinite(out).all()
            for g in torch.autograd.grad(out.sum(), [x, *leaves], allow_unused=True):
                assert g is None or torch.isfinite(g).all()


def _erf_pooled_net():
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        Erf(),
        AvgPool2d(3, stride=1, padding=1),
        Conv2d(3, stride=2, var_weight=1.5, var_bias=0.2),
        LeakyReLU(0.2),
        GlobalAvgPool2d(),
        Dense(var_weight=1.3, var_bias=0.1),
    )


@pytest.mark.parametrize("kind", ["same", "cross", "diag"])
def test_erf_net_hyperparameter_gradients_match_finite_differences(kind):
    model = _erf_pooled_net()
    layers = [layer for layer in model.kernel_layers() if isinstance(layer, (Conv2d, Dense))]
    leaves = []
    for layer in layers:
        for name in ("var_weight", "var_bias"):
            leaf = getattr(layer, name).detach().to(F64).clone().requires_grad_(True)
            setattr(layer, name, leaf)
            leaves.append((layer, name, leaf))
    x, z = _images(3, 1, 6, seed=10), _images(2, 1, 6, seed=11)
    weights = 0.5 + _images(1, 1, 3, seed=12).reshape(3, 3)

    def loss():
        if kind == "same":
            return (model(x) * weights).sum()
        if kind == "cross":
            return (model(x, z) * weights[:, :2]).sum()
        return (model(x, diag=True) * weights[0]).sum()

    grads = torch.autograd.grad(loss(), [leaf for _, _, leaf in leaves])
    for (layer, name, leaf), g in zip(leaves, grads, strict=True):
        p = leaf.item()
        h = 1e-5 * p
        values = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                setattr(layer, name, torch.tensor(p + sign * h, dtype=F64))
                values.append(float(loss()))
        setattr(layer, name, leaf)
        fd = (values[0] - values[1]) / (2 * h)
        assert float(g) == pytest.approx(fd, rel=1e-6, abs=1e-9 * abs(float(loss().detach())) / p), (layer, name)


def test_erf_net_input_gradients_match_finite_differences():
    model = _erf_pooled_net()
    x, z = _images(3, 1, 6, seed=13), _images(2, 1, 6, seed=14)
    g = torch.Generator().manual_seed(15)
    for kernel_fn in (lambda t: model(t), lambda t: model(t, z), lambda t: model(t, diag=True)):
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(kernel_fn(leaf).sum(), leaf)
        v = torch.randn(x.shape, generator=g, dtype=F64)
        h = 1e-6
        with torch.no_grad():
            fd = (float(kernel_fn(x + h * v).sum()) - float(kernel_fn(x - h * v).sum())) / (2 * h)
        assert float((grad * v).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-10)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [math.nan, math.inf, -math.inf, 0.1 + 0.2j, complex(0.1, 0.0)])
def test_leaky_relu_bad_slope(slope):
    with pytest.raises(ValueError, match="negative_slope"):
        LeakyReLU(slope)


def test_leaky_relu_accepts_real_numbers_and_tensors():
    for slope in (0, 1, -2.5, np.float64(0.3)):
        assert float(LeakyReLU(slope).negative_slope) == pytest.approx(float(slope))
    assert float(LeakyReLU().negative_slope) == 0.01


# ----------------------------------------------------------------------------------------------
# GELU
# ----------------------------------------------------------------------------------------------
def _gelu(t):
    return t * 0.5 * (1.0 + erf(t / math.sqrt(2.0)))


def test_gelu_pairs_and_self_values_against_gauss_hermite():
    """GELU is smooth, so 2-D Gauss-Hermite converges fast: the closed form agrees to 1e-10 absolute."""
    pairs, selfs = _library_on_grid(GELU(), GRID)
    for (v1, v2, rho), got in zip(GRID, pairs, strict=True):
        want = _gauss_hermite(_gelu, v1, v2, rho)
        assert abs(got - want) <= 1e-10, (v1, v2, rho, got, want)
    for (v1, _, _), got in zip(GRID, selfs, strict=True):
        want = _gauss_hermite(_gelu, v1, v1, 1.0)
        assert abs(got - want) <= 1e-10, (v1, got, want)


def test_gelu_limits():
    """Small variances: GELU(u) ~ u / 2, so E ~ c / 4; large ones: GELU ~ ReLU, so E ~ the ReLU kernel."""
    x, z = _images(3, 2, 4, seed=3), _images(2, 2, 4, seed=4)
    for scale, other, rtol in ((1e-6, None, 1e-5), (1e6, ReLU(), 1e-5)):
        g = Sequential(Conv2d(3, var_weight=scale), GELU(), Dense())(x, z)
        if other is None:
            ref = Sequential(Conv2d(3, var_weight=scale), Dense(var_weight=0.25))(x, z)
        else:
            ref = Sequential(Conv2d(3, var_weight=scale), other, Dense())(x, z)
        assert entry_rel_err(g.numpy(), ref.numpy()) < rtol


def test_gelu_monte_carlo_exact_at_any_width():
    """Conv -> GELU -> Dense: the GELU's input is exactly Gaussian over random weights, so E[f f'] equals the
    kernel at any width; every entry within 4 Monte-Carlo standard errors (no allowance)."""
    from test_monte_carlo import check_against_kernel, make_inputs, sample_second_moments, second_moment_errors

    model = Sequential(Conv2d(3, var_weight=2.0, var_bias=0.1), GELU(), Dense(var_weight=1.5, var_bias=0.05))
    x = make_inputs(in_channels=2, size=6)
    K = model(x)
    S = sample_second_moments(model, x, channels=8, n_networks=600, out_channels=32, seed=71)
    check_against_kernel(second_moment_errors(S, K), torch.zeros(4, 4, dtype=F64), "conv-gelu-dense")


# GELU's NTK factor E[phi'(u) phi'(v)], phi'(x) = Phi(x) + x pdf(x), against a one-dimensional float64 integral:
# given u = s1 x, v is N(rho s2 x, tau^2) with tau^2 = v2 (1 - rho^2), and E[Phi(w) + w pdf(w)] over w ~ N(m, tau^2)
# is Phi(m / k) + m pdf(m / k) / k^3 with k = sqrt(1 + tau^2) (one-dimensional Gaussian identities), leaving an
# adaptive integral over x, split where the integrand turns (scales 1 / s1 and k / (rho s2)); ~1e-15 accurate.
def _gelu_prime_reference(v1: float, v2: float, rho: float) -> float:
    from scipy.integrate import IntegrationWarning, quad

    s1, s2 = math.sqrt(v1), math.sqrt(v2)
    k = math.sqrt(1.0 + v2 * (1.0 - rho * rho))

    def cdf(t):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))

    def pdf(t):
        return math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)

    def f(x):
        u, m = s1 * x, rho * s2 * x
        return (cdf(u) + u * pdf(u)) * (cdf(m / k) + m / k**3 * pdf(m / k)) * pdf(x)

    cuts = {0.0, 40.0}
    for scale in (s1, abs(rho) * s2 / k):
        if scale > 0:
            cuts |= {min(t / scale, 40.0) for t in (0.1, 1.0, 4.0, 10.0)}
    cuts = sorted(cuts)
    cuts = [-t for t in reversed(cuts[1:])] + cuts
    with warnings.catch_warnings():  # quad asks for 2e-14 and may report that rounding stops it short of that
        warnings.simplefilter("ignore", IntegrationWarning)
        return sum(
            quad(f, a, b, epsabs=1e-16, epsrel=2e-14, limit=200)[0] for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        )


def _gelu_factor(c, v1, v2, dtype=F64):
    s1, s2 = torch.tensor(v1, dtype=dtype).sqrt(), torch.tensor(v2, dtype=dtype).sqrt()
    return GELU().pair_derivative_map(torch.as_tensor(c, dtype=dtype), s1, s2, False)


GELU_VARIANCES = [0.0, 1e-12, 1e-3, 0.5, 2.0, 30.0, 1e4]
GELU_RHOS = [-1.0, -1.0 + 1e-9, -0.7, 0.0, 0.4, 1.0 - 1e-9, 1.0]


def test_gelu_ntk_factor_against_a_one_dimensional_integral():
    """Zero, tiny, moderate and huge variances, |rho| -> 1: within 1e-12 relative (plus 1e-14 absolute where the
    terms of order 1 cancel to a small value); self values likewise."""
    for v1 in GELU_VARIANCES:
        for v2 in [*GELU_VARIANCES, 1e6]:
            for rho in GELU_RHOS:
                c = rho * math.sqrt(v1) * math.sqrt(v2)
                got, want = float(_gelu_factor(c, v1, v2)), _gelu_prime_reference(v1, v2, rho)
                assert abs(got - want) <= 1e-12 * abs(want) + 1e-14, (v1, v2, rho, got, want)
        v = torch.tensor(v1, dtype=F64)
        own = float(GELU().self_derivative_map(v, v.sqrt()))
        assert own == pytest.approx(_gelu_prime_reference(v1, v1, 1.0), rel=1e-12, abs=1e-14)


def test_gelu_ntk_factor_equals_the_former_gauss_hermite_rule():
    """The 64 x 64-node product rule the layer used before (Elementwise's, with phi' by autograd) converges fast
    for variances up to about 1: the closed form matches it to 1e-12 relative there."""
    from gpytorch_cnngp import Elementwise

    rule = Elementwise(torch.nn.functional.gelu, degree=64)
    cases = [(v1, v2, r) for v1 in [0.0, 1e-12, 1e-3, 0.2, 1.0] for v2 in [0.0, 1e-6, 0.5, 1.0] for r in GELU_RHOS]
    v1, v2, rho = (torch.tensor(column, dtype=F64) for column in zip(*cases, strict=True))
    s1, s2 = v1.sqrt(), v2.sqrt()
    got = GELU().pair_derivative_map(rho * s1 * s2, s1, s2, False)
    torch.testing.assert_close(got, rule.expectation(rho * s1 * s2, s1, s2, 1), rtol=1e-12, atol=0.0)


def test_gelu_ntk_factor_special_values():
    """phi'(0) = 1/2, so zero variance on either side gives 1/4 (E[phi'(v)] = 1/2 for any v); E[phi'(u) phi'(-u)]
    at variance 0 is 1/4 too; large variances approach the ReLU's step, E[H(u)^2] = 1/2."""
    for v in [0.0, 1e-9, 0.3, 5.0, 1e8]:
        assert float(_gelu_factor(0.0, 0.0, v)) == pytest.approx(0.25, rel=1e-15)
        assert float(_gelu_factor(0.0, v, 0.0)) == pytest.approx(0.25, rel=1e-15)
    v = torch.tensor(1e12, dtype=F64)
    assert float(GELU().self_derivative_map(v, v.sqrt())) == pytest.approx(0.5, rel=1e-5)


def test_gelu_ntk_factor_against_monte_carlo():
    """2e6 samples of (u, v) per case: within 5 standard errors of the sample mean."""
    gen = torch.Generator().manual_seed(5)
    n = 2_000_000
    for v1, v2, rho in [(0.7, 2.0, 0.3), (3.0, 0.4, -0.8), (1.0, 1.0, 1.0), (9.0, 0.0, 0.0)]:
        g1, g2 = torch.randn(n, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
        u = math.sqrt(v1) * g1
        v = math.sqrt(v2) * (rho * g1 + math.sqrt(1.0 - rho * rho) * g2)

        def prime(t):
            return 0.5 * torch.erfc(-t / math.sqrt(2.0)) + t * torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)

        sample = prime(u) * prime(v)
        err = float(sample.std()) / math.sqrt(n)
        got = float(_gelu_factor(rho * math.sqrt(v1 * v2), v1, v2))
        assert abs(got - float(sample.mean())) <= 5.0 * err + 1e-15, (v1, v2, rho, got, float(sample.mean()), err)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_gelu_self_and_identical_pair_values_stay_exact_at_huge_variances(dtype):
    """Where r = v / (1 + v) rounds to 1 (from ~1.7e7 in float32, ~1e16 in float64), 1 - r^2 used to be floored
    at the smallest normal number: the NNGP came out 147 v at v = 1e8 in float32 and 1e113 v at 1e20 in float64.
    Now E[phi(u)^2] / v -> 1/2 and E[phi'(u)^2] -> 1/2, finite with finite gradients."""
    layer = GELU()
    rules = [
        lambda v: layer.self_map(v, v.sqrt()) / v,
        lambda v: layer.pair_map(v, v.sqrt(), v.sqrt(), False) / v,
        lambda v: layer.self_derivative_map(v, v.sqrt()),
        lambda v: layer.pair_derivative_map(v, v.sqrt(), v.sqrt(), False),
    ]
    for value in [1e6, 1e8, 1e12, 1e20]:
        for i, rule in enumerate(rules):
            v = torch.tensor(value, dtype=dtype, requires_grad=True)
            out = rule(v)
            assert float(out.detach()) == pytest.approx(0.5, rel=1e-3), (i, value, dtype)
            (grad,) = torch.autograd.grad(out, v)
            assert math.isfinite(float(grad)), (i, value, dtype)
