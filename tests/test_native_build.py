"""Building the native kernels when many processes share a cache folder: the lock, the note of failed
builds, the compiler timeout, the cache key, stale temporary files and the OpenMP runtime."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from convdescent import native
from convdescent.native import build

REAL_CC = shutil.which("gcc") or shutil.which("cc")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has not tried to load the kernels yet, with an empty cache folder."""
    for name, value in (("_LIB", None), ("_ERROR", None), ("_TRIED", False)):
        monkeypatch.setattr(native, name, value)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONVDESCENT_CACHE_DIR", str(cache))
    for name in ("CONVDESCENT_NATIVE", "CONVDESCENT_NATIVE_RETRY", "CONVDESCENT_NATIVE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)

    def again():
        monkeypatch.setattr(native, "_TRIED", False)
        monkeypatch.setattr(native, "_LIB", None)
        return native.library()

    return cache, again


def _script(path, body: str) -> str:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return str(path)


def _wrapper(tmp_path, log, version="1", delay=0):
    """A compiler that reports ``$WRAP_VERSION`` (default ``version``), logs each compile to ``log`` and
    then runs the real one at -O0 (fast to build; the kernels' values do not depend on it)."""
    return _script(tmp_path / "wrapcc", f"""
if [ "$1" = --version ]; then echo "wrapcc ${{WRAP_VERSION:-{version}}}"; exit 0; fi
case "$*" in *kernels.c*) echo "$$ $*" >> {log}; sleep {delay};; esac
exec {REAL_CC} "${{@/#-O3/-O0}}"
""")


def _compiles(log) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_no_compiler_means_the_torch_op_path_with_a_reason(fresh, monkeypatch):
    monkeypatch.setattr(build, "compiler", lambda: None)
    assert native.library() is None
    assert "no C compiler found" in native.status()
    assert native.kernel("cd_maxpool_fwd", torch.zeros(1)) is None


def test_build_writes_one_library_and_reuses_it(fresh, tmp_path, monkeypatch):
    cache, again = fresh
    log = tmp_path / "log"
    monkeypatch.setenv("CC", _wrapper(tmp_path, log))
    assert native.library() is not None, native.status()
    built = sorted(cache.glob("kernels-*.so"))
    assert len(built) == 1 and sorted(p.name for p in cache.iterdir()) == ["build.lock", built[0].name]
    assert len(_compiles(log)) == 1
    stamp = built[0].stat().st_mtime_ns
    assert again() is not None
    assert built[0].stat().st_mtime_ns == stamp and len(_compiles(log)) == 1  # loaded, not rebuilt


def test_a_failed_compiler_is_noted_and_not_retried_until_it_changes(fresh, tmp_path, monkeypatch):
    cache, again = fresh
    log = tmp_path / "log"
    monkeypatch.setenv("CC", _script(tmp_path / "badcc", f"""
if [ "$1" = --version ]; then echo "badcc ${{BAD_VERSION:-1}}"; exit 0; fi
case " $* " in *" -### "*) exec {REAL_CC} "$@";; esac
echo "$*" >> {log}; echo "badcc: internal error" >&2; exit 1
"""))
    assert native.library() is None
    assert "compiling the native kernels failed" in native.status() and "badcc: internal error" in native.status()
    tries = len(_compiles(log))
    assert tries == 3  # -march=native with OpenMP, generic with OpenMP, generic alone
    notes = sorted(cache.glob("*.failed"))
    assert len(notes) == 3 and all("internal error" in p.read_text() for p in notes)
    assert not [p for p in cache.iterdir() if ".tmp." in p.name or p.suffix in (".so", ".o")]

    assert again() is None  # another process: the notes are read, the compiler is not run
    assert len(_compiles(log)) == tries
    assert "CONVDESCENT_NATIVE_RETRY=1" in native.status()

    monkeypatch.setenv("CONVDESCENT_NATIVE_RETRY", "1")
    assert again() is None
    assert len(_compiles(log)) == 2 * tries
    monkeypatch.delenv("CONVDESCENT_NATIVE_RETRY")

    monkeypatch.setenv("BAD_VERSION", "2")  # an upgraded compiler gets a fresh try
    assert again() is None
    assert len(_compiles(log)) == 3 * tries


def test_the_cache_key_follows_the_compiler_version_and_the_native_target(fresh, tmp_path, monkeypatch):
    cache, again = fresh
    log = tmp_path / "log"
    monkeypatch.setenv("CC", _wrapper(tmp_path, log))
    first = build.build_library(native._SOURCE)
    monkeypatch.setenv("WRAP_VERSION", "2")
    second = build.build_library(native._SOURCE)
    monkeypatch.setenv("WRAP_VERSION", "1")
    assert build.build_library(native._SOURCE) == first
    real_target = build.native_target
    monkeypatch.setattr(build, "native_target", lambda cc, deadline: "cc1 -march=some-other-cpu -mno-avx")
    third = build.build_library(native._SOURCE)
    assert len({first, second, third}) == 3 and all(p.exists() for p in (first, second, third))
    assert len(_compiles(log)) == 3
    # what the key holds is the compiler's own answer, not the literal flag
    target = real_target([REAL_CC], build._Deadline(30))
    assert target is not None
    assert re.search(r'-march="?(?!native)\w', target) or "-target-cpu" in target, target


def test_two_processes_building_at_once_compile_once(fresh, tmp_path, monkeypatch):
    cache, _ = fresh
    log = tmp_path / "log"
    env = dict(os.environ, CC=_wrapper(tmp_path, log, delay=1), CONVDESCENT_CACHE_DIR=str(cache))
    code = "from convdescent import native; print(native.status())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0].startswith("native kernels loaded from") and outs[0].split(",")[0] == outs[1].split(",")[0]
    assert len(_compiles(log)) == 1, _compiles(log)


def test_a_slow_compiler_is_stopped_by_the_timeout(fresh, tmp_path, monkeypatch):
    cache, again = fresh
    pidfile = tmp_path / "pid"
    monkeypatch.setenv("CC", _script(tmp_path / "slowcc", f"""
if [ "$1" = --version ]; then echo "slowcc 1"; exit 0; fi
case " $* " in *" -### "*) exec {REAL_CC} "$@";; esac
sleep 60 & echo $! > {pidfile}; wait
"""))
    monkeypatch.setenv("CONVDESCENT_NATIVE_TIMEOUT", "1.5")
    start = time.monotonic()
    assert native.library() is None
    assert time.monotonic() - start < 20
    assert "ran past 1.5 s" in native.status()
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid), "the compiler's own child must be killed with it"
    assert len(list(cache.glob("*.failed"))) == 1  # noted: the next process does not wait again
    assert not [p for p in cache.iterdir() if ".tmp." in p.name]
    start = time.monotonic()
    assert again() is None and time.monotonic() - start < 5


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def test_a_held_lock_is_waited_for_until_the_timeout(fresh, tmp_path, monkeypatch):
    cache, _ = fresh
    cache.mkdir()
    monkeypatch.setenv("CC", _wrapper(tmp_path, tmp_path / "log"))
    monkeypatch.setenv("CONVDESCENT_NATIVE_TIMEOUT", "1")
    with open(cache / "build.lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert native.library() is None
    assert "another process held" in native.status()
    assert not list(cache.glob("*.failed"))  # waiting is not the compiler's failure


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_a_bad_timeout_setting_is_reported(fresh, monkeypatch, value):
    monkeypatch.setenv("CONVDESCENT_NATIVE_TIMEOUT", value)
    assert native.library() is None
    assert f"CONVDESCENT_NATIVE_TIMEOUT={value!r} is not a positive number" in native.status()


def test_stale_temporary_files_are_removed_by_the_next_build(fresh, tmp_path, monkeypatch):
    cache, _ = fresh
    cache.mkdir()
    stale = [cache / "kernels-0123456789abcdef.tmp.99999.so", cache / "kernels-0123456789abcdef.tmp.99999.o",
             cache / "tmpab12cd.so"]
    fresh_legacy = cache / "tmpnew.so"  # may belong to an older version's build still running
    kept = cache / "notes.txt"
    for p in [*stale, fresh_legacy, kept]:
        p.write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(stale[2], (old, old))
    monkeypatch.setenv("CC", _wrapper(tmp_path, tmp_path / "log"))
    assert native.library() is not None, native.status()
    assert not any(p.exists() for p in stale)
    assert fresh_legacy.exists() and kept.exists()


_ONE_RUNTIME = """
import torch
from convdescent import native
from convdescent.native import build
before = build.openmp_runtimes()
assert native.library() is not None, native.status()
x = torch.randn(64, 8, 16, 16)
native.kernel("cd_maxpool_fwd", x)  # the pool and the runtime are in use
from convdescent.layers import MaxPool2D
layer = MaxPool2D(2); layer.build((8, 16, 16)); layer.forward(x, True)
import json; print(json.dumps([before, build.openmp_runtimes()]))
"""


def test_the_kernels_share_torchs_openmp_runtime():
    """After loading and running the kernels, the process maps exactly one OpenMP runtime: torch's."""
    out = subprocess.run([sys.executable, "-c", _ONE_RUNTIME], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = json.loads(out.stdout)
    assert len(before) == 1, before  # torch's, loaded with torch
    assert after == before
