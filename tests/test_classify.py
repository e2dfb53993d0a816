"""The classifier: float64 Cholesky solve against a direct solve, jitter retries, error rates, variances."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from gpytorch_cnngp import classify as cl
from gpytorch_cnngp import distributed as dist
from gpytorch_cnngp.store import KernelStore, StoreError, StoreIncomplete

sys.path.insert(0, str(Path(__file__).parent))
from store_helpers import tiny_problem  # noqa: E402


def _spd(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, n + 5))
    return scale * (F @ F.T / n)


def test_one_hot_targets():
    Y = cl.one_hot_targets(np.array([2, 0, 9]))
    assert Y.dtype == torch.float64 and Y.shape == (3, 10)
    expected = -np.ones((3, 10))
    expected[0, 2] = expected[1, 0] = expected[2, 9] = 1
    assert np.array_equal(Y.numpy(), expected)
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        cl.one_hot_targets(np.array([10]))


def test_solve_matches_a_direct_float64_solve():
    K = _spd(40, scale=1e12).astype(np.float32)  # float32 kernels of the ConvNet GP's magnitude
    y = np.random.default_rng(1).integers(0, 10, 40)
    Y = cl.one_hot_targets(y).numpy()
    A, jitter = cl.solve_kernel(K, Y)
    assert jitter == 0.0 and A.dtype == torch.float64
    direct = scipy.linalg.solve(K.astype(np.float64), Y, assume_a="pos")
    np.testing.assert_allclose(A.numpy(), direct, rtol=1e-7, atol=1e-7 * np.abs(direct).max())
    a, _ = cl.solve_kernel(torch.from_numpy(K), Y[:, 3])
    np.testing.assert_allclose(a.numpy(), direct[:, 3], rtol=1e-7, atol=1e-7 * np.abs(direct).max())


def test_jitter_retry_on_a_singular_matrix_is_reported():
    rng = np.random.default_rng(0)
    F = rng.standard_normal((30, 5))
    K = torch.from_numpy(F @ F.T)  # rank 5: the plain factorisation fails
    assert int(torch.linalg.cholesky_ex(K).info) > 0
    before = K.clone()
    L, jitter = cl.cholesky_with_jitter(K)
    mean_diag = float(K.diagonal().mean())
    relative = jitter / mean_diag
    assert jitter > 0 and np.isclose(np.log10(relative), np.round(np.log10(relative)))
    assert 1e-10 <= relative <= 1e-3
    assert torch.equal(K, before), "the caller's matrix must not be modified"
    np.testing.assert_allclose((L @ L.T).numpy(), (K + jitter * torch.eye(30)).numpy(), atol=1e-9 * mean_diag)
    A, used = cl.solve_kernel(K, np.ones((30, 2)))
    assert used == jitter
    # ill-conditioned (about 1/jitter): compare residuals, not solutions
    residual = (K.numpy() + jitter * np.eye(30)) @ A.numpy() - np.ones((30, 2))
    assert np.abs(residual).max() < 1e-4
    with pytest.raises(cl.CholeskyFailed, match="failed even with a jitter of 0"):
        cl.cholesky_with_jitter(K, max_tries=0)
    _, explicit = cl.cholesky_with_jitter(K, jitter=0.5 * mean_diag)
    assert explicit == 0.5 * mean_diag


def test_predict_error_rate_and_variances():
    K = _spd(25, seed=3)
    Kxx, Ksx, Kss = K[:20, :20], K[20:, :20], np.diag(K)[20:]
    y = np.arange(20) % 10
    A, _ = cl.solve_kernel(Kxx, cl.one_hot_targets(y))
    pred = cl.predict(Ksx, A, chunk_size=2)
    assert np.array_equal(pred.numpy(), np.argmax(Ksx @ np.linalg.solve(Kxx, cl.one_hot_targets(y).numpy()), 1))
    assert cl.error_rate(pred, pred) == 0.0
    assert cl.error_rate(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 0.5
    assert np.isnan(cl.error_rate(np.array([]), np.array([])))
    L, _ = cl.cholesky_with_jitter(Kxx)
    var = cl.predictive_variances(L, Ksx, Kss, chunk_size=2).numpy()
    direct = Kss - np.einsum("ij,ji->i", Ksx, np.linalg.solve(Kxx, Ksx.T))
    np.testing.assert_allclose(var, direct, rtol=1e-8, atol=1e-10)
    # the training points themselves have zero posterior variance
    np.testing.assert_allclose(cl.predictive_variances(L, Kxx[:3], np.diag(Kxx)[:3]).numpy(), 0, atol=1e-9)


def test_classify_store_against_numpy(tmp_path):
    spec, meta, labels, images = tiny_problem(seed=4, sizes={"n_train": 14, "n_val": 5, "n_test": 6})
    path = tmp_path / "k.h5"
    with KernelStore.create(path, meta, labels, 8) as store:
        with pytest.raises(StoreIncomplete):
            cl.classify_store(path)
        dist.compute_store(store, spec, images, progress=False)
        K = {n: store.read(n).astype(np.float64) for n in ("Kxx", "Kvx", "Ktx", "Kvv_diag", "Ktt_diag")}
    out = cl.classify_store(path, "cpu", variances=True)
    Y = -np.ones((14, 10))
    Y[np.arange(14), labels["train"]] = 1
    A = scipy.linalg.solve(K["Kxx"], Y, assume_a="pos")
    for part, cross, diag in (("val", "Kvx", "Kvv_diag"), ("test", "Ktx", "Ktt_diag")):
        pred = np.argmax(K[cross] @ A, 1)
        assert np.array_equal(out[f"{part}_predictions"], pred)
        assert out[f"{part}_error"] == pytest.approx(np.mean(pred != labels[part]))
        var = K[diag] - np.einsum("ij,ji->i", K[cross], np.linalg.solve(K["Kxx"], K[cross].T))
        np.testing.assert_allclose(out[f"{part}_variances"], var, rtol=1e-6, atol=1e-6 * K[diag].max())
    assert out["jitter"] == 0.0 and out["device"] == "cpu"
    assert (out["config"], out["split"], out["n_train"], out["n_val"], out["n_test"]) == (
        "convnet_gp",
        "tiny",
        14,
        5,
        6,
    )
    assert set(out["seconds"]) == {"load", "solve", "predict"}


# --------------------------------------------------------------------------------------------------------------
# the classifier within a memory budget (blocked factorisation, panels in memory or on disk)

BOUNDED_SIZES = {"n_train": 2100, "n_val": 300, "n_test": 257}  # n_train not a multiple of any panel width


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    from store_helpers import write_synthetic_store

    path = tmp_path_factory.mktemp("bounded") / "k.h5"
    kernels, labels = write_synthetic_store(path, BOUNDED_SIZES, tile=512, seed=7, scale=1e12)
    return path, kernels, labels


def _dense_reference(kernels, labels):
    """A float64 LAPACK solve of the stored float32 kernel, and its predictions (written independently)."""
    K = kernels["Kxx"].astype(np.float64)
    Y = -np.ones((K.shape[0], 10))
    Y[np.arange(K.shape[0]), labels["train"]] = 1
    A = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K, lower=True), Y)
    return A, {p: np.argmax(kernels[c].astype(np.float64) @ A, 1) for p, c in (("val", "Kvx"), ("test", "Ktx"))}


@pytest.mark.parametrize("budget, mode", [("1GB", "memory"), ("12MB", "disk")])
def test_bounded_classifier_equals_the_dense_solve(synthetic_store, tmp_path, budget, mode):
    path, kernels, labels = synthetic_store
    A, preds = _dense_reference(kernels, labels)
    out = cl.classify_store(path, "cpu", memory_budget=budget, scratch_dir=tmp_path / "scratch")
    assert out["factor"] == mode and out["jitter"] == 0.0 and out["jitters_tried"] == [0.0]
    assert np.abs(out["A"] - A).max() <= 1e-8 * np.abs(A).max()
    for part in ("val", "test"):
        assert np.array_equal(out[f"{part}_predictions"], preds[part])
        assert out[f"{part}_error"] == pytest.approx(np.mean(preds[part] != labels[part]))
    assert not (tmp_path / "scratch").exists(), "the factor's scratch folder is removed after the solve"


def test_bounded_variances_equal_the_dense_ones(synthetic_store, tmp_path):
    path, kernels, _ = synthetic_store
    out = cl.classify_store(path, "cpu", memory_budget="16MB", scratch_dir=tmp_path / "s", variances=True)
    assert out["factor"] == "disk"
    K = kernels["Kxx"].astype(np.float64)
    L = np.linalg.cholesky(K)
    for part, cross, diag in (("val", "Kvx", "Kvv_diag"), ("test", "Ktx", "Ktt_diag")):
        V = scipy.linalg.solve_triangular(L, kernels[cross].astype(np.float64).T, lower=True)
        expected = kernels[diag].astype(np.float64) - (V * V).sum(0)
        np.testing.assert_allclose(out[f"{part}_variances"], expected, rtol=1e-6, atol=1e-6 * kernels[diag].max())


def test_bounded_jitter_retries_and_failure(tmp_path):
    from store_helpers import write_synthetic_store

    sizes = {"n_train": 700, "n_val": 20, "n_test": 20}
    path = tmp_path / "singular.h5"
    kernels, _ = write_synthetic_store(path, sizes, tile=256, seed=2, rank=60)  # Kxx of rank 60
    notes: list[str] = []
    out = cl.classify_store(path, "cpu", memory_budget="2MB", scratch_dir=tmp_path / "s", log=notes.append)
    dense_L, dense_jitter = cl.cholesky_with_jitter(kernels["Kxx"])
    assert out["factor"] == "disk" and out["jitter"] == dense_jitter > 0
    assert out["jitters_tried"][0] == 0.0 and out["jitters_tried"][-1] == dense_jitter
    assert any("not positive definite" in n for n in notes)
    with pytest.raises(cl.CholeskyFailed, match=r"jitters tried: 0, .*not positive definite"):
        cl.classify_store(path, "cpu", memory_budget="2MB", scratch_dir=tmp_path / "s", max_tries=1)
    with pytest.raises(cl.CholeskyFailed, match="jitters tried: 0\\. "):
        cl.classify_store(path, "cpu", memory_budget="1GB", max_tries=0)


_KILL_SCRIPT = """
import sys, time
from gpytorch_cnngp import classify, store
read = store.KernelStore.read_into
def slow(self, *a, **k):  # slow the factorisation down so that the kill lands in the middle of it
    time.sleep(0.02)
    return read(self, *a, **k)
