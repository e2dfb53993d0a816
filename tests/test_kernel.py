"""CNNGPKernel as a GPyTorch kernel: GPyTorch's own kernel test case, values against the layer
model, hyperparameters (tied ratios, zero biases, priors), input errors, exact gradients of the
marginal log likelihood, the tiled backward, batch-shape kernels and the no-grad result cache.

Every expected value comes from an independent computation: the layer model ``architecture(X)``
of a copy of the architecture whose variances are set by hand, closed-form marginal log
likelihoods, central finite differences, or ``torch.distributions`` log densities.
"""

from __future__ import annotations

import copy
import math
import unittest

import numpy as np
import pytest
import torch
from gpytorch.constraints import GreaterThan
from gpytorch.distributions import MultivariateNormal
from gpytorch.likelihoods import GaussianLikelihood
from gpytorch.means import ZeroMean
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.models import ExactGP
from gpytorch.priors import GammaPrior, LogNormalPrior
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase

from gpytorch_cnngp import CNNGPKernel, Conv2d, ReLU, Sequential, architectures
from gpytorch_cnngp.backends import eager, native

F64 = torch.float64
SIZE = 8  # image side of most tests: 8x8, one channel, d = 64


# ---------------------------------------------------------------------------------------------
# helpers


def _convnet(var_weight: float = 2.79, var_bias: float = 7.86):
    """The paper's ConvNet GP shrunk to 8x8 images: 2 hidden 3x3 convolutions and a dense readout."""
    return architectures.convnet_gp(image_size=SIZE, var_weight=var_weight, var_bias=var_bias, depth=2, kernel_size=3)


def _zero_bias_net():
    """Per-layer variances with a zero bias in the first convolution (8x8 -> 8x8 -> 4x4 -> 1x1)."""
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.0),
        ReLU(),
        Conv2d(2, stride=2, var_weight=1.5, var_bias=0.2),
        ReLU(),
        Conv2d(4, padding=0, var_weight=1.2, var_bias=0.05),
    )


def _convs(arch) -> list[Conv2d]:
    return [m for m in arch.modules() if isinstance(m, Conv2d)]


def _with_values(arch, weights, biases):
    """A copy of ``arch`` whose convolutions get the given variances (python floats, float64 buffers)."""
    ref = copy.deepcopy(arch)
    convs = _convs(ref)
    assert len(convs) == len(weights) == len(biases)
    for conv, w, b in zip(convs, weights, biases, strict=True):
        conv.var_weight = float(w)
        conv.var_bias = float(b)
    return ref


def _reference_from_kernel(arch, kernel: CNNGPKernel):
    """A copy of ``arch`` with the kernel's effective per-layer variances set by hand."""
    values = kernel.layer_variances()
    convs = _convs(arch)
    assert len(values) == len(convs)
    for conv, entry in zip(convs, values, strict=True):
        assert entry["layer"].startswith(f"Conv2d(kernel_size={conv.kernel_size}, stride={conv.stride}")
    return _with_values(arch, [v["var_weight"] for v in values], [v["var_bias"] for v in values])


def _images(n: int, seed: int, c: int = 1, size: int = SIZE, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g, dtype=F64).to(dtype)


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().to(F64).cpu(), want.detach().to(F64).cpu()
    return float((got - want).abs().max() / want.abs().max())


class _GP(ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = ZeroMean()
        self.covar_module = kernel

    def forward(self, x):
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))


def softplus(raw: torch.Tensor) -> torch.Tensor:
    """GPyTorch's Positive() transform, written out: log(1 + exp(raw)).

    (``torch.nn.functional.softplus`` switches to the identity above raw = 20, a kink of ~2e-9
    that finite differences would pick up.)
    """
    return torch.log1p(torch.exp(raw))


def _closed_form_mll(K: torch.Tensor, y: torch.Tensor, noise: float) -> torch.Tensor:
    """log N(y; 0, K + noise I) / n, by Cholesky in float64."""
    n = y.shape[-1]
    A = K + noise * torch.eye(n, dtype=K.dtype)
    L = torch.linalg.cholesky(A)
    alpha = torch.cholesky_solve(y[:, None], L)[:, 0]
    return (-0.5 * (y @ alpha) - L.diagonal().log().sum() - 0.5 * n * math.log(2 * math.pi)) / n


# ---------------------------------------------------------------------------------------------
# GPyTorch's own kernel test case


def _small_arch():
    """For 1x4x4 images (d = 16): 4x4 -> 4x4 -> 2x2 -> 1x1."""
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        ReLU(),
        Conv2d(2, stride=2, var_weight=1.5, var_bias=0.2),
        ReLU(),
        Conv2d(2, padding=0, var_weight=1.2, var_bias=0.05),
    )


class TestCNNGPKernel(BaseKernelTestCase, unittest.TestCase):
    """``gpytorch.test.base_kernel_test_case.BaseKernelTestCase`` on 1x4x4 images (d = 16)."""

    def create_kernel_no_ard(self, **kwargs):
        return CNNGPKernel(_small_arch(), input_shape=(1, 4, 4), **kwargs)

    def create_data_no_batch(self):
        return torch.randn(50, 16)

    def create_data_single_batch(self):
        return torch.randn(2, 3, 16)

    def create_data_double_batch(self):
        return torch.randn(3, 2, 20, 16)

    def test_active_dims_list(self):
        """Overridden: ``active_dims`` would select flat pixel indices, which is meaningless for
        images (the selected features no longer form a C x H x W image). The kernel refuses it with
        a clear ValueError instead of computing a wrong kernel."""
        with self.assertRaisesRegex(ValueError, "active_dims"):
            self.create_kernel_no_ard(active_dims=[0, 2, 4, 6])

    def test_active_dims_range(self):
        """Overridden for the same reason as :meth:`test_active_dims_list`: a range of flat pixel
        indices is not an image, so ``active_dims`` raises a ValueError."""
        with self.assertRaisesRegex(ValueError, "active_dims"):
            self.create_kernel_no_ard(active_dims=list(range(3, 9)))


# ---------------------------------------------------------------------------------------------
# values against the layer model


