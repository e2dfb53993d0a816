"""The errors raised by :mod:`gpytorch_cnngp.datasets`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["ChecksumError", "DatasetError", "DatasetUnavailable"]


class DatasetError(RuntimeError):
    """Base class of the errors raised by :mod:`gpytorch_cnngp.datasets`."""


class ChecksumError(DatasetError):
    """An IDX file does not have the expected MD5 (or cannot even be decompressed)."""


class DatasetUnavailable(DatasetError):
    """The IDX files of a data set are missing and none of the sources could provide them.

    :ivar dataset: the data set name.
    :ivar folder: the folder the files were expected in.
    :ivar missing: the file names still missing.
    :ivar failures: one ``(source, reason)`` pair per source tried, in order.
    """

    def __init__(
        self, message: str, *, dataset: str, folder: Path, missing: Sequence[str], failures: Sequence[tuple[str, str]]
    ) -> None:
        super().__init__(message)
        self.dataset = dataset
        self.folder = folder
        self.missing = tuple(missing)
        self.failures = tuple(failures)
