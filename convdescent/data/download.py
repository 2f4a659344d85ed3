"""Downloading datasets from their official mirrors, verified before anything enters the cache.

Each file is fetched into a staging folder beside the destination: mirrors are tried in order, transient
failures (dropped connections, truncated transfers, timeouts, HTTP 5xx/429) are retried with exponential
backoff and resumed with HTTP range requests, and the result must match the published size and checksum
(or, where none is known, parse with the right structure). Only when every file of the dataset has passed
are they renamed into the cache, so a partial or failed download never lands there and never replaces a
good file.

The mirror list can be replaced with the `mirrors=` argument or the `CONVDESCENT_MIRRORS` environment
variable (base URLs separated by commas or spaces; `{name}` is replaced by the dataset name).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import ChecksumMismatch, CorruptFile, DataError, DatasetNotFound, DownloadError
from .registry import DatasetSpec, FileSpec, Found, Place, cache_root, find, get_spec
from .sources import FileCheck, check_idx_file, install_archive, load_found, verify_found

USER_AGENT = "convdescent-data/0.1 (+https://pypi.org/project/convdescent)"
# Seconds before the first retry; doubled after each further retry.
BACKOFF_S = 0.5
_CHUNK = 1 << 16


class _Retryable(Exception):
    """A failure worth retrying on the same mirror (the partial data is kept for a range request)."""


class _MirrorDown(Exception):
    """The mirror cannot be reached at all; later files skip it."""


def mirrors_for(spec: DatasetSpec, mirrors=None) -> list[str]:
    """Base URLs to try for a dataset: `mirrors`, else $CONVDESCENT_MIRRORS, else the official ones."""
    if mirrors is None:
        env = os.environ.get("CONVDESCENT_MIRRORS", "").replace(",", " ").split()
        mirrors = env or list(spec.mirrors)
    elif isinstance(mirrors, str):
        mirrors = mirrors.replace(",", " ").split()
    out = []
    for m in mirrors:
        m = str(m).replace("{name}", spec.name)
        out.append(m if m.endswith("/") else m + "/")
    return out


class _Progress:
    """A one-line text progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, total: int | None, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, done: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6) / 1e6
        if self.total:
            frac = min(done / self.total, 1.0)
            bar = "#" * int(frac * 24)
            text = f"\r  {self.label:<28} [{bar:<24}] {frac * 100:5.1f}% {done / 1e6:7.2f}/{self.total / 1e6:.2f} MB {rate:6.2f} MB/s"
        else:
            text = f"\r  {self.label:<28} {done / 1e6:7.2f} MB {rate:6.2f} MB/s"
        sys.stderr.write(text + ("\n" if final else ""))
        sys.stderr.flush()


def _opener(url: str):
    host = urllib.parse.urlparse(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        # Never send local test traffic through a configured proxy.
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _transfer(url: str, tmp: Path, fs: FileSpec, timeout: float, progress: bool) -> None:
    have = tmp.stat().st_size if tmp.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = _opener(url).open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            tmp.unlink()
            raise _Retryable("HTTP 416 for a resumed range; restarting") from None
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, socket.gaierror):
            raise _MirrorDown(f"cannot resolve the host ({reason})") from None
        if isinstance(reason, ConnectionRefusedError):
            raise _MirrorDown("connection refused") from None
        raise _Retryable(f"{reason}") from None
    except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
        raise _Retryable(f"{type(e).__name__}: {e}") from None
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored the range: start over
        length = resp.headers.get("Content-Length")
        total = (int(length) + have) if length is not None and length.isdigit() else None
        # A known content checksum identifies re-compressed copies too, whose size differs.
        strict_size = fs.size if not fs.content_sha256 else None
        if strict_size is not None and total is not None and total != strict_size:
            raise ChecksumMismatch(tmp, f"size mismatch: the server announces {total} bytes, the published file "
                                        f"has {strict_size}")
        bar = _Progress(fs.name, total or fs.size, progress)
        with open(tmp, "ab" if have else "wb") as out:
            done = have
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except (http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout) as e:
                    bar.update(done, final=True)
                    raise _Retryable(f"transfer interrupted after {done} bytes ({type(e).__name__})") from None
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if strict_size is not None and done > strict_size:
                    raise ChecksumMismatch(tmp, f"size mismatch: received more than the {strict_size} bytes "
                                                f"of the published file")
                bar.update(done)
        bar.update(done, final=True)
        if total is not None and done != total:
            raise _Retryable(f"truncated transfer: {done} of {total} bytes")


def _check_download(path: Path, fs: FileSpec, check) -> FileCheck:
    size = path.stat().st_size
    if fs.size is not None and size != fs.size and not fs.content_sha256:
        raise ChecksumMismatch(path, f"size mismatch: received {size} bytes, the published file has {fs.size}")
    if fs.md5 or fs.sha256:
        h = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                for x in h.values():
                    x.update(chunk)
        if fs.md5 and h["md5"].hexdigest() == fs.md5:
            return FileCheck(path, "official checksum", f"md5 {fs.md5} of the published file")
        if fs.sha256 and h["sha256"].hexdigest() == fs.sha256:
            return FileCheck(path, "official checksum", f"sha256 {fs.sha256} of the published file")
        if not fs.content_sha256:
            raise ChecksumMismatch(path, f"checksum mismatch: md5 {h['md5'].hexdigest()}, expected {fs.md5 or fs.sha256}")
    # No published digest matched or none is known: the content check (or structure) decides.
    return check(path)