def _set_new_values(kernel: CNNGPKernel, tied: bool, dtype) -> None:
    """Move every hyperparameter away from its initial value, through initialize() and setters."""
    if tied:
        kernel.initialize(var_weight=torch.tensor(1.7, dtype=dtype), var_bias=torch.tensor(0.4, dtype=dtype))
    else:
        kernel.initialize(var_weight=torch.tensor([12.0, 9.0, 1.8], dtype=dtype))
        kernel.var_bias = torch.tensor([5.0, 3.0, 0.7], dtype=dtype)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "per_layer"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_values_match_layer_model(dtype, tied):
    arch = _convnet()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), tied=tied).to(dtype)
    _set_new_values(kernel, tied, dtype)
    ref = _reference_from_kernel(arch, kernel)
    # the kernel's values really changed: the reference differs from the original architecture
    assert [float(c.var_weight) for c in _convs(ref)] != [float(c.var_weight) for c in _convs(arch)]

    X, Z = _images(9, seed=1, dtype=dtype), _images(6, seed=2, dtype=dtype)
    Z9 = _images(9, seed=3, dtype=dtype)
    x, z, z9 = _flat(X), _flat(Z), _flat(Z9)
    tol = 1e-12 if dtype == F64 else 1e-5
    with torch.no_grad():
        same, cross = kernel(x).to_dense(), kernel(x, z).to_dense()
        diag, cross_diag = kernel(x, diag=True), kernel(x, z9, diag=True)
        assert same.dtype == dtype and same.shape == (9, 9) and cross.shape == (9, 6)
        assert diag.shape == (9,) and cross_diag.shape == (9,)
        assert _rel_err(same, ref(X)) < tol
        assert _rel_err(cross, ref(X, Z)) < tol
        assert _rel_err(diag, ref(X, diag=True)) < tol
        assert _rel_err(diag, ref(X).diagonal()) < tol
        assert _rel_err(cross_diag, ref(X, Z9, diag=True)) < tol
        assert _rel_err(cross_diag, ref(X, Z9).diagonal()) < tol
        if dtype == torch.float32:  # and float32 is close to the float64 kernel of the same values
            assert _rel_err(same, ref(X.double())) < 1e-4


def test_values_with_gradients_enabled_match_layer_model():
    """The differentiable path (hyperparameters require grad) gives the same numbers."""
    arch = _convnet()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), tied=False).double()
    _set_new_values(kernel, False, F64)
    ref = _reference_from_kernel(arch, kernel)
    X, Z = _images(7, seed=4), _images(5, seed=5)
    same, cross = kernel(_flat(X)).to_dense(), kernel(_flat(X), _flat(Z)).to_dense()
    assert same.requires_grad and cross.requires_grad
    assert _rel_err(same, ref(X)) < 1e-12
    assert _rel_err(cross, ref(X, Z)) < 1e-12


def test_multichannel_images_are_flattened_in_c_h_w_order():
    arch = Sequential(Conv2d(3, var_weight=2.0, var_bias=0.3), ReLU(), Conv2d(6, padding=0, var_weight=1.1))
    kernel = CNNGPKernel(arch, input_shape=(2, 6, 6)).double()
    ref = _reference_from_kernel(arch, kernel)
    X, Z = _images(5, seed=6, c=2, size=6), _images(4, seed=7, c=2, size=6)
    with torch.no_grad():
        assert _rel_err(kernel(_flat(X)).to_dense(), ref(X)) < 1e-12
        assert _rel_err(kernel(_flat(X), _flat(Z)).to_dense(), ref(X, Z)) < 1e-12
        # a transposed layout (H, W, C) is a different kernel: the reshape really is C, H, W
        wrong = X.permute(0, 2, 3, 1).reshape(5, -1)
        assert _rel_err(kernel(wrong).to_dense(), ref(X)) > 1e-3


def test_float64_default_dtype_kernel_reproduces_the_architecture():
    """Built under a float64 default dtype, the untouched kernel is the architecture's own kernel."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        arch = _convnet()
        kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE))
        X = _images(6, seed=8)
        with torch.no_grad():
            assert _rel_err(kernel(_flat(X)).to_dense(), arch(X)) < 1e-12
    finally:
        torch.set_default_dtype(old)


def test_kernel_leaves_the_users_architecture_alone():
    arch = _convnet()
    before = [(float(c.var_weight), float(c.var_bias)) for c in _convs(arch)]
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE))
    kernel.initialize(var_weight=0.5, var_bias=0.5)
    kernel(_flat(_images(3, seed=9, dtype=torch.float32)), diag=True)
    assert [(float(c.var_weight), float(c.var_bias)) for c in _convs(arch)] == before


# ---------------------------------------------------------------------------------------------
# hyperparameters


def test_tied_ratios_of_convnet_gp():
    """Tied: hidden layers get sigma_w^2 * k^2, the readout sigma_w^2, every bias sigma_b^2."""
    kernel = CNNGPKernel(_convnet(), input_shape=(1, SIZE, SIZE), tied=True).double()
    assert kernel.var_weight.shape == (1,) and kernel.var_bias.shape == (1,)
    # initial values: the paper's sigma_w^2 = 2.79 and sigma_b^2 = 7.86 (float32 parameters)
    assert kernel.var_weight.item() == pytest.approx(2.79, rel=1e-6)
    assert kernel.var_bias.item() == pytest.approx(7.86, rel=1e-6)

    w, b = 3.3, 0.25
    kernel.var_weight = torch.tensor(w, dtype=F64)
    kernel.var_bias = torch.tensor(b, dtype=F64)
    values = kernel.layer_variances()
    assert [v["var_weight"] for v in values] == pytest.approx([w * 9, w * 9, w], rel=1e-14)
    assert [v["var_bias"] for v in values] == pytest.approx([b, b, b], rel=1e-14)
    # and the kernel is the paper's architecture built from scratch with these sigmas
    X = _images(6, seed=10)
    with torch.no_grad():
        assert _rel_err(kernel(_flat(X)).to_dense(), _convnet(w, b)(X)) < 1e-12


def test_setting_python_floats_keeps_float64_precision():
    """``initialize(var_weight=1.7)`` on a float64 kernel must store 1.7 in float64, not a float32
    rounding of it (the setters are GPyTorch's documented way to set hyperparameters)."""
    kernel = CNNGPKernel(_convnet(), input_shape=(1, SIZE, SIZE), tied=True).double()
    kernel.initialize(var_weight=1.7, var_bias=0.4)
    assert kernel.var_weight.item() == pytest.approx(1.7, rel=1e-14)
    assert kernel.var_bias.item() == pytest.approx(0.4, rel=1e-14)
    X = _images(5, seed=11)
    with torch.no_grad():
        assert _rel_err(kernel(_flat(X)).to_dense(), _convnet(1.7, 0.4)(X)) < 1e-12


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "per_layer"])
def test_zero_biases_stay_zero(tied):
    arch = _zero_bias_net()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), tied=tied).double()
    assert kernel.var_bias.shape == ((1,) if tied else (2,))
    new_b = torch.tensor([0.9], dtype=F64) if tied else torch.tensor([0.6, 0.3], dtype=F64)
    kernel.var_bias = new_b
    kernel.var_weight = torch.tensor([2.5], dtype=F64) if tied else torch.tensor([3.0, 2.0, 0.8], dtype=F64)
    values = kernel.layer_variances()
    assert values[0]["var_bias"] == 0.0
    if tied:  # the learned bias is the readout's; the middle one keeps its ratio 0.2 / 0.05
        assert [v["var_bias"] for v in values] == pytest.approx([0.0, 0.9 * 4, 0.9], rel=1e-12)
        assert [v["var_weight"] for v in values] == pytest.approx([2.5 * 2.0 / 1.2, 2.5 * 1.5 / 1.2, 2.5])
        weights, biases = [2.5 * 2.0 / 1.2, 2.5 * 1.5 / 1.2, 2.5], [0.0, 3.6, 0.9]
    else:
        assert [v["var_bias"] for v in values] == pytest.approx([0.0, 0.6, 0.3], rel=1e-14, abs=0.0)
        weights, biases = [3.0, 2.0, 0.8], [0.0, 0.6, 0.3]
    ref = _with_values(arch, weights, biases)
    X = _images(6, seed=12)
    x = _flat(X)
    with torch.no_grad():
        assert _rel_err(kernel(x).to_dense(), ref(X)) < 1e-12
    # the zero bias gets no parameter: the gradient covers the learned ones only
    kernel(x).to_dense().sum().backward()
    assert kernel.raw_var_bias.grad.shape == new_b.shape and bool((kernel.raw_var_bias.grad != 0).all())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "per_layer"])
