"""The IDX file format of MNIST-style datasets: reading (gzip or raw) with full checks, and writing.

The format (LeCun et al., "Gradient-based learning applied to document recognition", 1998; described on
the MNIST page) is a 4-byte magic number ``0x00 0x00 TYPE NDIMS``, then NDIMS big-endian uint32 sizes, then
the data in row-major order.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import CorruptFile
from .fileio import atomic_write

# IDX type byte -> (big-endian numpy dtype, name used in messages)
IDX_TYPES = {
    0x08: (np.dtype(">u1"), "unsigned byte"),
    0x09: (np.dtype(">i1"), "signed byte"),
    0x0B: (np.dtype(">i2"), "short"),
    0x0C: (np.dtype(">i4"), "int"),
    0x0D: (np.dtype(">f4"), "float"),
    0x0E: (np.dtype(">f8"), "double"),
}
_TYPE_OF_DTYPE = {np.dtype(v[0]).newbyteorder("="): k for k, v in IDX_TYPES.items()}
GZIP_MAGIC = b"\x1f\x8b"
# A header announcing more than this many elements is certainly corrupt (the largest IDX sets are ~1e9).
_MAX_ELEMENTS = 1 << 34


def is_gzip(path: str | Path) -> bool:
    """Tell whether a file starts with the gzip magic bytes (the extension is not trusted)."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _parse_header(path: Path, head: bytes, read_more) -> tuple[bytes, tuple[int, ...], np.dtype]:
    if len(head) < 4:
        raise CorruptFile(path, f"too short to be an IDX file ({len(head)} bytes; the header alone is at least 8)")
    if head[0] != 0 or head[1] != 0 or head[2] not in IDX_TYPES:
        raise CorruptFile(
            path,
            f"wrong magic number 0x{head[:4].hex()}: an IDX file starts with 00 00 followed by a type byte "
            f"(08 for unsigned byte) and the number of dimensions; this is not an IDX file",
        )
    ndim = head[3]
    if not 1 <= ndim <= 4:
        raise CorruptFile(path, f"the IDX header announces {ndim} dimensions; expected 1 (labels) to 4")
    need = 4 + 4 * ndim
    if len(head) < need:
        head = head + read_more(need - len(head))
    if len(head) < need:
        raise CorruptFile(path, f"truncated header: {ndim} dimensions need {need} header bytes, file has {len(head)}")
    dims = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = 1
    for d in dims:
        count *= d
    if count > _MAX_ELEMENTS:
        raise CorruptFile(path, f"the IDX header announces dimensions {dims}, far larger than any real dataset")
    return head[:need], dims, IDX_TYPES[head[2]][0]


def _read_raw(path: Path) -> tuple[bytes, np.ndarray]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header, dims, dtype = _parse_header(path, f.read(4), f.read)
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = size - len(header)
    if have != expected:
        raise CorruptFile(
            path,
            f"counts disagree with the file size: the header announces dimensions {dims} "
            f"({expected} data bytes) but the file holds {have} data bytes"
            + (" (the file is truncated)" if have < expected else " (extra bytes after the data)"),
        )
    arr = np.fromfile(path, dtype=dtype, offset=len(header)).reshape(dims)
    return header, arr


def _read_gzip(path: Path) -> tuple[bytes, np.ndarray]:
    try:
        with gzip.open(path, "rb") as f:
            header, dims, dtype = _parse_header(path, f.read(4), f.read)
            expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            arr = np.empty(dims, dtype=dtype)
            view = memoryview(arr.reshape(-1).view(np.uint8))
            got = 0
            while got < expected:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got < expected:
                raise CorruptFile(
                    path,
                    f"counts disagree with the file size: the header announces dimensions {dims} "
                    f"({expected} data bytes) but the decompressed file holds only {got} (the file is truncated)",
                )
            extra = 0
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                extra += len(chunk)
            if extra:
                raise CorruptFile(
                    path,
                    f"counts disagree with the file size: the header announces dimensions {dims} "
                    f"({expected} data bytes) but {extra} extra bytes follow the data",
                )
    except CorruptFile:
        raise
    except EOFError:
        raise CorruptFile(path, "bad gzip: the compressed stream is truncated (the file was cut short)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise CorruptFile(path, f"bad gzip: {e}") from None
    return header, arr


def read_idx_with_header(path: str | Path) -> tuple[bytes, np.ndarray]:
    """Read an IDX file and return its header bytes and its data as a big-endian numpy array.

    Used where the exact bytes matter (content checksums); most callers want `read_idx`.

    Args:
        path: IDX file, raw or gzip-compressed (detected from its first bytes).

    Returns:
        (header, array): the header bytes and an array of the dimensions the header announces.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptFile(path, "no such file" if not path.exists() else "not a regular file")
    return _read_gzip(path) if is_gzip(path) else _read_raw(path)


def content_sha256(header: bytes, arr: np.ndarray) -> str:
    """SHA-256 of an IDX file's decompressed content (header and data), without copying the data."""
    h = hashlib.sha256(header)
    h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return h.hexdigest()


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (gzip or raw) after checking its magic number, dimensions and size.

    Args:
        path: the file; gzip compression is recognised from the content, not the name.

    Returns:
        A tensor with the dimensions of the header: uint8 images `(N, H, W)` or labels `(N,)` for
        MNIST-style files; other IDX types give int8/int16/int32/float32/float64 tensors.

    Raises:
        CorruptFile: bad gzip, wrong magic number, truncated header, or a data size that disagrees with
            the dimensions in the header; the message names the file.
    """
    _, arr = read_idx_with_header(path)
    if arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(arr)


def encode_idx(data: torch.Tensor | np.ndarray) -> bytes:
    """Encode an array as IDX bytes (header and big-endian data).

    Args:
        data: array of 1 to 4 dimensions, dtype uint8, int8, int16, int32, float32 or float64.

    Returns:
        The bytes of the IDX file.
    """
    arr = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    native = arr.dtype.newbyteorder("=")
    if native not in _TYPE_OF_DTYPE:
        raise ValueError(f"data dtype must be one of uint8, int8, int16, int32, float32, float64, got {arr.dtype}")
    if not 1 <= arr.ndim <= 4:
        raise ValueError(f"data must have 1 to 4 dimensions, got shape {tuple(arr.shape)}")
    t = _TYPE_OF_DTYPE[native]
    header = bytes([0, 0, t, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + np.ascontiguousarray(arr, dtype=IDX_TYPES[t][0]).tobytes()


def write_idx(path: str | Path, data: torch.Tensor | np.ndarray, compress: bool | None = None) -> Path:
    """Write an array as an IDX file, atomically (temporary file, then rename).

    Args:
        path: destination; compressed with gzip when `compress` is True, or when it is None and the name
            ends in ".gz".
        data: array to store (see `encode_idx`).
        compress: force gzip on or off.

    Returns:
        The path written.
    """
    path = Path(path)
    payload = encode_idx(data)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    atomic_write(path, payload)
    return path
