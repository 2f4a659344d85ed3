"""What each named dataset is, where its files may be, and which checksums identify them.

A `data_dir` argument (--data-dir) is the one place searched: the user chose it, so the files are read
from there or not at all (a missing file is an error naming it and the folder). Without it, the search
order (first hit wins) is: the `CONVDESCENT_DATA` environment variable; the user cache (`$XDG_CACHE_HOME/convdescent`, by default
`~/.cache/convdescent`); well-known system locations (`/usr/share/datasets/<name>`, where Debian's
dataset packages install); the Keras cache (`$KERAS_HOME/datasets` or `~/.keras/datasets`). When none has
it, `download.fetch` tries the dataset's official mirrors in order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

# Roots searched after the user cache; a module constant so tests can point it at a temporary folder.
SYSTEM_ROOTS: list[Path] = [Path("/usr/share/datasets"), Path("/usr/local/share/datasets")]

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGIT_CLASSES = [str(i) for i in range(10)]
# Kuzushiji-MNIST (Clanuwat et al., "Deep Learning for Classical Japanese Literature", 2018): romanized
# readings of the ten hiragana, with the character itself.
KMNIST_CLASSES = ["o (お)", "ki (き)", "su (す)", "tsu (つ)", "na (な)", "ha (は)", "ma (ま)", "ya (や)", "re (れ)", "wo (を)"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset as published, with whatever is known to identify it.

    Attributes:
        name: file name as published (e.g. "train-images-idx3-ubyte.gz").
        role: what it holds: "train_images", "train_labels", "test_images", "test_labels",
            "train_batch", "test_batch", "meta", "archive" or "npz".
        md5, sha256: digests of the published file's bytes (None where unknown).
        size: size in bytes of the published file (None where unknown).
        content_sha256: SHA-256 of the decompressed content, which stays the same when a distributor
            re-compresses the file (None where unknown).
        alt_names: other names under which the same content is accepted (e.g. the uncompressed name).
    """

    name: str
    role: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    content_sha256: str | None = None
    alt_names: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.alt_names)


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its format, classes, files, mirrors and where copies are usually found.

    Attributes:
        name: canonical name used on the command line ("fashion-mnist").
        kind: "idx" (four MNIST-style IDX files), "cifar10" or "cifar100" (python pickle batches).
        classes: class names in label order.
        input_shape: (C, H, W) of one image.
        train_count, test_count: number of images in the official splits (None: not checked).
        files: the files that make up the dataset in a folder.
        archive: for datasets distributed as one archive (CIFAR), the archive to download and the folder
            inside it that holds `files`.
        mirrors: base URLs tried in order; a file's URL is base + file name.
        subdirs: folder names under a search root that may hold the files (the first is the canonical one).
        keras_names: names under the Keras cache (`~/.keras/datasets`): folders, or a file for `keras_npz`.
        keras_npz: a single .npz file Keras downloads instead (MNIST's mnist.npz).
        install_hint: how to get the files from a package manager, if any.
        homepage: where the dataset is described.
    """

    name: str
    kind: str
    classes: list[str]
    input_shape: tuple[int, int, int]
    train_count: int | None
    test_count: int | None
    files: tuple[FileSpec, ...]
    archive: FileSpec | None = None
    archive_dir: str | None = None
    mirrors: tuple[str, ...] = ()
    subdirs: tuple[str, ...] = ()
    keras_names: tuple[str, ...] = ()
    keras_npz: FileSpec | None = None
    install_hint: str | None = None
    homepage: str | None = None
    aliases: tuple[str, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def file(self, role: str) -> FileSpec:
        for f in self.files:
            if f.role == role:
                return f
        raise KeyError(role)


def idx_files(digests: dict[str, tuple[str | None, int | None, str | None]] | None = None) -> tuple[FileSpec, ...]:
    """The four FileSpecs of an MNIST-style dataset.

    Args:
        digests: {stem: (gz md5, gz size, content sha256)} for stems like "train-images-idx3-ubyte";
            missing entries are unknown.
    """
    digests = digests or {}
    roles = {
        "train-images-idx3-ubyte": "train_images",
        "train-labels-idx1-ubyte": "train_labels",
        "t10k-images-idx3-ubyte": "test_images",
        "t10k-labels-idx1-ubyte": "test_labels",
    }
    out = []
    for stem, role in roles.items():
        md5, size, content = digests.get(stem, (None, None, None))
        out.append(FileSpec(f"{stem}.gz", role, md5=md5, size=size, content_sha256=content, alt_names=(stem,)))
    return tuple(out)


# Published .gz md5 and size (as listed by the dataset authors and used by torchvision); content sha256
# of the decompressed IDX files where known (computed from Debian's dataset-fashion-mnist, whose .gz
# files were re-compressed but whose content is the official one).
_BUILTIN = [
    DatasetSpec(
        name="mnist",
        kind="idx",
        classes=DIGIT_CLASSES,
        input_shape=(1, 28, 28),
        train_count=60000,
        test_count=10000,
        files=idx_files({
            "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422, None),
            "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", 28881, None),
            "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", 1648877, None),
            "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", 4542, None),
        }),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        subdirs=("mnist", "MNIST/raw"),
        keras_names=("mnist.npz",),
        keras_npz=FileSpec(
            "mnist.npz", "npz", sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1", size=11490434
        ),
        install_hint=None,
        homepage="http://yann.lecun.com/exdb/mnist/",
    ),
    DatasetSpec(
        name="fashion-mnist",
        kind="idx",
        classes=FASHION_CLASSES,
        input_shape=(1, 28, 28),
        train_count=60000,
        test_count=10000,
        files=idx_files({
            "train-images-idx3-ubyte": (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26421880,
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            "train-labels-idx1-ubyte": (
                "25c81989df183df01b3e8a0aad5dffbe", 29515,
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            "t10k-images-idx3-ubyte": (
                "bef4ecab320f06d8554ea6380940ec79", 4422102,
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            "t10k-labels-idx1-ubyte": (
                "bb300cfdad3c16e7a12a480ee83cd310", 5148,
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        }),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        subdirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        keras_names=("fashion-mnist",),
        install_hint="apt-get install dataset-fashion-mnist (Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist)",
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        aliases=("fashion_mnist", "fashionmnist"),
    ),
    DatasetSpec(
        name="kmnist",
        kind="idx",
        classes=KMNIST_CLASSES,
        input_shape=(1, 28, 28),
        train_count=60000,
        test_count=10000,
        files=idx_files({
            "train-images-idx3-ubyte": ("bdb82020997e1d708af4cf47b453dcf7", None, None),
            "train-labels-idx1-ubyte": ("e144d726b3acfaa3e44228e80efcd344", None, None),
            "t10k-images-idx3-ubyte": ("5c965bf0a639b31b8f53240b1b52f4d7", None, None),
            "t10k-labels-idx1-ubyte": ("7320c461ea6c1c855c0b718fb2a4b134", None, None),
        }),
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        subdirs=("kmnist", "KMNIST/raw"),
        homepage="https://github.com/rois-codh/kmnist",
        aliases=("kuzushiji-mnist",),
    ),
    DatasetSpec(
        name="cifar10",
        kind="cifar10",
        classes=CIFAR10_CLASSES,
        input_shape=(3, 32, 32),
        train_count=50000,
        test_count=10000,
        files=(
            FileSpec("data_batch_1", "train_batch", md5="c99cafc152244af753f735de768cd75f"),
            FileSpec("data_batch_2", "train_batch", md5="d4bba439e000b95fd0a9bffe97cbabec"),
            FileSpec("data_batch_3", "train_batch", md5="54ebc095f3ab1f0389bbae665268c751"),
            FileSpec("data_batch_4", "train_batch", md5="634d18415352ddfa80567beed471001a"),
            FileSpec("data_batch_5", "train_batch", md5="482c414d41f54cd18b22e5b47cb7c3cb"),
            FileSpec("test_batch", "test_batch", md5="40351d587109b95175f43aff81a1287e"),
            FileSpec("batches.meta", "meta", md5="5ff9c542aee3614f3951f8cda6e48888"),
        ),
        archive=FileSpec("cifar-10-python.tar.gz", "archive", md5="c58f30108f718f92721af3b95e74349a", size=170498071),
        archive_dir="cifar-10-batches-py",
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        subdirs=("cifar10", "cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
        keras_names=("cifar-10-batches-py",),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        aliases=("cifar-10",),
    ),
    DatasetSpec(
        name="cifar100",
        kind="cifar100",
        classes=CIFAR100_CLASSES,
        input_shape=(3, 32, 32),
        train_count=50000,
        test_count=10000,
        files=(
            FileSpec("train", "train_batch", md5="16019d7e3df5f24257cddd939b257f8d"),
            FileSpec("test", "test_batch", md5="f0ef6b0ae62326f3e7ffdfab6717acfc"),
            FileSpec("meta", "meta", md5="7973b15100ade9c7d40fb424638fde48"),
        ),
        archive=FileSpec("cifar-100-python.tar.gz", "archive", md5="eb9058c3a382ffc7106e4002c42a8d85"),
        archive_dir="cifar-100-python",
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        subdirs=("cifar100", "cifar-100-python", "cifar100/cifar-100-python"),
        keras_names=("cifar-100-python",),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        aliases=("cifar-100",),
    ),
]

REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in _BUILTIN}


def register_dataset(spec: DatasetSpec, replace: bool = False) -> None:
    """Add a dataset to the registry so that `load_dataset`, `locate`, `fetch` and the CLI know it.

    Args:
        spec: its description.
        replace: allow replacing a dataset of the same name.
    """
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"spec must be a DatasetSpec, got {type(spec).__name__}")
    if spec.name in REGISTRY and not replace:
        raise ValueError(f"a dataset named {spec.name!r} is already registered; pass replace=True to replace it")
    if spec.kind not in ("idx", "cifar10", "cifar100"):
        raise ValueError(f"spec.kind must be 'idx', 'cifar10' or 'cifar100', got {spec.kind!r}")
    REGISTRY[spec.name] = spec


def unregister_dataset(name: str) -> None:
    """Remove a dataset added with `register_dataset`."""
    REGISTRY.pop(name, None)


def canonical_name(name: str) -> str:
    """Map a user-typed name ("Fashion_MNIST", "cifar-10") to its registry name."""
    key = str(name).strip().lower().replace("_", "-")
    if key in REGISTRY:
        return key
    for spec in REGISTRY.values():
        if key in {a.replace("_", "-") for a in spec.aliases} or key.replace("-", "") == spec.name.replace("-", ""):
            return spec.name
    return key


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for a dataset name.

    Raises:
        DataError: the name is not a known dataset; the message lists the known ones.
    """
    key = canonical_name(name)
    if key not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise DataError(
            f"unknown dataset {name!r}; known datasets: {known}; for other data use an image folder "
            f"('folder:PATH') or an .npz file of arrays ('npz:PATH')"
        )
    return REGISTRY[key]


# --------------------------------------------------------------------------------------------- locations

def cache_root() -> Path:
    """The user cache folder: `$XDG_CACHE_HOME/convdescent`, or `~/.cache/convdescent`."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base and os.path.isabs(base):
        return Path(base) / "convdescent"
    return Path.home() / ".cache" / "convdescent"


def keras_root() -> Path:
    """The Keras dataset cache: `$KERAS_HOME/datasets`, or `~/.keras/datasets`."""
    base = os.environ.get("KERAS_HOME")
    return (Path(base) if base else Path.home() / ".keras") / "datasets"


@dataclass(frozen=True)
class Place:
    """One place searched for a dataset.

    Attributes:
        label: where the place comes from ("--data-dir", "$CONVDESCENT_DATA", "user cache", ...).
        path: the folder (or, for a single-file layout, the file) looked at.
    """

    label: str
    path: Path


def search_places(name: str, data_dir: str | Path | None = None) -> list[Place]:
    """Every folder searched for a dataset, in search order.

    Args:
        name: dataset name.
        data_dir: folder given by the user (--data-dir), searched first.

    Returns:
        The places, first to last.
    """
    spec = get_spec(name)
    places: list[Place] = []
    subdirs = spec.subdirs or (spec.name,)

    def under(root: Path, label: str, also_root: bool) -> None:
        for sub in subdirs:
            places.append(Place(label, root / sub))
        if also_root:
            places.append(Place(label, root))

    if data_dir is not None:
        under(Path(data_dir).expanduser(), "--data-dir", True)
        return _unique(places)  # the user named the place: never a copy from elsewhere
    env = os.environ.get("CONVDESCENT_DATA")
    if env:
        under(Path(env).expanduser(), "$CONVDESCENT_DATA", False)
    places.append(Place("user cache", cache_root() / spec.name))
    for root in SYSTEM_ROOTS:
        for sub in dict.fromkeys((spec.name, *subdirs[:1])):
            places.append(Place("system location", root / sub))
    for kname in spec.keras_names:
        places.append(Place("Keras cache", keras_root() / kname))
    return _unique(places)


def _unique(places: list[Place]) -> list[Place]:
    # Drop repeats while keeping the first (highest-priority) label for each folder.
    seen: set[Path] = set()
    out = []
    for p in places:
        if p.path not in seen:
            seen.add(p.path)
            out.append(p)
    return out


@dataclass(frozen=True)
class Found:
    """Where a dataset's files were found.

    Attributes:
        spec: the dataset.
        place: the place searched that held them.
        layout: "files" (the files of `spec.files` in a folder), "archive" (the downloadable archive,
            still packed) or "keras_npz" (Keras's single .npz file).
        paths: role-or-name -> file path for "files"; {"archive": path} or {"npz": path} otherwise.
    """

    spec: DatasetSpec
    place: Place
    layout: str
    paths: dict[str, Path]

    @property
    def path(self) -> Path:
        return self.place.path


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        p = folder / n
        if p.is_file():
            return p
    return None


def find(name: str, data_dir: str | Path | None = None) -> Found | None:
    """Find a dataset's files, trying the places of `search_places` in order (presence only; loading verifies).

    Args:
        name: dataset name.
        data_dir: folder given by the user, searched first.

    Returns:
        Where the files are, or None when no place holds a complete set.
    """
    spec = get_spec(name)
    for place in search_places(spec.name, data_dir):
        p = place.path
        if spec.keras_npz is not None and p.name == spec.keras_npz.name:
            if p.is_file():
                return Found(spec, place, "keras_npz", {"npz": p})
            continue
        if not p.is_dir():
            continue
        paths = {}
        for fs in spec.files:
            hit = _first_existing(p, fs.names)
            if hit is None:
                break
            paths[fs.name] = hit
        else:
            return Found(spec, place, "files", paths)
        if spec.archive is not None:
            hit = _first_existing(p, spec.archive.names)
            if hit is not None:
                return Found(spec, place, "archive", {"archive": hit})
        if spec.keras_npz is not None:
            hit = _first_existing(p, spec.keras_npz.names)
            if hit is not None:
                return Found(spec, place, "keras_npz", {"npz": hit})
    return None


def locate(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The folder (or single file) holding a dataset, following the search order; None if absent.

    Args:
        name: dataset name, e.g. "fashion-mnist".
        data_dir: folder given by the user (--data-dir), searched first.

    Returns:
        The path, or None.
    """
    found = find(name, data_dir)
    return None if found is None else found.path


def missing_in_data_dir(name: str, data_dir: str | Path) -> str:
    """The message for a --data-dir that does not hold the dataset: which files are missing from which folder.

    Args:
        name: dataset name.
        data_dir: the folder the user named.

    Returns:
        The message (names each missing file and the folder looked in; no other place was searched).
    """
    spec = get_spec(name)
    root = Path(data_dir).expanduser()
    best, best_have = root, -1
    for place in search_places(spec.name, root):
        if place.path.is_dir():
            have = sum(_first_existing(place.path, fs.names) is not None for fs in spec.files)
            if have > best_have:
                best, best_have = place.path, have
    if not root.is_dir():
        return (f"--data-dir {root} does not exist (or is not a folder); it must hold the {spec.name} files "
                f"{', '.join(f.name for f in spec.files)}. Drop --data-dir to use a copy found elsewhere")
    missing = [fs for fs in spec.files if _first_existing(best, fs.names) is None]
    names = ", ".join(fs.name + (f" (or {fs.alt_names[0]})" if fs.alt_names else "") for fs in missing)
    where = ", ".join(str(p.path) for p in search_places(spec.name, root))
    text = (f"{best} (from --data-dir) lacks {names} of {spec.name}; --data-dir is the only place read when "
            f"it is given (folders looked in: {where}). Put the missing files there, or drop --data-dir to use "
            f"a copy found elsewhere")
    if spec.archive is not None and len(missing) == len(spec.files):
        text += f" (the archive {spec.archive.name} is accepted there too)"
    return text


def missing_message(name: str, data_dir: str | Path | None = None) -> str:
    """The message for a dataset that is not on disk: places searched, files to put where, how to get them.

    Args:
        name: dataset name.
        data_dir: folder given by the user, if any.

    Returns:
        A multi-line message.
    """
    spec = get_spec(name)
    lines = [f"Dataset {spec.name!r} was not found. Places searched, in order:"]
    for place in search_places(spec.name, data_dir):
        lines.append(f"  {place.label:<18} {place.path}")
    target = cache_root() / spec.name
    lines.append("To fix it, do one of:")
    names = "\n".join(f"      {f.name}" for f in spec.files)
    lines.append(f"  - put these files in {target} (or in $CONVDESCENT_DATA/{spec.name}, or pass --data-dir DIR):")
    lines.append(names)
    if spec.archive is not None:
        lines.append(
            f"    or put the archive {spec.archive.name} there; it is checked and unpacked on first use"
        )
    urls = ", ".join(m + (spec.archive.name if spec.archive else "") for m in spec.mirrors) or "none known"
    lines.append(f"  - download them (official mirrors: {urls}) with: convdescent data fetch {spec.name}")
    if spec.install_hint:
        lines.append(f"  - install the distribution package: {spec.install_hint}")
    return "\n".join(lines)
