"""--data-dir is what the user chose (read from there only, a missing file named), the header says where
data came from when the user named no place, and any IDX data set loads with idx:PATH."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convdescent.data import DataError, DatasetNotFound, load_dataset, registry
from convdescent.data.errors import CorruptFile
from convdescent.data.synthetic import write_idx_dataset
from convdescent.train.run import train_from_config

ROOT = Path(__file__).resolve().parents[1]
FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("CONVDESCENT_DATA", raising=False)
    monkeypatch.setenv("CONVDESCENT_MIRRORS", "http://127.0.0.1:9/")  # never reach the internet
    monkeypatch.setattr(registry, "SYSTEM_ROOTS", [tmp_path / "system"])


@pytest.fixture
def small_mnist(tmp_path):
    """A registered MNIST-like set with small counts, complete in the user cache."""
    spec = registry.get_spec("mnist")
    from dataclasses import replace

    small = replace(spec, name="mnist-small", train_count=40, test_count=10, aliases=(),
                    files=registry.idx_files(), keras_names=(), keras_npz=None, subdirs=("mnist-small",))
    registry.register_dataset(small, replace=True)
    cache = registry.cache_root() / "mnist-small"
    out = write_idx_dataset(cache, n_train=40, n_test=10, hw=(28, 28))
    yield cache, out
    registry.unregister_dataset("mnist-small")


@pytest.mark.parametrize("missing", FILES)
def test_a_data_dir_missing_a_file_is_an_error_naming_it_never_another_copy(small_mnist, tmp_path, missing):
    mine = tmp_path / "mine"
    write_idx_dataset(mine, n_train=40, n_test=10, hw=(28, 28), seed=5)
    (mine / missing).unlink()
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("mnist-small", data_dir=mine, val_split=0)
    msg = str(info.value)
    assert f"{mine} (from --data-dir) lacks {missing}" in msg, msg
    assert "drop --data-dir" in msg
    # and complete, it is read from there, not from the copy in the cache
    write_idx_dataset(tmp_path / "again", n_train=40, n_test=10, hw=(28, 28), seed=5)
    shutil.copy(tmp_path / "again" / missing, mine / missing)
    ds = load_dataset("mnist-small", data_dir=mine, val_split=0)
    assert str(mine) in ds.source and ds.origin == ""
    assert not torch.equal(ds.x_train, small_mnist[1]["x_train"])


def test_a_data_dir_that_does_not_exist_is_an_error_without_a_download(small_mnist, tmp_path):
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("mnist-small", data_dir=tmp_path / "nope")
    assert f"--data-dir {tmp_path / 'nope'} does not exist" in str(info.value)
    assert "127.0.0.1" not in str(info.value)  # nothing was downloaded for it


def test_the_header_says_where_data_came_from_when_no_place_was_named(small_mnist, tmp_path):
    cache, _ = small_mnist
    ds = load_dataset("mnist-small", val_split=0)
    assert ds.origin == f"{cache} (user cache)"
    out = io.StringIO()
    cfg = {"model": "seed_cnn", "dataset": "mnist-small", "val_split": 10, "epochs": 1, "out": str(tmp_path / "r"),
           "log_every": 0, "health_every": 0}
    train_from_config(cfg, display="lines", stream=out)
    header = next(line for line in out.getvalue().splitlines() if line.startswith("Model "))
    assert f"on mnist-small (from {cache} (user cache)):" in header, header
    out = io.StringIO()
    train_from_config(dict(cfg, data_dir=str(cache)), display="lines", stream=out)
    header = next(line for line in out.getvalue().splitlines() if line.startswith("Model "))
    assert "(from" not in header, header  # the user named the place


def test_mnist_with_other_counts_points_to_idx(tmp_path):
    mine = tmp_path / "subset"
    write_idx_dataset(mine, n_train=50, n_test=20, hw=(28, 28))
    with pytest.raises(CorruptFile) as info:
        load_dataset("mnist", data_dir=mine)
    assert f"--dataset idx:{mine}" in str(info.value)
    p = subprocess.run([sys.executable, "-m", "convdescent.cli", "train", "--dataset", "mnist", "--data-dir",
                        str(mine), "--epochs", "1", "--out", str(tmp_path / "runs")], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 2 and f"idx:{mine}" in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("compress", [True, False])
def test_any_idx_data_set_loads_with_idx_path(tmp_path, compress):
    folder = tmp_path / "digits"
    out = write_idx_dataset(folder, n_train=37, n_test=11, num_classes=5, hw=(12, 9), compress=compress)
    ds = load_dataset(f"idx:{folder}", val_split=7)
    assert ds.name == f"idx:{folder}" and ds.input_shape == (1, 12, 9)
    assert ds.classes == ["0", "1", "2", "3", "4"][: int(out["y_train"].max()) + 1]
    assert len(ds.x_train) + len(ds.x_val) == 37 and torch.equal(ds.x_test, out["x_test"])
    assert torch.equal(ds.y_test, out["y_test"])
    res = train_from_config({"model": "seed_cnn", "dataset": f"idx:{folder}", "val_split": 7, "epochs": 1,
                             "out": str(tmp_path / "r"), "log_every": 0, "health_every": 0}, display="none")
    assert res.summary["status"] == "completed"


def test_idx_folder_problems_name_the_file(tmp_path):
    folder = tmp_path / "d"
    write_idx_dataset(folder, n_train=20, n_test=5, hw=(8, 8))
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset(f"idx:{folder}")
    write_idx_dataset(tmp_path / "other", n_train=20, n_test=6, hw=(8, 8))
    shutil.copy(tmp_path / "other" / "t10k-labels-idx1-ubyte.gz", folder)
    with pytest.raises(CorruptFile, match="5 images here but 6 labels"):
        load_dataset(f"idx:{folder}")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"idx:{tmp_path / 'none'}")
