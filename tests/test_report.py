"""report.html: self-contained, holds every figure the issue lists (each a real PNG), takes registered
sections, survives a broken one and a run without checkpoints; TensorBoard event files hold scalars and
per-layer histograms."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import convdescent.report as report
from convdescent.data.synthetic import write_npz_dataset
from convdescent.train.run import load_run, train_from_config

FIGURES = ["loss-curves", "accuracy-curves", "learning-rate", "grad-norms", "confusion-matrix", "misclassified"]


# one torch thread: on the shared 2-core machine two threads ran these small problems many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def _builtin_sections(builtin_sections_only):
    """Report sections other modules register are tested with those modules."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, builtin_sections_only):
    base = tmp_path_factory.mktemp("rep")
    arrays = write_npz_dataset(base / "d.npz", n=160, num_classes=4, shape=(1, 10, 10), classes=["w", "x", "y", "z"],
                               seed=2)
    # a quarter of the test labels are wrong, so the report has misclassified images to show
    y_test = arrays["y_test"].copy()
    y_test[::4] = (y_test[::4] + 1) % 4
    np.savez(base / "d.npz", **dict(arrays, y_test=y_test))
    res = train_from_config({"dataset": f"npz:{base / 'd.npz'}", "val_split": 32, "epochs": 2, "batch_size": 16,
                             "log_every": 2, "out": str(base / "runs"), "schedule": "cosine",
                             "schedule_params": {"warmup_steps": 4}, "tensorboard": True, "lr": 2e-3},
                            display="none")
    assert not (res.run_dir / "report.html").exists()  # training writes no report; whoever wants one asks
    report.build_report(res.run_dir)
    return res.run_dir


def figures(text: str) -> dict[str, bytes]:
    found = re.findall(r'<figure id="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    return {fid: base64.b64decode(data) for fid, data in found}


def test_report_holds_every_figure_and_the_configuration(run_dir):
    text = (run_dir / "report.html").read_text()
    figs = figures(text)
    assert set(FIGURES) <= set(figs)
    for fid in FIGURES:
        img = Image.open(io.BytesIO(figs[fid]))
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 100, fid
    conf = html.unescape(re.search(r'<pre id="configuration">(.*?)</pre>', text, re.S).group(1))
    assert 'schedule = "cosine"' in conf and "warmup_steps = 4" in conf and "lr = 0.002" in conf
    for title in ("Summary", "Loss and accuracy", "Learning rate", "Gradient norms", "Confusion matrix",
                  "Misclassified test images", "Configuration"):
        assert f"<h2>{title}</h2>" in text
    # self-contained: nothing is fetched from elsewhere
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text)
    assert "<script" not in text


def test_registered_sections_and_a_broken_one(run_dir, tmp_path):
    calls = []

    def good(run):
        calls.append(run.model is not None and run.path == run_dir)
        return "<p id='extra'>gradient health: fine</p>"

    def broken(run):
        raise RuntimeError("no saliency today")

    report.register_section("Extra", good)
    report.register_section("Broken", broken)
    report.register_section("Nothing", lambda run: None)
    try:
        out = report.build_report(run_dir, tmp_path / "r.html")
    finally:
        report.SECTIONS[:] = [(t, f) for t, f in report.SECTIONS if t not in ("Extra", "Broken", "Nothing")]
    text = out.read_text()
    assert calls == [True]
    assert "<h2>Extra</h2><p id='extra'>gradient health: fine</p>" in text
    assert "<h2>Broken</h2>" in text and "RuntimeError: no saliency today" in text
    assert "<h2>Nothing</h2>" not in text
    assert set(FIGURES) <= set(figures(text))
    with pytest.raises(ValueError, match="fn must be callable"):
        report.register_section("X", "not a function")


def test_report_of_a_run_without_checkpoints_or_evaluation(run_dir, tmp_path):
    copy = tmp_path / "partial"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints")
    (copy / "evaluation.npz").unlink()
    text = report.build_report(copy).read_text()
    figs = figures(text)
    assert {"loss-curves", "accuracy-curves", "learning-rate", "grad-norms"} <= set(figs)
    assert "confusion-matrix" not in figs and "no test evaluation" in text


def test_load_run(run_dir):
    run = load_run(run_dir)
    assert run.checkpoint == "best" and run.classes == ["w", "x", "y", "z"]
    assert run.config["schedule"] == "cosine" and run.dataset.startswith("npz:")
    assert len(run.history) == 2 and run.summary["status"] == "completed"
    assert any(r["type"] == "step" for r in run.metrics)
    x = torch.zeros(2, 1, 10, 10, dtype=torch.uint8)
    assert run.model.predict(run.normalizer(x)).shape == (2, 4)


def test_tensorboard_event_files(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"epoch/loss", "epoch/val_acc", "epoch/lr", "step/loss", "step/lr", "step/grad_norm"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("epoch/loss")] == [1, 2]
    for name in ("conv1.weight", "conv1.bias", "dense1.weight", "dense2.weight"):
        assert f"weights/{name}" in tags["histograms"] and f"grads/{name}" in tags["histograms"]
    assert len(acc.Histograms("grads/conv1.weight")) == 8  # 8 steps an epoch, every 2 steps, 2 epochs


def test_tensorboard_has_test_figures_layer_scalars_and_an_input_grid(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    summary = json.loads((run_dir / "summary.json").read_text())
    (test_acc,) = acc.Scalars("test/acc")
    assert test_acc.value == pytest.approx(summary["test_acc"], abs=1e-6) and test_acc.step == 16
    assert acc.Scalars("test/loss")[0].value == pytest.approx(summary["test_loss"], rel=1e-5)
    layers = ("conv1", "dense1", "dense2")
    for layer in layers:
        norms = acc.Scalars(f"grad_norm/{layer}")
        ratios = acc.Scalars(f"update_ratio/{layer}")
        assert [e.step for e in norms] == list(range(2, 17, 2)) == [e.step for e in ratios]
        assert all(e.value > 0 and math.isfinite(e.value) for e in norms)
        assert all(0 < e.value < 1 for e in ratios)  # a step moves a layer by a small fraction of its weights
    # the per-layer norms add up (in squares) to the overall norm of the same step
    total = {e.step: e.value for e in acc.Scalars("step/grad_norm")}
    layer_sq = sum(acc.Scalars(f"grad_norm/{layer}")[0].value ** 2 for layer in layers)
    assert math.sqrt(layer_sq) == pytest.approx(total[2], rel=1e-4)
    (grid,) = acc.Images("inputs/train")
    img = Image.open(io.BytesIO(grid.encoded_image_string))
    assert img.size[0] >= 4 * 10 and img.size[1] >= 10  # several 10x10 images tiled
