"""Pooling layers and the full-spatial-covariance path: AvgPool2d and GlobalAvgPool2d (with Dense
readouts, ReLU / LeakyReLU / Erf) against the independent float64 reference ``tests/reference_full.py``,
closed forms by hand, invariants, Monte-Carlo convergence of the finite networks, symmetry / PSD,
float32 precision, errors and the GPyTorch kernel.

Tolerances: float64 results agree with the reference to 1e-10 entrywise relative error (every entry
here is positive: non-negative pixels and covariance-preserving layers); float32 results (inputs
rounded to float32 first, the reference still float64) to 1e-5 relative to the largest entry.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from reference_full import describe, kernel, kernel_diag, output_size, pool_matrix
from reference_helpers import entry_rel_err, max_rel_err, mnist_digits
from reference_impl import kernel as kernel_positionwise
from reference_impl import relu_cov
from test_monte_carlo import (
    Z,
    allowance,
    check_against_kernel,
    make_inputs,
    sample_second_moments,
    second_moment_errors,
)

from gpytorch_cnngp import (
    AvgPool2d,
    CNNGPKernel,
    Conv2d,
    Dense,
    Erf,
    GlobalAvgPool2d,
    LeakyReLU,
    ReLU,
    Sequential,
    Sum,
    gram,
    settings,
)
from gpytorch_cnngp.state import Requirements

F64 = torch.float64
RTOL64 = 1e-10
RTOL32 = 1e-5


def _images(n: int, c: int, size: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g, dtype=F64).to(dtype)


# ----------------------------------------------------------------------------------------------
# (0) the reference's own geometry and consistency
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, stride, padding", [(2, None, 0), (3, 1, 1), (3, 2, 1), (2, 1, 1), (3, None, 0), (1, 1, 0)])
def test_reference_pool_matrix_is_torch_avg_pool2d(k, stride, padding):
    """The reference's averaging matrix B applied to a map is torch's AvgPool2d(count_include_pad=True)."""
    rng = np.random.default_rng(k + 10 * (stride or 0) + 100 * padding)
    m = rng.standard_normal((7, 8))
    ho, wo, b = pool_matrix(7, 8, k, stride, padding)
    want = torch.nn.functional.avg_pool2d(
        torch.from_numpy(m)[None, None], k, stride, padding, count_include_pad=True
    ).numpy()[0, 0]
    assert want.shape == (ho, wo)
    np.testing.assert_allclose(b @ m.ravel(), want.ravel(), rtol=1e-14, atol=1e-15)


def test_full_reference_equals_positionwise_reference_without_pooling():
    """With conv / ReLU / Sum only, the full-covariance reference reproduces tests/reference_impl.py
    (a different formulation: one number per position)."""
    arch = (
        "seq",
        [
            ("conv", {"k": 4, "vw": 2.0, "vb": 0.1}),
            ("relu",),
            ("conv", {"k": 3, "stride": 2, "padding": 1, "vw": 1.5}),
            ("sum", [("seq", []), ("seq", [("relu",), ("conv", {"k": 2, "dilation": 2, "vw": 1.2, "vb": 0.3})])]),
            ("relu",),
            ("conv", {"k": 4, "padding": 0, "vw": 1.3, "vb": 0.2}),
        ],
    )
    rng = np.random.default_rng(1)
    x, z = rng.random((3, 2, 8, 8)), rng.random((2, 2, 8, 8))
    assert entry_rel_err(kernel(arch, x, z), kernel_positionwise(arch, x, z)) < 1e-13
    assert entry_rel_err(kernel(arch, x), kernel_positionwise(arch, x)) < 1e-13


# ----------------------------------------------------------------------------------------------
# (1) agreement with the reference
# ----------------------------------------------------------------------------------------------
def _relu_pool_gap():
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        ReLU(),
        AvgPool2d(2),
        Conv2d(3, var_weight=1.5, var_bias=0.2),
        ReLU(),
        GlobalAvgPool2d(),
        Dense(var_weight=1.3, var_bias=0.1),
    )


def _even_leaky_pool_s1p1_erf():
    return Sequential(
        Conv2d(4, var_weight=3.0, var_bias=0.3),
        LeakyReLU(0.2),
        AvgPool2d(3, stride=1, padding=1),
        Conv2d(3, stride=2, var_weight=2.0, var_bias=0.05),
        Erf(),
        GlobalAvgPool2d(),
        Dense(var_weight=2.0, var_bias=0.3),
    )


def _dilated_intpad_pool_stride2_pad1():
    return Sequential(
        Conv2d(3, dilation=2, var_weight=1.8, var_bias=0.05),
        ReLU(),
        AvgPool2d(2, stride=1),
        Conv2d(2, padding=1, var_weight=2.2),
        Erf(),
        AvgPool2d(3, stride=2, padding=1),
        Dense(var_weight=1.1, var_bias=0.2),
    )


def _pool_first():
    """Pooling applied to the raw images, then a nonlinearity on the full covariance."""
    return Sequential(
        AvgPool2d(2),
        Erf(),
        Conv2d(3, var_weight=2.5, var_bias=0.1),
        ReLU(),
        GlobalAvgPool2d(),
        Dense(var_weight=1.0, var_bias=0.0),
    )


def _sum_with_pool_branch():
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        LeakyReLU(0.5),
        Sum([AvgPool2d(2), Sequential(Conv2d(3, stride=2, var_weight=1.4, var_bias=0.2), ReLU())]),
        Sum([Sequential(), Sequential(Erf(), AvgPool2d(3, stride=1, padding=1), Conv2d(1, var_weight=0.7))]),
        ReLU(),
        GlobalAvgPool2d(),
        Dense(var_weight=1.6, var_bias=0.05),
    )


def _pool_before_dense_only():
    """Full path only at the very end: two ordinary layers, then AvgPool2d and a Dense readout."""
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.3),
        ReLU(),
        Conv2d(2, var_weight=1.5, var_bias=0.1),
        LeakyReLU(-0.3),
        AvgPool2d(3, stride=2, padding=1),
        Dense(var_weight=1.2, var_bias=0.4),
    )


def _no_pool_erf_leaky_conv_readout():
    """No pooling at all (the position-wise path) with the new nonlinearities and a conv readout."""
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        Erf(),
        Conv2d(2, stride=2, var_weight=3.0, var_bias=0.2),
        LeakyReLU(0.1),
        Conv2d(3, padding=1, var_weight=1.7),
        ReLU(),
    )


CASES = [
    # name, factory, image size, channels
    ("relu_pool_gap", _relu_pool_gap, 6, 1),
    ("relu_pool_gap_odd", _relu_pool_gap, 7, 2),
    ("even_leaky_pool_s1p1_erf", _even_leaky_pool_s1p1_erf, 7, 2),
    ("dilated_intpad_pool_s2p1", _dilated_intpad_pool_stride2_pad1, 8, 1),
    ("pool_first", _pool_first, 8, 2),
    ("sum_with_pool_branch", _sum_with_pool_branch, 8, 1),
    ("pool_before_dense_only", _pool_before_dense_only, 7, 2),
    ("no_pool_erf_leaky", _no_pool_erf_leaky_conv_readout, 8, 2),
]


def _finish(body, size):
    """End in a 1x1 map: a Dense readout unless the body already ends in one."""
    side = output_size(describe(body), size)
    return body if side == 1 else Sequential(body, Dense(var_weight=1.3, var_bias=0.2))


def _inputs(size, c, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((4, c, size, size)).astype(np.float32).astype(np.float64)
    z = rng.random((3, c, size, size)).astype(np.float32).astype(np.float64)
    return x, z


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    name, factory, size, c = request.param
    model = _finish(factory(), size)
    arch = describe(model)
    x, z = _inputs(size, c, seed=sum(map(ord, name)))
    n = len(x)
    ref_all = kernel(arch, np.concatenate([x, z]))
    ref = {"xx": ref_all[:n, :n], "xz": ref_all[:n, n:], "diag": kernel_diag(arch, x)}
    # the distinct-sets entry point of the reference agrees with its same-set one
    assert entry_rel_err(kernel(arch, x, z), ref["xz"]) < 1e-13
    return name, model, x, z, ref


def _library(model, x, z, dtype):
    X, Z_ = torch.from_numpy(x).to(dtype), torch.from_numpy(z).to(dtype)
    with torch.no_grad():
        out = {"xx": model(X), "xz": model(X, Z_), "diag": model(X, diag=True)}
    for key, value in out.items():
        assert value.dtype == dtype, f"K_{key} came back as {value.dtype}, not {dtype}"
    return {key: value.numpy() for key, value in out.items()}


@pytest.mark.parametrize("path", ["offsets", "full"])
def test_reference_agreement_float64(case, path):
    name, model, x, z, ref = case
    with settings.spatial_path(path):  # maps per spatial offset, or per pair of positions
        got = _library(model, x, z, F64)
    errors = {key: entry_rel_err(got[key], ref[key]) for key in ref}
    assert max(errors.values()) <= RTOL64, f"{name}: {errors}"
    # exact diagonal: K(X, X) exactly symmetric, its diagonal bitwise the self values of diag=True
    assert np.array_equal(got["xx"], got["xx"].T), f"{name}: K(X, X) not exactly symmetric"
    assert np.array_equal(np.diag(got["xx"]), got["diag"]), f"{name}: diagonal differs from diag=True"


def test_reference_agreement_float32(case):
    name, model, x, z, ref = case
    got = _library(model, x, z, torch.float32)
    errors = {key: max_rel_err(got[key], ref[key]) for key in ref}
    assert max(errors.values()) <= RTOL32, f"{name}: {errors}"


def _random_model(seed: int):
    """A random small architecture: 2-3 blocks of conv (k 1..4, stride 1/2, dilation 1/2, padding "same"/0/1)
    + a random nonlinearity, sometimes inside a residual Sum, each block sometimes followed by an
    AvgPool2d (k 2/3, stride default/1/2, padding 0..k//2; at least one pool in all), then sometimes a
    GlobalAvgPool2d, then Dense. Layers that would not fit the map are redrawn."""
    rng = np.random.default_rng(seed)
    size, c = int(rng.integers(6, 9)), int(rng.integers(1, 3))
    side, layers, pools = size, [], 0

    def nonlinearity():
        kind = int(rng.integers(3))
        return [ReLU(), LeakyReLU(float(rng.uniform(-0.5, 0.5))), Erf()][kind]

    def fits(layer):
        try:
            return output_size(describe(layer), side)
        except ValueError:
            return None

    n_blocks = int(rng.integers(2, 4))
    for block in range(n_blocks):
        while True:
            conv = Conv2d(
                int(rng.integers(1, 5)),
                stride=int(rng.choice([1, 1, 2])),
                padding=["same", 0, 1][int(rng.integers(3))],
                dilation=int(rng.choice([1, 2])),
                var_weight=float(rng.uniform(0.5, 3.0)),
                var_bias=float(rng.uniform(0.0, 0.5)),
            )
            new = fits(conv)
            if new is not None and new >= 2:
                break
        side = new
        layers += [conv, nonlinearity()]
        if rng.random() < 0.4:
            branch = Sequential(Conv2d(3, var_weight=float(rng.uniform(0.5, 2.0)), var_bias=0.1), nonlinearity())
            layers.append(Sum([Sequential(), branch]))
        if rng.random() < 0.6 or (block == n_blocks - 1 and pools == 0):
            for _ in range(20):
                k = int(rng.integers(2, 4))
                pool = AvgPool2d(k, stride=[None, 1, 2][int(rng.integers(3))], padding=int(rng.integers(0, k // 2 + 1)))
                new = fits(pool)
                if new is not None:
                    side, pools = new, pools + 1
                    layers.append(pool)
                    break
    if rng.random() < 0.5:
        layers.append(GlobalAvgPool2d())
    layers.append(Dense(var_weight=float(rng.uniform(0.5, 2.0)), var_bias=float(rng.uniform(0.0, 0.3))))
    return Sequential(*layers), size, c


@pytest.mark.parametrize("seed", range(6))
def test_random_architectures_float64(seed):
    model, size, c = _random_model(seed)
    arch = describe(model)
    assert "avgpool" in repr(arch)
    x, z = _inputs(size, c, seed=100 + seed)
    got = _library(model, x, z, F64)
    want = {"xx": kernel(arch, x), "xz": kernel(arch, x, z), "diag": kernel_diag(arch, x)}
    errors = {key: entry_rel_err(got[key], want[key]) for key in want}
    assert max(errors.values()) <= RTOL64, f"{model}: {errors}"


def test_matched_pairs_agree_with_reference():
    """``model(X, Z, diag=True)`` (k(x_i, z_i)) through a pooled network."""
    model = _finish(_relu_pool_gap(), 6)
    x, z = _inputs(6, 2, seed=5)
    z = z[:3]
    x = x[:3]
    ref = np.diag(kernel(describe(model), x, z))
    with torch.no_grad():
        got = model(torch.from_numpy(x), torch.from_numpy(z), diag=True).numpy()
    assert entry_rel_err(got, ref) <= RTOL64


def test_non_square_images():
    """A 5x7 map: pooling and the readouts act on each axis separately (rectangular selection matrices)."""
    model = Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.1),
        Erf(),
        AvgPool2d(2, stride=1, padding=1),
        Conv2d(2, stride=2, var_weight=1.5),
        LeakyReLU(0.3),
        GlobalAvgPool2d(),
        Dense(var_weight=1.2, var_bias=0.1),
    )
    rng = np.random.default_rng(17)
    x, z = rng.random((3, 2, 5, 7)), rng.random((2, 2, 5, 7))
    arch = describe(model)
    got = _library(model, x, z, F64)
    assert entry_rel_err(got["xz"], kernel(arch, x, z)) <= RTOL64
    assert entry_rel_err(got["xx"], kernel(arch, x)) <= RTOL64
    assert entry_rel_err(got["diag"], kernel_diag(arch, x)) <= RTOL64


def test_mnist_digits_cropped():
    """Real digits (the central 8x8 crop of two train and two test digits) through a pooled network."""
    x, z = mnist_digits(2, 2)
    x, z = x[:, :, 10:18, 10:18], z[:, :, 10:18, 10:18]
    model = _finish(_even_leaky_pool_s1p1_erf(), 8)
    arch = describe(model)
    with torch.no_grad():
        got_xz = model(torch.from_numpy(x), torch.from_numpy(z)).numpy()
        got_xx = model(torch.from_numpy(x)).numpy()
    assert entry_rel_err(got_xz, kernel(arch, x, z)) <= RTOL64
    assert entry_rel_err(got_xx, kernel(arch, x)) <= RTOL64


# ----------------------------------------------------------------------------------------------
# (2) closed forms by hand
# ----------------------------------------------------------------------------------------------
X22 = np.array([[0.3, 1.2], [-0.7, 2.0]])
Z22 = np.array([[1.5, -0.4], [0.25, 0.9]])


def _pair(model, x, z):
    with torch.no_grad():
        return float(model(torch.from_numpy(x)[None, None], torch.from_numpy(z)[None, None])[0, 0])


@pytest.mark.parametrize("pool", ["gap", "avgpool2"])
def test_linear_pool_dense_on_2x2_closed_form(pool):
    """Pooling a 2x2 map to one pixel and reading it out: vb + vw * (sum x)(sum z) / 16."""
    vw, vb = 1.7, 0.3
    model = Sequential(GlobalAvgPool2d() if pool == "gap" else AvgPool2d(2), Dense(var_weight=vw, var_bias=vb))
    want = vb + vw * X22.sum() * Z22.sum() / 16
    assert _pair(model, X22, Z22) == pytest.approx(want, rel=1e-13)


def test_avgpool_padded_2x2_closed_form():
    """AvgPool2d(2, stride=1, padding=1) on a 2x2 image gives a 3x3 map whose windows hold, row by row:
    x00 | x00 + x01 | x01 / x00 + x10 | all four | x01 + x11 / x10 | x10 + x11 | x11 (each / 4)."""

    def windows(m):
        (a, b), (c, d) = m
        return np.array([a, a + b, b, a + c, a + b + c + d, b + d, c, c + d, d]) / 4

    vw, vb = 2.5, 0.1
    model = Sequential(AvgPool2d(2, stride=1, padding=1), Dense(var_weight=vw, var_bias=vb))
    want = vb + vw * np.mean(windows(X22) * windows(Z22))
    assert _pair(model, X22, Z22) == pytest.approx(want, rel=1e-13)


def test_relu_gap_on_one_channel_closed_form():
    """One channel: the input covariance between pixels p of x and q of z has correlation +-1, so
    E[relu(x_p g) relu(z_q g)] = x_p z_q / 2 when x_p z_q > 0 and 0 otherwise. GlobalAvgPool2d pairs
    *every* p with *every* q (independent taps)."""
    vw, vb = 1.4, 0.2
    model = Sequential(ReLU(), GlobalAvgPool2d(), Dense(var_weight=vw, var_bias=vb))
    prod = np.outer(X22.ravel(), Z22.ravel())
    want = vb + vw * np.where(prod > 0, prod / 2, 0.0).mean()
    assert _pair(model, X22, Z22) == pytest.approx(want, rel=1e-13)
    # and the same with the reference's ReLU formula written out
    assert want == pytest.approx(
        vb + vw * relu_cov(prod, np.outer(X22.ravel() ** 2, np.ones(4)), np.outer(np.ones(4), Z22.ravel() ** 2)).mean(),
        rel=1e-13,
    )


def test_conv_gap_dense_multichannel_closed_form():
    """Linear net: Conv2d(1) -> GlobalAvgPool2d -> Dense on C = 2 channels is
    vb + vw * vw1 * (1 / C) sum_c mean(x_c) mean(z_c) (+ vw * vb1 from the conv bias)."""
    rng = np.random.default_rng(3)
    x, z = rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((1, 2, 3, 3))
    vw1, vb1, vw, vb = 1.9, 0.15, 0.8, 0.05
    model = Sequential(Conv2d(1, var_weight=vw1, var_bias=vb1), GlobalAvgPool2d(), Dense(var_weight=vw, var_bias=vb))
    means_x, means_z = x[0].mean(axis=(1, 2)), z[0].mean(axis=(1, 2))
    want = vb + vw * (vb1 + vw1 * np.mean(means_x * means_z))
    with torch.no_grad():
        got = float(model(torch.from_numpy(x), torch.from_numpy(z))[0, 0])
    assert got == pytest.approx(want, rel=1e-13)


# ----------------------------------------------------------------------------------------------
# (3) invariants
# ----------------------------------------------------------------------------------------------
def _bodies():
    return {
        "relu_stack": (
            Sequential(Conv2d(3, var_weight=2.0, var_bias=0.2), ReLU(), Conv2d(3, stride=2, var_weight=1.5), ReLU()),
            8,
        ),
        "erf_leaky_sum": (
            Sequential(
                Conv2d(4, var_weight=2.5, var_bias=0.1),
                Erf(),
                Sum([Sequential(), Sequential(Conv2d(3, var_weight=1.3, var_bias=0.2), LeakyReLU(0.3))]),
                LeakyReLU(0.1),
            ),
            7,
        ),
        "pooled": (
            Sequential(Conv2d(3, var_weight=2.0), ReLU(), AvgPool2d(2), Conv2d(2, var_weight=1.4), Erf()),
            8,
        ),
    }


@pytest.mark.parametrize("readout", ["dense", "conv"])
@pytest.mark.parametrize("name", sorted(_bodies()))
def test_avgpool1_before_readout_changes_nothing(name, readout):
    """AvgPool2d(1) is the identity, but it forces every earlier layer onto the full-covariance path."""
    body, size = _bodies()[name]
    side = output_size(describe(body), size)

    def head():
        if readout == "dense":
            return Dense(var_weight=1.3, var_bias=0.2)
        return Conv2d(side, padding=0, var_weight=1.3, var_bias=0.2)

    plain = Sequential(copy.deepcopy(body), head())
    pooled = Sequential(copy.deepcopy(body), AvgPool2d(1), head())
    x, z = _images(3, 2, size, seed=7), _images(4, 2, size, seed=8)
    calls = [lambda m: m(x), lambda m: m(x, z), lambda m: m(x, diag=True), lambda m: m(x, z[:3], diag=True)]
    with torch.no_grad():
        for call in calls:
            torch.testing.assert_close(call(pooled), call(plain), rtol=1e-12, atol=0.0)


def test_pool_needing_no_offset_runs_on_same_location_maps():
    """A pooled network whose plan needs no offset but (0, 0) (here AvgPool2d(1)) starts from the same-location
    input map and runs every layer on it, so it gives the plain network's kernel bit for bit (it used to start
    from the full map [H, W, H, W] and carry it through the body, whose window sums round differently)."""
    body, _ = _bodies()["relu_stack"]
    plain = Sequential(copy.deepcopy(body), Dense(var_weight=1.3, var_bias=0.2))
    pooled = Sequential(copy.deepcopy(body), AvgPool2d(1), Dense(var_weight=1.3, var_bias=0.2))
    plan = Requirements(pooled).plan(pooled, (8, 8))
    assert plan is not None and plan.input is None  # the offset path, with nothing but the same-location map
    x, z = _images(3, 2, 8, seed=7), _images(4, 2, 8, seed=8)
    with torch.no_grad():
        for call in (lambda m: m(x), lambda m: m(x, z), lambda m: m(x, z[:3], diag=True)):
            assert torch.equal(call(pooled), call(plain))


def test_gap_is_avgpool_of_the_whole_map():
    """GlobalAvgPool2d on an HxH map equals AvgPool2d(H)."""
    body = Sequential(Conv2d(3, var_weight=2.0, var_bias=0.1), LeakyReLU(0.2), Conv2d(3, var_weight=1.5), Erf())
    x, z = _images(3, 1, 6, seed=9), _images(2, 1, 6, seed=10)
    gap = Sequential(copy.deepcopy(body), GlobalAvgPool2d(), Dense(var_weight=1.1))
    pool = Sequential(copy.deepcopy(body), AvgPool2d(6), Dense(var_weight=1.1))
    with torch.no_grad():
        torch.testing.assert_close(gap(x, z), pool(x, z), rtol=1e-12, atol=0.0)
        torch.testing.assert_close(gap(x), pool(x), rtol=1e-12, atol=0.0)


# ----------------------------------------------------------------------------------------------
# (7) symmetry, PSD, float32 vs float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["relu_pool_gap", "sum_with_pool_branch", "dilated_intpad_pool_s2p1"])
def test_symmetric_psd_and_float32(name):
    _, factory, size, c = next(case for case in CASES if case[0] == name)
    model = _finish(factory(), size)
    x = _images(10, c, size, seed=11)
    x[3] = x[2]  # an identical pair
    x[5] = 0.0  # a black image
    with torch.no_grad():
        k64 = model(x)
        k32 = model(x.float())
    assert torch.equal(k64, k64.T)
    eig = torch.linalg.eigvalsh(k64)
    assert eig.min() >= -1e-10 * eig.max(), eig
    assert float((k32.double() - k64).abs().max() / k64.abs().max()) <= RTOL32


# ----------------------------------------------------------------------------------------------
# (5) Monte-Carlo: finite networks
# ----------------------------------------------------------------------------------------------
#: Exact at every width: a single nonlinearity, acting on a linear function of the images (an exactly
#: Gaussian pre-activation given nothing), followed by linear layers only (convs, pools, Dense) whose
#: zero-mean weights are independent of their inputs. So every entry is compared with zero allowance.
#: Each pairs with its "same tap on both sides" variant (pooling treated like a convolution), which the
#: same samples must reject.
EXACT = {
    "relu_pool_conv_gap": (
        lambda: Sequential(
            Conv2d(3, var_weight=2.0 * 9, var_bias=0.1),
            ReLU(),
            AvgPool2d(2),
            Conv2d(3, var_weight=2.0 * 9),
            GlobalAvgPool2d(),
            Dense(var_weight=1.5, var_bias=0.05),
        ),
        ("seq", [("conv", {"k": 3, "vw": 18.0, "vb": 0.1}), ("relu",), ("conv", {"k": 2, "stride": 2, "padding": 0}),
                 ("conv", {"k": 3, "vw": 18.0}), ("dense", {}), ("dense", {"vw": 1.5, "vb": 0.05})]),
    ),
    "erf_pool_s1p1_gap": (
        lambda: Sequential(
            Conv2d(3, var_weight=1.0 * 9, var_bias=0.1),
            Erf(),
            AvgPool2d(3, stride=1, padding=1),
            Conv2d(2, stride=2, var_weight=1.5 * 4),
            GlobalAvgPool2d(),
            Dense(var_weight=2.0, var_bias=0.01),
        ),
        ("seq", [("conv", {"k": 3, "vw": 9.0, "vb": 0.1}), ("erf",), ("conv", {"k": 3, "stride": 1, "padding": 1}),
                 ("conv", {"k": 2, "stride": 2, "vw": 6.0}), ("dense", {}), ("dense", {"vw": 2.0, "vb": 0.01})]),
    ),
    "leaky_pool_dense": (
        lambda: Sequential(
            Conv2d(4, var_weight=1.5 * 16, var_bias=0.2),
            LeakyReLU(-0.4),
            AvgPool2d(2),
            Dense(var_weight=1.0, var_bias=0.0),
        ),
        ("seq", [("conv", {"k": 4, "vw": 24.0, "vb": 0.2}), ("leaky_relu", -0.4),
                 ("conv", {"k": 2, "stride": 2, "padding": 0}), ("dense", {})]),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(EXACT))
def test_monte_carlo_exact_at_any_width(name):
    build, same_tap_arch = EXACT[name]
    model = build()
    x = make_inputs(in_channels=2, size=6)
    K = model(x)
    S = sample_second_moments(model, x, channels=8, n_networks=1500, out_channels=32, seed=40)
    e = second_moment_errors(S, K)
    check_against_kernel(e, torch.zeros(4, 4, dtype=F64), name)
    # power: the kernel of "pooling with the same tap on both sides" is rejected by the same samples
    wrong = torch.from_numpy(kernel(same_tap_arch, x.numpy()))
    assert not torch.allclose(wrong, K, rtol=1e-3)
    w = second_moment_errors(S, wrong)
    assert (w.err.abs() > Z * w.se).any(), f"{name}: cannot tell independent taps from the same tap"


def _two_relu_pooled():
    """The brief's pooled ConvNet: Conv3-ReLU-AvgPool2-Conv3-ReLU-GlobalAvgPool-Dense."""
    return Sequential(
        Conv2d(3, var_weight=2.0 * 9, var_bias=0.1),
        ReLU(),
        AvgPool2d(2),
        Conv2d(3, var_weight=2.0 * 9, var_bias=0.1),
        ReLU(),
        GlobalAvgPool2d(),
        Dense(var_weight=1.5, var_bias=0.05),
    )


