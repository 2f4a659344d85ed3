"""Reading the files of a registered dataset, verifying them, and keeping fast decompressed copies.

Verification of a file, in order: the published file's checksum (md5/sha256); for re-packaged copies
(Debian re-compressed Fashion-MNIST's .gz files, so their bytes differ), the checksum of the decompressed
content; and where no such checksum is known, the structure: headers, counts, sizes and label ranges.
A known content checksum that does not match is an error. Every load also checks the structure.
"""

from __future__ import annotations

import json
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import cifar, idx
from .errors import ChecksumMismatch, CorruptFile, DataError
from .fileio import atomic_open, atomic_write, file_digests
from .folder import load_npz
from .registry import REGISTRY, DatasetSpec, FileSpec, Found, cache_root

CHECK_OFFICIAL = "official checksum"
CHECK_CONTENT = "content checksum"
CHECK_STRUCTURE = "structure"


@dataclass(frozen=True)
class FileCheck:
    """The verification one file passed.

    Attributes:
        path: the file.
        check: CHECK_OFFICIAL, CHECK_CONTENT or CHECK_STRUCTURE.
        detail: the exact check, e.g. "md5 8d4fb7e6... of the published file".
    """

    path: Path
    check: str
    detail: str
    cached: bool = False

    def __str__(self) -> str:
        return f"{self.path.name}: {self.detail}"


def summarize_checks(checks: list[FileCheck]) -> str:
    """One line saying which verification the files passed."""
    kinds = {c.check for c in checks}
    if len(kinds) == 1:
        k = kinds.pop()
        words = {
            CHECK_OFFICIAL: "official checksums of the published files",
            CHECK_CONTENT: "checksums of the decompressed content (re-packaged copy of the official files)",
            CHECK_STRUCTURE: "structure only (headers, counts, sizes, label ranges; no known checksum matched)",
        }[k]
        text = f"verified by {words} ({len(checks)} files)"
    else:
        text = "verified: " + "; ".join(str(c) for c in checks)
    if any(c.cached for c in checks):
        text += "; fast path: read from verified decompressed copies in the user cache"
    return text


def _known_digests() -> dict[str, tuple[str, str]]:
    out = {}
    for spec in REGISTRY.values():
        for fs in (*spec.files, *(x for x in (spec.archive, spec.keras_npz) if x is not None)):
            for d in (fs.md5, fs.sha256, fs.content_sha256):
                if d:
                    out[d] = (spec.name, fs.name)
    return out


def _other_dataset(spec: DatasetSpec, fs: FileSpec, digests: list[str], path: Path) -> None:
    known = _known_digests()
    for d in digests:
        hit = known.get(d)
        if hit and (hit[0] != spec.name or hit[1] != fs.name):
            raise CorruptFile(path, f"this is {hit[0]}'s {hit[1]}, not {spec.name}'s {fs.name}")


# ------------------------------------------------------------------------------- decompressed copies

def _dcache_dir(spec: DatasetSpec) -> Path:
    return cache_root() / "decompressed" / spec.name


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"origin": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _raw_name(fs: FileSpec) -> str:
    return fs.name[:-3] if fs.name.endswith(".gz") else fs.name


def _dcache_get(spec: DatasetSpec, fs: FileSpec, src: Path):
    raw = _dcache_dir(spec) / _raw_name(fs)
    meta_path = raw.with_name(raw.name + ".json")
    try:
        meta = json.loads(meta_path.read_text())
        if any(meta.get(k) != v for k, v in _stat_key(src).items()):
            return None
        header, arr = idx.read_idx_with_header(raw)
    except (OSError, ValueError, CorruptFile):
        return None
    if idx.content_sha256(header, arr) != meta.get("content_sha256"):
        return None
    check = FileCheck(src, meta["check"], f"{meta['detail']} (fast path: decompressed copy {raw}, "
                                          f"its sha256 re-checked)", cached=True)
    return arr, check


