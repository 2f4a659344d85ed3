"""Data parallel on the CPU: ``convdescent train --nproc 2`` against torch DistributedDataParallel, same run.

Three ways to train the tutorial's CNN (seed_cnn: Conv2D 32 3x3 + ReLU -> MaxPool 2x2 -> Flatten -> Dense 128 +
ReLU -> Dense 10) with Adam(1e-3) on Fashion-MNIST at global batch 128:

- ``convdescent --nproc 2``: two workers started by ``convdescent train --nproc 2`` (gloo, one thread each),
  each taking 64 images of every global batch, gradients all-reduced in buckets during the backward;
- ``torch DDP``: two processes (gloo, one thread each) with ``torch.nn.parallel.DistributedDataParallel`` over
  nn.Sequential, autograd and torch.optim.Adam; each holds its shard of every global batch in memory as
  float tensors (the same seeded permutation, cut the same way), so no DataLoader cost is counted;
- ``torch DDP + flush``: the same, with subnormal floats flushed to zero in each worker
  (``torch.set_flush_denormal(True)``; one thread each, so that covers all of a worker's arithmetic), as
  convdescent's step does by default: Adam's moments decay into subnormals after a few hundred steps and make
  the arithmetic on them several times slower;
- ``convdescent 1x2``: one convdescent process with two threads (``--threads 2``), the same global batch.

Each round trains each contender for ``--epochs-per-run`` epochs in a fresh launch and keeps the last epoch's
time (the first warms up the kernels); contenders alternate within a round so that load drifting on a shared
machine hits all alike. convdescent's epoch time is the one its run records (metrics.jsonl: the steps and the
epoch-end check, no validation: ``--val-split 0``); DDP's is measured the same way, from a barrier before the
first step to one after the last. Printed: the median seconds per epoch of each, and the ratios of medians
against the faster DDP variant (DDP / convdescent --nproc 2: above 1 means convdescent is faster), also per
round.

    python benchmarks/ddp_cpu.py [--rounds 3] [--epochs-per-run 2] [--limit N]

``--limit N`` trains on the first N training images only (a quick check that everything runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 128


def dataset_arg(limit: int | None, folder: Path) -> str:
    """The --dataset of the convdescent runs: Fashion-MNIST, or an npz of its first ``limit`` images."""
    if not limit:
        return "fashion-mnist"
    from convdescent.data import load_dataset

    data = load_dataset("fashion-mnist", val_split=0)
    path = folder / f"fmnist-{limit}.npz"
    if not path.exists():
        np.savez(path, x_train=data.x_train[:limit].numpy(), y_train=data.y_train[:limit].numpy(),
                 x_test=data.x_test[:max(limit // 6, 1)].numpy(), y_test=data.y_test[:max(limit // 6, 1)].numpy())
    return f"npz:{path}"


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = str(threads)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_convdescent(dataset: str, epochs: int, nproc: int, threads: int, out: Path) -> float:
    """Seconds of the last epoch of one ``convdescent train`` launch (as its metrics.jsonl records it)."""
    run = out / f"cd-{nproc}x{threads}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "convdescent", "train", "--model", "seed_cnn", "--dataset", dataset,
           "--val-split", "0", "--batch-size", str(BATCH), "--epochs", str(epochs), "--optimizer", "adam",
           "--lr", "0.001", "--nproc", str(nproc), "--threads", str(threads), "--health-every", "0",
           "--log-every", "0", "--out", str(run), "--name", "bench", "--no-report", "--quiet"]
    proc = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"convdescent run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (metrics,) = run.glob("*/metrics.jsonl")
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    return [r for r in records if r.get("type") == "epoch"][-1]["time"]


# ----------------------------------------------------------------------------------------------- torch DDP

def _ddp_worker(rank: int, world: int, port: int, x: torch.Tensor, y: torch.Tensor, epochs: int, flush: bool,
                queue) -> None:
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    torch.set_flush_denormal(flush)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(x.shape[1], 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.LazyLinear(128), nn.ReLU(), nn.Linear(128, 10))
    net(x[:2])  # materializes the lazy layer before DDP wraps the model
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    per = BATCH // world
    times = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        # this rank's shard of every global batch, in memory before the clock starts
        shards = []
        for lo in range(0, len(x), BATCH):
            idx = order[lo:lo + BATCH]
            part = idx[rank * len(idx) // world:(rank + 1) * len(idx) // world]
            shards.append((x[part], y[part]))
        dist.barrier()
        t0 = time.perf_counter()
        for xb, yb in shards:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def run_ddp(x: torch.Tensor, y: torch.Tensor, epochs: int, flush: bool = False) -> float:
    """Seconds of the last epoch of a 2-process DDP run (gloo, one thread each), with subnormals flushed to
    zero when ``flush``."""
    import torch.multiprocessing as mp

    from convdescent.distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, free_port(), x, y, epochs, flush, queue), nprocs=2, join=True,
                       start_method="spawn")
    return queue.get()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three contenders (medians over them)")
    ap.add_argument("--epochs-per-run", type=int, default=2, help="epochs per launch; the last one is timed")
    ap.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    args = ap.parse_args()
    from convdescent.data import load_dataset

    data = load_dataset("fashion-mnist", val_split=0)
    n = args.limit or len(data.x_train)
    x = data.x_train[:n].float().div(255.0)
    y = data.y_train[:n].long()
    times: dict[str, list[float]] = {"convdescent --nproc 2": [], "torch DDP (2 processes)": [],
                                     "torch DDP + flush": [], "convdescent 1 process x 2 threads": []}
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        folder = Path(tmp)
        dataset = dataset_arg(args.limit, folder)
        print(f"seed_cnn on {n} Fashion-MNIST images, global batch {BATCH}, Adam(1e-3); {args.rounds} rounds of "
              f"{args.epochs_per_run} epochs per launch, the last one timed", flush=True)
        for r in range(args.rounds):
            times["convdescent --nproc 2"].append(run_convdescent(dataset, args.epochs_per_run, 2, 1, folder))
            times["torch DDP (2 processes)"].append(run_ddp(x, y, args.epochs_per_run))
            times["torch DDP + flush"].append(run_ddp(x, y, args.epochs_per_run, flush=True))
            times["convdescent 1 process x 2 threads"].append(
                run_convdescent(dataset, args.epochs_per_run, 1, 2, folder))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    for k, v in med.items():
        print(f"{k:36s} {v:8.2f} s/epoch (median of {len(times[k])})")
    ours = med["convdescent --nproc 2"]
    ddp = min(("torch DDP (2 processes)", "torch DDP + flush"), key=med.get)
    rounds = ", ".join(f"{d / c:.2f}x" for d, c in zip(times[ddp], times["convdescent --nproc 2"]))
    print(f"\n{ddp} / convdescent --nproc 2: {med[ddp] / ours:.2f}x (the faster DDP variant; per round {rounds})")
    print(f"convdescent 1x2 threads / convdescent --nproc 2:   "
          f"{med['convdescent 1 process x 2 threads'] / ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
