"""Memory sizes and the process's allocator policy: one place for both.

* :func:`parse_bytes` / :func:`format_bytes`: sizes as people write them (``"2GB"``, ``"512 MiB"``), from
  :mod:`gpytorch_cnngp.units`;
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

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from . import settings
from .units import format_bytes, parse_bytes  # noqa: F401 - sizes are part of this module's interface

__all__ = [
    "parse_bytes",
    "format_bytes",
    "available_memory",
    "keep_freed_memory",
    "freed_memory_returned",
]


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

    if settings.tune_allocator.value():
        _mallopt(64 << 20, 256 << 20)


@contextmanager
def freed_memory_returned() -> Iterator[None]:
    """The classifier's policy for the duration: freed blocks of 1 MiB and more go back to the system at once."""

    changed = settings.tune_allocator.value() and _mallopt(1 << 20, 1 << 20)
    try:
        yield
    finally:
        if changed and _kept:
            _mallopt(64 << 20, 256 << 20)