def _dcache_put(spec: DatasetSpec, fs: FileSpec, src: Path, header: bytes, arr: np.ndarray, digest: str,
                check: FileCheck) -> None:
    raw = _dcache_dir(spec) / _raw_name(fs)
    try:
        with atomic_open(raw, "wb") as f:
            f.write(header)
            f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        meta = {**_stat_key(src), "content_sha256": digest, "check": check.check, "detail": check.detail}
        atomic_write(raw.with_name(raw.name + ".json"), json.dumps(meta, indent=1).encode())
    except OSError as e:
        warnings.warn(f"could not write the decompressed copy {raw} ({e}); loading stays correct but slower",
                      stacklevel=3)


# ---------------------------------------------------------------------------------------- IDX files

def check_idx_file(spec: DatasetSpec, fs: FileSpec, path: Path, use_cache: bool = True) -> tuple[np.ndarray, FileCheck]:
    """Verify and read one IDX file of a registered dataset.

    Args:
        spec: the dataset.
        fs: which of its files this is.
        path: the file found (gzip or raw).
        use_cache: read (and write) the verified decompressed copy in the user cache for .gz files.

    Returns:
        (array, check): the data, `(N, H, W)` or `(N,)` uint8, and the check it passed.
    """
    gz = idx.is_gzip(path)
    if gz and use_cache:
        hit = _dcache_get(spec, fs, path)
        if hit is not None:
            return hit
    official = None
    stored = []
    if gz:
        d = file_digests(path, ("md5", "sha256"))
        stored = [d["md5"], d["sha256"]]
        if fs.md5 and d["md5"] == fs.md5:
            official = FileCheck(path, CHECK_OFFICIAL, f"md5 {fs.md5} of the published file")
        elif fs.sha256 and d["sha256"] == fs.sha256:
            official = FileCheck(path, CHECK_OFFICIAL, f"sha256 {fs.sha256} of the published file")
        else:
            _other_dataset(spec, fs, stored, path)
    header, arr = idx.read_idx_with_header(path)
    digest = idx.content_sha256(header, arr)
    check = official
    if check is None:
        if fs.content_sha256 and digest == fs.content_sha256:
            what = "re-packaged copy" if gz else "uncompressed copy"
            check = FileCheck(path, CHECK_CONTENT, f"sha256 {digest} of the decompressed content ({what})")
        else:
            _other_dataset(spec, fs, [digest], path)
            if fs.content_sha256:
                raise ChecksumMismatch(
                    path,
                    f"checksum mismatch: the decompressed content has sha256 {digest}, the official "
                    f"{spec.name} {_raw_name(fs)} has {fs.content_sha256}"
                    + (f" (and the file's md5 {stored[0]} is not the published {fs.md5})" if stored and fs.md5 else "")
                    + "; the file is corrupt or a different dataset: delete it and fetch it again",
                )
            check = FileCheck(path, CHECK_STRUCTURE, "headers, counts and sizes (no known checksum matched: "
                                                     "not the published bytes, and no content checksum is known)")
    if arr.dtype != np.uint8:
        raise CorruptFile(path, f"IDX data type is {arr.dtype}, expected unsigned bytes (type 0x08)")
    if gz and use_cache:
        _dcache_put(spec, fs, path, header, arr, digest, check)
    return arr, check


def _check_images_labels(spec: DatasetSpec, split: str, ximg: torch.Tensor, ylab: torch.Tensor,
                         xpath: Path, ypath: Path) -> None:
    c, h, w = spec.input_shape
    if tuple(ximg.shape[1:]) != (c, h, w):
        hint = f"; for another IDX data set use --dataset idx:{xpath.parent}" if spec.kind == "idx" else ""
        raise CorruptFile(xpath, f"images have shape {tuple(ximg.shape[1:])}, expected {(c, h, w)} for "
                                 f"{spec.name}{hint}")
    if ylab.ndim != 1:
        raise CorruptFile(ypath, f"labels must be one-dimensional, got shape {tuple(ylab.shape)}")
    if len(ximg) != len(ylab):
        raise CorruptFile(xpath, f"different numbers of images and labels: {len(ximg)} images here but "
                                 f"{len(ylab)} labels in {ypath.name}")
    expected = spec.train_count if split == "train" else spec.test_count
    if expected is not None and len(ximg) != expected:
        hint = (f"; for an IDX data set with other counts (a subset, another data set) use --dataset "
                f"idx:{xpath.parent}" if spec.kind == "idx" else "")
        raise CorruptFile(xpath, f"holds {len(ximg)} images; the {split} set of {spec.name} has {expected}{hint}")
    if len(ylab):
        lo, hi = int(ylab.min()), int(ylab.max())
        if lo < 0 or hi >= spec.num_classes:
            bad = lo if lo < 0 else hi
            raise CorruptFile(ypath, f"labels out of range: found label {bad}, expected 0 to {spec.num_classes - 1}")


