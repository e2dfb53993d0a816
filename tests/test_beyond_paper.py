"""``experiments/beyond_paper.py``, the candidate search, on tiny subsets of real MNIST digits offline.

The candidates are small versions of the listed networks (one 3x3 convolution at MNIST's 28x28): the ConvNet GP's
NNGP and NTK, and the pooled ConvNet built in the experiment. The ridge term's choice is checked against NumPy's
dense solve on the stored kernels, and the test images are never asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from mnist_files import disable_sources, write_mnist

from gpytorch_cnngp import distributed as dist
from gpytorch_cnngp.cli import commands
from gpytorch_cnngp.store import KernelStore

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "beyond_paper.py"
TRAIN_60 = Path(__file__).parent / "data" / "mnist_train_60.npz"
N_TRAIN, N_VAL = 40, 20


def load_script():
    spec = importlib.util.spec_from_file_location("beyond_paper_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def digits():
    """The first 60 training images of the mnist_as_tf split: 40 to train on, 20 placed where validation starts."""
    with np.load(TRAIN_60) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def data_dir(tmp_path, monkeypatch, digits):
    """MNIST-shaped IDX files, real digits where the tiny split looks, patched MD5s and no network."""
    disable_sources(monkeypatch)
    x, y = digits["images"], digits["labels"]
    train_x, train_y = np.zeros((60000, 28, 28), np.uint8), np.zeros(60000, np.uint8)
    train_x[5000 : 5000 + N_TRAIN], train_y[5000 : 5000 + N_TRAIN] = x[:N_TRAIN], y[:N_TRAIN]
    train_x[55000 : 55000 + N_VAL], train_y[55000 : 55000 + N_VAL] = x[N_TRAIN:60], y[N_TRAIN:60]
    test_x, test_y = np.full((4, 28, 28), 255, np.uint8), np.zeros(4, np.uint8)
    return write_mnist(tmp_path / "data", monkeypatch, train_x, train_y, test_x, test_y)


@pytest.fixture
def script(monkeypatch):
    """The script with tiny candidates in its registry, and a load of the split that refuses any test image."""
    module = load_script()
    registry = importlib.import_module("beyond_paper_search.candidates")
    tiny = {"depth": 1, "kernel_size": 3}
    for c in (
        registry.Candidate("tiny", "convnet_gp", params=tiny, description="one 3x3 conv"),
        registry.Candidate("tiny_ntk", "convnet_gp", "ntk", params=tiny, description="its NTK"),
        registry.Candidate("tiny_pool", "convnet_gp_pool", params={**tiny, "pool": 2}, description="pooled"),
        registry.Candidate("not_yet", "an_architecture_to_come", params={"depth": 5}, description="missing"),
    ):
        monkeypatch.setitem(registry.CANDIDATES, c.name, c)
    real = commands.load_split

    def no_test_images(*args, **kwargs):
        if kwargs.get("n_test") != 0:
            raise AssertionError(f"the search asked for test images (n_test={kwargs.get('n_test')!r})")
        return real(*args, **kwargs)

    monkeypatch.setattr(commands, "load_split", no_test_images)
    return module


def _argv(tmp_path, data_dir, *candidates, extra=()):
    return [
        "--candidates",
        *candidates,
        "--n-train",
        str(N_TRAIN),
        "--n-val",
        str(N_VAL),
        "--workdir",
        str(tmp_path / "work"),
        "--store-dir",
        str(tmp_path / "stores"),
        "--data-dir",
        str(data_dir),
        "--tile-size",
        "16",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--solve-device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _numpy_errors(Kxx: np.ndarray, Kvx: np.ndarray, y_train, y_val, jitters) -> list[float]:
    """Validation errors of ``argmax(Kvx (Kxx + j I)^-1 Y)`` by NumPy's dense solve, one per absolute jitter."""
    Y = -np.ones((len(y_train), 10))
    Y[np.arange(len(y_train)), y_train] = 1.0
    out = []
    for j in jitters:
        A = np.linalg.solve(Kxx + j * np.eye(len(Kxx)), Y)
        out.append(float(np.mean((Kvx @ A).argmax(1) != y_val)))
    return out


