"""BatchLoader and Normalizer: order, determinism, resume, full-batch chunks, normalization."""

import math

import pytest
import torch

from convdescent.data import BatchLoader, Normalizer, make_augment


def _data(n=103, c=1, hw=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)
    # Label = index, so batches reveal exactly which samples they hold.
    return x, torch.arange(n)


def _epoch(loader):
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


def test_batches_cover_every_sample_once_per_epoch():
    x, y = _data()
    loader = BatchLoader(x, y, 16, seed=3)
    assert len(loader) == math.ceil(103 / 16) == loader.steps_per_epoch
    batches = _epoch(loader)
    assert len(batches) == 7
    seen = torch.cat([yb for _, yb in batches])
    assert sorted(seen.tolist()) == list(range(103))
    assert [len(yb) for _, yb in batches] == [16] * 6 + [7]
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (1, 6, 6) and yb.dtype == torch.int64
        assert torch.allclose(xb, x[yb].float() / 255)


def test_shuffle_is_seeded_and_changes_per_epoch():
    x, y = _data()
    a = BatchLoader(x, y, 16, seed=1)
    b = BatchLoader(x, y, 16, seed=1)
    c = BatchLoader(x, y, 16, seed=2)
    ea0, ea1 = [torch.cat([yb for _, yb in _epoch(a)]) for _ in range(2)]
    eb0 = torch.cat([yb for _, yb in _epoch(b)])
    ec0 = torch.cat([yb for _, yb in _epoch(c)])
    assert torch.equal(ea0, eb0)
    assert not torch.equal(ea0, ea1)
    assert not torch.equal(ea0, ec0)
    assert a.epoch == 2 and a.position == 0


def test_no_shuffle_keeps_order_and_drop_last():
    x, y = _data()
    loader = BatchLoader(x, y, 16, shuffle=False, drop_last=True)
    assert len(loader) == 6
    got = torch.cat([yb for _, yb in _epoch(loader)])
    assert torch.equal(got, torch.arange(96))


def test_set_epoch_reproduces_an_epoch():
    x, y = _data()
    loader = BatchLoader(x, y, 10, seed=5, augment="crop:1,flip")
    _epoch(loader)
    second = _epoch(loader)
    loader.set_epoch(1)
    again = _epoch(loader)
    for (xa, ya), (xb, yb) in zip(second, again):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("augment", [None, "crop:2,flip,cutout:3,rotate:10"])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(augment):
    x, y = _data()
    ref = BatchLoader(x, y, 8, seed=11, augment=augment)
    _epoch(ref)
    full = _epoch(ref)  # epoch 1
    run = BatchLoader(x, y, 8, seed=11, augment=augment)
    _epoch(run)
    it = iter(run)
    for _ in range(5):
        next(it)
    state = run.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5
    resumed = BatchLoader(x, y, 8, seed=11, augment=augment)
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    assert len(rest) == len(full) - 5
    for (xa, ya), (xb, yb) in zip(full[5:], rest):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert resumed.epoch == 2 and resumed.position == 0


