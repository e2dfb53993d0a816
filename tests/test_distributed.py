"""Tiles on a Dask cluster of two worker processes give the same store as the in-process run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from gpytorch_cnngp import distributed as dist
from gpytorch_cnngp.store import KernelStore

sys.path.insert(0, str(Path(__file__).parent))
from store_helpers import assert_same_store, one_thread, store_contents, tiny_problem  # noqa: E402
from test_cli import data_dir, offline  # noqa: E402, F401  (fixtures: synthetic MNIST files, no network)

distributed = pytest.importorskip("distributed")

TILE = 5
SIZES = {"n_train": 12, "n_val": 4, "n_test": 3}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _run(path, scheduler, **kwargs):
    spec, meta, labels, images = tiny_problem(sizes=SIZES)
    with KernelStore.open_or_create(path, meta, labels, TILE) as store, one_thread():
        report = dist.compute_store(store, spec, images, scheduler=scheduler, progress=False, **kwargs)
    return report


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("sync") / "sync.h5"
    report = _run(path, "sync")
    assert report.complete and report.devices == {"cpu"}
    return path


@pytest.fixture(scope="module")
def local_client():
    """``scheduler="local"``: a LocalCluster of two single-threaded worker processes, shared by this module."""
    with dist.open_client("local", n_workers=2) as client:
        assert len(client.nthreads()) == 2 and set(client.nthreads().values()) == {1}
        yield client


def test_two_worker_processes_equal_the_in_process_run(tmp_path, local_run, local_client):
    """Blocks sent to the two worker processes through the scheduler's tcp:// address, like a remote cluster."""
    address = local_client.scheduler.address
    assert address.startswith("tcp://")
    path = tmp_path / "dask.h5"
    # a small in-flight bound exercises the refilling of the queue
    report = _run(path, address, max_in_flight=2, threads=1)
    assert report.complete and report.blocks == 3 * 4 // 2 + 1 * 3 + 1 * 3 + 1 + 1
    data, _ = store_contents(path)
    ref, _ = store_contents(local_run)
    for name in ("Kxx", "Kvx", "Ktx", "Kvv_diag", "Ktt_diag"):
        np.testing.assert_allclose(data[name], ref[name], rtol=1e-6, err_msg=name)
    # single-threaded workers and the in-process run perform the same float operations: identical bits
    assert_same_store(path, local_run)


def test_cluster_resumes_an_in_process_store(tmp_path, local_run, local_client):
    """Half the blocks in-process, the rest on the two worker processes (a Client passed as the scheduler)."""
    spec, meta, labels, images = tiny_problem(sizes=SIZES)
    path = tmp_path / "mixed.h5"
    real = dist.compute_block
    calls = {"n": 0}

    class Stop(Exception):
        pass

    def stop_after_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise Stop
        return real(*args, **kwargs)

    with KernelStore.create(path, meta, labels, TILE) as store:
        dist.compute_block = stop_after_five
        try:
            with pytest.raises(Stop):
                dist.compute_store(store, spec, images, progress=False)
        finally:
            dist.compute_block = real
        assert store.entries()[0] > 0 and not store.is_complete()
    report = _run(path, local_client)
    assert report.complete and report.blocks == 14 - 5
    assert local_client.status == "running"  # a client passed in is not closed
    assert_same_store(path, local_run)


def test_architecture_spec():
    spec = dist.ArchitectureSpec.from_name("residual_cnn_gp", blocks=2)
    assert spec.kwargs == {"image_size": 28, "var_weight": 7.27, "var_bias": 4.69, "blocks": 2, "kernel_size": 4}
    assert spec.build().out_size((28, 28)) == (1, 1)
    with pytest.raises(ValueError, match="unknown configuration"):
        dist.ArchitectureSpec.from_name("vgg")
    with pytest.raises(ValueError, match="takes no argument"):
        dist.ArchitectureSpec.from_name("convnet_gp", width=3)


