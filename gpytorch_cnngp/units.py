"""Memory sizes as people write them: ``"2GB"``, ``"512 MiB"``, ``"1e9"``.

Below :mod:`gpytorch_cnngp.settings` (which parses ``CNNGP_MEMORY_BUDGET`` with it) and
:mod:`gpytorch_cnngp.memory` (which re-exports it), so that neither imports the other for it.
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_bytes", "format_bytes"]

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