def test_resume_rejects_state_from_different_data():
    x, y = _data()
    state = BatchLoader(x, y, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        BatchLoader(x, y, 8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(x, y, 9, seed=1).load_state_dict(state)


def test_full_batch_chunks_and_weights():
    x, y = _data()
    loader = BatchLoader(x, y, "full", chunk_size=25, shuffle=False)
    assert loader.is_full_batch and loader.steps_per_epoch == 1 and len(loader) == 5
    chunks = _epoch(loader)
    assert [len(yb) for _, yb in chunks] == [25, 25, 25, 25, 3]
    assert torch.equal(torch.cat([yb for _, yb in chunks]), y)
    assert math.isclose(sum(loader.chunk_weight(yb) for _, yb in chunks), 1.0)
    # Weighted chunk means add up to the mean over all samples (what the trainer relies on).
    values = x.float().mean(dim=(1, 2, 3)) / 255
    total = sum(loader.chunk_weight(yb) * (xb.mean(dim=(1, 2, 3))).mean() for xb, yb in chunks)
    assert torch.allclose(total, values.mean(), atol=1e-6)
    same = BatchLoader(x, y, "full")
    assert len(same) == 1 and same.chunk_size == 103


def test_full_batch_flag_and_errors():
    x, y = _data()
    assert BatchLoader(x, y, "full", full_batch=True).is_full_batch
    with pytest.raises(ValueError, match="full_batch=True conflicts with batch_size=32"):
        BatchLoader(x, y, 32, full_batch=True)
    with pytest.raises(ValueError, match="drop_last"):
        BatchLoader(x, y, "full", drop_last=True)
    with pytest.raises(ValueError, match="chunk_size only applies"):
        BatchLoader(x, y, 8, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        BatchLoader(x, y, "full", chunk_size=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be a positive int or 'full', got 0"),
    (dict(batch_size=-3), "got -3"),
    (dict(batch_size="big"), "got 'big'"),
    (dict(batch_size=500, drop_last=True), "leaves no batch for 103 samples"),
    (dict(batch_size=8, seed=1.5), "seed must be an int, got 1.5"),
    (dict(batch_size=8, dtype=torch.int32), "dtype must be a floating dtype"),
    (dict(batch_size=8, augment="crop:2,blur"), "unknown augmentation 'blur'"),
])
def test_bad_arguments(kwargs, message):
    x, y = _data()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BatchLoader(x, y, **kwargs)


def test_bad_tensors():
    x, y = _data()
    with pytest.raises(ValueError, match="x must be a uint8 tensor of shape"):
        BatchLoader(x.float(), y, 8)
    with pytest.raises(ValueError, match="103 images and 100 labels"):
        BatchLoader(x, y[:100], 8)
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        BatchLoader(x, y.float(), 8)


def test_channels_last_and_dtype():
    x, y = _data(c=3)
    xb, _ = next(iter(BatchLoader(x, y, 8, channels_last=True, dtype=torch.float64)))
    assert xb.dtype == torch.float64
    assert xb.is_contiguous(memory_format=torch.channels_last) and not xb.is_contiguous()


def test_normalizer_from_data_matches_direct_statistics():
    x, _ = _data(n=50, c=3)
    n1 = Normalizer.from_data(x, chunk_size=7)
    xf = x.double() / 255
    assert torch.allclose(torch.tensor(n1.mean, dtype=torch.float64), xf.mean(dim=(0, 2, 3)), atol=1e-12)
    assert torch.allclose(torch.tensor(n1.std, dtype=torch.float64), xf.std(dim=(0, 2, 3), unbiased=False), atol=1e-12)
    assert n1 == Normalizer.from_data(x, chunk_size=1000)
    out = n1(x)
    assert torch.allclose(out.mean(dim=(0, 2, 3)).double(), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(out.std(dim=(0, 2, 3), unbiased=False).double(), torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(n1.denormalize(out).double(), xf, atol=1e-6)


def test_normalizer_unit_roundtrip_and_errors():
    x, _ = _data(n=4, c=3)
    u = Normalizer.unit()
    assert torch.allclose(u(x), x.float() / 255, rtol=1e-6, atol=0)
    n = Normalizer((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    again = Normalizer.from_dict(n.to_dict())
    assert again == n and torch.equal(again(x), n(x))
    with pytest.raises(ValueError, match="std must be finite and positive"):
        Normalizer((0.5,), (0.0,))
    with pytest.raises(ValueError, match="equal length"):
        Normalizer((0.5, 0.5), (1.0,))
    with pytest.raises(ValueError, match="2 channels, the images have 3"):
        Normalizer((0.5, 0.5), (1.0, 1.0))(x)
    with pytest.raises(ValueError, match="uint8 batch"):
        u(x.float())
    const = torch.full((3, 1, 2, 2), 7, dtype=torch.uint8)
    assert Normalizer.from_data(const).std == (1.0,)


def test_loader_uses_normalizer_and_fills_padding_with_black():
    x = torch.full((4, 1, 5, 5), 200, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.int64)
    norm = Normalizer((0.3,), (0.2,))
    xb, _ = next(iter(BatchLoader(x, y, 4, normalizer=norm, augment=make_augment("crop:3"), seed=0)))
    black = (0 - 0.3) / 0.2
    inside = (200 / 255 - 0.3) / 0.2
    vals = set(round(v, 4) for v in xb.flatten().tolist())
    assert vals <= {round(black, 4), round(inside, 4)} and round(inside, 4) in vals
