"""Algebraic invariants of the kernel engine: symmetry, consistency of the entry points, tiling,
precision, the compiled path, dtypes/devices and empty inputs.

Every check compares two independent ways of computing the same quantity (never a stored number); the entry
points are checked against the independent float64 reference of ``tests/reference_full.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference_full
import torch

from gpytorch_cnngp import Conv2d, ReLU, Sequential, Sum, architectures, gram, gram_diag, resnet_block

F64 = torch.float64


def _images(n: int, c: int, size: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g, dtype=F64).to(dtype)


def _small_models() -> dict[str, tuple[Sequential, int]]:
    """Small architectures of every layer kind, with the image size they reduce to 1x1."""
    return {
        "conv_relu": (
            Sequential(
                Conv2d(3, var_weight=2.0, var_bias=0.3),
                ReLU(),
                Conv2d(2, stride=2, var_weight=1.5, var_bias=0.1),
                ReLU(),
                Conv2d(4, padding=0, var_weight=1.2, var_bias=0.2),
            ),
            8,
        ),
        "dilated_padded": (
            Sequential(
                Conv2d(3, dilation=2, padding=1, var_weight=1.7, var_bias=0.05),
                ReLU(),
                Conv2d(4, padding="same", var_weight=3.0),
                ReLU(),
                Conv2d(5, padding=0, var_weight=0.9, var_bias=0.4),
            ),
            7,
        ),
        "resnet_blocks": (
            Sequential(
                Conv2d(3, var_weight=1.3, var_bias=0.2),
                resnet_block(),
                resnet_block(stride=2, projection_shortcut=True, multiplier=2),
                ReLU(),
                Conv2d(4, padding=0, var_weight=1.1, var_bias=0.1),
            ),
            8,
        ),
        "sum": (
            Sequential(
                Sum([Sequential(), Sequential(Conv2d(3, var_weight=2.0, var_bias=0.5), ReLU())]),
                Sum([Conv2d(1, var_weight=0.7), Sequential(ReLU(), Conv2d(3, var_weight=1.4, var_bias=0.1))]),
                ReLU(),
                Conv2d(6, padding=0, var_weight=2.5, var_bias=0.3),
            ),
            6,
        ),
    }


MODELS = _small_models()
MODEL_IDS = sorted(MODELS)


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Elementwise relative agreement, with an absolute floor scaled to the matrix' magnitude."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# entry points agree with each other


@pytest.mark.parametrize("name", MODEL_IDS)
def test_every_same_set_entry_point_equals_the_reference(name):
    """``model(X)``, ``model(X, X, same=True)`` and ``model(X, None, same=True)`` against the independent float64
    reference of ``tests/reference_full.py`` (full covariances, selection matrices, the exact diagonal)."""
    model, size = MODELS[name]
    x = _images(6, 2, size, seed=1)
    want = reference_full.kernel(reference_full.describe(model), x.numpy())
    for got in (model(x), model(x, x, same=True), model(x, None, same=True), gram(model, x)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-11, atol=0.0)
    with pytest.raises(ValueError, match="same=True requires Z to be X"):
        model(x, x.flip(0), same=True)


@pytest.mark.parametrize("name", MODEL_IDS)
def test_same_set_matches_generic_cross_kernel(name):
    model, size = MODELS[name]
    x = _images(6, 2, size, seed=2)
    k_same = model(x)
    k_cross = model(x, x)
    off = ~torch.eye(6, dtype=torch.bool)
    # off the diagonal both compute the same pairs with the same formulas
    _assert_rel_close(k_same[off], k_cross[off], rtol=1e-12)
    # on the diagonal the cross kernel evaluates J(rho ~ 1), which rounding perturbs slightly
    torch.testing.assert_close(k_cross.diagonal(), k_same.diagonal(), rtol=1e-7, atol=0.0)


@pytest.mark.parametrize("name", MODEL_IDS)
def test_every_diagonal_entry_point_equals_the_reference(name):
    """``model(X, diag=True)``, ``gram_diag`` and matched pairs ``model(X, Z, diag=True)`` against the
    independent float64 reference (its own-covariance diagonal, and the diagonal of its cross kernel)."""
    model, size = MODELS[name]
    x = _images(7, 3, size, seed=3)
    z = _images(7, 3, size, seed=4)
    arch = reference_full.describe(model)
    want = reference_full.kernel_diag(arch, x.numpy())
    np.testing.assert_allclose(model(x, diag=True).numpy(), want, rtol=1e-11, atol=0.0)
    np.testing.assert_allclose(gram_diag(model, x).numpy(), want, rtol=1e-11, atol=0.0)
    matched = np.diagonal(reference_full.kernel(arch, x.numpy(), z.numpy()))
    np.testing.assert_allclose(model(x, z, diag=True).numpy(), matched, rtol=1e-11, atol=0.0)


@pytest.mark.parametrize("name", MODEL_IDS)
def test_same_set_kernel_is_exactly_symmetric(name):
    model, size = MODELS[name]
    k = model(_images(9, 2, size, seed=5))
    assert torch.equal(k, k.T)


@pytest.mark.parametrize("name", MODEL_IDS)
def test_cross_kernel_transposes(name):
    model, size = MODELS[name]
    x = _images(5, 2, size, seed=6)
    z = _images(3, 2, size, seed=7)
    _assert_rel_close(model(x, z), model(z, x).T, rtol=1e-13)


def test_cross_kernel_is_a_block_of_the_joint_kernel():
    model, size = MODELS["conv_relu"]
    x = _images(4, 1, size, seed=8)
    z = _images(3, 1, size, seed=9)
    joint = model(torch.cat([x, z]))
    _assert_rel_close(model(x, z), joint[:4, 4:], rtol=1e-12)
    _assert_rel_close(model(z, x), joint[4:, :4], rtol=1e-12)


def test_hyper_override_equals_setting_the_layer_value():
    model, size = MODELS["conv_relu"]
    conv = model[0]
    x = _images(5, 1, size, seed=10)
    new_w, new_b = torch.tensor(0.7, dtype=F64), torch.tensor(1.9, dtype=F64)
    overridden = gram(model, x, hyper={conv: {"var_weight": new_w, "var_bias": new_b}})
    old_w, old_b = conv.var_weight, conv.var_bias
    try:
        conv.var_weight, conv.var_bias = new_w, new_b
        direct = model(x)
    finally:
        conv.var_weight, conv.var_bias = old_w, old_b
    assert torch.equal(overridden, direct)
    assert not torch.allclose(overridden, model(x))


# ---------------------------------------------------------------------------------------------
# precision: float32 against float64


@pytest.mark.parametrize(
    "factory, size",
    [
        (architectures.convnet_gp, 8),
        (architectures.convnet_gp, 28),
        (architectures.residual_cnn_gp, 12),
        (architectures.resnet32_gp, 8),
    ],
    ids=["convnet_gp-8", "convnet_gp-28", "residual_cnn_gp-12", "resnet32_gp-8"],
)
def test_float32_agrees_with_float64_on_paper_architectures(factory, size):
    model = factory(image_size=size)
    x = _images(4, 1, size, seed=11)
    z = _images(3, 1, size, seed=12)
    k64 = model(x)
    k32 = model(x.float())
    assert k32.dtype == torch.float32
    torch.testing.assert_close(k32.double(), k64, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(model(x.float(), z.float()).double(), model(x, z), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(model(x.float(), diag=True).double(), model(x, diag=True), rtol=1e-5, atol=0.0)


# ---------------------------------------------------------------------------------------------
# tiling


@pytest.mark.parametrize("name", MODEL_IDS)
def test_tile_size_does_not_change_the_result(name):
    model, size = MODELS[name]
    x = _images(8, 2, size, seed=13)  # 8 is not a multiple of 3 or 7
    z = _images(5, 2, size, seed=14)
    same_ref = gram(model, x)
    cross_ref = gram(model, x, z)
    for tile in (1, 3, 7, 8, 64):
        same = gram(model, x, tile_size=tile)
        assert torch.equal(same, same.T), tile
        _assert_rel_close(same, same_ref, rtol=1e-13)
        _assert_rel_close(gram(model, x, z, tile_size=tile), cross_ref, rtol=1e-13)


def test_diagonal_over_several_self_pass_chunks_is_bitwise_diag():
    """K(X, X)'s diagonal is bitwise diag=True also when the self pass runs in several chunks (CPU: 256 images),
    the last one short (a matrix product over another number of images may round differently, so both take
    their chunks from one rule); other chunk sizes agree to rounding."""
    model, size = MODELS["conv_relu"]
    x = _images(2 * 256 + 3, 2, size, seed=17)
    for dtype in (F64, torch.float32):
        xd = x.to(dtype)
        diag = gram_diag(model, xd)
        assert torch.equal(gram(model, xd).diagonal(), diag), dtype
        for chunk in (1, 7, x.shape[0]):
            _assert_rel_close(gram_diag(model, xd, chunk_size=chunk), diag, rtol=1e-13 if dtype == F64 else 1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        gram_diag(model, x, chunk_size=0)


def test_tiny_memory_budget_raises():
    model, size = MODELS["conv_relu"]
    x = _images(4, 1, size, seed=15)
    with pytest.raises(ValueError, match="memory_budget"):
        gram(model, x, memory_budget=64)
    with pytest.raises(ValueError, match="memory_budget"):
        gram(model, x, x, memory_budget=64)
    with pytest.raises(ValueError, match="memory_budget must be positive"):
        gram(model, x, memory_budget=0)


def test_tile_size_beyond_the_memory_budget_raises():
    model, size = MODELS["conv_relu"]
    x = _images(8, 1, size, seed=16)
    k = gram(model, x, tile_size=1, memory_budget=200_000)
    _assert_rel_close(k, gram(model, x), rtol=1e-13)
    with pytest.raises(ValueError, match="tile_size=.*memory_budget"):
        gram(model, x, tile_size=1000, memory_budget=200_000)


def test_bad_tile_size_raises():
    model, size = MODELS["conv_relu"]
    x = _images(3, 1, size, seed=17)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="tile_size"):
            gram(model, x, tile_size=bad)


# ---------------------------------------------------------------------------------------------
# the compiled path


_COMPILED_BACKEND = {"name": "native"}  # set by the compiled_path fixture


def _compiled_gram(*args, **kwargs) -> torch.Tensor:
    """``gram(..., backend=...)`` with the compiled_path fixture's backend; skips the test where torch.compile
    cannot run at all on this platform.

    A failure is blamed on the platform only if a trivial function fails to compile too, so that a
    compile error caused by the library still fails the test.
    """
    try:
        return gram(*args, backend=_COMPILED_BACKEND["name"], **kwargs)
    except Exception as err:
        try:
            torch.compile(lambda t: torch.sqrt(t * t + 1.0))(torch.ones(3))
        except Exception:  # pragma: no cover - depends on the platform
            pytest.skip(f"torch.compile does not run on this platform: {type(err).__name__}")
        raise


@pytest.fixture(params=["native", "inductor"])
def compiled_path(request, monkeypatch):
    """Run a compiled-path test through the native CPU kernel and through torch.compile (the path GPUs
    take); the native run checks that the kernel really ran."""
    from gpytorch_cnngp.backends import native

    calls = []
    monkeypatch.setitem(_COMPILED_BACKEND, "name", request.param)
    if request.param == "native":
        monkeypatch.delenv("CNNGP_NATIVE", raising=False)
        if native.load_library() is None:  # pragma: no cover - no C++ compiler
            pytest.skip("the native kernel cannot be built here")
        original = native.run_block
        monkeypatch.setattr(native, "run_block", lambda *a, **k: calls.append(1) or original(*a, **k))
    yield request.param
    if request.param == "native":
        assert calls, "the native kernel was not used"


def _compile_model():
    return Sequential(
        Conv2d(3, var_weight=2.0, var_bias=0.3), ReLU(), Conv2d(5, padding=0, var_weight=1.5, var_bias=0.2)
    )


def test_compiled_float32_same_set_matches_eager(compiled_path):
    model = _compile_model()
    x = _images(6, 2, 5, seed=18, dtype=torch.float32)
    compiled = _compiled_gram(model, x)
    eager = gram(model, x, backend="eager")
    assert compiled.dtype == torch.float32
    assert torch.equal(compiled, compiled.T)
    assert torch.equal(compiled.diagonal(), eager.diagonal())
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0.0)


def test_compiled_float64_cross_matches_eager(compiled_path):
    model = _compile_model()
    x = _images(5, 2, 5, seed=19)
    z = _images(4, 2, 5, seed=20)
    compiled = _compiled_gram(model, x, z)
    eager = gram(model, x, z, backend="eager")
    assert compiled.dtype == F64
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=0.0)


def test_compiled_edge_images_match_eager_float64(compiled_path):
    """Black images (zero variance) and the same image on both sides (rho = 1) through the compiled
    path's arccos-free ReLU, against the eager float64 kernel, across a residual network."""
    model, size = MODELS["resnet_blocks"]
    x = _images(4, 2, size, seed=41)
    x[1] = 0.0  # a black image
    z = torch.cat([x[:2], _images(2, 2, size, seed=42)])  # z[0] = x[0], z[1] = x[1] (black)
    want = gram(model, x, z, backend="eager")
    got = _compiled_gram(model, x.float(), z.float())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    # the black image's row and column are the bias-only kernel, identical in both paths
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-6, atol=0.0)


