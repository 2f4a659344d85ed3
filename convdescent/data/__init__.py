"""Datasets for convdescent: formats, verification, locations and downloads, loader and augmentation.

Public entry points: `load_dataset` (find, verify, split), `Dataset`, `read_idx`, `Normalizer`,
`BatchLoader`, `Augment` / `make_augment`, `locate` / `missing_message`, `fetch` / `verify`, and the
errors `DataError`, `CorruptFile`, `DatasetNotFound`, `DownloadError`.
"""

from .augment import Augment, default_augment_spec, make_augment
from .cifar import safe_unpickle
from .dataset import Dataset, load_dataset, split_train_val
from .download import fetch, verify
from .errors import ChecksumMismatch, CorruptFile, DataError, DatasetNotFound, DownloadError
from .folder import load_image_folder, load_npz
from .idx import read_idx, write_idx
from .loader import BatchLoader
from .normalize import Normalizer
from .registry import (
    REGISTRY,
    DatasetSpec,
    FileSpec,
    cache_root,
    find,
    get_spec,
    locate,
    missing_message,
    register_dataset,
    search_places,
    unregister_dataset,
)

__all__ = [
    "Augment", "BatchLoader", "ChecksumMismatch", "CorruptFile", "DataError", "Dataset", "DatasetNotFound",
    "DatasetSpec", "DownloadError", "FileSpec", "Normalizer", "REGISTRY", "cache_root", "default_augment_spec",
    "fetch", "find", "get_spec", "load_dataset", "load_image_folder", "load_npz", "locate", "make_augment",
    "missing_message", "read_idx", "register_dataset", "safe_unpickle", "search_places", "split_train_val",
    "unregister_dataset", "verify", "write_idx",
]
