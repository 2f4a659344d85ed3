"""Time `convdescent train` (the CLI's path) against idiomatic and tuned PyTorch, taking turns, in one run.

Every side trains the tutorial's CNN (Conv2D 32 3x3 + ReLU -> MaxPool 2x2 -> Flatten -> Dense 128 + ReLU ->
Dense 10) with Adam(1e-3) on all 60,000 Fashion-MNIST training images, from the same initial weights and in
the same order: each PyTorch side takes its epoch's batches in the order convdescent's loader took them, so
the test accuracies differ by the arithmetic alone, not by which images fell into which batch.

- convdescent: ``train_from_config`` with the train command's defaults (progress bar drawn to a null terminal,
  metrics.jsonl, gradient-health checks every 50 steps, non-finite checks, last/best checkpoints at every
  epoch end), ``--val-split 0`` so that it trains on the same 60,000 images; subnormals are flushed inside its
  step by default.
- pytorch: idiomatic: nn.Sequential, a DataLoader over a TensorDataset, torch.optim.Adam, loss.backward().
- pytorch-tuned: tuned for CPU: the network and inputs in channels_last, each epoch's batches sliced from one
  shuffled in-memory tensor (no DataLoader), torch.optim.Adam(fused=True), zero_grad(set_to_none=True).
- each PyTorch side once as is and once with subnormals flushed to zero ("+flush": every OpenMP thread, as
  torch.set_flush_denormal(True) at program start would give).

The sides take turns inside each epoch: after every ``--segment-steps`` (100) convdescent steps, every
PyTorch side takes its next 100 steps of the same epoch, so that all of them meet the same load on a shared
machine whose speed drifts within seconds (with whole epochs one after another, one side's epoch could fall
in a fast stretch and the next side's in a slow one: single-epoch ratios moved by 20% from run to run).
convdescent's epochs are timed from one epoch's start to the next (so its epoch-end checkpoints count) less
the time the PyTorch sides ran inside them; each PyTorch epoch is the sum of its segments (its epoch's one
shuffle included). ``--segment-steps 0`` runs each PyTorch epoch whole after convdescent's. Each PyTorch side
takes 50 untimed warm-up steps on a network of its own first. Test accuracy is measured after every epoch,
outside the timed spans. Printed per batch size: each side's seconds per epoch (every epoch, and the median),
the speed-up against the strongest PyTorch side (the one with the lowest median) as the ratio of medians and
for every epoch, and the test accuracies. Before and after each batch size it times a 1024^3 fp32 matrix
product on the run's threads, so the output says how loaded the machine was (about 365 GFLOP/s on one
2-core development VM when nothing else ran on its host, 180-195 on another, a Zen 4, whose cores give
96 each).

    python benchmarks/train_peers.py [--epochs 3] [--batch-sizes 32,128] [--segment-steps 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_cpu import _NullTerminal, run_torch, torch_cnn, torch_steps  # noqa: E402

from convdescent import native, seed_cnn  # noqa: E402
from convdescent.data import Normalizer, load_dataset  # noqa: E402
from convdescent.train import Callback  # noqa: E402
from convdescent.train.run import train_from_config  # noqa: E402
from convdescent.train.step import evaluate  # noqa: E402


def gemm_gflops(n: int = 1024, reps: int = 20, rounds: int = 5) -> float:
    """The median rate of an n^3 fp32 matrix product over ``rounds`` rounds of ``reps``: a probe of the load."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        rates.append(2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def _accuracy(net, x_test, y_test) -> float:
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum())
                      for i in range(0, len(x_test), 1000))
    return correct / len(x_test)


def idiomatic_side(data, batch_size: int, seed: int, warmup_steps: int, flush: bool):
    """(its epochs as a ``PeerEpoch``, test accuracy -> float) for idiomatic PyTorch."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    x_train = data.x_train.float().div_(255)
    x_test = data.x_test.float().div_(255)
    images = TensorDataset(x_train, data.y_train)
    criterion = nn.CrossEntropyLoss()
    scratch, scratch_opt = torch_cnn(data)  # warmed up, then dropped: the timed side starts afresh
    with _flushing(flush):
        run_torch(scratch, scratch_opt, criterion, DataLoader(images, batch_size=batch_size, shuffle=True),
                  limit=warmup_steps)
    net, opt = torch_cnn(data, seed_cnn(input_shape=data.input_shape, num_classes=data.num_classes, seed=seed))

    def steps(order: torch.Tensor):
        return torch_steps(net, opt, criterion, DataLoader(images, batch_size=batch_size, sampler=order.tolist()))

    return PeerEpoch(steps, flush), lambda: _accuracy(net, x_test, data.y_test)


def tuned_net(data, start_from=None):
    """The tutorial's CNN as PyTorch tuned for CPU: channels_last, Adam(fused=True)."""
    net, _ = torch_cnn(data, start_from)
    net = net.to(memory_format=torch.channels_last)
    return net, torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)


