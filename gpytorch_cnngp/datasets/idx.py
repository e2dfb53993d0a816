"""The IDX file format (parse, write, read raw or gzipped, convert from CSV) and the data checksums.

Also the stored-file convention (raw, or gzipped with a ``.gz`` suffix) shared by the data folder
(:mod:`.cache`) and the Debian sources (:mod:`.sources`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from .catalog import _DISPLAY_NAMES, MD5
from .errors import ChecksumError

__all__ = ["csv_to_idx", "data_checksum", "parse_idx", "read_idx", "to_idx_bytes"]

_IDX_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file.

    The header is two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
    ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, then each dimension as a big-endian uint32;
    the big-endian data follow.

    :param data: the file's bytes.
    :return: the array in native byte order (a copy, writable).
    :raises ValueError: when the header is malformed or the data size does not match it.
    """
    buf = memoryview(data).cast("B")
    if len(buf) < 4:
        raise ValueError(f"not an IDX file: only {len(buf)} bytes")
    if buf[0] != 0 or buf[1] != 0:
        raise ValueError(f"not an IDX file: magic starts with {bytes(buf[:2])!r}, expected b'\\x00\\x00'")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_CODES:
        raise ValueError(f"not an IDX file: unknown type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"truncated IDX header: {ndim} dimensions need {header} bytes, got {len(buf)}")
    shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_CODES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) - header != expected:
        raise ValueError(
            f"IDX data size mismatch: shape {shape} of {dtype} needs {expected} bytes, got {len(buf) - header}"
        )
    array = np.frombuffer(buf, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def to_idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as the bytes of an IDX file (the inverse of :func:`parse_idx`).

    :param array: an array of dtype uint8, int8, int16, int32, float32 or float64, with at most 255 dimensions.
    :return: the IDX bytes (header then big-endian data).
    :raises ValueError: for an unsupported dtype or shape.
    """
    array = np.asarray(array)
    native = {np.dtype(t).newbyteorder("="): c for c, t in _IDX_CODES.items()}
    dtype = array.dtype.newbyteorder("=")
    if dtype not in native:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    if array.ndim > 255 or any(d >= 2**32 for d in array.shape):
        raise ValueError(f"IDX cannot store shape {array.shape}")
    code = native[dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=_IDX_CODES[code]).tobytes()


def _decompress(name: str, payload: bytes) -> bytes:
    """The IDX bytes of a stored payload: gunzipped when the name ends in ``.gz`` or the bytes are gzip."""
    if name.endswith(".gz") or payload[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(payload)
        except (OSError, EOFError, zlib.error) as exc:
            raise ChecksumError(f"{name}: cannot be decompressed ({exc}); the file is corrupted or truncated") from exc
    return payload


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _verify(dataset: str, name: str, data: bytes, origin: str) -> None:
    """Raise :class:`ChecksumError` unless ``data`` (decompressed IDX bytes) has the MD5 listed in :data:`MD5`."""
    expected = MD5[dataset][name]
    got = _md5(data)
    if got != expected:
        raise ChecksumError(
            f"{_DISPLAY_NAMES[dataset]} file {name} from {origin} has MD5 {got}, expected {expected}: "
            "the file is corrupted, truncated or not the official one"
        )


def read_idx(path: str | os.PathLike[str], expected_md5: str | None = None) -> np.ndarray:
    """Read an IDX file, raw or gzipped.

    :param path: the file (``.gz`` files, or any gzip content, are decompressed).
    :param expected_md5: when given, the MD5 the *decompressed* bytes must have.
    :return: the array (native byte order).
    :raises ChecksumError: when ``expected_md5`` is given and does not match, or a gzip file is broken.
    :raises ValueError: when the content is not a valid IDX file.
    """
    path = Path(path)
    data = _decompress(path.name, path.read_bytes())
    if expected_md5 is not None:
        got = _md5(data)
        if got != expected_md5.lower():
            raise ChecksumError(f"{path} has MD5 {got} (decompressed), expected {expected_md5}")
    return parse_idx(data)


def data_checksum(array: np.ndarray | torch.Tensor, algorithm: str = "sha256") -> str:
    """Hex digest of an array's bytes (C order), for recording the provenance of the data behind a result.

    :param array: a NumPy array or a tensor (moved to the CPU).
    :param algorithm: any :func:`hashlib.new` algorithm name; ``"md5"`` is allowed (not used for security).
    :return: the hex digest. Only the bytes enter the digest, not the dtype or shape.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().contiguous().numpy()
    data = np.ascontiguousarray(array)
    digest = hashlib.new(algorithm, usedforsecurity=False)
    digest.update(data.tobytes() if data.size == 0 else memoryview(data).cast("B"))
    return digest.hexdigest()


def csv_to_idx(data: bytes | str | os.PathLike[str], image_shape: tuple[int, ...] = (28, 28)) -> tuple[bytes, bytes]:
    """Convert an MNIST-style CSV (optional header row, then one row per image: label, pixels) to IDX bytes.

    :param data: the CSV content as bytes, or a path to the CSV file.
    :param image_shape: the shape of one image; each row must hold ``1 + prod(image_shape)`` integers.
    :return: ``(images_idx, labels_idx)``: uint8 IDX files of shape ``[n, *image_shape]`` and ``[n]``.
    :raises ValueError: when the rows have the wrong length or values outside 0..255.
    """
    if not isinstance(data, bytes | bytearray):
        data = Path(data).read_bytes()
    first_line = bytes(data[: data.find(b"\n") + 1 if b"\n" in data else len(data)])
    skip = 1 if re.search(rb"[A-Za-z]", first_line) else 0
    n_cols = 1 + int(np.prod(image_shape))
    try:
        table = np.loadtxt(io.BytesIO(data), delimiter=",", skiprows=skip, dtype=np.int16, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"CSV is not a table of integers in 0..255: {exc}") from exc
    if table.size == 0:
        table = table.reshape(0, n_cols)
    if table.shape[1] != n_cols:
        raise ValueError(f"CSV rows have {table.shape[1]} columns, expected {n_cols} (label + {n_cols - 1} pixels)")
    if table.size and (table.min() < 0 or table.max() > 255):
        raise ValueError(f"CSV values must lie in 0..255, found {table.min()}..{table.max()}")
    table = table.astype(np.uint8)
    labels = table[:, 0]
    images = table[:, 1:].reshape((len(table), *image_shape))
    return to_idx_bytes(images), to_idx_bytes(labels)


def _find_file(folder: Path, name: str) -> Path | None:
    """The stored file for ``name`` in ``folder``: raw first, then ``.gz``; ``None`` when neither exists."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None
