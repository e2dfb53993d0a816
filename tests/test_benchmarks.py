"""Smoke runs of the benchmark scripts: tiny sizes, so CI checks that they run and write their tables.

The figures themselves are measured by running the scripts in full (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _bench_kernels(tmp_path: Path, *extra: str) -> str:
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--archs", "convnet_gp"]
    cmd += ["--dtypes", "float64", "--methods", "naive", "eager", "--n", "3", "--repeats", "2", "--out", str(out)]
    proc = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


def test_bench_kernels_writes_its_table(tmp_path):
    text = _bench_kernels(tmp_path)
    assert "### Kernel throughput (" in text
    assert "| convnet_gp | float64 | naive | 3x3 |" in text
    assert "| convnet_gp | float64 | eager | 3x3 |" in text


def test_bench_kernels_interleaved_writes_ratios(tmp_path):
    text = _bench_kernels(tmp_path, "--interleave")
    assert "methods interleaved" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| convnet_gp")]
    assert [r[3].strip() for r in rows] == ["naive", "eager"]
    assert float(rows[0][6]) == 1.0  # the straightforward path against itself
    assert float(rows[1][6]) > 0.0


def test_bench_gpu_smoke_on_cpu(tmp_path):
    # the accelerator benchmark's code path, run on the CPU at a tiny size; its correctness check
    # against eager float64 runs inside the script and fails it on a mismatch
    out = tmp_path / "gpu.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--n", "24"]
    cmd += ["--archs", "convnet_gp", "resnet32_gp", "pooled_cnn_gp", "--rows", "24", "8", "8"]
    cmd += ["--warmup", "8", "--check", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("ConvNet GP", "24 x 24"),
        ("ResNet-32 GP", "8 x 24"),
        ("Pooled CNN GP", "8 x 24"),
    ]
    assert all(float(r[8]) < 1e-4 for r in rows)
    assert "(measured)" in rows[0][5] and "(projected)" in rows[1][5]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_bench_gpu_refuses_missing_cuda():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--n", "8", "--no-write"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_bench_solve_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_solve.py"), "--smoke", "--store-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 600 |")]
    assert len(set(rows)) == 2 and "| disk |" in rows[0] and "| yes |" in rows[0]  # printed, then in the table


def test_bench_crossover_smoke():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_crossover.py"), "--smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {line for line in proc.stdout.splitlines() if line.startswith("| convnet_gp | float32 |")}
    assert len(rows) == 3  # eager against native at 1 x 1 and 2 x 2; the defaults against native at 4 x 4
    assert any("| 4 x 4 |" in row and "entries/s" in row for row in rows)


def test_bench_store_write_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_store_write.py"), "--smoke", "--no-write"]
    out = subprocess.run(cmd + ["--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| upper (now) |" in out.stdout and "| upper+transpose (before) |" in out.stdout
    assert not list(tmp_path.iterdir())  # the store is removed


def test_bench_kernel_ab_smoke(tmp_path):
    """Two builds of the native kernel timed in one process (here HEAD's source against the working tree's)."""
    from gpytorch_cnngp.backends import native

    if native.load_library() is None:  # pragma: no cover - no C++ compiler here
        pytest.skip("the native kernel is not available here")
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_kernel_ab.py"), "--old", "HEAD", "--archs", "convnet_gp"]
    cmd += ["--dtypes", "float64", "--n", "8", "--rounds", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "### Native kernel sources A/B in one process" in text
    row = next(line for line in text.splitlines() if line.startswith("| convnet_gp | float64 | forward |"))
    assert float(row.split("|")[6]) > 0.0


def test_bench_revisions_call_by_call_smoke(tmp_path):
    """Two revisions' workers (here HEAD against the working tree) take turns, call by call."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_revisions.py"), "--old", "HEAD", "--calls", "3"]
    cmd += ["--n", "2", "--archs", "convnet_gp", "--dtypes", "float64", "--methods", "eager", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "### Speed before and after a change, call by call" in text
    row = next(line for line in text.splitlines() if line.startswith("| convnet_gp | float64 | eager |"))
    cells = [c.strip() for c in row.split("|")]
    assert float(cells[6]) > 0.0 and "-" in cells[7]  # the median ratio and its quartiles


def test_bench_pooling_smoke(tmp_path):
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_pooling.py"), "--cases", "pooled_cnn_gp", "--size", "8"]
    cmd += ["--n", "2", "--repeats", "1", "--dtype", "float64", "--paths", "full", "offsets", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| pooled_cnn_gp")]
    assert [r[2].strip() for r in rows] == ["full", "offsets"]
    assert all(float(r[6]) < 1e-12 for r in rows)  # both paths give the same kernel


def test_bench_elementwise_writes_its_table(tmp_path):
    out = tmp_path / "elementwise.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_elementwise.py"), "--n", "3", "--n-rule", "1"]
    cmd += ["--degree", "6", "--rounds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [(r[1].strip(), r[2].strip(), r[3].strip()) for r in rows] == [
        ("Erf (closed form)", "NNGP", "3 x 3"),
        ("Erf (closed form)", "NNGP + NTK", "3 x 3"),
        ("Elementwise(erf), series of 6", "NNGP", "3 x 3"),
        ("Elementwise(erf), series of 6", "NNGP + NTK", "3 x 3"),
        ("product rule, 6^2 nodes", "NNGP", "1 x 1"),
        ("product rule, 6^2 nodes", "NNGP + NTK", "1 x 1"),
    ]
    assert all(float(r[5]) == 1.0 for r in rows[:2])  # the closed form against itself
    assert all(0 < float(r[6]) < 0.05 for r in rows[2:])  # six terms: close to the closed form, not equal