def test_bad_scheduler_and_wrong_architecture(tmp_path):
    with pytest.raises(ValueError, match="unknown scheduler"), dist.open_client("slurm"):
        pass
    spec, meta, labels, images = tiny_problem(sizes=SIZES)
    other = dist.ArchitectureSpec.from_name("convnet_gp", image_size=8, depth=3, kernel_size=3)
    with KernelStore.create(tmp_path / "k.h5", meta, labels, TILE) as store:
        with pytest.raises(ValueError, match="is not the store's"):
            dist.compute_store(store, other, images, progress=False)
        with pytest.raises(ValueError, match="has shape"):
            dist.compute_store(store, spec, {**images, "val": images["val"][:2]}, progress=False)


def test_blocks_share_one_model_per_architecture():
    """compute_block reuses one model per spec: torch.compile keys its graphs on the layer objects, so a fresh
    model per block would recompile every block."""
    from gpytorch_cnngp.distributed import ArchitectureSpec

    a = ArchitectureSpec.from_name("convnet_gp", image_size=8, depth=2)
    b = ArchitectureSpec.from_name("convnet_gp", image_size=8, depth=2)
    c = ArchitectureSpec.from_name("convnet_gp", image_size=8, depth=3)
    assert a.cached() is b.cached()
    assert c.cached() is not a.cached()
    assert a.build() is not a.cached()


def _kill_worker_process(client, which: int) -> int | None:
    import os
    import signal

    try:
        pids = sorted(client.run(os.getpid).values())
    except OSError:  # a worker is restarting: try again at the next block
        return None
    if not pids:
        return None
    victim = pids[which % len(pids)]
    os.kill(victim, signal.SIGKILL)
    return victim


def test_killed_workers_cost_only_their_blocks(tmp_path):
    # was: `--scheduler local --workers 2` and kill -9 of one worker: "lose scattered data, which can't be
    # recovered" and a raw traceback. Dask keeps one copy of scattered data, so the images go with the worker.
    sizes = {"n_train": 24, "n_val": 6, "n_test": 6}
    spec, meta, labels, images = tiny_problem(sizes=sizes)
    clean, path = tmp_path / "clean.h5", tmp_path / "dask.h5"
    with KernelStore.create(clean, meta, labels, 4) as store:
        dist.compute_store(store, spec, images, progress=False)
    lines: list[str] = []
    with dist.open_client("local", n_workers=2) as client, KernelStore.create(path, meta, labels, 4) as store:
        killed: list[int] = []
        committed = []

        def kill_some(block, seconds):
            committed.append(block)
            if len(killed) < 2 and len(committed) >= (5, 25)[len(killed)]:
                victim = _kill_worker_process(client, len(killed))
                if victim is not None:
                    killed.append(victim)

        report = dist.compute_store(
            store, spec, images, scheduler=client, progress=False, threads=1, on_block=kill_some, log=lines.append
        )
        assert len(killed) == 2 and len(set(killed)) == 2  # two worker processes died mid-run
    assert report.complete
    # a worker killed with blocks in flight costs those (resubmitted, with a line each); one caught idle costs none
    assert all("a Dask worker was lost" in line for line in lines)
    assert_same_store(path, clean)


@pytest.fixture
def thread_cluster():
    """A LocalCluster of two single-threaded workers in this process (fast to start, to close and to add to)."""
    import logging

    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        dashboard_address=None,
        worker_dashboard_address=None,
        silence_logs=logging.CRITICAL,
    )
    client = distributed.Client(cluster)
    try:
        yield cluster, client
    finally:
        client.close()
        cluster.close()


def _close_worker(cluster, name) -> None:
    """The worker ``name`` is gone at once, with the data it held (not retired: nothing is handed over)."""
    cluster.sync(cluster.workers[name].close)


def _lose_both_original_workers(tmp_path, cluster, client, *, add_at: int | None, rejoin_after: float | None, **kw):
    """Compute a store on ``client`` while both original workers are closed (after 4 and 10 committed blocks);
    a new worker is added after ``add_at`` blocks, or ``rejoin_after`` seconds after the last one is gone."""
    import threading

    sizes = {"n_train": 24, "n_val": 6, "n_test": 6}
    spec, meta, labels, images = tiny_problem(sizes=sizes)
    path = tmp_path / "dask.h5"
    originals = list(cluster.workers)
    committed: list = []

    def add_worker():
        cluster.scale(len(cluster.workers) + 1)

    def on_block(block, seconds):
        committed.append(block)
        if len(committed) == add_at:
            add_worker()
            client.wait_for_workers(3, timeout=30)
        if len(committed) == 4:
            _close_worker(cluster, originals[0])
        if len(committed) == 10:
            _close_worker(cluster, originals[1])
            if rejoin_after is not None:
                threading.Timer(rejoin_after, add_worker).start()

    lines: list[str] = []
    store = KernelStore.create(path, meta, labels, 4)
    try:
        report = dist.compute_store(
            store, spec, images, scheduler=client, progress=False, threads=1, on_block=on_block, log=lines.append, **kw
        )
    finally:
        done = store.entries()[0]
        store.close()
    return path, report, lines, done


