"""What committing a tile to a kernel store costs, next to what computing it costs.

A store of ``n`` training images (``Kxx`` of ``4 n^2`` bytes, float32) is created under ``--dir`` and its file
evicted from the page cache; then ``--tiles`` off-diagonal ``Kxx`` tiles spread over the matrix are committed
with :meth:`KernelStore.write_block` (values, checksum, ``fsync``, completion byte, ``fsync``), one after the
other, timed per tile:

* ``upper``: the store as it is (only the tiles on and above the diagonal are written);
* ``upper+transpose``: the same, plus the tile's transpose written below the diagonal, the layout a full
  matrix would need (a column of scattered small writes per tile).

The cost is set beside the compute time of one tile at ``--rate`` kernel entries per second (the native
ConvNet GP's rate on this machine kind). Since :func:`gpytorch_cnngp.distributed.compute_store` commits in a
thread of its own, what remains of this cost is hidden behind the next tile's computation as long as it is
smaller.

    python benchmarks/bench_store_write.py                      # n = 32768, tile 256, 300 tiles
    python benchmarks/bench_store_write.py --smoke --no-write   # tiny, for the tests

Results are appended to ``benchmarks/RESULTS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_kernels import machine, report  # noqa: E402


def measure(folder: Path, n: int, tile: int, n_tiles: int, transpose: bool) -> list[float]:
    """Seconds per committed tile."""
    from gpytorch_cnngp.store import KernelStore, StoreMeta

    path = folder / f"write_{'t' if transpose else 'u'}.h5"
    path.unlink(missing_ok=True)
    meta = StoreMeta(
        architecture="bench", hyperparameters={}, dtype="float32", dataset="none", split="none", n_train=n, n_val=1,
        n_test=1,
    )  # fmt: skip
    labels = {"train": np.zeros(n, int), "val": np.zeros(1, int), "test": np.zeros(1, int)}
    values = np.random.default_rng(0).random((tile, tile), dtype=np.float32)
    times = []
    try:
        with KernelStore.create(path, meta, labels, tile) as store:
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # as a store larger than the page cache
            os.close(fd)
            blocks = [b for b in store.blocks("Kxx") if b.index[0] != b.index[1]]
            chosen = blocks[:: max(1, len(blocks) // n_tiles)][:n_tiles]
            kxx = store._file["Kxx"] if transpose else None
            for block in chosen:
                t0 = time.perf_counter()
                if kxx is not None:  # the full layout: the transpose too, before the commit's fsyncs
                    (r0, r1), (c0, c1) = block.rows, block.cols
                    kxx[c0:c1, r0:r1] = values.T
                    store._stamp = store._file_stamp()  # a write of the store's own, not another program's
                store.write_block(block, values)
                times.append(time.perf_counter() - t0)
    finally:
        path.unlink(missing_ok=True)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32768, help="training images of the store (Kxx is 4 n^2 bytes)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--tiles", type=int, default=300, help="tiles committed per layout")
    p.add_argument("--rate", type=float, default=260e3, help="kernel entries per second of the computation")
    p.add_argument("--dir", default=None, help="folder for the store (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="n = 512, tile 64, 20 tiles")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.tile, args.tiles = 512, 64, 20
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {}
        for transpose in (False, True, False, True):  # alternated, so that drifts in the disk's speed show
            results.setdefault(transpose, []).extend(measure(Path(tmp), args.n, args.tile, args.tiles, transpose))
    compute = args.tile**2 / args.rate
    lines = [
        f"## Committing a tile (benchmarks/bench_store_write.py), {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {machine()}. Store of n = {args.n} (Kxx {4 * args.n**2 / 1e9:.2f} GB, evicted from the page "
        f"cache first), tiles of {args.tile}, {2 * args.tiles} commits per layout in two alternated rounds.",
        "",
        "| layout | median ms/tile | min | max | vs computing one tile |",
        "|---|---:|---:|---:|---:|",
    ]
    for transpose, name in ((False, "upper (now)"), (True, "upper+transpose (before)")):
        ms = [t * 1e3 for t in results[transpose]]
        med = statistics.median(ms)
        lines.append(
            f"| {name} | {med:.1f} | {min(ms):.1f} | {max(ms):.1f} | {med / (compute * 1e3):.2f}x of "
            f"{compute * 1e3:.0f} ms |"
        )
    report(lines, args)


if __name__ == "__main__":
    main()
