"""The native kernel on pooled networks: spatial offsets' maps on their rectangles, gathered by the pools.

Values against the eager path (NNGP and NTK together, float64 and float32, partial lane blocks) and against the
independent float64 reference; which offsets a network's program computes, from the readout backwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_full import describe, kernel
from variance_leaves import variance_leaves

from gpytorch_cnngp import (
    AvgPool2d,
    Conv2d,
    Dense,
    GlobalAvgPool2d,
    LeakyReLU,
    ReLU,
    Sequential,
    Sum,
    architectures,
    gram,
    resnet_block,
)
from gpytorch_cnngp.backends import Native, native

F64 = torch.float64
CPU = torch.device("cpu")
BOTH = ("nngp", "ntk")


def _native_or_skip():
    reason = Native.unsupported(Sequential(Conv2d(3), ReLU(), Dense()), (6, 6), F64, CPU)
    if reason is not None and ("no C++ compiler" in reason or "switched off" in reason):  # pragma: no cover
        pytest.skip(f"the native kernel is not available here: {reason}")


def _images(n, c, size, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, *size, generator=gen, dtype=dtype)


# (name, network, image size (h, w), channels): every pooling geometry the lowering distinguishes
NETWORKS = [
    ("pool_then_dense", lambda: Sequential(Conv2d(3, var_weight=2.0), ReLU(), AvgPool2d(2), Dense()), (8, 8), 1),
    ("global_pool", lambda: Sequential(Conv2d(3), ReLU(), GlobalAvgPool2d(), Dense(var_bias=0.1)), (7, 7), 2),
    (
        "two_stages_global",
        lambda: Sequential(
            Conv2d(3, var_bias=0.2), ReLU(), AvgPool2d(2), Conv2d(3), ReLU(), GlobalAvgPool2d(), Dense(var_weight=2.0)
        ),
        (9, 8),  # odd, not square: the 2x2 pool drops a row
        1,
    ),
    (
        "strides_pads_dilation",
        lambda: Sequential(
            Conv2d(3, stride=2, padding=0, var_bias=0.3),
            LeakyReLU(0.2),
            AvgPool2d(3, stride=2, padding=1),
            Conv2d(2, dilation=2, var_bias=0.1),  # an even window: padding differs before and after
            ReLU(),
            AvgPool2d(2, stride=1),
            Dense(var_bias=0.2),
        ),
        (11, 9),
        2,
    ),
    ("pool_first", lambda: Sequential(AvgPool2d(2), Conv2d(3), ReLU(), Dense()), (6, 7), 1),
    (
        "residual_then_pool",
        lambda: Sequential(
            Conv2d(3), resnet_block(stride=2, projection_shortcut=True, multiplier=2), AvgPool2d(2, stride=1), Dense()
        ),
        (8, 8),
        1,
    ),
    (
        "sum_after_pool",
        lambda: Sequential(
            Conv2d(3),
            ReLU(),
            AvgPool2d(2),
            Sum([Sequential(), Sequential(Conv2d(3, var_weight=1.5), ReLU())]),
            GlobalAvgPool2d(),
            Dense(),
        ),
        (8, 8),
        1,
    ),
    ("ends_in_its_pool", lambda: Sequential(Conv2d(3), ReLU(), Conv2d(3), GlobalAvgPool2d()), (6, 6), 1),
    # a stride-3 window whose output offset 1 reads input offset 3, which no position of a 3x3 map has: a bias map
    (
        "offset_outside_the_input",
        lambda: Sequential(Conv2d(2, stride=3, padding=1, var_bias=0.4), ReLU(), GlobalAvgPool2d(), Dense()),
        (3, 3),
        1,
    ),  # fmt: skip
    # window sums that the pairs run row by row with their ReLU (conv_nonlin): a 3x3 window padded by 2 (its map
    # grows; rows with one and two taps), a 2x2 window without padding (its map shrinks), a 1x1 window, and a
    # 5x5 window (running sums, which it leaves to the separate passes), on an odd map
    (
        "fused_windows",
        lambda: Sequential(
            Conv2d(3, padding=2, var_bias=0.1),
            ReLU(),
            Conv2d(2, padding=0),
            ReLU(),
            AvgPool2d(2),
            Conv2d(1),
            ReLU(),
            Conv2d(5),
            ReLU(),
            GlobalAvgPool2d(),
            Dense(),
        ),
        (9, 10),
        1,
    ),  # fmt: skip
    ("pooled_cnn_gp", lambda: architectures.pooled_cnn_gp(8), (8, 8), 1),
    ("pooled_cnn_gp_global", lambda: architectures.pooled_cnn_gp(8, global_pool=True), (8, 8), 1),
]


@pytest.fixture(params=NETWORKS, ids=[n[0] for n in NETWORKS])
def network(request):
    _native_or_skip()
    name, make, size, c = request.param
    return name, make(), size, c


def test_pooled_networks_run_natively_with_the_eager_values(network):
    name, model, size, c = network
    assert Native.unsupported(model, size, F64, CPU, ntk=True) is None
    x, z = _images(5, c, size, 1), _images(19, c, size, 2)  # 19: a partial block of lanes
    for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-5)):
        xd, zd = x.to(dtype), z.to(dtype)
        for args in ((xd, zd), (xd,)):
            want = gram(model, *args, backend="eager", get=BOTH)
            got = gram(model, *args, backend="native", get=BOTH)
            for w, g, what in zip(want, got, BOTH, strict=True):
                err = float((w - g).abs().max() / w.abs().max())
                assert err < tol, f"{name} {what} {dtype}: relative difference {err:.2e}"
                assert g.dtype == dtype


@pytest.mark.parametrize("name", ["two_stages_global", "strides_pads_dilation", "residual_then_pool"])
def test_pooled_native_kernel_equals_the_independent_reference(name):
    _native_or_skip()
    _, make, size, c = next(n for n in NETWORKS if n[0] == name)
    model = make()
    x, z = _images(4, c, size, 3), _images(16, c, size, 4)
    got = gram(model, x, z, backend="native").numpy()
    want = kernel(describe(model), x.numpy(), z.numpy())
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    got_ntk = gram(model, x, z, backend="native", get="ntk").numpy()
    want_ntk = kernel(describe(model), x.numpy(), z.numpy(), ntk=True)
    assert np.abs(got_ntk - want_ntk).max() <= 1e-12 * np.abs(want_ntk).max()


def _inputs_of(program) -> int:
    return int((program.code[:, 0] == native.lowering._OP_INPUT).sum())


def test_a_program_computes_only_the_offsets_its_readout_needs():
    _native_or_skip()
    # a 2x2 pool before a dense readout reads tap differences e in {-1, 0, 1}^2 of its input; the strided first
    # convolution doubles them: nine offsets of the 28x28 input, not all (2 * 28 - 1)^2
    program = native.lower(architectures.pooled_cnn_gp(28), (28, 28))
    assert program.pooled and _inputs_of(program) == 9
    # a global pool needs every offset of its input, and through a 2x2 pool every offset of the image
    gap = Sequential(Conv2d(3), ReLU(), AvgPool2d(2), Conv2d(3), ReLU(), GlobalAvgPool2d(), Dense())
    assert _inputs_of(native.lower(gap, (12, 12))) == 23 * 23
    # a 3x3 pool with stride 1 before a dense readout: the (2 * 3 - 1)^2 differences of its taps
    local = Sequential(Conv2d(3), ReLU(), AvgPool2d(3, stride=1), Dense())
    assert _inputs_of(native.lower(local, (10, 10))) == 25
    # the offset that leaves the input (see NETWORKS) reaches its convolution as an empty map
    _, make, size, _ = next(n for n in NETWORKS if n[0] == "offset_outside_the_input")
    code = native.lower(make(), size).code
    convs = code[code[:, 0] == native.lowering._OP_CONV]
    assert ((convs[:, 4] == 0) & (convs[:, 5] == 0)).any()


def _fused(program) -> int:
    code = program.code
    return int(((code[:, 0] == native.lowering._OP_CONV) & (code[:, 18] & native.lowering._FUSE_NONLIN > 0)).sum())


def test_window_sums_before_a_relu_are_fused_only_where_the_pairs_can_run_them_by_rows():
    _native_or_skip()
    # Myrtle-5: every convolution (3x3, stride 1) feeds its ReLU alone; the dense readout feeds nothing fusable
    program = native.lower(architectures.myrtle(5, image_size=12), (12, 12))
    code = program.code
    convs = int((code[:, 0] == native.lowering._OP_CONV).sum())
    nonlins = int((code[:, 0] == native.lowering._OP_NONLIN).sum())
    assert _fused(program) == nonlins == convs - 1
    # the reverse mode's program keeps every map, so nothing is fused; nor are strided windows, or windows of
    # more than three rows (summed as running sums, in another order)
    assert _fused(native.lower(architectures.myrtle(5, image_size=12), (12, 12), reuse=False)) == 0
    strided = Sequential(Conv2d(3, stride=2), ReLU(), AvgPool2d(2), Dense())
    assert _fused(native.lower(strided, (12, 12))) == 0
    assert _fused(native.lower(Sequential(Conv2d(5), ReLU(), AvgPool2d(2), Dense()), (12, 12))) == 0
    # a same-location network keeps its programs as they were
    assert _fused(native.lower(architectures.convnet_gp(), (28, 28))) == 0


@pytest.mark.parametrize("name", ["fused_windows", "two_stages_global", "pooled_cnn_gp"])
def test_fused_window_sums_give_the_bits_of_the_separate_passes(name, monkeypatch):
    """conv_nonlin adds the same values in the same order as a window sum followed by its nonlinearity."""
    _native_or_skip()
    _, make, size, c = next(n for n in NETWORKS if n[0] == name)
    model = make()
    x, z = _images(3, c, size, 30), _images(17, c, size, 31)
    for dtype in (F64, torch.float32):
        fused = gram(model, x.to(dtype), z.to(dtype), backend="native", get=BOTH)
        with monkeypatch.context() as m:
            m.setattr(native.lowering, "_fuse_nonlins", lambda instrs, code: 0)
            m.setattr(native.lowering, "_PROGRAMS", native.lowering.weakref.WeakKeyDictionary())
            assert _fused(native.lower(model, size)) == 0
            separate = gram(model, x.to(dtype), z.to(dtype), backend="native", get=BOTH)
        for f, s in zip(fused, separate, strict=True):
            torch.testing.assert_close(f, s, rtol=0.0, atol=0.0)


def test_black_regions_skip_the_relu_polynomial_with_the_same_values():
    """Without biases, a black region has zero deviations, where the ReLU keeps only its linear part: the pairs
    skip the polynomial there (the first image's position, or a block of the second set all black). Images with
    black borders of several widths, one all black, 19 of them (a partial block), against eager in float64."""
    _native_or_skip()
    model = architectures.myrtle(5, image_size=12)
    gen = torch.Generator().manual_seed(40)

    def bordered(n):
        x = torch.zeros(n, 1, 12, 12, dtype=F64)
        for k in range(n):
            b = k % 4
            x[k, :, b : 12 - b, b + 1 : 12 - b] = torch.rand(1, 12 - 2 * b, 11 - 2 * b, generator=gen, dtype=F64)
        x[x < 0.3] = 0.0  # black pixels inside too
        return x

    x, z = bordered(5), bordered(19)
    z[3] = 0.0
    for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-5)):
        got = gram(model, x.to(dtype), z.to(dtype), backend="native", get=BOTH)
        want = gram(model, x, z, backend="eager", get=BOTH)
        for g, w, what in zip(got, want, BOTH, strict=True):
            err = float((g.double() - w).abs().max() / w.abs().max())
            assert err < tol, f"{what} {dtype}: relative difference {err:.2e}"
        assert (got[0][:, 3] == 0).all() and (got[1][:, 3] == 0).all()  # the black image


def test_black_and_identical_images_give_finite_exact_values():
    _native_or_skip()
    model = Sequential(Conv2d(3), ReLU(), AvgPool2d(2), Conv2d(3), ReLU(), GlobalAvgPool2d(), Dense(var_bias=0.1))
    x = _images(6, 1, (8, 8), 5)
    x[1] = 0.0  # black
    x[2] = x[3]  # identical
    x[4, :, :4] = 0.0  # black half
    for dtype in (F64, torch.float32):
        got = gram(model, x.to(dtype), backend="native", get=BOTH)
        want = gram(model, x.to(dtype), backend="eager", get=BOTH)
        # the NTK's derivative factor has a square-root singularity at correlation 1, which identical images
        # reach up to rounding: there both paths agree to the square root of the rounding error
        for g, w, tol in zip(got, want, (1e-12, 1e-7), strict=True):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g.diagonal(), w.diagonal(), rtol=0.0, atol=0.0)  # the one self pass
            err = float((g - w).abs().max() / w.abs().max())
            assert err < (tol if dtype == F64 else 2e-5)
        torch.testing.assert_close(got[0][2], got[0][3], rtol=0.0, atol=0.0)


def test_pooled_hyperparameters_are_read_at_call_time():
    _native_or_skip()
    model = Sequential(Conv2d(3), ReLU(), AvgPool2d(2), Dense(var_bias=0.1))
    x, z = _images(4, 1, (6, 6), 6), _images(16, 1, (6, 6), 7)
    before = gram(model, x, z, backend="native")
    with torch.no_grad():
        model[0].var_weight = 2.5
    after = gram(model, x, z, backend="native")
    torch.testing.assert_close(after, gram(model, x, z, backend="eager"), rtol=1e-12, atol=0.0)
    assert not torch.allclose(before, after)


# the eager reference's autograd through every offset is slow for these: the full study runs with -m slow
_SLOW_GRADIENTS = {"two_stages_global", "sum_after_pool", "residual_then_pool"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(n, marks=pytest.mark.slow) if n[0] in _SLOW_GRADIENTS else n for n in NETWORKS],
    ids=[n[0] for n in NETWORKS],
)
def test_pooled_hyperparameter_gradients_run_natively_and_match_eager(case, monkeypatch):
    """Reverse mode through the offsets: a pool's adjoint is its transposed window sum into each offset it
    read, a nonlinearity's reaches the deviations at both of its positions; K(X, X) over several tiles and
    K(X, Z), float64 to 1e-10 and float32 to 1e-4."""
    _native_or_skip()
    name, make, size, c = case
    model = make()
    calls = []
    original = native.run_block_vjp
    monkeypatch.setattr(native, "run_block_vjp", lambda *a, **k: calls.append(1) or original(*a, **k))
    leaves = variance_leaves(model, seed=20)
    x, z = _images(11, c, size, 21), _images(21, c, size, 22)
    for zz, tile in ((None, 4), (z, None)):
        weights = torch.rand(11, 11 if zz is None else 21, generator=torch.Generator().manual_seed(23), dtype=F64)
        want = torch.autograd.grad((gram(model, x, zz, backend="eager", tile_size=tile) * weights).sum(), leaves)
        got = torch.autograd.grad((gram(model, x, zz, backend="native", tile_size=tile) * weights).sum(), leaves)
        scale = float(max(v.abs().max() for v in want))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13 * scale)
        x32, z32 = x.float(), None if zz is None else zz.float()
        got = torch.autograd.grad((gram(model, x32, z32, backend="native", tile_size=tile) * weights).sum(), leaves)
        want = torch.autograd.grad((gram(model, x32, z32, backend="eager", tile_size=tile) * weights).sum(), leaves)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)
    assert calls, f"{name}: the native gradients were not used"


def test_the_kernels_self_pass_gives_the_eager_traces_and_own_values(network):
    """Each offset of an image with itself reads the deviations its layer's same-location map just recorded."""
    from gpytorch_cnngp.passes import self_pass, spatial_first
    from gpytorch_cnngp.state import Hyper

    name, model, size, c = network
    lib = native.load_library()
    x = spatial_first(_images(19, c, size, 8))
    program = native.lower(model, size)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-5)):
        hyper = Hyper.of(model, dtype, "cpu")
        with torch.no_grad():
            traces, want = self_pass(model, x.to(dtype), hyper, ntk=True)
        params = program.parameter_vector(hyper, dtype)
        left, right, own = native.self_terms(lib, program, params, x.to(dtype), 2, ntk=True, final=True)
        for k in range(2):
            assert float((own[k] - want[k]).abs().max() / want[k].abs().max()) < tol, name
        for side, packed in ((False, left), (True, right)):
            expected = native.run._pack_traces(lib, traces, 19, dtype, side, 2)
            scale = float(expected.abs().max())
            assert float((packed.data - expected).abs().max()) <= tol * scale, f"{name} traces, right={side}"