@pytest.fixture(scope="module")
def reference_24(tmp_path_factory):
    spec, meta, labels, images = tiny_problem(sizes={"n_train": 24, "n_val": 6, "n_test": 6})
    path = tmp_path_factory.mktemp("ref") / "clean.h5"
    with KernelStore.create(path, meta, labels, 4) as store, one_thread():
        dist.compute_store(store, spec, images, progress=False)
    return path


@pytest.mark.parametrize("how", ["a new worker remains", "a new worker joins after the last is lost"])
def test_a_run_outlives_every_original_worker(tmp_path, thread_cluster, reference_24, how):
    # was: the second lost worker stopped the run after 120 s with a raw traceback ("the workers lost the
    # images ... No valid workers found")
    cluster, client = thread_cluster
    remains = how == "a new worker remains"
    path, report, lines, _ = _lose_both_original_workers(
        tmp_path, cluster, client, add_at=2 if remains else None, rejoin_after=None if remains else 0.5
    )
    assert report.complete
    assert any("images scattered again" in line for line in lines)  # the lost images were sent out again
    assert_same_store(path, reference_24)


def test_no_worker_left_is_one_clear_error_after_the_stated_wait(tmp_path, thread_cluster):
    cluster, client = thread_cluster
    with pytest.raises(dist.WorkersLost) as info:
        _lose_both_original_workers(tmp_path, cluster, client, add_at=None, rejoin_after=None, worker_wait=1.5)
    message = str(info.value)
    assert "every worker was lost" in message and "none joined within 1.5 s" in message and "\n" not in message
    assert "finished tiles are saved" in message
    assert isinstance(info.value, dist.SchedulerUnavailable)  # reported by `cnngp` in one line, exit status 1
    with KernelStore.open(tmp_path / "dask.h5") as store:
        assert store.entries()[0] > 0 and store.verify() == []  # the blocks finished before are kept


def test_cnngp_reports_lost_workers_in_one_line(tmp_path, thread_cluster, data_dir, capsys, monkeypatch):  # noqa: F811
    from gpytorch_cnngp import cli
    from gpytorch_cnngp.cli import commands

    cluster, client = thread_cluster
    originals, real = list(cluster.workers), commands.compute_store

    def both_workers_lost(*args, **kwargs):
        committed = []

        def on_block(block, seconds):
            committed.append(block)
            if len(committed) == 2:
                for name in originals:
                    _close_worker(cluster, name)

        return real(*args, on_block=on_block, **kwargs)

    monkeypatch.setattr(commands, "compute_store", both_workers_lost)
    out = tmp_path / "k.h5"
    argv = ["kernels", "--out", str(out), "--data-dir", str(data_dir), "--n-train", "12", "--n-val", "4"]
    argv += ["--n-test", "4", "--tile-size", "4", "--no-progress", "--scheduler", client.scheduler.address]
    assert cli.main([*argv, "--worker-wait", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cnngp: error: every worker was lost") and "none joined within 1 s" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with KernelStore.open(out) as store:
        assert store.entries()[0] > 0


def test_a_scheduler_without_workers_is_one_clear_error(tmp_path):
    import logging

    spec, meta, labels, images = tiny_problem(sizes=SIZES)
    cluster = distributed.LocalCluster(
        n_workers=0, processes=False, dashboard_address=None, silence_logs=logging.CRITICAL
    )
    try:
        with distributed.Client(cluster) as client, KernelStore.create(tmp_path / "k.h5", meta, labels, TILE) as store:
            with pytest.raises(dist.WorkersLost, match=r"there is no worker of the Dask scheduler at .* within 1 s"):
                dist.compute_store(store, spec, images, scheduler=client, progress=False, worker_wait=1)
    finally:
        cluster.close()
