"""Optimizer state per rank with ``--shard-optimizer`` (ZeRO stage 1): the bytes of Adam's state that the
most loaded rank keeps, for 2, 4 and 8 ranks, against the unsharded state.

The shards are those ``ShardedOptimizer`` builds (``zero.partition``: about 1/N of the elements each, large
tensors cut into blocks of rows) and the bytes are those of the state tensors the wrapped optimizer's
``init`` creates for a shard's pieces.

    python benchmarks/zero_memory.py
"""

from __future__ import annotations

from convdescent.distributed.zero import partition, state_nbytes
from convdescent.models import make_model
from convdescent.optim import make_optimizer

MODELS = (("seed_cnn", (1, 28, 28)), ("resnet8", (1, 28, 28)), ("3c3d", (3, 32, 32)))


def main() -> int:
    print(f"{'model':10} {'unsharded':>10} " + " ".join(f"{f'N={n} (max rank)':>20}" for n in (2, 4, 8)))
    for name, shape in MODELS:
        params = make_model(name, shape, 10, seed=0).params()
        opt = make_optimizer("adam")
        full = state_nbytes(opt.init(params))
        cells = []
        for n in (2, 4, 8):
            shards = partition({k: tuple(p.shape) for k, p in params.items()}, n)
            most = max(state_nbytes(opt.init({piece.name: piece.of(params[piece.name]).contiguous()
                                              for piece in shard})) for shard in shards)
            cells.append(f"{most / 2 ** 20:.2f} MiB ({most / full:.0%})")
        print(f"{name:10} {full / 2 ** 20:>6.2f} MiB " + " ".join(f"{c:>20}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
