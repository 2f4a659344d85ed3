"""The tutorial's CNN on Fashion-MNIST on one GPU: convdescent (eager and CUDA graph) against PyTorch, same run.

Four sides train the same network (Conv2D 32 3x3 + ReLU -> MaxPool 2x2 -> Flatten -> Dense 128 + ReLU ->
Dense 10, Adam 1e-3, pixels scaled to [0, 1]) from the same initial weights, at each batch size:

- convdescent eager: the uint8 images on the GPU, ``BatchLoader`` normalizing each batch there, ``train_step``.
- convdescent graph: the same loader, each step a replay of one CUDA-graph recording (``GraphedSteps``).
- idiomatic PyTorch: nn.Sequential, a DataLoader over CPU float tensors, ``.to(device)`` per batch,
  torch.optim.Adam, loss.backward() (as the PyTorch tutorials write it).
- tuned PyTorch: the float images on the GPU, batches sliced by a GPU permutation, channels_last,
  Adam(fused=True), the model under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs of its own).

Each side runs one warm-up epoch (compilation and recording happen there), then ``--epochs`` timed epochs,
the sides' epochs alternating so that clock and load drift hit all alike; the time is the median seconds
per epoch (synchronized), the ratios are the peer's median over convdescent graph's. Test accuracy after
the timed epochs. TF32 is on for every side (the default of ``convdescent train`` on CUDA).

    python benchmarks/gpu.py [--epochs 3] [--batch-sizes 32,128] [--data-dir DIR] [--sides ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from convdescent import SoftmaxCrossEntropy, seed_cnn
from convdescent.data import BatchLoader, Normalizer, load_dataset
from convdescent.optim import make_optimizer
from convdescent.train.graphs import GraphedSteps
from convdescent.train.step import evaluate, train_step

SIDES = ("convdescent-graph", "convdescent-eager", "pytorch-idiomatic", "pytorch-tuned")


def _sync():
    torch.cuda.synchronize()


def _torch_net(data, start_from):
    from torch import nn

    c, h, w = data.input_shape
    net = nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(32 * ((h - 2) // 2) * ((w - 2) // 2), 128), nn.ReLU(),
                        nn.Linear(128, data.num_classes))
    with torch.no_grad():
        for p, q in zip(net.parameters(), start_from.params().values(), strict=True):
            p.copy_(q)
    return net


def _torch_accuracy(net, x_test, y_test):
    """``() -> test accuracy`` of a torch network on test tensors already on the GPU."""
    def accuracy():
        net.eval()
        with torch.no_grad():
            return float((net(x_test).argmax(1) == y_test).float().mean())

    return accuracy


def convdescent_side(data, batch_size, seed, graph: bool):
    """(one timed epoch -> seconds, test accuracy -> float) for convdescent on the GPU."""
    dev = torch.device("cuda")
    model = seed_cnn(data.input_shape, data.num_classes, seed=seed).to(device=dev)
    opt = make_optimizer("adam", lr=1e-3)
    box = [opt.init(model.params())]
    loss_fn = SoftmaxCrossEntropy()
    loader = BatchLoader(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed,
                         normalizer=Normalizer.unit(), device=dev)
    runner = GraphedSteps(model, loss_fn, opt) if graph else None
    total = torch.zeros((), device=dev)

    def epoch():
        _sync()
        t0 = time.perf_counter()
        for xb, yb in loader:
            if runner is not None:
                loss, _, box[0] = runner.step(xb, yb, box[0])
            else:
                loss, _, box[0] = train_step(model, loss_fn, opt, box[0], xb, yb)
            total.add_(loss)
        _sync()
        return time.perf_counter() - t0

    def accuracy():
        return evaluate(model, loss_fn, data.x_test.to(dev), data.y_test.to(dev), normalizer=Normalizer.unit())[1]

    return epoch, accuracy


def idiomatic_side(data, batch_size, seed):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    dev = torch.device("cuda")
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(data.x_train.float().div_(255), data.y_train), batch_size=batch_size,
                        shuffle=True)
    net = _torch_net(data, seed_cnn(data.input_shape, data.num_classes, seed=seed)).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    x_test = data.x_test.float().div_(255).to(dev)
    y_test = data.y_test.to(dev)

    def epoch():
        _sync()
        t0 = time.perf_counter()
        net.train()
        for xb, yb in loader:
            xb, yb = xb.to(dev), yb.to(dev)
            opt.zero_grad()
            loss = criterion(net(xb), yb)
            loss.backward()
            opt.step()
        _sync()
        return time.perf_counter() - t0

    return epoch, _torch_accuracy(net, x_test, y_test)


def tuned_side(data, batch_size, seed):
    from torch import nn

    dev = torch.device("cuda")
    torch.manual_seed(seed)
    x = data.x_train.float().div_(255).to(dev).contiguous(memory_format=torch.channels_last)
    y = data.y_train.to(dev)
    net = _torch_net(data, seed_cnn(data.input_shape, data.num_classes, seed=seed)).to(dev)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    criterion = nn.CrossEntropyLoss()
    compiled = torch.compile(net, mode="reduce-overhead")
    x_test = data.x_test.float().div_(255).to(dev).contiguous(memory_format=torch.channels_last)
    y_test = data.y_test.to(dev)
    n = len(x)
    gen = torch.Generator(device=dev).manual_seed(seed)

    def epoch():
        _sync()
        t0 = time.perf_counter()
        net.train()
        order = torch.randperm(n, device=dev, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):  # full batches: one compiled shape
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = criterion(compiled(x[idx]), y[idx])
            loss.backward()
            opt.step()
        _sync()
        return time.perf_counter() - t0

    return epoch, _torch_accuracy(net, x_test, y_test)


def make_side(name, data, batch_size, seed):
    if name == "convdescent-graph":
        return convdescent_side(data, batch_size, seed, graph=True)
    if name == "convdescent-eager":
        return convdescent_side(data, batch_size, seed, graph=False)
    if name == "pytorch-idiomatic":
        return idiomatic_side(data, batch_size, seed)
    if name == "pytorch-tuned":
        return tuned_side(data, batch_size, seed)
    raise SystemExit(f"gpu.py: unknown side {name!r}; choose from {', '.join(SIDES)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per side and batch size (default 3)")
    ap.add_argument("--batch-sizes", default="32,128", help="comma-separated (default 32,128)")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated sides to run (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights and batch order (default 0)")
    ap.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST IDX files")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu.py: no CUDA device; this benchmark runs on a GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    data = load_dataset("fashion-mnist", data_dir=args.data_dir, val_split=0, seed=args.seed)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, fashion-mnist {len(data.x_train)} train / "
          f"{len(data.x_test)} test, {args.epochs} timed epochs per side", flush=True)
    table = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        runs = {}
        for name in sides:
            epoch, acc = make_side(name, data, bs, args.seed)
            warm = epoch()
            runs[name] = (epoch, acc, [], warm)
            print(f"batch {bs}: {name} warm-up epoch {warm:.2f} s", flush=True)
        for _ in range(args.epochs):
            for name in sides:
                runs[name][2].append(runs[name][0]())
        base = statistics.median(runs[sides[0]][2])
        for name in sides:
            epoch, acc, times, warm = runs[name]
            med = statistics.median(times)
            table.append((bs, name, med, med / base, acc(), warm))
            print(f"batch {bs}: {name:18s} {med:7.3f} s/epoch (epochs {', '.join(f'{t:.3f}' for t in times)}) "
                  f"{med / base:6.2f}x the time of {sides[0]}", flush=True)
    print(f"\n| batch | side | s/epoch | time vs {sides[0]} | test acc | warm-up epoch s |")
    print("|---:|---|---:|---:|---:|---:|")
    for bs, name, med, ratio, acc, warm in table:
        print(f"| {bs} | {name} | {med:.3f} | {ratio:.2f}x | {acc:.4f} | {warm:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