def test_free_zero_biases_are_learned(tied):
    arch = _zero_bias_net()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), tied=tied, free_zero_biases=True, zero_bias_init=1e-3)
    kernel = kernel.double()
    assert kernel.layer_variances()[0]["var_bias"] == pytest.approx(1e-3, rel=1e-6)
    X = _images(6, seed=13)
    x = _flat(X)
    if tied:
        kernel.var_bias = torch.tensor([0.5], dtype=F64)  # readout 0.5; others keep their ratios
        biases = [0.5 * 1e-3 / 0.05, 0.5 * 0.2 / 0.05, 0.5]
        assert [v["var_bias"] for v in kernel.layer_variances()] == pytest.approx(biases, rel=1e-5)
        ref = _reference_from_kernel(arch, kernel)
    else:
        assert kernel.var_bias.shape == (3,)
        kernel.var_bias = torch.tensor([0.5, 0.2, 0.05], dtype=F64)
        # the weights are untouched (their float32 initial values)
        for got, want in zip(kernel.layer_variances(), [2.0, 1.5, 1.2], strict=True):
            assert got["var_weight"] == pytest.approx(want, rel=1e-6)
        ref = _reference_from_kernel(arch, kernel)
        assert [v["var_bias"] for v in kernel.layer_variances()] == pytest.approx([0.5, 0.2, 0.05], rel=1e-14)
    with torch.no_grad():
        assert _rel_err(kernel(x).to_dense(), ref(X)) < 1e-12
    kernel(x).to_dense().sum().backward()
    assert bool((kernel.raw_var_bias.grad != 0).all())


def test_architecture_without_biases_learns_weights_only():
    arch = Sequential(Conv2d(3, var_weight=2.0), ReLU(), Conv2d(SIZE, padding=0, var_weight=1.0))
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), tied=False).double()
    assert not hasattr(kernel, "raw_var_bias") or "raw_var_bias" not in dict(kernel.named_parameters())
    assert kernel.var_bias.shape == (0,)
    with pytest.raises(ValueError, match="bias"):
        kernel.var_bias = torch.tensor([1.0])
    with pytest.raises(ValueError, match="var_bias_prior"):
        CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), var_bias_prior=GammaPrior(2.0, 1.0))
    kernel.var_weight = torch.tensor([3.0, 0.7], dtype=F64)
    X = _images(5, seed=14)
    with torch.no_grad():
        assert _rel_err(kernel(_flat(X)).to_dense(), _with_values(arch, [3.0, 0.7], [0.0, 0.0])(X)) < 1e-12


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "per_layer"])
def test_priors_register_and_enter_the_mll(tied):
    w_prior, b_prior = GammaPrior(3.0, 0.5), LogNormalPrior(0.0, 1.0)
    kernels = [
        CNNGPKernel(_convnet(), input_shape=(1, SIZE, SIZE), tied=tied, **priors).double()
        for priors in ({}, {"var_weight_prior": w_prior, "var_bias_prior": b_prior})
    ]
    plain, with_priors = kernels
    assert [name for name, *_ in plain.named_priors()] == []
    assert sorted(name for name, *_ in with_priors.named_priors()) == ["var_bias_prior", "var_weight_prior"]
    for kernel in kernels:
        _set_new_values(kernel, tied, F64)

    X, y = _images(8, seed=15), torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=F64)
    mlls = []
    for kernel in kernels:
        likelihood = GaussianLikelihood(noise_constraint=GreaterThan(1e-8)).double()
        likelihood.noise = torch.tensor(0.1, dtype=F64)
        model = _GP(_flat(X), y, likelihood, kernel).double()
        mll = ExactMarginalLogLikelihood(likelihood, model)
        model.train()
        with torch.no_grad():
            mlls.append(float(mll(model(_flat(X)), y)))
    w = kernels[1].var_weight.detach()
    b = kernels[1].var_bias.detach()
    expected = float(
        torch.distributions.Gamma(torch.tensor(3.0, dtype=F64), torch.tensor(0.5, dtype=F64)).log_prob(w).sum()
        + torch.distributions.LogNormal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)).log_prob(b).sum()
    )
    assert (mlls[1] - mlls[0]) * 8 == pytest.approx(expected, rel=1e-10, abs=1e-10)

    # sampling from a prior goes through the setting closure and keeps the parameter shape
    shape = with_priors.raw_var_weight.shape
    with_priors.sample_from_prior("var_weight_prior")
    assert with_priors.raw_var_weight.shape == shape and bool((with_priors.var_weight > 0).all())