def download_file(urls: list[str], dest: Path, fs: FileSpec, check=lambda p: None, progress: bool = True,
                  retries: int = 3, backoff: float | None = None, timeout: float = 30.0, dead: set | None = None) -> FileCheck:
    """Download one file, trying each URL in turn, and verify it before renaming it onto `dest`.

    Args:
        urls: full URLs, in order of preference.
        dest: final path (in a staging folder, or the cache).
        fs: what is known of the file (size, md5/sha256).
        check: `check(path) -> FileCheck` for files without a matching published digest; raises
            `CorruptFile` to reject them.
        progress: draw a progress bar on stderr.
        retries: retries per URL for transient failures.
        backoff: first wait in seconds (default `BACKOFF_S`); it doubles after each retry.
        timeout: socket timeout in seconds.
        dead: hosts already found unreachable (updated in place).

    Returns:
        The check the file passed.

    Raises:
        DownloadError: every URL failed; the message lists each attempt.
    """
    dead = set() if dead is None else dead
    backoff = BACKOFF_S if backoff is None else backoff
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        host = urllib.parse.urlparse(url).netloc
        if host in dead:
            errors.append(f"{url}: skipped, host unreachable earlier")
            continue
        fd, name = tempfile.mkstemp(prefix=f".{fs.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.unlink()
        try:
            attempt = 0
            while True:
                try:
                    _transfer(url, tmp, fs, timeout, progress)
                    result = _check_download(tmp, fs, check)
                    os.replace(tmp, dest)
                    return FileCheck(dest, result.check, result.detail) if result else FileCheck(
                        dest, "structure", "no checksum known")
                except _Retryable as e:
                    if attempt >= retries:
                        errors.append(f"{url}: {e} (gave up after {retries + 1} attempts)")
                        break
                    time.sleep(backoff * (2 ** attempt))
                    attempt += 1
                except _MirrorDown as e:
                    dead.add(host)
                    errors.append(f"{url}: {e}")
                    break
                except (DownloadError, CorruptFile) as e:
                    errors.append(f"{url}: {e.problem if isinstance(e, CorruptFile) else e}")
                    break
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
    raise DownloadError(f"could not download {fs.name}:\n" + "\n".join(f"  - {e}" for e in errors))


def fetch(name: str, dest_dir: str | Path | None = None, mirrors=None, progress: bool = True, force: bool = False,
          retries: int = 3, backoff: float | None = None, timeout: float = 30.0) -> Path:
    """Download a registered dataset into the user cache (or `dest_dir`) and verify it.

    Nothing is downloaded when the destination already holds a complete set that verifies (unless
    `force`). Otherwise every file is downloaded into a staging folder and the set is verified as a whole
    first; only then are the files renamed into place.

    Args:
        name: dataset name.
        dest_dir: destination folder (default: `cache_root() / name`).
        mirrors: base URLs instead of the official mirrors.
        progress: progress bars on stderr.
        force: download even if valid files are present.
        retries, backoff, timeout: see `download_file`.

    Returns:
        The folder holding the verified files.

    Raises:
        DownloadError: a file could not be downloaded from any mirror.
    """
    spec = get_spec(name)
    dest = Path(dest_dir) if dest_dir is not None else cache_root() / spec.name
    urls_base = mirrors_for(spec, mirrors)
    if not urls_base:
        raise DownloadError(f"no mirrors are known for {spec.name}; put its files in {dest}")
    if not force and _complete(spec, dest):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.staging-", dir=dest.parent))
    dead: set = set()
    try:
        if spec.archive is not None:
            arch = staging / spec.archive.name
            download_file([b + spec.archive.name for b in urls_base], arch, spec.archive, _archive_check,
                          progress, retries, backoff, timeout, dead)
            install_archive(spec, arch, staging / "unpacked")
            arch.unlink()
            files_dir = staging / "unpacked"
        else:
            for fs in spec.files:
                def check(p, fs=fs):
                    _, chk = check_idx_file(spec, fs, p, use_cache=False)
                    return chk
                download_file([b + fs.name for b in urls_base], staging / fs.name, fs, check,
                              progress, retries, backoff, timeout, dead)
            files_dir = staging
        # The whole set must load (counts agree, labels in range) before anything enters the cache.
        paths = {fs.name: files_dir / fs.name for fs in spec.files}
        load_found(Found(spec, Place("download", files_dir), "files", paths), use_cache=False)
        for fs in spec.files:
            os.replace(files_dir / fs.name, dest / fs.name)
    except CorruptFile as e:
        raise DownloadError(f"the downloaded {spec.name} did not verify: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _archive_check(path: Path) -> FileCheck:
    import tarfile

    try:
        with tarfile.open(path, "r:*") as tf:
            tf.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptFile(path, f"not a readable archive ({e})") from None
    return FileCheck(path, "structure", "readable archive; its members are checked when unpacked")


def _complete(spec: DatasetSpec, folder: Path) -> bool:
    if not all((folder / fs.name).is_file() for fs in spec.files):
        return False
    try:
        paths = {fs.name: folder / fs.name for fs in spec.files}
        load_found(Found(spec, Place("cache", folder), "files", paths), use_cache=False)
    except DataError:
        return False
    return True


def verify(name: str, data_dir: str | Path | None = None) -> tuple[Found, list[FileCheck]]:
    """Verify a dataset's files again from scratch, wherever the search order finds them.

    Args:
        name: dataset name.
        data_dir: folder searched first.

    Returns:
        (found, checks): where the files are and the check each passed.

    Raises:
        DatasetNotFound: the dataset is not on disk.
        DataError: a file failed (the message names the file and the problem).
    """
    from .registry import missing_message

    spec = get_spec(name)
    found = find(spec.name, data_dir)
    if found is None:
        raise DatasetNotFound(missing_message(spec.name, data_dir))
    return found, verify_found(found)
