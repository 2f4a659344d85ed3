"""Time the tutorial's CNN on Fashion-MNIST: convdescent against idiomatic PyTorch, in the same run.

Both sides train the same network (Conv2D 32 3x3 + ReLU -> MaxPool 2x2 -> Flatten -> Dense 128 + ReLU ->
Dense 10) with Adam(1e-3) on the same 60,000 training images scaled to [0, 1], at each batch size.

- convdescent: explicit backward, ``train_step`` over a ``BatchLoader`` (uint8 in memory, normalized per batch).
- PyTorch: nn.Sequential, DataLoader over a TensorDataset of the same float tensors, torch.optim.Adam,
  loss.backward() (the way the PyTorch tutorials write it).

Each side runs a short warm-up (not timed), then ``--epochs`` timed epochs, the two sides' epochs alternating so
that load drifting on a shared machine hits both alike; the printed time is the median seconds per epoch, the
ratio is PyTorch's median over ours (above 1: convdescent is faster), and the median of the per-pair ratios is
printed beside it. Both sides' timed models start from the same weights (convdescent's ``seed_cnn``
initialization, Glorot uniform as in Keras, copied into the PyTorch network), so the test accuracies, measured
after the timed epochs, differ only by the training itself (and the order of the shuffled batches).

The "extras" column times what ``convdescent train`` adds to the bare loop: the ``Trainer`` with a progress
bar (drawn to a null terminal, so its redraws and running-loss reads happen), epoch lines, metrics.jsonl
(a step record with per-layer gradient norms every 50 steps), the non-finite check with its in-memory copy of
the last good state every 50 steps, and last/best checkpoints written atomically (with fsync) at every
epoch end. Trainer epochs and bare-loop epochs alternate on the same data, so both see the same machine
load; the overhead printed in the table is the median over epoch pairs of (Trainer epoch / the bare epoch
right after it) minus one; the ratio of medians and the ratio of the fastest epochs are printed too (a busy
machine moves single epochs a lot; the fastest epochs are the least disturbed). The first epoch of each is
dropped as warm-up. Validation is left out of both (it is the same ``evaluate`` call either way).

    python benchmarks/train_cpu.py [--epochs 3] [--batch-sizes 32,128] [--threads 2] [--extras-epochs 4]
"""

from __future__ import annotations

import argparse
import itertools
import io
import statistics
import sys
import tempfile
import time

import torch

from convdescent import SoftmaxCrossEntropy, seed_cnn
from convdescent.data import BatchLoader, Normalizer, load_dataset
from convdescent.optim import make_optimizer
from convdescent.train.step import evaluate, train_step


def run_ours(model, loss_fn, opt, state_box: list, batches) -> float:
    """Seconds for one convdescent ``train_step`` per batch, waiting for the last; ``state_box[0]`` holds
    the optimizer state and is updated."""
    t0 = time.perf_counter()
    total = torch.zeros(())
    for xb, yb in batches:
        loss, _, state_box[0] = train_step(model, loss_fn, opt, state_box[0], xb, yb)
        total += loss
    float(total)  # wait for the last step
    return time.perf_counter() - t0


def first_batches(data, batch_size: int, count: int, seed: int = 0) -> list:
    """The first ``count`` shuffled float training batches (scaled to [0, 1]) as (x, y) pairs, drawn once, so
    that timed rounds replay the same data."""
    loader = BatchLoader(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed,
                         normalizer=Normalizer.unit())
    batches = []
    for xb, yb in loader:
        if len(batches) == count:
            break
        batches.append((xb, yb))
    return batches


