"""Wall time from process start to a test accuracy on Fashion-MNIST, over several seeds, on one GPU.

Each seed is one ``convdescent train`` process, timed from before the interpreter starts to its exit, so the
figure includes imports, reading the data, moving it to the GPU, recording CUDA graphs, training and the
final test evaluation. The recipe is given as ``convdescent train`` flags (defaults below) and is printed
with the results: mean and spread (sample standard deviation, min, max) of the wall time and of the test
accuracy, and how many seeds reached ``--target``.

    python benchmarks/time_to_accuracy.py [--seeds 5] [--target 0.93] [--data-dir DIR] [-- extra train flags]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A residual network with batch norm, light augmentation, label smoothing and a one-cycle schedule, in bf16
# at a batch large enough to fill the GPU; the flags are those of `convdescent train`.
RECIPE = ("--model resnet8 --dataset fashion-mnist --epochs 10 --batch-size 256 --optimizer adamw --lr 4e-3 "
          "--weight-decay 5e-4 --schedule one_cycle --augment crop:2,flip --label-smoothing 0.1 --precision bf16 "
          "--val-split 0 --device cuda")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--seeds", type=int, default=5, help="independent runs, seeds 0..N-1 (default 5)")
    ap.add_argument("--target", type=float, default=0.93, help="test accuracy to reach (default 0.93)")
    ap.add_argument("--recipe", default=RECIPE, help="convdescent train flags (default: the recipe above)")
    ap.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST IDX files")
    args = ap.parse_args(argv)
    flags = shlex.split(args.recipe) + extra
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    print(f"recipe: convdescent train {' '.join(flags)}", flush=True)
    walls, accs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            cmd = [sys.executable, "-m", "convdescent", "train", *flags, "--seed", str(seed), "--out", tmp,
                   "--name", f"seed{seed}"]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
                print(f"time_to_accuracy.py: seed {seed} failed with exit code {done.returncode}", file=sys.stderr)
                return 1
            summaries = sorted(Path(tmp).glob(f"*seed{seed}*/summary.json"))
            if not summaries:
                print(f"time_to_accuracy.py: seed {seed} wrote no summary.json under {tmp}", file=sys.stderr)
                return 1
            acc = float(json.loads(summaries[-1].read_text())["test_acc"])
            walls.append(wall)
            accs.append(acc)
            print(f"seed {seed}: {wall:.2f} s from process start, test accuracy {acc:.4f}", flush=True)
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    reached = sum(a >= args.target for a in accs)
    print(f"\nwall time {statistics.mean(walls):.2f} s +- {sd(walls):.2f} (min {min(walls):.2f}, max {max(walls):.2f}); "
          f"test accuracy {statistics.mean(accs):.4f} +- {sd(accs):.4f} (min {min(accs):.4f}, max {max(accs):.4f}); "
          f"{reached}/{len(accs)} seeds reached {args.target:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