def test_non_prior_raises_type_error():
    arch = _convnet()
    for bad in (torch.distributions.Gamma(2.0, 1.0), "gamma", 1.0):
        with pytest.raises(TypeError):
            CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), var_weight_prior=bad)
        with pytest.raises(TypeError):
            CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), var_bias_prior=bad)


# ---------------------------------------------------------------------------------------------
# input errors


def test_wrong_feature_dimension_raises():
    kernel = CNNGPKernel(_convnet(), input_shape=(1, SIZE, SIZE))
    x = torch.rand(5, SIZE * SIZE - 1)
    with pytest.raises(ValueError, match=r"C\*H\*W = 64"):
        kernel(x).to_dense()
    with pytest.raises(ValueError, match=r"C\*H\*W = 64"):
        kernel(x, diag=True)
    with pytest.raises(ValueError, match=r"C\*H\*W = 64"):
        kernel(torch.rand(4, 3 * SIZE * SIZE), torch.rand(2, 3 * SIZE * SIZE)).to_dense()


def test_last_dim_is_batch_raises():
    kernel = CNNGPKernel(_convnet(), input_shape=(1, SIZE, SIZE))
    x = torch.rand(4, SIZE * SIZE)
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        kernel.forward(x, x, last_dim_is_batch=True)
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        kernel.forward(x, x, diag=True, last_dim_is_batch=True)


def test_last_dim_is_batch_is_refused_when_the_kernel_is_called_or_made():
    # was: the call returned a lazy tensor, and the error came only when something evaluated it
    kernel = CNNGPKernel(_convnet(), input_shape=(1, SIZE, SIZE))
    x = torch.rand(4, SIZE * SIZE)
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        kernel(x, last_dim_is_batch=True)
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        kernel(x, x[:2], diag=False, last_dim_is_batch=True)
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        kernel(x, diag=True, last_dim_is_batch=True)
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        CNNGPKernel(_convnet(), input_shape=(1, SIZE, SIZE), last_dim_is_batch=True)


# ---------------------------------------------------------------------------------------------
# gradients of the exact marginal log likelihood

N_GRAD = 12
NOISE = 0.05


def _mll_setup(kernel):
    X = _images(N_GRAD, seed=20)
    y = torch.randn(N_GRAD, generator=torch.Generator().manual_seed(1), dtype=F64)
    likelihood = GaussianLikelihood(noise_constraint=GreaterThan(1e-8)).double()
    likelihood.noise = torch.tensor(NOISE, dtype=F64)
    model = _GP(_flat(X), y, likelihood, kernel).double()
    model.train()
    return X, y, model, ExactMarginalLogLikelihood(likelihood, model)


def _mll_grads(kernel):
    X, y, model, mll = _mll_setup(kernel)
    loss = mll(model(_flat(X)), y)
    gw, gb = torch.autograd.grad(loss, [kernel.raw_var_weight, kernel.raw_var_bias])
    return loss.detach(), gw, gb


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "per_layer"])
def test_mll_gradient_matches_finite_differences(tied):
    kernel = CNNGPKernel(_convnet(), input_shape=(1, SIZE, SIZE), tied=tied).double()
    _set_new_values(kernel, tied, F64)
    loss, gw, gb = _mll_grads(kernel)
    X, y = _images(N_GRAD, seed=20), torch.randn(N_GRAD, generator=torch.Generator().manual_seed(1), dtype=F64)
    raw_w = kernel.raw_var_weight.detach().clone()
    raw_b = kernel.raw_var_bias.detach().clone()

    def closed_form(rw: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
        """MLL of the layer model whose variances are softplus(raw), built by hand."""
        w, b = softplus(rw).tolist(), softplus(rb).tolist()
        ref = _convnet(w[0], b[0]) if tied else _with_values(_convnet(), w, b)
        with torch.no_grad():
            return _closed_form_mll(ref(X), y, NOISE)

    assert float(loss) == pytest.approx(float(closed_form(raw_w, raw_b)), rel=1e-10)
    h = 1e-5
    for raw, grad, which in ((raw_w, gw, "w"), (raw_b, gb, "b")):
        assert grad.shape == raw.shape
        for i in range(raw.numel()):
            step = torch.zeros_like(raw)
            step[i] = h
            plus = closed_form(raw_w + step, raw_b) if which == "w" else closed_form(raw_w, raw_b + step)
            minus = closed_form(raw_w - step, raw_b) if which == "w" else closed_form(raw_w, raw_b - step)
            fd = float((plus - minus) / (2 * h))
            assert float(grad[i]) == pytest.approx(fd, rel=1e-5, abs=1e-9), (which, i)


class _BlockRecorder:
    """Records the sizes of every pair block a backend computes (forward and backward)."""

    def __init__(self, monkeypatch, backend: str):
        self.shapes: list[tuple[int, int]] = []
        if backend == "eager":  # the eager backend's tiles and its autograd VJP both run pass.pair_block
            targets = [(eager, "pair_block", 1)]
        else:  # the native kernel's forward tiles and its reverse-mode tiles
            targets = [(native, "run_block", 3), (native, "run_block_vjp", 3)]
        for module, name, at in targets:
            original = getattr(module, name)

            def recording(*args, _original=original, _at=at, **kwargs):
                x, z = args[_at], args[_at + 1]
                self.shapes.append((x.shape[-1], z.shape[-1]))  # image blocks are [H, W, C, n]
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, recording)


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_tiled_backward_matches_untiled(monkeypatch, backend):
    """tile_size=3 (16 tiles of at most 3x3 pairs) gives the gradients of tile_size=100 (one tile)."""
    if backend == "native" and native.load_library() is None:  # pragma: no cover - no C++ compiler
        pytest.skip("the native kernel cannot be built here")
    recorder = _BlockRecorder(monkeypatch, backend)
    results = {}
    for tile in (3, 100):
        kernel = CNNGPKernel(
            _convnet(), input_shape=(1, SIZE, SIZE), tied=False, tile_size=tile, backend=backend
        ).double()
        _set_new_values(kernel, False, F64)
        X, y, model, mll = _mll_setup(kernel)
        loss = mll(model(_flat(X)), y)
        n_forward = len(recorder.shapes)
        gw, gb = torch.autograd.grad(loss, [kernel.raw_var_weight, kernel.raw_var_bias])
        backward_blocks = recorder.shapes[n_forward:]
        results[tile] = (loss.detach(), gw, gb, backward_blocks)
        recorder.shapes.clear()
    loss3, gw3, gb3, blocks3 = results[3]
    loss100, gw100, gb100, blocks100 = results[100]
    # the backward really recomputed one small tile at a time
    assert len(blocks3) >= 10 and max(max(s) for s in blocks3) <= 3
    assert blocks100 == [(N_GRAD, N_GRAD)]
    assert float(loss3) == pytest.approx(float(loss100), rel=1e-13)
    assert _rel_err(gw3, gw100) < 1e-10
    assert _rel_err(gb3, gb100) < 1e-10


