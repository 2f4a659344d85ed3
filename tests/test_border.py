"""Border effects: coverage counts against the closed form and brute-force enumeration, the |dL/dx| map
against autograd, the ratios, and the border command on a small model and dataset."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from convdescent import (AvgPool2D, Conv2D, Dense, Flatten, GlobalAvgPool2D, MaxPool2D, ReLU, Residual, Sequential,
                         SoftmaxCrossEntropy)
from convdescent.data.synthetic import write_npz_dataset
from convdescent.diagnostics.border import (conv_paddings, coverage, edge_center_ratios, input_gradient_map,
                                            spatial_geometry, window_count_1d, with_padding)
from convdescent.diagnostics.cli import main as diag_main


# one torch thread: on the shared 2-core machine two threads ran these small problems many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


def brute_windows_1d(n, k, s, pb, pa):
    """Count, for each position, the windows that contain it, by listing every window."""
    counts = [0] * n
    start = -pb
    while start + k <= n + pa:
        for i in range(start, start + k):
            if 0 <= i < n:
                counts[i] += 1
        start += s
    return counts


@pytest.mark.parametrize("n,k,s,pb,pa", [(7, 3, 1, 0, 0), (8, 3, 1, 1, 1), (9, 2, 2, 0, 0), (10, 5, 2, 2, 2),
                                         (6, 4, 3, 1, 2), (5, 5, 1, 0, 0), (11, 3, 2, 0, 1)])
def test_window_count_closed_form_matches_enumeration(n, k, s, pb, pa):
    assert window_count_1d(n, k, s, pb, pa).tolist() == brute_windows_1d(n, k, s, pb, pa)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("n", [9, 12])  # at least 2k - 1, so interior pixels exist
def test_single_valid_conv_corner_one_interior_k_squared(k, n):
    model = Sequential([Conv2D(2, k), Flatten(), Dense(2)], input_shape=(1, n, n), seed=0)
    cov = coverage(model)
    c = torch.tensor([min(i, n - k) - max(0, i - k + 1) + 1 for i in range(n)], dtype=torch.float64)
    closed = c[:, None] * c[None, :]
    assert torch.equal(cov.paths, closed) and torch.equal(cov.reach, closed)
    assert cov.reach[0, 0] == 1 and cov.reach[-1, -1] == 1
    assert cov.reach[k - 1, k - 1] == k * k and cov.reach[n // 2, n // 2] == k * k


def test_single_same_conv_counts():
    n, k = 9, 3
    cov = coverage(Sequential([Conv2D(1, k, padding="same"), Flatten(), Dense(2)], input_shape=(1, n, n), seed=0))
    c = window_count_1d(n, k, 1, 1, 1).double()
    assert torch.equal(cov.reach, c[:, None] * c[None, :])
    assert cov.reach[0, 0] == 4 and cov.reach[0, 4] == 6 and cov.reach[4, 4] == 9  # ceil(k/2)^2 at a corner


def brute_reach_and_paths(model, n):
    """Enumerate, with autograd through all-ones kernels, the receptive field of every output position."""
    geo = spatial_geometry(model)
    x = torch.zeros(1, 1, n, n, dtype=torch.float64, requires_grad=True)

    def run(h, ops):
        for op in ops:
            if hasattr(op, "branch"):
                skip = h if op.skip is None else torch.nn.functional.conv2d(
                    torch.nn.functional.pad(h, (op.skip.pads[2], op.skip.pads[3], op.skip.pads[0], op.skip.pads[1])),
                    torch.ones(1, 1, *op.skip.kernel, dtype=h.dtype), stride=op.skip.stride)
                h = run(h, op.branch) + skip
            else:
                pt, pb, pl, pr = op.pads
                h = torch.nn.functional.conv2d(torch.nn.functional.pad(h, (pl, pr, pt, pb)),
                                               torch.ones(1, 1, *op.kernel, dtype=h.dtype), stride=op.stride)
        return h

    out = run(x + 1.0, geo.ops)
    paths = torch.autograd.grad(out.sum(), x, retain_graph=True)[0][0, 0]
    reach = torch.zeros(n, n, dtype=torch.float64)
    for i, j in itertools.product(range(out.shape[2]), range(out.shape[3])):
        g = torch.autograd.grad(out[0, 0, i, j], x, retain_graph=True)[0][0, 0]
        reach += (g > 0).double()
    return reach, paths


@pytest.mark.parametrize("layers,n", [
    ([Conv2D(2, 3), ReLU(), MaxPool2D(2), Conv2D(2, 3, padding="same", stride=2)], 11),
    ([Conv2D(2, 5, padding=1), AvgPool2D(2, stride=1), Conv2D(2, 2, stride=2), MaxPool2D(2)], 12),
    ([Conv2D(2, 3, padding="same"), MaxPool2D(3, stride=2, padding="same"), Conv2D(2, 3)], 10),
    ([Conv2D(2, 3, padding="same"), Residual([Conv2D(2, 3, padding="same"), ReLU(), Conv2D(2, 3, padding="same")]),
      Residual([Conv2D(3, 3, stride=2, padding="same")], projection="auto")], 9),
])
def test_stack_counts_match_brute_force(layers, n):
    model = Sequential(layers + [GlobalAvgPool2D(), Dense(2)], input_shape=(1, n, n), seed=0)
    cov = coverage(model, chunk=17)  # several chunks of one-hot images
    reach, paths = brute_reach_and_paths(model, n)
    assert torch.equal(cov.paths, paths)
    assert torch.equal(cov.reach, reach)
    assert cov.geometry.stopped_at.startswith("gap1")


def test_input_gradient_map_matches_autograd():
    model = Sequential([Conv2D(3, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(4)], input_shape=(2, 10, 10), seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, 10, 10, generator=g)
    y = torch.randint(0, 4, (20,), generator=g)
    ours = input_gradient_map(model, SoftmaxCrossEntropy(), x, y, batch_size=7)
    tm = model.to_torch().double()
    xi = x.double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(tm(xi), y, reduction="sum")
    ref = torch.autograd.grad(loss, xi)[0].abs().mean(dim=(0, 1))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    assert model.layers[0].needs_input_grad is False  # restored for training


def test_edge_center_ratios_and_padding_variants():
    m = torch.ones(8, 8)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = 0.5
    m[0, 0] = 0.25
    r = edge_center_ratios(m)
    assert r["center_mean"] == 1.0
    assert r["edge_to_center"] == pytest.approx((27 * 0.5 + 0.25) / 28)
    assert r["corner_to_center"] == pytest.approx((0.25 + 3 * 0.5) / 4)
    base = Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(5)], input_shape=(1, 12, 12), seed=0)
    same = with_padding(base, "same", seed=0)
    assert conv_paddings(same) == ["same"] and same.layers[-1].in_features == 4 * 6 * 6
    assert conv_paddings(with_padding(same, "valid")) == ["valid"]
    with pytest.raises(ValueError, match="padding must be 'valid' or 'same', got 'full'"):
        with_padding(base, "full")
    with pytest.raises(ValueError, match="needs at least one"):
        coverage(Sequential([Flatten(), Dense(2)], input_shape=(1, 4, 4), seed=0))


def test_border_command_writes_heatmaps_and_ratios(tmp_path, capsys):
    npz = tmp_path / "syn.npz"
    write_npz_dataset(npz, n=60, num_classes=3, shape=(1, 16, 16), seed=2)
    out = tmp_path / "out"
    code = diag_main(["border", "--model", "seed_cnn", "--dataset", f"npz:{npz}", "--examples", "20",
                      "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert (out / "border_counts.png").stat().st_size > 1000 and (out / "border_gradients.png").stat().st_size > 1000
    assert "valid (init)" in text and "same (init)" in text and "edge/center" in text
    assert "valid (init): positions reached per pixel: corner 1" in text
    code = diag_main(["border", "--model", "seed_cnn", "--dataset", f"npz:{npz}", "--examples", "20",
                      "--out", str(out), "--json"])
    data = json.loads(capsys.readouterr().out)
    fig = data["figures"]["valid (init)"]
    # a 3x3 valid conv then 2x2 pooling: a corner pixel reaches 1 pooled position, a central one 4
    assert fig["reach"]["corner_mean"] == 1.0 and 0 < fig["grad"]["edge_to_center"] < 1
    assert data["figures"]["same (init)"]["paths"]["corner_to_center"] == pytest.approx(4 / 9)
