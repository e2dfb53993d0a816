"""Exactness: the library's kernels against the independent float64 reference (tests/reference_impl.py).

Tolerances: float64 results must agree with the reference to 1e-10 *entrywise* relative error
(``max |got - ref| / |ref|``; every kernel entry here is positive: pixels are non-negative and the
layers keep covariances non-negative). float32 results (same inputs, rounded to float32 first, the
reference still in float64) must agree to 1e-5 relative to the largest entry of the reference.
Measured agreement is <= 2e-15 in float64 and <= 1.5e-7 in float32, so the bounds leave room for
rounding yet catch every wrong formula of tests/mutants.py (see tests/mutation_check.py).

The exact-diagonal rule is checked separately and bitwise (``_check_exact_diagonal``): in value it is
invisible (a generic pair evaluated at rho ~ 1 lands within a few ulps of the self value), so the
observable is that diag(K(X, X)) *is* the self value k(x, x) returned by ``diag=True``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_helpers import describe, entry_rel_err, max_rel_err, mnist_digits
from reference_impl import _apply, _State, conv_taps_1d, kernel, kernel_diag, output_size

from gpytorch_cnngp import Conv2d, ReLU, Sequential, Sum, architectures, resnet_block

RTOL64 = 1e-10
RTOL32 = 1e-5


# ----------------------------------------------------------------------------------------------
# (a) the paper's three architectures on real MNIST digits
# ----------------------------------------------------------------------------------------------
N_TRAIN, N_TEST = 6, 4


@pytest.fixture(scope="module")
def digits():
    return mnist_digits(N_TRAIN, N_TEST)


@pytest.fixture(scope="module", params=["convnet_gp", "residual_cnn_gp", "resnet32_gp"])
def paper_case(request, digits):
    """The model, the library's three kernels and the reference's, for one paper architecture."""
    x, z = digits
    model = architectures.ARCHITECTURES[request.param](image_size=28)
    arch = describe(model)
    # One same-set reference run on the union [x; z] gives K(x, x) (same-set, exact diagonal),
    # K(x, z) (distinct images: the diagonal rule never applies there) and the self values.
    ref_all = kernel(arch, np.concatenate([x, z]))
    ref = {
        "xx": ref_all[:N_TRAIN, :N_TRAIN],
        "xz": ref_all[:N_TRAIN, N_TRAIN:],
        "diag": kernel_diag(arch, x),
    }
    X, Z = torch.from_numpy(x), torch.from_numpy(z)
    with torch.no_grad():
        got = {"xx": model(X).numpy(), "xz": model(X, Z).numpy(), "diag": model(X, diag=True).numpy()}
    return request.param, got, ref


@pytest.mark.parametrize("which", ["xx", "xz", "diag"])
def test_paper_architectures_match_reference_float64(paper_case, which):
    name, got, ref = paper_case
    err = entry_rel_err(got[which], ref[which])
    assert err <= RTOL64, f"{name} K_{which}: entrywise relative error {err:.3g}"


def test_paper_architectures_same_set_diagonal(paper_case):
    """The same-set diagonal is the self value k(x, x) of the reference (exact-diagonal rule)."""
    name, got, ref = paper_case
    err = entry_rel_err(np.diag(got["xx"]), ref["diag"])
    assert err <= RTOL64, f"{name}: diagonal of K(X, X) off by {err:.3g}"
    _check_exact_diagonal(name, got)


def _check_exact_diagonal(name, got):
    """The exact-diagonal rule, observably: K(X, X) is exactly symmetric and its diagonal is *bitwise*
    the self value k(x, x) (what ``diag=True`` returns), not J(rho ~ 1) of a generic pair.

    In value the rule is invisible at 1e-10 (J is smooth at rho = 1, so a generic pair lands within a
    few ulps of the self value); exactness is its specification, hence bitwise equality here.
    """
    assert np.array_equal(got["xx"], got["xx"].T), f"{name}: K(X, X) is not exactly symmetric"
    same = np.diag(got["xx"]) == got["diag"]
    assert same.all(), f"{name}: diagonal differs from the self values at {np.flatnonzero(~same)}"


def test_paper_reference_magnitudes(paper_case):
    """Sanity of the reference itself against the document's orders of magnitude."""
    name, _, ref = paper_case
    top = np.max(ref["xx"])
    expected = {"convnet_gp": (1e11, 1e14), "residual_cnn_gp": (1e15, 1e18), "resnet32_gp": (1e-2, 2.0)}[name]
    assert expected[0] < top < expected[1], f"{name}: reference values {top:.3g} outside {expected}"


