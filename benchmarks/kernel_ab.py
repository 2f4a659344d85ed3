"""The native kernels as they are (A) against a variant of their source (B), in alternating rounds of one process.

Both libraries are built from their sources (``convdescent/native`` build rules, so the variant is cached like
the real one) and loaded side by side (``native.load_variant``, ``native.using``); after one untimed round of
each, every round runs A then B (B then A in odd rounds) on the same Fashion-MNIST batches and times either
whole ``train_step`` calls of the tutorial's CNN (``--what step``, each side with a model and Adam state of
its own) or the fused conv + pool node's forward or backward alone (``fwd``, ``bwd``). Printed: each side's
median milliseconds per step or call and the median, lowest and highest of the per-round ratios A/B (above 1:
the variant is faster). ``--rows N`` instead compares the Dense backward's Adam block height
(``native.dense_update_rows``) against N with one library. Check that a variant's results agree before
trusting its speed (the tests, or the node's outputs compared bit for bit).

    python benchmarks/kernel_ab.py VARIANT.c [--batch-size 128] [--rounds 12] [--steps 50] [--what step]
    python benchmarks/kernel_ab.py --rows 512 [--batch-size 32]
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

from convdescent import SoftmaxCrossEntropy, native, seed_cnn  # noqa: E402
from convdescent.data import load_dataset  # noqa: E402
from convdescent.optim import make_optimizer  # noqa: E402
from train_cpu import first_batches, run_ours  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variant", nargs="?", help="a modified copy of convdescent/native/kernels.c")
    ap.add_argument("--rows", type=int, default=None, help="compare Dense's Adam block height against this instead")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=50, help="batches per round")
    ap.add_argument("--what", choices=("step", "fwd", "bwd"), default="step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    if (args.variant is None) == (args.rows is None):
        ap.error("give either a variant source file or --rows N (one of the two)")
    torch.set_num_threads(args.threads)
    lib_a = native.library()
    if lib_a is None:
        print(f"no native kernels: {native.status()}", file=sys.stderr)
        return 1
    rows_a = native.dense_update_rows
    if args.rows is not None:
        lib_b, rows_b = lib_a, (lambda units: args.rows)
    else:
        try:
            lib_b, rows_b = native.load_variant(args.variant), rows_a
        except (OSError, native.BuildError, AttributeError) as exc:  # AttributeError: a kernel is missing
            print(f"the variant {args.variant} could not be built and loaded: {exc}", file=sys.stderr)
            return 1

    data = load_dataset("fashion-mnist", data_dir=args.data_dir, val_split=0)
    batches = first_batches(data, args.batch_size, args.steps)

    def side(lib, rows):
        model = seed_cnn(input_shape=data.input_shape, num_classes=data.num_classes, seed=0)
        opt = make_optimizer("adam", lr=1e-3)
        return {"lib": lib, "rows": rows, "model": model, "opt": opt, "state": [opt.init(model.params())]}

    sides = {"A": side(lib_a, rows_a), "B": side(lib_b, rows_b)}
    loss_fn = SoftmaxCrossEntropy()
    times = {"A": [], "B": []}
    try:
        for r in range(-1, args.rounds):  # round -1: each side once, untimed (first calls, allocations)
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                s = sides[name]
                native.dense_update_rows = s["rows"]  # read by Dense at every backward
                with native.using(s["lib"]):
                    spent = _round(s, loss_fn, batches, args.what)
                if r >= 0:
                    times[name].append(spent)
    finally:
        native.dense_update_rows = rows_a
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    ratios = [x / y for x, y in zip(times["A"], times["B"])]
    print(f"{args.what}, batch {args.batch_size}: A {a * 1e3:.3f} ms, B {b * 1e3:.3f} ms; per-round A/B median "
          f"{statistics.median(ratios):.3f}, lowest {min(ratios):.3f}, highest {max(ratios):.3f}")
    return 0


def _round(s: dict, loss_fn, batches, what: str) -> float:
    """Median seconds of one call (fwd, bwd) or mean seconds of one train_step over the batches."""
    if what == "step":
        return run_ours(s["model"], loss_fn, s["opt"], s["state"], batches) / len(batches)
    node = s["model"].plan().nodes[0]
    spans = []
    with torch.no_grad():
        for xb, _ in batches:
            y = node.forward(xb, True)
            if what == "bwd":
                dy = torch.ones_like(y)
                t0 = time.perf_counter()
                node.backward(dy)
            else:
                node.clear_cache()
                t0 = time.perf_counter()
                node.forward(xb, True)
            spans.append(time.perf_counter() - t0)
            node.clear_cache()
    return statistics.median(spans)


if __name__ == "__main__":
    sys.exit(main())
