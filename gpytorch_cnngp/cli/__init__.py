"""The ``cnngp`` command: data, resumable kernel stores, the classifier and the paper's MNIST table.

    cnngp table                      # the ConvNet GP on a small MNIST subset (a few minutes on 2 CPU cores)
    cnngp table --full               # the paper's setting: 50k train, 10k validation, 10k test (use a GPU)
    cnngp data                       # fetch and verify MNIST
    cnngp kernels --config convnet_gp --n-train 1000 --n-val 500 --n-test 500 --out k.h5   # resumable
    cnngp classify k.h5

Every long step shows a progress bar with its rate and ETA. A kernel run that is interrupted (Ctrl-C, kill -9,
a crash) is resumed by running the same command again.

One job per module; each imports only the ones listed below it:

- here: ``main`` (exit statuses and one-line errors), and the names other code imports from ``gpytorch_cnngp.cli``
- ``parser``: the argparse parser, its options and argument types; it binds each subcommand to its function
- ``commands``: the subcommands ``data``, ``kernels``, ``classify`` and ``table``, and the steps they share (load the
  split, compute or resume a store, check it, classify)
- ``policy``: the choices made for the user: torch threads, the blocks' backend (asked of ``backends.choose``
  by ``_block_backend``), the tile size, the stores' names, the checks made before any work (disk, memory budget,
  writable folders, jitter), peak memory
- ``render``: status lines, seconds/counts/percentages, the markdown results table, ``results.json`` (rewritten
  under a lock) and the dual coefficients; every result file is written atomically
- ``defaults``: the subset sizes, the paper's configurations, the default names and the paper-scale store folder
- ``errors``: ``UserError``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from .. import settings
from ..classify import CholeskyFailed
from ..datasets import DatasetError
from ..distributed import SchedulerUnavailable
from ..store import StoreError
from .defaults import DEFAULT_SUBSET, FULL_SUBSET, PAPER_CONFIGS, paper_store_dir  # noqa: F401
from .errors import UserError
from .parser import _positive_int, build_parser  # noqa: F401
from .render import _DATA_NAMES, _PAPER_NAMES  # noqa: F401

# re-exported: the constants and paper_store_dir for callers, _positive_int for experiments/random_nn.py,
# _PAPER_NAMES and _DATA_NAMES for experiments/pooled_mnist.py

__all__ = ["main", "DEFAULT_SUBSET", "FULL_SUBSET", "build_parser"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cnngp`` with ``argv`` (default: the command line); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command is None:
        parser.print_help()
        return 2
    threads = torch.get_num_threads()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ncnngp: interrupted; finished tiles are saved, run the same command again to resume", file=sys.stderr)
        return 130
    except (UserError, DatasetError, StoreError, CholeskyFailed, SchedulerUnavailable, ValueError, OSError) as exc:
        if settings.traceback.value():
            raise
        print(f"cnngp: error: {exc}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger program (tests, notebooks)
