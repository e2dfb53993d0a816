"""Smoke test of ``experiments/random_nn.py`` (the finite-network convergence study) in ``--quick`` mode.

The script is the command line (``main``); it puts ``experiments/`` on ``sys.path`` and imports the sibling package
``random_nn_study`` (``sampling``, ``statistics``, ``plots``, ``report``), whose modules the tests then import.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "random_nn.py"
SAMPLE = Path(__file__).parent / "data" / "mnist_sample.npz"

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")


def load_script():
    spec = importlib.util.spec_from_file_location("random_nn_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_study_module(name: str):
    """``random_nn_study.<name>``, found as the script finds it (loading the script puts its folder on sys.path)."""
    load_script()
    return importlib.import_module(f"random_nn_study.{name}")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def all_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from all_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from all_numbers(v)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield obj


def test_quick_run_writes_plots_and_summary(tmp_path):
    script = load_script()
    out = tmp_path / "out"
    argv = ["--quick", "--image-size", "8", "--channels", "3", "10", "--n-networks", "30", "--out", str(out)]
    summary = script.main([*argv, "--images-npz", str(SAMPLE), "--no-progress"])

    for name in ("scatter.png", "qq.png", "error_vs_width.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 5_000, f"{name} missing or nearly empty"
        width, height = png_size(path)
        assert width >= 300 and height >= 200
    assert (out / "summary.md").read_text().count("\n| ") == 3  # header and one row per width

    written = json.loads((out / "summary.json").read_text())
    assert written["complete"] and written["pending_channels"] == [] and written["plot_errors"] == []
    assert written["config"] == "convnet_gp" and written["image_size"] == 8
    assert [r["channels"] for r in written["results"]] == [3, 10] == [r["channels"] for r in summary["results"]]
    for r in written["results"]:
        assert r["n_networks"] == 30
        for section, keys in {
            "second_moment": ("max_rel_err", "mean_rel_err", "max_rel_err_diag", "max_rel_err_offdiag", "mean_rel_se"),
            "correlation": ("max_abs_err", "mean_abs_err", "mean_se"),
            "gaussianity": ("ks_statistic_max", "ks_statistic_mean", "ks_pvalue_min", "ks_critical_5pct"),
        }.items():
            for key in keys:
                assert math.isfinite(r[section][key]), f"{section}.{key} = {r[section][key]}"
        assert 0 < r["gaussianity"]["ks_statistic_max"] <= 1
    numbers = list(all_numbers(written))
    assert numbers and all(math.isfinite(v) for v in numbers)
    # kernel entries are on the ConvNet GP's scale (~1e11), yet the normalised errors are O(1) at most
    assert min(written["kernel_diag"]) > 1e9
    assert all(r["correlation"]["max_abs_err"] < 1 for r in written["results"])


def test_limits_contain_the_data():
    plots = load_study_module("plots")
    lo, hi, log = plots.data_limits([[2e12, 3e12], [2.5e12]])
    assert not log and lo < 2e12 and hi > 3e12
    lo, hi, log = plots.data_limits([[1e-3, 0.5]])  # below 1 and spanning decades: log axes, nothing clipped
    assert log and 0 < lo < 1e-3 and hi > 0.5
    lo, hi, log = plots.data_limits([[-0.2, 0.7]])
    assert not log and lo < -0.2 and hi > 0.7


def test_bad_config_is_a_clear_error(capsys):
    script = load_script()
    with pytest.raises(SystemExit):
        script.main(["--config", "no_such_net", "--quick"])
    assert "convnet_gp" in capsys.readouterr().err
