"""CIFAR-10 and CIFAR-100 in their python-pickle batch format, unpickled without running code.

The batches (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009) are pickled dicts
holding a uint8 array `data` of shape (n, 3072) (1024 red, then green, then blue values, row-major) and a
list of labels (`labels` for CIFAR-10, `fine_labels` and `coarse_labels` for CIFAR-100).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import CorruptFile


def _np_attr(*paths: str):
    import importlib

    for p in paths:
        mod, _, attr = p.rpartition(".")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(paths[0])


_reconstruct = _np_attr("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
_scalar = _np_attr("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
try:
    _frombuffer = _np_attr("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")
except ImportError:  # pragma: no cover - very old numpy
    _frombuffer = None


def _safe_dtype(*args):
    d = np.dtype(*args)
    if d.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed in a CIFAR batch")
    return d


class _NdarrayName:
    """Stands for numpy.ndarray in a batch: only ``_reconstruct`` may receive it. Calling numpy.ndarray
    itself would allocate whatever shape the file names before any data is read."""


def _safe_reconstruct(cls, shape, dtype_code):
    if cls is not _NdarrayName:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed in a CIFAR batch")
    if tuple(shape) != (0,):
        # pickled arrays start empty and get their shape with their data (BUILD), which numpy checks
        raise pickle.UnpicklingError(f"an array is rebuilt with shape {shape!r}; a CIFAR batch uses (0,)")
    return _reconstruct(np.ndarray, shape, dtype_code)


def _latin1_encode(text, encoding="latin1"):
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1"); no other codec is allowed.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError("only latin1 byte strings are allowed in a CIFAR batch")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _latin1_encode,
}
if _frombuffer is not None:
    _ALLOWED[("numpy.core.numeric", "_frombuffer")] = _frombuffer
    _ALLOWED[("numpy._core.numeric", "_frombuffer")] = _frombuffer


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the few globals a CIFAR batch refers to (numpy arrays and dtypes)."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"the pickle refers to {module}.{name}, which a CIFAR batch never holds; refusing to load it"
            ) from None


def safe_unpickle(data: bytes, path: str | Path = "<bytes>"):
    """Unpickle CIFAR batch bytes, allowing only numpy arrays, dtypes, dicts, lists, numbers and strings.

    A hostile pickle that names any other callable (os.system, builtins.eval, ...) is refused before
    anything runs.

    Args:
        data: the pickle bytes.
        path: used in error messages.

    Returns:
        The unpickled object.

    Raises:
        CorruptFile: not a pickle, a truncated pickle, or one that refers to anything not allowed.
    """
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except CorruptFile:
        raise
    except pickle.UnpicklingError as e:
        raise CorruptFile(path, f"not a CIFAR batch: {e}") from None
    except EOFError:
        raise CorruptFile(path, "not a CIFAR batch: the pickle is truncated") from None
    except Exception as e:  # malformed opcodes raise many different types
        raise CorruptFile(path, f"not a CIFAR batch: unreadable pickle ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str):
    if key in d:
        return d[key]
    return d.get(key.encode("ascii"))


def parse_cifar_batch(data: bytes, label_key: str, num_classes: int, path: str | Path = "<bytes>"):
    """Decode one CIFAR batch.

    Args:
        data: the batch file's bytes.
        label_key: "labels" (CIFAR-10) or "fine_labels" (CIFAR-100).
        num_classes: labels must lie in [0, num_classes).
        path: used in error messages.

    Returns:
        (x, y): uint8 images `(n, 3, 32, 32)` and int64 labels `(n,)`.
    """
    obj = safe_unpickle(data, path)
    if not isinstance(obj, dict):
        raise CorruptFile(path, f"not a CIFAR batch: the pickle holds a {type(obj).__name__}, not a dict")
    raw = _get(obj, "data")
    labels = _get(obj, label_key)
    if raw is None or labels is None:
        keys = sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in obj)
        raise CorruptFile(path, f"not a CIFAR batch: expected keys 'data' and {label_key!r}, found {keys}")
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3072:
        desc = f"{raw.dtype} array of shape {raw.shape}" if isinstance(raw, np.ndarray) else type(raw).__name__
        raise CorruptFile(path, f"not a CIFAR batch: 'data' must be a uint8 array of shape (n, 3072), got {desc}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise CorruptFile(path, f"not a CIFAR batch: {label_key!r} is not a list of integers") from None
    if y.ndim != 1 or len(y) != len(raw):
        raise CorruptFile(
            path, f"different numbers of images and labels: {len(raw)} images but {y.size} labels in {label_key!r}"
        )
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise CorruptFile(path, f"labels out of range: found label {bad}, expected 0 to {num_classes - 1}")
    x = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1, 3, 32, 32))
    return x, torch.from_numpy(y)


def parse_cifar_meta(data: bytes, key: str, path: str | Path = "<bytes>") -> list[str]:
    """Class names from a CIFAR meta file ("batches.meta" with `label_names`, or "meta" with `fine_label_names`)."""
    obj = safe_unpickle(data, path)
    names = _get(obj, key) if isinstance(obj, dict) else None
    if not isinstance(names, list) or not names:
        raise CorruptFile(path, f"not a CIFAR meta file: expected a dict with a list {key!r}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def encode_cifar_batch(x: torch.Tensor | np.ndarray, y, label_key: str = "labels", batch_label: str = "batch") -> bytes:
    """Pickle images and labels as a CIFAR batch (protocol 2, bytes keys, as the published files are).

    Args:
        x: uint8 images `(n, 3, 32, 32)`.
        y: labels `(n,)`.
        label_key: "labels" or "fine_labels".
        batch_label: the batch's description string.

    Returns:
        The pickle bytes.
    """
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.dtype != np.uint8 or x.shape[1:] != (3, 32, 32):
        raise ValueError(f"x must be uint8 of shape (n, 3, 32, 32), got {x.dtype} {tuple(x.shape)}")
    labels = [int(v) for v in (y.tolist() if hasattr(y, "tolist") else y)]
    obj = {
        b"batch_label": batch_label.encode(),
        label_key.encode(): labels,
        b"data": np.ascontiguousarray(x.reshape(len(x), 3072)),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(x))],
    }
    if label_key == "fine_labels":
        obj[b"coarse_labels"] = [v // 5 for v in labels]
    return pickle.dumps(obj, protocol=2)


def encode_cifar_meta(classes: list[str], key: str = "label_names") -> bytes:
    """Pickle a CIFAR meta file listing the class names under `key`."""
    return pickle.dumps({key.encode(): [c.encode() for c in classes], b"num_vis": 3072}, protocol=2)
