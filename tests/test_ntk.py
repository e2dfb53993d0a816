"""The neural tangent kernel (``get="ntk"``): the argument, the backends, exact gradients at the edges, the
GPyTorch kernel, closed forms, and the empirical NTK of finite networks. Every layer's NTK is also checked
against the independent float64 reference by the layer contract (tests/layer_contract.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference_full
import torch

from gpytorch_cnngp import (
    GELU,
    CNNGPKernel,
    Conv2d,
    Dense,
    Erf,
    GlobalAvgPool2d,
    LeakyReLU,
    ReLU,
    Sequential,
    gram,
    gram_diag,
)
from gpytorch_cnngp.backends import native

F64 = torch.float64


def _images(n: int, seed: int, size: int = 6, channels: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _edge_images() -> torch.Tensor:
    """Two identical images, a black one and a plain one: correlation 1 and zero variances inside the network."""
    x = _images(4, seed=1)
    x[1] = x[0]
    x[2] = 0.0
    return x


def test_get_is_checked_and_both_come_from_one_pass():
    model = Sequential(Conv2d(3, var_weight=2.0), ReLU(), Dense())
    x = _images(3, seed=0)
    for bad in ("ntks", ("nngp", "cov"), (), 3):
        with pytest.raises(ValueError, match="get must be 'nngp', 'ntk' or a tuple of them"):
            gram(model, x, get=bad)
    both = gram(model, x, get=("ntk", "nngp"))
    assert isinstance(both, tuple) and len(both) == 2
    torch.testing.assert_close(both[0], gram(model, x, get="ntk"), rtol=0, atol=0)
    torch.testing.assert_close(both[1], gram(model, x, backend="eager"), rtol=0, atol=0)
    assert gram(model, x[:0], get="ntk").shape == (0, 0)
    assert gram_diag(model, x[:0], get=("nngp", "ntk"))[1].shape == (0,)


def test_auto_runs_the_ntk_natively_and_it_equals_eager(monkeypatch):
    if native.load_library() is None:  # pragma: no cover - no C++ compiler
        pytest.skip("the native kernel cannot be built here")
    model = Sequential(Conv2d(3, var_weight=2.0), LeakyReLU(0.2), Conv2d(3, var_bias=0.3), ReLU(), Dense())
    x, z = _images(20, seed=2), _images(9, seed=5)
    calls = []
    original = native.run_block
    monkeypatch.setattr(native, "run_block", lambda *a, **k: calls.append(k.get("ntk", a[8])) or original(*a, **k))
    got = gram(model, x, z, get=("nngp", "ntk"))  # 180 pairs: auto runs natively
    assert calls == [True]
    want = gram(model, x, z, get=("nngp", "ntk"), backend="eager")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0.0)


def test_a_single_weighted_layer_has_ntk_equal_to_its_nngp():
    # Theta of the first layer is its own K (the input has no parameters)
    model = Conv2d(6, padding=0, var_weight=1.7, var_bias=0.3)
    x, z = _images(4, seed=3), _images(3, seed=4)
    torch.testing.assert_close(gram(model, x, z, get="ntk"), gram(model, x, z), rtol=1e-14, atol=0.0)


def test_two_layer_relu_closed_form():
    """Dense readout of a ReLU of a dense layer: Theta = vw2 (K1 (pi - theta) / (2 pi)) + K2, with K1 the first
    layer's covariance: the textbook two-layer NTK, computed here by hand from the images."""
    vw1, vb1, vw2, vb2 = 1.5, 0.2, 2.0, 0.1
    model = Sequential(Conv2d(5, padding=0, var_weight=vw1, var_bias=vb1), ReLU(), Dense(var_weight=vw2, var_bias=vb2))
    x = _images(5, seed=5, size=5, channels=2)
    flat = x.flatten(1).numpy()
    k1 = vb1 + vw1 * flat @ flat.T / flat.shape[1]
    d = np.sqrt(np.diag(k1))
    rho = np.clip(k1 / np.outer(d, d), -1.0, 1.0)
    theta = np.arccos(rho)
    np.fill_diagonal(theta, 0.0)  # an image with itself: correlation exactly 1 (arccos of a rounded 1 is not 0)
    k2 = vb2 + vw2 * np.outer(d, d) * (np.sin(theta) + (math.pi - theta) * rho) / (2 * math.pi)
    ntk = vw2 * k1 * (math.pi - theta) / (2 * math.pi) + k2
    np.testing.assert_allclose(gram(model, x, get="ntk").numpy(), ntk, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "duplicates"])