store.KernelStore.read_into = slow
classify.classify_store(sys.argv[1], "cpu", memory_budget="12MB", scratch_dir=sys.argv[2])
print("finished")
"""


def test_kill_during_the_solve_leaves_the_store_intact_and_the_next_run_resumes(synthetic_store, tmp_path):
    import json
    import os
    import shutil
    import signal
    import subprocess
    import time

    from store_helpers import assert_same_store

    path, kernels, labels = synthetic_store
    copy = tmp_path / "copy.h5"
    shutil.copy(path, copy)
    scratch = tmp_path / "scratch"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(path), str(scratch)], stdout=subprocess.PIPE)
    progress = scratch / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(progress.read_text())["done"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the solve finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert b"finished" not in proc.stdout.read()
    assert_same_store(path, copy)  # the store is only ever read
    done = json.loads(progress.read_text())["done"]
    notes: list[str] = []
    out = cl.classify_store(path, "cpu", memory_budget="12MB", scratch_dir=scratch, log=notes.append)
    assert any(f"{done} of" in n and "resuming" in n for n in notes)
    A, preds = _dense_reference(kernels, labels)
    assert np.abs(out["A"] - A).max() <= 1e-8 * np.abs(A).max()
    assert np.array_equal(out["test_predictions"], preds["test"])


_RSS_SCRIPT = """
import json, sys
def status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
import numpy, torch, h5py
from gpytorch_cnngp import cli
base = status("VmRSS")
code = cli.main(["classify", sys.argv[1], "--memory-budget", sys.argv[2], "--no-progress", "--json", sys.argv[3]])
print(json.dumps({"code": code, "extra": status("VmHWM") - base}))
"""


def test_peak_memory_stays_within_the_budget(tmp_path):
    """The issue's check in CI size: peak RSS above the imports <= budget + a small fixed overhead (20 MB)."""
    import json
    import subprocess

    from store_helpers import write_synthetic_store

    sizes = {"n_train": 3000, "n_val": 200, "n_test": 200}
    path = tmp_path / "k.h5"
    kernels, labels = write_synthetic_store(path, sizes, tile=1024, seed=11)
    budget = 40 * 10**6  # the float64 matrix alone would be 72 MB
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), str(budget), str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert measured["code"] == 0
    assert measured["extra"] <= budget + 20 * 10**6, f"peak {measured['extra'] / 1e6:.0f} MB above the imports"
    row = json.loads(out.read_text())
    assert row["factor"] == "disk"
    _, preds = _dense_reference(kernels, labels)
    assert row["test_predictions"] == preds["test"].tolist()


