"""The native CPU kernel (gpytorch_cnngp.backends.native): lowering, agreement with the eager float64 path on
every supported layer geometry, fallbacks, and the edges (black and identical images)."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from variance_leaves import variance_leaves

from gpytorch_cnngp import (
    AvgPool2d,
    Conv2d,
    Dense,
    Erf,
    LeakyReLU,
    ReLU,
    Sequential,
    Sum,
    architectures,
    gram,
    settings,
)
from gpytorch_cnngp.backends import native

F64 = torch.float64


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    monkeypatch.delenv("CNNGP_NATIVE", raising=False)
    if native.load_library() is None:  # pragma: no cover - no C++ compiler, or a broken kernel
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            pytest.skip("no C++ compiler here to build the native kernel")
        # a kernel that fails to build or fails its self-test must not turn these tests into skips
        pytest.fail(f"the native kernel did not load: {native.build._LIB_ERROR}")


@pytest.fixture
def spy(monkeypatch):
    calls = []
    original = native.run_block
    monkeypatch.setattr(native, "run_block", lambda *a, **k: calls.append(a[3].shape) or original(*a, **k))
    return calls


def _images(n, c, size, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=gen, dtype=dtype)


# every supported layer and geometry: stride, dilation, even k, explicit and asymmetric padding, Sum
# (with an identity branch and a 3-way sum), LeakyReLU, Dense, Conv readout, multi-channel inputs
MODELS = {
    "stride_dilation": (
        Sequential(
            Conv2d(3, stride=2, var_bias=0.2),
            ReLU(),
            Conv2d(3, dilation=2, padding=1, var_weight=1.7),
            ReLU(),
            Dense(var_weight=1.3, var_bias=0.4),
        ),
        9,
    ),
    "even_same": (
        Sequential(Conv2d(4, var_weight=2.5, var_bias=0.1), LeakyReLU(0.3), Conv2d(2), ReLU(), Conv2d(8, padding=0)),
        8,
    ),
    "sums": (
        Sequential(
            Conv2d(3),
            Sum([Sequential(), Sequential(ReLU(), Conv2d(3, var_bias=0.5)), Sequential(LeakyReLU(-0.5), Conv2d(1))]),
            ReLU(),
            Conv2d(5, stride=2, padding=2),
            ReLU(),
            Dense(),
        ),
        7,
    ),
    # running window sums: windows clipped unevenly on both sides, wider than their input, after a signed map
    "running_windows": (
        Sequential(Conv2d(5, padding=1), LeakyReLU(-0.5), Conv2d(6, padding=4), ReLU(), Conv2d(11, padding=1), Dense()),
        12,
    ),
    "strided_shortcut": (Sequential(Conv2d(3), architectures.resnet_block(stride=2, multiplier=2), Dense()), 8),
    # three-tap windows slid along in registers: no padding, maps narrower than the window (no interior
    # output), padding wider than one tap
    "three_taps": (
        Sequential(
            Conv2d(3, padding=0),
            ReLU(),
            Conv2d(3, padding=1),
            LeakyReLU(0.2),
            Conv2d(3, padding=2),
            ReLU(),
            Conv2d(3, padding=1, var_bias=0.3),
            ReLU(),
            Conv2d(3, padding=0),
            Dense(),
        ),
        4,
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_native_matches_eager_float64_and_float32(name, spy):
    model, size = MODELS[name]
    x = _images(7, 3, size, seed=1)
    z = _images(21, 3, size, seed=2)  # 21 columns: not a whole number of lane groups in either dtype
    want = gram(model, x, z, backend="eager")
    got = gram(model, x, z, backend="native")
    assert spy, "the native kernel was not used"
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    got32 = gram(model, x.float(), z.float(), backend="native")
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_native_ntk_matches_eager_float64_and_float32(name, spy):
    """The NTK map carried beside the NNGP's (window sums plus the new NNGP, the (leaky) ReLU's derivative
    factor by its arccos-free polynomial, sums) on every geometry; the NNGP of the same call is unchanged."""
    model, size = MODELS[name]
    x = _images(7, 3, size, seed=11)
    z = _images(21, 3, size, seed=12)
    both = ("nngp", "ntk")
    want = gram(model, x, z, backend="eager", get=both)
    got = gram(model, x, z, backend="native", get=both)
    assert spy, "the native kernel was not used"
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0.0)
    for g, w in zip(gram(model, x.float(), z.float(), backend="native", get=both), want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=0.0)


def test_native_ntk_at_black_and_identical_images():
    """A black image's NTK entries (bias terms only) equal eager's; an image paired with itself off the exact
    diagonal equals its own self value (the ReLU factor 1/2) to the rounding that the arccos amplifies there:
    rho = 1 - eps gives arccos(rho) ~ sqrt(2 eps), about 1e-8 per layer in float64."""
    model, size = MODELS["sums"]
    x = _images(4, 2, size, seed=6)
    x[1] = 0.0
    z = torch.cat([x[:2], _images(3, 2, size, seed=7)])
    got = gram(model, x, z, backend="native", get="ntk")
    want = gram(model, x, z, backend="eager", get="ntk")
    assert torch.isfinite(got).all()
    distinct = ~torch.eye(4, 5, dtype=torch.bool)  # z[:2] are x[:2], the black one included
    torch.testing.assert_close(got[distinct], want[distinct], rtol=1e-12, atol=0.0)
    self_ntk = model(x[:2], diag=True, get="ntk")
    torch.testing.assert_close(got[[0, 1], [0, 1]], self_ntk, rtol=1e-6, atol=0.0)
    got32 = gram(model, x.float(), z.float(), backend="native", get="ntk")
    torch.testing.assert_close(got32[[0, 1], [0, 1]].double(), self_ntk, rtol=3e-3, atol=0.0)


def test_native_symmetric_gram_small_tiles(spy):
    """K(X, X) over several tiles (tile edges not a multiple of the lanes): exactly symmetric, with the
    exact self variances on the diagonal, and equal to the eager kernel."""
    model, size = MODELS["sums"]
    x = _images(23, 2, size, seed=3)
    want = gram(model, x, backend="eager")
    got = gram(model, x, backend="native", tile_size=10)
    assert len(spy) == 6  # the 3 x 3 tiles on and above the diagonal
    assert torch.equal(got, got.T)
    assert torch.equal(got.diagonal(), model(x, diag=True))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


def test_paper_architectures_match_eager(spy):
    for build in (architectures.convnet_gp, architectures.residual_cnn_gp, architectures.resnet32_gp):
        model = build(image_size=12)
        x, z = _images(3, 1, 12, seed=4), _images(17, 1, 12, seed=5)
        torch.testing.assert_close(
            gram(model, x, z, backend="native"), gram(model, x, z, backend="eager"), rtol=1e-12, atol=0
        )


def test_edge_images_black_and_identical():
    """A black image (zero variances: 1/s is taken as 0) and the same image on both sides (rho = 1,
    where the polynomial's (1 - a)^(3/2) factor vanishes) give finite values equal to the eager ones."""
    model, size = MODELS["sums"]
    x = _images(4, 2, size, seed=6)
    x[1] = 0.0
    z = torch.cat([x[:2], _images(3, 2, size, seed=7)])
    for dtype, rtol in ((F64, 1e-12), (torch.float32, 1e-5)):
        want = gram(model, x, z, backend="eager")
        got = gram(model, x.to(dtype), z.to(dtype), backend="native")
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6 * float(want.abs().max()))
        # the black image's entries are the bias-only kernel, the same in both paths
        torch.testing.assert_close(got[1].double(), want[1], rtol=10 * rtol, atol=0.0)


