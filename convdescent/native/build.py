"""Compiling ``kernels.c`` into a shared library that many processes can build and reuse at once.

The library lands in a cache folder under a name made from everything that decides its machine code: the
source, the compiler's own version text, the flags, the instruction set the compiler resolves
``-march=native`` to on this machine (asked of the compiler, so it holds on any architecture), and the
OpenMP runtime it links. A folder shared between machines therefore never hands one CPU's library to another.

Builds take a lock on the folder, so of many processes starting at once one compiles and the rest wait
and load its result. A compiler that fails (or runs past ``CONVDESCENT_NATIVE_TIMEOUT`` seconds, default
120) leaves a ``.failed`` note under the same name, and later processes skip that build instead of
retrying it; a new source, compiler or machine gives a new name and so a fresh try, and
``CONVDESCENT_NATIVE_RETRY=1`` ignores the notes. Temporary files of builds that died are removed by the
next build.

The kernels are linked against the OpenMP runtime torch has loaded rather than the compiler's default one,
so the process keeps one OpenMP thread pool; when that runtime cannot be found they are built without OpenMP.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import torch

from ..options import seconds_from_env

try:
    import fcntl
except ImportError:  # no flock (Windows): concurrent builds still never load a half-written file
    fcntl = None

DEFAULT_TIMEOUT = 120.0
_OPENMP_NAMES = ("libgomp", "libiomp", "libomp")
_LEGACY_TEMP_AGE = 3600.0


class BuildError(RuntimeError):
    """The kernels could not be built or loaded; the message says why."""


def cache_dir() -> Path:
    """The folder for built libraries: ``$CONVDESCENT_CACHE_DIR``, ``$XDG_CACHE_HOME/convdescent`` or
    ``~/.cache/convdescent``."""
    explicit = os.environ.get("CONVDESCENT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convdescent"


def compiler() -> list[str] | None:
    """The C compiler command (``$CC``, which may carry arguments, else cc, gcc or clang), or None."""
    explicit = os.environ.get("CC")
    if explicit:
        words = shlex.split(explicit)
        if words and shutil.which(words[0]):
            return words
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def timeout() -> float:
    """Seconds a build may take in all (``CONVDESCENT_NATIVE_TIMEOUT``)."""
    value = seconds_from_env("CONVDESCENT_NATIVE_TIMEOUT", DEFAULT_TIMEOUT)
    if value is None:
        raise BuildError(f"CONVDESCENT_NATIVE_TIMEOUT={os.environ['CONVDESCENT_NATIVE_TIMEOUT']!r} is not a "
                         f"positive number of seconds")
    return value


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty where /proc is absent)."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip() if line.count(" ") >= 5 else ""
                if path.startswith("/") and os.path.basename(path).startswith(_OPENMP_NAMES) and path not in found:
                    found.append(path)
    except OSError:
        pass
    return found


def torch_openmp_runtime() -> str | None:
    """The OpenMP runtime torch uses: the one mapped into the process, else the one shipped in torch/lib."""
    loaded = openmp_runtimes()
    if loaded:
        return loaded[0]
    libdir = Path(torch.__file__).parent / "lib"
    for name in _OPENMP_NAMES:
        for path in sorted(libdir.glob(name + "*")):
            if ".so" in path.name or path.suffix == ".dylib":
                return str(path)
    return None


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class _TimedOut(Exception):
    pass


def _run(cmd: list[str], deadline: _Deadline, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` until it ends or the deadline passes; on timeout its whole process group is killed
    (a compiler driver's own children included)."""
    posix = os.name == "posix"
    env = dict(os.environ, LC_ALL="C")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=posix)
    try:
        out, err = proc.communicate(timeout=max(deadline.left(), 0.01))
    except subprocess.TimeoutExpired:
        if posix:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            proc.kill()
        proc.communicate()
        raise _TimedOut(f"{shlex.join(cmd[:1])} ran past {deadline.seconds:g} s "
                        "(CONVDESCENT_NATIVE_TIMEOUT)") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _identity(cc: list[str], deadline: _Deadline) -> str:
    proc = _run([*cc, "--version"], deadline)
    if proc.returncode != 0:
        raise BuildError(f"{shlex.join(cc)} --version failed: {(proc.stderr or proc.stdout).strip()[:300]}")
    return shutil.which(cc[0]) + "\n" + shlex.join(cc) + "\n" + proc.stdout + proc.stderr


def native_target(cc: list[str], deadline: _Deadline) -> str | None:
    """What the compiler turns ``-march=native`` into here (its compiler-proper command line, from
    ``-###``), or None when it does not accept the flag."""
    proc = _run([*cc, "-###", "-march=native", "-E", "-x", "c", os.devnull], deadline, cwd="/")
    if proc.returncode != 0:
        return None
    text = proc.stderr + proc.stdout
    lines = [line for line in text.splitlines() if "cc1" in line]
    return "\n".join(lines) if lines else text


