"""Saliency, SmoothGrad, Grad-CAM and the filter pictures: the explicit-backward results against autograd
references, and the explain / filters commands on a small trained run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from convdescent import BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
from convdescent.data.synthetic import write_npz_dataset
from convdescent.diagnostics.cli import main as diag_main
from convdescent.diagnostics.filters import conv_activations, first_conv, write_filter_pictures
from convdescent.diagnostics.saliency import (grad_cam, last_conv_block, load_image, saliency, score_gradient,
                                              smoothgrad)
from convdescent.report import build_report


# one torch thread: on the shared 2-core machine two threads ran these small problems many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_images(seed=0):
    model = Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Conv2D(6, 3, padding="same"), BatchNorm2D(), ReLU(),
                        Flatten(), Dense(5)], input_shape=(2, 10, 10), seed=seed, dtype=torch.float64)
    # non-trivial running statistics, so evaluation mode differs from an identity
    bn = model.layers[4]
    bn.running_mean.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(3))
    bn.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(4))
    x = torch.randn(3, 2, 10, 10, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return model, x


def test_score_gradient_and_saliency_match_autograd():
    model, x = model_and_images()
    g, t = score_gradient(model, x, target=[1, 4, 0])
    tm = model.to_torch().eval()
    xi = x.clone().requires_grad_(True)
    logits = tm(xi)
    ref = torch.autograd.grad(logits[torch.arange(3), torch.tensor([1, 4, 0])].sum(), xi)[0]
    torch.testing.assert_close(g, ref)
    assert t.tolist() == [1, 4, 0]
    sal, t2 = saliency(model, x)
    assert t2.tolist() == logits.argmax(1).tolist()  # default target: the predicted class
    g2, _ = score_gradient(model, x, t2)
    torch.testing.assert_close(sal, g2.abs().amax(dim=1))
    assert model.layers[0].needs_input_grad is False
    with pytest.raises(ValueError, match=r"target classes must be in \[0, 4\], got \[7\]"):
        score_gradient(model, x, 7)


def test_smoothgrad_without_noise_is_saliency_and_averages_noisy_maps():
    model, x = model_and_images()
    sal, t = saliency(model, x)
    flat, _ = smoothgrad(model, x, samples=4, noise=0.0)
    torch.testing.assert_close(flat, sal)
    noisy, t3 = smoothgrad(model, x[:1], samples=6, noise=0.2, seed=5, batch_size=4)
    assert t3.tolist() == t[:1].tolist()
    gen = torch.Generator().manual_seed(5)
    span = float(x[0].max() - x[0].min())
    copies = x[:1].repeat(6, 1, 1, 1)
    copies = copies + torch.randn(copies.shape, generator=gen, dtype=x.dtype) * 0.2 * span
    ref, _ = saliency(model, copies, int(t[0]))
    torch.testing.assert_close(noisy[0], ref.mean(0))
    with pytest.raises(ValueError, match="samples must be a positive int, got 0"):
        smoothgrad(model, x, samples=0)


def test_grad_cam_matches_an_autograd_reference():
    model, x = model_and_images()
    idx = last_conv_block(model)
    assert model.layers[idx].name == "relu2"  # the last conv, its batch norm and its ReLU
    cam, t, name = grad_cam(model, x)
    assert name == "relu2" and cam.shape == (3, 10, 10)
    tm = model.to_torch().eval()
    head = torch.nn.Sequential(*list(tm.children())[:idx + 1])
    tail = torch.nn.Sequential(*list(tm.children())[idx + 1:])
    a = head(x).detach().requires_grad_(True)
    logits = tail(a)
    da = torch.autograd.grad(logits[torch.arange(3), t].sum(), a)[0]
    ref = torch.relu((da.mean(dim=(2, 3))[:, :, None, None] * a).sum(1, keepdim=True))
    ref = torch.nn.functional.interpolate(ref.detach(), size=(10, 10), mode="bilinear", align_corners=False)[:, 0]
    ref = ref / ref.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    torch.testing.assert_close(cam, ref)
    assert float(cam.amax()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="layer must name a top-level layer"):
        grad_cam(model, x, layer="nope")
    with pytest.raises(ValueError, match="Grad-CAM needs a convolutional layer"):
        grad_cam(Sequential([Flatten(), Dense(3)], input_shape=(1, 4, 4), seed=0), torch.randn(1, 1, 4, 4))


def test_conv_activations_and_filter_pictures(tmp_path):
    model, x = model_and_images()
    maps = conv_activations(model, x[:1])
    assert [label for label, _ in maps] == ["conv1 + relu1", "conv2"]
    with torch.no_grad():
        h1 = torch.relu(model.layers[0].forward(x[:1], False))
        h2 = model.layers[3].forward(model.layers[2].forward(h1, False), False)
    torch.testing.assert_close(maps[0][1], h1[0])
    torch.testing.assert_close(maps[1][1], h2[0])
    assert len(model.hooks) == 0  # the capturing hooks are gone
    assert first_conv(model)[0] == "conv1"
    paths = write_filter_pictures(model, x[:1], tmp_path)
    assert [p.name for p in paths] == ["filters_conv1.png", "activations_conv1_relu1.png", "activations_conv2.png"]
    assert all(p.stat().st_size > 500 for p in paths)


def test_load_image_converts_and_resizes(tmp_path):
    rgb = torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(rgb.numpy(), "RGB").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", (1, 12, 12))
    assert x.shape == (1, 1, 12, 12) and x.dtype == torch.uint8
    same = load_image(tmp_path / "a.png", (3, 20, 30))
    assert torch.equal(same[0].permute(1, 2, 0), rgb)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "missing.png", (1, 12, 12))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="is not an image file"):
        load_image(tmp_path / "bad.png", (1, 12, 12))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from convdescent.train.run import train_from_config

    tmp = tmp_path_factory.mktemp("explain")
    npz = tmp / "syn.npz"
    write_npz_dataset(npz, n=90, num_classes=3, shape=(1, 12, 12), classes=["a", "b", "c"], seed=4)
    res = train_from_config({"model": "seed_cnn", "dataset": f"npz:{npz}", "val_split": 15, "epochs": 1,
                             "batch_size": 15, "log_every": 0}, out=tmp / "runs", display="quiet",
                            handle_signals=False)
    build_report(res.run_dir)
    return res.run_dir


def test_explain_and_filters_commands(tiny_run, tmp_path, capsys):
    out = tmp_path / "pics"
    code = diag_main(["explain", str(tiny_run), "--test-index", "2", "--samples", "5", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    names = sorted(p.name for p in out.iterdir())
    assert names == ["explain_test2.png", "explain_test2_gradcam.png", "explain_test2_saliency.png",
                     "explain_test2_smoothgrad.png"]
    assert "test2: explaining class" in text and "true " in text
    img = tmp_path / "digit.png"
    Image.fromarray(torch.randint(0, 256, (12, 12), dtype=torch.uint8).numpy(), "L").save(img)
    code = diag_main(["explain", str(tiny_run), "--image", str(img), "--class", "1", "--samples", "3",
                      "--out", str(out), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["target"] == 1 and data["class"] == "b" and data["cam_layer"] == "relu1"
    code = diag_main(["filters", str(tiny_run)])
    text = capsys.readouterr().out
    assert code == 0
    assert (tiny_run / "diagnostics" / "filters_conv1.png").is_file()
    assert (tiny_run / "diagnostics" / "activations_conv1_relu1.png").is_file()
    assert code == 0 and "filters_conv1.png" in text
    # bad input: one line, exit status 2
    assert diag_main(["explain", str(tiny_run), "--test-index", "999"]) == 2
    assert "--test-index must be in [0, 29]" in capsys.readouterr().err
    assert diag_main(["explain", str(tiny_run), "--test-index", "0", "--class", "9"]) == 2
    assert "--class must be in [0, 2] for this model, got 9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        diag_main(["explain", str(tiny_run)])  # --image or --test-index is required
    # the report's saliency section draws from the same run
    html = (tiny_run / "report.html").read_text()
    assert 'id="section-what-the-network-looks-at"' in html and 'id="saliency"' in html
    assert 'id="first-layer-filters"' in html