def test_tiled_backward_of_cross_covariance_matches_finite_differences():
    X, Z = _images(7, seed=21), _images(5, seed=22)
    W = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    grads = {}
    for tile in (3, 100):
        kernel = CNNGPKernel(_convnet(), input_shape=(1, SIZE, SIZE), tied=False, tile_size=tile).double()
        _set_new_values(kernel, False, F64)
        loss = (kernel(_flat(X), _flat(Z)).to_dense() * W).sum()
        grads[tile] = torch.autograd.grad(loss, [kernel.raw_var_weight, kernel.raw_var_bias])
    for g3, g100 in zip(grads[3], grads[100], strict=True):
        assert _rel_err(g3, g100) < 1e-10
    raw_w, raw_b = kernel.raw_var_weight.detach().clone(), kernel.raw_var_bias.detach().clone()

    def f(rw, rb):
        ref = _with_values(_convnet(), softplus(rw).tolist(), softplus(rb).tolist())
        with torch.no_grad():
            return (ref(X, Z) * W).sum()

    h = 1e-5
    for i in range(3):
        e = torch.zeros(3, dtype=F64)
        e[i] = h
        fd_w = float((f(raw_w + e, raw_b) - f(raw_w - e, raw_b)) / (2 * h))
        fd_b = float((f(raw_w, raw_b + e) - f(raw_w, raw_b - e)) / (2 * h))
        assert float(grads[3][0][i]) == pytest.approx(fd_w, rel=1e-5, abs=1e-9)
        assert float(grads[3][1][i]) == pytest.approx(fd_b, rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# batch-shape kernels


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "per_layer"])
def test_batch_kernel_equals_separate_kernels(tied):
    arch = _convnet()
    if tied:
        weights = torch.tensor([[1.5], [3.0]], dtype=F64)
        biases = torch.tensor([[0.2], [0.9]], dtype=F64)
    else:
        weights = torch.tensor([[20.0, 14.0, 1.8], [9.0, 30.0, 2.5]], dtype=F64)
        biases = torch.tensor([[5.0, 3.0, 0.7], [0.1, 1.0, 2.0]], dtype=F64)
    batched = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), tied=tied, batch_shape=torch.Size([2])).double()
    assert batched.raw_var_weight.shape == weights.shape
    batched.var_weight, batched.var_bias = weights, biases
    singles = []
    for i in range(2):
        kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), tied=tied).double()
        kernel.var_weight, kernel.var_bias = weights[i], biases[i]
        singles.append(kernel)

    X, Z = _images(6, seed=23), _images(4, seed=24)
    Xb = torch.stack([X, _images(6, seed=25)])  # different inputs per batch
    x, z, xb = _flat(X), _flat(Z), Xb.reshape(2, 6, -1)
    with torch.no_grad():
        full = batched(x).to_dense()
        cross = batched(x, z).to_dense()
        diag = batched(x, diag=True)
        per_batch = batched(xb).to_dense()
        assert full.shape == (2, 6, 6) and cross.shape == (2, 6, 4) and diag.shape == (2, 6)
        for i, kernel in enumerate(singles):
            ref = _reference_from_kernel(arch, kernel)
            assert _rel_err(full[i], kernel(x).to_dense()) < 1e-12
            assert _rel_err(full[i], ref(X)) < 1e-12
            assert _rel_err(cross[i], ref(X, Z)) < 1e-12
            assert _rel_err(diag[i], ref(X, diag=True)) < 1e-12
            assert _rel_err(per_batch[i], ref(Xb[i])) < 1e-12
        assert _rel_err(full[0], full[1]) > 1e-3  # the two batches really differ

    # gradients split by batch element as well
    G = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    (batched(x).to_dense() * G).sum().backward()
    for i, kernel in enumerate(singles):
        (kernel(x).to_dense() * G[i]).sum().backward()
        assert _rel_err(batched.raw_var_weight.grad[i], kernel.raw_var_weight.grad) < 1e-10
        assert _rel_err(batched.raw_var_bias.grad[i], kernel.raw_var_bias.grad) < 1e-10


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_batches_of_inputs_with_one_set_of_variances(normalize):
    """Batched inputs against one kernel (BoTorch's candidates of one point against repeated training images, and
    the other arrangements) equal the layer model entry by entry, in values and in gradients."""
    arch = _convnet()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), normalize=normalize).double()
    ref_arch = _reference_from_kernel(arch, kernel)

    def ref(a, b=None, diag=False):
        if not normalize:
            return ref_arch(a, b, diag=diag)
        b_ = a if b is None else b
        k = ref_arch(a, b, diag=diag)
        va, vb = ref_arch(a, diag=True), ref_arch(b_, diag=True)
        return k / (va * vb).sqrt() if diag else k / (va[:, None] * vb[None, :]).sqrt()

    C, T = _images(5, seed=46), _images(7, seed=47)  # 5 candidates, 7 training images
    c, t = _flat(C), _flat(T)
    with torch.no_grad():
        cases = {
            "candidates x expanded train": (c.unsqueeze(1), t.expand(5, 7, -1)),
            "candidates x equal copies": (c.unsqueeze(1), t.repeat(5, 1, 1)),
            "expanded train x candidates": (t.expand(5, 7, -1), c.unsqueeze(1)),
            "broadcast train": (c.unsqueeze(1), t),
        }
        for name, (a, b) in cases.items():
            got = kernel(a, b).to_dense()
            assert got.shape == (5, a.shape[-2], b.shape[-2]), name
            for i in range(5):
                A = a[i if a.dim() == 3 else ...].reshape(-1, 1, SIZE, SIZE)
                B = b[i if b.dim() == 3 else ...].reshape(-1, 1, SIZE, SIZE)
                assert _rel_err(got[i], ref(A, B)) < 1e-12, name
        both = torch.stack([T, _images(7, seed=48)]).reshape(2, 7, -1)  # different images per entry: the loop
        got = kernel(both).to_dense()
        for i in range(2):
            assert _rel_err(got[i], ref(both[i].view(7, 1, SIZE, SIZE))) < 1e-12
        same = kernel(t.expand(3, 7, -1)).to_dense()
        assert same.shape == (3, 7, 7) and all(_rel_err(same[i], ref(T)) < 1e-12 for i in range(3))
        diag = kernel(c.view(5, 1, -1), diag=True)
        assert diag.shape == (5, 1) and _rel_err(diag[:, 0], ref(C, diag=True)) < 1e-12
        paired = kernel(c.view(5, 1, -1), t[:5].view(5, 1, -1), diag=True)
        assert _rel_err(paired[:, 0], ref(C, T[:5], diag=True)) < 1e-12
    # gradients: to each candidate, and to the variances
    a = c.unsqueeze(1).clone().requires_grad_(True)
    G = torch.randn(5, 1, 7, generator=torch.Generator().manual_seed(7), dtype=F64)
    (kernel(a, t.expand(5, 7, -1)).to_dense() * G).sum().backward()
    for i in range(5):
        single = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), normalize=normalize).double()
        ai = c[i : i + 1].clone().requires_grad_(True)
        (single(ai, t).to_dense() * G[i]).sum().backward()
        assert _rel_err(a.grad[i], ai.grad) < 1e-10
        if i == 0:
            grad_w = single.raw_var_weight.grad.clone()
        else:
            grad_w += single.raw_var_weight.grad
    assert _rel_err(kernel.raw_var_weight.grad, grad_w) < 1e-10