def test_hyperparameters_are_read_at_call_time():
    model = Sequential(Conv2d(3, var_weight=1.0, var_bias=0.1), ReLU(), Dense())
    x, z = _images(3, 1, 6, seed=8), _images(5, 1, 6, seed=9)
    before = gram(model, x, z, backend="native")
    model[0].var_weight = 3.0
    after = gram(model, x, z, backend="native")
    override = gram(model, x, z, backend="native", hyper={model[0]: {"var_weight": torch.tensor(1.0, dtype=F64)}})
    torch.testing.assert_close(after, gram(model, x, z, backend="eager"), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(override, before, rtol=1e-12, atol=0.0)
    assert not torch.allclose(before, after)


def test_lowering_supports_relu_networks_and_pools_outside_sums():
    assert native.lower(MODELS["sums"][0], (7, 7)) is not None
    assert native.lower(Sequential(Conv2d(3), Erf(), Dense()), (6, 6)) is None
    assert native.lower(Sequential(Conv2d(3), ReLU(), AvgPool2d(2), Dense()), (6, 6)).pooled
    inside = Sequential(Conv2d(3), Sum([Sequential(), AvgPool2d(3, stride=1, padding=1)]), Dense())
    assert native.lower(inside, (6, 6)) is None
    assert "AvgPool2d (a pooling layer inside a branch of a Sum" in native.unsupported(inside, (6, 6))
    # the reverse mode's program keeps every map
    kept = native.lower(Sequential(Conv2d(3), ReLU(), AvgPool2d(2), Dense()), (6, 6), reuse=False)
    assert kept.n_regs == int((kept.code[:, 1] >= 0).sum()) - int((kept.code[:, 0] == native.lowering._OP_POOL).sum())


def test_register_allocation_reuses_registers():
    """A ResNet-32 GP has 70 maps per pair but only a handful live at once."""
    program = native.lower(architectures.resnet32_gp(), (28, 28))
    code = program.code
    assert code.shape[1] == 22
    assert program.n_regs <= 4
    # only the first convolution reads the input's NTK map, which is zero, so only it carries that flag
    flagged = (code[:, 18] & 1).nonzero().flatten().tolist()
    assert flagged == [1] and int(code[0, 0]) == 0 and int(code[1, 0]) == 1 and int(code[1, 2]) == int(code[0, 1])
    assert len(program.slot_areas) == 31  # its nonlinearities, in trace order
    assert program.reg_area == 28 * 28
    # every register read was written by an earlier instruction and not overwritten since
    written = {}
    for k, row in enumerate(code.tolist()):
        op, dst, a, b = row[:4]
        for r in (a, b):
            if r >= 0:
                assert r in written, f"instruction {k} reads register {r} before any write"
        if dst >= 0:
            written[dst] = k
    # the same values as with a register per map: each program run on symbols (one shared table of values, so
    # equal computations get equal numbers) ends with the same output
    table: dict[tuple, int] = {}

    def output(program):
        regs, out = {}, None
        for op, dst, a, b, *rest in program.code.tolist():
            param, slot = rest[12], rest[13]
            key = {0: ("input",), 1: ("conv", param, regs.get(a), regs.get(b) if b >= 0 else None)}.get(op)
            key = key or {2: ("nonlin", slot, regs.get(a)), 3: ("sum", regs.get(a), regs.get(b))}.get(op)
            if op == 4:
                out = regs[a]
            else:
                regs[dst] = table.setdefault(key, len(table))
        return out

    model = architectures.resnet32_gp()
    for fuse in (False, True):
        assert output(native.lower(model, (28, 28), fuse=fuse)) == output(native.lower(model, (28, 28), False, fuse))
    # nonlinearities whose input is not read again run in place (their stores hit the lines their loads brought
    # in); those whose input a block's shortcut still reads cannot
    nonlins = [row for row in code.tolist() if row[0] == 2]
    assert 0 < sum(row[1] == row[2] for row in nonlins) < len(nonlins)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_trace_packing_matches_the_layout_built_with_torch(dtype):
    """The kernel packs the traces itself (standard deviations and their inverses, 0 for a zero deviation):
    the same layouts built here with torch ops, from slices of traces as the engine's tiles pass them, with a
    second set that does not fill its last lane group."""
    gen = torch.Generator().manual_seed(3)
    full = [torch.rand(3, 3, 40, generator=gen, dtype=dtype), torch.rand(2, 2, 40, generator=gen, dtype=dtype)]
    full[0][1, 2, 5] = 0.0  # a black image's position
    traces = [t[..., 3:26] for t in full]  # 23 images, rows 40 apart
    n, lanes = 23, native.LANES[dtype]
    s = torch.cat([t.reshape(-1, n) for t in traces])  # [positions, n]
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    lib = native.load_library()
    left = native.run._pack_traces(lib, traces, n, dtype, False, 2)
    assert torch.equal(left, torch.stack([s.t(), inv.t()], dim=-1))
    groups = -(-n // lanes)
    pad = groups * lanes - n
    s_p, inv_p = (torch.nn.functional.pad(v, (0, pad)).reshape(-1, groups, lanes).transpose(0, 1) for v in (s, inv))
    right = native.run._pack_traces(lib, traces, n, dtype, True, 2)
    assert torch.equal(right, torch.stack([s_p, inv_p], dim=2))
    assert right.shape == (groups, 13, 2, lanes) and bool((right[-1, :, :, n % lanes :] == 0).all())


def test_unsupported_networks_and_image_gradients_do_not_use_it(spy):
    x = _images(3, 1, 6, seed=10)
    gram(Sequential(Conv2d(3), Erf(), Dense()), x, backend="eager")
    model = Sequential(Conv2d(3), ReLU(), Dense())
    leaf = x.clone().requires_grad_(True)
    gram(model, leaf, backend="native").sum().backward()  # gradients with respect to images take the eager path
    assert leaf.grad is not None
    assert not spy


@pytest.fixture
def vjp_spy(monkeypatch):
    calls = []
    original = native.run_block_vjp
    monkeypatch.setattr(native, "run_block_vjp", lambda *a, **k: calls.append(a[3].dtype) or original(*a, **k))
    return calls


@pytest.mark.parametrize("name", sorted(MODELS))
def test_native_hyperparameter_gradients_match_eager(name, spy, vjp_spy):
    """Reverse mode in the native kernel (the transposed window sums, the ReLU's adjoint into the covariance and
    both standard deviations, sums) against autograd through the eager pair pass, for K(X, X) over several tiles
    and for K(X, Z); float64 to 1e-10, float32 to 1e-4."""
    model, size = MODELS[name]
    model = copy.deepcopy(model)  # its own variances: the shared models stay as the other tests expect them
    leaves = variance_leaves(model, seed=20)
    x = _images(11, 3, size, seed=21)
    z = _images(21, 3, size, seed=22)
    for zz, tile in ((None, 4), (z, None)):
        gen = torch.Generator().manual_seed(23)
        weights = torch.rand(11, 11 if zz is None else 21, generator=gen, dtype=F64)
        want = torch.autograd.grad((gram(model, x, zz, backend="eager", tile_size=tile) * weights).sum(), leaves)
        got = torch.autograd.grad((gram(model, x, zz, backend="native", tile_size=tile) * weights).sum(), leaves)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13 * float(max(v.abs().max() for v in want)))
        x32, z32 = x.float(), None if zz is None else zz.float()
        got = torch.autograd.grad((gram(model, x32, z32, backend="native", tile_size=tile) * weights).sum(), leaves)
        want32 = torch.autograd.grad((gram(model, x32, z32, backend="eager", tile_size=tile) * weights).sum(), leaves)
        scale = float(max(v.abs().max() for v in want))
        for g, w in zip(got, want32, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)
    assert F64 in vjp_spy and torch.float32 in vjp_spy, "the native gradients were not used"
    assert spy, "the native forward was not used"


def test_native_gradients_match_finite_differences_at_black_and_identical_images(vjp_spy):
    """Central differences of a weighted K(X, Z) in each hyperparameter (relative step 1e-5), with a black image
    and an image paired with itself off the exact diagonal (rho = 1 up to rounding) among the pairs."""
    model, size = MODELS["sums"]
    model = copy.deepcopy(model)
    leaves = variance_leaves(model, seed=24)
    x = _images(4, 2, size, seed=25)
    x[1] = 0.0
    z = torch.cat([x[:2], _images(3, 2, size, seed=26)])
    weights = torch.rand(4, 5, generator=torch.Generator().manual_seed(27), dtype=F64) + 0.5
    grads = torch.autograd.grad((gram(model, x, z, backend="native") * weights).sum(), leaves)
    assert vjp_spy
    layers = [(layer, name) for layer in model.kernel_layers() if "var_weight" in layer.hyperparameter_names
              for name in ("var_weight", "var_bias")]  # fmt: skip
    for (layer, name), leaf, g in zip(layers, leaves, grads, strict=True):
        p = leaf.item()
        h = 1e-5 * p
        values = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                setattr(layer, name, torch.tensor(p + sign * h, dtype=F64))
                values.append(float((gram(model, x, z, backend="native") * weights).sum()))
        setattr(layer, name, leaf)
        fd = (values[0] - values[1]) / (2 * h)
        assert abs(g.item() - fd) <= 1e-6 * abs(fd) + 1e-9, f"{type(layer).__name__}.{name}: {g.item()} vs {fd}"


def test_switched_off_by_environment(monkeypatch, spy):
    monkeypatch.setenv("CNNGP_NATIVE", "0")
    model = Sequential(Conv2d(3), ReLU(), Dense())
    x = _images(3, 1, 6, seed=11, dtype=torch.float32)
    with settings.auto_native_pairs(1):
        torch.testing.assert_close(gram(model, x), gram(model, x, backend="eager"), rtol=1e-5, atol=0.0)
    assert not spy
    with pytest.raises(ValueError, match=r"backend='native' cannot run.*switched off.*CNNGP_NATIVE=0"):
        gram(model, x, backend="native")


def test_auto_mode_uses_it_from_a_few_pairs_on(monkeypatch, spy):
    monkeypatch.delenv("CNNGP_COMPILE", raising=False)
    model = Sequential(Conv2d(3), ReLU(), Dense())
    x = _images(20, 1, 6, seed=12)
    gram(model, x[:3])
    assert not spy  # 9 pairs: eager (both paths are dominated by the self pass they share)
    gram(model, x)
    assert spy  # 400 pairs: native
    spy.clear()
    with settings.auto_native_pairs(1000):
        gram(model, x)
    assert not spy
    with settings.auto_native_pairs(100):
        gram(model, x)
    assert spy
    spy.clear()
    monkeypatch.setenv("CNNGP_COMPILE", "0")  # compilation switched off: eager
    gram(model, x)
    assert not spy
    with settings.compile_mode("auto"):  # a context manager overrides the environment
        gram(model, x)
    assert spy


def test_missing_compiler_falls_back_with_a_warning(monkeypatch, tmp_path, spy):
    monkeypatch.setattr(native.build, "_LIB", None)
    monkeypatch.setattr(native.build, "_LIB_ERROR", None)
    monkeypatch.setenv("CNNGP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-cnngp")
    model = Sequential(Conv2d(3), ReLU(), Dense())
    x = _images(3, 1, 6, seed=13)
    with pytest.warns(RuntimeWarning, match="native CPU kernel could not be built.*no-such-compiler"):
        with settings.auto_native_pairs(1):
            out = gram(model, x)  # backend="auto": falls back
    torch.testing.assert_close(out, gram(model, x, backend="eager"), rtol=1e-12, atol=0.0)
    assert not spy
    with pytest.raises(ValueError, match=r"backend='native' cannot run.*could not be built.*no-such-compiler"):
        gram(model, x, backend="native")  # an explicit request is not quietly replaced
    assert list(tmp_path.iterdir()) == [] or all(p.suffix != ".so" for p in tmp_path.rglob("*"))


def test_a_kernel_that_fails_its_self_test_is_not_used(monkeypatch):
    """A miscompiled kernel (simulated: it returns wrong values) is rejected when loaded."""
    lib = native.load_library()
    monkeypatch.setattr(native.build, "_LIB", None)
    monkeypatch.setattr(native.build, "_LIB_ERROR", None)
    monkeypatch.setattr(native.build, "_build_and_load", lambda: lib)
    original = native.build.run_block  # the self-test's runner (the backend's is native.run_block)
    monkeypatch.setattr(native.build, "run_block", lambda *a, **k: original(*a, **k) * 1.001)
    with pytest.warns(RuntimeWarning, match="self-test failed"):
        assert native.load_library() is None


def test_build_is_cached_per_source(monkeypatch, tmp_path, capsys):
    """A fresh cache directory gets one library, built under a temporary name and renamed, with one line said."""
    monkeypatch.setenv("CNNGP_CACHE_DIR", str(tmp_path))
    lib = native.build._build_and_load()
    built = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].startswith("cnngp_native_") and built[0].endswith(".so")
    assert lib.cnngp_fields() == 22
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "building the native CPU kernel" in said[0] and str(tmp_path) in said[0]
    native.build._build_and_load()  # loads the cached file, builds nothing new
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == built
    assert capsys.readouterr().err == ""


