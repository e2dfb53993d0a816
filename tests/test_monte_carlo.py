"""Monte-Carlo convergence of the finite networks ``model.nn(...)`` to the kernel ``model(X)``.

For each architecture we draw many random networks, evaluate them on four fixed 8x8 images (two real
MNIST digits, one uniform-noise image and one signed Gaussian-noise image), and compare the empirical
second moments ``E[f(x_i) f(x_j)]`` (the outputs have mean zero) with the kernel ``K_ij``.

Statistics
----------
One network with ``O`` output channels gives ``S = f f^T / O`` ([N, N]); its ``O`` outputs are independent
*given* the hidden layers but all share them, so networks (not output channels) are the independent
units: the estimate is the mean of ``S`` over ``M`` networks and its standard error is the sample
standard deviation of ``S`` over the networks divided by ``sqrt(M)``. This SE covers both the readout
noise and the width-dependent fluctuation of the hidden layers, and is estimated from the samples
themselves. All errors are on the kernel's own scale, ``(S_ij - K_ij) / sqrt(K_ii K_jj)`` (the ConvNet GP
kernel is ~1e11 on these images, the ResNet GP one ~0.1).

Two quantities are checked:

* **second moments** ``mean_m S_ij / sqrt(K_ii K_jj)`` against ``K_ij / sqrt(K_ii K_jj)``;
* **correlations** ``mean_m [S_ij / sqrt(S_ii S_jj)]`` against ``K_ij / sqrt(K_ii K_jj)``. Dividing by the
  same network's diagonal cancels its random overall scale, which in deep narrow networks is heavy tailed
  (a product of one chi-square-like factor per layer), so this estimate is far less noisy and resolves
  the finite-width bias; it is bounded, so the CLT-based SE is reliable even at width 4.

Tolerance: ``|error| <= Z * SE + allowance`` entry by entry, where

* ``Z = 4``: about 100 entry comparisons run by default; a Bonferroni bound at family-wise 1% needs
  ``Phi^-1(1 - 0.01 / 200) = 3.9``, rounded up because the second-moment estimates are skewed;
* the allowance for finite width is **zero** where the finite network is exact in expectation at every
  width (see :data:`EXACT_ARCHITECTURES`, and :func:`allowance` for the diagonal of deep networks), and
  ``FINITE_WIDTH_COEF / C`` for the other entries (see there).

Everything runs in float32 (accumulated in float64): the tolerances are >= 1e-3 of the kernel scale and
float32's relative rounding (~1e-7 per op) is the same at 1e11 as at 1.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state

from gpytorch_cnngp import Conv2d, ReLU, Sequential, architectures, resnet_block

DATA = Path(__file__).parent / "data" / "mnist_sample.npz"
SIZE = 8

#: z-score of every entry-wise comparison (Bonferroni over ~100 comparisons at 1%, see module docstring)
Z = 4.0

#: Coefficient of the finite-width allowance ``FINITE_WIDTH_COEF / C`` for the entries that are not exact
#: at finite width (see :func:`allowance`). Perturbation theory around infinite width (Yaida 2019,
#: "Non-Gaussian processes and neural networks at finite widths"; Roberts, Yaida & Hanin 2022, ch. 4-5)
#: gives a mean deviation ``c / C + O(1/C^2)`` with an O(1) coefficient ``c`` set by the fluctuation of
#: the C-channel averages that feed each ReLU: one ReLU unit's square has relative variance
#: ``E[a^4] / E[a^2]^2 - 1 = 5``, which averaging over the k^2 positions of each window shrinks, and this
#: variance enters the bias only through the curvature of the arc-cosine map and of the per-network
#: ratio ``S_ij / sqrt(S_ii S_jj)`` (second-order delta-method terms, factors 1/8 to 1/2). We therefore
#: allow ``c = 1`` in units of ``sqrt(K_ii K_jj)``. A discrepancy that does not vanish with width, i.e. a
#: wrong kernel or a wrongly built network, is caught once it exceeds ``Z * SE + 1 / C``.
FINITE_WIDTH_COEF = 1.0

#: The per-network correlation of ``O`` Gaussian output pairs is itself biased, by about
#: ``-rho (1 - rho^2) / (2 O)`` (the sample-correlation bias, Fisher 1915), at most ``0.19 / O`` in size
#: (``max rho (1 - rho^2) / 2 = 1 / (3 sqrt 3)``); we allow ``0.2 / O``.
READOUT_CORR_COEF = 0.2


# ---------------------------------------------------------------------------------------------
# inputs and sampling


def make_inputs(in_channels: int = 1, size: int = SIZE) -> Tensor:
    """Four fixed images [4, in_channels, size, size] (float64).

    Channel 0: the first two MNIST training digits (a 5 and a 0), area-downscaled, then a uniform-noise
    image and a standard-normal image (signed pixels, so not every input covariance is positive).
    Further channels are independent uniform noise (they exercise the input's channel mean).
    """
    with np.load(DATA) as data:
        digits = torch.as_tensor(data["train_images"][:2], dtype=torch.float64)[:, None] / 255.0
    digits = torch.nn.functional.interpolate(digits, size=(size, size), mode="area")
    g = torch.Generator().manual_seed(20190101)
    noise = torch.rand(1, 1, size, size, generator=g, dtype=torch.float64)
    gauss = torch.randn(1, 1, size, size, generator=g, dtype=torch.float64)
    x = torch.cat([digits, noise, gauss])
    if in_channels > 1:
        extra = torch.rand(4, in_channels - 1, size, size, generator=g, dtype=torch.float64)
        x = torch.cat([x, extra], 1)
    return x


def sample_second_moments(model, x: Tensor, channels: int, n_networks: int, out_channels: int, seed: int) -> Tensor:
    """``S_m = f_m(x) f_m(x)^T / out_channels`` for ``n_networks`` random draws of ``model.nn``: [M, N, N].

    Networks are evaluated in chunks (at most 50 networks or ~25M parameters) with ``torch.vmap`` over
    their stacked parameters.
    """
    threads = torch.get_num_threads()
    # Every op here is small: intra-op threads cost more than they gain, and under CPU contention their
    # spin-waits made this file several times slower (measured: 125 s with 2 threads, 23 s with 1).
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _sample_second_moments(model, x, channels, n_networks, out_channels, seed)
    finally:
        torch.set_num_threads(threads)


def _sample_second_moments(model, x, channels, n_networks, out_channels, seed) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    xf = x.to(torch.float32)

    def draw():  # input_size builds Dense readouts at once, so the networks can be stacked for vmap
        return model.nn(
            channels,
            in_channels=x.shape[1],
            out_channels=out_channels,
            generator=g,
            dtype=torch.float32,
            input_size=tuple(x.shape[-2:]),
        )

    out, done = [], 0
    while done < n_networks:
        nets = [draw()]
        chunk = max(1, min(50, 25_000_000 // sum(p.numel() for p in nets[0].parameters())))
        nets += [draw() for _ in range(min(chunk, n_networks - done) - 1)]
        params, buffers = stack_module_state(nets)
        skeleton = copy.deepcopy(nets[0]).to("meta")

        def forward(p, b, skeleton=skeleton):
            return functional_call(skeleton, (p, b), (xf,))

        f = torch.vmap(forward)(params, buffers)
        if done == 0:  # the batched evaluation is the networks' own forward
            torch.testing.assert_close(f[0], nets[0](xf), rtol=1e-4, atol=1e-6 * float(f[0].abs().max()))
        assert f.shape == (len(nets), x.shape[0], out_channels)
        f = f.to(torch.float64)
        out.append(torch.einsum("mio,mjo->mij", f, f) / out_channels)
        done += len(nets)
    return torch.cat(out)


@dataclass
class Errors:
    """Errors on the kernel scale and their Monte-Carlo standard errors, each [N, N]."""

    err: Tensor
    se: Tensor

    def max_abs(self, mask: Tensor) -> tuple[float, float]:
        """Largest ``|err|`` over ``mask`` and the SE of that entry."""
        masked = torch.where(mask, self.err.abs(), torch.full_like(self.err, -1.0))
        idx = int(masked.argmax())
        return float(self.err.flatten()[idx].abs()), float(self.se.flatten()[idx])


def second_moment_errors(S: Tensor, K: Tensor) -> Errors:
    d = K.diagonal().sqrt()
    scale = d[:, None] * d[None, :]
    Sn = S / scale
    return Errors(Sn.mean(0) - K / scale, Sn.std(0) / math.sqrt(S.shape[0]))


def correlation_errors(S: Tensor, K: Tensor) -> Errors:
    s = S.diagonal(0, 1, 2).sqrt()
    rho = S / (s[:, :, None] * s[:, None, :])
    assert torch.isfinite(rho).all(), "a network gave an identically zero output (dead ReLUs); use a larger width"
    d = K.diagonal().sqrt()
    return Errors(rho.mean(0) - K / (d[:, None] * d[None, :]), rho.std(0) / math.sqrt(S.shape[0]))


OFF = ~torch.eye(4, dtype=torch.bool)
DIAG = torch.eye(4, dtype=torch.bool)


def check_against_kernel(e: Errors, allowance: Tensor, what: str, mask: Tensor | None = None) -> None:
    """``|err| <= Z * SE + allowance`` entry by entry (on ``mask``), with a readable failure message."""
    bound = Z * e.se + allowance
    bad = e.err.abs() > bound
    if mask is not None:
        bad &= mask
    assert not bad.any(), (
        f"{what}: Monte-Carlo estimate disagrees with the kernel beyond Z={Z} standard errors + allowance\n"
        f"error (kernel scale):\n{e.err.numpy().round(4)}\nSE:\n{e.se.numpy().round(4)}\n"
        f"allowance:\n{allowance.numpy().round(4)}"
    )


def allowance(channels: int, exact_diagonal: bool, readout: int | None = None) -> Tensor:
    """Finite-width allowance per entry: ``FINITE_WIDTH_COEF / channels`` (plus the readout term for
    per-network correlations), and zero on the diagonal where the diagonal is exact at every width.

    When the diagonal is exact: a conv layer's output at one position is ``b + sum w a`` with zero-mean
    weights independent of its input ``a``, so ``E[u(x)[p] u(x')[p]]`` is exactly the window average of
    ``E[a(x)[q] a(x')[q]]`` at any width (a sum of branches that each end in such a conv, as in a
    projection block, adds no cross terms either). If every ReLU's input is such a conv output, it is a
    centred Gaussian given the previous layers, so ``E[relu(u)^2] = E[u^2] / 2`` exactly, and the
    diagonal is exact. Off the diagonal the arc-cosine map is non-linear in the (random, at finite
    width) covariance of its input: an O(1/C) bias. In a ResNet block with an identity skip the next
    ReLU's input is ``a + W r`` with ``a`` the skip: not centred given the previous layers, and only
    asymptotically independent of ``W r`` (``r`` is computed from ``a``), so there the diagonal carries
    an O(1/C) bias too.
    """
    a = torch.full((4, 4), FINITE_WIDTH_COEF / channels, dtype=torch.float64)
    if readout is not None:
        a = a + READOUT_CORR_COEF / readout
    if exact_diagonal:
        a = torch.where(DIAG, torch.zeros_like(a), a)
    return a


# ---------------------------------------------------------------------------------------------
# 1. networks whose second moments equal the kernel exactly at every width (zero allowance)

#: Linear layers propagate second moments exactly, and a ReLU whose input is a linear function of the
#: (deterministic) images with random weights sees an exactly Gaussian pre-activation, so these networks
#: match the kernel in expectation at any width: every entry is compared with no allowance. They cover
#: finite-layer semantics the paper architectures do not: even kernel size under "same" (TensorFlow's
#: asymmetric padding), dilation, stride 2 with integer padding, the input channel mean and biases. (A
#: projection resnet_block cannot be made exact this way: its inner ReLU sees a finite channel average.
#: It is covered by `deep_custom` below and by the ResNet GP. Nor can a ReLU applied to the raw images:
#: the kernel treats the input covariance as that of a Gaussian, the network's pixels are not Gaussian.)
EXACT_ARCHITECTURES = {
    # a single dense layer: E[f f'] = var_bias + var_weight * mean_{c,p}(x x')
    "dense": lambda: Conv2d(SIZE, padding=0, var_weight=1.7, var_bias=0.3),
    # "same" with even k = 4 reads offsets -1..+2; the readout (k = 2, dilation 7) sees only the four
    # corners, where the window holds 3 image pixels on the top/left and 2 on the bottom/right
    "even_kernel_corners": lambda: Sequential(
        Conv2d(4, var_weight=1.0 * 16, var_bias=0.1),
        Conv2d(2, padding=0, dilation=SIZE - 1, var_weight=1.0),
    ),
    "linear_even_dilated_strided": lambda: Sequential(
        Conv2d(4, var_weight=1.3 * 16, var_bias=0.2),
        Conv2d(3, dilation=2, var_weight=1.1 * 9, var_bias=0.1),
        Conv2d(3, stride=2, padding=1, var_weight=1.2 * 9, var_bias=0.1),  # 8x8 -> 4x4
        Conv2d(2, padding=0, dilation=SIZE // 2 - 1, var_weight=1.0, var_bias=0.1),  # corners of the 4x4 map
    ),
    "one_relu_even_dilated_strided": lambda: Sequential(
        Conv2d(4, var_weight=1.3 * 16, var_bias=0.2),
        ReLU(),
        Conv2d(3, dilation=2, var_weight=2.0 * 9, var_bias=0.1),
        Conv2d(3, stride=2, padding=1, var_weight=2.0 * 9),
        Conv2d(2, padding=0, dilation=SIZE // 2 - 1, var_weight=2.0, var_bias=0.1),
    ),
}

#: For these the same samples must also *reject* the kernel of mirrored windows (the kernel of the
#: flipped images): the test resolves a one-pixel shift of the even kernel's window.
MIRROR_SENSITIVE = ("even_kernel_corners", "linear_even_dilated_strided")


@pytest.mark.parametrize("name", list(EXACT_ARCHITECTURES))
def test_exact_in_expectation_at_any_width(name):
    model = EXACT_ARCHITECTURES[name]()
    x = make_inputs(in_channels=2)
    K = model(x)
    # width 16: narrow, so cheap and far from the limit, yet no allowance is needed
    S = sample_second_moments(model, x, channels=16, n_networks=1000, out_channels=64, seed=1)
    e = second_moment_errors(S, K)
    check_against_kernel(e, torch.zeros(4, 4, dtype=torch.float64), name)
    if name in MIRROR_SENSITIVE:
        mirrored = second_moment_errors(S, model(x.flip(2, 3)))
        assert (mirrored.err.abs() > Z * mirrored.se).any(), f"{name}: cannot tell the window's orientation"


def test_nn_output_channels_with_final_relu():
    """``model.nn(channels, in_channels, out_channels)`` maps [N, in_channels, H, W] to [N, out_channels]
    (its docstring) also when the last layer is a ReLU, and that network matches the kernel: its only ReLU
    acts on a linear function of the images, an exactly Gaussian pre-activation, so it is exact at any width.
    """
    model = Sequential(Conv2d(3, var_weight=2.0 * 9, var_bias=0.1), Conv2d(SIZE, padding=0), ReLU())
    x = make_inputs(in_channels=2)
    out_channels = 3
    net = model.nn(6, in_channels=2, out_channels=out_channels)
    with torch.no_grad():
        shape = tuple(net(x.float()).shape)
    assert shape == (4, out_channels), f"model.nn(6, in_channels=2, out_channels=3) gives outputs of shape {shape}"
    S = sample_second_moments(model, x, channels=6, n_networks=200, out_channels=64, seed=2)
    check_against_kernel(second_moment_errors(S, model(x)), torch.zeros(4, 4, dtype=torch.float64), "final ReLU")


# ---------------------------------------------------------------------------------------------
# 2. deep networks: O(1/C) bias, convergence with width


def deep_custom():
    """Five ReLU layers on the longest path, with even/dilated/strided convs and a projection block."""
    return Sequential(
        Conv2d(4, var_weight=1.3 * 16, var_bias=0.2),
        ReLU(),
        Conv2d(3, dilation=2, var_weight=2.0 * 9, var_bias=0.1),
        ReLU(),
        Conv2d(3, stride=2, padding=1, var_weight=2.0 * 9),
        resnet_block(stride=2, projection_shortcut=True, multiplier=2),
        ReLU(),
        Conv2d(SIZE // 4, padding=0, in_channel_multiplier=2, var_weight=2.0, var_bias=0.1),
    )


@dataclass(frozen=True)
class Study:
    """Monte-Carlo sizes: a narrow and a wide width, networks drawn at each, output channels per net."""

    build: object
    in_channels: int
    narrow: int
    n_narrow: int
    wide: int
    n_wide: int
    exact_diagonal: bool  # every ReLU acts on a conv output (see `allowance`)
    out_channels: int = 64


# Sizes chosen for a default run of about half a minute on two CPU cores. The ResNet's last stage has
# 4x the base width, so its "wide" 32 is 128 channels there. Its identity skips feed ReLUs, so its
# diagonal is not exact at finite width (see `allowance`): the bias is positive (a ReLU passes more of
# a skip value when that value also enlarges the residual branch) and at these sizes well inside Z * SE.
DEFAULT_STUDIES = {
    "convnet_gp": Study(lambda: architectures.convnet_gp(image_size=SIZE), 1, 4, 400, 64, 300, True),
    "resnet32_gp": Study(lambda: architectures.resnet32_gp(image_size=SIZE), 1, 4, 400, 32, 200, False),
    "deep_custom": Study(deep_custom, 2, 4, 400, 64, 400, True),
}


def run_convergence_study(study: Study, seed: int) -> dict:
    model = study.build()
    x = make_inputs(study.in_channels)
    K = model(x)
    S_narrow = sample_second_moments(model, x, study.narrow, study.n_narrow, study.out_channels, seed)
    S_wide = sample_second_moments(model, x, study.wide, study.n_wide, study.out_channels, seed + 1)
    return {
        "moments_wide": second_moment_errors(S_wide, K),
        "corr_narrow": correlation_errors(S_narrow, K),
        "corr_wide": correlation_errors(S_wide, K),
    }


def assert_converges(study: Study, r: dict, name: str) -> None:
    # (a) at the wide width, second moments within 1/C (the diagonal exactly, where it is exact)
    moments_allow = allowance(study.wide, study.exact_diagonal)
    check_against_kernel(r["moments_wide"], moments_allow, f"{name} second moments, width {study.wide}")
    # (b) at the wide width, per-network correlations within 1/C (+ readout bias)
    corr_allow = allowance(study.wide, False, readout=study.out_channels)
    # (the diagonal correlations are 1 by construction)
    check_against_kernel(r["corr_wide"], corr_allow, f"{name} correlations, width {study.wide}", OFF)
    # (c) convergence: the narrow network's off-diagonal error is resolved (non-zero beyond Z SE), and the
    # wide one's is smaller by a significant margin (the two estimates are independent)
    e_n, se_n = r["corr_narrow"].max_abs(OFF)
    e_w, se_w = r["corr_wide"].max_abs(OFF)
    assert e_n > Z * se_n, f"{name}: finite-width error at width {study.narrow} not resolved ({e_n:.4f}, SE {se_n:.4f})"
    assert e_n - e_w > Z * math.hypot(se_n, se_w), (
        f"{name}: correlation error does not shrink with width: {e_n:.4f} (SE {se_n:.4f}) at width "
        f"{study.narrow} vs {e_w:.4f} (SE {se_w:.4f}) at width {study.wide}"
    )


@pytest.mark.parametrize("name", list(DEFAULT_STUDIES))
def test_finite_networks_converge_to_kernel(name):
    study = DEFAULT_STUDIES[name]
    assert_converges(study, run_convergence_study(study, seed=10), name)


# ---------------------------------------------------------------------------------------------
# 3. the documented exception: the Residual CNN GP is not the limit of its finite network


def test_residual_cnn_gp_finite_network_does_not_converge_to_kernel():
    """The Residual CNN GP sums the identity and a branch that *ends in a ReLU*. The kernel adds the
    branches' second moments as if they were independent and centred, but in the finite network the
    ReLU outputs have a positive mean and are built from the same input as the identity branch, so
    ``E[(a + relu(u))(a' + relu(u'))]`` has the extra cross terms ``E[a relu(u')] + E[relu(u) a'] > 0``
    (e.g. ``a * sqrt(Var u' / 2 pi)`` in the first block), and they survive any width. So even the
    diagonal, exact at every width for plain conv/ReLU stacks, is underestimated by the kernel.

    Here we check that at a large width the finite network's second moments exceed the kernel by many
    times the tolerance that the other architectures meet.
    """
    model = architectures.residual_cnn_gp(image_size=SIZE)
    x = make_inputs()
    K = model(x)
    width = 128
    S = sample_second_moments(model, x, width, n_networks=100, out_channels=64, seed=30)
    e = second_moment_errors(S, K)
    tol = Z * e.se + FINITE_WIDTH_COEF / width  # what a convergent architecture must meet
    # every entry is too large (positive cross terms), by more than twice the tolerance
    assert (e.err > 2 * tol).all(), f"expected a large positive discrepancy:\n{e.err.numpy().round(3)}\ntol {tol}"
    # ...and the discrepancy is of the order of the kernel itself, not a small correction
    assert float(e.err.diagonal().min()) > 0.25


# ---------------------------------------------------------------------------------------------
# slow, stronger versions (select with -m slow)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnet_gp", "resnet32_gp", "deep_custom"])
def test_finite_networks_converge_to_kernel_slow(name):
    """Larger widths and more networks; the correlation error also shrinks monotonically over a sweep."""
    base = DEFAULT_STUDIES[name]
    wide = {"convnet_gp": 128, "resnet32_gp": 64, "deep_custom": 128}[name]
    study = Study(base.build, base.in_channels, 4, 1000, wide, 300, base.exact_diagonal, out_channels=128)
    assert_converges(study, run_convergence_study(study, seed=100), name)

    model, x = study.build(), make_inputs(study.in_channels)
    K = model(x)
    widths = [4, 8, 16, 32]
    errs = []
    for i, c in enumerate(widths):
        e = correlation_errors(sample_second_moments(model, x, c, 400, 64, seed=200 + i), K)
        errs.append(e.max_abs(OFF))
    for i in range(len(widths) - 1):
        (e1, s1), (e2, s2) = errs[i], errs[i + 1]
        assert e1 - e2 > -Z * math.hypot(s1, s2), (
            f"{name}: error grew from width {widths[i]} ({e1:.4f}) to {widths[i + 1]} ({e2:.4f})"
        )
    (e_first, s_first), (e_last, s_last) = errs[0], errs[-1]
    assert e_first - e_last > Z * math.hypot(s_first, s_last)


@pytest.mark.slow
def test_residual_cnn_gp_discrepancy_does_not_shrink_slow():
    """From width 64 to 256 the discrepancy stays of order one (a 1/C bias would fall four-fold)."""
    model = architectures.residual_cnn_gp(image_size=SIZE)
    x = make_inputs()
    K = model(x)
    e = {}
    for width, seed in ((64, 40), (256, 41)):
        e[width] = second_moment_errors(sample_second_moments(model, x, width, 300, 64, seed), K)
        tol = Z * e[width].se + FINITE_WIDTH_COEF / width
        assert (e[width].err > 2 * tol).all()
    small, large = e[64].err.diagonal(), e[256].err.diagonal()
    se = torch.hypot(e[64].se.diagonal(), e[256].se.diagonal())
    assert (large > small / 4 + Z * se).all(), f"{small} -> {large}"