# ---------------------------------------------------------------------------------------------
# the no-grad result cache


def test_cache_follows_hyperparameters_and_in_place_changes():
    arch = _convnet()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE)).double()
    X = _images(5, seed=26)
    x = _flat(X).clone()
    with torch.no_grad():
        kernel(x).to_dense()
        before = kernel.num_evaluations
        kernel(x).to_dense()
        assert kernel.num_evaluations == before  # same inputs and values: reused
        kernel.var_weight = torch.tensor(1.1, dtype=F64)
        assert _rel_err(kernel(x).to_dense(), _reference_from_kernel(arch, kernel)(X)) < 1e-12
        x.mul_(0.5)  # in-place change of the inputs
        assert _rel_err(kernel(x).to_dense(), _reference_from_kernel(arch, kernel)(X * 0.5)) < 1e-12


def test_cache_is_not_fooled_by_reused_memory():
    """A new batch of images written into the same buffer (here a numpy array reused by a data
    loader) has the same data_ptr, shape, stride and version counter as the previous one; the
    kernel must still compute it instead of returning the previous batch's result."""
    arch = _convnet()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE)).double()
    ref = _reference_from_kernel(arch, kernel)
    buffer = np.empty((5, SIZE * SIZE))
    with torch.no_grad():
        for seed in (27, 28):
            X = _images(5, seed=seed)
            buffer[:] = _flat(X).numpy()
            x = torch.from_numpy(buffer)
            err = _rel_err(kernel(x).to_dense(), ref(X))
            assert err < 1e-12, f"stale kernel for batch {seed}"


def test_cache_is_not_fooled_by_recycled_allocations():
    """Fresh tensors often reuse a freed tensor's address (same data_ptr, shape, stride and a new
    version counter at 0): each one must still get its own kernel."""
    arch = _convnet()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE)).double()
    ref = _reference_from_kernel(arch, kernel)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for i in range(6):
            x = torch.rand(5, SIZE * SIZE, generator=generator, dtype=F64)
            want = ref(x.view(5, 1, SIZE, SIZE))
            got = kernel(x).to_dense()
            err = _rel_err(got, want)
            assert err < 1e-12, f"stale kernel at iteration {i}"
            del x, got


def test_cache_follows_every_setting_that_changes_the_result():
    """Each change between two no-grad calls on the same inputs must give the new kernel, not the cached one."""
    from gpytorch_cnngp import gram

    arch = _convnet()
    X = _images(5, seed=40)
    x = _flat(X)

    def reference(kernel, get="nngp"):
        return gram(_reference_from_kernel(arch, kernel), X, get=get, backend="eager")

    with torch.no_grad():
        kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE)).double()
        assert _rel_err(kernel(x).to_dense(), reference(kernel)) < 1e-12
        # get: was the cached NNGP returned as the NTK (about 70% off)
        kernel.get = "ntk"
        assert _rel_err(kernel(x).to_dense(), reference(kernel, "ntk")) < 1e-12
        assert _rel_err(kernel(x, diag=True), reference(kernel, "ntk").diagonal()) < 1e-12
        kernel.get = "nngp"
        assert _rel_err(kernel(x).to_dense(), reference(kernel)) < 1e-12
        # normalize
        kernel.normalize = True
        K = reference(kernel)
        want = K / (K.diagonal()[:, None] * K.diagonal()[None, :]).sqrt()
        assert _rel_err(kernel(x).to_dense(), want) < 1e-12
        kernel.normalize = False
        # backend: the same values to rounding, so the evaluation count tells a recomputation
        kernel(x).to_dense()
        before = kernel.num_evaluations
        kernel(x).to_dense()
        assert kernel.num_evaluations == before
        kernel.backend = "eager"
        assert _rel_err(kernel(x).to_dense(), reference(kernel)) < 1e-12
        assert kernel.num_evaluations == before + 1
        # dtype
        kernel.float()
        got = kernel(x).to_dense()
        assert got.dtype == torch.float32 and _rel_err(got, reference(kernel)) < 1e-5
        kernel.double()
        # untied per-layer values, one layer at a time
        untied = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), tied=False).double()
        untied(x).to_dense()
        for name in ("var_weight", "var_bias"):
            value = getattr(untied, name).detach().clone()
            value[1] *= 1.5
            setattr(untied, name, value)
            assert _rel_err(untied(x).to_dense(), reference(untied)) < 1e-12, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cache_follows_the_device():
    arch = _convnet()
    X = _images(5, seed=41)
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE)).double()
    with torch.no_grad():
        on_cpu = kernel(_flat(X)).to_dense()
        kernel.cuda()
        on_gpu = kernel(_flat(X).cuda()).to_dense()
    assert on_gpu.device.type == "cuda" and _rel_err(on_gpu, on_cpu) < 1e-11


# ---------------------------------------------------------------------------------------------
# the normalised kernel and the recommended ML-II parameterisation


