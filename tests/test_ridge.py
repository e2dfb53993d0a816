"""The classifier's ridge term chosen on the validation images: against an eigendecomposition written here, on
matrices in memory and on a store; the test images read once, for the chosen term only; the CLI's ``--ridge``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from gpytorch_cnngp import classify as cl
from gpytorch_cnngp import ridge
from gpytorch_cnngp.store import KernelStore

sys.path.insert(0, str(Path(__file__).parent))
from store_helpers import split_kernel, write_kernels  # noqa: E402

SIZES = {"n_train": 300, "n_val": 160, "n_test": 120}
GRID = [0.0, 1e-3, 3e-2, 0.3]


def _problem(seed: int = 3):
    """A kernel of random features around class centres, with a fifth of the training labels wrong (so that the
    ridge term changes the validation error). Values are float32-exact."""
    rng = np.random.default_rng(seed)
    total = sum(SIZES.values())
    labels_all = rng.integers(0, 10, total)
    centres = rng.standard_normal((10, 400))
    F = 0.5 * centres[labels_all] + rng.standard_normal((total, 400))
    K = (F @ F.T / 400).astype(np.float32)
    K = ((K + K.T) / 2).astype(np.float32)
    n, nv = SIZES["n_train"], SIZES["n_val"]
    labels = {"train": labels_all[:n].copy(), "val": labels_all[n : n + nv], "test": labels_all[n + nv :]}
    wrong = rng.random(n) < 0.2
    labels["train"][wrong] = rng.integers(0, 10, wrong.sum())
    return split_kernel(K, SIZES), labels


def _eig_predictions(kernels, labels, lam):
    """``argmax(K* (Kxx + lam s I)^-1 Y)`` by a float64 eigendecomposition (not the Cholesky the library uses)."""
    K = kernels["Kxx"].astype(np.float64)
    s = np.mean(np.diag(K))
    e, V = np.linalg.eigh(K)
    Y = -np.ones((K.shape[0], 10))
    Y[np.arange(K.shape[0]), labels["train"]] = 1
    A = V @ ((V.T @ Y) / (e + lam * s)[:, None])
    return {p: np.argmax(kernels[c].astype(np.float64) @ A, 1) for p, c in (("val", "Kvx"), ("test", "Ktx"))}


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    kernels, labels = _problem()
    path = tmp_path_factory.mktemp("ridge") / "k.h5"
    write_kernels(path, kernels, labels, SIZES, 128, classes=10)
    reference = {lam: _eig_predictions(kernels, labels, lam) for lam in GRID}
    val = {lam: float(np.mean(reference[lam]["val"] != labels["val"])) for lam in GRID}
    assert len(set(val.values())) > 1, "the problem must make the ridge term matter"
    return path, kernels, labels, reference, val


def test_the_grid_is_sorted_and_bad_terms_are_refused():
    assert ridge.check_ridges([1e-2, 0]) == [0.0, 1e-2]
    for bad, match in (([], "at least one"), ([float("nan")], "must lie in"), ([-1e-3], "must lie in")):
        with pytest.raises(ValueError, match=match):
            ridge.check_ridges(bad)
    with pytest.raises(ValueError, match="must lie in"):
        ridge.check_ridges([2.0])  # a ridge above the prior variance swamps the kernel
    with pytest.raises(ValueError, match="repeat"):
        ridge.check_ridges([1e-3, 1e-3])


def test_ties_go_to_the_smallest_term():
    results = [
        {"lambda": 0.0, "val_error": 0.2},
        {"lambda": 1e-3, "val_error": 0.1},
        {"lambda": 1e-2, "val_error": 0.1},
    ]
    assert ridge.best_ridge(results[::-1])["lambda"] == 1e-3
    with pytest.raises(ValueError):
        ridge.best_ridge([])


def test_validation_errors_in_memory_equal_the_eigendecomposition(problem):
    _, kernels, labels, _, val = problem
    out = ridge.validation_errors(kernels["Kxx"], labels["train"], kernels["Kvx"], labels["val"], GRID[::-1])
    assert [r["lambda"] for r in out] == GRID
    assert [r["val_error"] for r in out] == [val[lam] for lam in GRID]


@pytest.mark.parametrize("budget, mode", [("1GB", "memory"), ("300KB", "disk")])
def test_the_store_classifier_chooses_on_validation_and_predicts_test_from_that_term(
    problem, tmp_path, monkeypatch, budget, mode
):
    path, _, labels, reference, val = problem
    reads = []
    real = cl._stored_blocks

    def counting(store, where, part, rows, device):
        reads.append(part)
        yield from real(store, where, part, rows, device)

    monkeypatch.setattr(cl, "_stored_blocks", counting)
    notes = []
    out = ridge.classify_store_ridge(
        path, GRID, "cpu", memory_budget=budget, scratch_dir=tmp_path / "scratch", log=notes.append
    )
    chosen = min(GRID, key=lambda lam: (val[lam], lam))
    assert out["ridge"] == chosen and out["factor"] == mode
    assert [r["val_error"] for r in out["ridges"]] == [val[lam] for lam in GRID]
    assert out["val_error"] == val[chosen]
    assert np.array_equal(out["val_predictions"], reference[chosen]["val"])
    assert np.array_equal(out["test_predictions"], reference[chosen]["test"])
    assert out["test_error"] == pytest.approx(np.mean(reference[chosen]["test"] != labels["test"]))
    assert reads == ["val"] * len(GRID) + ["test"], "the test images are read once, after the choice"
    assert sum(n.startswith("ridge ") for n in notes) == len(GRID)
    with KernelStore.open(path) as store:
        scale = float(np.mean(np.diag(store.read("Kxx").astype(np.float64))))
    assert [r["jitter"] for r in out["ridges"]] == pytest.approx([lam * scale for lam in GRID], rel=1e-9)


def test_classify_store_predicts_only_the_parts_asked_and_predict_store_the_rest(problem):
    path, kernels, labels, reference, _ = problem
    out = cl.classify_store(path, "cpu", parts=("val",))
    assert "test_error" not in out and "test_predictions" not in out
    assert np.array_equal(out["val_predictions"], reference[0.0]["val"])
    pred, error = cl.predict_store(path, out["A"], "test")
    assert np.array_equal(pred, reference[0.0]["test"])
    assert error == pytest.approx(np.mean(pred != labels["test"]))
    with pytest.raises(ValueError, match="'val' and/or 'test'"):
        cl.classify_store(path, "cpu", parts=("train",))
    with pytest.raises(ValueError, match="rows"):
        cl.predict_store(path, out["A"][:-1], "test")
    with pytest.raises(TypeError, match="jitter"):
        ridge.classify_store_ridge(path, [0.0], jitter=1.0)


def test_the_cli_chooses_the_ridge_and_refuses_what_does_not_go_with_it(problem, tmp_path, capsys):
    from gpytorch_cnngp import cli

    path, _, _, _, val = problem
    row = tmp_path / "row.json"
    argv = ["classify", str(path), "--ridge", *(f"{v:g}" for v in GRID), "--json", str(row), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    chosen = min(GRID, key=lambda lam: (val[lam], lam))
    assert f"ridge {chosen:g} chosen on the validation images" in out
    saved = json.loads(row.read_text())
    assert saved["ridge"] == chosen and [r["lambda"] for r in saved["ridges"]] == GRID
    for extra, message in (
        (["--jitter", "1e-3"], "--jitter and --ridge"),
        (["--variances"], "--variances"),
        (["--ridge", "0", "0"], "repeat"),
    ):
        assert cli.main(["classify", str(path), "--ridge", "0", *extra, "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):
        cli.main(["classify", str(path), "--ridge", "-1"])
    assert "from 0 to 1" in capsys.readouterr().err


def test_the_table_row_and_its_markdown_name_the_ridge():
    from gpytorch_cnngp.cli.render import _markdown

    row = {
        "config": "pooled_cnn_gp",
        "dataset": "mnist",
        "split": "mnist_as_tf",
        "n_train": 5,
        "n_val": 5,
        "n_test": 5,
        "val_error": 0.2,
        "test_error": 0.4,
        "kernel_seconds": 1.0,
        "solve_seconds": 1.0,
        "device": "cpu",
        "ridge": 1e-3,
        "ridges": [{"lambda": 0.0}, {"lambda": 1e-3}],
    }
    text = _markdown([row, {**row, "config": "convnet_gp", "ridge": None, "ridges": []}])
    assert "| ridge 0.001 (of 0, 0.001) |" in text and "| as published |" in text