@pytest.mark.parametrize("nonlinearity", [ReLU, Erf, GELU], ids=["relu", "erf", "gelu"])
def test_hyperparameter_gradients_are_finite_and_match_finite_differences(nonlinearity, duplicates):
    """d sum(W * Theta) / d variances with black images (zero variances inside) and, with ``duplicates``,
    identical images within and across the two sets: finite, and equal to central differences.

    ReLU's NTK factor ``(pi - arccos rho) / (2 pi)`` has infinite slope at correlation 1, where the
    correlation of identical images cannot move: its gradient is taken as 0 there. Its value at duplicate
    images off the exact diagonal carries about 1e-8 relative rounding (arccos of a correlation rounded
    below 1), which central differences amplify, so with duplicates they are compared at 1e-3."""
    x = _edge_images() if duplicates else torch.cat([_images(3, seed=1), torch.zeros(1, 1, 6, 6, dtype=F64)])
    z = torch.cat([x[:1] if duplicates else _images(1, seed=9), _images(2, seed=6)])
    values = {"w1": 1.6, "b1": 0.2, "w2": 1.3, "b2": 0.05, "w3": 2.0}
    weights = torch.rand(4, 3, generator=torch.Generator().manual_seed(7), dtype=F64)

    def ntk_sum(v: dict) -> torch.Tensor:
        model = Sequential(
            Conv2d(3, var_weight=v["w1"], var_bias=v["b1"]),
            nonlinearity(),
            Conv2d(3, var_weight=v["w2"], var_bias=v["b2"]),
            nonlinearity(),
            Dense(var_weight=v["w3"]),
        )
        cross = gram(model, x, z, get="ntk", tile_size=2)
        same = gram(model, x, get="ntk", tile_size=2)
        return (cross * weights).sum() + same.sum() + gram_diag(model, x, get="ntk").sum()

    leaves = {k: torch.tensor(val, dtype=F64, requires_grad=True) for k, val in values.items()}
    total = ntk_sum(leaves)
    grads = torch.autograd.grad(total, list(leaves.values()))
    for (name, val), g in zip(values.items(), grads, strict=True):
        assert math.isfinite(float(g)), name
        h = 1e-6 * max(abs(val), 1.0)
        plus = ntk_sum({**values, name: val + h})
        minus = ntk_sum({**values, name: val - h})
        fd = float((plus - minus) / (2 * h))
        rel = 1e-3 if duplicates and nonlinearity is ReLU else 1e-6
        assert float(g) == pytest.approx(fd, rel=rel, abs=1e-9), name


def test_pooled_ntk_gradients_are_finite_on_black_and_identical_images():
    x = _edge_images()
    weight = torch.tensor(1.4, dtype=F64, requires_grad=True)
    model = Sequential(Conv2d(3, var_weight=weight), ReLU(), GlobalAvgPool2d(), Dense(var_weight=2.0))
    gram(model, x, get="ntk").sum().backward()
    assert weight.grad is not None and math.isfinite(float(weight.grad))


def test_cnngp_kernel_learns_the_ntk():
    model = Sequential(Conv2d(3, var_weight=2.0, var_bias=0.1), ReLU(), Dense(var_weight=1.5))
    kernel = CNNGPKernel(model, input_shape=(1, 6, 6), get="ntk").double()
    x = _images(5, seed=8).flatten(1)
    with torch.no_grad():
        got = kernel(x).to_dense()
    want = reference_full.kernel(reference_full.describe(model), x.reshape(5, 1, 6, 6).numpy(), ntk=True)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-11, atol=0.0)
    np.testing.assert_allclose(kernel(x, diag=True).detach().numpy(), np.diag(want), rtol=1e-11)
    kernel(x).to_dense().sum().backward()
    assert math.isfinite(float(kernel.raw_var_weight.grad)) and float(kernel.raw_var_weight.grad) != 0.0
    with pytest.raises(ValueError, match="get must be 'nngp' or 'ntk'"):
        CNNGPKernel(model, input_shape=(1, 6, 6), get="both")