def _two_layer_erf_leaky():
    return Sequential(
        Conv2d(3, var_weight=1.5 * 9, var_bias=0.1),
        Erf(),
        AvgPool2d(3, stride=1, padding=1),
        Conv2d(3, stride=2, var_weight=2.0 * 9, var_bias=0.1),
        LeakyReLU(0.2),
        GlobalAvgPool2d(),
        Dense(var_weight=1.0, var_bias=0.05),
    )


DEEP = {"two_relu_pooled": _two_relu_pooled, "erf_then_leaky": _two_layer_erf_leaky}


def _check_deep(name, width, n_networks, seed):
    """Second nonlinearity sees a finite channel average: O(1/C) bias everywhere (after the global pool
    even the diagonal mixes different positions), allowed as ``1 / C`` on the kernel scale (see
    tests/test_monte_carlo.py for the tolerance's derivation)."""
    model = DEEP[name]()
    x = make_inputs(in_channels=1, size=6)
    K = model(x)
    S = sample_second_moments(model, x, channels=width, n_networks=n_networks, out_channels=32, seed=seed)
    check_against_kernel(second_moment_errors(S, K), allowance(width, exact_diagonal=False), f"{name}, C={width}")


@pytest.mark.parametrize("name", list(DEEP))
def test_monte_carlo_deep_pooled_networks(name):
    _check_deep(name, width=32, n_networks=400, seed=50)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEEP))
