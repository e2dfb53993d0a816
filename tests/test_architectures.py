"""The Myrtle networks of Shankar et al. (2020): their layers, their errors, their configurations and their
kernel against the independent float64 reference of ``tests/reference_full.py`` and random finite networks.

The reference architectures are written out here as plain data from the published layer counts, not read
from the library's layer tree, so a wrong count, order or variance in :func:`myrtle` shows as a wrong value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_full import kernel
from test_monte_carlo import (
    Z,
    allowance,
    check_against_kernel,
    make_inputs,
    sample_second_moments,
    second_moment_errors,
)

from gpytorch_cnngp import AvgPool2d, Conv2d, Dense, GlobalAvgPool2d, ReLU, Sequential, architectures, gram
from gpytorch_cnngp.architectures import ARCHITECTURES, PAPER_RESULTS, myrtle
from gpytorch_cnngp.distributed import ArchitectureSpec

#: The published (Conv2d(3), ReLU) blocks per stage of each depth.
PUBLISHED = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}


def _expected_kinds(depth: int) -> list[type]:
    a, b, c = PUBLISHED[depth]
    conv_relu = [Conv2d, ReLU]
    return conv_relu * a + [AvgPool2d] + conv_relu * b + [AvgPool2d] + conv_relu * c + [GlobalAvgPool2d, Dense]


def _reference_arch(depth: int, vw: float, vb: float) -> tuple:
    """The Myrtle network in the reference's plain data (three 2x2 pools at 32x32 written as a global pool)."""
    conv = ("conv", {"k": 3, "padding": "same", "vw": vw, "vb": vb})
    a, b, c = PUBLISHED[depth]
    pool = ("avgpool", {"k": 2})
    body = [conv, ("relu",)] * a + [pool] + [conv, ("relu",)] * b + [pool] + [conv, ("relu",)] * c
    return ("seq", [*body, ("gap",), ("dense", {"vw": vw, "vb": vb})])


@pytest.mark.parametrize("depth", [5, 7, 10])
def test_layers_of_each_depth(depth):
    model = myrtle(depth, image_size=28, var_weight=1.5, var_bias=0.25)
    assert isinstance(model, Sequential)
    layers = list(model.layers)
    assert [type(layer) for layer in layers] == _expected_kinds(depth)
    weighted = [layer for layer in layers if isinstance(layer, (Conv2d, Dense))]
    assert len(weighted) == depth  # the depth counts the weighted layers: convolutions and the readout
    for layer in weighted:
        assert (float(layer.var_weight), float(layer.var_bias)) == (1.5, 0.25)
    for layer in layers:
        if isinstance(layer, Conv2d):
            assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == (3, 1, "same", 1)
        if isinstance(layer, AvgPool2d):
            assert (layer.kernel_size, layer.stride, layer.padding) == (2, 2, 0)


def test_defaults_are_he_scaled_without_bias():
    model = myrtle()
    assert [type(layer) for layer in model.layers] == _expected_kinds(5)
    for layer in model.layers:
        if isinstance(layer, (Conv2d, Dense)):
            assert (float(layer.var_weight), float(layer.var_bias)) == (2.0, 0.0)


@pytest.mark.parametrize("depth", [0, 4, 6, 8, 11, 5.0, True, "5", None])
def test_other_depths_are_refused(depth):
    with pytest.raises(ValueError, match=r"Myrtle depth must be one of 5, 7, 10, got"):
        myrtle(depth)


@pytest.mark.parametrize("size", [0, 3, -4, 4.0, 28.0, True, "28", None])
def test_bad_image_sizes_are_refused(size):
    with pytest.raises(ValueError, match=r"image_size must be an integer >= 4, got"):
        myrtle(5, image_size=size)


@pytest.mark.parametrize("size, final", [(4, 1), (5, 1), (8, 2), (9, 2), (28, 7), (32, 8)])
def test_pools_floor_odd_sizes_like_torch(size, final):
    """The map the global pool averages: two 2x2 pools, each flooring as torch's AvgPool2d."""
    model = myrtle(7, image_size=size)
    x = torch.zeros(1, 1, size, size)
    pooled = torch.nn.functional.avg_pool2d(torch.nn.functional.avg_pool2d(x, 2), 2)
    assert pooled.shape[-1] == final
    side = (size, size)
    for layer in model.layers[:-2]:  # up to the global pool
        side = layer.out_size(side)
    assert side == (final, final)


