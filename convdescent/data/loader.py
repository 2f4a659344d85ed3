"""Batches from in-memory uint8 tensors: shuffled per epoch, normalized and augmented per batch on the device."""

from __future__ import annotations

import math

import torch

from .augment import make_augment
from .normalize import Normalizer

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """Mix integers into one 64-bit seed (splitmix64 steps), so (seed, epoch, batch) streams are independent."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z + (int(p) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1  # torch seeds must fit in a signed 64-bit integer here


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of part ``rank`` when n rows are cut into ``size`` contiguous parts as evenly as
    possible (the first n % size parts one row longer)."""
    base, rest = divmod(n, size)
    lo = rank * base + min(rank, rest)
    return lo, lo + base + (1 if rank < rest else 0)


class BatchLoader:
    """Iterate over `(xb, yb)` batches of a dataset kept in memory as uint8.

    The images stay uint8 on `device` (the GPU when training there). Each epoch draws a permutation from a
    `torch.Generator` seeded by (seed, epoch); each batch is one `index_select`, one normalize (convert, multiply-add) and,
    if given, a batch-wise augmentation seeded by (seed, epoch, batch index). So the batches of an epoch
    depend only on (seed, epoch), and a resumed run sees exactly the same remaining batches.

    Mini-batch mode (`batch_size` an int): iterating yields `len(loader)` batches per epoch
    (`ceil(N / batch_size)`, or `N // batch_size` with `drop_last`); `steps_per_epoch == len(loader)`.

    Full-batch mode (`batch_size="full"` or `full_batch=True`), for plain gradient descent where one step
    uses the gradient of the whole training set: `is_full_batch` is True, `steps_per_epoch == 1`, and
    iterating yields the whole set in chunks of at most `chunk_size` images (`len(loader)` chunks), so memory
    stays bounded. The trainer accumulates gradients over the chunks, weighting the mean-loss gradient of a
    chunk by `len(yb) / loader.num_samples` (`loader.chunk_weight(yb)`), and steps once per epoch; the sum
    of the weighted chunk gradients equals the gradient of the mean loss over all N images.

    Args:
        x: uint8 images `(N, C, H, W)`.
        y: integer labels `(N,)`.
        batch_size: images per batch (int), or "full".
        shuffle: draw a new order each epoch.
        drop_last: skip the last incomplete batch (mini-batch mode only).
        seed: seed of the order and of the augmentation.
        normalizer: maps uint8 to float; None means `Normalizer.unit()` (x / 255).
        augment: an `Augment`, a spec string ("crop:4,flip") or None.
        device: where batches are produced; x and y are moved there once.
        dtype: floating dtype of xb.
        full_batch: same as batch_size="full".
        chunk_size: images per chunk in full-batch mode (default 4096).
        channels_last: return xb in torch.channels_last memory format.
        shard: (rank, world size) of a data-parallel run: every rank draws the same order and takes its
            contiguous ``batch_size / world size`` part of each global batch (augmentation is drawn for the
            global batch, so each example is augmented as one process would). ``batch_size``, epochs and
            ``position`` stay global: a state saved on N ranks resumes on any other number.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, normalizer: Normalizer | None = None, augment=None, device="cpu",
                 dtype: torch.dtype = torch.float32, *, full_batch: bool = False, chunk_size: int | None = None,
                 channels_last: bool = False, shard: tuple[int, int] = (0, 1)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
            desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a uint8 tensor of shape (N, C, H, W), got {desc}")
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            desc = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be an integer tensor of shape (N,), got {desc}")
        if len(x) != len(y):
            raise ValueError(f"x and y must hold the same number of samples, got {len(x)} images and {len(y)} labels")
        if len(x) == 0:
            raise ValueError("x must hold at least one sample, got 0")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if batch_size == "full":
            full_batch = True
        elif full_batch:
            raise ValueError(f"full_batch=True conflicts with batch_size={batch_size!r}; pass batch_size='full'")
        n = len(x)
        if full_batch:
            if drop_last:
                raise ValueError("drop_last=True has no meaning with batch_size='full' (every image is used each step)")
            chunk = 4096 if chunk_size is None else chunk_size
            if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
                raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
            self.batch_size = "full"
            self.chunk_size = min(chunk, n)
        else:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
                raise ValueError(f"batch_size must be a positive int or 'full', got {batch_size!r}")
            if chunk_size is not None:
                raise ValueError(f"chunk_size only applies with batch_size='full', got batch_size={batch_size}")
            if drop_last and batch_size > n:
                raise ValueError(f"batch_size {batch_size} with drop_last=True leaves no batch for {n} samples")
            self.batch_size = batch_size
            self.chunk_size = batch_size
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        rank, size = shard
        if not (isinstance(size, int) and size >= 1 and isinstance(rank, int) and 0 <= rank < size):
            raise ValueError(f"shard must be (rank, world size) with 0 <= rank < world size, got {shard!r}")
        if size > 1:
            if full_batch:
                raise ValueError("batch_size 'full' (full-batch gradient descent) is not available on several "
                                 "processes yet; train it on one process (--nproc 1)")
            if batch_size % size:
                below, above = batch_size - batch_size % size, batch_size - batch_size % size + size
                raise ValueError(f"batch size {batch_size} is not divisible by {size} processes: each process "
                                 f"takes batch_size / nproc examples per step; choose a multiple of {size} "
                                 f"(e.g. {below or above} or {above}) or another --nproc")
            rest = n % batch_size
            if not drop_last and 0 < rest < size:
                raise ValueError(f"the last batch of each epoch holds {rest} example(s) ({n} images, batch size "
                                 f"{batch_size}), fewer than the {size} processes; add --drop-last or choose "
                                 f"another batch size")
        self.shard = (rank, size)
        self.last_batch_size = 0
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(device=self.device, dtype=torch.int64)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = seed
        self.normalizer = normalizer if normalizer is not None else Normalizer.unit()
        self.augment = make_augment(augment) if augment is not None else None
        if self.augment is not None and not self.augment:
            self.augment = None
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.epoch = 0
        self.position = 0
        self._aug_gen = torch.Generator(device=self.device) if self.augment is not None else None
        self._fill = self.normalizer.fill_value(x.shape[1], self.device, dtype)

    # ------------------------------------------------------------------------------------ sizes
    @property
    def is_full_batch(self) -> bool:
        """True when one optimizer step uses the whole training set (iterate: chunks to accumulate)."""
        return self.batch_size == "full"

    @property
    def num_samples(self) -> int:
        return len(self.x)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: 1 in full-batch mode, else len(self)."""
        return 1 if self.is_full_batch else len(self)

    def __len__(self) -> int:
        """Number of (xb, yb) pairs one epoch yields: batches, or chunks in full-batch mode."""
        n, b = len(self.x), self.chunk_size
        return n // b if self.drop_last else math.ceil(n / b)

    def chunk_weight(self, yb: torch.Tensor) -> float:
        """Weight of a chunk's mean-loss gradient in full-batch accumulation: len(yb) / N."""
        return len(yb) / len(self.x)

    # ------------------------------------------------------------------------------------ epochs and state
    def set_epoch(self, epoch: int) -> None:
        """Start the given epoch from its first batch at the next iteration."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        """Epoch, position within it (batches already yielded) and the settings that fix the batch order."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": len(self.x),
                "batch_size": self.batch_size, "chunk_size": self.chunk_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state_dict` was taken: the next iteration yields exactly the remaining batches.

        Raises:
            ValueError: the state comes from a loader with a different seed, size or batching.
        """
        for key in ("seed", "num_samples", "batch_size", "chunk_size", "shuffle", "drop_last"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {key}={mine!r}; "
                                 f"resume with the same data and batching")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"loader state position {position} is outside 0..{len(self)} (epoch {epoch})")
        self.epoch, self.position = epoch, position

    def order(self, epoch: int) -> torch.Tensor | None:
        """The sample order of an epoch on the device (None when not shuffling: natural order)."""
        if not self.shuffle:
            return None
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0))
        return torch.randperm(len(self.x), generator=g).to(self.device)

    # ------------------------------------------------------------------------------------ iteration
    def __iter__(self):
        epoch, start = self.epoch, self.position
        order = self.order(epoch)
        b, n, nb = self.chunk_size, len(self.x), len(self)
        for i in range(start, nb):
            lo, hi = i * b, min((i + 1) * b, n)
            self.last_batch_size = hi - lo
            rank, size = self.shard
            if size > 1 and self.augment is None:  # only this rank's part is ever needed
                a, z = shard_bounds(hi - lo, rank, size)
                lo, hi = lo + a, lo + z
            if order is None:
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            xb = self.normalizer(xb, self.dtype)
            if self.augment is not None:
                self._aug_gen.manual_seed(derive_seed(self.seed, epoch, 1, i))
                xb = self.augment(xb, generator=self._aug_gen, fill=self._fill)
                if size > 1:  # drawn for the global batch, as one process draws it; then this rank's part
                    a, z = shard_bounds(len(yb), rank, size)
                    xb, yb = xb[a:z], yb[a:z]
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            self.position = i + 1
            yield xb, yb
        self.epoch, self.position = epoch + 1, 0

    def __repr__(self) -> str:
        mode = f"full batch in chunks of {self.chunk_size}" if self.is_full_batch else f"batch_size={self.batch_size}"
        return (f"BatchLoader(N={len(self.x)}, {mode}, shuffle={self.shuffle}, drop_last={self.drop_last}, "
                f"seed={self.seed}, augment={self.augment.spec if self.augment else None}, device={self.device})")
