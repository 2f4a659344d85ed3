"""Small synthetic datasets written in the real file formats (IDX, CIFAR pickles, image folders, .npz).

They exercise the same readers as the real data; the tests and the examples use them.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch

from . import cifar, idx
from .fileio import atomic_write
from .registry import DatasetSpec, FileSpec, idx_files

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def synthetic_images(n: int, num_classes: int, shape: tuple[int, ...], seed: int = 0):
    """Images whose class shows as a brighter horizontal band, plus noise.

    Args:
        n: number of images.
        num_classes: labels are 0..num_classes-1, each used at least once when n >= num_classes.
        shape: (H, W) or (C, H, W).
        seed: generator seed.

    Returns:
        (x, y): uint8 images `(n, *shape)` and int64 labels `(n,)`.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    x = torch.randint(0, 100, (n, *shape), generator=g, dtype=torch.int64)
    h = shape[-2]
    band = (y * h // max(num_classes, 1)).view(-1, *([1] * len(shape)))
    rows = torch.arange(h).view(*([1] * (len(shape) - 1)), h, 1)
    x = x + 150 * (rows == band)
    return x.clamp(0, 255).to(torch.uint8), y


def write_idx_dataset(folder: str | Path, n_train: int = 60, n_test: int = 20, num_classes: int = 10,
                      hw: tuple[int, int] = (28, 28), compress: bool = True, seed: int = 0) -> dict:
    """Write the four IDX files of an MNIST-style dataset.

    Args:
        folder: destination folder.
        n_train, n_test: images per split.
        num_classes: number of classes.
        hw: image height and width.
        compress: write .gz files (as published) or raw IDX files.
        seed: content seed.

    Returns:
        {"x_train", "y_train", "x_test", "y_test"} (images `(N, 1, H, W)`) and "paths" {role: path}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    xtr, ytr = synthetic_images(n_train, num_classes, hw, seed)
    xte, yte = synthetic_images(n_test, num_classes, hw, seed + 1)
    arrays = {"train_images": xtr, "train_labels": ytr.to(torch.uint8),
              "test_images": xte, "test_labels": yte.to(torch.uint8)}
    paths = {}
    for role, stem in IDX_STEMS.items():
        name = stem + (".gz" if compress else "")
        paths[role] = idx.write_idx(folder / name, arrays[role], compress=compress)
    return {"x_train": xtr[:, None], "y_train": ytr, "x_test": xte[:, None], "y_test": yte, "paths": paths}


def idx_spec_for(folder: str | Path, name: str, num_classes: int = 10, hw: tuple[int, int] = (28, 28),
                 train_count: int | None = None, test_count: int | None = None, mirrors: tuple[str, ...] = (),
                 with_checksums: bool = True, **kw) -> DatasetSpec:
    """A DatasetSpec describing IDX .gz files in `folder`, with their md5, size and content sha256.

    Args:
        folder: where `write_idx_dataset(..., compress=True)` wrote the files.
        name: registry name.
        num_classes, hw, train_count, test_count, mirrors: as in DatasetSpec.
        with_checksums: record the files' checksums (False: only structure can be verified).
        **kw: other DatasetSpec fields.
    """
    folder = Path(folder)
    digests = {}
    if with_checksums:
        for stem in IDX_STEMS.values():
            data = (folder / f"{stem}.gz").read_bytes()
            digests[stem] = (hashlib.md5(data).hexdigest(), len(data), hashlib.sha256(gzip.decompress(data)).hexdigest())
    return DatasetSpec(
        name=name, kind="idx", classes=[f"class {i}" for i in range(num_classes)], input_shape=(1, *hw),
        train_count=train_count, test_count=test_count, files=idx_files(digests), mirrors=mirrors,
        subdirs=(name,), **kw,
    )


def write_cifar_dataset(folder: str | Path, kind: str = "cifar10", n_per_batch: int = 20, seed: int = 0,
                        archive: str | Path | None = None) -> dict:
    """Write CIFAR-10 (5 training batches, a test batch, batches.meta) or CIFAR-100 (train, test, meta)
    pickles, optionally also packed as the published .tar.gz.

    Args:
        folder: destination folder for the batch files.
        kind: "cifar10" or "cifar100".
        n_per_batch: images per batch file.
        seed: content seed.
        archive: also write a .tar.gz at this path with the files under the published folder name.

    Returns:
        {"x_train", "y_train", "x_test", "y_test", "classes", "files": {name: bytes}}.
    """
    import io
    import tarfile

    from .registry import CIFAR10_CLASSES, CIFAR100_CLASSES

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "cifar10":
        classes, label_key, names_key = CIFAR10_CLASSES, "labels", "label_names"
        train_names, test_name, meta_name, top = [f"data_batch_{i}" for i in range(1, 6)], "test_batch", \
            "batches.meta", "cifar-10-batches-py"
    elif kind == "cifar100":
        classes, label_key, names_key = CIFAR100_CLASSES, "fine_labels", "fine_label_names"
        train_names, test_name, meta_name, top = ["train"], "test", "meta", "cifar-100-python"
    else:
        raise ValueError(f"kind must be 'cifar10' or 'cifar100', got {kind!r}")
    files, xs, ys = {}, [], []
    for i, fname in enumerate(train_names):
        x, y = synthetic_images(n_per_batch, len(classes), (3, 32, 32), seed + i)
        files[fname] = cifar.encode_cifar_batch(x, y, label_key, f"training batch {i + 1}")
        xs.append(x)
        ys.append(y)
    xt, yt = synthetic_images(n_per_batch, len(classes), (3, 32, 32), seed + 100)
    files[test_name] = cifar.encode_cifar_batch(xt, yt, label_key, "testing batch 1")
    files[meta_name] = cifar.encode_cifar_meta(classes, names_key)
    for fname, data in files.items():
        atomic_write(folder / fname, data)
    if archive is not None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for fname, data in files.items():
                info = tarfile.TarInfo(f"{top}/{fname}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        atomic_write(Path(archive), buf.getvalue())
    return {"x_train": torch.cat(xs), "y_train": torch.cat(ys), "x_test": xt, "y_test": yt,
            "classes": list(classes), "files": files}


def cifar_spec_for(files: dict, name: str, kind: str = "cifar10", n_per_batch: int = 20,
                   archive: str | Path | None = None, mirrors: tuple[str, ...] = ()) -> DatasetSpec:
    """A DatasetSpec for files written by `write_cifar_dataset`, with their md5s (and the archive's)."""
    from .registry import get_spec

    base = get_spec(kind)
    fspecs = tuple(FileSpec(f.name, f.role, md5=hashlib.md5(files[f.name]).hexdigest()) for f in base.files)
    arch = None
    if archive is not None:
        data = Path(archive).read_bytes()
        arch = FileSpec(base.archive.name, "archive", md5=hashlib.md5(data).hexdigest(), size=len(data))
    n_train = n_per_batch * sum(f.role == "train_batch" for f in base.files)
    return DatasetSpec(name=name, kind=kind, classes=list(base.classes), input_shape=(3, 32, 32),
                       train_count=n_train, test_count=n_per_batch, files=fspecs, archive=arch,
                       archive_dir=base.archive_dir, mirrors=mirrors, subdirs=(name,))


def write_image_folder(folder: str | Path, classes=("cat", "dog"), per_class: int = 3, size=(12, 10),
                       mode: str = "RGB", fmt: str = "png", seed: int = 0) -> Path:
    """Write an image-folder dataset: `folder/<class>/<i>.<fmt>`.

    Args:
        folder: destination.
        classes: class folder names.
        per_class: images per class.
        size: (width, height) of each image.
        mode: PIL mode ("RGB" or "L").
        fmt: "png" or "jpg".
        seed: content seed.

    Returns:
        The folder.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / c / f"{i}.{fmt}")
    return folder


def write_npz_dataset(path: str | Path, n: int = 30, num_classes: int = 3, shape=(8, 8, 3), test: bool = True,
                      classes: list[str] | None = None, seed: int = 0) -> dict:
    """Write arrays x, y (and x_test, y_test, classes) to an .npz file; images are `(n, *shape)` uint8."""
    x, y = synthetic_images(n, num_classes, shape, seed)
    arrays = {"x": x.numpy(), "y": y.numpy()}
    if test:
        xt, yt = synthetic_images(max(n // 3, 1), num_classes, shape, seed + 1)
        arrays.update(x_test=xt.numpy(), y_test=yt.numpy())
    if classes is not None:
        arrays["classes"] = np.array(classes)
    np.savez(path, **arrays)
    return arrays
