"""Building, caching and loading the native kernel (``native_kernel.cpp``, beside this module).

The kernel is compiled on first use with the system C++ compiler (``$CXX`` or ``g++``; the same one
``torch.compile`` needs on CPU) for this machine's instruction set, and cached under
``$CNNGP_CACHE_DIR`` (default ``~/.cache/gpytorch_cnngp/native``), keyed by the source, the compiler
flags and the CPU. A freshly loaded library must match this version's instruction layout and lane counts and
pass a self-test against the eager float64 path (run through :mod:`.run`), else it is not used: if the
compiler is missing or fails, :func:`load_library` warns once and gives ``None``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ... import settings
from ...layers import AvgPool2d, Conv2d, Dense, GlobalAvgPool2d, LeakyReLU, ReLU, Sequential, Sum
from ...passes import pair_block, self_pass, spatial_first
from ...state import Hyper
from .lowering import _FIELDS, lower
from .run import LANES, run_block, self_terms

__all__ = ["ENTRY_POINTS", "load_library", "native_enabled"]

_SOURCE = Path(__file__).with_name("native_kernel.cpp")
_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",
    "-ffp-contract=fast",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
]


def native_enabled() -> bool:
    """Whether the native path may be used (:class:`gpytorch_cnngp.settings.native`, ``CNNGP_NATIVE``)."""
    return bool(settings.native.value())


def _cache_dir() -> Path:
    return settings.cache_dir.value() / "native"


def _cpu_signature() -> str:
    # -march=native code may not run on another CPU: a cache shared between machines keys on this
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [line for line in fh if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


# the kernel's functions that run.py calls (each returns a status: 0 or an error code for run._check)
ENTRY_POINTS = (
    "cnngp_run_f32",
    "cnngp_run_f64",
    "cnngp_vjp_f32",
    "cnngp_vjp_f64",
    "cnngp_pack_f32",
    "cnngp_pack_f64",
    "cnngp_self_f32",
    "cnngp_self_f64",
)

_LIB: ctypes.CDLL | None = None
_LIB_ERROR: str | None = None


def load_library() -> ctypes.CDLL | None:
    """The compiled kernel (building it on first use), or ``None`` with a warning if that fails."""
    global _LIB, _LIB_ERROR
    if _LIB is not None or _LIB_ERROR is not None:
        return _LIB
    try:
        lib = _build_and_load()
        _self_test(lib)
        _LIB = lib
    except (OSError, subprocess.SubprocessError, RuntimeError) as err:
        _LIB_ERROR = str(err)
        warnings.warn(
            f"gpytorch_cnngp: the native CPU kernel could not be built ({err}); using the eager or torch.compile "
            "backend instead. Set CNNGP_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _LIB


def _target(source: bytes, compiler: str, flags: list[str]) -> Path:
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode() + _cpu_signature().encode()).hexdigest()[:20]
    return _cache_dir() / f"cnngp_native_{key}.so"


def _compile(compiler: str, flags: list[str], target: Path) -> str | None:
    """Build the kernel into ``target``; the compiler's complaint if it fails."""
    # build under a temporary name and rename: concurrent processes (e.g. Dask workers) never
    # load a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return proc.stderr.strip()[-500:]
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_and_load() -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CXX", "g++")
    # without an OpenMP runtime to link (some clang installations), the kernel makes its threads with std::thread
    variants = [_FLAGS, [("-fopenmp-simd" if f == "-fopenmp" else f) for f in _FLAGS]]
    target = next((t for t in (_target(source, compiler, v) for v in variants) if t.exists()), None)
    if target is None:
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler {compiler!r} on PATH")
        _cache_dir().mkdir(parents=True, exist_ok=True)
        print(
            f"gpytorch_cnngp: building the native CPU kernel for this machine with {compiler} (once, a few seconds; "
            f"cached in {_cache_dir()})",
            file=sys.stderr,
            flush=True,
        )
        for flags in variants:
            target = _target(source, compiler, flags)
            error = _compile(compiler, flags, target)
            if error is None:
                break
        else:
            raise RuntimeError(f"{compiler} failed: {error}")
    lib = ctypes.CDLL(str(target))
    if lib.cnngp_fields() != _FIELDS:
        raise RuntimeError("the native kernel's instruction layout does not match this version")
    for dtype, lanes in LANES.items():
        if lib.cnngp_lanes(int(dtype == torch.float64)) != lanes:
            raise RuntimeError("the native kernel's lane count does not match this version")
    for name in ENTRY_POINTS:
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
    return lib


