"""Which process this is in a data-parallel run, and the process group all of them share.

A worker learns its place from the environment that ``torchrun`` and ``convdescent train --nproc N`` both set
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). ``init_world`` joins the group
(gloo on the CPU, NCCL on CUDA unless told otherwise) with a collective timeout, so that a peer that
vanishes turns into an error on every survivor instead of a wait without end.

Every failure to join is one :class:`DistributedError` whose message says what happened and what to do.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..options import seconds_from_env

DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A data-parallel run cannot start or cannot go on; the message names the cause and the remedy."""


@dataclass(frozen=True)
class World:
    """This process's place in the run.

    Attributes:
        rank: global rank, 0..size-1 (rank 0 writes the run directory).
        size: number of processes (the world size).
        local_rank: rank on this machine (selects the CUDA device).
        local_size: processes on this machine.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int | None = None) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"the environment variable {name}={text!r} is not an integer; it is set by "
                               f"torchrun or convdescent train --nproc") from None


def world_from_env() -> World:
    """The World described by torchrun's variables; a single process when WORLD_SIZE is not set."""
    size = _env_int("WORLD_SIZE")
    if size is None:
        return World()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    if size < 1 or not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} and WORLD_SIZE={size} from the environment do not fit "
                               f"(0 <= RANK < WORLD_SIZE)")
    return World(rank, size, local_rank, local_size)


def collective_timeout() -> float:
    """Seconds a collective may wait for a peer: $CONVDESCENT_DIST_TIMEOUT, else 300."""
    value = seconds_from_env("CONVDESCENT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    if value is None:
        raise DistributedError(f"CONVDESCENT_DIST_TIMEOUT must be a positive number of seconds, got "
                               f"{os.environ['CONVDESCENT_DIST_TIMEOUT']!r}")
    return value


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` -> "nccl" on CUDA, "gloo" on the CPU; "gloo" and "nccl" are checked against the device."""
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "nccl" if on_cuda else "gloo"
    if backend == "nccl" and not on_cuda:
        raise DistributedError("backend nccl needs CUDA tensors; train on --device cuda or use --backend gloo")
    if backend == "nccl" and not dist.is_nccl_available():
        raise DistributedError("this torch build has no NCCL; use --backend gloo")
    if backend not in ("gloo", "nccl"):
        raise DistributedError(f"backend must be auto, gloo or nccl, got {backend!r}")
    return backend


def worker_device(device: str, world: World, backend: str = "auto") -> str:
    """The device of this worker: each CUDA worker on its own GPU (cuda or cuda:N -> cuda:LOCAL_RANK: a
    resumed run's config records rank 0's cuda:0, which every worker reads).

    With NCCL every worker needs a GPU of its own (NCCL refuses two ranks on one device). Gloo moves CUDA
    tensors through host memory, so with ``backend="gloo"`` workers beyond the machine's GPU count share
    them in turn (cuda:LOCAL_RANK % count): slower than one GPU each, but it runs (and it is how two ranks are
    tested on a machine with one GPU).
    """
    if torch.device(device).type == "cuda" and world.distributed:  # "cuda:0" from a resumed run's config too
        count = torch.cuda.device_count()
        if count == 0:
            raise DistributedError("--device cuda but torch sees no CUDA device; train on --device cpu")
        if world.local_rank >= count:
            if backend == "gloo":  # auto means NCCL on CUDA
                return f"cuda:{world.local_rank % count}"
            raise DistributedError(f"{world.local_size} workers on this machine but only {count} CUDA devices; "
                                   f"start at most {count} per machine (--nproc / --nproc-per-node), or share "
                                   f"the GPUs with --backend gloo")
        return f"cuda:{world.local_rank}"
    return device


def _endpoint() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def init_world(world: World, backend: str, device: str, timeout: float | None = None) -> None:
    """Join the process group of ``world`` (no-op for a single process).

    Raises:
        DistributedError: the rendezvous did not complete within the timeout, or the group could not be
            formed; the message names the address and what to check.
    """
    if not world.distributed or dist.is_initialized():
        return
    seconds = collective_timeout() if timeout is None else timeout
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    try:
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size,
                                timeout=_dt.timedelta(seconds=seconds))
    except (RuntimeError, ValueError, OSError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "timed out" in text.lower() or "timeout" in text.lower():
            raise DistributedError(f"rank {world.rank} waited {seconds:g}s at {_endpoint()} for the other "
                                   f"{world.size - 1} process(es) of the run, and not all came; start every "
                                   f"process (same --nnodes, --nproc-per-node, master address and port) or "
                                   f"raise CONVDESCENT_DIST_TIMEOUT") from None
        if "address already in use" in text.lower() or "eaddrinuse" in text.lower():
            raise DistributedError(f"port {os.environ.get('MASTER_PORT', '?')} on {os.environ.get('MASTER_ADDR')} "
                                   f"is already in use; choose another --master-port") from None
        raise DistributedError(f"rank {world.rank} could not join the process group at {_endpoint()} "
                               f"({backend}): {text}") from None


def close_world() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):
            pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (or the port cannot be bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def lost_contact(e: BaseException, what: str, rank: int) -> DistributedError:
    """The error of a collective that failed under gloo or NCCL (a peer gone, a timeout), for ``what`` this
    rank was doing: one message, gloo's own words shortened."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". This is typically")[0].rstrip(". ")  # gloo's own words
    return DistributedError(f"rank {rank} lost contact with the other processes during {what} ({text}): a "
                            f"worker died or stopped answering, so the run stopped")