def test_search_end_to_end_offline(script, data_dir, tmp_path, digits, capsys):
    names = ("tiny", "tiny_ntk", "tiny_pool")
    assert script.main(_argv(tmp_path, data_dir, *names)) == 0
    work = tmp_path / "work"
    rows = {r["candidate"]: r for r in json.loads((work / "results.json").read_text())}
    assert set(rows) == set(names)
    y_train, y_val = digits["labels"][:N_TRAIN], digits["labels"][N_TRAIN:60]
    entries = N_TRAIN * (N_TRAIN + 1) // 2 + N_VAL * N_TRAIN + N_VAL
    for name, row in rows.items():
        assert (row["kernel"], row["n_train"], row["n_val"], row["split"]) == (
            "ntk" if name == "tiny_ntk" else "nngp",
            N_TRAIN,
            N_VAL,
            "mnist_as_tf",
        )
        with KernelStore.open(row["store"]) as store:
            assert store.meta.n_test == 0 and store.read("Ktx").shape == (0, N_TRAIN)
            assert store.meta.hyperparameters.get("get", "nngp") == row["kernel"]
            Kxx, Kvx = store.read("Kxx").astype(np.float64), store.read("Kvx").astype(np.float64)
            np.testing.assert_array_equal(store.labels("val"), y_val)
        # the ridge terms: NumPy's solve with lambda times the mean diagonal (and the jitter the solve reports it
        # needed at lambda 0, if any), the errors and the choice computed apart from the script
        scale = float(np.mean(np.diag(Kxx)))
        grid = [e["lambda"] for e in row["val_errors"]]
        assert grid == [0.0, 1e-4, 1e-3, 1e-2, 1e-1]
        jitters = [lam * scale if lam else e["jitter"] for lam, e in zip(grid, row["val_errors"], strict=True)]
        np.testing.assert_allclose([e["jitter"] for e in row["val_errors"]], jitters, rtol=1e-12)
        expected = _numpy_errors(Kxx, Kvx, y_train, y_val, jitters)
        assert [e["val_error"] for e in row["val_errors"]] == expected
        lowest = min(expected)
        assert row["best_val_error"] == lowest and row["lambda"] == grid[expected.index(lowest)]
        assert lowest < 0.6  # real digits: far better than chance with 40 training images
        assert row["kernel_entries"] == entries and row["kernel_seconds"] > 0
        assert math.isclose(row["seconds_per_entry"], row["kernel_seconds"] / entries, rel_tol=1e-12)
        assert math.isclose(row["projected_hours_50k"], row["seconds_per_entry"] * 2_250_045_000 / 3600, rel_tol=1e-12)
        assert row["backend"] in ("native", "eager") and row["machine"]["cores"] >= 1
    md = (work / "results.md").read_text().splitlines()
    shown = [line.split("|")[1].strip() for line in md[2:5]]
    ordered = sorted(rows.values(), key=lambda r: (r["best_val_error"], r["projected_hours_50k"]))
    assert shown == [r["candidate"] for r in ordered]  # sorted by validation error
    png = (work / "validation_vs_cost.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # a second run computes no kernel for a finished candidate, and loads no data for it
    def no_work(*args, **kwargs):
        raise AssertionError("kernel work for a finished candidate")

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist, "compute_block", no_work)
        mp.setattr(commands, "_load_data", no_work)
        assert script.main(_argv(tmp_path, data_dir, *names)) == 0
    out = capsys.readouterr().out
    assert out.count("finished before") == 3
    assert json.loads((work / "results.json").read_text()) == list(rows.values())

    # rows lost, stores kept: the complete stores are reused (no tile computed) and the rows come back the same
    (work / "results.json").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist, "compute_block", no_work)
        assert script.main(_argv(tmp_path, data_dir, "tiny")) == 0
    again = json.loads((work / "results.json").read_text())
    assert len(again) == 1 and again[0]["val_errors"] == rows["tiny"]["val_errors"]
    assert again[0]["kernel_seconds"] == rows["tiny"]["kernel_seconds"]  # the store's recorded compute time