def test_normalized_kernel_is_the_correlation_of_the_layer_model():
    arch = _convnet()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), normalize=True, tied=False).double()
    _set_new_values(kernel, False, F64)
    ref = _reference_from_kernel(arch, kernel)
    X, Z = _images(5, seed=42), _images(4, seed=43)
    var_x, var_z = ref(X, diag=True), ref(Z, diag=True)
    with torch.no_grad():
        assert _rel_err(kernel(_flat(X)).to_dense(), ref(X) / (var_x[:, None] * var_x[None, :]).sqrt()) < 1e-12
        assert _rel_err(kernel(_flat(X), _flat(Z)).to_dense(), ref(X, Z) / (var_x[:, None] * var_z).sqrt()) < 1e-12
        assert torch.equal(kernel(_flat(X), diag=True), torch.ones(5, dtype=F64))
        paired = ref(X[:4], Z, diag=True) / (var_x[:4] * var_z).sqrt()
        assert _rel_err(kernel(_flat(X[:4]), _flat(Z), diag=True), paired) < 1e-12


def test_normalized_kernel_gradient_matches_finite_differences():
    arch = _convnet()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), normalize=True).double()
    x, z = _flat(_images(4, seed=44)), _flat(_images(3, seed=45))
    G = torch.randn(4, 3, generator=torch.Generator().manual_seed(6), dtype=F64)

    def loss() -> torch.Tensor:
        return (kernel(x, z).to_dense() * G).sum()

    gw, gb = torch.autograd.grad(loss(), [kernel.raw_var_weight, kernel.raw_var_bias])
    eps = 1e-6
    for raw, g in ((kernel.raw_var_weight, gw), (kernel.raw_var_bias, gb)):
        with torch.no_grad():
            raw += eps
            up = float(loss())
            raw -= 2 * eps
            down = float(loss())
            raw += eps
        assert float(g) == pytest.approx((up - down) / (2 * eps), rel=1e-5)


def test_normalized_kernel_refuses_images_of_zero_variance():
    net = Sequential(Conv2d(3, var_weight=2.0), ReLU(), Conv2d(SIZE, padding=0, var_weight=2.0))
    kernel = CNNGPKernel(net, input_shape=(1, SIZE, SIZE), normalize=True).double()
    x = torch.rand(3, SIZE * SIZE, dtype=F64)
    x[2] = 0.0
    with torch.no_grad(), pytest.raises(ValueError, match=r"x1\[2\] has zero variance"):
        kernel(x).to_dense()


def test_recommended_kernel_is_normalized_with_priors_at_the_architectures_values():
    from gpytorch.kernels import ScaleKernel

    arch = architectures.convnet_gp(image_size=SIZE, depth=2, kernel_size=3)
    covar = CNNGPKernel.recommended(arch, input_shape=(1, SIZE, SIZE), prior_width=0.7).double()
    assert isinstance(covar, ScaleKernel) and isinstance(covar.base_kernel, CNNGPKernel)
    kernel = covar.base_kernel
    assert kernel.normalize
    assert float(kernel.var_weight.detach()) == pytest.approx(2.79, rel=1e-12)
    assert float(kernel.var_bias.detach()) == pytest.approx(7.86, rel=1e-12)
    # optimised in log space: the raw parameters are the logarithms
    assert float(kernel.raw_var_weight.detach()) == pytest.approx(math.log(2.79), rel=1e-12)
    priors = {name: prior for name, _, prior, *_ in kernel.named_priors()}
    for name, value in (("var_weight_prior", 2.79), ("var_bias_prior", 7.86)):
        prior = priors[name]
        # the density's maximum over the variance (not its logarithm) is at the architecture's value
        grid = torch.linspace(math.log(value) - 0.5, math.log(value) + 0.5, 20001, dtype=F64).exp()
        best = grid[prior.log_prob(grid).argmax()]
        assert float(best) == pytest.approx(value, rel=1e-3)
        assert float(prior.scale) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="normalize"):
        CNNGPKernel.recommended(arch, input_shape=(1, SIZE, SIZE), normalize=False)
    with pytest.raises(ValueError, match="prior_width"):
        CNNGPKernel.recommended(arch, input_shape=(1, SIZE, SIZE), prior_width=0.0)


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "per_layer"])
def test_values_and_gradients_on_cuda(tied):
    arch = _convnet()
    kernel = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), tied=tied).to(device="cuda", dtype=F64)
    _set_new_values(kernel, tied, F64)
    ref = _reference_from_kernel(arch, kernel)  # evaluated on the CPU
    X, Z = _images(9, seed=30), _images(6, seed=31)
    x, z = _flat(X).cuda(), _flat(Z).cuda()
    with torch.no_grad():
        same = kernel(x).to_dense()
        assert same.device.type == "cuda"
        assert _rel_err(same, ref(X)) < 1e-11
        assert _rel_err(kernel(x, z).to_dense(), ref(X, Z)) < 1e-11
        assert _rel_err(kernel(x, diag=True), ref(X, diag=True)) < 1e-11
    G = torch.randn(9, 9, generator=torch.Generator().manual_seed(5), dtype=F64)
    (kernel(x).to_dense() * G.cuda()).sum().backward()
    cpu = CNNGPKernel(arch, input_shape=(1, SIZE, SIZE), tied=tied).double()
    _set_new_values(cpu, tied, F64)
    (cpu(_flat(X)).to_dense() * G).sum().backward()
    assert _rel_err(kernel.raw_var_weight.grad, cpu.raw_var_weight.grad) < 1e-10
    assert _rel_err(kernel.raw_var_bias.grad, cpu.raw_var_bias.grad) < 1e-10


if __name__ == "__main__":
    unittest.main()