def _load_idx(spec: DatasetSpec, found: Found, use_cache: bool):
    arrays, checks, paths = {}, [], {}
    for fs in spec.files:
        p = found.paths[fs.name]
        arr, chk = check_idx_file(spec, fs, p, use_cache)
        arrays[fs.role], paths[fs.role] = arr, p
        checks.append(chk)
    out = {}
    for split, prefix in (("train", "train"), ("test", "test")):
        x = arrays[f"{prefix}_images"]
        y = arrays[f"{prefix}_labels"]
        xp, yp = paths[f"{prefix}_images"], paths[f"{prefix}_labels"]
        if x.ndim != 3:
            raise CorruptFile(xp, f"expected images with dimensions (N, H, W), the header gives {x.shape}")
        xt = torch.from_numpy(x).unsqueeze(1)
        yt = torch.from_numpy(y.astype(np.int64))
        _check_images_labels(spec, split, xt, yt, xp, yp)
        out[f"x_{split}"], out[f"y_{split}"] = xt, yt
    out["classes"] = list(spec.classes)
    return out, checks


# ------------------------------------------------------------------------------------------- CIFAR

def _cifar_keys(spec: DatasetSpec) -> tuple[str, str]:
    return ("labels", "label_names") if spec.kind == "cifar10" else ("fine_labels", "fine_label_names")


def check_plain_file(fs: FileSpec, path: Path) -> tuple[bytes, FileCheck]:
    """Read a file that is used as published (CIFAR batch, archive, .npz) and match its published checksum.

    Returns:
        (bytes, check); the check is CHECK_STRUCTURE when no published checksum matched, to be confirmed
        by the caller's parsing.
    """
    data = path.read_bytes()
    import hashlib

    md5 = hashlib.md5(data).hexdigest() if fs.md5 else None
    sha = hashlib.sha256(data).hexdigest() if fs.sha256 else None
    if fs.md5 and md5 == fs.md5:
        return data, FileCheck(path, CHECK_OFFICIAL, f"md5 {fs.md5} of the published file")
    if fs.sha256 and sha == fs.sha256:
        return data, FileCheck(path, CHECK_OFFICIAL, f"sha256 {fs.sha256} of the published file")
    return data, FileCheck(path, CHECK_STRUCTURE, "structure: keys, array shapes, counts and label ranges "
                                                  "(not the published bytes; no content checksum is known)")


def _load_cifar(spec: DatasetSpec, found: Found):
    label_key, names_key = _cifar_keys(spec)
    checks, parts = [], {"train": [], "test": []}
    classes = list(spec.classes)
    first = {}
    for fs in spec.files:
        p = found.paths[fs.name]
        data, chk = check_plain_file(fs, p)
        checks.append(chk)
        if fs.role == "meta":
            names = cifar.parse_cifar_meta(data, names_key, p)
            if len(names) != spec.num_classes:
                raise CorruptFile(p, f"lists {len(names)} class names, {spec.name} has {spec.num_classes}")
            classes = names
            continue
        split = "train" if fs.role == "train_batch" else "test"
        first.setdefault(split, p)
        parts[split].append(cifar.parse_cifar_batch(data, label_key, spec.num_classes, p))
    out = {}
    for split in ("train", "test"):
        x = torch.cat([a for a, _ in parts[split]])
        y = torch.cat([b for _, b in parts[split]])
        _check_images_labels(spec, split, x, y, first[split], first[split])
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    out["classes"] = classes
    return out, checks


