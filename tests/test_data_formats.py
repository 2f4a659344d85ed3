"""Dataset files in their real formats: IDX sets, CIFAR pickles, image folders, .npz; verification,
search order, validation split, and every bad-input case."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from convdescent.data import (ChecksumMismatch, CorruptFile, DataError, load_dataset, locate, read_idx, registry,
                              split_train_val, write_idx)
from convdescent.data.sources import CHECK_CONTENT, CHECK_OFFICIAL
from convdescent.data.synthetic import (cifar_spec_for, idx_spec_for, write_cifar_dataset, write_idx_dataset,
                                        write_image_folder, write_npz_dataset)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("CONVDESCENT_DATA", raising=False)
    monkeypatch.setenv("CONVDESCENT_MIRRORS", "http://127.0.0.1:9/")  # never reach the internet
    monkeypatch.setattr(registry, "SYSTEM_ROOTS", [tmp_path / "system"])
    yield
    for name in [n for n in registry.REGISTRY if n.startswith("tiny")]:
        registry.unregister_dataset(name)


def _tiny(tmp_path, name="tiny", checksums=True, **kw):
    folder = tmp_path / "pub" / name
    out = write_idx_dataset(folder, n_train=40, n_test=10, hw=(8, 8), **kw)
    spec = idx_spec_for(folder, name, hw=(8, 8), train_count=40, test_count=10, with_checksums=checksums)
    registry.register_dataset(spec, replace=True)
    return folder, out


def _raises(exc, path, *words, call):
    with pytest.raises(exc) as e:
        call()
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- IDX sets

def test_idx_dataset_official_checksum_and_values(tmp_path):
    folder, out = _tiny(tmp_path)
    ds = load_dataset("tiny", data_dir=tmp_path / "pub", val_split=0, download=False)
    assert torch.equal(ds.x_train, out["x_train"]) and torch.equal(ds.y_test, out["y_test"])
    assert ds.x_train.shape == (40, 1, 8, 8) and ds.y_train.dtype == torch.int64
    assert "official checksums" in ds.source and str(folder) in ds.source


def test_recompressed_and_uncompressed_copies_pass_by_content_checksum(tmp_path):
    folder, out = _tiny(tmp_path)
    repack = tmp_path / "repack" / "tiny"
    repack.mkdir(parents=True)
    for p in folder.iterdir():  # like Debian: same content, gzip re-run with other settings
        (repack / p.name).write_bytes(gzip.compress(gzip.decompress(p.read_bytes()), compresslevel=1, mtime=123))
    ds = load_dataset("tiny", data_dir=repack.parent, val_split=0, download=False)
    assert "decompressed content (re-packaged" in ds.source
    raw = tmp_path / "raw" / "tiny"
    raw.mkdir(parents=True)
    for p in folder.iterdir():
        (raw / p.name[:-3]).write_bytes(gzip.decompress(p.read_bytes()))
    ds2 = load_dataset("tiny", data_dir=raw.parent, val_split=0, download=False)
    assert torch.equal(ds2.x_train, out["x_train"])
    from convdescent.data.download import verify

    _, checks = verify("tiny", raw.parent)
    assert {c.check for c in checks} == {CHECK_CONTENT}


def test_structure_only_verification_is_reported(tmp_path):
    _tiny(tmp_path, checksums=False)
    ds = load_dataset("tiny", data_dir=tmp_path / "pub", val_split=0, download=False)
    assert "structure only" in ds.source


def test_known_content_checksum_mismatch_is_an_error(tmp_path):
    folder, out = _tiny(tmp_path)
    x = out["x_train"][:, 0].clone()
    x[0, 0, 0] ^= 1
    write_idx(folder / "train-images-idx3-ubyte.gz", x)
    _raises(ChecksumMismatch, folder / "train-images-idx3-ubyte.gz", "checksum mismatch", "fetch it again",
            call=lambda: load_dataset("tiny", data_dir=tmp_path / "pub", download=False))


def test_file_of_another_dataset_is_named(tmp_path):
    a, _ = _tiny(tmp_path, "tiny-a")
    b, _ = _tiny(tmp_path, "tiny-b", seed=5)
    (b / "t10k-images-idx3-ubyte.gz").write_bytes((a / "t10k-images-idx3-ubyte.gz").read_bytes())
    _raises(CorruptFile, b / "t10k-images-idx3-ubyte.gz", "this is tiny-a's t10k-images-idx3-ubyte.gz, not tiny-b's",
            call=lambda: load_dataset("tiny-b", data_dir=tmp_path / "pub", download=False))


def test_different_numbers_of_images_and_labels(tmp_path):
    folder, out = _tiny(tmp_path, checksums=False)
    write_idx(folder / "train-labels-idx1-ubyte.gz", out["y_train"][:39].to(torch.uint8))
    _raises(CorruptFile, folder / "train-images-idx3-ubyte.gz", "different numbers of images and labels",
            "40 images", "39 labels in train-labels-idx1-ubyte.gz",
            call=lambda: load_dataset("tiny", data_dir=tmp_path / "pub", download=False))


def test_labels_out_of_range(tmp_path):
    folder, out = _tiny(tmp_path, checksums=False)
    y = out["y_test"].to(torch.uint8).clone()
    y[3] = 12
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y)
    _raises(CorruptFile, folder / "t10k-labels-idx1-ubyte.gz", "labels out of range", "found label 12", "0 to 9",
            call=lambda: load_dataset("tiny", data_dir=tmp_path / "pub", download=False))


def test_wrong_count_and_wrong_image_size(tmp_path):
    folder, out = _tiny(tmp_path, checksums=False)
    write_idx(folder / "train-images-idx3-ubyte.gz", out["x_train"][:30, 0])
    write_idx(folder / "train-labels-idx1-ubyte.gz", out["y_train"][:30].to(torch.uint8))
    _raises(CorruptFile, folder / "train-images-idx3-ubyte.gz", "holds 30 images", "has 40",
            call=lambda: load_dataset("tiny", data_dir=tmp_path / "pub", download=False))
    write_idx(folder / "train-images-idx3-ubyte.gz", torch.zeros(40, 9, 9, dtype=torch.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", out["y_train"].to(torch.uint8))
    _raises(CorruptFile, folder / "train-images-idx3-ubyte.gz", "shape (1, 9, 9)", "expected (1, 8, 8)",
            call=lambda: load_dataset("tiny", data_dir=tmp_path / "pub", download=False))


def test_corrupt_gzip_inside_a_dataset_names_the_file(tmp_path):
    folder, _ = _tiny(tmp_path, checksums=False)
    p = folder / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-30])
    _raises(CorruptFile, p, "truncated", call=lambda: load_dataset("tiny", data_dir=tmp_path / "pub", download=False))


def test_decompressed_copy_is_used_and_invalidated(tmp_path):
    folder, out = _tiny(tmp_path)
    first = load_dataset("tiny", data_dir=tmp_path / "pub", val_split=0, download=False)
    assert "fast path" not in first.source
    second = load_dataset("tiny", data_dir=tmp_path / "pub", val_split=0, download=False)
    assert "fast path" in second.source and torch.equal(second.x_train, out["x_train"])
    # A damaged cached copy is not trusted: its sha256 no longer matches, so the source is read again.
    cached = tmp_path / "cache" / "convdescent" / "decompressed" / "tiny" / "train-images-idx3-ubyte"
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    third = load_dataset("tiny", data_dir=tmp_path / "pub", val_split=0, download=False)
    assert torch.equal(third.x_train, out["x_train"])
    # A changed source invalidates the copy (and here fails its checksum).
    x = out["x_train"][:, 0].clone()
    x[1, 1, 1] ^= 4
    write_idx(folder / "train-images-idx3-ubyte.gz", x)
    os.utime(folder / "train-images-idx3-ubyte.gz", ns=(1, 10**18))
    with pytest.raises(ChecksumMismatch):
        load_dataset("tiny", data_dir=tmp_path / "pub", download=False)


# ---------------------------------------------------------------------------------------------- search order

def test_search_order(tmp_path, monkeypatch):
    _tiny(tmp_path)
    import shutil

    src = tmp_path / "pub" / "tiny"
    places = {
        "data_dir": tmp_path / "dd" / "tiny",
        "env": tmp_path / "env" / "tiny",
        "cache": tmp_path / "cache" / "convdescent" / "tiny",
        "system": tmp_path / "system" / "tiny",
    }
    for p in places.values():
        shutil.copytree(src, p)
    monkeypatch.setenv("CONVDESCENT_DATA", str(tmp_path / "env"))
    assert locate("tiny", tmp_path / "dd") == places["data_dir"]
    assert locate("tiny") == places["env"]
    monkeypatch.delenv("CONVDESCENT_DATA")
    assert locate("tiny") == places["cache"]
    shutil.rmtree(places["cache"])
    assert locate("tiny") == places["system"]
    ds = load_dataset("tiny", download=False, val_split=0)
    assert "system location" in ds.source
    shutil.rmtree(places["system"])
    assert locate("tiny") is None
    # The data_dir itself may hold the files directly.
    assert locate("tiny", places["data_dir"]) == places["data_dir"]


def test_keras_and_torchvision_layouts(tmp_path):
    keras = tmp_path / "keras" / "datasets"
    keras.mkdir(parents=True)
    write_npz_dataset(keras / "mnist.npz", n=12, num_classes=10, shape=(28, 28), test=False)
    found = registry.find("mnist")
    assert found.layout == "keras_npz" and found.place.label == "Keras cache"
    # Synthetic stand-in: the structure check against the real MNIST counts rejects it by name.
    with pytest.raises(CorruptFile, match="the train set of mnist has 60000"):
        load_dataset("mnist", download=False)
    tv = tmp_path / "tv" / "FashionMNIST" / "raw"
    write_idx_dataset(tv, n_train=4, n_test=2)
    assert locate("fashion-mnist", tmp_path / "tv") == tv


# ---------------------------------------------------------------------------------------------- CIFAR

def _cifar(tmp_path, kind="cifar10", name="tiny-cifar"):
    folder = tmp_path / "pub" / name
    out = write_cifar_dataset(folder, kind, n_per_batch=6)
    spec = cifar_spec_for(out["files"], name, kind, n_per_batch=6)
    registry.register_dataset(spec, replace=True)
    return folder, out


def test_cifar10_batches(tmp_path):
    folder, out = _cifar(tmp_path)
    ds = load_dataset("tiny-cifar", data_dir=tmp_path / "pub", val_split=0, download=False)
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert torch.equal(ds.x_train, out["x_train"]) and torch.equal(ds.y_train, out["y_train"])
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    assert "official checksums" in ds.source


def test_cifar100_fine_labels(tmp_path):
    _, out = _cifar(tmp_path, "cifar100", "tiny-c100")
    ds = load_dataset("tiny-c100", data_dir=tmp_path / "pub", val_split=0, download=False)
    assert ds.num_classes == 100 and ds.classes[-1] == "worm"
    assert torch.equal(ds.y_test, out["y_test"])


def test_builtin_cifar10_checks_counts_and_layouts(tmp_path):
    write_cifar_dataset(tmp_path / "dd" / "cifar-10-batches-py", "cifar10", n_per_batch=4)
    assert locate("cifar10", tmp_path / "dd") == tmp_path / "dd" / "cifar-10-batches-py"
    with pytest.raises(CorruptFile, match="holds 20 images; the train set of cifar10 has 50000"):
        load_dataset("cifar10", data_dir=tmp_path / "dd", download=False)


def test_local_archive_is_unpacked_into_the_cache(tmp_path):
    arch = tmp_path / "dd" / "tiny-arch" / "cifar-10-python.tar.gz"
    out = write_cifar_dataset(tmp_path / "pub", "cifar10", n_per_batch=6, archive=arch)
    registry.register_dataset(cifar_spec_for(out["files"], "tiny-arch", "cifar10", 6, archive=arch), replace=True)
    found = registry.find("tiny-arch", tmp_path / "dd")
    assert found.layout == "archive"
    ds = load_dataset("tiny-arch", data_dir=tmp_path / "dd", val_split=0, download=False)
    assert torch.equal(ds.x_test, out["x_test"])
    assert (tmp_path / "cache" / "convdescent" / "tiny-arch" / "data_batch_3").is_file()
    assert "official checksum" in ds.source or CHECK_OFFICIAL in ds.source


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_cannot_run_code(tmp_path):
    folder, _ = _cifar(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    msg = _raises(CorruptFile, folder / "data_batch_2", "not a CIFAR batch", "refusing",
                  call=lambda: load_dataset("tiny-cifar", data_dir=tmp_path / "pub", download=False))
    assert "system" in msg
    assert not marker.exists()
    (folder / "data_batch_2").write_bytes(pickle.dumps(np.array([None, 1], dtype=object), protocol=2))
    _raises(CorruptFile, folder / "data_batch_2", "not a CIFAR batch",
            call=lambda: load_dataset("tiny-cifar", data_dir=tmp_path / "pub", download=False))


@pytest.mark.parametrize("payload, words", [
    (lambda: pickle.dumps([1, 2, 3], protocol=2), ["holds a list, not a dict"]),
    (lambda: pickle.dumps({b"data": np.zeros((6, 3072), np.uint8)}, protocol=2), ["expected keys 'data' and 'labels'"]),
    (lambda: pickle.dumps({b"data": np.zeros((6, 100), np.uint8), b"labels": [0] * 6}, protocol=2),
     ["shape (n, 3072)", "(6, 100)"]),
    (lambda: pickle.dumps({b"data": np.zeros((6, 3072), np.float32), b"labels": [0] * 6}, protocol=2), ["float32"]),
    (lambda: pickle.dumps({b"data": np.zeros((6, 3072), np.uint8), b"labels": [0] * 5}, protocol=2),
     ["different numbers of images and labels", "6 images but 5 labels"]),
    (lambda: pickle.dumps({b"data": np.zeros((6, 3072), np.uint8), b"labels": [0, 1, 2, 3, 4, 10]}, protocol=2),
     ["labels out of range", "found label 10"]),
    (lambda: pickle.dumps({b"data": np.zeros((6, 3072), np.uint8), b"labels": [0] * 6}, protocol=2)[:-40],
     ["not a CIFAR batch"]),
    (lambda: b"this is not a pickle at all", ["not a CIFAR batch"]),
])
def test_bad_cifar_batches(tmp_path, payload, words):
    folder, _ = _cifar(tmp_path)
    (folder / "test_batch").write_bytes(payload())
    _raises(CorruptFile, folder / "test_batch", *words,
            call=lambda: load_dataset("tiny-cifar", data_dir=tmp_path / "pub", download=False))


# ---------------------------------------------------------------------------------------------- image folders

def test_image_folder_rgb_png(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("dog", "cat"), per_class=3, size=(12, 10))
    (root / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset(f"folder:{root}", val_split=0)
    assert ds.classes == ["cat", "dog"]
    assert ds.x_train.shape == (6, 3, 10, 12) and ds.x_train.dtype == torch.uint8
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.x_test.shape == (0, 3, 10, 12)
    from PIL import Image

    first = np.array(Image.open(root / "cat" / "0.png"))
    assert torch.equal(ds.x_train[0], torch.from_numpy(first).permute(2, 0, 1))


def test_image_folder_grayscale_jpeg_resize_and_train_test(tmp_path):
    write_image_folder(tmp_path / "d" / "train", classes=("a", "b", "c"), per_class=2, size=(9, 7), mode="L", fmt="jpg")
    write_image_folder(tmp_path / "d" / "test", classes=("a", "b", "c"), per_class=1, size=(5, 5), mode="L", fmt="jpeg")
    ds = load_dataset(str(tmp_path / "d"), image_size=(6, 8), val_split=2, seed=1)
    assert ds.input_shape == (1, 6, 8)
    assert len(ds.x_train) == 4 and len(ds.x_val) == 2 and ds.x_test.shape == (3, 1, 6, 8)
    rgb = load_dataset(f"folder:{tmp_path / 'd'}", image_size=8, color_mode="rgb", val_split=0)
    assert rgb.input_shape == (3, 8, 8) and rgb.x_test.shape == (3, 3, 8, 8)


def test_image_folder_errors(tmp_path):
    root = write_image_folder(tmp_path / "a", classes=("x", "y"), per_class=2)
    (root / "x" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _raises(CorruptFile, root / "x" / "broken.png", "unreadable image", call=lambda: load_dataset(f"folder:{root}"))
    root = write_image_folder(tmp_path / "b", classes=("x", "y"), per_class=2)
    (root / "z").mkdir()
    _raises(CorruptFile, root / "z", "empty class folder", call=lambda: load_dataset(f"folder:{root}"))
    root = write_image_folder(tmp_path / "c", classes=("x",), per_class=2, size=(8, 8))
    write_image_folder(tmp_path / "c", classes=("y",), per_class=1, size=(9, 8))
    _raises(CorruptFile, root / "y" / "0.png", "differs from 8x8", "image_size",
            call=lambda: load_dataset(f"folder:{root}"))
    (tmp_path / "e").mkdir()
    _raises(CorruptFile, tmp_path / "e", "no class subfolders", call=lambda: load_dataset(f"folder:{tmp_path / 'e'}"))
    with pytest.raises(ValueError, match="image_size must be positive, got -3"):
        load_dataset(f"folder:{root}", image_size=-3)
    with pytest.raises(ValueError, match="color_mode must be one of"):
        load_dataset(f"folder:{root}", image_size=8, color_mode="cmyk")


# ---------------------------------------------------------------------------------------------- npz

def test_npz_nhwc_with_classes(tmp_path):
    arrays = write_npz_dataset(tmp_path / "d.npz", n=30, num_classes=3, shape=(8, 8, 3), classes=["r", "g", "b"])
    ds = load_dataset(str(tmp_path / "d.npz"), val_split=0.2, seed=0)
    assert ds.classes == ["r", "g", "b"] and ds.input_shape == (3, 8, 8)
    assert len(ds.x_train) == 24 and len(ds.x_val) == 6 and len(ds.x_test) == 10
    assert torch.equal(ds.x_test, torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2))


def test_npz_keras_keys_and_default_class_names(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (10, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "k.npz", x_train=x, y_train=np.arange(10) % 4, x_test=x[:3], y_test=np.array([0, 1, 3]))
    ds = load_dataset(f"npz:{tmp_path / 'k.npz'}", val_split=0)
    assert ds.classes == ["0", "1", "2", "3"] and ds.input_shape == (1, 5, 5)


@pytest.mark.parametrize("arrays, words", [
    (dict(x=np.zeros((4, 5, 5), np.float32), y=np.zeros(4, np.int64)), ["dtype float32", "uint8"]),
    (dict(x=np.zeros((4, 5, 5), np.uint8), y=np.zeros(3, np.int64)), ["different numbers of images and labels"]),
    (dict(x=np.zeros((4, 5), np.uint8), y=np.zeros(4, np.int64)), ["shape (4, 5)"]),
    (dict(images=np.zeros((4, 5, 5), np.uint8)), ["expected arrays 'x' and 'y'"]),
    (dict(x=np.zeros((4, 5, 5), np.int32) + 300, y=np.zeros(4, np.int64)), ["outside 0-255"]),
])
def test_bad_npz(tmp_path, arrays, words):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    _raises(CorruptFile, p, *words, call=lambda: load_dataset(f"npz:{p}"))


def test_npz_labels_out_of_range_and_not_a_zip(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1, 5]), classes=np.array(["a", "b"]))
    _raises(DataError, p, "labels out of range", "0 to 1", call=lambda: load_dataset(f"npz:{p}"))
    q = tmp_path / "d.npz"
    q.write_bytes(b"not a zip file")
    _raises(CorruptFile, q, "not a readable .npz", call=lambda: load_dataset(f"npz:{q}"))
    r = tmp_path / "obj.npz"
    np.savez(r, x=np.array([object()], dtype=object), y=np.zeros(1))
    _raises(CorruptFile, r, "holds Python objects", call=lambda: load_dataset(f"npz:{r}"))


# ---------------------------------------------------------------------------------------------- split, names

def test_validation_split_is_deterministic_and_disjoint():
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    y = torch.arange(100)
    a = split_train_val(x, y, 20, seed=3)
    b = split_train_val(x, y, 20, seed=3)
    c = split_train_val(x, y, 20, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[3], c[3])
    assert sorted(torch.cat([a[1], a[3]]).tolist()) == list(range(100))
    assert torch.equal(a[1], a[1].sort().values)  # original order kept
    e = split_train_val(x, y, 0)
    assert e[2].shape == (0, 1, 1, 1) and e[3].shape == (0,)
    with pytest.raises(ValueError, match="val_split must be between 0 and 99 .* got 100"):
        split_train_val(x, y, 100)
    with pytest.raises(ValueError, match="got -1"):
        split_train_val(x, y, -1)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\), got 1.5"):
        split_train_val(x, y, 1.5)


def test_unknown_dataset_and_aliases():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'; known datasets: cifar10"):
        load_dataset("imagenet")
    assert registry.canonical_name("Fashion_MNIST") == "fashion-mnist"
    assert registry.canonical_name("CIFAR-10") == "cifar10"
    assert len(registry.CIFAR100_CLASSES) == 100 == len(set(registry.CIFAR100_CLASSES))
    assert read_idx  # re-exported
