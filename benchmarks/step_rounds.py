"""Per-step time of the tutorial's CNN, convdescent against idiomatic PyTorch, in many short alternating rounds.

``train_cpu.py`` compares whole epochs; on a shared machine whose speed drifts over minutes, a handful of
epoch pairs can all land in one slow or one fast period. This script alternates short rounds (``--steps``
training steps of each side on the same Fashion-MNIST batches, Adam(1e-3)) and prints every round's
milliseconds per step and the ratio PyTorch / convdescent, then the median, the lowest and the highest
ratio, so the spread the machine causes is visible next to the typical value.

    python benchmarks/step_rounds.py [--batch-sizes 32,128] [--rounds 15] [--steps 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convdescent import SoftmaxCrossEntropy, seed_cnn  # noqa: E402
from convdescent.data import load_dataset  # noqa: E402
from convdescent.optim import make_optimizer  # noqa: E402
from train_cpu import first_batches, run_ours, run_torch, torch_cnn  # noqa: E402


def sides(data, seed: int):
    """(ours(batches) -> seconds, theirs(batches) -> seconds): each runs one training step per batch."""
    torch.manual_seed(seed)
    model = seed_cnn(input_shape=data.input_shape, num_classes=data.num_classes, seed=seed)
    loss_fn = SoftmaxCrossEntropy()
    opt = make_optimizer("adam", lr=1e-3)
    box = [opt.init(model.params())]
    net, peer_opt = torch_cnn(data)
    criterion = torch.nn.CrossEntropyLoss()
    return (lambda batches: run_ours(model, loss_fn, opt, box, batches),
            lambda batches: run_torch(net, peer_opt, criterion, batches))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=200, help="training steps per side and round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir, val_split=0, seed=args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of "
          f"{args.steps} steps per side")
    summary = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        batches = first_batches(data, bs, args.steps, args.seed)  # the same batches for both sides
        ours, theirs = sides(data, args.seed)
        ours(batches[:20])  # warm-up, not timed
        theirs(batches[:20])
        ratios = []
        print(f"\nbatch {bs}: round, convdescent ms/step, PyTorch ms/step, ratio")
        for r in range(args.rounds):
            a = ours(batches) / len(batches) * 1e3
            b = theirs(batches) / len(batches) * 1e3
            ratios.append(b / a)
            print(f"  {r + 1:3d}  {a:7.2f}  {b:7.2f}  {b / a:5.2f}x", flush=True)
        med = statistics.median(ratios)
        summary.append((bs, med, min(ratios), max(ratios)))
        print(f"batch {bs}: median ratio {med:.2f}x (lowest {min(ratios):.2f}x, highest {max(ratios):.2f}x)")
    print("\n| batch | median speed-up | lowest round | highest round |")
    print("|---:|---:|---:|---:|")
    for bs, med, lo, hi in summary:
        print(f"| {bs} | {med:.2f}x | {lo:.2f}x | {hi:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