def tuned_steps(net, opt, x, y, batch_size: int, order: torch.Tensor):
    """Tuned PyTorch's training steps over one epoch, one per item taken: first one shuffle of the in-memory
    tensors (in ``order``), then slices of it."""
    net.train()
    xs = x[order].contiguous(memory_format=torch.channels_last)
    ys = y[order]
    for start in range(0, len(xs), batch_size):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(xs[start:start + batch_size]), ys[start:start + batch_size])
        loss.backward()
        opt.step()
        yield


def tuned_side(data, batch_size: int, seed: int, warmup_steps: int, flush: bool):
    """(its epochs as a ``PeerEpoch``, test accuracy -> float) for tuned PyTorch."""
    torch.manual_seed(seed)
    x_train = data.x_train.float().div_(255).contiguous(memory_format=torch.channels_last)
    x_test = data.x_test.float().div_(255).contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    scratch, scratch_opt = tuned_net(data)  # warmed up, then dropped: the timed side starts afresh
    with _flushing(flush):
        warmup = tuned_steps(scratch, scratch_opt, x_train, data.y_train, batch_size,
                             torch.randperm(len(x_train), generator=gen))
        for _ in itertools.islice(warmup, warmup_steps):
            pass
    net, opt = tuned_net(data, seed_cnn(input_shape=data.input_shape, num_classes=data.num_classes, seed=seed))
    return (PeerEpoch(lambda order: tuned_steps(net, opt, x_train, data.y_train, batch_size, order), flush),
            lambda: _accuracy(net, x_test, data.y_test))


class _NoFlush:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _flushing(flush: bool):
    return native.flush_subnormals if flush else _NoFlush()


class PeerEpoch:
    """One PyTorch side's epochs, run a few steps at a time: ``start(order)`` begins an epoch (nothing runs
    yet), ``advance(n)`` runs its next ``n`` steps (None: the rest) and adds their seconds to ``seconds``.
    ``steps(order)`` is a generator that takes one training step per item; the epoch's setup (a shuffle)
    runs inside the first ``advance`` and is timed with it."""

    def __init__(self, steps, flush: bool):
        self.steps, self.flush = steps, flush
        self.seconds, self._it = 0.0, None

    def start(self, order: torch.Tensor) -> None:
        self.seconds, self._it = 0.0, self.steps(order)

    def advance(self, n: int | None = None) -> None:
        if self._it is None:
            return
        t0 = time.perf_counter()
        with _flushing(self.flush):
            taken = sum(1 for _ in itertools.islice(self._it, n))
        self.seconds += time.perf_counter() - t0
        if n is None or taken < n:  # the epoch is over
            self._it = None


class Alternate(Callback):
    """Times convdescent's epochs and, inside each, runs the same epoch of every peer (in the order
    convdescent's loader took that epoch's images) in segments: after every ``segment`` convdescent steps
    each peer takes its next ``segment`` steps, so that all sides meet the same load on a machine whose speed
    drifts within seconds; the time spent in peers is taken out of convdescent's epoch. ``segment`` 0: each
    peer runs its whole epoch after convdescent's."""

    def __init__(self, peers: dict, data, segment: int):
        self.peers = peers
        self.data = data
        self.segment = segment
        self.norm = Normalizer.unit()
        self.t0 = None
        self.paused = 0.0
        self.times = {"convdescent": [], **{name: [] for name in peers}}
        self.accs = {name: [] for name in self.times}

    def on_epoch_begin(self, trainer, epoch):
        if self.t0 is not None:
            self._end(trainer)
        order = trainer.loader.order(trainer.loader.epoch).cpu()  # outside the timed span
        for peer, _ in self.peers.values():
            peer.start(order)
        self.paused = 0.0
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer, step, logs):
        if self.segment and logs["batch"] % self.segment == 0:
            t = time.perf_counter()
            for peer, _ in self.peers.values():
                peer.advance(self.segment)
            self.paused += time.perf_counter() - t

    def on_train_end(self, trainer):
        self._end(trainer)

    def _end(self, trainer):
        self.times["convdescent"].append(time.perf_counter() - self.t0 - self.paused)
        self.accs["convdescent"].append(evaluate(trainer.model, trainer.loss_fn, self.data.x_test, self.data.y_test,
                                                 normalizer=self.norm)[1])
        for name, (peer, accuracy) in self.peers.items():
            peer.advance()  # the steps after the last segment (all of them with segment 0)
            self.times[name].append(peer.seconds)
            self.accs[name].append(accuracy())