@pytest.mark.parametrize("name", ["Kxx", "Ktx"])
def test_non_finite_stored_values_are_refused(tmp_path, name):
    import h5py
    from store_helpers import write_synthetic_store

    path = tmp_path / "k.h5"
    write_synthetic_store(path, {"n_train": 300, "n_val": 20, "n_test": 30}, tile=128, seed=3)
    with h5py.File(path, "r+") as f:
        f[name][7, 5] = np.nan  # a damaged value, the completion records untouched
    # the check of every tile before the solve names the tile ...
    with pytest.raises(StoreError, match=rf"(?s)damaged: 1 committed tile.*{name}\[0:(128|30), 0:128\].*NaN"):
        cl.classify_store(path, "cpu", memory_budget="1MB", scratch_dir=tmp_path / "s")
    # ... and without it, the reads themselves refuse NaN
    with pytest.raises(ValueError, match="NaN or infinite values"):
        cl.classify_store(path, "cpu", memory_budget="1MB", scratch_dir=tmp_path / "s", verify=False)


def test_the_dense_path_used_on_gpus_runs_on_the_cpu_too(synthetic_store):
    """The GPU's dense factorisation (method="dense"), exercised on the CPU against the blocked one."""
    path, kernels, labels = synthetic_store
    dense = cl.classify_store(path, "cpu", method="dense", memory_budget="64MB", variances=True)
    blocked = cl.classify_store(path, "cpu", method="blocked", memory_budget="1GB", variances=True)
    assert dense["factor"] == "dense" and blocked["factor"] == "memory"
    assert np.abs(dense["A"] - blocked["A"]).max() <= 1e-8 * np.abs(blocked["A"]).max()
    for part in ("val", "test"):
        assert np.array_equal(dense[f"{part}_predictions"], blocked[f"{part}_predictions"])
        np.testing.assert_allclose(dense[f"{part}_variances"], blocked[f"{part}_variances"], rtol=1e-6, atol=1e-3)
    with pytest.raises(ValueError, match="method must be"):
        cl.classify_store(path, "cpu", method="fast")