def test_a_compiler_without_openmp_builds_the_kernel_with_its_own_threads(monkeypatch, tmp_path, capsys):
    """-fopenmp refused (as by a clang without libomp): the kernel is built without it, uses std::thread, and
    passes its self-test."""
    if shutil.which("g++") is None:  # pragma: no cover - the wrapper below calls g++
        pytest.skip("no g++ here")
    wrapper = tmp_path / "cxx"
    wrapper.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "no OpenMP here" >&2; exit 1; }; done\n'
        'exec g++ "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("CNNGP_CACHE_DIR", str(tmp_path / "cache"))
    lib = native.build._build_and_load()
    native.build._self_test(lib)
    assert len(list((tmp_path / "cache" / "native").glob("*.so"))) == 1
    assert "building the native CPU kernel" in capsys.readouterr().err


def test_experiment_blocks_use_it_by_default_on_cpu(monkeypatch, spy):
    # the pipeline's blocks follow gram's own policy (compute_block(backend="auto") passes it through)
    from gpytorch_cnngp.backends import native_ready
    from gpytorch_cnngp.distributed import ArchitectureSpec, compute_block

    monkeypatch.delenv("CNNGP_COMPILE", raising=False)
    spec = ArchitectureSpec.from_name("convnet_gp", image_size=8, depth=2, kernel_size=3)
    x = _images(9, 1, 8, seed=13).numpy()
    assert native_ready(spec.cached(), (8, 8), F64)
    values, _, dev = compute_block(spec, x, (0, 5), x, (3, 9), dtype="float64", backend="auto")
    assert dev == "cpu" and spy
    reference = gram(spec.cached(), torch.from_numpy(x[:5]), torch.from_numpy(x[3:9]), backend="eager")
    torch.testing.assert_close(torch.from_numpy(values), reference, rtol=1e-12, atol=0.0)
    spy.clear()
    compute_block(spec, x, (0, 5), x, (3, 9), dtype="float64", backend="eager")
    assert not spy
    # pooled networks too
    pooled = ArchitectureSpec.from_name("pooled_cnn_gp", image_size=8)
    assert native_ready(pooled.cached(), (8, 8), F64)
    spy.clear()
    values, _, _ = compute_block(pooled, x, (0, 4), x, (0, 9), dtype="float64", backend="auto")
    reference = gram(pooled.cached(), torch.from_numpy(x[:4]), torch.from_numpy(x), backend="eager")
    torch.testing.assert_close(torch.from_numpy(values), reference, rtol=1e-12, atol=0.0)
    assert spy
    # networks it cannot run stay eager under backend="auto" (not torch.compile)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    spy.clear()
    small = ArchitectureSpec.from_name("convnet_gp", image_size=8, depth=1, kernel_size=3)
    with settings.native(False):
        values, _, _ = compute_block(small, x, (0, 3), x, (0, 3), dtype="float64", backend="auto")
    reference = gram(small.cached(), torch.from_numpy(x[:3]), backend="eager")
    torch.testing.assert_close(torch.from_numpy(values), reference, rtol=1e-12, atol=0.0)
    assert not spy
    monkeypatch.setenv("CNNGP_NATIVE", "0")
    assert not native_ready(spec.cached(), (8, 8), F64)
    assert not native_ready(spec.cached(), (8, 8), torch.float16)


