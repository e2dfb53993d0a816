"""`cnngp`'s arguments checked before any work, results files that are never lost, and what the results record."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gpytorch_cnngp import cli
from gpytorch_cnngp.backends import native
from gpytorch_cnngp.cli import commands, parser, render
from gpytorch_cnngp.memory import available_memory

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import data_dir, offline  # noqa: E402, F401  (fixtures: synthetic MNIST files, no network)

TINY = ["--n-train", "8", "--n-val", "4", "--n-test", "4", "--tile-size", "4", "--threads", "1", "--no-progress"]


def _table(workdir: Path, data: Path, *extra: str) -> list[str]:
    return ["table", "--workdir", str(workdir), "--data-dir", str(data), *TINY, *extra]


def _rows(workdir: Path) -> list[dict]:
    return json.loads((workdir / "results.json").read_text())


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` made unwritable for this user: chmod for others, the immutable attribute for root."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i is not available: no read-only folder to test with")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# --------------------------------------------------------------------------------------------------------------
# arguments refused before any work


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--jitter", "nan", "finite number >= 0"),  # was: blamed on the store after the kernels
        ("--jitter", "inf", "finite number >= 0"),
        ("--jitter", "-1e-6", "finite number >= 0"),
        ("--threads", "100000", "at most"),  # was: a segmentation fault in the OpenMP runtime
        ("--max-tries", "400", "at most 11"),  # was: OverflowError
        ("--scheduler", "foo", "unknown scheduler"),  # was: checked only after the data loaded
        ("--scheduler", "tcp:/host", "unknown scheduler"),
    ],
)
def test_bad_arguments_are_refused_when_parsed(tmp_path, offline, capsys, option, value, says):  # noqa: F811
    empty = tmp_path / "no-data"  # had parsing let it through, the run would stop at the missing data instead
    argv = _table(tmp_path / "work", empty, f"{option}={value}")
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and option in err and says in err and "Traceback" not in err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("option", ["--device", "--solve-device"])
def test_table_checks_both_devices_before_any_work(tmp_path, offline, capsys, option):  # noqa: F811
    # was: a bad --solve-device was found after the kernels
    status = cli.main(_table(tmp_path / "work", tmp_path / "no-data", option, "tpu"))
    err = capsys.readouterr().err
    assert status == 1 and "unknown device 'tpu'" in err and "could not obtain MNIST" not in err
    assert not (tmp_path / "work").exists()


def test_threads_bound_names_the_machine(capsys):
    cpus = os.cpu_count() or 1
    limit = parser.THREADS_PER_CPU * cpus
    assert parser._threads(str(limit)) == limit
    with pytest.raises(Exception, match=f"at most {limit} threads .*{cpus}"):
        parser._threads(str(limit + 1))


def test_cpu_n_is_the_cpu(data_dir, tmp_path, capsys):  # noqa: F811
    # was: --device cpu:0 timed the first tile eagerly with unset threads (a 10x ETA) and skipped the threads choice
    assert cli.build_parser().parse_args(["kernels", "--out", "k.h5", "--device", "cpu:0"]).device == "cpu"
    argv = ["kernels", "--out", str(tmp_path / "k.h5"), "--data-dir", str(data_dir), *TINY[:-3], "--no-progress"]
    assert cli.main([*argv, "--device", "cpu:0"]) == 0
    out = capsys.readouterr().out
    if native.load_library() is not None:
        assert "timed on the first tile on cpu, native kernel" in out
        if torch.get_num_threads() > 1:  # one default thread (e.g. OMP_NUM_THREADS=1) leaves nothing to choose
            assert "torch threads:" in out and "(native CPU kernel)" in out


@pytest.mark.parametrize("command", ["kernels", "classify", "table"])
def test_one_memory_check_for_every_command(tmp_path, offline, capsys, command):  # noqa: F811
    # was: kernels and classify accepted a 10 TB budget that table refused
    avail = available_memory()
    if avail is None or avail >= 10**13:
        pytest.skip("the available memory is unknown or above 10 TB")
    empty = str(tmp_path / "no-data")
    store = tmp_path / "k.h5"
    store.write_bytes(b"")  # classify needs a path that exists; it is never opened
    argv = {
        "kernels": ["kernels", "--out", str(tmp_path / "new.h5"), "--data-dir", empty, "--n-train", "4"],
        "classify": ["classify", str(store)],
        "table": ["table", "--workdir", str(tmp_path / "w"), "--data-dir", empty, "--n-train", "4"],
    }[command]
    assert cli.main([*argv, "--memory-budget", "10TB", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "exceeds the memory available now" in err and "--memory-budget" in err
    assert not (tmp_path / "new.h5").exists()


def test_unwritable_outputs_are_found_before_the_solve(data_dir, tmp_path, capsys):  # noqa: F811
    # was: a read-only --json, --dual or --workdir was found only after the kernels and the solve
    store = tmp_path / "k.h5"
    kernels = ["kernels", "--out", str(store), "--data-dir", str(data_dir), *TINY]
    assert cli.main(kernels) == 0
    capsys.readouterr()
    locked = tmp_path / "locked"
    with _read_only(locked):
        for option in ("--json", "--dual"):
            assert cli.main(["classify", str(store), "--no-progress", option, str(locked / "out")]) == 1
            captured = capsys.readouterr()
            assert f"{option}: cannot write in {locked}" in captured.err and "Traceback" not in captured.err
            assert "validation error" not in captured.out  # refused before the solve
        assert cli.main(["kernels", "--out", str(locked / "new.h5"), "--data-dir", str(data_dir), *TINY]) == 1
        captured = capsys.readouterr()
        assert f"--out: cannot write in {locked}" in captured.err and "data:" not in captured.out
        argv = _table(locked, data_dir)
        assert cli.main(argv) == 1
        captured = capsys.readouterr()
        assert f"--workdir: cannot write in {locked}" in captured.err
        assert "data:" not in captured.out and not any(locked.iterdir())  # no data loaded, no store made


# --------------------------------------------------------------------------------------------------------------
# jitter


def test_a_jitter_above_the_kernel_diagonal_is_refused(data_dir, tmp_path, capsys):  # noqa: F811
    # was: --jitter 1e300 accepted; every prediction the same class (91.5% errors) and exit status 0
    store = tmp_path / "k.h5"
    assert cli.main(["kernels", "--out", str(store), "--data-dir", str(data_dir), *TINY]) == 0
    with h5py.File(store, "r") as f:
        mean_diag = float(np.mean(np.diag(f["Kxx"][...].astype(np.float64))))
    capsys.readouterr()
    out_json = tmp_path / "r.json"
    assert cli.main(["classify", str(store), "--jitter", "1e300", "--json", str(out_json), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "--jitter 1e+300 is larger than the mean diagonal of Kxx" in captured.err
    assert f"{mean_diag:.4g}" in captured.err and not out_json.exists()
    assert cli.main(["classify", str(store), "--jitter", f"{2 * mean_diag}", "--no-progress"]) == 1
    # up to the mean diagonal it is the user's choice
    assert cli.main(["classify", str(store), "--jitter", f"{0.5 * mean_diag}", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["jitter"] == pytest.approx(0.5 * mean_diag)
    # table refuses it before any kernel is computed, from the training images' prior variances
    workdir = tmp_path / "work"
    capsys.readouterr()
    assert cli.main(_table(workdir, data_dir, "--jitter", "1e300", "--store-dir", str(tmp_path / "s"))) == 1
    captured = capsys.readouterr()
    assert "is larger than the mean diagonal of Kxx" in captured.err and f"{mean_diag:.4g}" in captured.err
    assert not any((tmp_path / "s").glob("*.h5")) and not (workdir / "results.json").exists()


# --------------------------------------------------------------------------------------------------------------
# results files


def test_two_runs_in_one_work_folder_keep_both_rows(data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    # was: each run read results.json at its start and rewrote it at its end: the other run's row was lost
    workdir = tmp_path / "work"
    real, nested = commands._classify, []

    def other_run_finishes_meanwhile(path, args):
        if not nested:
            nested.append(1)
            other = _table(workdir, data_dir)
            other[other.index("--n-train") + 1] = "6"
            assert cli.main(other) == 0
        return real(path, args)

    monkeypatch.setattr(commands, "_classify", other_run_finishes_meanwhile)
    assert cli.main(_table(workdir, data_dir)) == 0
    rows = _rows(workdir)
    assert sorted(r["n_train"] for r in rows) == [6, 8]
    md = (workdir / "results.md").read_text()
    assert md.count("| ConvNet GP |") == 2


def _append_rows(workdir: str, first: int, count: int) -> None:
    for i in range(first, first + count):
        row = {"config": "convnet_gp", "dataset": "mnist", "split": "x", "n_train": i, "n_val": 0, "n_test": 0}
        row.update(dtype="float32", val_error=0.1, test_error=0.1, kernel_seconds=1.0, solve_seconds=1.0, device="cpu")
        render._record_rows(Path(workdir), [row])


def test_concurrent_writers_lose_no_row(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    workers = [context.Process(target=_append_rows, args=(str(tmp_path), 100 * k, 15)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert sorted(r["n_train"] for r in _rows(tmp_path)) == sorted(100 * k + i for k in range(4) for i in range(15))
    assert not list(tmp_path.glob(".results.json.*"))  # no temporary file left behind


_FULL_DISK_RUN = """
import json, resource, sys
from gpytorch_cnngp import cli
from gpytorch_cnngp import datasets as ds
ds.MD5["mnist"] = json.loads(sys.argv[1])
ds.SOURCES["mnist"] = []
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # no file may grow past `limit` bytes: a full disk
sys.exit(cli.main(sys.argv[3:]))
"""


def test_a_full_disk_leaves_the_results_as_they_were(data_dir, tmp_path):  # noqa: F811
    # was: results.json truncated in place, invalid JSON, its earlier rows lost
    from gpytorch_cnngp import datasets as ds

    workdir = tmp_path / "work"
    argv = _table(workdir, data_dir)
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--configs", "residual_cnn_gp"]) == 0
    before = {name: (workdir / name).read_bytes() for name in ("results.json", "results.md")}
    assert len(json.loads(before["results.json"])) == 2
    # the same run again (its store is complete: nothing grows but the results) with files limited to 300 bytes
    import gpytorch_cnngp

    package_root = str(Path(gpytorch_cnngp.__file__).parents[1])  # the package this test imported, not another
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, *sys.path])}
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_RUN, json.dumps(ds.MD5["mnist"]), "300", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr
    assert f"could not write {workdir / 'results.json'}" in run.stderr and "previous file is unchanged" in run.stderr
    assert "Traceback" not in run.stderr
    for name, content in before.items():
        assert (workdir / name).read_bytes() == content, name
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "A.npz"
    result = {"A": np.ones((3, 2)), "val_predictions": np.zeros(2), "test_predictions": np.zeros(2)}
    render._save_dual(target, result)
    old = target.read_bytes()
    with np.load(target) as saved:
        assert np.array_equal(saved["A"], result["A"])

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(cli.UserError, match="could not write .*No space left on device; the previous file"):
        render._save_dual(target, {**result, "A": np.zeros((3, 2))})
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["A.npz"]


# --------------------------------------------------------------------------------------------------------------
# what the results record, the help and git


def test_results_record_the_shown_kernel_time_and_the_solves_peak_memory(data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    # was: kernel_seconds was the last run's wall time while results.md showed the blocks' time over every run;
    # the peak memory was the process's (the kernels' and everything before), not the solve's
    from gpytorch_cnngp.cli import policy
    from gpytorch_cnngp.store import KernelStore

    workdir = tmp_path / "work"
    argv = _table(workdir, data_dir)
    real, calls = KernelStore.write_block, []

    def stop_after_four(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(KernelStore, "write_block", stop_after_four)
    assert cli.main(argv) == 130  # interrupted after four blocks
    monkeypatch.setattr(KernelStore, "write_block", real)
    ballast = mmap.mmap(-1, 300 * 10**6)  # 300 MB resident before the run, returned to the system before it
    ballast.write(b"\1" * len(ballast))
    ballast.close()
    before = policy._peak_rss()
    assert cli.main(argv) == 0  # resumed
    (row,) = _rows(workdir)
    (store,) = workdir.glob("*.h5")
    with h5py.File(store, "r") as f:
        shown = sum(float(f[name][...].sum()) for name in f if name.startswith("seconds_"))
    assert row["kernel_seconds"] == pytest.approx(shown, rel=1e-12)
    assert f"| {render._fmt_seconds(shown)} |" in (workdir / "results.md").read_text()
    assert 0 < row["kernel_wall_seconds"]
    peak = row["peak_rss_bytes"]
    assert peak is not None and peak > 0
    if policy._reset_peak_rss():
        assert peak < before - 200 * 10**6  # the solve's own peak, not the process's


def test_every_option_states_its_default():
    # was: several options printed no default; --full and --paper-scale were not told apart; --store-dir claimed
    # the work folder under --paper-scale too
    top = cli.build_parser()
    subcommands = next(a for a in top._actions if a.dest == "command").choices
    for name, sub in subcommands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help" or action.required:
                continue
            text = formatter._expand_help(action)
            assert "default" in text, (name, action.option_strings, text)
            assert "None" not in text, (name, action.option_strings, text)
    table = subcommands["table"]
    helps = {a.dest: table._get_formatter()._expand_help(a) for a in table._actions if a.option_strings}
    assert "--paper-scale" in helps["full"] and "paper_table" in helps["store_dir"]


def test_the_default_output_folder_is_ignored_by_git():
    root = Path(__file__).parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (f"{cli.defaults.DEFAULT_WORKDIR}/results.json", "paper-table/results.md"):
        check = subprocess.run(["git", "check-ignore", "-q", path], cwd=root, capture_output=True)
        assert check.returncode == 0, f"{path} is not ignored by git"


def test_the_command_follows_the_library_backend_policy(data_dir, tmp_path, capsys):  # noqa: F811
    # was: the command decided "native" from the --backend string and the kernel's availability alone, so under
    # CNNGP_COMPILE=off it timed its first tile natively and took all cores for a kernel its blocks never ran
    from gpytorch_cnngp import settings

    argv = ["kernels", "--out", str(tmp_path / "k.h5"), "--data-dir", str(data_dir), *TINY[:-3], "--no-progress"]
    with settings.compile_mode("off"):  # backends.choose: "auto" runs eagerly
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "timed on the first tile on cpu)" in out and "native kernel" not in out
    assert "(native CPU kernel)" not in out


def test_the_command_takes_the_backend_from_backends_choose(data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Whatever ``backends.choose`` answers decides the probe's note and the threads (here torch.compile: the
    first tile is timed eagerly, noted as slower than the compiled blocks, and the default threads are kept)."""
    import torch

    from gpytorch_cnngp.backends import Inductor
    from gpytorch_cnngp.cli import policy

    asked = []

    def fake_choose(requested, model, size, dtype, device, n_pairs, *args, **kwargs):
        asked.append((requested, tuple(size), dtype, device.type, n_pairs))
        return Inductor

    monkeypatch.setattr(policy, "choose", fake_choose)
    # the blocks themselves run eagerly (the library's own choose is not patched), so no compilation happens
    argv = ["kernels", "--out", str(tmp_path / "k.h5"), "--data-dir", str(data_dir), *TINY[:-3], "--no-progress"]
    threads = torch.get_num_threads()
    try:
        assert cli.main([*argv, "--backend", "eager"]) == 0
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "timed on the first tile on cpu, eager; compiled blocks are faster" in out
    assert "torch threads" not in out  # compiled blocks keep the default threads, untimed
    # asked with --backend, the images' size, --dtype, the device, and a block's pairs (tile 4: 16)
    assert asked and all(a[:4] == ("eager", (28, 28), torch.float32, "cpu") for a in asked), asked
    assert {a[4] for a in asked} == {16}, asked
