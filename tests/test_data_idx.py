"""IDX reading and writing: round trips and every kind of corrupt file."""

import gzip

import numpy as np
import pytest
import torch

from convdescent.data import CorruptFile, read_idx, write_idx
from convdescent.data.idx import encode_idx


def test_roundtrip_gzip_and_raw(tmp_path):
    x = torch.randint(0, 256, (7, 5, 3), dtype=torch.uint8)
    for name, compress in (("a.gz", True), ("a.idx", False)):
        p = write_idx(tmp_path / name, x, compress=compress)
        assert (p.read_bytes()[:2] == b"\x1f\x8b") == compress
        got = read_idx(p)
        assert got.dtype == torch.uint8 and got.shape == (7, 5, 3)
        assert torch.equal(got, x)


def test_gzip_detected_by_content_not_name(tmp_path):
    y = torch.arange(10, dtype=torch.uint8)
    p = tmp_path / "labels-without-gz-suffix"
    p.write_bytes(gzip.compress(encode_idx(y)))
    assert torch.equal(read_idx(p), y)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
def test_other_idx_types_roundtrip(tmp_path, dtype):
    x = (torch.arange(24) - 12).to(dtype).view(2, 3, 4)
    assert torch.equal(read_idx(write_idx(tmp_path / "t.gz", x)), x)


def test_header_layout_matches_the_published_format(tmp_path):
    data = encode_idx(torch.zeros(3, 28, 28, dtype=torch.uint8))
    assert data[:4] == bytes([0, 0, 8, 3])
    assert int.from_bytes(data[4:8], "big") == 3 and int.from_bytes(data[8:12], "big") == 28
    assert len(data) == 16 + 3 * 28 * 28


def _expect(path, *words):
    with pytest.raises(CorruptFile) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_bad_gzip(tmp_path):
    p = tmp_path / "bad.gz"
    p.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    _expect(p, "bad gzip")


def test_truncated_gzip(tmp_path):
    full = gzip.compress(encode_idx(torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)))
    p = tmp_path / "cut.gz"
    p.write_bytes(full[: len(full) // 2])
    _expect(p, "truncated")


def test_wrong_magic(tmp_path):
    p = tmp_path / "x.idx"
    p.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 100)
    _expect(p, "wrong magic number", "0x12340803")


def test_wrong_magic_inside_gzip(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(b"PK\x03\x04 this is a zip, not idx"))
    _expect(p, "wrong magic number")


def test_counts_disagree_with_size_raw_truncated(tmp_path):
    data = encode_idx(torch.zeros(10, 4, 4, dtype=torch.uint8))
    p = tmp_path / "short.idx"
    p.write_bytes(data[:-5])
    msg = _expect(p, "counts disagree with the file size", "truncated")
    assert "(10, 4, 4)" in msg and "155" in msg


def test_counts_disagree_with_size_extra_bytes(tmp_path):
    p = tmp_path / "long.idx"
    p.write_bytes(encode_idx(torch.zeros(10, dtype=torch.uint8)) + b"xyz")
    _expect(p, "counts disagree", "extra")
    q = tmp_path / "long.gz"
    q.write_bytes(gzip.compress(encode_idx(torch.zeros(10, dtype=torch.uint8)) + b"xyz"))
    _expect(q, "3 extra bytes")


def test_counts_disagree_in_gzip_truncated_content(tmp_path):
    data = encode_idx(torch.zeros(10, 4, 4, dtype=torch.uint8))
    p = tmp_path / "short.gz"
    p.write_bytes(gzip.compress(data[:-20]))
    _expect(p, "counts disagree", "only 140")


def test_truncated_header_and_tiny_file(tmp_path):
    p = tmp_path / "h.idx"
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1]))
    _expect(p, "truncated header")
    q = tmp_path / "tiny.idx"
    q.write_bytes(b"\x00\x00")
    _expect(q, "too short")


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.gz", "no such file")


def test_write_is_atomic_and_keeps_old_file_on_error(tmp_path):
    p = write_idx(tmp_path / "keep.gz", torch.ones(3, dtype=torch.uint8))
    before = p.read_bytes()
    with pytest.raises(ValueError, match="dtype"):
        write_idx(p, np.zeros(3, dtype=np.complex64))
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["keep.gz"]