def _self_test(lib: ctypes.CDLL) -> None:
    """Check the freshly loaded kernel against the eager float64 path on tiny networks that use
    every instruction (a compiler that miscompiles the kernel must not give wrong kernels)."""
    model = Sequential(
        Conv2d(3, stride=2, var_bias=0.2),
        LeakyReLU(0.1),
        Sum([Sequential(), Sequential(ReLU(), Conv2d(2, dilation=2, var_weight=1.5))]),
        ReLU(),
        Dense(var_weight=2.0, var_bias=0.1),
    )
    gen = torch.Generator().manual_seed(0)
    images = spatial_first(torch.rand(5, 2, 7, 7, generator=gen, dtype=torch.float64))
    program, fused = lower(model, (7, 7)), lower(model, (7, 7), fuse=True)
    pooled_model = Sequential(
        Conv2d(3, stride=2, var_bias=0.2),
        LeakyReLU(0.1),
        AvgPool2d(2, stride=1),
        Conv2d(2),
        ReLU(),
        GlobalAvgPool2d(),
        Dense(var_bias=0.1),
    )
    pooled = lower(pooled_model, (7, 7))
    for dtype in LANES:
        hyper = Hyper.of(model, dtype, "cpu")
        x = images.to(dtype)
        with torch.no_grad():
            trace, want_self = self_pass(model, x, hyper)
            tx, tz = [t[..., :2] for t in trace], [t[..., 2:] for t in trace]
            want = pair_block(model, x[..., :2], x[..., 2:], tx, tz, hyper, ntk=True)
        params = program.parameter_vector(hyper, dtype)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        # the fast path too: fused sums, and traces from the kernel's own self pass
        left = self_terms(lib, fused, params, x[..., :2], 2, right=False)[0]
        right = self_terms(lib, fused, params, x[..., 2:], 2, left=False)[1]
        for what, prog, ntk, sides, expected in (
            ("", program, False, (tx, tz), want[0]),
            (" for the NTK", program, True, (tx, tz), want),
            (" with its own self pass", fused, False, (left, right), want[0]),
        ):
            got = run_block(lib, prog, params, x[..., :2], x[..., 2:], *sides, 2, ntk=ntk)
            if not torch.allclose(got, expected, rtol=tol, atol=0.0):
                raise RuntimeError(
                    f"its self-test failed in {dtype}{what} (largest difference "
                    f"{float((got - expected).abs().max()):.3g})"
                )
        own = self_terms(lib, fused, params, x, 2, final=True)[2]
        if not torch.allclose(own, want_self, rtol=tol, atol=0.0):
            raise RuntimeError(f"its self-test failed in {dtype} for the images' own values")
        # spatial offsets: a strided window, a pool that overlaps, a global pool
        params = pooled.parameter_vector(pooled_hyper := Hyper.of(pooled_model, dtype, "cpu"), dtype)
        with torch.no_grad():
            trace, _ = self_pass(pooled_model, x, pooled_hyper)
            tx, tz = [t[..., :2] for t in trace], [t[..., 2:] for t in trace]
            want = pair_block(pooled_model, x[..., :2], x[..., 2:], tx, tz, pooled_hyper, ntk=True)
        got = run_block(lib, pooled, params, x[..., :2], x[..., 2:], tx, tz, 2, ntk=True)
        if not torch.allclose(got, want, rtol=tol, atol=0.0):
            raise RuntimeError(
                f"its self-test failed in {dtype} for a pooled network (largest difference "
                f"{float((got - want).abs().max()):.3g})"
            )
