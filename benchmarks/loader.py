"""Batches per second: convdescent's BatchLoader against torch.utils.data.DataLoader, in one run.

Both iterate over the same in-memory uint8 Fashion-MNIST tensors (synthetic tensors of the same shape
when the dataset is absent), shuffle every epoch, and produce normalized float batches on the same device:
the DataLoader over a TensorDataset (its default per-sample indexing and collation), followed by the same
Normalizer (and augmentation) per batch. Prints both rates and the ratio.

    python benchmarks/loader.py [--batch-size 128] [--epochs 3] [--device cpu] [--augment crop:2,flip] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from convdescent.data import BatchLoader, DataError, Normalizer, load_dataset, make_augment


def _data():
    try:
        ds = load_dataset("fashion-mnist", download=False, val_split=0)
        return ds.x_train, ds.y_train, "fashion-mnist train (60000x1x28x28 uint8)"
    except DataError:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (60000, 1, 28, 28), generator=g, dtype=torch.uint8)
        return x, torch.randint(0, 10, (60000,), generator=g), "synthetic 60000x1x28x28 uint8 (Fashion-MNIST absent)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(x, y, bs, epochs, device, norm, aug):
    loader = BatchLoader(x, y, bs, shuffle=True, seed=0, normalizer=norm, augment=aug, device=device)
    rates = []
    for _ in range(epochs):
        _sync(device)
        t = time.perf_counter()
        n = 0
        for xb, yb in loader:
            n += 1
        _sync(device)
        rates.append(n / (time.perf_counter() - t))
    return rates, xb


def time_peer(x, y, bs, epochs, device, norm, aug):
    xd, yd = x.to(device), y.to(device)
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(xd, yd), batch_size=bs, shuffle=True, generator=g)
    ag = torch.Generator(device=device).manual_seed(0)
    fill = norm.fill_value(x.shape[1], device)
    rates = []
    for _ in range(epochs):
        _sync(device)
        t = time.perf_counter()
        n = 0
        for xb, yb in loader:
            xb = norm(xb)
            if aug:
                xb = aug(xb, generator=ag, fill=fill)
            n += 1
        _sync(device)
        rates.append(n / (time.perf_counter() - t))
    return rates, xb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--augment", default=None, help="also time with this augmentation, e.g. crop:2,flip")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y, what = _data()
    norm = Normalizer.from_data(x)
    print(f"data: {what}; batch {args.batch_size}; device {device}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}")
    rows = [("normalize", None)]
    if args.augment:
        rows.append((f"normalize + augment {args.augment}", make_augment(args.augment)))
    for label, aug in rows:
        ours, xb1 = time_ours(x, y, args.batch_size, args.epochs, device, norm, aug)
        peer, xb2 = time_peer(x, y, args.batch_size, args.epochs, device, norm, aug)
        assert xb1.shape[1:] == xb2.shape[1:] and xb1.dtype == xb2.dtype
        mo, mp = statistics.median(ours), statistics.median(peer)
        print(f"{label:<40} BatchLoader {mo:10.1f} batches/s   DataLoader(TensorDataset) {mp:9.1f} batches/s   "
              f"ratio {mo / mp:6.1f}x")


if __name__ == "__main__":
    main()
