"""The argument parser of ``cnngp``: its subcommands, their options and the argument types; each subcommand is
bound to its function in ``commands``."""

from __future__ import annotations

import argparse
import math
import os

from .. import __version__
from ..architectures import ARCHITECTURES
from ..datasets import DATASETS, SPLITS
from ..distributed import DEFAULT_WORKER_WAIT, check_scheduler
from ..memory import parse_bytes
from ..ridge import MAX_RIDGE
from .commands import _cmd_classify, _cmd_data, _cmd_kernels, _cmd_table
from .defaults import DEFAULT_CONFIG, DEFAULT_SPLIT, DEFAULT_SUBSET, DEFAULT_WORKDIR


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (``what`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        return value

    return parse


def _memory_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_positive_int = _int_at_least(1, "positive")

_count = _int_at_least(0, "non-negative")

THREADS_PER_CPU = 4
"""``--threads`` may ask for at most this many threads per CPU of the machine: more only slows the kernels
down, and very many (thousands) crash the OpenMP runtime."""

MAX_TRIES = 11
"""The most jitter retries: the 11th adds the mean diagonal of ``Kxx`` itself (``10^(k-11)`` times it); a matrix
that fails with that much has something wrong in it that more jitter would only hide."""


def _threads(text: str) -> int:
    value = _positive_int(text)
    cpus = os.cpu_count() or 1
    if value > THREADS_PER_CPU * cpus:
        raise argparse.ArgumentTypeError(
            f"at most {THREADS_PER_CPU * cpus} threads ({THREADS_PER_CPU} per CPU of this machine's {cpus}), "
            f"got {value}"
        )
    return value


def _max_tries(text: str) -> int:
    value = _count(text)
    if value > MAX_TRIES:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_TRIES} (the last retry already adds the mean diagonal of Kxx), got {value}"
        )
    return value


def _number(text: str) -> float:
    """``float(text)``, or NaN for text that is not a number (the callers refuse both alike)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _jitter(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _ridge(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value) or not 0 <= value <= MAX_RIDGE:
        raise argparse.ArgumentTypeError(
            f"expected a ridge term from 0 to {MAX_RIDGE:g} (times the mean diagonal of Kxx), got {text!r}"
        )
    return value


def _seconds(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _device(text: str) -> str:
    """A device name; ``cpu:N`` is the CPU (torch has one CPU device), so it behaves as ``cpu`` everywhere.
    Other names are checked (and unavailable devices refused) before any work by the commands."""
    head, _, index = text.strip().partition(":")
    return "cpu" if head == "cpu" and (not index or index.isdigit()) else text


def _scheduler(text: str) -> str:
    try:
        check_scheduler(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: options whose help does not state it get ``(default: X)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings or action.required:
            return text
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


def _add_common(p: argparse.ArgumentParser, *, kernels: bool, solve: bool) -> None:
    p.add_argument("--data-dir", help="data folder (default: $CNNGP_DATA or ~/.cache/gpytorch_cnngp)")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars (default: progress bars shown)"
    )
    if kernels:
        p.add_argument("--dataset", default="mnist", choices=DATASETS, help="data set (default: %(default)s)")
        p.add_argument(
            "--split", default=DEFAULT_SPLIT, choices=tuple(SPLITS), help="data split (default: %(default)s)"
        )
        p.add_argument(
            "--device",
            default="auto",
            type=_device,
            help="where kernel blocks run: auto (GPU when present), cpu, cuda, cuda:1 (default: %(default)s)",
        )
        p.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "float64"),
            help="kernel dtype (default: %(default)s, as published; the solve is always float64)",
        )
        p.add_argument(
            "--tile-size",
            type=_positive_int,
            default=None,
            help="edge of the stored blocks, the unit of checkpointing and distribution (default: 256 on CPU, "
            "2048 on GPU; a resumed store keeps its own)",
        )
        p.add_argument(
            "--scheduler",
            default="sync",
            type=_scheduler,
            help="sync (in-process, default), local (a local Dask cluster of --workers processes), or the address "
            "of a running Dask scheduler, e.g. tcp://host:8786 (each worker needs this package; one GPU per worker)",
        )
        p.add_argument(
            "--workers",
            type=_positive_int,
            default=None,
            help="workers of --scheduler local (default: one per CPU core, at most 4)",
        )
        p.add_argument(
            "--worker-wait",
            type=_seconds,
            default=DEFAULT_WORKER_WAIT,
            metavar="SECONDS",
            help="on a Dask cluster, how long a run whose workers were all lost waits for one to join before it stops "
            "(its finished tiles saved) (default: %(default)g)",
        )
        p.add_argument(
            "--repair",
            action="store_true",
            help="when a resumed store has damaged tiles (checksum mismatch, NaN or inf), compute just those again "
            "(and write damaged labels again from the data set) instead of refusing the store (default: off, a "
            "damaged store is refused)",
        )
        p.add_argument(
            "--threads",
            type=_threads,
            default=None,
            help=f"torch CPU threads of an in-process run, at most {THREADS_PER_CPU} per CPU (default: all cores for "
            "the native kernel; otherwise all cores if a timed start shows them 1.5 times faster than one thread, "
            "else 1, since on a CPU shared with other work one eager thread is often much faster)",
        )
        p.add_argument(
            "--backend",
            default="auto",
            choices=("auto", "eager", "inductor", "native"),
            help="how kernel blocks run: auto (default): the native CPU kernel where the network allows it, "
            "torch.compile for large blocks of networks without pooling (GPUs), else eager; eager: plain torch; "
            "inductor: torch.compile; native: the native CPU kernel (an error where it cannot run the network)",
        )
    if kernels or solve:
        uses = {
            (True, False): "the kernel engine's memory per block (default: $CNNGP_MEMORY_BUDGET, else a quarter of "
            "the machine's memory up to 4 GiB, 60%% of a GPU's free memory)",
            (False, True): "the classifier's memory (default: 60%% of the memory available now)",
            (True, True): "the kernel engine's memory per block and the classifier's (default: the engine's own, "
            "and 60%% of the memory available now for the classifier)",
        }[(kernels, solve)]
        p.add_argument(
            "--memory-budget",
            type=_memory_size,
            default=None,
            metavar="SIZE",
            help=f"{uses}; e.g. 2GB, 512MB, 4GiB (B/KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)",
        )
    if solve:
        p.add_argument(
            "--scratch-dir",
            default=None,
            help="folder for the classifier's factor when it does not fit the budget (default: STORE.factor beside "
            "the store; it needs about 4 n^2 bytes of disk and is deleted when done)",
        )
        p.add_argument(
            "--solve-device",
            default="auto",
            type=_device,
            help="where the classifier runs: auto (GPU when present), cpu, cuda (default: %(default)s)",
        )
        p.add_argument(
            "--jitter",
            type=_jitter,
            default=0.0,
            help="first jitter added to the diagonal of Kxx, a finite number from 0 up to the mean of that diagonal "
            "(default: %(default)s, as published)",
        )
        p.add_argument(
            "--max-tries",
            type=_max_tries,
            default=8,
            help=f"retries when the Cholesky factorisation fails, with jitter 1e-10, 1e-9, ... times the mean diagonal "
            f"of Kxx; at most {MAX_TRIES} (default: %(default)s)",
        )
        p.add_argument(
            "--ridge",
            type=_ridge,
            nargs="+",
            default=None,
            metavar="LAMBDA",
            help="ridge terms added to the diagonal of Kxx, times its mean, e.g. --ridge 0 1e-4 1e-3; with several, "
            "the one with the lowest validation error is kept (the smallest when tied) and the test images are "
            "predicted from it alone; one Cholesky factorisation each (default: none, the paper's noise-free "
            "classifier with --jitter)",
        )
        p.add_argument("--variances", action="store_true", help="also compute predictive variances (default: off)")


def _add_sizes(p: argparse.ArgumentParser) -> None:
    d = DEFAULT_SUBSET
    p.add_argument("--n-train", type=_positive_int, default=None, help=f"training images (default: {d['n_train']})")
    p.add_argument("--n-val", type=_count, default=None, help=f"validation images (default: {d['n_val']})")
    p.add_argument("--n-test", type=_count, default=None, help=f"test images (default: {d['n_test']})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cnngp``."""
    parser = argparse.ArgumentParser(
        prog="cnngp",
        description="CNN-GP kernels on MNIST: resumable kernel stores, the paper's classifier and its table.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    class _Sub:  # every subcommand's help states its defaults, like the main parser's
        @staticmethod
        def add_parser(*args, **kwargs) -> argparse.ArgumentParser:
            return subparsers.add_parser(*args, formatter_class=_HelpFormatter, **kwargs)

    sub = _Sub()

    p = sub.add_parser("data", help="fetch and verify a data set", description="Fetch the IDX files and check MD5s.")
    p.add_argument("--dataset", default="mnist", choices=(*DATASETS, "all"), help="default: %(default)s")
    _add_common(p, kernels=False, solve=False)
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser(
        "kernels",
        help="compute a kernel store (resumable)",
        description="Compute Kxx, Kvx, Ktx and the diagonals into an HDF5 store. Interrupted runs resume where "
        "they stopped when the same command is run again; a store made for other arguments is refused.",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, choices=tuple(ARCHITECTURES), help="default: %(default)s")
    _add_sizes(p)
    p.add_argument("--out", required=True, help="the HDF5 store to create or resume")
    _add_common(p, kernels=True, solve=False)
    p.set_defaults(func=_cmd_kernels)

    p = sub.add_parser("classify", help="classify with a kernel store", description="The paper's GP classifier.")
    p.add_argument("store", help="an HDF5 store made by `cnngp kernels`")
    p.add_argument(
        "--json", default=None, help="also write the results (with predictions) to this JSON file (default: none)"
    )
    p.add_argument(
        "--dual",
        default=None,
        help="also save the dual coefficients A and the predictions to this .npz file (default: none)",
    )
    _add_common(p, kernels=False, solve=True)
    p.set_defaults(func=_cmd_classify)

    d = DEFAULT_SUBSET
    p = sub.add_parser(
        "table",
        help="run everything and write the results table",
        description=(
            "Compute the kernels of each configuration, classify, and write DIR/results.json and DIR/results.md "
            "with the paper's numbers beside ours. With no arguments: the ConvNet GP on the first "
            f"{d['n_train']} training, {d['n_val']} validation and {d['n_test']} test images of the mnist_as_tf "
            "split, which takes about 2 to 4 minutes on 2 CPU cores (its errors are those of a small subset, not the "
            "paper's). --full runs the chosen --configs at the paper's sizes (50000/10000/10000) like any other run; "
            "--paper-scale is the paper's whole table: its three configurations at those sizes on mnist_as_tf, stores "
            "kept outside the work folder, dual coefficients saved (hours of kernels on a CPU; a GPU is recommended; "
            "the estimated time is printed first). Rerunning resumes the stores."
        ),
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        choices=tuple(ARCHITECTURES),
        metavar="NAME",
        help=f"configurations ({', '.join(ARCHITECTURES)}; default: {DEFAULT_CONFIG}, or the paper's three with "
        "--paper-scale)",
    )
    _add_sizes(p)
    p.add_argument(
        "--full",
        action="store_true",
        help="the paper's sizes (50000 train, 10000 val, 10000 test) for --configs (default: convnet_gp), with the "
        "stores in the work folder; --paper-scale is the paper's whole table (default: off, the subset above)",
    )
    p.add_argument(
        "--paper-scale",
        action="store_true",
        help="the paper's table: its three configurations at its sizes (50000/10000/10000, mnist_as_tf), stores "
        "outside the work tree (--store-dir, default $CNNGP_STORE_DIR or ~/.cache/gpytorch_cnngp/paper_table), "
        "dual coefficients saved as WORKDIR/<config>_dual.npz; hours of kernels on a CPU, resumable at any moment "
        "(default: off)",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help=f"folder for the results (default: {DEFAULT_WORKDIR}, or paper-table with --paper-scale)",
    )
    p.add_argument(
        "--store-dir",
        default=None,
        help="folder for the kernel stores (default: the work folder; with --paper-scale $CNNGP_STORE_DIR or "
        "~/.cache/gpytorch_cnngp/paper_table)",
    )
    _add_common(p, kernels=True, solve=True)
    p.set_defaults(func=_cmd_table)
    return parser
