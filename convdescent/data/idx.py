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


def read_bounded(f, expected: int, chunk: int = 1 << 22) -> bytearray:
    """Read up to ``expected`` bytes from a stream in chunks, growing the buffer only as data arrives.

    A header may announce far more data than a (compressed) file really holds; allocating the announced
    size first would let a tiny file claim gigabytes. Here memory follows what is really read.

    Returns:
        The bytes read (fewer than ``expected`` when the stream ends first).
    """
    buf = bytearray()
    while len(buf) < expected:
        part = f.read(min(chunk, expected - len(buf)))
        if not part:
            break
        buf += part
    return buf


def _read_gzip(path: Path) -> tuple[bytes, np.ndarray]:
    try:
        with gzip.open(path, "rb") as f:
            header, dims, dtype = _parse_header(path, f.read(4), f.read)
            expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            buf = read_bounded(f, expected)
            got = len(buf)
            if got < expected:
                raise CorruptFile(
                    path,
                    f"counts disagree with the file size: the header announces dimensions {dims} "
                    f"({expected} data bytes) but the decompressed file holds only {got} (the file is truncated "
                    f"or its header is wrong)",
                )
            arr = np.frombuffer(buf, dtype=dtype).reshape(dims)
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


# The four files of an IDX data set in a folder, by role: the stems MNIST publishes (others, such as
# EMNIST's "emnist-letters-train-images-idx3-ubyte", end with the same words).
IDX_ROLES = {
    "train_images": ("train-images-idx3-ubyte",),
    "train_labels": ("train-labels-idx1-ubyte",),
    "test_images": ("t10k-images-idx3-ubyte", "test-images-idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "test-labels-idx1-ubyte"),
}


def find_idx_files(folder: str | Path) -> dict[str, Path]:
    """The four IDX files of a folder, by role (raw or .gz; a name may carry a prefix such as "emnist-").

    Raises:
        DataError: the folder does not exist, lacks one of the files (named), or holds two candidates for one.
    """
    from .errors import DataError

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"IDX folder {folder} does not exist or is not a folder")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    out: dict[str, Path] = {}
    for role, stems in IDX_ROLES.items():
        hits = [n for n in names if any(n == s or n == s + ".gz" or n.endswith("-" + s) or n.endswith("-" + s + ".gz")
                                        for s in stems)]
        by_stem: dict[str, list[str]] = {}
        for n in hits:
            by_stem.setdefault(n[:-3] if n.endswith(".gz") else n, []).append(n)
        if not by_stem:
            raise DataError(f"IDX folder {folder} has no {stems[0]} (or {stems[0]}.gz) file for the "
                            f"{role.replace('_', ' ')}; an IDX data set is the four files "
                            f"{', '.join(s[0] for s in IDX_ROLES.values())} (each raw or .gz)")
        if len(by_stem) > 1:
            raise DataError(f"IDX folder {folder} holds several {role.replace('_', ' ')} files "
                            f"({', '.join(hits)}); keep one data set per folder")
        (stem, found), = by_stem.items()
        out[role] = folder / (stem if stem in found else found[0])  # the raw copy reads faster
    return out


def load_idx_folder(folder: str | Path) -> dict:
    """Read any IDX data set: a folder with training and test images and labels, gzip or raw.

    Images may be `(N, H, W)` (one channel) or `(N, H, W, C)`; any counts and image size; the classes are
    the label values, 0 to the largest label.

    Args:
        folder: the folder holding the four files (see ``find_idx_files``).

    Returns:
        {"x_train", "y_train", "x_test", "y_test", "classes"}: uint8 `(N, C, H, W)`, int64 `(N,)`, and
        class names "0", "1", ...

    Raises:
        CorruptFile / DataError: a file is missing, malformed, or the files disagree; the message names it.
    """
    paths = find_idx_files(folder)
    out = {}
    for split in ("train", "test"):
        xp, yp = paths[f"{split}_images"], paths[f"{split}_labels"]
        x = read_idx(xp)
        y = read_idx(yp)
        if x.dtype != torch.uint8:
            raise CorruptFile(xp, f"IDX data type is {x.dtype}, expected unsigned bytes (type 0x08) for images")
        if x.ndim == 3:
            x = x.unsqueeze(1)
        elif x.ndim == 4 and x.shape[-1] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2).contiguous()
        else:
            raise CorruptFile(xp, f"images must have dimensions (N, H, W) or (N, H, W, C), the header gives "
                                  f"{tuple(x.shape)}")
        if y.ndim != 1 or y.dtype.is_floating_point:
            raise CorruptFile(yp, f"labels must be one-dimensional integers, got {y.dtype} {tuple(y.shape)}")
        if len(x) != len(y):
            raise CorruptFile(xp, f"different numbers of images and labels: {len(x)} images here but {len(y)} "
                                  f"labels in {yp.name}")
        if len(y) and int(y.min()) < 0:
            raise CorruptFile(yp, f"labels out of range: found label {int(y.min())}; labels start at 0")
        out[f"x_{split}"], out[f"y_{split}"] = x, y.to(torch.int64)
    if out["x_test"].shape[1:] != out["x_train"].shape[1:]:
        raise CorruptFile(paths["test_images"], f"test images of shape {tuple(out['x_test'].shape[1:])} differ "
                                                f"from the training images' {tuple(out['x_train'].shape[1:])}")
    y = torch.cat([out["y_train"], out["y_test"]])
    out["classes"] = [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    return out
