"""The budget-bounded Cholesky: equal to a dense float64 factorisation, in memory and on disk, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from gpytorch_cnngp.blocked_cholesky import BlockedCholesky, BudgetTooSmall, NotPositiveDefinite, plan_panel_width
from gpytorch_cnngp.memory import format_bytes, parse_bytes


def _spd(n: int, seed: int = 0, rank: int | None = None, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, rank or n + 10)) + 0.3
    K = (scale * F @ F.T / F.shape[1]).astype(np.float32)
    return np.triu(K) + np.triu(K, 1).T  # exactly symmetric float32, as stores are


def _reader(K: np.ndarray, calls: list | None = None):
    def read(r0: int, r1: int, c0: int, out: np.ndarray) -> None:
        if calls is not None:
            calls.append((r0, r1, c0, out.shape[1]))
        out[...] = K[r0:r1, c0 : c0 + out.shape[1]]

    return read


@pytest.mark.parametrize(
    "budget, on_disk",
    [(64 * 10**6, False), (2 * 10**6, True), (600 * 10**3, True)],
    ids=["in-memory", "disk", "disk-narrow"],
)
def test_solve_equals_a_dense_float64_solve(tmp_path, budget, on_disk):
    n = 1037  # not a multiple of any panel width chosen here
    K = _spd(n, scale=1e12)  # the ConvNet GP's magnitude
    Y = np.random.default_rng(1).standard_normal((n, 10))
    with BlockedCholesky.factor(_reader(K), n, memory_budget=budget, scratch_dir=tmp_path / "f") as fac:
        assert fac.report.on_disk is on_disk and n % fac.b != 0
        A = fac.solve(Y).numpy()
        # independent reference: LAPACK through SciPy on the float64 matrix
        direct = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K.astype(np.float64), lower=True), Y)
        assert np.abs(A - direct).max() <= 1e-8 * np.abs(direct).max()
        # the triangular halves on their own
        L = np.linalg.cholesky(K.astype(np.float64))
        np.testing.assert_allclose(fac.forward(Y).numpy(), scipy.linalg.solve_triangular(L, Y, lower=True), rtol=1e-8)
        v = fac.backward(Y[:, 0]).numpy()
        assert v.shape == (n,)
        np.testing.assert_allclose(v, scipy.linalg.solve_triangular(L.T, Y[:, 0], lower=False), rtol=1e-7)
    assert not (tmp_path / "f").exists(), "the scratch folder is deleted when the factor is closed"


def test_reads_only_the_block_upper_triangle_and_stays_within_the_budget(tmp_path):
    n = 900
    K = _spd(n, seed=2)
    budget = 10**6
    b, in_memory = plan_panel_width(n, budget)
    assert not in_memory
    # below the diagonal, outside the diagonal blocks of panel width, the matrix must never be used
    poisoned = K.copy()
    rows, cols = np.indices((n, n))
    poisoned[rows // b > cols // b] = np.nan
    calls: list = []
    with BlockedCholesky.factor(_reader(poisoned, calls), n, memory_budget=budget, scratch_dir=tmp_path) as f:
        A = f.solve(np.eye(n)[:, :3])
    assert all(c0 >= r0 for r0, _, c0, _ in calls)
    np.testing.assert_allclose(A.numpy(), np.linalg.inv(K.astype(np.float64))[:, :3], rtol=1e-6, atol=1e-9)
    # the largest buffer read at once (float32 rows) is a small part of the budget
    assert max((r1 - r0) * w * 4 for r0, r1, _, w in calls) <= budget / 4


def test_jitter_retries_match_the_dense_policy(tmp_path):
    n = 400
    K = _spd(n, seed=3, rank=40)  # rank 40: singular, the plain factorisation fails
    assert int(torch.linalg.cholesky_ex(torch.from_numpy(K.astype(np.float64))).info) > 0
    scale = float(np.mean(np.diag(K.astype(np.float64))))
    candidates = [0.0] + [scale * 10.0 ** (k - 11) for k in range(1, 9)]
    notes: list[str] = []
    with BlockedCholesky.factor(
        _reader(K), n, jitter_candidates=candidates, memory_budget=500_000, scratch_dir=tmp_path, log=notes.append
    ) as fac:
        used = fac.jitter
        assert used > 0 and fac.report.attempts == candidates[: candidates.index(used) + 1]
        assert any("not positive definite" in t for t in notes)
        # the dense factorisation succeeds with the same jitter and not with the one before
        K64 = K.astype(np.float64)
        prev = candidates[candidates.index(used) - 1]
        assert int(torch.linalg.cholesky_ex(torch.from_numpy(K64 + used * np.eye(n))).info) == 0
        assert int(torch.linalg.cholesky_ex(torch.from_numpy(K64 + prev * np.eye(n))).info) > 0
        Y = np.ones((n, 2))
        np.testing.assert_allclose(
            fac.solve(Y).numpy(), np.linalg.solve(K64 + used * np.eye(n), Y), rtol=1e-6, atol=1e-6 * used
        )


def test_a_matrix_that_is_not_positive_definite_is_refused(tmp_path):
    n = 300
    K = _spd(n, seed=4)
    K[5, 5] = -1.0  # a negative variance
    with pytest.raises(NotPositiveDefinite) as info:
        BlockedCholesky.factor(
            _reader(K), n, jitter_candidates=[0.0, 1e-3], memory_budget=5 * 10**5, scratch_dir=tmp_path
        )
    assert info.value.jitter == 1e-3
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "a failed factorisation leaves no scratch files"
    K[5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values"):
        BlockedCholesky.factor(_reader(K), n, memory_budget=10**8)


def test_an_interrupted_factorisation_resumes_from_its_finished_panels(tmp_path):
    n = 800
    K = _spd(n, seed=5)
    read = _reader(K)
    budget = 600_000
    b, _ = plan_panel_width(n, budget)
    assert n // b >= 4
    stop_after = 3 * b  # rows read before the "crash"

    def crashing(r0, r1, c0, out):
        if r0 >= stop_after:
            raise KeyboardInterrupt
        read(r0, r1, c0, out)

    key = {"store": "k.h5", "size": 1}
    with pytest.raises(KeyboardInterrupt):
        BlockedCholesky.factor(crashing, n, memory_budget=budget, scratch_dir=tmp_path, source_key=key)
    record = json.loads((tmp_path / "progress.json").read_text())
    assert record["done"] == 3
    calls: list = []
    notes: list[str] = []
    with BlockedCholesky.factor(
        _reader(K, calls), n, memory_budget=budget, scratch_dir=tmp_path, source_key=key, log=notes.append
    ) as fac:
        assert fac.report.resumed_panels == 3 and any("resuming" in t for t in notes)
        assert min(r0 for r0, *_ in calls) == 3 * b, "finished panels are not recomputed"
        direct = np.linalg.solve(K.astype(np.float64), np.ones(n))
        np.testing.assert_allclose(fac.solve(np.ones(n)).numpy(), direct, rtol=1e-8)
    # a later run with a larger budget keeps the finished panels' width and resumes
    with pytest.raises(KeyboardInterrupt):
        BlockedCholesky.factor(crashing, n, memory_budget=budget, scratch_dir=tmp_path, source_key=key)
    with BlockedCholesky.factor(read, n, memory_budget=2 * budget, scratch_dir=tmp_path, source_key=key) as fac:
        assert fac.report.on_disk and fac.b == b and fac.report.resumed_panels == 3
    # a different matrix (another key) starts again
    with pytest.raises(KeyboardInterrupt):
        BlockedCholesky.factor(crashing, n, memory_budget=budget, scratch_dir=tmp_path, source_key=key)
    with BlockedCholesky.factor(read, n, memory_budget=budget, scratch_dir=tmp_path, source_key={"other": 1}) as fac:
        assert fac.report.resumed_panels == 0


def test_budget_errors_are_clear(tmp_path):
    with pytest.raises(BudgetTooSmall, match="too small"):
        plan_panel_width(50_000, 10**6)
    with pytest.raises(BudgetTooSmall, match="needs .* in memory"):
        plan_panel_width(5000, 10**6, in_memory=True)
    K = _spd(500)
    with pytest.raises(BudgetTooSmall, match="no scratch folder"):
        BlockedCholesky.factor(_reader(K), 500, memory_budget=10**6)


def test_empty_matrix():
    with BlockedCholesky.factor(_reader(np.zeros((0, 0), np.float32)), 0) as fac:
        assert fac.solve(np.zeros((0, 3))).shape == (0, 3)


@pytest.mark.parametrize(
    "text, value",
    [
        ("128MB", 128 * 10**6),
        ("2GB", 2 * 10**9),
        ("4GiB", 4 * 2**30),
        ("512 kib", 512 * 1024),
        ("1e9", 10**9),
        ("100B", 100),
        (2048, 2048),
        ("1.5GB", 1_500_000_000),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["nan", "-1GB", "0", "2 parsecs", "", "GB", "inf", float("nan")])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_format_bytes():
    assert format_bytes(128 * 10**6) == "128 MB" and format_bytes(1.5e9) == "1.5 GB" and format_bytes(12) == "12 B"


def test_a_damaged_panel_on_disk_is_found_and_computed_again_when_resuming(tmp_path):
    # was: a finished panel changed on disk between a kill and the resume was used as it was: a wrong factor
    n = 800
    K = _spd(n, seed=6)
    budget = 600_000
    b, _ = plan_panel_width(n, budget)

    def crashing(r0, r1, c0, out):
        if r0 >= 3 * b:
            raise KeyboardInterrupt
        out[...] = K[r0:r1, c0 : c0 + out.shape[1]]

    key = {"store": "k.h5"}
    with pytest.raises(KeyboardInterrupt):
        BlockedCholesky.factor(crashing, n, memory_budget=budget, scratch_dir=tmp_path, source_key=key)
    assert json.loads((tmp_path / "progress.json").read_text())["done"] == 3
    with open(tmp_path / "factor.f64", "r+b") as fh:  # a few bytes inside the second panel (panel 0 is [b, n])
        fh.seek(b * n * 8 + 1000)
        fh.write(np.random.default_rng(0).bytes(16))
    notes: list[str] = []
    with BlockedCholesky.factor(
        _reader(K), n, memory_budget=budget, scratch_dir=tmp_path, source_key=key, log=notes.append
    ) as fac:
        assert fac.report.resumed_panels == 1, "the panels from the damaged one on are computed again"
        assert any("panel 2 of" in t and "no longer matches its checksum" in t for t in notes), notes
        direct = np.linalg.solve(K.astype(np.float64), np.ones(n))
        np.testing.assert_allclose(fac.solve(np.ones(n)).numpy(), direct, rtol=1e-8)
    # a record of finished panels without their checksums (or cut short) is not trusted: it starts again
    with pytest.raises(KeyboardInterrupt):
        BlockedCholesky.factor(crashing, n, memory_budget=budget, scratch_dir=tmp_path, source_key=key)
    record = json.loads((tmp_path / "progress.json").read_text())
    (tmp_path / "progress.json").write_text(json.dumps({"key": record["key"], "done": record["done"]}))
    with BlockedCholesky.factor(_reader(K), n, memory_budget=budget, scratch_dir=tmp_path, source_key=key) as fac:
        assert fac.report.resumed_panels == 0
