"""Downloads from a small HTTP server on 127.0.0.1: success, mirror fallback, checksum mismatch,
truncated and interrupted transfers, retries, and the offline message."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from convdescent.data import DatasetNotFound, DownloadError, load_dataset, registry
from convdescent.data import download as dl
from convdescent.data.synthetic import cifar_spec_for, idx_spec_for, write_cifar_dataset, write_idx_dataset


class Server:
    """Serves registered byte strings with scripted misbehaviour, and logs every request."""

    def __init__(self):
        self.routes = {}
        self.log = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.log.append((self.path, self.headers.get("Range")))
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                route["hits"] = route.get("hits", 0) + 1
                data = route["data"]
                if route.get("fail_first", 0) >= route["hits"]:
                    self.send_error(503)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and route.get("ranges", True):
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = route.get("truncate_first", 0) >= route["hits"] or route.get("always_truncate")
                if cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def serve(self, prefix, files, **behaviour):
        for name, data in files.items():
            self.routes[f"{prefix}{name}"] = {"data": data, **behaviour}
        return f"{self.url}{prefix}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("CONVDESCENT_DATA", raising=False)
    monkeypatch.delenv("CONVDESCENT_MIRRORS", raising=False)
    monkeypatch.setattr(registry, "SYSTEM_ROOTS", [tmp_path / "system"])
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)  # keep retries fast in tests
    yield
    for name in [n for n in registry.REGISTRY if n.startswith("tiny")]:
        registry.unregister_dataset(name)


@pytest.fixture
def tiny(tmp_path):
    """A small IDX dataset, its published-file bytes and a registered spec with their checksums."""
    src = tmp_path / "published"
    write_idx_dataset(src, n_train=40, n_test=10, hw=(8, 8), compress=True)
    files = {p.name: p.read_bytes() for p in src.iterdir()}

    def register(name, mirrors, **kw):
        spec = idx_spec_for(src, name, hw=(8, 8), train_count=40, test_count=10, mirrors=tuple(mirrors), **kw)
        registry.register_dataset(spec, replace=True)
        return spec

    return files, register


def _cache_listing(tmp_path):
    root = tmp_path / "cache" / "convdescent"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_download_success_lands_verified_in_cache(server, tiny, tmp_path, capsys):
    files, register = tiny
    register("tiny-ok", [server.serve("/ok/", files)])
    ds = load_dataset("tiny-ok", val_split=5, progress=True)
    assert len(ds.x_train) == 35 and len(ds.x_val) == 5 and len(ds.x_test) == 10
    assert ds.classes[3] == "class 3"
    dest = tmp_path / "cache" / "convdescent" / "tiny-ok"
    assert sorted(p.name for p in dest.iterdir()) == sorted(files)
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    assert "user cache" in ds.source and "official checksums" in ds.source
    assert "100.0%" in capsys.readouterr().err  # the progress bar ran to completion
    assert not [p for p in (tmp_path / "cache" / "convdescent").iterdir() if p.name.startswith(".")]


def test_fallback_to_second_mirror(server, tiny, tmp_path):
    files, register = tiny
    dead_port = "http://127.0.0.1:9/"  # nothing listens on the discard port
    register("tiny-fb", [dead_port, server.url + "/missing/", server.serve("/good/", files)])
    dest = dl.fetch("tiny-fb", progress=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted(files)
    paths = [p for p, _ in server.log]
    assert "/missing/train-images-idx3-ubyte.gz" in paths and "/good/train-images-idx3-ubyte.gz" in paths


def test_checksum_mismatch_never_lands_in_cache(server, tiny, tmp_path):
    files, register = tiny
    bad = dict(files)
    data = bytearray(files["train-labels-idx1-ubyte.gz"])
    data[-9] ^= 0xFF  # same size, different bytes
    bad["train-labels-idx1-ubyte.gz"] = bytes(data)
    register("tiny-bad", [server.serve("/bad/", bad)])
    with pytest.raises(DownloadError) as e:
        dl.fetch("tiny-bad", progress=False)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte.gz" in msg and ("checksum mismatch" in msg or "bad gzip" in msg), msg
    assert _cache_listing(tmp_path) in ([], ["tiny-bad"])
    # With a good second mirror the same fetch succeeds, file by file.
    register("tiny-bad", [server.url + "/bad/", server.serve("/good/", files)])
    dest = dl.fetch("tiny-bad", progress=False)
    assert (dest / "train-labels-idx1-ubyte.gz").read_bytes() == files["train-labels-idx1-ubyte.gz"]


def test_checksum_mismatch_with_valid_structure_is_rejected(server, tiny, tmp_path):
    files, register = tiny
    import gzip

    from convdescent.data.idx import encode_idx
    from convdescent.data.synthetic import synthetic_images

    other, _ = synthetic_images(40, 10, (8, 8), seed=99)
    fake = dict(files)
    fake["train-images-idx3-ubyte.gz"] = gzip.compress(encode_idx(other))
    register("tiny-fake", [server.serve("/fake/", fake)])
    with pytest.raises(DownloadError, match="checksum mismatch"):
        dl.fetch("tiny-fake", progress=False)
    assert _cache_listing(tmp_path) in ([], ["tiny-fake"])


def test_truncated_transfer_is_resumed_with_a_range_request(server, tiny):
    files, register = tiny
    register("tiny-trunc", [server.serve("/t/", files, truncate_first=1)])
    dest = dl.fetch("tiny-trunc", progress=False)
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    ranges = [r for p, r in server.log if r]
    assert ranges and all(r.startswith("bytes=") and not r.startswith("bytes=0-") for r in ranges)


def test_truncated_transfer_without_range_support_restarts(server, tiny):
    files, register = tiny
    register("tiny-norange", [server.serve("/n/", files, truncate_first=1, ranges=False)])
    dest = dl.fetch("tiny-norange", progress=False)
    for name, data in files.items():
        assert (dest / name).read_bytes() == data


def test_always_truncated_fails_and_leaves_nothing(server, tiny, tmp_path):
    files, register = tiny
    register("tiny-cut", [server.serve("/c/", files, always_truncate=True)])
    with pytest.raises(DownloadError, match="truncated transfer") as e:
        dl.fetch("tiny-cut", progress=False, retries=2)
    assert "gave up after 3 attempts" in str(e.value)
    assert _cache_listing(tmp_path) in ([], ["tiny-cut"])


def test_server_errors_are_retried(server, tiny):
    files, register = tiny
    register("tiny-503", [server.serve("/s/", files, fail_first=2)])
    dest = dl.fetch("tiny-503", progress=False, retries=3)
    assert len(list(dest.iterdir())) == 4
    hits = [p for p, _ in server.log if p == "/s/train-images-idx3-ubyte.gz"]
    assert len(hits) == 3


def test_interrupted_download_keeps_the_good_file(server, tiny, tmp_path, monkeypatch):
    files, register = tiny
    register("tiny-int", [server.serve("/i/", files)])
    dest = dl.fetch("tiny-int", progress=False)
    good = {p.name: p.read_bytes() for p in dest.iterdir()}

    calls = {"n": 0}
    real_update = dl._Progress.update

    def interrupt(self, done, final=False):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_update(self, done, final)

    monkeypatch.setattr(dl._Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        dl.fetch("tiny-int", progress=False, force=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == good
    assert _cache_listing(tmp_path) == sorted(["tiny-int"] + [f"tiny-int/{n}" for n in good])


def test_fetch_skips_valid_files_and_replaces_a_corrupt_one(server, tiny, tmp_path):
    files, register = tiny
    register("tiny-re", [server.serve("/r/", files)])
    dest = dl.fetch("tiny-re", progress=False)
    n = len(server.log)
    assert dl.fetch("tiny-re", progress=False) == dest and len(server.log) == n
    (dest / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    dl.fetch("tiny-re", progress=False)
    assert (dest / "t10k-labels-idx1-ubyte.gz").read_bytes() == files["t10k-labels-idx1-ubyte.gz"]


def test_size_mismatch_from_server_is_rejected(server, tiny, tmp_path):
    files, register = tiny
    longer = {k: v + b"\0" for k, v in files.items()}
    spec = register("tiny-size", [server.serve("/z/", longer)])
    # No content checksum: the published size is enforced.
    import dataclasses

    stripped = dataclasses.replace(spec, files=tuple(dataclasses.replace(f, content_sha256=None) for f in spec.files))
    registry.register_dataset(stripped, replace=True)
    with pytest.raises(DownloadError, match="size mismatch"):
        dl.fetch("tiny-size", progress=False)


def test_mirrors_from_environment(server, tiny, monkeypatch):
    files, register = tiny
    server.serve("/env/tiny-env/", files)
    register("tiny-env", ["http://127.0.0.1:9/"])
    monkeypatch.setenv("CONVDESCENT_MIRRORS", f"{server.url}/env/{{name}}/")
    dest = dl.fetch("tiny-env", progress=False)
    assert len(list(dest.iterdir())) == 4


def test_offline_message_names_dataset_places_and_files(tiny, tmp_path):
    _, register = tiny
    register("tiny-off", ["http://127.0.0.1:9/"])
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("tiny-off", progress=False)
    msg = str(e.value)
    for needle in ("'tiny-off' was not found", "user cache",
                   str(tmp_path / "system"), "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                   "convdescent data fetch tiny-off", "connection refused"):
        assert needle in msg, (needle, msg)
    # a --data-dir is the only place read: nothing is downloaded or looked up elsewhere for it
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("tiny-off", data_dir=tmp_path / "mine", progress=False)
    assert str(tmp_path / "mine") in str(e.value) and "connection refused" not in str(e.value)
    with pytest.raises(DatasetNotFound, match="download=False"):
        load_dataset("tiny-off", download=False)


def test_fashion_mnist_missing_message_mentions_debian_package(monkeypatch):
    msg = registry.missing_message("fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" in msg


def test_cifar_archive_download_and_unpack(server, tmp_path):
    arch = tmp_path / "pub" / "cifar-10-python.tar.gz"
    out = write_cifar_dataset(tmp_path / "pub" / "batches", "cifar10", n_per_batch=6, archive=arch)
    spec = cifar_spec_for(out["files"], "tiny-cifar", "cifar10", n_per_batch=6, archive=arch,
                          mirrors=(server.serve("/k/", {"cifar-10-python.tar.gz": arch.read_bytes()}),))
    registry.register_dataset(spec, replace=True)
    ds = load_dataset("tiny-cifar", val_split=0, progress=False)
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.classes == out["classes"]
    dest = tmp_path / "cache" / "convdescent" / "tiny-cifar"
    assert sorted(p.name for p in dest.iterdir()) == sorted(out["files"])  # archive not kept
    import torch

    assert torch.equal(ds.x_train, out["x_train"]) and torch.equal(ds.y_test, out["y_test"])


def test_cifar_archive_with_wrong_checksum_is_rejected(server, tmp_path):
    arch = tmp_path / "pub" / "cifar-10-python.tar.gz"
    out = write_cifar_dataset(tmp_path / "pub" / "batches", "cifar10", n_per_batch=6, archive=arch)
    spec = cifar_spec_for(out["files"], "tiny-cifar2", "cifar10", n_per_batch=6, archive=arch)
    data = bytearray(arch.read_bytes())
    data[100] ^= 1
    spec = __import__("dataclasses").replace(spec, mirrors=(server.serve("/w/", {"cifar-10-python.tar.gz": bytes(data)}),))
    registry.register_dataset(spec, replace=True)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        dl.fetch("tiny-cifar2", progress=False)
    assert _cache_listing(tmp_path) in ([], ["tiny-cifar2"])


def test_md5_helper_agrees_with_hashlib(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc" * 1000)
    from convdescent.data.fileio import file_digests

    assert file_digests(p)["md5"] == hashlib.md5(b"abc" * 1000).hexdigest()
    assert Path(p).exists()
