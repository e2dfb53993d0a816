"""Random finite networks against their infinite-width kernel: the paper's convergence study.

For one of the paper's architectures (``--config``) we draw many random finite networks ``model.nn(C)``
at each width ``C`` (``--channels``, default 3 10 30 100), evaluate them on a few fixed MNIST test digits,
and compare their outputs with the CNN-GP kernel ``K = model(X)`` that the outputs should follow as
``C`` grows: a centred Gaussian with covariance ``K``.

What it shows
-------------
* ``scatter.png``: one column per width. Top row, the empirical second moments ``E[f(x_i) f(x_j)]``
  against the kernel ``K_ij`` (diagonal entries as squares, off-diagonal as dots, error bars of two
  Monte-Carlo standard errors, the line ``y = x``); middle row, the same divided by
  ``sqrt(K_ii K_jj)`` (scale-free: the diagonal's kernel value is 1); bottom row, the empirical
  correlations ``S_ij / sqrt(S_ii S_jj)`` against the kernel's (off-diagonal only). Every panel takes
  its axis limits from the points it plots (min and max of kernel and empirical values, plus a 5% margin;
  long error bars may run off the panel) and uses log axes only when all values are positive and span
  more than a decade, so no point is ever outside the axes (the paper's own plot came out empty for
  covariances below 1; the ConvNet GP's kernel is ~1e12 here).
* ``qq.png``: one panel per width, QQ plots of the standardised outputs ``f(x_i) / sqrt(K_ii)`` against
  the standard normal for a few images (at infinite width they lie on ``y = x``). At finite width an
  output is Gaussian *given* the hidden layers, with a random variance, so narrow networks show heavy
  tails (an S-shaped QQ plot).
* ``error_vs_width.png``: the errors below against ``C`` on log-log axes, with a ``1/C`` reference line
  (the expected rate of the finite-width bias) and the Monte-Carlo standard error (the noise floor).
* ``summary.json`` and ``summary.md``: per width,

  - second moments: max and mean of ``|S_ij - K_ij| / sqrt(K_ii K_jj)`` (diagonal and off-diagonal
    separately) and the mean Monte-Carlo standard error on the same scale, and the largest ``|z|``,
    ``z = (S_ij - K_ij) / SE``;
  - correlations: max and mean ``|rho_ij - rho^K_ij|`` off the diagonal, with jackknife standard errors;
  - Gaussianity: the Kolmogorov-Smirnov statistic (and p-value) of each image's standardised outputs
    against N(0, 1), the 5% critical value, and the excess kurtosis (0 for a Gaussian).

Statistics
----------
A network with ``O`` output channels (``--out-channels``) gives ``S_m = f_m f_m^T / O``; its ``O`` outputs
are independent given the hidden layers, but share them, so *networks* are the independent units: ``S``
is the mean of ``S_m`` over the ``M`` networks and its standard error is their standard deviation over
``sqrt(M)``. Correlations are those of the pooled ``S`` (a ratio of means, bias O(1/M)) with jackknife
standard errors over networks. The QQ plots and the KS / kurtosis statistics use the first output of
each network only, so their ``M`` samples are independent. Networks run in float32 (accumulated in
float64), the kernel in float64.

What to expect: the ConvNet GP's diagonal is exact in expectation at every width (every ReLU acts on a
conv output, a centred Gaussian given the layers below), so its diagonal error is pure Monte-Carlo
noise; off the diagonal the error has an O(1/C) bias. The ResNet GP's identity skips feed ReLUs, so its
diagonal carries an O(1/C) bias too. The Residual CNN GP sums branches *after* a ReLU, so its finite
network does **not** converge to its kernel: its errors stay of order one at every width (see
``tests/test_monte_carlo.py``).

How to run
----------
::

    python experiments/random_nn.py                          # ConvNet GP, 28x28, C = 3 10 30 100
    python experiments/random_nn.py --config resnet32_gp     # ResNet GP (about 4 minutes)
    python experiments/random_nn.py --config residual_cnn_gp # the non-convergent case
    python experiments/random_nn.py --quick                  # smoke run: 8x8 images, C = 3 10, seconds
    python experiments/random_nn.py --image-size 14 --n-networks 1000 --channels 3 10 30 100 300

The default (8 MNIST test digits at 28x28, 300 networks per width, 16 outputs each) took about 4 minutes for
the ConvNet GP and for the ResNet GP, and 1.5 minutes for the Residual CNN GP, on 2 busy CPU cores (one
thread); almost all of it is the widest width, whose cost grows like C^2. Results go to
``experiments/output/random_nn/<config>/`` (``--out``); ``summary.json``, ``summary.md`` and the plots
are rewritten after each width finishes, so an interrupted run keeps every finished width.

Layout
------
This file is the command line only (``build_parser``, ``main``); the work lives in the sibling package
``experiments/random_nn_study/``: ``sampling`` (images, network outputs), ``statistics`` (``analyse``), ``plots``
(figures, ``data_limits``) and ``report`` (``summary.json``, ``summary.md``, plots on disk). ``experiments/`` is
not an installed package (only ``gpytorch_cnngp*`` is), so before importing ``random_nn_study`` the script puts
its own folder first on ``sys.path`` unless it is there already. That finds the package however the script is
started: ``python experiments/random_nn.py`` from any working directory (Python has then already put the folder
there) and a load by file location (``importlib.util.spec_from_file_location``, as
``tests/test_random_nn_script.py`` does), which adds nothing to ``sys.path`` by itself. ``python -m`` would
instead work only from the repository root.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpytorch_cnngp import architectures
from gpytorch_cnngp.cli import _positive_int

# experiments/ is not an installed package: find the sibling package random_nn_study from here (see "Layout" above)
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from random_nn_study.report import write_outputs  # noqa: E402
from random_nn_study.sampling import load_images, sample_outputs  # noqa: E402
from random_nn_study.statistics import analyse  # noqa: E402

DEFAULT_CONFIG = "convnet_gp"
DEFAULT_CHANNELS = (3, 10, 30, 100)
DEFAULT_N_IMAGES = 8
DEFAULT_N_NETWORKS = 300
DEFAULT_OUT_CHANNELS = 16
DEFAULT_IMAGE_SIZE = 28
DEFAULT_SEED = 0
#: what ``--quick`` changes (each only where the option is not given explicitly)
QUICK = {"image_size": 8, "channels": [3, 10], "n_networks": 40, "n_images": 4}

OUTPUT_ROOT = Path(__file__).resolve().parent / "output" / "random_nn"

# ----------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Outputs of many random finite networks (model.nn) against the CNN-GP kernel: scatter and QQ "
        "plots and numeric summaries, per width C.",
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"architecture (default {DEFAULT_CONFIG}), one of: {', '.join(architectures.ARCHITECTURES)}",
    )
    p.add_argument(
        "--channels",
        type=_positive_int,
        nargs="+",
        default=None,
        help=f"widths C (default {' '.join(map(str, DEFAULT_CHANNELS))})",
    )
    p.add_argument(
        "--n-images",
        type=_positive_int,
        default=None,
        help=f"first MNIST test digits used (default {DEFAULT_N_IMAGES})",
    )
    p.add_argument(
        "--n-networks",
        type=_positive_int,
        default=None,
        help=f"random networks per width (default {DEFAULT_N_NETWORKS}: about 4 min for convnet_gp on 2 CPU cores)",
    )
    p.add_argument(
        "--out-channels",
        type=_positive_int,
        default=DEFAULT_OUT_CHANNELS,
        help="outputs per network (independent given its hidden layers; default %(default)s)",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help=f"images are area-downscaled to this size (default {DEFAULT_IMAGE_SIZE})",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default experiments/output/random_nn/<config>)"
    )
    p.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="width C uses seed * 1000003 + C (default %(default)s)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + " (explicit options win)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device for networks and kernel: cpu, cuda, cuda:1, ... (default %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads (default %(default)s: fastest for many small networks on a shared machine)",
    )
    p.add_argument(
        "--qq-images", type=_positive_int, default=4, help="images shown in each QQ panel (default %(default)s)"
    )
    p.add_argument(
        "--images-npz",
        default=None,
        help="take the digits from this .npz's test_images (e.g. tests/data/mnist_sample.npz) instead of MNIST",
    )
    p.add_argument("--data-dir", default=None, help="MNIST data folder (default: $CNNGP_DATA or the user cache)")
    p.add_argument("--save-outputs", action="store_true", help="also save the raw network outputs as outputs.npz")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    defaults = {
        "image_size": DEFAULT_IMAGE_SIZE,
        "channels": list(DEFAULT_CHANNELS),
        "n_networks": DEFAULT_N_NETWORKS,
        "n_images": DEFAULT_N_IMAGES,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    if args.config not in architectures.ARCHITECTURES:
        parser.error(f"unknown --config {args.config!r}; choose one of: {', '.join(architectures.ARCHITECTURES)}")
    if args.n_networks < 2:
        parser.error("--n-networks must be at least 2 (standard errors need two networks)")
    if args.n_images < 2:
        parser.error("--n-images must be at least 2 (off-diagonal entries need two images)")
    args.channels = sorted(set(args.channels))
    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"bad --device {args.device!r}: {exc}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} requested but CUDA is not available")
    if args.out is None:
        args.out = OUTPUT_ROOT / args.config
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study; returns the summary (also written to ``<out>/summary.json``)."""
    parser = build_parser()
    args = _resolve(parser.parse_args(argv), parser)
    try:
        model = architectures.ARCHITECTURES[args.config](image_size=args.image_size)
    except ValueError as exc:
        parser.error(f"--config {args.config} with --image-size {args.image_size}: {exc}")
    started = time.perf_counter()
    images = load_images(args.n_images, args.image_size, args.images_npz, args.data_dir)
    x = images["x"]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    threads = torch.get_num_threads()
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        model = model.to(args.device)
        t = time.perf_counter()
        with torch.no_grad():
            K = model(x.to(args.device)).to(device="cpu", dtype=torch.float64)
        kernel_seconds = time.perf_counter() - t
        if not torch.isfinite(K).all() or not (K.diagonal() > 0).all():
            raise RuntimeError(f"kernel has non-finite or non-positive diagonal entries:\n{K}")
        Kn = K.numpy()
        summary: dict[str, Any] = {
            "config": args.config,
            "image_size": args.image_size,
            "n_images": args.n_images,
            "image_source": images["source"],
            "image_indices": images["indices"],
            "image_labels": images["labels"],
            "out_channels": args.out_channels,
            "n_networks": args.n_networks,
            "channels": args.channels,
            "seed": args.seed,
            "device": str(args.device),
            "threads": args.threads if args.device.type == "cpu" else None,
            "quick": args.quick,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
            "kernel": Kn.tolist(),
            "kernel_diag": Kn.diagonal().tolist(),
            "kernel_seconds": kernel_seconds,
            "results": [],
            "complete": False,
            "pending_channels": list(args.channels),
            "plot_errors": [],
            "seconds": 0.0,
        }
        print(
            f"{args.config}: {args.n_images} images at {args.image_size}x{args.image_size}, kernel diagonal "
            f"{Kn.diagonal().min():.3g}..{Kn.diagonal().max():.3g} ({kernel_seconds:.1f} s); widths {args.channels}, "
            f"{args.n_networks} networks each; writing to {out}",
            flush=True,
        )
        standardised: dict[int, np.ndarray] = {}
        raw: dict[str, np.ndarray] = {}
        d = np.sqrt(Kn.diagonal())
        for C in args.channels:
            t = time.perf_counter()
            f = sample_outputs(
                model,
                x,
                C,
                args.n_networks,
                args.out_channels,
                args.seed * 1000003 + C,
                args.device,
                progress=not args.no_progress,
            )
            r = {"channels": C, "n_networks": args.n_networks, **analyse(f, K)}
            r["seconds"] = time.perf_counter() - t
            standardised[C] = f[:, :, 0].numpy() / d
            summary["results"].append(r)
            summary["pending_channels"].remove(C)
            summary["complete"] = not summary["pending_channels"]
            summary["seconds"] = time.perf_counter() - started
            if args.save_outputs:
                raw[f"C{C}"] = f.to(torch.float32).numpy()
                np.savez(out / "outputs.npz", kernel=Kn, **raw)
            write_outputs(summary, standardised, out, Kn, args.qq_images)
            m, c, g = r["second_moment"], r["correlation"], r["gaussianity"]
            print(
                f"C={C}: second moments max rel. err diag {m['max_rel_err_diag']:.4f} "
                f"off {m['max_rel_err_offdiag']:.4f} "
                f"(SE {m['mean_rel_se']:.4f}); correlations max err {c['max_abs_err']:.4f} (SE {c['mean_se']:.4f}); "
                f"KS mean {g['ks_statistic_mean']:.3f} (5% crit {g['ks_critical_5pct']:.3f}); "
                f"excess kurtosis {g['excess_kurtosis_mean']:.2f}; {r['seconds']:.1f} s",
                flush=True,
            )
    finally:
        torch.set_num_threads(threads)
    print(f"done in {summary['seconds']:.0f} s: {out}", flush=True)
    return summary


if __name__ == "__main__":
    main()