# ---------------------------------------------------------------------------------------------
# dtype, device and empty inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_dtype_and_device_follow_the_input(dtype):
    model, size = MODELS["resnet_blocks"]
    x = _images(3, 2, size, seed=21, dtype=dtype)
    z = _images(2, 2, size, seed=22, dtype=dtype)
    for out, shape in ((model(x), (3, 3)), (model(x, z), (3, 2)), (model(x, diag=True), (3,))):
        assert out.dtype == dtype
        assert out.device == x.device
        assert tuple(out.shape) == shape
    other = F64 if dtype == torch.float32 else torch.float32
    converted = gram(model, x, dtype=other)
    assert converted.dtype == other
    torch.testing.assert_close(converted.double(), model(x.double()), rtol=1e-5, atol=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_output_follows_a_cuda_input():
    model, size = MODELS["conv_relu"]
    x = _images(4, 1, size, seed=23)
    k_gpu = model(x.cuda())
    assert k_gpu.device.type == "cuda"
    torch.testing.assert_close(k_gpu.cpu(), model(x), rtol=1e-12, atol=0.0)
    assert gram(model, x, device="cuda").device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_sets(dtype):
    model, size = MODELS["conv_relu"]
    x = _images(4, 1, size, seed=24, dtype=dtype)
    empty = x[:0]
    cases = [
        (model(empty), (0, 0)),
        (model(empty, x), (0, 4)),
        (model(x, empty), (4, 0)),
        (model(empty, empty), (0, 0)),
        (model(empty, diag=True), (0,)),
        (model(empty, empty, diag=True), (0,)),
        (gram(model, empty, tile_size=3), (0, 0)),
    ]
    for out, shape in cases:
        assert tuple(out.shape) == shape
        assert out.dtype == dtype


def test_gram_leaves_the_garbage_collector_as_it_found_it(monkeypatch):
    """The tile loop pauses Python's cyclic GC; afterwards it is on again, or still off if it was off,
    also when a tile fails."""
    import gc

    from gpytorch_cnngp.backends import eager

    model, size = MODELS["conv_relu"]
    x = _images(5, 2, size, seed=40)
    assert gc.isenabled()
    gram(model, x, tile_size=2)
    assert gc.isenabled()
    real_block, calls = eager.pair_block, []  # the eager pair pass (backend="eager" below)

    def failing_block(*args, **kwargs):
        calls.append(gc.isenabled())
        if len(calls) == 2:
            raise RuntimeError("tile failed")
        return real_block(*args, **kwargs)

    monkeypatch.setattr(eager, "pair_block", failing_block)
    with pytest.raises(RuntimeError, match="tile failed"):
        gram(model, x, tile_size=2, backend="eager")
    assert calls == [False, False]  # paused inside the loop
    assert gc.isenabled()
    monkeypatch.undo()
    gc.disable()
    try:
        gram(model, x, tile_size=2)
        assert not gc.isenabled()
    finally:
        gc.enable()
