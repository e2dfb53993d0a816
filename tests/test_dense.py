"""The Dense readout: closed forms, equality with a full-size convolution readout, linearity in its
variances, central finite differences of its variances, a finite-network Monte-Carlo check, argument
errors and its hyperparameters in CNNGPKernel.

Expected values come from hand formulas, the independent reference (tests/reference_full.py), the
layer model of a hand-built equivalent architecture, or sampled finite networks.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from reference_full import describe, kernel, output_size
from reference_helpers import entry_rel_err
from test_monte_carlo import check_against_kernel, make_inputs, sample_second_moments, second_moment_errors

from gpytorch_cnngp import AvgPool2d, CNNGPKernel, Conv2d, Dense, Erf, GlobalAvgPool2d, LeakyReLU, ReLU, Sequential

F64 = torch.float64


def _images(n: int, c: int, size: int, seed: int, signed: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if signed:
        return torch.randn(n, c, size, size, generator=g, dtype=F64)
    return torch.rand(n, c, size, size, generator=g, dtype=F64)


# ----------------------------------------------------------------------------------------------
# closed forms
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c, size", [(1, 2), (3, 4), (2, 5)])
def test_dense_alone_is_mean_of_products(c, size):
    """Dense on the raw images: vb + vw * mean over channels and positions of x * z."""
    vw, vb = 1.7, 0.3
    x, z = _images(3, c, size, seed=1, signed=True), _images(2, c, size, seed=2, signed=True)
    model = Dense(var_weight=vw, var_bias=vb)
    want = vb + vw * torch.einsum("achw,bchw->ab", x, z) / (c * size * size)
    with torch.no_grad():
        torch.testing.assert_close(model(x, z), want, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(model(x), vb + vw * torch.einsum("achw,bchw->ab", x, x) / (c * size * size))
        torch.testing.assert_close(model(x, diag=True), vb + vw * (x * x).mean(dim=(1, 2, 3)))


def test_dense_after_relu_pairs_same_positions_only():
    """One channel: E[relu(x_p g) relu(z_p g)] = x_p z_p / 2 if x_p z_p > 0 else 0, averaged over the
    positions p (only same-position terms, unlike a global average pool)."""
    x = torch.tensor([[0.3, 1.2], [-0.7, 2.0]], dtype=F64)
    z = torch.tensor([[1.5, -0.4], [0.25, 0.9]], dtype=F64)
    vw, vb = 1.4, 0.2
    prod = (x * z).numpy().ravel()
    want = vb + vw * np.where(prod > 0, prod / 2, 0.0).mean()
    with torch.no_grad():
        got = float(Sequential(ReLU(), Dense(var_weight=vw, var_bias=vb))(x[None, None], z[None, None])[0, 0])
    assert got == pytest.approx(want, rel=1e-13)


# ----------------------------------------------------------------------------------------------
# Dense == Conv2d(kernel_size=H, padding=0) readout, and linearity in the variances
# ----------------------------------------------------------------------------------------------
def _bodies():
    return {
        "relu": (Sequential(Conv2d(3, var_weight=2.0, var_bias=0.1), ReLU(), Conv2d(3, stride=2), ReLU()), 8),
        "erf_leaky": (Sequential(Conv2d(4, var_weight=2.5), Erf(), Conv2d(3, var_weight=1.3), LeakyReLU(0.3)), 7),
        "pooled": (Sequential(Conv2d(3, var_weight=2.0), ReLU(), AvgPool2d(2), Conv2d(3, var_weight=1.5), Erf()), 8),
        "empty": (Sequential(), 5),
    }


@pytest.mark.parametrize("name", sorted(_bodies()))
def test_dense_equals_full_size_conv_readout(name):
    body, size = _bodies()[name]
    side = output_size(describe(body), size)
    dense = Sequential(copy.deepcopy(body), Dense(var_weight=1.3, var_bias=0.2))
    conv = Sequential(copy.deepcopy(body), Conv2d(side, padding=0, var_weight=1.3, var_bias=0.2))
    x, z = _images(3, 2, size, seed=3), _images(4, 2, size, seed=4)
    with torch.no_grad():
        for call in (lambda m: m(x), lambda m: m(x, z), lambda m: m(x, diag=True), lambda m: m(x, z[:3], diag=True)):
            torch.testing.assert_close(call(dense), call(conv), rtol=1e-12, atol=0.0)
        # and both are the reference
        assert entry_rel_err(dense(x, z).numpy(), kernel(describe(dense), x.numpy(), z.numpy())) <= 1e-10


def test_dense_is_affine_in_its_variances():
    body, size = _bodies()["pooled"]
    x, z = _images(3, 1, size, seed=5), _images(2, 1, size, seed=6)
    with torch.no_grad():
        unit = Sequential(copy.deepcopy(body), Dense(var_weight=1.0, var_bias=0.0))(x, z)
        got = Sequential(copy.deepcopy(body), Dense(var_weight=2.7, var_bias=0.45))(x, z)
    torch.testing.assert_close(got, 0.45 + 2.7 * unit, rtol=1e-13, atol=0.0)


# ----------------------------------------------------------------------------------------------
# gradients: central finite differences in float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["relu", "pooled"])
@pytest.mark.parametrize("kind", ["same", "cross", "diag"])
def test_dense_variance_gradients_match_finite_differences(name, kind):
    body, size = _bodies()[name]
    dense = Dense()
    model = Sequential(copy.deepcopy(body), dense)
    x, z = _images(3, 1, size, seed=7), _images(2, 1, size, seed=8)
    weights = 0.5 + _images(1, 1, 3, seed=9).reshape(3, 3)

    def loss():
        if kind == "same":
            return (model(x) * weights).sum()
        if kind == "cross":
            return (model(x, z) * weights[:, :2]).sum()
        return (model(x, diag=True) * weights[0]).sum()

    start = {"var_weight": 1.3, "var_bias": 0.2}
    leaves = {name_: torch.tensor(v, dtype=F64, requires_grad=True) for name_, v in start.items()}
    for name_, leaf in leaves.items():
        setattr(dense, name_, leaf)
    grads = dict(zip(leaves, torch.autograd.grad(loss(), list(leaves.values())), strict=True))
    for name_, p in start.items():
        h = 1e-5 * p
        values = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                setattr(dense, name_, torch.tensor(p + sign * h, dtype=F64))
                values.append(float(loss()))
        setattr(dense, name_, leaves[name_])
        fd = (values[0] - values[1]) / (2 * h)
        assert float(grads[name_]) == pytest.approx(fd, rel=1e-7), name_
    # the bias gradient is exactly the sum of the loss weights (d K / d vb = 1 entrywise)
    n_terms = {"same": weights, "cross": weights[:, :2], "diag": weights[0]}[kind]
    assert float(grads["var_bias"]) == pytest.approx(float(n_terms.sum()), rel=1e-13)


# ----------------------------------------------------------------------------------------------
# Monte-Carlo: a Dense readout after one nonlinearity is exact in expectation at any width
# ----------------------------------------------------------------------------------------------
def test_monte_carlo_dense_readout_exact_at_any_width():
    """Conv -> ReLU -> Dense: the ReLU's input is linear in the images (exactly Gaussian) and the Dense
    readout's weights (variance vw / (C H W)) are independent of it, so E[f f'] is the kernel exactly;
    every entry within 4 Monte-Carlo standard errors (see tests/test_monte_carlo.py), no allowance."""
    model = Sequential(Conv2d(3, var_weight=2.0 * 9, var_bias=0.1), ReLU(), Dense(var_weight=1.5, var_bias=0.05))
    x = make_inputs(in_channels=2, size=6)
    K = model(x)
    S = sample_second_moments(model, x, channels=8, n_networks=800, out_channels=32, seed=70)
    check_against_kernel(second_moment_errors(S, K), torch.zeros(4, 4, dtype=F64), "conv-relu-dense")
    # the finite readout is a linear layer with a bias: out_channels outputs per image
    net = model.nn(8, in_channels=2, out_channels=5, generator=torch.Generator().manual_seed(70))
    with torch.no_grad():
        assert tuple(net(x.float()).shape) == (4, 5)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["var_weight", "var_bias"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_dense_bad_variances(name, value):
    with pytest.raises(ValueError, match=name):
        Dense(**{name: value})
    layer = Dense()
    with pytest.raises(ValueError, match=name):
        setattr(layer, name, value)


def test_conv_after_dense_sees_one_pixel():
    """Dense ends in a 1x1 map; a convolution after it sees one pixel."""
    model = Sequential(Conv2d(3, var_weight=2.0), ReLU(), Dense(1.0, 0.1), Conv2d(1, var_weight=2.0, var_bias=0.3))
    x = _images(3, 1, 5, seed=10)
    with torch.no_grad():
        head = Sequential(Conv2d(3, var_weight=2.0), ReLU(), Dense(1.0, 0.1))(x)
        torch.testing.assert_close(model(x), 0.3 + 2.0 * head, rtol=1e-13, atol=0.0)


# ----------------------------------------------------------------------------------------------
# CNNGPKernel
# ----------------------------------------------------------------------------------------------
def _dense_net():
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        ReLU(),
        GlobalAvgPool2d(),
        Dense(var_weight=1.3, var_bias=0.2),
    )


def test_cnngp_kernel_dense_hyperparameters_are_learned():
    arch = _dense_net()
    module = CNNGPKernel(arch, input_shape=(1, 6, 6), tied=False).double()
    values = module.layer_variances()
    assert len(values) == 2 and values[1]["layer"].startswith("Dense"), values
    assert values[1]["var_weight"] == pytest.approx(1.3, rel=1e-6)
    assert values[1]["var_bias"] == pytest.approx(0.2, rel=1e-6)
    module.var_weight = torch.tensor([1.6, 0.9], dtype=F64)
    module.var_bias = torch.tensor([0.4, 0.05], dtype=F64)
    ref = Sequential(
        Conv2d(3, var_weight=1.6, var_bias=0.4), ReLU(), GlobalAvgPool2d(), Dense(var_weight=0.9, var_bias=0.05)
    )
    X = _images(4, 1, 6, seed=11)
    x = X.reshape(4, -1)
    with torch.no_grad():
        torch.testing.assert_close(module(x).to_dense(), ref(X), rtol=1e-12, atol=0.0)
    # the user's architecture is untouched
    assert float(arch[3].var_weight) == 1.3 and float(arch[3].var_bias) == 0.2
    # gradients reach the Dense variances; d K / d vb_dense = 1 entrywise, so d sum(K) / d vb = N^2
    module(x).to_dense().sum().backward()
    raw_b = module.raw_var_bias
    assert raw_b.grad is not None and bool((raw_b.grad != 0).all())
    assert bool((module.raw_var_weight.grad != 0).all())
    # through the positivity constraint's own transform: d/d raw = d/d value * d value / d raw
    r = raw_b.detach()[1].clone().requires_grad_(True)
    (dvalue_draw,) = torch.autograd.grad(module.raw_var_bias_constraint.transform(r), r)
    dense_bias_grad = float(raw_b.grad[1]) / float(dvalue_draw)
    assert dense_bias_grad == pytest.approx(16.0, rel=1e-10)


def test_cnngp_kernel_tied_reproduces_the_architecture():
    arch = _dense_net()
    module = CNNGPKernel(arch, input_shape=(1, 6, 6), tied=True).double()
    X = _images(4, 1, 6, seed=12)
    with torch.no_grad():
        torch.testing.assert_close(module(X.reshape(4, -1)).to_dense(), arch(X).to(F64), rtol=1e-6, atol=0.0)


def test_finite_dense_is_fixed_by_the_seed_and_built_eagerly_with_input_size():
    """The lazy Dense layer reserves its random numbers at build time, so a seed fixes the network even when
    the generator is used again before the first forward; with input_size the weights exist at once."""
    model = Sequential(Conv2d(3), ReLU(), Conv2d(3, stride=2), ReLU(), Dense(var_bias=0.5))
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(0)
    first = model.nn(4, generator=g)(x)
    g = torch.Generator().manual_seed(0)
    net = model.nn(4, generator=g)
    model.nn(4, generator=g)  # draws more numbers from g before net's first call
    assert torch.equal(net(x), first)

    eager = model.nn(4, out_channels=2, input_size=6)
    # 3x3 conv 1->4, 3x3 conv 4->4, then a 4*3*3 -> 2 linear layer with bias
    assert sum(p.numel() for p in eager.parameters()) == (9 * 4) + (9 * 4 * 4) + (36 * 2 + 2)
    assert eager(x).shape == (3, 2)
    with pytest.raises(ValueError, match="input_size"):
        model.nn(4, input_size=(0, 6))
    with pytest.raises(ValueError, match="does not fit"):
        Sequential(Conv2d(3, padding=0), ReLU(), Dense()).nn(4, input_size=2)
