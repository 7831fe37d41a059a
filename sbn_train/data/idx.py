"""The IDX file format of MNIST and Fashion-MNIST."""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np

from .common import DataError

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(raw: bytes, expected_magic: int | None = None, source: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes (optionally gzip-compressed) into a native-endian array.

    The format: 2 zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), a byte with the number of
    dimensions, one big-endian uint32 per dimension, then the big-endian data.
    The 4-byte magic number is checked against ``expected_magic`` when given
    (2051 for image files, 2049 for label files), and the data must have
    exactly the length the header declares.
    """
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{source}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4:
        raise DataError(f"{source}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{source}: IDX magic number is {magic:#010x}, expected {expected_magic:#010x}; "
            "this is not the expected IDX file"
        )
    type_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{source}: {magic:#010x} is not a valid IDX magic number")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    count = math.prod(dims)
    expected_bytes = count * dtype.itemsize
    if len(raw) - header != expected_bytes:
        raise DataError(
            f"{source}: the IDX header declares shape {dims} ({expected_bytes} data bytes) "
            f"but {len(raw) - header} follow; the file is truncated or corrupt"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable native-endian copy


def read_idx_file(path: str, expected_magic: int | None = None) -> np.ndarray:
    """Read and decode an IDX file (``.gz`` or not); see :func:`parse_idx`."""
    with open(path, "rb") as f:
        return parse_idx(f.read(), expected_magic=expected_magic, source=path)