def torch_cnn(data, start_from=None):
    """The tutorial's CNN as idiomatic PyTorch (nn.Sequential) and its torch.optim.Adam(1e-3); with
    ``start_from`` (a convdescent model of the same network) its initial weights are copied in."""
    from torch import nn

    c, h, w = data.input_shape
    net = nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(32 * ((h - 2) // 2) * ((w - 2) // 2), 128), nn.ReLU(),
                        nn.Linear(128, data.num_classes))
    if start_from is not None:
        with torch.no_grad():
            for p, q in zip(net.parameters(), start_from.params().values(), strict=True):
                p.copy_(q)
    return net, torch.optim.Adam(net.parameters(), lr=1e-3)


def torch_steps(net, opt, criterion, batches):
    """Idiomatic PyTorch's training steps (zero_grad, loss, backward, step), one per batch and per item taken."""
    net.train()
    for xb, yb in batches:
        opt.zero_grad()
        loss = criterion(net(xb), yb)
        loss.backward()
        opt.step()
        yield


def run_torch(net, opt, criterion, batches, limit: int | None = None) -> float:
    """Seconds for one idiomatic PyTorch step (``torch_steps``) per batch, at most ``limit`` batches."""
    t0 = time.perf_counter()
    for _ in itertools.islice(torch_steps(net, opt, criterion, batches), limit):
        pass
    return time.perf_counter() - t0


def convdescent_side(data, batch_size: int, seed: int, warmup_steps: int):
    """Warm up, then return (run one timed epoch -> seconds, test accuracy -> float) for convdescent."""
    torch.manual_seed(seed)
    loss_fn = SoftmaxCrossEntropy()
    norm = Normalizer.unit()

    def fresh():
        model = seed_cnn(input_shape=data.input_shape, num_classes=data.num_classes, seed=seed)
        opt = make_optimizer("adam", lr=1e-3)
        return model, opt, opt.init(model.params())

    model, opt, state = fresh()  # warm-up on a throwaway model so both sides start timing warm
    loader = BatchLoader(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed, normalizer=norm)
    for i, (xb, yb) in enumerate(loader):
        if i == warmup_steps:
            break
        train_step(model, loss_fn, opt, state, xb, yb)
    model, opt, state = fresh()
    loader = BatchLoader(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed, normalizer=norm)
    box = [state]

    def epoch() -> float:
        return run_ours(model, loss_fn, opt, box, loader)

    def accuracy() -> float:
        return evaluate(model, loss_fn, data.x_test, data.y_test, normalizer=norm)[1]

    return epoch, accuracy


def pytorch_side(data, batch_size: int, seed: int, warmup_steps: int):
    """Warm up, then return (run one timed epoch -> seconds, test accuracy -> float) for idiomatic PyTorch."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    x_train = data.x_train.float().div_(255)
    x_test = data.x_test.float().div_(255)
    loader = DataLoader(TensorDataset(x_train, data.y_train), batch_size=batch_size, shuffle=True)
    criterion = nn.CrossEntropyLoss()

    net, opt = torch_cnn(data)
    run_torch(net, opt, criterion, loader, limit=warmup_steps)
    # the same starting weights as convdescent's timed model, so the test accuracies compare training alone
    net, opt = torch_cnn(data, seed_cnn(input_shape=data.input_shape, num_classes=data.num_classes, seed=seed))

    def epoch() -> float:
        return run_torch(net, opt, criterion, loader)

    def accuracy() -> float:
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(x_test[i:i + 1000]).argmax(1) == data.y_test[i:i + 1000]).sum())
                          for i in range(0, len(x_test), 1000))
        return correct / len(x_test)

    return epoch, accuracy


def compare_sides(data, batch_size: int, epochs: int, seed: int, warmup_steps: int):
    """Alternate convdescent and PyTorch epochs, so drifting load on a shared machine hits both alike.

    Returns (our epoch times, PyTorch epoch times, our test acc, PyTorch test acc).
    """
    ours_epoch, ours_acc = convdescent_side(data, batch_size, seed, warmup_steps)
    peer_epoch, peer_acc = pytorch_side(data, batch_size, seed, warmup_steps)
    ours, peer = [], []
    for _ in range(epochs):
        ours.append(ours_epoch())
        peer.append(peer_epoch())
    return ours, peer, ours_acc(), peer_acc()


class _NullTerminal(io.TextIOBase):
    """A terminal that shows nothing: the progress bar draws (and reads the running loss) as on a real one."""

    def isatty(self):
        return True

    def write(self, s):
        return len(s)


def run_extras(data, batch_size: int, epochs: int, seed: int, warmup_steps: int):
    """Median seconds per epoch of the bare loop and of the Trainer with the train command's extras,
    epochs alternating. Returns (bare median, trainer median, bare epochs, trainer epochs)."""
    from convdescent.train import Callback, Checkpointer, EpochLogger, MetricsWriter, ProgressBar, Trainer

    torch.manual_seed(seed)
    loss_fn = SoftmaxCrossEntropy()
    norm = Normalizer.unit()
    bare_model = seed_cnn(input_shape=data.input_shape, num_classes=data.num_classes, seed=seed)
    bare_opt = make_optimizer("adam", lr=1e-3)
    bare_state = [bare_opt.init(bare_model.params())]
    bare_loader = BatchLoader(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed, normalizer=norm)
    for i, (xb, yb) in enumerate(bare_loader):  # warm-up, not timed
        if i == warmup_steps:
            break
        _, _, bare_state[0] = train_step(bare_model, loss_fn, bare_opt, bare_state[0], xb, yb)
    bare_loader.set_epoch(0)
    bare_times, full_times = [], []

    def bare_epoch():
        return run_ours(bare_model, loss_fn, bare_opt, bare_state, bare_loader)

    class Start(Callback):
        def on_epoch_begin(self, trainer, epoch):
            self.t0 = time.perf_counter()

    class Stop(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            full_times.append(time.perf_counter() - start.t0)
            bare_times.append(bare_epoch())  # outside the Trainer's timed span

    start = Start()
    model = seed_cnn(input_shape=data.input_shape, num_classes=data.num_classes, seed=seed)
    loader = BatchLoader(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed, normalizer=norm)
    with tempfile.TemporaryDirectory() as tmp:
        term = _NullTerminal()
        cbs = [start, Checkpointer(f"{tmp}/checkpoints", monitor="loss"), MetricsWriter(f"{tmp}/metrics.jsonl", 50),
               ProgressBar(term), EpochLogger(term), Stop()]
        trainer = Trainer(model, loss_fn, make_optimizer("adam", lr=1e-3), loader, None, epochs=epochs,
                          callbacks=cbs, nan_check_every=50, handle_signals=False, notice_stream=None)
        trainer.run()
    b, f = statistics.median(bare_times[1:]), statistics.median(full_times[1:])
    paired = statistics.median(ft / bt for bt, ft in zip(bare_times[1:], full_times[1:]))
    return b, f, bare_times, full_times, min(full_times[1:]) / min(bare_times[1:]), paired


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per side and batch size")
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both sides")
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--extras-epochs", type=int, default=6,
                    help="alternating bare/Trainer epochs for the extras column (0: skip it)")
    ap.add_argument("--only-extras", action="store_true", help="time only the extras column (no PyTorch run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir, val_split=0, seed=args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fashion-mnist "
          f"{len(data.x_train)} train / {len(data.x_test)} test, {args.epochs} timed epochs per run")
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        extras = "n/a"
        if args.extras_epochs >= 2:
            b, f, bt, ft, best, paired = run_extras(data, bs, args.extras_epochs, args.seed, args.warmup_steps)
            extras = f"{(paired - 1) * 100:+.1f}%"
            print(f"batch {bs:4d}: bare loop {b:6.2f} s/epoch (epochs {', '.join(f'{t:.2f}' for t in bt)}) | "
                  f"train command's Trainer {f:6.2f} s/epoch (epochs {', '.join(f'{t:.2f}' for t in ft)}) | "
                  f"extras: median of paired epoch ratios {(paired - 1) * 100:+.1f}%, ratio of medians "
                  f"{(f / b - 1) * 100:+.1f}%, ratio of fastest epochs {(best - 1) * 100:+.1f}%", flush=True)
        if args.only_extras:
            rows.append((bs, None, None, None, None, None, extras))
            continue
        ours, peer, ours_acc, peer_acc = compare_sides(data, bs, args.epochs, args.seed, args.warmup_steps)
        o, p = statistics.median(ours), statistics.median(peer)
        paired = statistics.median(pt / ot for ot, pt in zip(ours, peer))
        rows.append((bs, o, p, p / o, ours_acc, peer_acc, extras))
        print(f"batch {bs:4d}: convdescent {o:6.2f} s/epoch (epochs {', '.join(f'{t:.2f}' for t in ours)}) "
              f"| pytorch {p:6.2f} s/epoch (epochs {', '.join(f'{t:.2f}' for t in peer)}) | speed-up {p / o:.2f}x "
              f"(median of paired epochs {paired:.2f}x) | test acc {ours_acc:.4f} vs {peer_acc:.4f}", flush=True)
    print("\n| batch | convdescent s/epoch | PyTorch s/epoch | speed-up | convdescent test acc | PyTorch test acc "
          "| train extras vs bare loop |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for bs, o, p, r, oa, pa, ex in rows:
        if o is None:
            print(f"| {bs} | - | - | - | - | - | {ex} |")
        else:
            print(f"| {bs} | {o:.2f} | {p:.2f} | {r:.2f}x | {oa:.4f} | {pa:.4f} | {ex} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