def compare(data, batch_size: int, epochs: int, seed: int, warmup_steps: int, segment: int):
    """Run every side ``epochs`` epochs, alternating; returns (times, accuracies), each name -> per-epoch list."""
    peers = {}
    for flush in (False, True):
        tag = "+flush" if flush else ""
        peers["pytorch" + tag] = idiomatic_side(data, batch_size, seed, warmup_steps, flush)
        peers["pytorch-tuned" + tag] = tuned_side(data, batch_size, seed, warmup_steps, flush)
    alt = Alternate(peers, data, segment)
    config = {"model": "seed_cnn", "dataset": "fashion-mnist", "val_split": 0, "epochs": epochs,
              "batch_size": batch_size, "lr": 1e-3, "optimizer": "adam", "seed": seed}
    with tempfile.TemporaryDirectory() as out:
        train_from_config(config, callbacks=[alt], out=out, display="bar", stream=_NullTerminal(), dataset=data,
                          handle_signals=False)
    return alt.times, alt.accs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per side and batch size")
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for every side")
    ap.add_argument("--warmup-steps", type=int, default=50, help="untimed PyTorch steps before its timed epochs")
    ap.add_argument("--segment-steps", type=int, default=100,
                    help="steps each side takes before the next one runs (0: whole epochs, one side after another)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-images", type=int, default=None, help="use only the first N training images (a quick check)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir, val_split=0, seed=args.seed)
    if args.train_images is not None:
        data.x_train, data.y_train = data.x_train[:args.train_images], data.y_train[:args.train_images]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fashion-mnist {len(data.x_train)} train / "
          f"{len(data.x_test)} test, {args.epochs} epochs per side; {native.status()}", flush=True)
    summary = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        before = gemm_gflops()
        times, accs = compare(data, bs, args.epochs, args.seed, args.warmup_steps, args.segment_steps)
        after = gemm_gflops()
        med = {name: statistics.median(t) for name, t in times.items()}
        strongest = min((name for name in med if name != "convdescent"), key=med.get)
        print(f"\nbatch {bs}: seconds per epoch (test accuracy after it); fp32 1024^3 product {before:.0f} GFLOP/s "
              f"before, {after:.0f} after")
        for name, t in times.items():
            epochs = ", ".join(f"{s:.2f} ({a:.4f})" for s, a in zip(t, accs[name]))
            print(f"  {name:21s} median {med[name]:6.2f} | {epochs}")
        per_epoch = [p / o for o, p in zip(times["convdescent"], times[strongest])]
        gaps = [100 * (o - p) for o, p in zip(accs["convdescent"], accs[strongest])]
        print(f"  strongest peer: {strongest}; speed-up {med[strongest] / med['convdescent']:.2f}x (ratio of medians), "
              f"per epoch {', '.join(f'{r:.2f}x' for r in per_epoch)}; test accuracy convdescent minus peer, "
              f"per epoch, in points: {', '.join(f'{g:+.2f}' for g in gaps)}", flush=True)
        summary.append((bs, med, strongest, min(per_epoch), accs, gaps))
    print("\n| batch | convdescent s/epoch | " + " | ".join(f"{n} s/epoch" for n in summary[0][1] if n != "convdescent")
          + " | speed-up vs strongest (medians) | lowest epoch speed-up | test acc convdescent / strongest |")
    print("|---:|" + "---:|" * (len(summary[0][1]) + 3))
    for bs, med, strongest, low, accs, gaps in summary:
        peers = " | ".join(f"{med[n]:.2f}" for n in med if n != "convdescent")
        print(f"| {bs} | {med['convdescent']:.2f} | {peers} | {med[strongest] / med['convdescent']:.2f}x ({strongest}) "
              f"| {low:.2f}x | {accs['convdescent'][-1]:.4f} / {accs[strongest][-1]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
