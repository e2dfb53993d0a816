"""Progress bars for long work (kernels, stores, downloads, the blocked Cholesky): one place that imports tqdm,
only when a bar is shown (tqdm comes with the ``experiments`` extra)."""

from __future__ import annotations

from typing import Any


def progress_bar(enabled: bool, total: float | None, desc: str, unit: str, *, required: bool = False, **options: Any):
    """A tqdm bar of ``total`` ``unit`` (scaled: k, M, G; ``None``: unknown total), or ``None`` when not ``enabled``,
    when there is nothing to count, or when tqdm is missing. ``required``: a missing tqdm is an ImportError saying
    how to install it (for a ``progress=True`` the caller asked for explicitly). ``options`` go to tqdm."""
    if not enabled or (total is not None and total <= 0):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:  # pragma: no cover - tqdm is in the experiments extra
        if required:
            raise ImportError("progress=True needs tqdm: pip install 'gpytorch-cnngp[experiments]'") from err
        return None
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, **options)