# ----------------------------------------------------------------------------------------------
# (b) small architectures covering every geometric and combinator case
# ----------------------------------------------------------------------------------------------
def _stride2():
    return Sequential(
        Conv2d(3, stride=2, var_weight=2.0, var_bias=0.1), ReLU(), Conv2d(3, var_weight=1.5, var_bias=0.2), ReLU()
    )


def _dilation2():
    return Sequential(
        Conv2d(3, dilation=2, var_weight=1.8, var_bias=0.05),
        ReLU(),
        Conv2d(3, dilation=2, stride=2, var_weight=2.2),
        ReLU(),
    )


def _even_k2_same():
    return Sequential(
        Conv2d(2, var_weight=2.0, var_bias=0.1),
        ReLU(),
        Conv2d(2, var_weight=1.7),
        ReLU(),
        Conv2d(2, dilation=2, var_weight=1.2, var_bias=0.05),
        ReLU(),
    )


def _even_k4_same():
    return Sequential(Conv2d(4, var_weight=3.0, var_bias=0.3), ReLU(), Conv2d(4, stride=2, var_weight=2.0), ReLU())


def _even_k4_dilated_strided():
    return Sequential(Conv2d(4, stride=2, dilation=2, var_weight=2.5, var_bias=0.2), ReLU(), Conv2d(2), ReLU())


def _int_padding():
    return Sequential(
        Conv2d(3, padding=0, var_weight=2.0, var_bias=0.1),
        ReLU(),
        Conv2d(5, padding=1, var_weight=1.6),
        ReLU(),
        Conv2d(3, padding=2, stride=2, var_weight=2.4, var_bias=0.3),
        ReLU(),
        Conv2d(2, padding=1, var_weight=1.1),
    )


def _sum_identity():
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        Sum([Sequential(), Sequential(ReLU(), Conv2d(3, var_weight=2.0, var_bias=0.3))]),
        ReLU(),
    )


def _sum_after_relu():
    def block():
        return Sum([Sequential(), Sequential(Conv2d(4, var_weight=2.0, var_bias=0.5), ReLU())])

    return Sequential(block(), block(), Conv2d(4, var_weight=1.5, var_bias=0.5), ReLU())


def _nested_sum():
    inner = Sum(
        [
            Conv2d(1, var_weight=0.5),
            Sequential(ReLU(), Conv2d(3, dilation=2, var_weight=2.0, var_bias=0.2)),
            Sequential(ReLU(), Sum([Sequential(), Conv2d(2, var_weight=0.7)])),
        ]
    )
    return Sequential(Conv2d(3, var_weight=1.5), Sum([Sequential(), inner]), ReLU())


def _resnet_identity_blocks():
    return Sequential(Conv2d(3), resnet_block(), resnet_block(), ReLU())


def _resnet_projection_blocks():
    return Sequential(
        Conv2d(3),
        resnet_block(stride=1, projection_shortcut=True),
        resnet_block(stride=2, projection_shortcut=True, multiplier=2),
        resnet_block(multiplier=2),
        ReLU(),
    )


SMALL = [
    ("stride2", _stride2, 9),
    ("stride2_even_size", _stride2, 8),
    ("dilation2", _dilation2, 10),
    ("even_k2_same", _even_k2_same, 7),
    ("even_k4_same", _even_k4_same, 11),
    ("even_k4_dilated_strided", _even_k4_dilated_strided, 12),
    ("int_padding", _int_padding, 12),
    ("sum_identity", _sum_identity, 8),
    ("sum_after_relu", _sum_after_relu, 8),
    ("nested_sum", _nested_sum, 9),
    ("resnet_block_identity", _resnet_identity_blocks, 8),
    ("resnet_block_projection", _resnet_projection_blocks, 10),
    ("resnet_block_projection_odd", _resnet_projection_blocks, 7),
]