def test_double_gives_the_architectures_float64_variances():
    """The raw parameters start in float32; .double() must not keep their rounding (it was 3.8e-7 relative)."""
    arch = architectures.convnet_gp(depth=2, kernel_size=3, image_size=8)
    # untied, the first layers' 25.11 goes through torch's softplus, which returns x itself above 20: an
    # error of exp(-x) (5e-13 relative here) that is GPyTorch's Positive() constraint, not the dtype
    for kernel, rtol in (
        (CNNGPKernel(arch, input_shape=(1, 8, 8)).double(), 2e-16),
        (CNNGPKernel(arch, input_shape=(1, 8, 8), tied=False).to(torch.float64), 1e-12),
    ):
        assert kernel.raw_var_weight.dtype == torch.float64
        want = [(layer["var_weight"], layer["var_bias"]) for layer in kernel.layer_variances()]
        exact = [(float(c.var_weight), float(c.var_bias)) for c in arch.modules() if isinstance(c, Conv2d)]
        np.testing.assert_allclose(np.array(want), np.array(exact), rtol=rtol)
        x = torch.rand(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = kernel(x).to_dense()
        ref = arch.double()(x.view(5, 1, 8, 8))
        torch.testing.assert_close(got, ref, rtol=max(rtol, 1e-14), atol=0.0)


def test_double_keeps_values_changed_after_construction():
    arch = architectures.convnet_gp(depth=2, kernel_size=3, image_size=8)
    kernel = CNNGPKernel(arch, input_shape=(1, 8, 8))
    with torch.no_grad():
        kernel.raw_var_weight.add_(0.25)  # an optimiser step
    raw = kernel.raw_var_weight.detach().clone()
    kernel.double()
    assert torch.equal(kernel.raw_var_weight.detach(), raw.double()), "a trained value is converted, not reset"
    kernel.var_weight = 1.7  # set in float64 now: exact
    kernel.float().double()
    assert float(kernel.var_weight.detach()) == pytest.approx(1.7, rel=1e-15)


def test_a_float64_kernel_computes_float32_inputs_in_float64():
    # was: float32 values returned by a float64 model, and a float64 ExactGP then failed at prediction
    arch = architectures.convnet_gp(depth=1, kernel_size=3, image_size=8)
    kernel = CNNGPKernel(arch, input_shape=(1, 8, 8)).double()
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = kernel(x).to_dense()
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, kernel(x.double()).to_dense(), rtol=0, atol=0)
        half = CNNGPKernel(arch, input_shape=(1, 8, 8))(x.half()).to_dense()  # a float32 kernel of float16 images
    assert half.dtype == torch.float32 and bool(torch.isfinite(half).all())


def test_empty_inputs_give_empty_results():
    # was: "cannot reshape tensor of 0 elements"
    kernel = CNNGPKernel(architectures.convnet_gp(depth=1, kernel_size=3, image_size=8), input_shape=(1, 8, 8))
    x, empty = torch.rand(3, 64), torch.zeros(0, 64)
    with torch.no_grad():
        assert kernel(empty, x).to_dense().shape == (0, 3)
        assert kernel(x, empty).to_dense().shape == (3, 0)
        assert kernel(empty, diag=True).shape == (0,)
        assert kernel(empty).to_dense().shape == (0, 0)


@pytest.mark.parametrize("case", ["rows", "columns", "both", "diag"])
def test_empty_inputs_carry_zero_gradients(case):
    # was: "element 0 of tensors does not require grad" on backward. GPyTorch's RBFKernel back-propagates through
    # K(x, empty) and K(empty, empty) (zero gradients); a sum over no entries depends on nothing, so every gradient
    # is exactly zero, for empty rows and the diagonal too
    x, empty = torch.rand(3, 64, dtype=F64), torch.zeros(0, 64, dtype=F64)
    args = {"rows": (empty, x), "columns": (x, empty), "both": (empty,), "diag": (empty,)}[case]
    diag = case == "diag"
    kernel = CNNGPKernel(_convnet(), input_shape=(1, SIZE, SIZE)).double()
    inputs = [a.clone().requires_grad_(True) for a in args]
    out = kernel(*inputs, diag=diag)
    out = out if diag else out.to_dense()
    assert out.shape == ((0,) if diag else (inputs[0].shape[0], inputs[-1].shape[0]))
    out.sum().backward()
    for grad in (kernel.raw_var_weight.grad, kernel.raw_var_bias.grad):
        assert grad is not None and bool((grad == 0).all())
    for a in inputs:
        assert a.grad is not None and a.grad.shape == a.shape and bool((a.grad == 0).all())


def test_the_cache_keeps_gradients_with_respect_to_the_inputs():
    # was: with frozen hyperparameters the cached result had no graph, so a second saliency step failed
    arch = architectures.convnet_gp(depth=1, kernel_size=3, image_size=8)
    kernel = CNNGPKernel(arch, input_shape=(1, 8, 8)).double().requires_grad_(False)
    gen = torch.Generator().manual_seed(5)
    x, z = torch.rand(3, 64, dtype=torch.float64, generator=gen), torch.rand(4, 64, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        kernel(x, z).to_dense()  # fills the cache
    for _step in range(2):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(kernel(xg, z).to_dense().sum(), xg)
        # independent check: central differences of the summed kernel along a random direction
        d = torch.randn(x.shape, dtype=torch.float64, generator=gen)
        eps = 1e-6
        with torch.no_grad():
            fd = (
                arch.double()((x + eps * d).view(3, 1, 8, 8), z.view(4, 1, 8, 8)).sum()
                - arch.double()((x - eps * d).view(3, 1, 8, 8), z.view(4, 1, 8, 8)).sum()
            ) / (2 * eps)
        assert float((g * d).sum()) == pytest.approx(float(fd), rel=1e-6)
        x = x + 0.01 * g.sign()  # the adversarial step; the next one must work as well


def test_second_derivatives_raise_instead_of_being_wrong():
    # was: d2/d(raw_var_weight)2 of 19,560 by autograd against 285,943 by finite differences
    from gpytorch_cnngp.ops import SecondDerivativeError

    kernel = CNNGPKernel(architectures.convnet_gp(depth=1, kernel_size=3, image_size=8), input_shape=(1, 8, 8))
    x = torch.rand(4, 64, dtype=torch.float64)
    kernel = kernel.double()
    K = kernel(x).to_dense()
    with pytest.raises(SecondDerivativeError, match="second derivatives"):
        torch.autograd.grad(K.sum(), kernel.raw_var_weight, create_graph=True)
    (g,) = torch.autograd.grad(kernel(x).to_dense().sum(), kernel.raw_var_weight)  # first order still works
    assert bool(torch.isfinite(g).all())


def test_no_sub_kernels_as_gpytorch_would_find_them():
    """The override that skips GPyTorch's walk over every submodule hides nothing: that walk finds no kernel."""
    from gpytorch.kernels import Kernel

    kernel = CNNGPKernel(architectures.resnet32_gp(), input_shape=(1, 28, 28))
    assert list(Kernel.named_sub_kernels(kernel)) == list(kernel.named_sub_kernels()) == []
    assert kernel.batch_shape == torch.Size([])
