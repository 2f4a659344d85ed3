"""Seconds per training step of each named model at batch 128 on 28x28 images, against its torch.nn twin.

Both sides start from the same weights and train on the same batches: ours with the explicit backward and the
fused Adam step (``train_step``), PyTorch with autograd and ``torch.optim.Adam``. Rounds alternate between the
two so a machine whose speed drifts (shared cores) slows both alike; the ratio is the figure to read. Besides
the medians it prints the fastest round of each side: on cores shared with other work, the least disturbed
rounds are the steadier comparison.

    python benchmarks/models_step.py --models resnet8,mobilenet_tiny --rounds 3 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from convdescent.losses import SoftmaxCrossEntropy
from convdescent.models import MODELS, make_model
from convdescent.optim import make_optimizer
from convdescent.train.step import train_step


def _batches(n: int, batch: int, shape, classes: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand((batch, *shape), generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def time_ours(model, batches) -> float:
    loss_fn = SoftmaxCrossEntropy()
    opt = make_optimizer("adam", lr=1e-3)
    state = opt.init(model.params())
    xb, yb = batches[0]
    state = train_step(model, loss_fn, opt, state, xb, yb)[2]  # warm-up: allocator, native kernels
    start = time.perf_counter()
    for xb, yb in batches:
        state = train_step(model, loss_fn, opt, state, xb, yb)[2]
    return (time.perf_counter() - start) / len(batches)


def time_torch(net, batches) -> float:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()

    def step(xb, yb):
        opt.zero_grad(set_to_none=True)
        loss_fn(net(xb), yb).backward()
        opt.step()

    with torch.enable_grad():
        step(*batches[0])
        start = time.perf_counter()
        for xb, yb in batches:
            step(xb, yb)
    return (time.perf_counter() - start) / len(batches)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="seed_cnn,resnet8,mobilenet_tiny", help="comma-separated model names")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-images", type=int, default=55000, help="images per epoch, for the epoch estimate")
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    shape = (1, 28, 28)
    batches = _batches(args.steps, args.batch_size, shape, 10)
    steps_per_epoch = -(-args.train_images // args.batch_size)
    print(f"batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, torch threads "
          f"{torch.get_num_threads()}; epoch = {steps_per_epoch} steps")
    print(f"{'model':<16}{'ours s/step':>12}{'torch s/step':>14}{'ours/torch':>12}{'ours s/epoch':>14}"
          f"{'ours min':>10}{'torch min':>11}{'min ratio':>11}")
    for name in names:
        ours_model = make_model(name, shape, 10, seed=0)
        net = ours_model.to_torch()
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(time_ours(ours_model, batches))
            theirs.append(time_torch(net, batches))
        o, t = statistics.median(ours), statistics.median(theirs)
        lo, lt = min(ours), min(theirs)
        print(f"{name:<16}{o:>12.3f}{t:>14.3f}{o / t:>12.2f}{o * steps_per_epoch:>14.0f}"
              f"{lo:>10.3f}{lt:>11.3f}{lo / lt:>11.2f}")


if __name__ == "__main__":
    main()
