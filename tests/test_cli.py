"""The `cnngp` command end to end on tiny subsets: offline on synthetic IDX files, and on real MNIST when cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mnist_files import disable_sources, write_mnist

from gpytorch_cnngp import cli, settings
from gpytorch_cnngp import datasets as ds
from gpytorch_cnngp.backends import native
from gpytorch_cnngp.cli import commands

SAMPLE = Path(__file__).parent / "data" / "mnist_sample.npz"


@pytest.fixture
def offline(monkeypatch):
    """No network: every configured source fails."""
    disable_sources(monkeypatch)


@pytest.fixture
def data_dir(tmp_path, monkeypatch, offline):
    """MNIST-shaped IDX files (60000 + 20 images, real digits where the tiny splits look) with patched MD5s."""
    sample = np.load(SAMPLE)
    train_x = np.zeros((60000, 28, 28), np.uint8)
    train_y = np.zeros(60000, np.uint8)
    # mnist_as_tf: train starts at 5000, validation at 55000, test is the official test file
    train_x[5000:5020], train_y[5000:5020] = sample["train_images"][:20], sample["train_labels"][:20]
    train_x[55000:55010], train_y[55000:55010] = sample["train_images"][20:30], sample["train_labels"][20:30]
    test_x, test_y = sample["test_images"][:16], sample["test_labels"][:16]
    return write_mnist(tmp_path / "data", monkeypatch, train_x, train_y, test_x, test_y)


def test_sample_has_the_expected_keys():
    assert {"train_images", "train_labels", "test_images", "test_labels"} <= set(np.load(SAMPLE).files)


def test_table_end_to_end_offline(data_dir, tmp_path, capsys):
    workdir = tmp_path / "work"
    argv = ["table", "--n-train", "20", "--n-val", "10", "--n-test", "10", "--workdir", str(workdir)]
    argv += ["--data-dir", str(data_dir), "--tile-size", "8", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "estimated kernel time" in out and "validation error" in out
    if torch.get_num_threads() > 1:
        assert "torch threads:" in out  # chosen by timing, or all cores for the native kernel
    if native.load_library() is not None:  # the CPU blocks run in the native kernel, timed as such
        assert "timed on the first tile on cpu, native kernel" in out
    rows = json.loads((workdir / "results.json").read_text())
    assert len(rows) == 1
    row = rows[0]
    for key in ("config", "split", "n_train", "n_val", "n_test", "val_error", "test_error", "device"):
        assert key in row
    assert (row["config"], row["split"], row["n_train"], row["n_val"], row["n_test"]) == (
        "convnet_gp",
        "mnist_as_tf",
        20,
        10,
        10,
    )
    assert 0.0 <= row["val_error"] <= 1.0 and 0.0 <= row["test_error"] <= 1.0
    assert row["val_error"] < 0.9  # real digits: clearly better than chance even with 20 training images
    assert (row["paper_val_error"], row["paper_test_error"]) == (0.0071, 0.0103)
    assert row["kernel_seconds"] > 0 and row["solve_seconds"] >= 0 and row["device"] == "cpu"
    md = (workdir / "results.md").read_text()
    assert "ConvNet GP" in md and "0.71%" in md and "1.03%" in md
    assert md.splitlines()[0] in out  # the table is printed
    # a second run reuses the complete store and replaces its row
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "is complete; nothing to compute" in out
    rows2 = json.loads((workdir / "results.json").read_text())
    assert len(rows2) == 1 and rows2[0]["val_error"] == row["val_error"]


def test_kernels_classify_and_clear_errors(data_dir, tmp_path, capsys):
    store = tmp_path / "k.h5"
    common = ["--data-dir", str(data_dir), "--no-progress", "--threads", "1"]
    sizes = ["--n-train", "12", "--n-val", "4", "--n-test", "3"]
    assert (
        cli.main(["kernels", "--config", "convnet_gp", "--out", str(store), "--tile-size", "5", *sizes, *common]) == 0
    )
    assert store.exists()
    capsys.readouterr()
    assert cli.main(["classify", str(store), "--variances", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["val_predictions"]) == 4 and len(result["test_variances"]) == 3
    capsys.readouterr()
    # the same output file for other sizes is refused, with no traceback
    assert cli.main(["kernels", "--out", str(store), "--n-train", "12", "--n-val", "5", "--n-test", "3", *common]) == 1
    err = capsys.readouterr().err
    assert "n_val" in err and "Traceback" not in err and err.startswith("cnngp: error:")
    # ... and for another architecture
    assert cli.main(["kernels", "--config", "residual_cnn_gp", "--out", str(store), *sizes, *common]) == 1
    assert "architecture" in capsys.readouterr().err
    assert cli.main(["classify", str(tmp_path / "nothing.h5")]) == 1
    assert "no kernel store" in capsys.readouterr().err
    assert cli.main(["table", "--full", "--n-train", "5", "--workdir", str(tmp_path)]) == 1
    assert "--full" in capsys.readouterr().err
    # an explicit backend that cannot run the network here is refused before any work, saying why
    pooled = tmp_path / "pooled.h5"
    argv = ["kernels", "--config", "pooled_cnn_gp", "--out", str(pooled), "--backend", "native", *sizes, *common]
    with settings.native(False):
        assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "--backend native cannot run pooled_cnn_gp here" in err and "switched off" in err
    assert "Traceback" not in err
    assert "backend='native'" not in err and err.count("cannot run") == 1  # the library's wording, not repeated
    assert not pooled.exists()
    # the removed --compile is an unknown option (argparse's own error, exit status 2)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv[: -len(sizes) - len(common)], "--compile", "on", *sizes, *common])
    assert exit_info.value.code == 2 and "unrecognized arguments: --compile on" in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(tmp_path, offline, capsys):
    empty = tmp_path / "empty"
    assert cli.main(["data", "--data-dir", str(empty), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "could not obtain MNIST" in err and "Traceback" not in err
    argv = ["kernels", "--out", str(tmp_path / "k.h5"), "--n-train", "4", "--data-dir", str(empty), "--no-progress"]
    assert cli.main(argv) == 1
    assert "could not obtain MNIST" in capsys.readouterr().err
    assert not (tmp_path / "k.h5").exists()


def test_data_command_verifies(data_dir, capsys):
    assert cli.main(["data", "--data-dir", str(data_dir), "--no-progress"]) == 0
    assert "verified" in capsys.readouterr().out


def test_table_runs_a_myrtle_configuration(data_dir, tmp_path, capsys):
    """`--configs myrtle5_gp` is a configuration like the paper's: listed in the help, computed, classified, and
    shown under its name with no paper errors beside it."""
    with pytest.raises(SystemExit):
        cli.main(["table", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in ("myrtle5_gp", "myrtle7_gp", "myrtle10_gp"))
    workdir = tmp_path / "work"
    argv = ["table", "--configs", "myrtle5_gp", "--n-train", "6", "--n-val", "2", "--n-test", "2"]
    argv += ["--workdir", str(workdir), "--data-dir", str(data_dir), "--no-progress", "--threads", "1"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    (row,) = json.loads((workdir / "results.json").read_text())
    assert (row["config"], row["n_train"]) == ("myrtle5_gp", 6)
    assert row["paper_val_error"] is None and row["paper_test_error"] is None
    assert 0.0 <= row["val_error"] <= 1.0 and 0.0 <= row["test_error"] <= 1.0
    line = next(x for x in (workdir / "results.md").read_text().splitlines() if "myrtle" in x.lower())
    assert line.startswith("| Myrtle-5 GP (Shankar et al.) | MNIST |") and "| - | - |" in line


def test_help_states_the_default_subset(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["table", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    d = cli.DEFAULT_SUBSET
    assert f"first {d['n_train']} training, {d['n_val']} validation and {d['n_test']} test images" in text
    assert cli.main([]) == 2


def _real_mnist_cached() -> bool:
    folder = ds.default_cache_dir() if not os.environ.get(ds.ENV_VAR) else Path(os.environ[ds.ENV_VAR])
    folder = folder / "mnist"
    return all((folder / n).exists() or (folder / f"{n}.gz").exists() for n in ds.FILES)


@pytest.mark.skipif(not _real_mnist_cached(), reason="real MNIST is not in the data cache (run `cnngp data`)")
def test_console_script_on_real_mnist(tmp_path):
    """The installed `cnngp` entry point, as a user runs it, on the first images of the real split."""
    exe = Path(sys.executable).with_name("cnngp")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "gpytorch_cnngp.cli"]
    workdir = tmp_path / "work"
    out = subprocess.run(
        [*command, "table", "--n-train", "20", "--n-val", "10", "--n-test", "10", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "entries/s" in out.stderr  # the progress bar shows a rate
    row = json.loads((workdir / "results.json").read_text())[0]
    assert row["n_train"] == 20 and row["val_error"] <= 0.6


# --------------------------------------------------------------------------------------------------------------
# the classifier's memory budget and the paper-scale run's checks


def test_classify_within_a_memory_budget(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from store_helpers import write_synthetic_store

    sizes = {"n_train": 1200, "n_val": 50, "n_test": 40}
    path = tmp_path / "k.h5"
    write_synthetic_store(path, sizes, tile=256, seed=3)
    out_json = tmp_path / "r.json"
    status = cli.main(["classify", str(path), "--memory-budget", "6MB", "--no-progress", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert status == 0
    assert "memory budget 6 MB" in text and "panels were kept on disk" in text
    row = json.loads(out_json.read_text())
    assert row["factor"] == "disk" and row["memory_budget"] == 6 * 10**6 and "A" not in row
    reference = cli.main(["classify", str(path), "--memory-budget", "1GB", "--no-progress", "--json", str(out_json)])
    assert reference == 0 and json.loads(out_json.read_text())["factor"] == "memory"
    assert json.loads(out_json.read_text())["test_predictions"] == row["test_predictions"]


@pytest.mark.parametrize("value", ["nan", "-5MB", "12 furlongs"])
def test_bad_memory_budgets_are_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as info:
        cli.main(["classify", str(tmp_path / "k.h5"), "--memory-budget", value])
    assert info.value.code == 2
    assert "--memory-budget" in capsys.readouterr().err


def test_paper_scale_refuses_a_run_the_disk_cannot_hold(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 5 * 10**9, 5 * 10**9))
    store_dir = tmp_path / "stores"
    status = cli.main(["table", "--paper-scale", "--store-dir", str(store_dir), "--workdir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert status == 1
    assert "not enough disk space" in err and "5 GB is free" in err
    # the three stores of 50000 x 70000 float32 entries: 14 GB each
    for config in cli.PAPER_CONFIGS:
        assert f"{config}: store 14 GB" in err
    assert not any(store_dir.glob("*.h5")), "nothing is created before the checks pass"


def test_paper_scale_refuses_a_budget_too_small_for_the_factor(tmp_path, capsys):
    status = cli.main(
        ["table", "--paper-scale", "--memory-budget", "2MB", "--store-dir", str(tmp_path), "--workdir", str(tmp_path)]
    )
    assert status == 1
    assert "too small for the blocked factorisation of a 50000x50000 matrix" in capsys.readouterr().err


def test_paper_scale_sizes_are_fixed(tmp_path, capsys):
    status = cli.main(["table", "--paper-scale", "--n-train", "100", "--workdir", str(tmp_path)])
    assert status == 1 and "--paper-scale sets --n-train" in capsys.readouterr().err


def test_a_malformed_results_file_is_reported_not_overwritten(tmp_path, capsys, data_dir):
    (tmp_path / "results.json").write_text("{not json")
    status = cli.main(["table", "--workdir", str(tmp_path), "--data-dir", str(data_dir), "--n-train", "4"])
    assert status == 1 and "not a readable results file" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "{not json"


def test_failed_scheduler_connections_leave_nothing_behind(tmp_path, capsys, data_dir, monkeypatch):
    # was: `--scheduler foo` or a bogus address left an empty store behind
    out = tmp_path / "k.h5"
    base = ["kernels", "--data-dir", str(data_dir), "--n-train", "4", "--n-val", "0", "--n-test", "0"]
    with pytest.raises(SystemExit) as info:  # refused with the arguments, before any work
        cli.main([*base, "--scheduler", "foo", "--out", str(out), "--no-progress"])
    assert info.value.code == 2 and "unknown scheduler 'foo'" in capsys.readouterr().err
    assert not out.exists()

    def unreachable(address, workers=None):
        raise cli.SchedulerUnavailable(f"cannot reach the Dask scheduler at {address}: timed out")

    monkeypatch.setattr(commands, "open_client", unreachable)
    status = cli.main([*base, "--scheduler", "tcp://127.0.0.1:1", "--out", str(out), "--no-progress"])
    assert status == 1 and "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert not out.exists() and not any(tmp_path.glob("*.h5*"))


def test_a_store_deleted_during_kernels_is_a_failure(tmp_path, capsys, data_dir, monkeypatch):
    # was: "kernels done", exit 0, and no file
    out = tmp_path / "k.h5"
    real = commands.compute_store

    def delete_midway(store, *args, **kwargs):
        report = real(store, *args, **kwargs)
        out.unlink()  # the user's `rm` lands during the last tile
        return report

    monkeypatch.setattr(commands, "compute_store", delete_midway)
    argv = ["kernels", "--data-dir", str(data_dir), "--n-train", "4", "--n-val", "2", "--n-test", "2"]
    status = cli.main([*argv, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "was deleted while this run was writing to it" in err


def test_a_damaged_store_is_refused_and_repaired(data_dir, tmp_path, capsys):
    # was: 4 KB of random bytes written into a finished store's Ktx; `cnngp kernels` said the store was complete
    # and `cnngp classify` exited 0 with another test error
    import h5py

    store = tmp_path / "k.h5"
    common = ["--data-dir", str(data_dir), "--no-progress", "--threads", "1"]
    kernels = ["kernels", "--out", str(store), "--n-train", "20", "--n-val", "10", "--n-test", "16", *common]
    assert cli.main([*kernels, "--tile-size", "4"]) == 0
    assert cli.main(["classify", str(store), "--json", str(tmp_path / "clean.json")]) == 0
    clean = json.loads((tmp_path / "clean.json").read_text())
    capsys.readouterr()
    with h5py.File(store, "r") as f:
        start, size = f["Ktx"].id.get_offset(), f["Ktx"].id.get_storage_size()
    assert size >= 1024
    with open(store, "r+b") as fh:  # the store's Ktx is 1.25 KB here: 1 KB of it, as the 4 KB of the report
        fh.seek(start + 128)
        fh.write(np.random.default_rng(0).bytes(1024))
    assert cli.main(kernels) == 1
    err = capsys.readouterr().err
    assert "is damaged" in err and "Ktx[" in err and "--repair" in err and "Traceback" not in err
    assert cli.main(["classify", str(store)]) == 1
    assert "is damaged" in capsys.readouterr().err
    assert cli.main([*kernels, "--repair"]) == 0
    out = capsys.readouterr().out
    assert "repair:" in out and "damaged tile(s) will be computed again" in out
    assert cli.main(["classify", str(store), "--json", str(tmp_path / "repaired.json")]) == 0
    repaired = json.loads((tmp_path / "repaired.json").read_text())
    assert repaired["test_predictions"] == clean["test_predictions"]
    assert repaired["val_error"] == clean["val_error"] and repaired["test_error"] == clean["test_error"]
    assert cli.main([*kernels, "--repair"]) == 0
    assert "every committed tile is intact" in capsys.readouterr().out


def test_a_store_that_becomes_unwritable_stops_the_run_and_resumes(tmp_path, capsys, data_dir, monkeypatch):
    import errno

    from gpytorch_cnngp.store import KernelStore

    out, clean = tmp_path / "k.h5", tmp_path / "clean.h5"
    argv = ["kernels", "--data-dir", str(data_dir), "--n-train", "8", "--n-val", "2", "--n-test", "2"]
    argv += ["--tile-size", "3", "--threads", "1", "--no-progress"]
    assert cli.main([*argv, "--out", str(clean)]) == 0
    real, calls = KernelStore._sync, []

    def failing_disk(self):
        calls.append(1)
        if len(calls) > 6:
            raise OSError(errno.EIO, "Input/output error")
        real(self)

    monkeypatch.setattr(KernelStore, "_sync", failing_disk)
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "failed: [Errno 5] Input/output error" in err and "run the same command to resume" in err
    monkeypatch.setattr(KernelStore, "_sync", real)
    with KernelStore.open(out) as store:
        assert 0 < store.entries()[0] < store.entries()[1]  # the blocks before the failure are kept
    assert cli.main([*argv, "--out", str(out)]) == 0
    sys.path.insert(0, str(Path(__file__).parent))
    from store_helpers import store_contents

    a, _ = store_contents(out)
    b, _ = store_contents(clean)
    for name in ("done_Kxx", "done_Kvx", "done_Ktx"):
        assert np.array_equal(a[name], b[name]), name
    with KernelStore.open(out) as resumed, KernelStore.open(clean) as reference:
        assert resumed.verify() == []
        for name in ("Kxx", "Kvx", "Ktx", "Kvv_diag", "Ktt_diag"):
            # equal to rounding: in the full suite the two runs' blocks have been seen to differ in the last bits
            np.testing.assert_allclose(resumed.read(name), reference.read(name), rtol=1e-6, err_msg=name)


def test_damaged_labels_are_refused_and_repaired_from_the_data_set(data_dir, tmp_path, capsys):
    # was: two bytes of y_test changed in a finished store: `classify` and `table` reported another test error
    # with exit 0, and `kernels --repair` said every tile was intact
    import h5py

    store = tmp_path / "k.h5"
    common = ["--data-dir", str(data_dir), "--no-progress", "--threads", "1"]
    kernels = ["kernels", "--out", str(store), "--n-train", "20", "--n-val", "10", "--n-test", "16", *common]
    assert cli.main([*kernels, "--tile-size", "8"]) == 0
    assert cli.main(["classify", str(store), "--no-progress", "--json", str(tmp_path / "clean.json")]) == 0
    clean = json.loads((tmp_path / "clean.json").read_text())
    with h5py.File(store, "r") as f:
        start, y = f["y_test"].id.get_offset(), f["y_test"][...]
    with open(store, "r+b") as fh:  # two labels made other digits
        for i in (0, 1):
            fh.seek(start + 8 * i)
            fh.write(bytes([(int(y[i]) + 1) % 10]))
    capsys.readouterr()
    assert cli.main(["classify", str(store), "--no-progress", "--json", str(tmp_path / "damaged.json")]) == 1
    err = capsys.readouterr().err
    assert "labels y_test" in err and "--repair" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "damaged.json").exists()
    assert cli.main(kernels) == 1  # a resumed run checks them too
    assert "labels y_test" in capsys.readouterr().err
    assert cli.main([*kernels, "--repair"]) == 0
    out = capsys.readouterr().out
    assert "repair: the labels y_test (" in out and "written again from the data set" in out
    assert cli.main(["classify", str(store), "--no-progress", "--json", str(tmp_path / "repaired.json")]) == 0
    repaired = json.loads((tmp_path / "repaired.json").read_text())
    assert repaired["test_error"] == clean["test_error"] and repaired["test_predictions"] == clean["test_predictions"]


def test_a_store_with_damaged_hdf5_metadata_is_one_clear_error_repair_included(data_dir, tmp_path, capsys):
    # was: raw KeyError/RuntimeError tracebacks from `kernels`, `kernels --repair` and `classify`
    store = tmp_path / "k.h5"
    common = ["--data-dir", str(data_dir), "--no-progress", "--threads", "1"]
    kernels = ["kernels", "--out", str(store), "--n-train", "12", "--n-val", "4", "--n-test", "4", *common]
    assert cli.main(kernels) == 0
    raw = store.read_bytes()
    with open(store, "r+b") as fh:  # the root group's symbol-table node: where its datasets are found
        fh.seek(raw.find(b"SNOD") + 8)
        fh.write(np.random.default_rng(1).bytes(16))
    capsys.readouterr()
    for argv in (kernels, [*kernels, "--repair"], ["classify", str(store), "--no-progress"]):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"{store} cannot be read as a kernel store" in err and f"mv {store} {store}.damaged" in err
    store.rename(tmp_path / "k.h5.damaged")  # as the message says: moved aside, the same command starts again
    assert cli.main(kernels) == 0