def test_a_killed_search_keeps_finished_candidates(script, data_dir, tmp_path):
    """The second candidate fails mid-store: the first one's row is on disk, and the rerun finishes only the second."""
    calls = {"n": 0}
    real = dist.compute_block

    def dies_on_ntk(spec, *args, **kwargs):
        if spec.get == "ntk":
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist, "compute_block", dies_on_ntk)
        assert script.main(_argv(tmp_path, data_dir, "tiny", "tiny_ntk")) == 130
    rows = json.loads((tmp_path / "work" / "results.json").read_text())
    assert [r["candidate"] for r in rows] == ["tiny"]
    store = next((tmp_path / "stores").glob("tiny_ntk_*.h5"))
    with KernelStore.open(store) as s:
        done, total = s.entries()
    assert 0 < done < total  # the tiles committed before the kill are kept
    assert script.main(_argv(tmp_path, data_dir, "tiny", "tiny_ntk")) == 0
    rows = json.loads((tmp_path / "work" / "results.json").read_text())
    assert [r["candidate"] for r in rows] == ["tiny", "tiny_ntk"]


def test_bad_input_is_one_line(script, data_dir, tmp_path, capsys):
    cases = {
        ("nope",): "unknown candidate(s) nope",
        ("not_yet",): "needs the architecture 'an_architecture_to_come'",
        ("tiny", "tiny"): "names a candidate twice",
    }
    for names, message in cases.items():
        assert script.main(_argv(tmp_path, data_dir, *names)) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("beyond_paper: error:") and message in err and "\n" not in err
    for extra, message in (
        (["--lambdas", "0", "-0.5"], "--lambdas: ridge terms are relative to the mean diagonal of Kxx and must lie in"),
        (["--lambdas", "1e-3", "1e-3"], "--lambdas: ridge terms must not repeat"),
        (["--n-val", "10001"], "n_val=10001 is out of range"),
    ):
        assert script.main(_argv(tmp_path, data_dir, "tiny", extra=extra)) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())  # no work was done


