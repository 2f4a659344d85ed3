"""Run a function in N local processes joined in one gloo group on 127.0.0.1 (for the distributed tests).

A collective that waits longer than COLLECTIVE_TIMEOUT_S fails in its process, and a run that outlasts its
``timeout`` is killed, so a bug fails the test instead of hanging it; every process is joined or killed.
"""

import datetime
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Call ``fn(rank, world, *args)`` in ``world`` spawned processes, each in the default group.

    ``fn`` must be a module-level function (the processes import it). Raises the first process's error
    (with its traceback), or TimeoutError after ``timeout`` seconds.
    """
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} processes running {fn.__name__} did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join()
