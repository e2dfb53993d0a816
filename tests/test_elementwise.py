"""Elementwise(fn): Hermite-series kernels against closed forms, independent integration, the Erf layer's closed
form through whole networks (values and gradients at identical images), the terms the series keeps, positive
semi-definiteness at a crude truncation, and a Monte-Carlo check of ``.nn()``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import torch

from gpytorch_cnngp import AvgPool2d, Conv2d, Dense, Erf, GlobalAvgPool2d, ReLU, Sequential, gram
from gpytorch_cnngp.backends.base import Traces
from gpytorch_cnngp.layers.elementwise import Elementwise

F64 = torch.float64


def _points(n: int, seed: int, s_max: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    s1 = 0.05 + s_max * torch.rand(n, dtype=F64, generator=g)
    s2 = 0.05 + s_max * torch.rand(n, dtype=F64, generator=g)
    rho = 2 * torch.rand(n, dtype=F64, generator=g) - 1
    rho[:3] = torch.tensor([1.0, -1.0, 0.0], dtype=F64)  # identical, opposite, independent
    return rho * s1 * s2, s1, s2


def test_sin_against_its_closed_form():
    # E[sin u sin v] = exp(-(s1^2 + s2^2) / 2) sinh(c); E[sin^2 u] = (1 - exp(-2 v)) / 2
    layer = Elementwise(torch.sin)
    c, s1, s2 = _points(40, seed=0)
    want = torch.exp(-(s1**2 + s2**2) / 2) * torch.sinh(c)
    torch.testing.assert_close(layer.pair_map(c, s1, s2, False), want, rtol=1e-6, atol=1e-12)
    v = s1 * s1
    torch.testing.assert_close(layer.self_map(v, s1), (1 - torch.exp(-2 * v)) / 2, rtol=1e-6, atol=1e-12)


def _tanh_reference(c: float, s1: float, s2: float) -> float:
    """Nested adaptive integration: E[tanh(u) E[tanh(v) | u]], with v | u Gaussian (independent of Hermite rules)."""
    rho = c / (s1 * s2)
    sd = s2 * math.sqrt(max(1 - rho * rho, 0.0))

    def inner(u: float) -> float:
        mean = rho * s2 / s1 * u
        if sd < 1e-12:
            return math.tanh(mean)
        f = lambda v: math.tanh(v) * math.exp(-((v - mean) ** 2) / (2 * sd * sd))  # noqa: E731
        return scipy.integrate.quad(f, mean - 12 * sd, mean + 12 * sd, epsabs=1e-13)[0] / (sd * math.sqrt(2 * math.pi))

    g = lambda u: math.tanh(u) * inner(u) * math.exp(-u * u / (2 * s1 * s1))  # noqa: E731
    return scipy.integrate.quad(g, -12 * s1, 12 * s1, epsabs=1e-13, limit=200)[0] / (s1 * math.sqrt(2 * math.pi))


def test_tanh_against_independent_integration():
    # tanh's poles at +-i pi / 2 limit the Hermite rule at large variances (see the class docstring): standard
    # deviations up to 1 with the default 64 nodes
    layer = Elementwise(torch.tanh)
    c, s1, s2 = _points(6, seed=1, s_max=0.95)
    got = layer.pair_map(c, s1, s2, False)
    want = torch.tensor([_tanh_reference(*map(float, t)) for t in zip(c, s1, s2, strict=True)], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def _net(nonlinearity) -> Sequential:
    return Sequential(Conv2d(3, var_weight=1.7, var_bias=0.2), nonlinearity, Conv2d(3), nonlinearity, Dense())


def test_erf_through_a_network_equals_the_closed_form_layer():
    x = torch.rand(4, 2, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    z = torch.cat([x[:2], torch.zeros(1, 2, 8, 8, dtype=F64)])  # shared images and a black one
    quad, closed = _net(Elementwise(torch.erf)), _net(Erf())
    # erf is entire: the default rule is accurate to about 1e-13 here
    torch.testing.assert_close(gram(quad, x), gram(closed, x), rtol=1e-10, atol=0.0)
    torch.testing.assert_close(gram(quad, x, z), gram(closed, x, z), rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(quad(x, diag=True), closed(x, diag=True), rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("pooled", [False, True], ids=["same-location", "pooled"])
def test_tiles_that_share_their_series_equal_the_closed_form(pooled):
    """Many tiles read each image's coefficients from one computation (kept across tiles, placed per offset on a
    pooled network's offset maps); the NNGP and the NTK equal the closed form's, float64."""
    g = torch.Generator().manual_seed(8)
    x, z = torch.rand(11, 2, 7, 7, dtype=F64, generator=g), torch.rand(9, 2, 7, 7, dtype=F64, generator=g)

    def net(phi):
        if pooled:  # offsets clipped at the borders, a pool that does not divide the map, then every offset
            return Sequential(Conv2d(3, var_weight=1.7, var_bias=0.2), phi, AvgPool2d(2), Conv2d(3), phi,
                              GlobalAvgPool2d(), Dense())  # fmt: skip
        return _net(phi)

    quad, closed = net(Elementwise(torch.erf)), net(Erf())
    for args in ((x, z), (x,)):
        got = gram(quad, *args, tile_size=4, get=("nngp", "ntk"), backend="eager")
        want = gram(closed, *args, tile_size=4, get=("nngp", "ntk"), backend="eager")
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=0.0)


def test_each_images_series_is_computed_once_per_call(monkeypatch):
    """Each image's coefficients once per call where memory allows: the first set's once per row of tiles, the
    second set's kept across rows; in K(X, X) a range's series serves it as rows and as columns alike."""
    calls = []
    sides = Elementwise._sides

    def counted(self, s, orders):
        calls.append((orders, s.shape))
        return sides(self, s, orders)

    monkeypatch.setattr(Elementwise, "_sides", counted)
    g = torch.Generator().manual_seed(9)
    x, z = torch.rand(12, 1, 5, 5, dtype=F64, generator=g), torch.rand(8, 1, 5, 5, dtype=F64, generator=g)
    model = Sequential(Conv2d(3), Elementwise(torch.tanh, degree=16), Conv2d(3), ReLU(), Dense())
    gram(model, x, z, tile_size=4, backend="eager", get=("nngp", "ntk"))
    # 3 ranges of rows and 2 of columns (each side's deviations [h, w, n], unshaped), the NNGP's series (order 0)
    # with the NTK's (order 1); nothing in the self pass of a same-location network
    assert calls == [((0, 1), (5, 5, 4))] * 5
    calls.clear()
    gram(model, x, tile_size=4, backend="eager")  # 6 tiles on and above the diagonal, 3 ranges
    assert calls == [((0,), (5, 5, 4))] * 3


def test_traces_keep_their_memos_within_their_bytes():
    traces = [torch.zeros(2, 2, 15, dtype=F64)]
    kept, bounded = Traces(traces, keep_bytes=1 << 20), Traces(traces, keep_bytes=0)
    for terms in (kept, bounded):
        terms.columns(0, 5).memo["series"] = torch.ones(1000, dtype=F64)  # 8,000 bytes
        assert [t.shape[-1] for t in terms.columns(5, 10)] == [5]
    assert "series" in kept.columns(0, 5).memo  # kept: within its bytes
    assert "series" not in bounded.columns(0, 5).memo  # dropped: over its bytes, only the newest stays
    # a row of tiles keeps its rows' memo, which its square tile's columns share, over the bytes too
    rows = bounded.rows(5, 10).memo
    rows["series"] = torch.ones(1000, dtype=F64)
    assert bounded.columns(5, 10).memo is rows
    assert "series" not in bounded.columns(10, 15).memo
    assert bounded.rows(5, 10).memo is rows and "series" in rows
    assert "series" not in bounded.rows(10, 15).memo


def test_gradients_at_identical_images_equal_the_closed_forms():
    x = torch.rand(3, 1, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    x = torch.cat([x, x[:1]])  # an image twice: correlation 1 between different rows
    grads = []
    for nonlinearity in (Elementwise(torch.erf), Erf()):
        model = _net(nonlinearity)
        conv = model.layers[0] if hasattr(model, "layers") else next(iter(model.children()))
        w = torch.tensor(1.7, dtype=F64, requires_grad=True)
        K = gram(model, x, hyper={conv: {"var_weight": w}})
        (g,) = torch.autograd.grad(K.sum(), w)
        grads.append(g)
    assert bool(torch.isfinite(grads[0]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=0.0)


def test_monte_carlo_of_the_finite_network():
    """Conv -> Elementwise(tanh) -> Dense: exact at any width (the tanh's input is Gaussian over the weights)."""
    from test_monte_carlo import check_against_kernel, make_inputs, sample_second_moments, second_moment_errors

    model = Sequential(Conv2d(3, var_weight=2.0, var_bias=0.1), Elementwise(torch.tanh), Dense(var_weight=1.5))
    x = make_inputs(in_channels=2, size=6)
    K = model(x)
    S = sample_second_moments(model, x, channels=8, n_networks=600, out_channels=32, seed=72)
    check_against_kernel(second_moment_errors(S, K), torch.zeros(4, 4, dtype=F64), "conv-tanh-dense")


@pytest.mark.parametrize(
    "fn, degree, message",
    [("tanh", 32, "callable"), (torch.tanh, 1, "degree"), (torch.tanh, True, "degree"), (torch.sum, 8, "shape")],
)
def test_bad_arguments_are_refused(fn, degree, message):
    with pytest.raises(ValueError, match=message):
        Elementwise(fn, degree=degree)


def test_polynomials_are_exact():
    # f(u) = u^2: E[u^2 v^2] = s1^2 s2^2 + 2 c^2 (Isserlis), exact for any degree >= 3
    layer = Elementwise(lambda t: t * t, degree=4)
    c, s1, s2 = _points(10, seed=4)
    torch.testing.assert_close(layer.pair_map(c, s1, s2, False), s1**2 * s2**2 + 2 * c**2, rtol=1e-12, atol=0.0)
    assert np.isclose(float(layer.self_map(torch.tensor(2.0, dtype=F64), torch.tensor(math.sqrt(2.0)))), 12.0)


def _all_terms(layer: Elementwise, c, s1, s2) -> torch.Tensor:
    """The series with every one of its ``degree`` terms, powers of rho taken one by one (no Horner, no dropping)."""
    a, b = layer._coefficients(s1, 0), layer._coefficients(s2, 0)
    rho = c / (s1 * s2)
    return sum(rho**k * a[k] * b[k] for k in range(layer.degree))


@pytest.mark.parametrize(
    "fn, kept",
    [
        (torch.tanh, lambda k: k % 2 == 1),  # odd: the even terms are zero
        (torch.cos, lambda k: k % 2 == 0),  # even: the odd terms are zero
        (lambda t: t * t, lambda k: k in (0, 2)),  # u^2 = 1 h_0 + sqrt(2) h_2 at unit variance
    ],
)
def test_the_terms_dropped_are_those_below_rounding(fn, kept):
    layer = Elementwise(fn, degree=24)
    c, s1, s2 = _points(50, seed=6, s_max=0.9)
    keep = layer._terms(layer._side(s1, 0), layer._side(s2, 0))
    assert all(kept(k) for k in keep) and keep, keep  # nothing that is zero is kept
    full = _all_terms(layer, c, s1, s2)
    got = layer.pair_map(c, s1, s2, False)
    assert float((got - full).abs().max()) <= 4e-16 * float(full.abs().max())


def test_a_crude_truncation_still_gives_a_positive_semidefinite_kernel():
    # each term rho^k a_k a_k is a kernel, and an image's own value keeps the whole sum: four terms of tanh at
    # large variances are far from the kernel (about 1e-2) and still positive semi-definite
    model = _net(Elementwise(torch.tanh, degree=4))
    x = 3 * torch.rand(12, 2, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(7))
    K = gram(model, x)
    assert float(torch.linalg.eigvalsh(K).min()) >= -1e-12 * float(K.diagonal().max())
    exact = gram(_net(Elementwise(torch.tanh, degree=96)), x)
    assert float((K - exact).abs().max()) > 1e-4 * float(exact.abs().max())  # the truncation is crude indeed


@pytest.mark.parametrize(
    "fn, vanish",
    [(torch.erf, "even"), (torch.cos, "odd"), (torch.nn.functional.softplus, None)],
    ids=["odd", "even", "neither"],
)
@pytest.mark.parametrize("degree", [64, 7], ids=["even degree", "odd degree (a node at 0)"])
def test_coefficients_of_an_odd_or_even_function_skip_the_vanishing_half(fn, vanish, degree):
    """The Hermite coefficients from the rule folded at its symmetric nodes, against the whole rule's matrix
    (written out here as its own sum over the nodes), float64; an odd or even function's other half exact zeros."""
    layer = Elementwise(fn, degree=degree)
    s = torch.rand(3, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2.0
    got = layer._coefficients(s, 0)
    x, M = layer._basis(s)
    values = fn(s.unsqueeze(-1) * x)
    want = torch.einsum("nk,...n->k...", M, values)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0.0, atol=1e-14 * scale)
    if vanish is not None:
        zero = got[0::2] if vanish == "even" else got[1::2]
        assert (zero == 0).all()
    else:
        assert (got[0::2] != 0).any() and (got[1::2] != 0).any()
    # the derivative's coefficients (the NTK's) have the other parity
    d = layer._coefficients(s, 1)
    if vanish is not None:
        assert ((d[1::2] if vanish == "even" else d[0::2]) == 0).all()