def install_archive(spec: DatasetSpec, archive: Path, dest: Path | None = None) -> tuple[Path, FileCheck]:
    """Check a dataset archive (CIFAR's .tar.gz) and unpack the dataset's files into `dest`.

    Only the expected members are read, as bytes, and each is written atomically; links, absolute paths
    and anything else in the archive are ignored, so a hostile archive cannot write elsewhere.

    Args:
        spec: the dataset.
        archive: the .tar.gz file.
        dest: folder to unpack into (default: the dataset's folder in the user cache).

    Returns:
        (dest, check): the folder and the check the archive passed.
    """
    if spec.archive is None or spec.archive_dir is None:
        raise DataError(f"{spec.name} is not distributed as an archive")
    dest = Path(dest) if dest is not None else cache_root() / spec.name
    check = FileCheck(archive, CHECK_STRUCTURE, "archive members present; each member checked when loaded")
    if spec.archive.md5 or spec.archive.sha256:
        d = file_digests(archive, ("md5", "sha256"))
        if spec.archive.md5 and d["md5"] == spec.archive.md5:
            check = FileCheck(archive, CHECK_OFFICIAL, f"md5 {spec.archive.md5} of the published archive")
        elif spec.archive.sha256 and d["sha256"] == spec.archive.sha256:
            check = FileCheck(archive, CHECK_OFFICIAL, f"sha256 {spec.archive.sha256} of the published archive")
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = {m.name: m for m in tf.getmembers()}
            for fs in spec.files:
                m = members.get(f"{spec.archive_dir}/{fs.name}")
                if m is None or not m.isfile():
                    raise CorruptFile(archive, f"the archive has no regular file {spec.archive_dir}/{fs.name}")
            for fs in spec.files:
                m = members[f"{spec.archive_dir}/{fs.name}"]
                f = tf.extractfile(m)
                with atomic_open(dest / fs.name, "wb") as out:
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
    except CorruptFile:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptFile(archive, f"unreadable archive ({e}); delete it and fetch it again") from None
    return dest, check


# ------------------------------------------------------------------------------------------ Keras npz

def _load_keras_npz(spec: DatasetSpec, found: Found):
    p = found.paths["npz"]
    _, chk = check_plain_file(spec.keras_npz, p)
    parts = load_npz(p)
    for split in ("train", "test"):
        _check_images_labels(spec, split, parts[f"x_{split}"], parts[f"y_{split}"], p, p)
    parts["classes"] = list(spec.classes)
    return parts, [chk]


def load_found(found: Found, use_cache: bool = True) -> tuple[dict, list[FileCheck], Found]:
    """Verify and read a registered dataset from where `registry.find` found it.

    Args:
        found: the location.
        use_cache: use the user cache for decompressed copies and for unpacking archives.

    Returns:
        (parts, checks, found): {"x_train", "y_train", "x_test", "y_test", "classes"} with uint8 images
        `(N, C, H, W)` and int64 labels `(N,)`; the checks passed; and the location finally read (an
        archive is unpacked into the user cache first).
    """
    spec = found.spec
    pre = []
    if found.layout == "archive":
        dest, chk = install_archive(spec, found.paths["archive"])
        pre.append(chk)
        from .registry import Place

        paths = {fs.name: dest / fs.name for fs in spec.files}
        found = Found(spec, Place(f"unpacked from {found.paths['archive']} into the user cache", dest), "files", paths)
    if found.layout == "keras_npz":
        parts, checks = _load_keras_npz(spec, found)
    elif spec.kind == "idx":
        parts, checks = _load_idx(spec, found, use_cache)
    else:
        parts, checks = _load_cifar(spec, found)
    return parts, pre + checks, found


def verify_found(found: Found) -> list[FileCheck]:
    """Verify every file of a found dataset from scratch (no cached copies). Raises DataError on failure."""
    _, checks, _ = load_found(found, use_cache=False)
    return checks