def test_the_diagonal_of_k_x_x_and_gram_diag_come_from_one_self_pass(network, monkeypatch):
    """The images' own values are the native self pass's (35x faster than the eager one on Myrtle-5), whichever
    backend runs the pairs and however the images are chunked, so that ``K(X, X)`` and ``gram_diag`` agree to the
    bit; they equal the eager self pass's to rounding, and differentiated they carry its gradients. With
    compile_mode off both are the eager pass's."""
    from gpytorch_cnngp import gram_diag, settings
    from gpytorch_cnngp.passes import self_pass, spatial_first
    from gpytorch_cnngp.state import Hyper

    name, model, size, c = network
    x = _images(11, c, size, 9)
    own = gram_diag(model, x, get=BOTH)
    assert torch.equal(torch.stack(own), torch.stack(gram_diag(model, x, get=BOTH, chunk_size=3))), name
    assert torch.equal(own[0], gram_diag(model, x)), name  # the NNGP alone: the same bits
    for backend in ("eager", "native", "auto"):
        for k, matrix in enumerate(gram(model, x, backend=backend, get=BOTH)):
            assert torch.equal(matrix.diagonal(), own[k]), (name, backend)
    with torch.no_grad():
        _, eager = self_pass(model, spatial_first(x), Hyper.of(model, F64, "cpu"), ntk=True)
    torch.testing.assert_close(torch.stack(own), eager, rtol=1e-12, atol=0.0)
    assert not torch.equal(torch.stack(own), eager) or name == "pool_then_dense"  # not the eager pass in disguise
    with settings.compile_mode("off"):
        assert torch.equal(gram(model, x).diagonal(), eager[0]) and torch.equal(gram_diag(model, x), eager[0]), name
    # differentiated (hyperparameters, images): the same values, with the gradients of the eager pass
    layer = next(layer for layer in model.kernel_layers() if isinstance(layer, Conv2d))
    layer.var_weight = torch.tensor(1.3, dtype=F64, requires_grad=True)
    with torch.no_grad():
        want = gram_diag(model, x)
    sym, diag = gram(model, x), gram_diag(model, x)
    assert torch.equal(sym.diagonal(), want) and torch.equal(diag, want), name
    (g_sym,) = torch.autograd.grad(sym.diagonal().sum(), layer.var_weight)
    (g_diag,) = torch.autograd.grad(diag.sum(), layer.var_weight)
    with settings.compile_mode("off"):
        (g_eager,) = torch.autograd.grad(gram_diag(model, x).sum(), layer.var_weight)
    assert float(g_eager) != 0.0 and torch.equal(g_sym, g_eager) and torch.equal(g_diag, g_eager), name
    xg = x.clone().requires_grad_(True)
    sym, diag = gram(model, xg), gram_diag(model, xg)
    assert torch.equal(sym.diagonal(), want) and torch.equal(diag, want), name
    (gx,) = torch.autograd.grad(diag.sum(), xg)
    with settings.compile_mode("off"):
        (gx_eager,) = torch.autograd.grad(gram_diag(model, xg).sum(), xg)
    torch.testing.assert_close(gx, gx_eager, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("pooled", [False, True], ids=["same-location", "pooled"])
def test_a_square_tile_computes_its_upper_triangle_and_mirrors_it(pooled, monkeypatch):
    """A tile on the diagonal of K(X, X) runs only the blocks with pairs on or above the diagonal (37 images: lane
    groups wholly below it are skipped), mirrors the rest, and weights each pair's gradient by its own and its
    mirror's; against the eager path, NNGP and NTK, float64 and float32, gradients with unsymmetric weights."""
    _native_or_skip()
    if pooled:
        model = Sequential(Conv2d(3, var_bias=0.2), ReLU(), AvgPool2d(2), Conv2d(3), ReLU(), GlobalAvgPool2d(), Dense())
    else:
        model = Sequential(Conv2d(3, var_bias=0.2), ReLU(), Conv2d(3), ReLU(), Dense(var_bias=0.1))
    skipped = []
    original = native.run_block
    monkeypatch.setattr(native, "run_block", lambda *a, **k: skipped.append(a[-1]) or original(*a, **k))
    x = _images(37, 1, (6, 6), 30)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-5)):
        got = gram(model, x.to(dtype), backend="native", tile_size=37, get=BOTH)
        want = gram(model, x.to(dtype), backend="eager", get=BOTH)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol * float(w.abs().max()))
    assert skipped == [True, True]  # the one square tile, as the same images on both sides
    leaves = variance_leaves(model, seed=31)
    weights = torch.rand(37, 37, generator=torch.Generator().manual_seed(32), dtype=F64)
    want = torch.autograd.grad((gram(model, x, backend="eager") * weights).sum(), leaves)
    got = torch.autograd.grad((gram(model, x, backend="native", tile_size=37) * weights).sum(), leaves)
    scale = float(max(v.abs().max() for v in want))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13 * scale)