@pytest.mark.parametrize(
    "depth, size, vw, vb, cross",
    [
        (5, 8, 2.0, 0.0, False),  # the defaults, the same-set kernel (exact diagonal)
        (7, 9, 1.7, 0.1, True),  # odd size floored by both pools, other variances, a cross kernel
        (10, 8, 2.0, 0.05, False),
    ],
)
def test_kernel_matches_the_float64_reference(depth, size, vw, vb, cross):
    g = torch.Generator().manual_seed(depth * 100 + size)
    x = torch.rand(3, 1, size, size, generator=g, dtype=torch.float64)
    z = torch.rand(2, 1, size, size, generator=g, dtype=torch.float64) if cross else None
    model = myrtle(depth, image_size=size, var_weight=vw, var_bias=vb)
    with torch.no_grad():
        got = gram(model, x, z, backend="eager").numpy()
    want = kernel(_reference_arch(depth, vw, vb), x.numpy(), None if z is None else z.numpy())
    assert got.shape == want.shape and (want > 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0.0)


def test_configurations_are_registered_without_paper_results():
    names = ("myrtle5_gp", "myrtle7_gp", "myrtle10_gp")
    assert set(names) <= set(ARCHITECTURES) and not set(names) & set(PAPER_RESULTS)
    for name, depth in zip(names, (5, 7, 10), strict=True):
        spec = ArchitectureSpec.from_name(name, image_size=12)
        # what a kernel store records: every argument of the factory, the depth fixed by the name
        assert dict(spec.kwargs) == {"image_size": 12, "var_weight": 2.0, "var_bias": 0.0}
        model = spec.build()
        assert [type(layer) for layer in model.layers] == _expected_kinds(depth)
        with pytest.raises(ValueError, match="takes no argument"):
            ArchitectureSpec.from_name(name, depth=7)
    assert architectures.ARCHITECTURES["myrtle10_gp"].__name__ == "myrtle10_gp"


def test_global_pool_is_the_published_chain_of_2x2_pools():
    """On a 16x16 input the third stage's map is 4x4, which the published network (made for 32x32, 8x8 there)
    would take to 1x1 with 2x2 pools: the reference with those pools in place of the global one agrees."""
    g = torch.Generator().manual_seed(16)
    x = torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64)
    seq = _reference_arch(5, 2.0, 0.0)[1]
    assert seq[-2] == ("gap",)
    published = ("seq", [*seq[:-2], ("avgpool", {"k": 2}), ("avgpool", {"k": 2}), seq[-1]])
    with torch.no_grad():
        got = gram(myrtle(5, image_size=16), x, backend="eager").numpy()
    np.testing.assert_allclose(got, kernel(published, x.numpy()), rtol=1e-12, atol=0.0)


def test_finite_myrtle_networks_match_the_kernel():
    """Monte-Carlo: random finite Myrtle-5 networks (``model.nn``, 32 channels) have the kernel's second moments
    within ``Z`` standard errors plus the ``1 / C`` finite-width allowance of tests/test_monte_carlo.py, and the
    same samples reject the kernel that drops the global pool's covariances between positions."""
    model = myrtle(5, image_size=8)
    x = make_inputs(in_channels=1, size=8)
    width = 32
    S = sample_second_moments(model, x, channels=width, n_networks=600, out_channels=32, seed=90)
    check_against_kernel(second_moment_errors(S, model(x)), allowance(width, exact_diagonal=False), "Myrtle-5")
    same_location_only = Sequential(*(layer for layer in model.layers if not isinstance(layer, GlobalAvgPool2d)))
    e = second_moment_errors(S, same_location_only(x))
    assert (e.err.abs() > Z * e.se + allowance(width, exact_diagonal=False)).any(), "the samples cannot tell"


def test_pooled_cnn_gp_ml2_is_pooled_cnn_gp_without_biases():
    # the configuration records its variances, and without biases the kernel is positively homogeneous:
    # k(a x, b z) = a b k(x, z) for a, b > 0 (ReLU is, and every layer is linear in its input covariance), which
    # any bias breaks
    spec = ArchitectureSpec.from_name("pooled_cnn_gp_ml2", image_size=12)
    assert dict(spec.kwargs) == {"image_size": 12, **architectures.POOLED_ML2_VARIANCES, "global_pool": False}
    assert "pooled_cnn_gp_ml2" in ARCHITECTURES and "pooled_cnn_gp_ml2" not in PAPER_RESULTS
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 1, 12, 12, generator=g, dtype=torch.float64)
    z = torch.rand(2, 1, 12, 12, generator=g, dtype=torch.float64)
    k = gram(spec.build(), x, z)
    np.testing.assert_allclose(gram(spec.build(), 3.0 * x, 0.5 * z), 1.5 * k, rtol=1e-12)
    biased = architectures.pooled_cnn_gp(image_size=12, var_weight=architectures.POOLED_ML2_VARIANCES["var_weight"])
    assert not np.allclose(gram(biased, 3.0 * x, 0.5 * z), 1.5 * gram(biased, x, z), rtol=1e-6)