def _packed_by_torch(traces, n, lanes):
    """The kernel's two trace layouts built with torch ops (as in the packing test above)."""
    s = torch.cat([t.reshape(-1, n) for t in traces])  # [positions, n]
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    groups = -(-n // lanes)
    pad = groups * lanes - n
    s_p, inv_p = (torch.nn.functional.pad(v, (0, pad)).reshape(-1, groups, lanes).transpose(0, 1) for v in (s, inv))
    return torch.stack([s.t(), inv.t()], dim=-1), torch.stack([s_p, inv_p], dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_the_kernels_self_pass_matches_the_eager_one(dtype):
    """The kernel's own self pass against the eager one, packed by torch: standard deviations and their inverses
    (0 for a black image) in both layouts, zero padding lanes, and k(x, x) for the NNGP and the NTK."""
    from gpytorch_cnngp.passes import self_pass, spatial_first
    from gpytorch_cnngp.state import Hyper

    size = 7
    model = Sequential(
        Conv2d(3),  # no bias: a black image has zero variances here
        Sum([Sequential(), Sequential(ReLU(), Conv2d(3, var_bias=0.5)), Sequential(LeakyReLU(-0.5), Conv2d(1))]),
        ReLU(),
        Conv2d(5, stride=2, padding=2),
        ReLU(),
        Dense(),
    )
    n, lanes = 21, native.LANES[dtype]
    images = _images(n, 2, size, seed=11, dtype=dtype)
    images[4] = 0.0
    x = spatial_first(images)
    hyper = Hyper.of(model, dtype, "cpu")
    lib = native.load_library()
    rtol = 1e-5 if dtype == torch.float32 else 1e-13
    for ntk in (False, True):
        program = native.lower(model, (size, size), fuse=not ntk)
        params = program.parameter_vector(hyper, dtype)
        left, right, own = native.self_terms(lib, program, params, x, 2, ntk=ntk, final=True)
        with torch.no_grad():
            trace, want = self_pass(model, x, hyper, ntk=ntk)
        want_left, want_right = _packed_by_torch(trace, n, lanes)
        torch.testing.assert_close(left.data, want_left, rtol=rtol, atol=0.0)
        torch.testing.assert_close(right.data, want_right, rtol=rtol, atol=0.0)
        assert bool((right.data[-1, :, :, n % lanes :] == 0).all())
        assert bool((want_left[4, :, 0] == 0).any())  # the black image has zero deviations, whose inverses are 0
        torch.testing.assert_close(own, want, rtol=rtol, atol=0.0)


def test_sums_fused_into_window_sums_give_the_same_bits():
    """Each residual sum of a ResNet-32 GP follows a window sum, which then does it in its store: the same
    kernel to the bit, one instruction less per block; the NTK and the reverse mode refuse such programs."""
    model = architectures.resnet32_gp(image_size=12)
    plain, fused = native.lower(model, (12, 12)), native.lower(model, (12, 12), fuse=True)
    adds = int((plain.code[:, 0] == 3).sum())
    assert adds == 15 and int((fused.code[:, 0] == 3).sum()) == 0
    assert fused.code.shape[0] == plain.code.shape[0] - adds
    lib = native.load_library()
    for dtype in (torch.float32, F64):
        from gpytorch_cnngp.passes import self_pass, spatial_first
        from gpytorch_cnngp.state import Hyper

        hyper = Hyper.of(model, dtype, "cpu")
        x, z = spatial_first(_images(3, 1, 12, seed=12, dtype=dtype)), spatial_first(_images(9, 1, 12, seed=13))
        z = z.to(dtype)
        with torch.no_grad():
            tx, tz = self_pass(model, x, hyper)[0], self_pass(model, z, hyper)[0]
        params = plain.parameter_vector(hyper, dtype)
        want = native.run_block(lib, plain, params, x, z, tx, tz, 2)
        assert torch.equal(native.run_block(lib, fused, params, x, z, tx, tz, 2), want)
        with pytest.raises(RuntimeError, match="status 6"):
            native.run_block(lib, fused, params, x, z, tx, tz, 2, ntk=True)
        with pytest.raises(RuntimeError, match="status 6"):
            native.run_block_vjp(lib, fused, params, x, z, tx, tz, torch.ones(3, 9, dtype=dtype), 2)


def test_a_changed_negative_slope_is_lowered_again():
    """Programs are remembered per network; the slope of a LeakyReLU, which lowering reads, is checked."""
    model = Sequential(Conv2d(3), LeakyReLU(0.2), Conv2d(3), ReLU(), Dense())
    x, z = _images(4, 1, 6, seed=14), _images(5, 1, 6, seed=15)
    before = gram(model, x, z, backend="native")
    model[1].negative_slope = -0.4
    after = gram(model, x, z, backend="native")
    torch.testing.assert_close(after, gram(model, x, z, backend="eager"), rtol=1e-12, atol=0.0)
    assert not torch.allclose(before, after)


def test_parameter_vector_entries():
    """One gather and division: each entry is hyper(layer, name) / divisor, or its constant."""
    from gpytorch_cnngp.state import Hyper

    model = MODELS["sums"][0]
    program = native.lower(model, (7, 7))
    for dtype in (torch.float32, F64):
        hyper = Hyper.of(model, dtype, "cpu")
        got = program.parameter_vector(hyper, dtype)
        for k, (layer, name, divisor) in enumerate(program.params):
            want = torch.tensor(name, dtype=dtype) if layer is None else hyper(layer, name).to(dtype) / divisor
            assert torch.equal(got[k], want), (k, layer, name)
    # other values for the same layers: a new vector (the last one is kept for the same Hyper only); values of
    # shapes [] and [1] mixed (a GPyTorch raw parameter's shape) give the same entries
    hyper = Hyper.of(model, F64, "cpu")
    first = program.parameter_vector(hyper, F64)
    doubled = hyper.with_values([2 * v if k % 2 else (2 * v).reshape(1) for k, v in enumerate(hyper.values)])
    got = program.parameter_vector(doubled, F64)
    for k, (layer, name, _) in enumerate(program.params):
        assert got[k] == (first[k] if layer is None else 2 * first[k]), (k, layer, name)
    with pytest.raises(ValueError, match="one number"):
        program.parameter_vector(hyper.with_values([v.expand(2) for v in hyper.values]), F64)


def test_forward_calls_take_the_traces_from_the_kernels_self_pass(monkeypatch):
    """The native forward packs no eager traces: the kernel's self pass makes them, and the diagonal of K(X, X) (a
    second self pass of all the images, the one gram_diag makes). A backward pass recomputes the traces eagerly,
    with their graph."""
    calls = []
    original = native.self_terms
    monkeypatch.setattr(native, "self_terms", lambda *a, **k: calls.append(a[3].shape[-1]) or original(*a, **k))
    model, size = MODELS["sums"]
    x, z = _images(7, 2, size, seed=16), _images(5, 2, size, seed=17)
    gram(model, x, z, backend="native")
    assert calls == [7, 5]
    sym = gram(model, x, backend="native")
    assert calls == [7, 5, 7, 7] and torch.equal(sym.diagonal(), model(x, diag=True))
    assert calls == [7, 5, 7, 7, 7]
    weight = torch.tensor(1.3, dtype=F64, requires_grad=True)
    gram(model, x, z, backend="native", hyper={model[0]: {"var_weight": weight}}).sum().backward()
    assert calls == [7, 5, 7, 7, 7, 7, 5] and weight.grad is not None


def test_tiles_of_a_symmetric_gram_compute_each_self_pass_once(monkeypatch):
    """K(X, X) in 3 x 3 tiles: a row of tiles computes its rows (bringing the layout its diagonal tile reads as
    columns), then the columns right of the diagonal: one kernel self pass per tile on and above the diagonal, after
    the diagonal's of all the images."""
    calls = []
    original = native.self_terms
    monkeypatch.setattr(native, "self_terms", lambda *a, **k: calls.append(a[3].shape[-1]) or original(*a, **k))
    model, size = MODELS["sums"]
    x = _images(23, 2, size, seed=18)
    got = gram(model, x, backend="native", tile_size=8)
    assert calls == [23, 8, 8, 7, 8, 7, 7]
    torch.testing.assert_close(got, gram(model, x, backend="eager"), rtol=1e-12, atol=0.0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_the_kernel_runs_in_a_forked_child():
    """OpenMP's workers do not survive fork(): a child process (a forked data loader, say) that calls the kernel
    makes its own threads instead of waiting for its parent's forever."""
    import time

    from gpytorch_cnngp.passes import self_pass, spatial_first
    from gpytorch_cnngp.state import Hyper

    model = Sequential(Conv2d(3), ReLU(), Dense())
    gram(model, _images(64, 1, 8, seed=19), backend="native")  # the parent's OpenMP workers exist
    lib = native.load_library()
    program = native.lower(model, (6, 6))
    x, z = spatial_first(_images(3, 1, 6, seed=20)), spatial_first(_images(20, 1, 6, seed=21))
    hyper = Hyper.of(model, F64, "cpu")
    params = program.parameter_vector(hyper, F64)
    with torch.no_grad():
        tx, tz = self_pass(model, x, hyper)[0], self_pass(model, z, hyper)[0]
    want = native.run_block(lib, program, params, x, z, tx, tz, 2)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        got = native.run_block(lib, program, params, x, z, tx, tz, 2)
        os._exit(0 if torch.equal(got, want) else 3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the kernel hung in a forked child")
