"""Image folders (one subfolder per class, PNG or JPEG files) and .npz files of arrays."""

from __future__ import annotations

from pathlib import Path

import zlib

import numpy as np
import torch

from .errors import CorruptFile, DataError
from .images import open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
COLOR_MODES = ("grayscale", "rgb")


def _parse_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    pair = (image_size, image_size) if isinstance(image_size, int) and not isinstance(image_size, bool) else image_size
    try:
        h, w = (int(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be an int or a (height, width) pair, got {image_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise CorruptFile(root, "not a folder; an image dataset is a folder with one subfolder per class")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise CorruptFile(root, "no class subfolders; put the images of each class in a subfolder named after it")
    return classes


def _images_of(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise CorruptFile(folder, f"empty class folder: no {'/'.join(IMAGE_SUFFIXES)} images in it")
    return files


def _open_image(path: Path):
    return open_image(path)


def _is_gray(im) -> bool:
    return im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") or (
        im.mode == "P" and all(r == g == b for r, g, b in _palette_rgb(im))
    )


def _palette_rgb(im):
    pal = im.getpalette() or []
    return [tuple(pal[i:i + 3]) for i in range(0, len(pal) - 2, 3)]


def read_image_split(root: str | Path, classes: list[str] | None = None, image_size=None,
                     color_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read one split of an image folder: `root/<class>/<image>.png|jpg`.

    Args:
        root: folder with one subfolder per class (sorted names give the label order).
        classes: class names expected (for a test split that must match the training split's classes).
        image_size: int or (height, width) to resize every image to (bilinear); None keeps the size, which
            must then be the same for every image.
        color_mode: "grayscale" (1 channel), "rgb" (3 channels), or None to pick grayscale when every
            image is grayscale and RGB otherwise.

    Returns:
        (x, y, classes): uint8 `(N, C, H, W)`, int64 `(N,)` and the class names.
    """
    from PIL import Image

    root = Path(root)
    size = _parse_size(image_size)
    if color_mode is not None and color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode must be one of {COLOR_MODES} or None, got {color_mode!r}")
    folders = _class_folders(root)
    names = [p.name for p in folders]
    if classes is not None and names != list(classes):
        raise CorruptFile(root, f"class folders {names} differ from the training split's classes {list(classes)}")
    items = [(f, label) for label, folder in enumerate(folders) for f in _images_of(folder)]
    images = [_open_image(f) for f, _ in items]
    if color_mode is None:
        color_mode = "grayscale" if all(_is_gray(im) for im in images) else "rgb"
    mode = "L" if color_mode == "grayscale" else "RGB"
    arrays = []
    first_size = None
    for (f, _), im in zip(items, images):
        if im.mode != mode:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                # 16-bit and float grayscale: scale to 8 bits instead of clipping.
                a = np.asarray(im, dtype=np.float64)
                hi = 65535.0 if im.mode.startswith("I") and a.max() > 255 else 255.0
                im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), "L")
            if im.mode != mode:
                im = im.convert("RGBA").convert(mode) if im.mode in ("P", "LA", "PA") else im.convert(mode)
        if size is not None:
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
        elif first_size is None:
            first_size = (im.size, f)
        elif im.size != first_size[0]:
            raise CorruptFile(
                f, f"image size {im.size[0]}x{im.size[1]} differs from {first_size[0][0]}x{first_size[0][1]} "
                   f"of {first_size[1]}; pass image_size (--image-size) to resize every image"
            )
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays))
    y = torch.tensor([label for _, label in items], dtype=torch.int64)
    return x, y, names


def load_image_folder(root: str | Path, image_size=None, color_mode: str | None = None) -> dict:
    """Read an image-folder dataset.

    Two layouts are understood: `root/train/<class>/...` with an optional `root/test/<class>/...`, or
    `root/<class>/...` (all training data, no test split).

    Args:
        root: the dataset folder.
        image_size: see `read_image_split`.
        color_mode: see `read_image_split`; the training split's choice is applied to the test split.

    Returns:
        {"x_train", "y_train", "x_test", "y_test", "classes"}; the test tensors are empty when there is no
        test folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    train_root = root / "train" if (root / "train").is_dir() else root
    x, y, classes = read_image_split(train_root, None, image_size, color_mode)
    mode = "grayscale" if x.shape[1] == 1 else "rgb"
    if train_root != root and (root / "test").is_dir():
        size = image_size if image_size is not None else tuple(x.shape[2:])
        xt, yt, _ = read_image_split(root / "test", classes, size, mode)
    else:
        xt = torch.empty((0, *x.shape[1:]), dtype=torch.uint8)
        yt = torch.empty((0,), dtype=torch.int64)
    return {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, "classes": classes}


def _images_from_array(a: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if a.dtype.kind not in "ui" and a.dtype != np.bool_:
        raise CorruptFile(path, f"array {key!r} has dtype {a.dtype}; store images as uint8 values 0-255")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise CorruptFile(path, f"array {key!r} has values outside 0-255 ({a.min()} to {a.max()}); store uint8 images")
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
            a = a.transpose(0, 3, 1, 2)
        elif a.shape[1] not in (1, 3, 4):
            raise CorruptFile(path, f"array {key!r} of shape {a.shape}: cannot tell the channel axis (1, 3 or 4 "
                                    f"channels expected first or last)")
    else:
        raise CorruptFile(path, f"array {key!r} has shape {a.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W)")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))


def _labels_from_array(a: np.ndarray, key: str, path: Path) -> torch.Tensor:
    a = np.asarray(a)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or a.dtype.kind not in "ui":
        raise CorruptFile(path, f"array {key!r} must hold integer labels of shape (N,), got {a.dtype} {a.shape}")
    return torch.from_numpy(a.astype(np.int64))


def read_npz_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, read with memory that follows the data really there.

    An array's header announces its shape; numpy allocates that much before reading, so a small file
    announcing a huge shape would allocate gigabytes. Here each member is read in chunks into a buffer that
    grows with what is really decompressed, and a member shorter than its header announces is an error.
    Object arrays (pickles) are refused.

    Args:
        path: the .npz file.

    Returns:
        {name: array} (names without the ".npy" suffix).

    Raises:
        CorruptFile: a member is not an .npy array, holds objects, or is shorter than its header says.
    """
    import zipfile

    from numpy.lib import format as npy

    from .idx import read_bounded

    path = Path(path)
    arrays = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            with zf.open(info) as f:
                version = npy.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = npy.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = npy.read_array_header_2_0(f)
                else:
                    raise CorruptFile(path, f"array {key!r} uses .npy format version {version}, which is not read")
                if dtype.hasobject:
                    raise CorruptFile(path, f"array {key!r} holds Python objects (a pickle), which are never loaded; "
                                            f"store plain numeric arrays")
                count = 1
                for d in shape:
                    count *= int(d)
                expected = count * dtype.itemsize
                buf = read_bounded(f, expected)
                if len(buf) < expected:
                    raise CorruptFile(path, f"array {key!r} announces shape {tuple(shape)} ({expected} bytes) but "
                                            f"the file holds only {len(buf)} bytes of it (truncated or damaged)")
            a = np.frombuffer(buf, dtype=dtype, count=count)
            arrays[key] = a.reshape(shape[::-1]).transpose() if fortran else a.reshape(shape)
    return arrays


def load_npz(path: str | Path) -> dict:
    """Read a dataset stored as arrays in an .npz file.

    Keys: `x` and `y` (or `x_train` and `y_train`), optionally `x_test` and `y_test`, and optionally
    `classes` (an array of class names). Images may be `(N, H, W)`, `(N, H, W, C)` or `(N, C, H, W)` with
    integer values 0-255. The file is opened without pickle support, so it cannot run code.

    Args:
        path: the .npz file.

    Returns:
        {"x_train", "y_train", "x_test", "y_test", "classes"}; classes is None when the file has none.
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        arrays = read_npz_arrays(path)
    except CorruptFile:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as e:
        raise CorruptFile(path, f"not a readable .npz file ({e})") from None
    xk = "x" if "x" in arrays else "x_train"
    yk = "y" if "y" in arrays else "y_train"
    if xk not in arrays or yk not in arrays:
        raise CorruptFile(path, f"expected arrays 'x' and 'y' (or 'x_train' and 'y_train'), found {sorted(arrays)}")
    out = {"x_train": _images_from_array(arrays[xk], xk, path), "y_train": _labels_from_array(arrays[yk], yk, path)}
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise CorruptFile(path, "has only one of 'x_test' and 'y_test'; store both or neither")
    if "x_test" in arrays:
        out["x_test"] = _images_from_array(arrays["x_test"], "x_test", path)
        out["y_test"] = _labels_from_array(arrays["y_test"], "y_test", path)
        if out["x_test"].shape[1:] != out["x_train"].shape[1:]:
            raise CorruptFile(path, f"test images {tuple(out['x_test'].shape[1:])} and training images "
                                    f"{tuple(out['x_train'].shape[1:])} differ in shape")
    else:
        out["x_test"] = torch.empty((0, *out["x_train"].shape[1:]), dtype=torch.uint8)
        out["y_test"] = torch.empty((0,), dtype=torch.int64)
    for xs, ys in (("x_train", "y_train"), ("x_test", "y_test")):
        if len(out[xs]) != len(out[ys]):
            raise CorruptFile(path, f"different numbers of images and labels: {len(out[xs])} in {xs}, "
                                    f"{len(out[ys])} in {ys}")
    classes = None
    if "classes" in arrays:
        c = arrays["classes"]
        if c.ndim != 1 or c.dtype.kind not in "US":
            raise CorruptFile(path, f"'classes' must be a 1-D array of strings, got {c.dtype} {c.shape}")
        classes = [v.decode() if isinstance(v, bytes) else str(v) for v in c.tolist()]
    out["classes"] = classes
    return out
