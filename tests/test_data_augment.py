"""Batch augmentation: each operation's effect, determinism under the seed, spec parsing."""

import math

import pytest
import torch

from convdescent.data import Augment, default_augment_spec, make_augment
from convdescent.data.augment import affine, cutout, random_affine, random_crop, random_flip


def _batch(b=16, c=3, h=8, w=8, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed)) + 1.0  # all values > fill


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_crop_is_a_shift_with_fill():
    x = _batch()
    out = random_crop(x, 2, _gen(1), fill=0.0)
    assert out.shape == x.shape
    for i in range(len(x)):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(x[i])
                ys, yd = (slice(dy, None), slice(0, 8 - dy)) if dy >= 0 else (slice(0, 8 + dy), slice(-dy, None))
                xs, xd = (slice(dx, None), slice(0, 8 - dx)) if dx >= 0 else (slice(0, 8 + dx), slice(-dx, None))
                shifted[:, yd, xd] = x[i][:, ys, xs]
                found |= torch.equal(out[i], shifted)
        assert found, i


def test_crop_uses_per_channel_fill():
    x = _batch(b=64)
    fill = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)
    out = random_crop(x, 3, _gen(0), fill=fill)
    for ch, v in enumerate((-1.0, -2.0, -3.0)):
        vals = out[:, ch]
        assert ((vals == v) | (vals >= 1.0)).all() and (vals == v).any()


def test_flip_mirrors_about_half():
    x = _batch(b=400, c=1, h=2, w=3)
    out = random_flip(x, 0.5, _gen(2))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 150 < int(mirrored.sum()) < 250
    assert torch.equal(random_flip(x, 0.0, _gen(2)), x)


def test_affine_rotation_translation_and_scale():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    one, zero = torch.ones(1), torch.zeros(1)
    assert torch.allclose(affine(x, 90 * one, one, zero, zero), torch.rot90(x, 1, (2, 3)), atol=1e-5)
    assert torch.allclose(affine(x, zero, one, zero, zero), x, atol=1e-5)
    right = affine(x, zero, one, one, zero, fill=-1.0)
    assert torch.allclose(right[..., 1:], x[..., :3], atol=1e-5) and torch.allclose(right[..., 0], -torch.ones(1, 1, 4))
    down = affine(x, zero, one, zero, one)
    assert torch.allclose(down[:, :, 1:], x[:, :, :3], atol=1e-5)
    zoom = affine(x, zero, 2 * one, zero, zero)
    assert zoom.min() > x.min() and zoom.max() < x.max()  # zooming in crops the extremes
    wide = torch.arange(8.0).view(1, 1, 2, 4)
    assert torch.allclose(affine(wide, 180 * one, one, zero, zero), wide.flip(2).flip(3), atol=1e-5)


def test_random_affine_small_ranges_stay_close():
    x = torch.zeros(8, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0
    out = random_affine(x, degrees=5, scale=0.05, translate=0.5, generator=_gen(0))
    assert out.shape == x.shape
    assert torch.allclose(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.25)
    assert not torch.allclose(out, x)


def test_cutout_square():
    x = _batch(b=50, c=2, h=12, w=12)
    out = cutout(x, 4, _gen(3), fill=0.0)
    zeros = (out == 0).all(1)  # (B, H, W)
    counts = zeros.flatten(1).sum(1)
    assert (counts >= 1).all() and (counts <= 16).all() and (counts == 16).any()
    for i in range(len(x)):
        rows = zeros[i].any(1).nonzero().flatten()
        cols = zeros[i].any(0).nonzero().flatten()
        assert zeros[i][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle
        assert torch.equal(out[i][:, ~zeros[i]], x[i][:, ~zeros[i]])


def test_pipeline_is_deterministic_under_the_seed():
    aug = make_augment("crop:4,flip,translate:2,cutout:8,rotate:10,scale:0.1")
    x = _batch(b=8, h=32, w=32)
    a = aug(x, _gen(7))
    b = aug(x, _gen(7))
    c = aug(x, _gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype


def test_spec_parsing_roundtrip_and_defaults():
    aug = make_augment("crop:4,flip,translate:2,cutout:8,rotate:10,scale:0.1")
    assert aug.ops == {"crop": 4, "flip": 0.5, "translate": 2.0, "rotate": 10.0, "scale": 0.1, "cutout": 8}
    assert make_augment(aug.spec) == aug
    assert Augment.from_dict(aug.to_dict()) == aug
    assert make_augment("cutout, crop") == make_augment("crop:4,cutout:8")  # defaults, any order
    assert not make_augment("none") and make_augment(None).spec == "none"
    assert "flip" not in default_augment_spec("mnist") and "flip" not in default_augment_spec("kmnist")
    assert "flip" in default_augment_spec("cifar10") and "flip" in default_augment_spec("fashion-mnist")
    assert make_augment("default", dataset="mnist") == make_augment(default_augment_spec("mnist"))
    x = _batch()
    assert torch.equal(make_augment("none")(x, _gen()), x)


@pytest.mark.parametrize("spec, message", [
    ("crop:4,blur", "unknown augmentation 'blur'"),
    ("crop:-1", "augment: crop = -1 is out of range: crop must be an integer >= 0"),
    ("crop:1.5", "whole number of pixels, got 1.5"),
    ("flip:2", "augment: flip = 2.0 is out of range: flip must be in [0, 1]"),
    ("scale:1.5", "augment: scale = 1.5 is out of range: scale must be in [0, 1)"),
    ("rotate:abc", "needs a number, got 'abc'"),
    ("rotate:200", "augment: rotate = 200.0 is out of range: rotate must be in [0, 180]"),
    ("translate:nan", "augment translate needs a finite number, got nan"),
    ("crop:2,crop:3", "appears twice"),
    ("cutout:0", "augment: cutout = 0 is out of range: cutout must be an integer >= 1"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError) as e:
        make_augment(spec)
    assert message in str(e.value)


def test_bad_batch_and_generator():
    aug = make_augment("flip")
    with pytest.raises(ValueError, match="float batch"):
        aug(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float batch"):
        aug(torch.zeros(4, 4))
    assert math.isclose(aug.ops["flip"], 0.5)
