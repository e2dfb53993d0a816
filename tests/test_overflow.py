"""Kernel values that fit the dtype are computed; values that do not are an error, never inf or NaN."""

from __future__ import annotations

import pytest
import torch

from gpytorch_cnngp import Conv2d, Dense, ReLU, Sequential, architectures, gram


def _images(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_a_deep_float32_network_whose_values_fit_is_computed(backend):
    # was: all inf for a 21-layer ConvNet GP in float32, although its values (about 1.2e38) fit float32
    model = architectures.convnet_gp(depth=21)
    x = _images(3)
    got = gram(model, x, backend=backend)
    want = gram(model.double(), x.double(), backend="eager")  # float64 reference
    assert float(want.max()) < torch.finfo(torch.float32).max < 10 * float(want.max())  # near the edge
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0.0)
    diag = model(x, diag=True)
    assert diag.dtype == torch.float32
    torch.testing.assert_close(diag.double(), want.diagonal(), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("depth", [20, 21])
def test_the_diagonal_stays_bitwise_gram_diag_where_float32_pairs_overflow(backend, depth):
    # was: at 20 layers the native float32 pairs overflow, K(X, X) was computed in float64 and rounded, and its
    # diagonal missed the float32 diag=True values by an ulp or so (all 40 of 40 differed)
    from gpytorch_cnngp import gram_diag

    model = architectures.convnet_gp(depth=depth)
    x = _images(4)
    got = gram(model, x, backend=backend)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    diag = gram_diag(model, x)
    assert torch.equal(got.diagonal(), diag)
    assert torch.equal(got.diagonal(), model(x, diag=True))
    # the diagonal is the float32 self pass, within float32 rounding of the float64 one
    want = gram_diag(model.double(), x.double())
    torch.testing.assert_close(diag.double(), want, rtol=1e-5, atol=0.0)


def test_values_beyond_float32_are_an_error_that_suggests_float64():
    # was: all NaN at 22 layers and more
    model = architectures.convnet_gp(depth=22)
    with pytest.raises(ValueError, match=r"beyond the range of torch.float32 .*compute in float64"):
        gram(model, _images(2))
    with pytest.raises(ValueError, match="beyond the range of torch.float32"):
        model(_images(2), diag=True)
    assert bool(torch.isfinite(gram(model.double(), _images(2, torch.float64))).all())


def test_values_beyond_float64_are_an_error():
    model = Sequential(*[m for _ in range(3) for m in (Conv2d(3, var_weight=1e150), ReLU())], Dense())
    with pytest.raises(ValueError, match="overflow even float64"):
        gram(model, _images(2, torch.float64))


def _bias_free() -> Sequential:
    """A network without biases: its kernel is homogeneous of degree 2 in the images, k(s x, s z) = s^2 k(x, z)."""
    return Sequential(
        Conv2d(3, var_weight=2.0), ReLU(), Conv2d(3, var_weight=2.0), ReLU(), Conv2d(8, padding=0, var_weight=2.0)
    )


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_values_below_float32_are_an_error_that_suggests_float64(backend):
    # was: float32 images scaled by 1e-30 gave an all-zero kernel with no word (the values are about 1e-60)
    model = _bias_free()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    small = (x * 1e-30).float()
    with pytest.raises(ValueError, match=r"below the range of torch.float32 .*compute in float64"):
        gram(model, small, backend=backend)
    with pytest.raises(ValueError, match="below the range of torch.float32"):
        model(small, diag=True)
    # in float64 the same images give the scaled kernel (homogeneity: an independent check of the values)
    want = gram(model.double(), x, backend="eager") * 1e-60
    torch.testing.assert_close(gram(model.double(), small.double(), backend=backend), want, rtol=1e-6, atol=0.0)
    # scaled less, the values fit float32 and are computed as before
    fits = gram(model, (x * 1e-15).float(), backend=backend).double()
    torch.testing.assert_close(fits, gram(model.double(), x, backend="eager") * 1e-30, rtol=1e-5, atol=0.0)


def test_kernel_below_float32_is_an_error_through_cnngpkernel():
    from gpytorch_cnngp import CNNGPKernel

    kernel = CNNGPKernel(_bias_free(), input_shape=(1, 8, 8))
    small = torch.rand(4, 64, generator=torch.Generator().manual_seed(2)) * 1e-30
    with torch.no_grad(), pytest.raises(ValueError, match="below the range of torch.float32"):
        kernel(small).to_dense()


def test_exact_zeros_of_blank_images_are_not_underflow():
    # a blank image under a network without biases has variance exactly 0: not an error, in float32 or float64
    model = _bias_free()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    x[1] = 0.0
    for dtype in (torch.float32, torch.float64):
        K = gram(model, x.to(dtype))
        assert bool((K[1] == 0).all()) and bool((K[:, 1] == 0).all())
        torch.testing.assert_close(K.double(), gram(model.double(), x.double(), backend="eager"), rtol=1e-5, atol=0)