# --------------------------------------------------------------------------------------------------------------
# the factor's panels on disk are checked before a resume, the dual coefficients before they are returned

SMALL_SIZES = {"n_train": 600, "n_val": 30, "n_test": 40}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from store_helpers import write_synthetic_store

    path = tmp_path_factory.mktemp("small") / "k.h5"
    kernels, labels = write_synthetic_store(path, SMALL_SIZES, tile=256, seed=5, scale=1e12)
    return path, kernels, labels


def test_a_panel_damaged_between_a_kill_and_the_resume_is_computed_again(small_store, tmp_path, monkeypatch):
    # was: the resume used the damaged panel: NaN or 10% wrong dual coefficients, 90% errors, exit code 0
    import json

    path, kernels, labels = small_store
    scratch = tmp_path / "scratch"
    real = KernelStore.read_into

    def killed_after_two_panels(self, *args, **kwargs):
        progress = scratch / "progress.json"
        if progress.exists() and json.loads(progress.read_text())["done"] >= 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(KernelStore, "read_into", killed_after_two_panels)
    with pytest.raises(KeyboardInterrupt):
        cl.classify_store(path, "cpu", memory_budget="2MB", scratch_dir=scratch)
    monkeypatch.undo()
    with open(scratch / "factor.f64", "r+b") as fh:  # the first panel, damaged on disk before the resume
        fh.seek(4096)
        fh.write(np.random.default_rng(0).bytes(64))
    notes: list[str] = []
    out = cl.classify_store(path, "cpu", memory_budget="2MB", scratch_dir=scratch, log=notes.append)
    assert out["factor"] == "disk"
    assert any("panel 1 of" in n and "no longer matches its checksum" in n for n in notes), notes
    A, preds = _dense_reference(kernels, labels)
    assert np.abs(out["A"] - A).max() <= 1e-8 * np.abs(A).max()
    for part in ("val", "test"):
        assert np.array_equal(out[f"{part}_predictions"], preds[part])


