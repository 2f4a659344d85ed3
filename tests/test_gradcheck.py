"""gradcheck (whole model) and check_layer (one layer): tiny errors when the backward is right, a named
failure when it is wrong, kinks reported, sampling as documented, inputs left untouched."""

from __future__ import annotations

import math

import pytest
import torch

from convdescent.diagnostics import (GradcheckReport, GradcheckResult, check_layer, check_model_layers,
                                     gradcheck)
from convdescent.diagnostics.gradcheck import DEFAULT_MAX_ELEMENTS
from convdescent.layers import BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Residual
from convdescent.losses import MSE, SoftmaxCrossEntropy
from convdescent.model import Sequential
from convdescent.models import seed_cnn, seed_cnn_bn

# Whole-model checks in float64: rounding in the forward pass, divided by the step, leaves errors of about
# 1e-9 to 1e-6 on a correct backward; a wrong one gives errors near 1.
MODEL_TOL = 1e-5


# tiny shapes: one thread is as fast, and immune to a busy machine's thread contention
pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n=4, shape=(1, 10, 10), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n,) + shape, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("builder", [seed_cnn, seed_cnn_bn], ids=["seed_cnn", "seed_cnn_bn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_named_models_pass(builder, dtype):
    model = builder(input_shape=(1, 10, 10), seed=1, dtype=dtype)
    x, y = batch()
    report = gradcheck(model, SoftmaxCrossEntropy(label_smoothing=0.1), x, y)
    assert isinstance(report, GradcheckReport) and isinstance(report, dict)
    assert list(report) == ["input"] + list(model.params())
    assert max(report.values()) < MODEL_TOL, report.table()
    assert report.failures(MODEL_TOL) == []
    assert report.kinks == 0


def test_eval_mode_and_mse_loss():
    model = seed_cnn_bn(input_shape=(1, 8, 8), seed=2, dtype=torch.float64)
    x, y = batch(shape=(1, 8, 8))
    report = gradcheck(model, MSE(), x, y, train=False)
    assert max(report.values()) < MODEL_TOL, report.table()


def with_layer(model, index, layer):
    """The same architecture and initial weights with the layer at ``index`` replaced by ``layer``."""
    layer.name = model.layers[index].name
    layers = [type(l).from_config(l.get_config()) for l in model.layers]
    layers[index] = layer
    rebuilt = Sequential(layers, input_shape=model.input_shape, dtype=model.dtype)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


def test_broken_parameter_gradient_is_detected_and_named():
    class FlippedBias(Dense):
        def backward(self, dy):
            dx = super().backward(dy)
            self.grads["bias"] = -self.grads["bias"]  # one sign flipped in one layer
            return dx

    model = with_layer(seed_cnn(input_shape=(1, 10, 10), seed=1, dtype=torch.float64), 4, FlippedBias(128))
    assert model.layers[4].name == "dense1"
    report = gradcheck(model, SoftmaxCrossEntropy(), *batch())
    assert report.failures(MODEL_TOL) == ["dense1.bias"], report.table()
    assert report["dense1.bias"] > 0.5
    assert "FAIL" in report.table().splitlines()[[r.name for r in report.results].index("dense1.bias") + 2]


def test_broken_input_gradient_taints_only_upstream_tensors():
    class Negated(ReLU):
        def backward(self, dy):
            return -super().backward(dy)

    # the ReLU between the two dense layers
    model = with_layer(seed_cnn(input_shape=(1, 10, 10), seed=1, dtype=torch.float64), 5, Negated())
    assert model.layers[5].name == "relu2"
    report = gradcheck(model, SoftmaxCrossEntropy(), *batch())
    assert set(report.failures(MODEL_TOL)) == {"input", "conv1.weight", "conv1.bias", "dense1.weight",
                                               "dense1.bias"}, report.table()
    assert report["dense2.weight"] < MODEL_TOL and report["dense2.bias"] < MODEL_TOL


def test_model_is_not_modified():
    model = seed_cnn_bn(input_shape=(1, 8, 8), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = model.layers[8].get_rng_state().clone()
    gradcheck(model, SoftmaxCrossEntropy(), *batch(shape=(1, 8, 8)), max_elements=4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for k, v in after.items() if "num_batches" not in k)
    assert torch.equal(model.layers[8].get_rng_state(), rng_before)


def test_dropout_mask_is_frozen_during_the_check():
    model = Sequential([Flatten(), Dense(6), Dropout(0.5), Dense(3)], input_shape=(1, 3, 3), seed=0,
                       dtype=torch.float64)
    report = gradcheck(model, SoftmaxCrossEntropy(), *batch(shape=(1, 3, 3), classes=3), max_elements=None)
    assert max(report.values()) < MODEL_TOL, report.table()


def test_sampling_limits_and_includes_the_largest_gradient():
    model = Sequential([Flatten(), Dense(20), ReLU(), Dense(10)], input_shape=(1, 3, 3), seed=1,
                       dtype=torch.float64)
    x, y = batch(shape=(1, 3, 3))
    report = gradcheck(model, SoftmaxCrossEntropy(), x, y, max_elements=5)
    counts = {r.name: r.checked for r in report.results}
    assert counts == {"input": 5, "dense1.weight": 5, "dense1.bias": 5, "dense2.weight": 5, "dense2.bias": 5}
    full = gradcheck(model, SoftmaxCrossEntropy(), x, y, max_elements=None, include_input=False)
    assert "input" not in full
    assert {r.name: r.checked for r in full.results} == {"dense1.weight": 180, "dense1.bias": 20,
                                                         "dense2.weight": 200, "dense2.bias": 10}
    assert max(full.values()) < MODEL_TOL
    assert DEFAULT_MAX_ELEMENTS == 64
    # The element with the largest analytic gradient is always among those checked: spoiling only that one
    # is caught even when just 3 of 200 elements are checked.
    class SpoilLargest(Dense):
        def backward(self, dy):
            dx = super().backward(dy)
            g = self.grads["weight"]
            largest = torch.unravel_index(g.abs().argmax(), g.shape)  # the weight is not contiguous
            g[largest] *= 2
            return dx

    model = with_layer(model, 3, SpoilLargest(10))
    for seed in range(3):
        spoiled = gradcheck(model, SoftmaxCrossEntropy(), x, y, max_elements=3, seed=seed)
        assert spoiled["dense2.weight"] > 0.3 and spoiled["dense2.bias"] < MODEL_TOL


def test_kinks_are_counted_not_judged():
    layer = ReLU()
    x = torch.tensor([[0.0, 1.0, -1.0, 0.0, 2.0]], dtype=torch.float64)  # two inputs exactly at the kink
    (res,) = check_layer(layer, (5,), batch_size=1, x=x, max_elements=None)
    assert res.kinks == 2 and res.checked == 5
    assert res.max_rel_error < 1e-9  # the three smooth elements
    assert res.max_rel_error_all > 0.1  # the straddling differences are meaningless (about half the slope)


def test_all_kinks_is_reported_as_kink_crossed():
    x = torch.zeros((1, 1, 2, 2), dtype=torch.float64)  # every window a four-way tie
    results = check_layer(MaxPool2D(2), (1, 2, 2), batch_size=1, x=x, max_elements=None)
    assert results[0].kinks == 4 and math.isnan(results[0].max_rel_error)
    assert not results[0].passed()
    table = GradcheckReport(results).table()
    assert "kink crossed" in table


def test_check_layer_rows_and_names():
    block = Residual([Conv2D(3, 3, padding="same"), BatchNorm2D(), ReLU()], projection="auto", name="res")
    rows = check_layer(block, (2, 5, 5), batch_size=2, max_elements=None)
    assert [r.name for r in rows] == ["input", "res.conv1.weight", "res.conv1.bias", "res.bn1.weight",
                                      "res.bn1.bias", "res.projection.weight"]
    assert all(isinstance(r, GradcheckResult) for r in rows)
    assert all(r.passed(1e-6) for r in rows), rows
    # The conv bias before a training-mode batch norm has a gradient of exactly zero: both sides are rounding
    # noise, judged against a thousandth of the largest gradient of the check, and it passes.
    assert rows[2].max_abs_error < 1e-8
    assert rows[0].layer == "res" and rows[0].param == "input"
    row = rows[1].as_dict()
    assert set(row) >= {"layer", "param", "shape", "checked", "max_rel_error", "kinks"}
    assert row["shape"] == (3, 2, 3, 3) and row["layer"] == "res.conv1" and row["param"] == "weight"
    assert not block.built  # the layer given was left alone


def test_check_layer_detects_a_wrong_formula():
    class HalfGradDense(Dense):
        def backward(self, dy):
            dx = super().backward(dy)
            return dx * 0.5

    rows = check_layer(HalfGradDense(3), (4,), batch_size=2, max_elements=None)
    assert rows[0].name == "input" and rows[0].max_rel_error > 0.4
    assert all(r.passed(1e-7) for r in rows[1:])


def test_check_model_layers_covers_every_layer():
    model = seed_cnn(input_shape=(1, 8, 8), seed=0)
    rows = check_model_layers(model, max_elements=8)
    assert [(r.layer, r.param) for r in rows] == [
        ("conv1", "input"), ("conv1", "weight"), ("conv1", "bias"), ("relu1", "input"), ("pool1", "input"),
        ("flatten1", "input"), ("dense1", "input"), ("dense1", "weight"), ("dense1", "bias"), ("relu2", "input"),
        ("dense2", "input"), ("dense2", "weight"), ("dense2", "bias")]
    assert all(r.passed(1e-6) for r in rows), rows


@pytest.mark.parametrize("kwargs,message", [
    ({"eps": -1e-6}, "eps must be a positive number, got -1e-06"),
    ({"eps": 0}, "eps must be a positive number, got 0"),
    ({"max_elements": 0}, "max_elements must be a positive int or None"),
])
def test_bad_arguments(kwargs, message):
    model = seed_cnn(input_shape=(1, 8, 8), seed=0)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gradcheck(model, SoftmaxCrossEntropy(), *batch(shape=(1, 8, 8)), **kwargs)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        check_layer(ReLU(), (3,), batch_size=0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3\), got \(2, 4\)"):
        check_layer(ReLU(), (3,), x=torch.zeros(2, 4))
