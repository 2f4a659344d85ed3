"""Hostile and absurd data files: decompression bombs are one error naming the file, and no reader allocates
more than a small multiple of the data a file really holds, whatever its header announces.

Memory is measured in a fresh process as the growth of its peak virtual size (VmPeak) while one reader
reads one file: an allocation counts there even when its pages are never touched."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convdescent.cli import main
from convdescent.data import CorruptFile, load_dataset
from convdescent.data.images import open_image
from convdescent.train.run import train_from_config

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20

pytestmark = pytest.mark.usefixtures("one_thread")


def png_announcing(path: Path, width: int, height: int, mode: str = "L") -> Path:
    """A small valid PNG whose header is rewritten to announce width x height pixels."""
    buf = io.BytesIO()
    Image.new(mode, (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def idx_announcing(path: Path, dims, data: bytes, compress: bool) -> Path:
    raw = bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + data
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def npz_announcing(path: Path, shape, data: bytes) -> Path:
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", head.getvalue() + data)
        y = io.BytesIO()
        np.save(y, np.zeros(4, dtype=np.int64))
        zf.writestr("y.npy", y.getvalue())
    return path


class _Calls:
    """Pickles as a call of ``fn(*args)``: how a hostile batch makes the unpickler allocate."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def cifar_announcing(path: Path, how: str) -> Path:
    from numpy._core.multiarray import _reconstruct

    huge = (4_000_000_000,)
    data = _Calls(np.ndarray, huge, np.uint8) if how == "ndarray" else _Calls(_reconstruct, np.ndarray, huge, b"b")
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1]}, protocol=2))
    return path


# --------------------------------------------------------------------------------------- decompression bombs