def test_monte_carlo_deep_pooled_networks_slow(name):
    _check_deep(name, width=128, n_networks=1500, seed=60)


# ----------------------------------------------------------------------------------------------
# (6) gradients through the pooled full path at degenerate images
# ----------------------------------------------------------------------------------------------
def _hyper_leaves(model, zero_bias):
    leaves = []
    for layer in model.kernel_layers():
        if isinstance(layer, (Conv2d, Dense)):
            w = torch.tensor(1.3 if isinstance(layer, Dense) else 2.0, dtype=F64, requires_grad=True)
            b = torch.tensor(0.0 if zero_bias else 0.2, dtype=F64, requires_grad=True)
            layer.var_weight, layer.var_bias = w, b
            leaves += [w, b]
    return leaves


@pytest.mark.parametrize("zero_bias", [False, True], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name", ["relu_pool_gap", "even_leaky_pool_s1p1_erf", "sum_with_pool_branch"])
def test_gradients_finite_on_identical_and_black_images(name, zero_bias):
    _, factory, size, _ = next(case for case in CASES if case[0] == name)
    model = _finish(factory(), size)
    leaves = _hyper_leaves(model, zero_bias)
    a = _images(1, 2, size, seed=12)[0]
    zero = torch.zeros_like(a)
    for images in (torch.stack([a, a, a]), torch.stack([zero, zero]), torch.stack([zero, a, a, zero])):
        x = images.clone().requires_grad_(True)
        for out in (model(x), model(x, x), model(x, diag=True), model(x, x, diag=True)):
            assert torch.isfinite(out).all()
            grads = torch.autograd.grad(out.sum(), [x, *leaves], allow_unused=True)
            for g in grads:
                assert g is None or torch.isfinite(g).all(), name


# ----------------------------------------------------------------------------------------------
# (8) errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1])
def test_avgpool_kernel_size_below_one(k):
    with pytest.raises(ValueError, match="kernel_size"):
        AvgPool2d(k)


@pytest.mark.parametrize("k, padding", [(2, 2), (3, 2), (1, 1), (4, 3)])
def test_avgpool_padding_more_than_half_the_window(k, padding):
    with pytest.raises(ValueError, match="padding"):
        AvgPool2d(k, padding=padding)


@pytest.mark.parametrize("padding", [-1, 1.5, "same"])
def test_avgpool_bad_padding_value(padding):
    with pytest.raises(ValueError, match="padding"):
        AvgPool2d(3, padding=padding)


def test_avgpool_larger_than_the_input():
    model = Sequential(Conv2d(3), ReLU(), AvgPool2d(5), Dense())
    x = _images(2, 1, 4, seed=13)
    with pytest.raises(ValueError) as info:
        model(x)
    message = str(info.value)
    assert "4" in message and "5" in message, message  # the map size and the window size
    with pytest.raises(ValueError):
        model(x, diag=True)


def test_architecture_not_ending_in_one_pixel():
    model = Sequential(Conv2d(3), ReLU(), AvgPool2d(2))
    with pytest.raises(ValueError, match="1x1|1 x 1|one pixel"):
        model(_images(2, 1, 6, seed=14))


# ----------------------------------------------------------------------------------------------
# (9) the GPyTorch kernel with a pooled architecture
# ----------------------------------------------------------------------------------------------
def _set_variances(arch, weights, biases):
    layers = [layer for layer in arch.kernel_layers() if isinstance(layer, (Conv2d, Dense))]
    assert len(layers) == len(weights) == len(biases)
    for layer, w, b in zip(layers, weights, biases, strict=True):
        layer.var_weight, layer.var_bias = float(w), float(b)
    return arch


def test_cnngp_kernel_with_pooled_architecture():
    arch = _finish(_relu_pool_gap(), 6)
    kernel_module = CNNGPKernel(copy.deepcopy(arch), input_shape=(1, 6, 6), tied=False).double()
    values = kernel_module.layer_variances()
    assert [v["layer"].split("(")[0] for v in values] == ["Conv2d", "Conv2d", "Dense"], values
    new_w, new_b = [2.4, 1.1, 0.7], [0.3, 0.05, 0.2]
    kernel_module.var_weight = torch.tensor(new_w, dtype=F64)
    kernel_module.var_bias = torch.tensor(new_b, dtype=F64)
    ref_model = _set_variances(copy.deepcopy(arch), new_w, new_b)
    X, Xz = _images(5, 1, 6, seed=15), _images(3, 1, 6, seed=16)
    x, z = X.reshape(5, -1), Xz.reshape(3, -1)
    with torch.no_grad():
        torch.testing.assert_close(kernel_module(x).to_dense(), ref_model(X), rtol=1e-12, atol=0.0)
        torch.testing.assert_close(kernel_module(x, z).to_dense(), ref_model(X, Xz), rtol=1e-12, atol=0.0)
        torch.testing.assert_close(kernel_module(x, diag=True), ref_model(X, diag=True), rtol=1e-12, atol=0.0)
    # and the layer model is the reference
    want = kernel(describe(ref_model), X.numpy(), Xz.numpy())
    with torch.no_grad():
        assert entry_rel_err(kernel_module(x, z).to_dense().numpy(), want) <= RTOL64
    # every variance, the Dense ones included, is learnable and gets a gradient
    kernel_module(x).to_dense().sum().backward()
    assert kernel_module.raw_var_weight.grad.shape == (3,)
    assert kernel_module.raw_var_bias.grad.shape == (3,)
    assert bool((kernel_module.raw_var_weight.grad != 0).all())
    assert bool((kernel_module.raw_var_bias.grad != 0).all())
    assert all(math.isfinite(float(g)) for g in kernel_module.raw_var_weight.grad)


def test_auto_compile_skips_full_covariance_networks(monkeypatch):
    """backend="auto" compiles large jobs, but not networks on the full path (slower compiled, see RESULTS.md)."""
    from gpytorch_cnngp import settings
    from gpytorch_cnngp.backends import Eager, Inductor, choose

    monkeypatch.setenv("CNNGP_COMPILE", "auto")
    pairs = settings.auto_compile_pairs.value()
    cpu, f32 = torch.device("cpu"), torch.float32
    same_location = Sequential(Conv2d(3), Erf(), Dense())  # not native: torch.compile or eager
    pooled = Sequential(Conv2d(3), Erf(), AvgPool2d(2), Dense())  # not native either
    assert choose("auto", same_location, (8, 8), f32, cpu, pairs) is Inductor
    assert choose("auto", same_location, (8, 8), f32, cpu, pairs - 1) is Eager
    assert choose("auto", pooled, (8, 8), f32, cpu, pairs) is Eager
    assert choose("inductor", pooled, (8, 8), f32, cpu, 1) is Inductor  # an explicit request is honoured


def test_the_compiled_backend_runs_a_small_pooled_network_on_its_offset_maps():
    # CI's check of the compiled (GPU) path on offsets: a pool that floors an odd map, then a global pool, NNGP
    # only (about 30 s of compilation on 2 cores; with the NTK about six times that, see the slow test below)
    model = Sequential(Conv2d(3), ReLU(), AvgPool2d(2), GlobalAvgPool2d(), Dense())
    gen = torch.Generator().manual_seed(13)
    x = torch.rand(3, 1, 5, 5, dtype=torch.float64, generator=gen)
    z = torch.rand(2, 1, 5, 5, dtype=torch.float64, generator=gen)
    with settings.spatial_path("full"):
        want = gram(model, x, z, backend="eager")  # the [H, W, H, W] maps
    with settings.spatial_path("offsets"):
        got = gram(model, x, z, backend="inductor")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0.0)


@pytest.mark.slow  # about 2.5 min of compilation on 2 cores
def test_the_compiled_backend_runs_a_pooled_network_on_its_offset_maps():
    # torch.compile of the pair pass (the GPU's path) on a local pool and a global pool, NNGP and NTK, against eager
    model = Sequential(Conv2d(3), ReLU(), AvgPool2d(2), Conv2d(3), ReLU(), GlobalAvgPool2d(), Dense())
    gen = torch.Generator().manual_seed(12)
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64, generator=gen)
    z = torch.rand(4, 1, 6, 6, dtype=torch.float64, generator=gen)
    want = gram(model, x, z, backend="eager", get=("nngp", "ntk"))
    got = gram(model, x, z, backend="inductor", get=("nngp", "ntk"))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=0.0)
