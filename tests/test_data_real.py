"""Real Fashion-MNIST from Debian's dataset-fashion-mnist (CI installs it); this test fails if it is absent."""

from pathlib import Path

import pytest
import torch

from convdescent.data import load_dataset, registry

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CONVDESCENT_DATA", raising=False)
    return tmp_path / "cache"


def test_fashion_mnist_from_debian(private_cache):
    assert (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(), (
        f"{DEBIAN_DIR} is missing: install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist", data_dir=DEBIAN_DIR, download=False, val_split=0)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and ds.num_classes == 10
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.dtype == torch.int64 and ds.y_train.shape == (60000,)
    assert ds.x_val.shape == (0, 1, 28, 28) and ds.y_val.shape == (0,)
    assert sorted(ds.y_train.unique().tolist()) == list(range(10))
    assert ds.y_train.bincount().tolist() == [6000] * 10
    assert ds.y_test.bincount().tolist() == [1000] * 10
    assert ds.input_shape == (1, 28, 28)
    # Debian re-compressed the files, so they pass by the checksum of their decompressed content.
    assert "decompressed content" in ds.source and str(DEBIAN_DIR) in ds.source

    # Second load comes from the verified decompressed copy and gives identical tensors and split.
    again = load_dataset("fashion-mnist", data_dir=DEBIAN_DIR, download=False, val_split=5000, seed=0)
    assert "fast path" in again.source
    assert len(again.x_train) == 55000 and len(again.x_val) == 5000
    assert (again.y_train.bincount() + again.y_val.bincount()).tolist() == [6000] * 10
    merged = torch.cat([again.x_train, again.x_val])
    assert merged.shape == ds.x_train.shape
    assert torch.equal(merged.sum(dtype=torch.int64), ds.x_train.sum(dtype=torch.int64))
    assert torch.equal(again.x_test, ds.x_test)


def test_fashion_mnist_found_at_system_location_without_data_dir(private_cache):
    assert registry.locate("fashion-mnist") == DEBIAN_DIR
