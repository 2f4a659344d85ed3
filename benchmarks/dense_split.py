"""Dense's native products (input features split over threads as torch's fused Adam splits the weight)
against torch's own products, in alternating rounds of the same process.

Two measurements per round, each with the native split and then with torch's products:

- ``cycle``: Dense(128)'s work on a 5408-feature input (the tutorial CNN's first Dense) in one training
  step, repeated: weight gradient, fused Adam step on the weight, input gradient, next forward.
- ``step``: whole training steps of the tutorial's CNN (``train_step``, Adam(1e-3)) on Fashion-MNIST batches.

Both print milliseconds per repetition and the ratio torch / native (above 1: the split is faster). The gain
depends on whether the machine's two cores share a cache at that moment: when they do not, every block of
the weight that one core's Adam step wrote and the other core's product reads crosses between caches.

    python benchmarks/dense_split.py [--batch-sizes 32,128] [--rounds 10] [--steps 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convdescent import SoftmaxCrossEntropy, seed_cnn, native  # noqa: E402
from convdescent.data import load_dataset  # noqa: E402
from convdescent.layers import Dense  # noqa: E402
from convdescent.optim import make_optimizer, update_and_apply  # noqa: E402
from train_cpu import first_batches, run_ours  # noqa: E402

ON, OFF = Dense.NATIVE_MIN_WEIGHT, 1 << 62


def cycle_timer(batch: int, steps: int):
    """() -> ms per repetition of Dense(128)'s step on (batch, 5408) inputs, with the current threshold."""
    gen = torch.Generator().manual_seed(0)
    layer = Dense(128, name="dense")
    layer.build((5408,), generator=gen)
    opt = make_optimizer("adam", lr=1e-3)
    state = [opt.init(layer.params)]
    x = torch.rand(batch, 5408, generator=gen)
    dy = torch.randn(batch, 128, generator=gen) * 1e-2

    def run() -> float:
        layer.forward(x, True)
        t0 = time.perf_counter()
        for _ in range(steps):
            layer.backward(dy)
            state[0] = update_and_apply(opt, layer.params, layer.grads, state[0])
            layer.forward(x, True)
        return (time.perf_counter() - t0) / steps * 1e3
    return run


def step_timer(data, batch: int, steps: int):
    """() -> ms per whole training step of the tutorial's CNN, with the current threshold."""
    batches = first_batches(data, batch, steps)
    model = seed_cnn(input_shape=data.input_shape, num_classes=data.num_classes, seed=0)
    loss_fn = SoftmaxCrossEntropy()
    opt = make_optimizer("adam", lr=1e-3)
    state = [opt.init(model.params())]
    return lambda: run_ours(model, loss_fn, opt, state, batches) / len(batches) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200, help="repetitions per measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if native.gemm(torch.float32) is None:
        print(f"the native dense kernels are not available here ({native.status()}; BLAS symbol or its check "
              "missing): nothing to compare")
        return 1
    data = load_dataset("fashion-mnist", data_dir=args.data_dir, val_split=0, seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of "
          f"{args.steps} repetitions; ms per repetition, native split / torch's products")
    summary = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        timers = {"cycle": cycle_timer(bs, args.steps), "step": step_timer(data, bs, args.steps)}
        ratios = {name: [] for name in timers}
        print(f"\nbatch {bs}: round, cycle native, cycle torch, ratio, step native, step torch, ratio")
        try:
            for name, run in timers.items():  # warm-up
                run()
            for r in range(args.rounds):
                cells = []
                for name, run in timers.items():
                    Dense.NATIVE_MIN_WEIGHT = ON
                    a = run()
                    Dense.NATIVE_MIN_WEIGHT = OFF
                    b = run()
                    ratios[name].append(b / a)
                    cells.append(f"{a:6.2f} {b:6.2f} {b / a:5.2f}x")
                print(f"  {r + 1:3d}  " + "  |  ".join(cells), flush=True)
        finally:
            Dense.NATIVE_MIN_WEIGHT = ON
        row = [bs] + [statistics.median(ratios[n]) for n in timers] + [min(ratios["step"]), max(ratios["step"])]
        summary.append(row)
    print("\n| batch | cycle: median torch/native | step: median torch/native | step: lowest | step: highest |")
    print("|---:|---:|---:|---:|---:|")
    for bs, c, s, lo, hi in summary:
        print(f"| {bs} | {c:.2f}x | {s:.2f}x | {lo:.2f}x | {hi:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
