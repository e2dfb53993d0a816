"""The worked README example (``notebooks/readme_example.py``) runs as written and classifies MNIST digits.

It runs at its published sizes (256 training and 200 test digits of the ``mnist_as_tf`` split, three Adam
steps; about 40 s on two CPU cores), so the test checks exactly the code readers copy. It loads real MNIST,
which ``gpytorch_cnngp.datasets`` downloads (and verifies) on first use.

The bound on the test error: the example printed 0.140 (28 of 200 digits wrong) when it was written. The
data and the computation are deterministic, so only floating-point differences between platforms can move it
by a digit or two. 0.2 leaves room for 12 more mistakes and still fails when the kernel is broken (chance is
0.9) or degenerate: a ConvNet GP shrunk to a nearly constant kernel, as ML-II without an output scale does,
misclassified 29% of validation digits noise-free and 81% with its learned noise in our runs.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "notebooks" / "readme_example.py"
ERROR_BOUND = 0.2


def test_readme_example_trains_and_classifies(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"^step \d+: loss (-?[0-9.]+)", out, flags=re.MULTILINE)]
    assert len(losses) == 3, out
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), f"the loss did not decrease: {losses}"
    match = re.search(r"^test error: ([0-9.]+)$", out, flags=re.MULTILINE)
    assert match, out
    assert float(match.group(1)) < ERROR_BOUND, out