def _empirical_ntk(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J J^T`` of the network's single output with respect to all its parameters (``torch.func``)."""
    params = {name: p.detach() for name, p in net.named_parameters()}

    def f(p):
        return torch.func.functional_call(net, p, (x,))[:, 0]

    jac = torch.func.jacrev(f)(params)
    flat = torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], dim=1)
    return flat @ flat.T


def test_the_empirical_ntk_of_finite_networks_converges_to_the_kernel():
    """Finite networks in the NTK parameterisation (``.nn(parameterization="ntk")``): the mean over M = 12
    networks of their parameter Jacobians' ``J J^T`` against ``model(X, get="ntk")``, at widths 32 and 256.

    Statistics as in tests/test_monte_carlo.py: errors on the kernel's scale ``sqrt(T_ii T_jj)``; the standard
    error of the mean from the spread over networks (networks are the independent units); entrywise
    ``|error| <= Z SE + 1 / width`` with ``Z = 4`` (40 comparisons; the empirical NTK's mean is O(1/width) off the
    limit). Convergence: the fluctuation (SE) at width 256 is below 0.6 of that at width 32 (it falls like
    ``1/sqrt(width)``: 0.35 expected; 0.19-0.47 over six seeds). The kernel's NNGP in place of its NTK fails."""
    model = Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.1), ReLU(), Conv2d(3, var_weight=2.0), ReLU(), Dense(var_weight=1.5)
    )
    x = _images(4, seed=10, size=5)
    want = gram(model, x, get="ntk")
    d = want.diagonal().sqrt()
    scale = d[:, None] * d[None, :]
    gen = torch.Generator().manual_seed(11)
    spread = {}
    for width in (32, 256):
        samples = torch.stack(
            [
                _empirical_ntk(model.nn(width, generator=gen, dtype=F64, input_size=5, parameterization="ntk"), x)
                for _ in range(12)
            ]
        )
        err = (samples.mean(0) - want) / scale
        se = samples.std(0) / math.sqrt(samples.shape[0]) / scale
        assert bool((err.abs() <= 4.0 * se + 1.0 / width).all()), (width, err, se)
        spread[width] = float(se.max())
    assert spread[256] < 0.6 * spread[32], spread


def test_ntk_parameterisation_keeps_the_output_distribution_and_checks_its_arguments():
    model = Sequential(Conv2d(3, var_weight=2.0, var_bias=0.1), ReLU(), Dense(var_weight=1.5, var_bias=0.2))
    net = model.nn(4, input_size=6, parameterization="ntk", generator=torch.Generator().manual_seed(0))
    params = dict(net.named_parameters())
    # raw parameters are standard normal: their scale is in the forward pass
    assert all(abs(float(p.detach().std()) - 1.0) < 0.5 for p in params.values() if p.numel() > 20)
    with pytest.raises(ValueError, match="parameterization must be 'standard' or 'ntk'"):
        model.nn(4, parameterization="mup")
    with pytest.raises(ValueError, match="needs input_size"):
        model.nn(4, parameterization="ntk")
    # the same outputs' second moments as the kernel, over many networks (the standard parameterisation's check)
    x = _images(3, seed=12)
    gen = torch.Generator().manual_seed(1)
    outs = torch.stack(
        [model.nn(16, input_size=6, parameterization="ntk", generator=gen, dtype=F64)(x)[:, 0] for _ in range(800)]
    )
    second = outs.T @ outs / outs.shape[0]
    want = model(x)
    scale = want.diagonal().sqrt()
    err = (second - want) / (scale[:, None] * scale[None, :])
    # 800 networks: standard errors about sqrt(2 / 800) = 0.05 of the scale; the width-16 bias is smaller
    assert float(err.detach().abs().max()) < 0.2, err
