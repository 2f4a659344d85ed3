"""Where adding workers stops paying: a scaling model of data-parallel seed_cnn at global batch 128.

Measured here: the compute time of one convdescent training step (forward, backward, Adam) on one thread
at each per-worker batch 128 / N. Modelled: the ring all-reduce of the gradients, which sends and receives
2 (N - 1) / N of the gradient bytes S per worker, in 2 (N - 1) messages:

    T_comm(N) = 2 (N - 1) / N * S / bandwidth + 2 (N - 1) * latency

and, without any overlap (the conservative case: seed_cnn's gradients are one bucket, 99.8% of them the
first dense layer's, which the backward finishes first but the rest of the backward is short),

    T_step(N) = T_compute(128 / N) + T_comm(N),   speed-up(N) = T_compute(128) / T_step(N),
    efficiency(N) = speed-up(N) / N.

    python benchmarks/ddp_scaling.py [--latency-us 20] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from convdescent import SoftmaxCrossEntropy, seed_cnn
from convdescent.optim import make_optimizer
from convdescent.train.step import train_step

WORKERS = (1, 2, 4, 8, 16, 32, 64)
LINKS_GBIT = (10, 25, 100)


def step_seconds(batch: int, steps: int) -> float:
    """Median seconds of one train_step at ``batch`` images (one thread, after a warm-up)."""
    model = seed_cnn(seed=0)
    loss_fn = SoftmaxCrossEntropy()
    opt = make_optimizer("adam", lr=1e-3)
    state = opt.init(model.params())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    times = []
    for i in range(steps + 5):
        t0 = time.perf_counter()
        loss, _, state = train_step(model, loss_fn, opt, state, x, y)
        float(loss)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-us", type=float, default=20.0, help="per-message latency of the network (us)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per batch size")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = sum(p.numel() for p in seed_cnn(seed=0).params().values())
    nbytes = 4 * params
    print(f"seed_cnn: {params:,} parameters, {nbytes / 2 ** 20:.2f} MiB of float32 gradients all-reduced per step")
    compute = {n: step_seconds(128 // n, args.steps) for n in WORKERS}
    print("\ncompute per step (1 thread): " + ", ".join(f"B={128 // n}: {compute[n] * 1e3:.2f} ms" for n in WORKERS))
    for gbit in LINKS_GBIT:
        bw = gbit * 1e9 / 8
        print(f"\n{gbit} Gbit/s, {args.latency_us:g} us per message")
        print(f"{'workers':>8} {'B/worker':>9} {'compute ms':>11} {'all-reduce ms':>14} {'step ms':>8} "
              f"{'speed-up':>9} {'efficiency':>11}")
        for n in WORKERS:
            comm = 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * args.latency_us * 1e-6
            step = compute[n] + comm
            speedup = compute[1] / step
            print(f"{n:>8} {128 // n:>9} {compute[n] * 1e3:>11.2f} {comm * 1e3:>14.2f} {step * 1e3:>8.2f} "
                  f"{speedup:>9.2f} {speedup / n:>10.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
