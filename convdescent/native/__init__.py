"""Native CPU kernels, compiled from ``kernels.c`` with the system C compiler on first use.

A few loops of the training step (max pooling, im2col, a conv fused with the max-pool after it) cost many passes over memory when
written as torch operations, each pass a full elementwise kernel; written in C they are one pass. The
torch-op versions in the layers stay the reference and the fallback: they run whenever the kernels are not
available (no C compiler, ``CONVDESCENT_NATIVE=0``, a tensor on another device or of another dtype), and
the tests check that both give the same values and gradients.

The shared library is built once per source, compiler, flags and CPU into a cache folder
(``$CONVDESCENT_CACHE_DIR``, else ``$XDG_CACHE_HOME/convdescent``, else ``~/.cache/convdescent``), under a
lock, with a timeout and a note of failed builds (see ``build``). It is built with ``-march=native``
(falling back to generic code when the compiler refuses) and linked against torch's OpenMP runtime, so the
process has one thread pool; the kernels use torch's thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import subprocess
import threading
from pathlib import Path

import torch

from .build import BuildError, build_library, openmp_runtimes

_SOURCE = Path(__file__).with_name("kernels.c")
_LOCK = threading.Lock()
_LIB = None
_ERROR: str | None = None
_TRIED = False

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_SIGNATURES = {
    # x, out, code, N, C, Ho, Wo, x strides (4), out strides (4), ph, pw, sh, sw, threads
    "cd_maxpool_fwd": [_PTR, _PTR, _PTR] + [_I64] * 4 + [_I64] * 8 + [_I64] * 4 + [ctypes.c_int],
    # dy, code, dx, N, C, H, W, Ho, Wo, dy strides (4), ph, pw, sh, sw, threads
    "cd_maxpool_bwd": [_PTR, _PTR, _PTR] + [_I64] * 6 + [_I64] * 4 + [_I64] * 4 + [ctypes.c_int],
    # x, cols, N, C, Ho, Wo, kh, kw, sh, sw, x strides (4), threads
    "cd_im2col": [_PTR, _PTR] + [_I64] * 8 + [_I64] * 4 + [ctypes.c_int],
    # x, w (F, K), bias (or None), out, code, N, F, C, kh, kw, x strides (4), H, W, conv strides (2), Po, Qo,
    # ph, pw, sh, sw, out strides (4), relu (0/1), threads
    "cd_conv_pool_fwd": [_PTR] * 5 + [_I64] * 5 + [_I64] * 4 + [_I64] * 2 + [_I64] * 8 + [_I64] * 4
                        + [ctypes.c_int, ctypes.c_int],
    # dy, code, y (the ReLU's output, contiguous, or None), x, dW (F, K), db (or None), N, F, C, kh, kw,
    # x strides (4), H, W, conv strides (2), Po, Qo, ph, pw, sh, sw, dy strides (4), threads
    "cd_pool_conv_bwd": [_PTR] * 6 + [_I64] * 5 + [_I64] * 4 + [_I64] * 2 + [_I64] * 8 + [_I64] * 4 + [ctypes.c_int],
    # gemm, x, wt, bias (or None), y, scratch (threads, N, O), N, K, O, ldx, threads
    "cd_dense_fwd": [_PTR] * 6 + [_I64] * 4 + [ctypes.c_int],
    # gemm, x, dy, dwt, N, K, O, ldx, ldy, dy transposed, threads
    "cd_dense_dw": [_PTR] * 4 + [_I64] * 5 + [ctypes.c_int, ctypes.c_int],
    # gemm, wt, dy, dx, N, K, O, ldy, dy transposed, threads
    "cd_dense_dx": [_PTR] * 4 + [_I64] * 4 + [ctypes.c_int, ctypes.c_int],
    # gemm, x, dy, wt, mt, vt, vmaxt (or None), dx (or None), scratch (threads, rows, O), N, K, O, ldx, ldy,
    # dy transposed, rows, hyperparameters (8 doubles), threads
    "cd_dense_bwd_adam": [_PTR] * 9 + [_I64] * 5 + [ctypes.c_int, _I64, _PTR, ctypes.c_int],
    # p, mu, nu, nu_max (or None), g, n, hyperparameters (8 doubles): one contiguous parameter, one thread
    "cd_adam": [_PTR] * 5 + [_I64, _PTR],
    # logits, row stride, labels (int64), N, K, denominator, label smoothing, grad (N, K), loss (one element)
    "cd_softmax_xent": [_PTR, _I64, _PTR, _I64, _I64, ctypes.c_double, ctypes.c_double, _PTR, _PTR],
    # x (padded), w (F, K), bias (or None), N, F, C, kh, kw, x strides (4), Ho, Wo, conv strides (2),
    # out (4 doubles), unit maxima (F, Ho, Wo, or None), threads
    "cd_conv_stats": [_PTR] * 3 + [_I64] * 5 + [_I64] * 4 + [_I64] * 4 + [_PTR, _PTR, ctypes.c_int],
}
_RETURNS = {"cd_pool_conv_bwd": ctypes.c_int, "cd_conv_pool_fwd": ctypes.c_int, "cd_softmax_xent": ctypes.c_int,
            "cd_conv_stats": ctypes.c_int}
# functions without a dtype suffix: name -> (argument types, return type)
_PLAIN = {
    "cd_flush_subnormals": ([ctypes.c_int, ctypes.c_int], ctypes.c_int),  # on, threads
    "cd_flush_state": ([ctypes.c_int, _PTR], None),  # threads, int32 out[threads]
}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _load(source: Path = _SOURCE) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_library(source)))
    for name, argtypes in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = argtypes
            fn.restype = _RETURNS.get(name)
    for name, (argtypes, restype) in _PLAIN.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first call; None when they cannot be had (see ``status``)."""
    global _LIB, _ERROR, _TRIED
    if _TRIED:
        return _LIB
    with _LOCK:
        if not _TRIED:
            if os.environ.get("CONVDESCENT_NATIVE", "1") == "0":
                _ERROR = "turned off by CONVDESCENT_NATIVE=0"
            else:
                try:
                    _LIB = _load()
                except (OSError, BuildError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
                    _ERROR = str(exc)
            _TRIED = True
    return _LIB


def load_variant(source: str | Path) -> ctypes.CDLL:
    """The kernels built from another source file (a modified copy of ``kernels.c``), cached like the real
    ones, for comparing a variant against them in one process (``benchmarks/kernel_ab.py``; see ``using``).

    Raises:
        BuildError: the variant does not compile; OSError: it does not load.
    """
    return _load(Path(source).resolve())


@contextlib.contextmanager
def using(lib: ctypes.CDLL):
    """Run the kernels from ``lib`` (from ``load_variant``, or ``library()``) inside the block, then the
    ones loaded before. Loads the real kernels first when none are loaded yet, so that they come back after."""
    global _LIB
    library()
    previous, _LIB = _LIB, lib
    try:
        yield lib
    finally:
        _LIB = previous


def status() -> str:
    """One line: whether the native kernels are in use, and why not when they are not."""
    lib = library()
    if lib is None:
        return f"native kernels off: {_ERROR}"
    runtimes = openmp_runtimes()
    omp = f", OpenMP runtime {runtimes[0]}" if len(runtimes) == 1 else (
        f", {len(runtimes)} OpenMP runtimes: {', '.join(runtimes)}" if runtimes else "")
    return f"native kernels loaded from {lib._name}{omp}"


_ENABLED = True


def set_enabled(flag: bool) -> bool:
    """Turn the kernels on or off for this process (tests compare both paths); returns the previous value."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(flag)
    return previous


def enabled() -> bool:
    """Whether the kernels are turned on for this process (they may still be unavailable: see ``library``)."""
    return _ENABLED


_BOUND: dict = {}  # (name, dtype) -> (library, its function): a step asks for the same few kernels many times


def kernel(name: str, *tensors: torch.Tensor):
    """The ``name`` kernel for these tensors' dtype, or None when the torch-op path should run instead."""
    if not _ENABLED:
        return None
    first = tensors[0]
    dtype = first.dtype
    if first.requires_grad or first.device.type != "cpu" or dtype not in _SUFFIX:
        return None  # an unsupported dtype never loads (or builds) the library
    for t in tensors[1:]:
        if t.dtype != dtype or t.device.type != "cpu":
            return None
    lib = _LIB if _TRIED else library()
    if lib is None:
        return None
    found = _BOUND.get((name, dtype))
    if found is None or found[0] is not lib:
        found = _BOUND[(name, dtype)] = (lib, getattr(lib, f"{name}_{_SUFFIX[dtype]}"))
    return found[1]


_GEMM_NAMES = {torch.float32: "sgemm_", torch.float64: "dgemm_"}
_GEMMS: dict = {}


def _torch_blas_libraries():
    """The shared libraries that may hold the BLAS torch was built with: torch's CPU library, then
    whatever the process has loaded globally."""
    libdir = Path(torch.__file__).parent / "lib"
    for path in sorted(libdir.glob("libtorch_cpu.*")):
        try:
            yield ctypes.CDLL(str(path))
        except OSError:
            continue
    try:
        yield ctypes.CDLL(None)
    except OSError:
        return


def _gemm_agrees(lib: ctypes.CDLL, address: int, dtype: torch.dtype) -> bool:
    """Run the three dense kernels through ``address`` on small random problems (both layouts of dy, an
    uneven split of K) and compare with torch: a BLAS with another calling convention is never used."""
    suffix = _SUFFIX[dtype]
    fwd, dw, dx = (getattr(lib, f"cd_dense_{k}_{suffix}") for k in ("fwd", "dw", "dx"))
    gen = torch.Generator().manual_seed(0)
    n, k, o, nt = 5, 7, 3, 2
    x = torch.randn(n, k, generator=gen, dtype=dtype)
    wt = torch.randn(k, o, generator=gen, dtype=dtype)
    b = torch.randn(o, generator=gen, dtype=dtype)
    dy = torch.randn(n, o, generator=gen, dtype=dtype)
    y = torch.full((n, o), float("nan"), dtype=dtype)
    scratch = torch.empty(nt, n, o, dtype=dtype)
    fwd(address, x.data_ptr(), wt.data_ptr(), b.data_ptr(), y.data_ptr(), scratch.data_ptr(), n, k, o, k, nt)
    ok = torch.allclose(y, b + x @ wt, rtol=1e-4, atol=1e-5)
    for dyt in (0, 1):
        d = dy.t().contiguous() if dyt else dy
        dwt = torch.full((k, o), float("nan"), dtype=dtype)
        dw(address, x.data_ptr(), d.data_ptr(), dwt.data_ptr(), n, k, o, k, n if dyt else o, dyt, nt)
        dxn = torch.full((n, k), float("nan"), dtype=dtype)
        dx(address, wt.data_ptr(), d.data_ptr(), dxn.data_ptr(), n, k, o, n if dyt else o, dyt, nt)
        ok = ok and torch.allclose(dwt, x.t() @ dy, rtol=1e-4, atol=1e-5)
        ok = ok and torch.allclose(dxn, dy @ wt.t(), rtol=1e-4, atol=1e-5)
    return bool(ok)


def gemm(dtype: torch.dtype) -> int | None:
    """Address of the BLAS matrix product (``sgemm_``/``dgemm_``) that torch links, for the dense kernels;
    None when it cannot be found, fails the check against torch, the kernels are unavailable, or
    ``CONVDESCENT_NATIVE_BLAS=0``."""
    if dtype not in _GEMM_NAMES or not _ENABLED:
        return None
    if dtype in _GEMMS:
        return _GEMMS[dtype]
    lib = library()
    address = None
    if lib is not None and os.environ.get("CONVDESCENT_NATIVE_BLAS", "1") != "0":
        for blas in _torch_blas_libraries():
            try:
                candidate = ctypes.cast(getattr(blas, _GEMM_NAMES[dtype]), ctypes.c_void_p).value
            except AttributeError:
                continue
            if candidate and _gemm_agrees(lib, candidate, dtype):
                address = candidate
            break
    _GEMMS[dtype] = address
    return address


def dense_update_rows(units: int) -> int:
    """Rows of the weight (input features) ``cd_dense_bwd_adam`` takes at a time for a layer of ``units``
    outputs: blocks of about 128k elements (512 KB of float32 gradient per thread, inside a 2 MB L2 with the
    weight's block), between 8 and 1024 rows. Measured for the tutorial's Dense (5408 x 128) at batch 32:
    64-row blocks made the kernel no faster than the separate products and step, 1024-row blocks about 10%
    faster."""
    return max(8, min(1024, (1 << 17) // max(units, 1)))


def doubles(values) -> ctypes.Array:
    """``values`` as a C array of doubles (a kernel's hyperparameters)."""
    return (ctypes.c_double * len(values))(*values)


def threads() -> int:
    """Threads for the kernels: torch's intra-op count, so both share one OpenMP pool size."""
    return torch.get_num_threads()


# -- subnormal floats ------------------------------------------------------------------------------------
# Adam's first moment of a weight whose gradient has stopped (a Dense input that is zero for every image)
# decays by beta1 each step into the subnormal range, where every operation on it is many times slower;
# see docs/performance.md. The training step runs with flush-to-zero on, and restores the caller's setting.
_FLUSH = os.environ.get("CONVDESCENT_FLUSH_SUBNORMALS", "1") != "0"
_FLUSH_LOCAL = threading.local()
_TINY = torch.finfo(torch.float32).tiny


def set_subnormal_flushing(flag: bool) -> bool:
    """Turn flushing subnormals to zero inside the training step on or off (``CONVDESCENT_FLUSH_SUBNORMALS=0``
    starts it off); returns the previous value."""
    global _FLUSH
    previous, _FLUSH = _FLUSH, bool(flag)
    return previous


def subnormal_flushing() -> bool:
    """Whether the training step flushes subnormals to zero."""
    return _FLUSH


def flushes_here() -> bool:
    """Whether this thread's floating-point unit flushes subnormals now (a subnormal times one gives 0)."""
    return bool(torch.full((), _TINY / 4, dtype=torch.float32).mul(1.0) == 0)


def flush_state() -> list[bool] | None:
    """For each thread of the OpenMP team torch uses, whether it flushes subnormals now; None without the
    kernels."""
    lib = library()
    if lib is None:
        return None
    n = threads()
    out = (ctypes.c_int32 * n)()
    lib.cd_flush_state(n, out)
    return [bool(v) for v in out]


class FlushSubnormals:
    """Context manager (and decorator) that flushes subnormal floats to zero inside it, on every thread of
    torch's OpenMP team, restoring each thread's own setting on exit; nested uses do nothing more. Values
    below the smallest normal float (1.2e-38 in float32, 2.2e-308 in float64) become 0, as inputs and as
    results. A no-op when turned off (``set_subnormal_flushing``). Without the kernels it falls back to
    ``torch.set_flush_denormal``, which reaches the calling thread only."""

    def __enter__(self):
        depth = getattr(_FLUSH_LOCAL, "depth", 0)
        _FLUSH_LOCAL.depth = depth + 1
        if depth or not _FLUSH:
            _FLUSH_LOCAL.mode = _FLUSH_LOCAL.mode if depth else None
            return self
        lib = library()
        if lib is not None and lib.cd_flush_subnormals(1, threads()):
            _FLUSH_LOCAL.mode = ("native", threads())
        elif not flushes_here() and torch.set_flush_denormal(True):
            _FLUSH_LOCAL.mode = ("torch", 1)
        else:
            _FLUSH_LOCAL.mode = None
        return self

    def __exit__(self, *exc):
        _FLUSH_LOCAL.depth -= 1
        if _FLUSH_LOCAL.depth == 0 and _FLUSH_LOCAL.mode is not None:
            kind, n = _FLUSH_LOCAL.mode
            if kind == "native":
                _LIB.cd_flush_subnormals(0, n)
            else:
                torch.set_flush_denormal(False)
            _FLUSH_LOCAL.mode = None
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        return wrapped


flush_subnormals = FlushSubnormals()