def _key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class _FolderLock:
    """An exclusive lock on ``folder/build.lock``, waited for until the deadline."""

    def __init__(self, folder: Path, deadline: _Deadline):
        self.path = folder / "build.lock"
        self.deadline = deadline
        self.file = None

    def __enter__(self):
        if fcntl is None:
            return self
        self.file = open(self.path, "a")
        while True:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if self.deadline.left() <= 0:
                    self.file.close()
                    raise _TimedOut(f"another process held {self.path} for more than {self.deadline.seconds:g} s "
                                    "(CONVDESCENT_NATIVE_TIMEOUT)") from None
                time.sleep(0.05)

    def __exit__(self, *exc):
        if self.file is not None:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
        return False


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporary files of builds that died. Call only with the folder's lock held: no build of
    this version is running then, so every ``*.tmp.*`` file is stale; the unlocked builds of older
    versions named theirs ``tmp*.so``, removed once an hour old.

    Returns:
        the removed paths.
    """
    removed = []
    now = time.time()
    for path in folder.iterdir():
        name = path.name
        stale = ".tmp." in name and name.startswith("kernels-")
        if not stale and name.startswith("tmp") and name.endswith(".so"):
            try:
                stale = now - path.stat().st_mtime > _LEGACY_TEMP_AGE
            except OSError:
                continue
        if stale:
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def _compile(cc, flags, openmp, source: Path, out: Path, deadline: _Deadline) -> str | None:
    """Compile (and link) into ``out``; returns None on success, else the compiler's complaint."""
    if openmp is None:
        steps = [[*cc, *flags, "-shared", "-fPIC", "-o", str(out), str(source), "-lm"]]
    else:
        # Compile with OpenMP but link by hand: the driver's -fopenmp link would pull in the compiler's
        # own runtime, a second thread pool next to torch's whenever the two differ.
        obj = out.with_name(out.name[:-len(".so")] + ".o")
        steps = [[*cc, *flags, "-fopenmp", "-fPIC", "-c", "-o", str(obj), str(source)],
                 [*cc, "-shared", "-o", str(out), str(obj), openmp, "-Wl,-rpath," + os.path.dirname(openmp), "-lm"]]
    try:
        for cmd in steps:
            proc = _run(cmd, deadline)
            if proc.returncode != 0:
                return f"{shlex.join(cmd[:1] + flags)}: {proc.stderr.strip()[:300]}"
    finally:
        if openmp is not None and obj.exists():
            obj.unlink()
    return None


def build_library(source: Path) -> Path:
    """The path of the library built from ``source``, compiling it first when no build is cached.

    Tries ``-O3 -march=native`` with OpenMP, then ``-O3`` with OpenMP, then ``-O3`` alone; a setting
    that failed before (its ``.failed`` note) is skipped.

    Raises:
        BuildError: no compiler, or every setting failed; the message lists each failure.
    """
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found (install gcc, or set CC)")
    deadline = _Deadline(timeout())
    retry = os.environ.get("CONVDESCENT_NATIVE_RETRY", "0") == "1"
    try:
        identity = _identity(cc, deadline)
        target = native_target(cc, deadline)
    except _TimedOut as exc:
        raise BuildError(str(exc)) from None
    openmp = torch_openmp_runtime()
    openmp_tag = ""
    if openmp is not None:
        st = os.stat(openmp)
        openmp_tag = f"{os.path.realpath(openmp)}:{st.st_size}:{st.st_mtime_ns}"
    # -fno-math-errno: sqrt sets no errno (nothing reads it), so loops that take a square root vectorize
    settings = [(["-O3", "-fno-math-errno", "-march=native"], openmp), (["-O3", "-fno-math-errno"], openmp),
                (["-O3", "-fno-math-errno"], None)]
    if openmp is None:
        settings = settings[2:]
    source_bytes = source.read_bytes()
    folder = cache_dir()
    errors = []
    for flags, omp in settings:
        if "-march=native" in flags and target is None:
            errors.append(f"{shlex.join(cc)} does not resolve -march=native")
            continue
        key = _key(source_bytes, identity, " ".join(flags), target if "-march=native" in flags else "",
                   openmp_tag if omp else "no openmp", platform.machine(), platform.system())
        target_path = folder / f"kernels-{key}.so"
        failed = folder / f"kernels-{key}.failed"
        if target_path.exists():
            return target_path
        if failed.exists() and not retry:
            errors.append(f"{failed.read_text(errors='replace').strip()} (noted in {failed}; delete it or set "
                          "CONVDESCENT_NATIVE_RETRY=1 to try again)")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with _FolderLock(folder, deadline):
                if target_path.exists():  # built by the process that held the lock before this one
                    return target_path
                if failed.exists() and not retry:  # failed in the process that held the lock before
                    errors.append(failed.read_text(errors="replace").strip())
                    continue
                clean_stale_temporaries(folder)
                tmp = folder / f"kernels-{key}.tmp.{os.getpid()}.so"
                error, timed_out = "the build was interrupted", False
                try:
                    error = _compile(cc, flags, omp, source, tmp, deadline)
                except _TimedOut as exc:
                    error, timed_out = str(exc), True
                finally:
                    if error is not None:
                        tmp.unlink(missing_ok=True)
                if error is None:
                    os.replace(tmp, target_path)
                    failed.unlink(missing_ok=True)
                    return target_path
                failed.write_text(error + "\n")
                if timed_out:  # the time is spent: the other settings are not tried
                    raise BuildError(error)
                errors.append(error)
        except _TimedOut as exc:  # the lock was not had in time
            raise BuildError(str(exc)) from None
    raise BuildError("compiling the native kernels failed: " + " | ".join(errors))