def _with_readout(body, size):
    side = output_size(describe(body), size)
    return Sequential(body, Conv2d(side, padding=0, var_weight=1.3, var_bias=0.2))


def _random_inputs(size, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((4, 3, size, size)).astype(np.float32).astype(np.float64)
    z = rng.random((4, 3, size, size)).astype(np.float32).astype(np.float64)
    return x, z


@pytest.fixture(scope="module", params=SMALL, ids=[case[0] for case in SMALL])
def small_case(request):
    name, factory, size = request.param
    model = _with_readout(factory(), size)
    arch = describe(model)
    x, z = _random_inputs(size, seed=sum(map(ord, name)))
    ref_all = kernel(arch, np.concatenate([x, z]))
    n = len(x)
    ref = {
        "xx": ref_all[:n, :n],
        "xz": ref_all[:n, n:],
        "diag": kernel_diag(arch, x),
        "matched": np.diag(ref_all[:n, n:]).copy(),  # k(x_i, z_i)
    }
    return name, model, x, z, ref


def _library(model, x, z, dtype):
    X, Z = torch.from_numpy(x).to(dtype), torch.from_numpy(z).to(dtype)
    with torch.no_grad():
        out = {"xx": model(X), "xz": model(X, Z), "diag": model(X, diag=True), "matched": model(X, Z, diag=True)}
    for key, value in out.items():
        assert value.dtype == dtype, f"K_{key} came back as {value.dtype}, not {dtype}"
    return {key: value.numpy() for key, value in out.items()}


def test_small_architectures_float64(small_case):
    name, model, x, z, ref = small_case
    got = _library(model, x, z, torch.float64)
    errors = {key: entry_rel_err(got[key], ref[key]) for key in ref}
    assert max(errors.values()) <= RTOL64, f"{name}: {errors}"
    _check_exact_diagonal(name, got)


def test_small_architectures_float32(small_case):
    name, model, x, z, ref = small_case
    got = _library(model, x, z, torch.float32)
    errors = {key: max_rel_err(got[key], ref[key]) for key in ref}
    assert max(errors.values()) <= RTOL32, f"{name}: {errors}"
    _check_exact_diagonal(name, got)


# ----------------------------------------------------------------------------------------------
# the reference's own geometry, checked against torch.nn.functional.conv2d (a box filter)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "k, stride, padding, dilation",
    [(3, 1, 0, 1), (3, 2, 1, 1), (5, 2, 2, 2), (2, 1, 1, 1), (4, 3, 0, 2), (1, 2, 0, 1), (3, 1, 2, 3)],
)
def test_reference_integer_padding_matches_torch_box_filter(k, stride, padding, dilation):
    """Integer padding must mean exactly torch's conv2d geometry; check the reference's window sums."""
    rng = np.random.default_rng(0)
    m = rng.random((2, 1, 11, 11))
    arch = ("seq", [("conv", {"k": k, "stride": stride, "padding": padding, "dilation": dilation, "vw": k * k})])
    side = output_size(arch, 11)
    want = torch.nn.functional.conv2d(
        torch.from_numpy(m), torch.ones(1, 1, k, k, dtype=torch.float64), None, stride, padding, dilation
    ).numpy()
    assert want.shape[-1] == side
    # the map on one array, through the reference's own layer code
    got = _apply(arch, _State(None, m[:, 0], m[:, 0], True)).xx
    np.testing.assert_allclose(got, want[:, 0], rtol=1e-13)


def test_reference_even_k_same_offsets():
    """Even k under "same": offsets -(k/2 - 1) ... +k/2 (times the dilation), clipped to the image."""
    assert conv_taps_1d(6, 4, 1, "same", 1)[2] == (1, 2, 3, 4)
    assert conv_taps_1d(6, 4, 1, "same", 1)[0] == (0, 1, 2)
    assert conv_taps_1d(6, 2, 1, "same", 1)[5] == (5,)
    assert conv_taps_1d(9, 4, 2, "same", 2)[2] == (2, 4, 6, 8)
    assert len(conv_taps_1d(7, 3, 2, "same", 1)) == 4