def _wrong_disk_reads(monkeypatch):
    """While the coefficients are solved, reads of the factor's second panel from disk come back 10% off (a disk
    returning other bytes than were written)."""
    from gpytorch_cnngp import blocked_cholesky as bc

    read, solve, solving = bc._DiskPanels.read, bc.BlockedCholesky.solve, []

    def wrong_read(self, j, col0, col1, out=None):
        values = read(self, j, col0, col1, out)
        if solving and j == 1:
            values *= 1.1
        return values

    def solve_on_that_disk(self, Y):
        solving.append(1)
        try:
            return solve(self, Y)
        finally:
            solving.clear()

    monkeypatch.setattr(bc._DiskPanels, "read", wrong_read)
    monkeypatch.setattr(bc.BlockedCholesky, "solve", solve_on_that_disk)


def _nan_solve(monkeypatch):
    from gpytorch_cnngp.blocked_cholesky import BlockedCholesky

    real = BlockedCholesky.solve

    def solve(self, Y):
        A = real(self, Y)
        A[3, 2] = float("nan")
        return A

    monkeypatch.setattr(BlockedCholesky, "solve", solve)


def _wrong_dense_solve(monkeypatch):
    real = torch.cholesky_solve
    monkeypatch.setattr(torch, "cholesky_solve", lambda B, L: real(B, L) * 1.1)


@pytest.mark.parametrize(
    "fault, method, budget",
    [(_wrong_disk_reads, "blocked", "2MB"), (_nan_solve, "blocked", "1GB"), (_wrong_dense_solve, "dense", "1GB")],
    ids=["disk-panel", "memory-nan", "dense"],
)
def test_dual_coefficients_that_do_not_solve_the_system_are_refused(
    small_store, tmp_path, monkeypatch, fault, method, budget
):
    path, kernels, labels = small_store
    clean = cl.classify_store(path, "cpu", method=method, memory_budget=budget, scratch_dir=tmp_path / "s")
    # a sound solve: the residual is at float64's rounding, far below the limit (float32's rounding)
    assert clean["residual"] <= 1e-12 and cl.RESIDUAL_TOLERANCE < np.finfo(np.float32).eps
    A = clean["A"].astype(np.float64)
    K = kernels["Kxx"].astype(np.float64)
    Y = cl.one_hot_targets(labels["train"]).numpy()
    independent = np.max(np.linalg.norm(K @ A - Y, axis=0) / (np.linalg.norm(K) * np.linalg.norm(A, axis=0) + 1))
    assert clean["residual"] == pytest.approx(independent, rel=0.5, abs=1e-16)
    fault(monkeypatch)
    with pytest.raises(cl.InaccurateSolve, match=r"the dual coefficients (hold NaN|leave a relative residual of)"):
        cl.classify_store(path, "cpu", method=method, memory_budget=budget, scratch_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists(), "a factor that gave wrong coefficients is not kept for a resume"


def test_the_cli_writes_no_dual_coefficients_that_fail_their_check(small_store, tmp_path, monkeypatch, capsys):
    from gpytorch_cnngp import cli

    path, _, _ = small_store
    _wrong_disk_reads(monkeypatch)
    dual, row = tmp_path / "dual.npz", tmp_path / "row.json"
    argv = ["classify", str(path), "--memory-budget", "2MB", "--dual", str(dual), "--json", str(row), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "relative residual" in err and "nothing was written" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not dual.exists() and not row.exists()