def test_list_names_every_candidate_and_the_unavailable(script, capsys):
    assert script.main(["--list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert {"convnet_gp", "resnet32_gp_ntk", "convnet_gp_pool4", "myrtle5", "tiny", "not_yet"} <= set(lines)
    assert "unavailable: no architecture 'an_architecture_to_come'" in lines["not_yet"]
    assert "unavailable" not in lines["tiny_pool"] and " NTK " in lines["tiny_ntk"]


def test_every_listed_candidate_builds_or_names_what_it_lacks(script):
    registry = importlib.import_module("beyond_paper_search.candidates")
    for c in registry.CANDIDATES.values():
        if c.available():
            assert c.spec().build().out_size((28, 28)) == (1, 1), c.name
        else:
            with pytest.raises(registry.CandidateUnavailable, match=c.name):
                c.spec()


def test_sizes_whose_solves_do_not_fit_are_refused_before_any_work(script, data_dir, tmp_path, capsys, monkeypatch):
    need = 4 * N_TRAIN * (N_TRAIN + N_VAL) + 16 * N_TRAIN * N_TRAIN  # float32 Kxx and Kvx, float64 Kxx and factor
    assert script.solve_bytes(N_TRAIN, N_VAL, "float32") == need
    monkeypatch.setattr(script, "available_memory", lambda: need - 1)
    assert script.main(_argv(tmp_path, data_dir, "tiny")) == 1
    err = capsys.readouterr().err.strip()
    assert "give a smaller --n-train" in err and "\n" not in err
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())
    monkeypatch.setattr(script, "available_memory", lambda: need)
    assert script.main(_argv(tmp_path, data_dir, "tiny")) == 0


def _nlml(K: np.ndarray, noise: float, labels: np.ndarray) -> float:
    """-log p(Y) / n summed over the ten +-1 outputs, by NumPy's eigendecomposition of K + noise I."""
    Y = -np.ones((len(labels), 10))
    Y[np.arange(len(labels)), labels] = 1.0
    lam, Q = np.linalg.eigh(K + noise * np.eye(len(K)))
    proj = Q.T @ Y
    n = len(K)
    fit = 0.5 * ((proj**2) / lam[:, None]).sum()
    return float((fit + 5.0 * np.log(lam).sum() + 5.0 * n * math.log(2 * math.pi)) / n)


def test_tune_fits_the_variances_by_the_marginal_likelihood_of_training_digits_only(
    script, data_dir, tmp_path, digits, capsys, monkeypatch
):
    from gpytorch_cnngp import gram
    from gpytorch_cnngp.datasets import splits

    real = splits.load_split

    def train_only(*args, **kwargs):
        if kwargs.get("n_val") != 0 or kwargs.get("n_test") != 0:
            raise AssertionError(f"--tune asked for validation or test digits ({kwargs})")
        return real(*args, **kwargs)

    monkeypatch.setattr(script, "load_split", train_only)
    work = tmp_path / "work"
    argv = ["--tune", "tiny_pool", "--tune-n", "24", "--tune-iter", "30", "--workdir", str(work)]
    assert script.main([*argv, "--data-dir", str(data_dir), "--threads", "1", "--no-progress"]) == 0
    fit = json.loads((work / "ml2_tiny_pool.json").read_text())
    assert (fit["candidate"], fit["n"], fit["parameters"]) == (
        "tiny_pool",
        24,
        {"depth": 1, "kernel_size": 3, "pool": 2},
    )
    assert "var_weight" in capsys.readouterr().out
    # the objective it reports is the marginal likelihood of the first 24 training digits, computed here anew
    registry = importlib.import_module("beyond_paper_search.candidates")
    net = registry.convnet_gp_pool(
        var_weight=fit["var_weight"], var_bias=fit["var_bias"], depth=1, kernel_size=3, pool=2
    )
    import torch

    x = torch.from_numpy(digits["images"][:24]).double().div(255).unsqueeze(1)
    labels = digits["labels"][:24]
    K = gram(net, x, x).numpy()
    assert fit["loss_end"] == pytest.approx(_nlml(K, fit["noise"], labels), rel=1e-9)
    # ... and it went down from the architecture's own variances
    start = registry.convnet_gp_pool(depth=1, kernel_size=3, pool=2)
    assert fit["loss_start"] == pytest.approx(
        _nlml(gram(start, x, x).numpy(), fit["history"][0]["noise"], labels), rel=1e-9
    )
    assert fit["loss_end"] < fit["loss_start"] - 1.0
    # near a stationary point: moving either variance by 5% either way does not lower it by more than 1e-4
    for key in ("var_weight", "var_bias"):
        for f in (0.95, 1.05):
            moved = {"var_weight": fit["var_weight"], "var_bias": fit["var_bias"], key: fit[key] * f}
            other = registry.convnet_gp_pool(**moved, depth=1, kernel_size=3, pool=2)
            assert _nlml(gram(other, x, x).numpy(), fit["noise"], labels) > fit["loss_end"] - 1e-4


def test_tune_refuses_an_ntk_unknown_or_variance_free_candidate(script, data_dir, tmp_path, capsys):
    registry = importlib.import_module("beyond_paper_search.candidates")
    fixed = registry.Candidate("fixed_variances", "resnet32_gp", description="a factory without variances")
    registry.CANDIDATES[fixed.name] = fixed
    try:
        assert script.main(["--tune", fixed.name, "--workdir", str(tmp_path), "--data-dir", str(data_dir)]) == 1
    finally:
        del registry.CANDIDATES[fixed.name]
    assert "takes var_weight and var_bias; resnet32_gp has no var_bias or var_weight" in capsys.readouterr().err
    for name, message in (("tiny_ntk", "NTK"), ("nope", "unknown candidate")):
        assert script.main(["--tune", name, "--workdir", str(tmp_path), "--data-dir", str(data_dir)]) == 1
        assert message in capsys.readouterr().err
