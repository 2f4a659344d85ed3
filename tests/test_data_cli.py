"""`convdescent data list|fetch|verify|show` through add_data_parser."""

import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from convdescent.argparsing import CommandParser, command_name
from convdescent.data import registry
from convdescent.data.cli import add_data_parser
from convdescent.data.synthetic import idx_spec_for, write_idx_dataset


def run(argv):
    parser = CommandParser(prog="convdescent")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a flag refused while parsing, as the command line exits
        return e.code
    return args.func(args)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("CONVDESCENT_DATA", raising=False)
    monkeypatch.setenv("CONVDESCENT_MIRRORS", "http://127.0.0.1:9/")
    monkeypatch.setattr(registry, "SYSTEM_ROOTS", [tmp_path / "system"])
    yield
    for name in [n for n in registry.REGISTRY if n.startswith("tiny")]:
        registry.unregister_dataset(name)


@pytest.fixture
def tiny(tmp_path):
    pub = tmp_path / "pub" / "tiny"
    write_idx_dataset(pub, n_train=30, n_test=10, hw=(8, 8))
    registry.register_dataset(idx_spec_for(pub, "tiny", hw=(8, 8), train_count=30, test_count=10), replace=True)
    return pub


def test_list_shows_found_and_missing(tiny, tmp_path, capsys):
    assert run(["data", "list", "--data-dir", str(tmp_path / "pub")]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(registry.REGISTRY) <= set(lines)
    assert str(tiny) in lines["tiny"] and "--data-dir" in lines["tiny"]
    assert f"missing ({command_name()} data fetch mnist)" in lines["mnist"]


def test_fetch_from_local_mirror_then_verify(tiny, tmp_path, capsys):
    handler = partial(SimpleHTTPRequestHandler, directory=str(tiny))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        assert run(["data", "fetch", "tiny", "--mirror", url, "--no-progress"]) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    out = capsys.readouterr().out
    cached = tmp_path / "cache" / "convdescent" / "tiny"
    assert str(cached) in out and "official checksums" in out
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in tiny.iterdir())
    assert run(["data", "verify", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "user cache" in out and out.count("  ok  ") == 4 and "official checksum: md5" in out


def test_verify_reports_a_corrupt_file(tiny, tmp_path, capsys):
    p = tiny / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-12])
    assert run(["data", "verify", "tiny", "--data-dir", str(tmp_path / "pub")]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "error:" in err


def test_verify_and_fetch_of_missing_dataset_fail_with_the_message(capsys):
    assert run(["data", "verify", "kmnist"]) == 2
    err = capsys.readouterr().err
    assert "'kmnist' was not found" in err and "train-images-idx3-ubyte.gz" in err
    assert run(["data", "fetch", "kmnist", "--no-progress"]) == 2
    assert "connection refused" in capsys.readouterr().err


def test_show_writes_a_labelled_png(tiny, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert run(["data", "show", "tiny", "--data-dir", str(tmp_path / "pub"), "--count", "6",
                "--augment", "crop:2,rotate:10", "--out", str(out), "--no-download"]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert run(["data", "show", "tiny", "--data-dir", str(tmp_path / "pub"), "--count", "0"]) == 2
    assert "--count 0 is out of range: count must be an integer >= 1" in capsys.readouterr().err
    assert run(["data", "show", "tiny", "--augment", "wobble", "--data-dir", str(tmp_path / "pub")]) == 2
    assert "unknown augmentation 'wobble'" in capsys.readouterr().err


def test_show_image_folder(tmp_path):
    from convdescent.data.synthetic import write_image_folder

    root = write_image_folder(tmp_path / "imgs", classes=("left", "right"), per_class=2)
    out = tmp_path / "f.png"
    assert run(["data", "show", f"folder:{root}", "--out", str(out), "--count", "4", "--image-size", "16"]) == 0
    assert out.stat().st_size > 0