def test_a_decompression_bomb_given_to_open_image_is_one_error_naming_it(tmp_path):
    bomb = png_announcing(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(CorruptFile) as info:
        open_image(bomb)
    assert str(bomb) in str(info.value) and "400 megapixels" in str(info.value)
    # below PIL's own limit, but far more pixels than the file's bytes can decode to
    liar = png_announcing(tmp_path / "liar.png", 8000, 8000, "RGB")
    with pytest.raises(CorruptFile, match="cannot decode to that many"):
        open_image(liar)
    fine = tmp_path / "fine.png"
    Image.new("RGB", (3000, 2000), (10, 20, 30)).save(fine)  # large and very compressible, but real
    assert open_image(fine).size == (3000, 2000)


def test_a_bomb_in_an_image_folder_is_an_error_naming_the_file(tmp_path, capsys):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        for i in range(3):
            png_announcing(root / cls / f"{i}.png", 4, 4)  # the real size: valid images
    bomb = png_announcing(root / "b" / "9.png", 20000, 20000)
    with pytest.raises(CorruptFile) as info:
        load_dataset(f"folder:{root}", val_split=0)
    assert str(bomb) in str(info.value)
    status = main(["train", "--dataset", f"folder:{root}", "--val-split", "0", "--epochs", "1",
                   "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert status == 2 and str(bomb) in err and "Traceback" not in err and err.startswith("convdescent:"), err


def test_a_bomb_given_to_predict_and_explain_is_an_error_naming_the_file(bands_npz, tmp_path, capsys):
    res = train_from_config({"model": "seed_cnn", "dataset": bands_npz, "val_split": 40, "epochs": 1,
                             "out": str(tmp_path), "log_every": 0, "health_every": 0}, display="none")
    bomb = png_announcing(tmp_path / "bomb.png", 20000, 20000)
    for argv in (["predict", str(res.run_dir), str(bomb)], ["explain", str(res.run_dir), "--image", str(bomb)]):
        status = main(argv)
        err = capsys.readouterr().err
        assert status == 2 and str(bomb) in err and "400 megapixels" in err and "Traceback" not in err, (argv, err)


# ------------------------------------------------------------------------------------------------ memory

MEASURE = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from convdescent.data import cifar, folder, idx, images

READERS = {
    "idx": idx.read_idx,
    "npz": folder.load_npz,
    "cifar": lambda p: cifar.parse_cifar_batch(Path(p).read_bytes(), "labels", 10, p),
    "folder": folder.load_image_folder,
    "image": images.open_image,
}

def vm_peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024

kind, path, warm = sys.argv[1], sys.argv[2], sys.argv[3]
READERS[kind](warm)  # first use loads modules and codecs: not the file's doing
before = vm_peak()
try:
    READERS[kind](path)
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {e}"
print(json.dumps({"grew": vm_peak() - before, "error": error}))
"""


def measure(tmp_path, kind, path, warm):
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    p = subprocess.run([sys.executable, str(script), kind, str(path), str(warm)], capture_output=True, text=True,
                       timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def hostile_files(tmp_path):
    """(reader, hostile file, a small valid file of the same kind, what its header announces in bytes)."""
    warm_idx = idx_announcing(tmp_path / "warm.idx", (2, 2, 2), bytes(8), compress=True)
    warm_npz = tmp_path / "warm.npz"
    np.savez(warm_npz, x=np.zeros((2, 2, 2), np.uint8), y=np.zeros(2, np.int64))
    warm_cifar = tmp_path / "warm_batch"
    warm_cifar.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2))
    warm_folder = tmp_path / "warm_folder"
    for cls in ("a", "b"):
        png_announcing(warm_folder / cls / "0.png", 4, 4)
    warm_png = png_announcing(tmp_path / "warm.png", 4, 4)
    claim = 5_000_000 * 28 * 28
    liar_folder = tmp_path / "liar_folder"
    png_announcing(liar_folder / "a" / "0.png", 4, 4)
    png_announcing(liar_folder / "b" / "0.png", 8000, 8000, "RGB")
    return [
        ("idx", idx_announcing(tmp_path / "gz.idx", (5_000_000, 28, 28), bytes(1000), compress=True), warm_idx, claim),
        ("idx", idx_announcing(tmp_path / "raw.idx", (5_000_000, 28, 28), bytes(1000), compress=False), warm_idx,
         claim),
        ("npz", npz_announcing(tmp_path / "x.npz", (4_000_000_000,), bytes(1000)), warm_npz, 4_000_000_000),
        ("cifar", cifar_announcing(tmp_path / "nd_batch", "ndarray"), warm_cifar, 4_000_000_000),
        ("cifar", cifar_announcing(tmp_path / "rc_batch", "reconstruct"), warm_cifar, 4_000_000_000),
        ("folder", liar_folder, warm_folder, 8000 * 8000 * 3),
        ("image", png_announcing(tmp_path / "bomb.png", 20000, 20000, "RGB"), warm_png, 20000 * 20000 * 3),
    ]


@pytest.mark.parametrize("case", range(7))
def test_no_reader_allocates_what_a_header_announces_but_the_file_lacks(tmp_path, case):
    kind, path, warm, announced = hostile_files(tmp_path)[case]
    size = sum(p.stat().st_size for p in Path(path).rglob("*")) if Path(path).is_dir() else Path(path).stat().st_size
    assert size < 64 * 1024 and announced > 150 * MB
    got = measure(tmp_path, kind, path, warm)
    assert got["error"] is not None and got["error"].startswith("CorruptFile"), got
    assert str(path) in got["error"] or Path(path).name in got["error"], got
    assert got["grew"] < 48 * MB, f"{kind} reader grew by {got['grew'] / MB:.0f} MB on a {size}-byte file: {got}"


@pytest.mark.parametrize("kind", ["idx", "npz", "cifar"])
def test_real_data_reads_within_a_small_multiple_of_its_size(tmp_path, kind):
    n = 12000
    x = np.random.default_rng(0).integers(0, 256, (n, 3072 if kind == "cifar" else 784), dtype=np.uint8)
    warm = {"idx": idx_announcing(tmp_path / "w.idx", (2, 2, 2), bytes(8), compress=True),
            "npz": tmp_path / "w.npz", "cifar": tmp_path / "w_batch"}[kind]
    if kind == "idx":
        path = idx_announcing(tmp_path / "real.idx", (n, 28, 28), x.tobytes(), compress=True)
    elif kind == "npz":
        np.savez(warm, x=np.zeros((2, 2, 2), np.uint8), y=np.zeros(2, np.int64))
        path = tmp_path / "real.npz"
        np.savez_compressed(path, x=x.reshape(n, 28, 28), y=np.zeros(n, np.int64))
    else:
        warm.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2))
        path = tmp_path / "real_batch"
        path.write_bytes(pickle.dumps({b"data": x, b"labels": [0] * n}, protocol=2))
    got = measure(tmp_path, kind, path, warm)
    assert got["error"] is None, got
    holds = max(path.stat().st_size, x.nbytes)  # a pickle spells bytes 128-255 in two bytes: larger than the data
    assert got["grew"] < 5 * holds + 16 * MB, f"{kind}: grew {got['grew'] / MB:.0f} MB for {holds / MB:.0f} MB"
