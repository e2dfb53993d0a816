"""Memory sizes and the process's allocator policy: one place for both.

* :func:`parse_bytes` / :func:`format_bytes`: sizes as people write them (``"2GB"``, ``"512 MiB"``);
* :func:`available_memory`: what new allocations can use now;
* the glibc allocator policy. The kernel engine and the classifier want opposite things from ``malloc``:

  - the engine's pair pass allocates and frees many same-sized buffers of a few MB. With glibc's defaults each
    new one is fresh memory from the kernel, and touching it costs more than the arithmetic done on it
    (measured: simple steps 5-15 times slower, a whole kernel about 1.4 times). :func:`keep_freed_memory`
    raises the mmap threshold to 64 MiB and the trim threshold to 256 MiB, once per process, so they stay in
    the heap;
  - the blocked Cholesky's temporaries of a few MiB then come from the heap and fragment it, and its resident
    memory grows well past its budget (measured: 1.7 times). :func:`freed_memory_returned` sets both thresholds
    to 1 MiB for its duration and restores the engine's setting afterwards.

  ``settings.tune_allocator(False)`` (or ``CNNGP_MALLOPT=0``) leaves the allocator alone. Nothing happens
  outside Linux/glibc.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress

__all__ = [
    "parse_bytes",
    "format_bytes",
    "available_memory",
    "keep_freed_memory",
    "freed_memory_returned",
]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(text: str | float | int) -> int:
    """A byte count from ``"2GB"``, ``"128MB"``, ``"512 MiB"``, ``"1e9"`` or a number (KB = 1000 B, KiB = 1024 B).

    :raises ValueError: for anything that is not a positive, finite size with a known unit.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if match is None:
            raise ValueError(f"not a memory size: {text!r} (expected e.g. 2GB, 512MB, 4GiB or a number of bytes)")
        value, unit = float(match.group(1)), match.group(2).upper()
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r} in {text!r}; use B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB")
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise ValueError(f"a memory size must be at least 1 byte, got {text!r}")
    return int(size)


def format_bytes(n: float) -> str:
    """``1.5 GB``-style text (powers of 1000, as :func:`parse_bytes` reads them)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux), or ``None`` if unknown."""
    with suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with suppress(AttributeError, ValueError, OSError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


# ---- the allocator policy

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_kept = False  # keep_freed_memory() has set the engine's thresholds in this process


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    except (OSError, AttributeError):  # not glibc
        return False
    return True


def keep_freed_memory() -> None:
    """The kernel engine's policy: freed tile buffers stay in the heap (see the module docstring). Once per process."""
    global _kept
    if _kept:
        return
    _kept = True
    from . import settings

    if settings.tune_allocator.value():
        _mallopt(64 << 20, 256 << 20)


@contextmanager
def freed_memory_returned() -> Iterator[None]:
    """The classifier's policy for the duration: freed blocks of 1 MiB and more go back to the system at once."""
    from . import settings

    changed = settings.tune_allocator.value() and _mallopt(1 << 20, 1 << 20)
    try:
        yield
    finally:
        if changed and _kept:
            _mallopt(64 << 20, 256 << 20)
