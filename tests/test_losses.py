"""Losses against torch.nn.functional: value and gradient, label smoothing, huge logits, and chunking with
``denominator`` adding up to the full batch."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from convdescent import native
from convdescent.losses import MSE, SoftmaxCrossEntropy, make_loss

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def torch_ce(logits, labels, smoothing):
    z = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(z, labels, label_smoothing=smoothing)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.35])
@pytest.mark.parametrize("n,k", [(1, 2), (7, 10), (32, 3)])
@pytest.mark.parametrize("kernels", [True, False], ids=["native", "torch-ops"])
def test_cross_entropy_matches_torch(n, k, smoothing, dtype, kernels):
    previous = native.set_enabled(kernels)
    try:
        _cross_entropy_matches_torch(n, k, smoothing, dtype)
    finally:
        native.set_enabled(previous)


def _cross_entropy_matches_torch(n, k, smoothing, dtype):
    gen = torch.Generator().manual_seed(n * 100 + k)
    logits = torch.randn(n, k, generator=gen, dtype=dtype) * 3
    labels = torch.randint(0, k, (n,), generator=gen)
    loss, grad = SoftmaxCrossEntropy(label_smoothing=smoothing)(logits, labels)
    ref_loss, ref_grad = torch_ce(logits, labels, smoothing)
    tol = TOL[dtype]
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)
    value = SoftmaxCrossEntropy(label_smoothing=smoothing).value(logits, labels)
    torch.testing.assert_close(value, ref_loss, rtol=tol, atol=tol)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("scale", [1e4, -1e4, 1e30])
def test_cross_entropy_is_stable_for_huge_logits(scale, smoothing):
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, -2.0], [-3.0, 2.0, 1.0]]) * scale
    labels = torch.tensor([0, 2, 1])
    loss, grad = SoftmaxCrossEntropy(label_smoothing=smoothing)(logits, labels)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_loss, ref_grad = torch_ce(logits, labels, smoothing)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    # A confidently wrong prediction costs about the logit gap; a confidently right one almost nothing.
    single, _ = SoftmaxCrossEntropy()(torch.tensor([[1e4, 0.0]]), torch.tensor([1]))
    assert abs(float(single) - 1e4) < 1e-3
    right, grad_right = SoftmaxCrossEntropy()(torch.tensor([[1e4, 0.0]]), torch.tensor([0]))
    assert float(right) == 0.0 and float(grad_right.abs().max()) == 0.0


@pytest.mark.parametrize("loss_fn", [SoftmaxCrossEntropy(), SoftmaxCrossEntropy(label_smoothing=0.1), MSE()],
                         ids=["ce", "ce-smooth", "mse"])
def test_denominator_chunks_add_up_to_the_full_batch(loss_fn):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (10,), generator=gen)
    full_loss, full_grad = loss_fn(logits, labels)
    losses, grads = zip(*(loss_fn(logits[i:i + 3], labels[i:i + 3], denominator=10) for i in range(0, 10, 3)))
    torch.testing.assert_close(sum(losses), full_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(grads), full_grad, rtol=1e-12, atol=1e-12)
    # Without the denominator each chunk is its own mean, which does not add up.
    plain = sum(loss_fn(logits[i:i + 3], labels[i:i + 3])[0] for i in range(0, 10, 3))
    assert abs(float(plain) - float(full_loss)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 4), (1, 1)])
def test_mse_matches_torch(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    pred = torch.randn(shape, generator=gen, dtype=dtype)
    target = torch.randn(shape, generator=gen, dtype=dtype)
    loss, grad = MSE()(pred, target)
    p = pred.clone().requires_grad_()
    ref = F.mse_loss(p, target)
    ref.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss, ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad, p.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(MSE().value(pred, target), ref.detach(), rtol=tol, atol=tol)


def test_mse_with_integer_labels_uses_one_hot_targets():
    pred = torch.tensor([[0.2, 0.7, 0.1], [0.9, 0.0, 0.3]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    loss, grad = MSE()(pred, labels)
    onehot = F.one_hot(labels, 3).to(torch.float64)
    torch.testing.assert_close(loss, F.mse_loss(pred, onehot))
    torch.testing.assert_close(grad, 2 * (pred - onehot) / 6)


def test_loss_errors():
    with pytest.raises(ValueError, match=re.escape("label_smoothing must be in [0, 1), got 1.0")):
        SoftmaxCrossEntropy(label_smoothing=1.0)
    with pytest.raises(ValueError, match=re.escape("cross-entropy expects logits of shape (N, K), got (4,)")):
        SoftmaxCrossEntropy()(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("cross-entropy expects labels of shape (4,), got (3,)")):
        SoftmaxCrossEntropy()(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("mse expects a target of shape (2, 3), got (3, 2)")):
        MSE()(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=re.escape("unknown loss 'hinge'; choose one of [")):
        make_loss("hinge")
    assert make_loss("cross_entropy", label_smoothing=0.1).get_config() == {"name": "cross_entropy",
                                                                          "label_smoothing": 0.1}


@pytest.mark.skipif(native.library() is None, reason="the native kernels do not build here")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_cross_entropy_native_pass_equals_the_torch_operations(dtype, smoothing):
    """The one-pass kernel and the torch-op formula on the same inputs: logits that are a strided slice (rows
    of a wider tensor), a denominator larger than the batch, rows with an inf, a NaN and -inf everywhere."""
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(9, 13, generator=gen, dtype=dtype) * 4
    logits = wide[:, 2:9]  # row stride 13, 7 classes
    labels = torch.randint(0, 7, (9,), generator=gen)
    special = logits.clone()
    special[1, 3] = float("inf")
    special[2, 0] = float("nan")
    special[3, :] = float("-inf")
    special[4, 5] = 80.0  # exp overflows float32 without the max shift
    fn = SoftmaxCrossEntropy(label_smoothing=smoothing)
    for z in (logits, special):
        for denom in (None, 20):
            assert native.kernel("cd_softmax_xent", z) is not None
            loss, grad = fn(z, labels, denominator=denom)
            previous = native.set_enabled(False)
            try:
                ref_loss, ref_grad = fn(z, labels, denominator=denom)
            finally:
                native.set_enabled(previous)
            tol = TOL[dtype]
            torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol, equal_nan=True)
            torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol, equal_nan=True)
            finite = torch.isfinite(z).all(1)
            assert torch.isfinite(grad[finite]).all()


@pytest.mark.parametrize("kernels", [True, False], ids=["native", "torch-ops"])
@pytest.mark.parametrize("bad", [5, -1, 99])
def test_a_label_outside_the_classes_is_one_clear_error(kernels, bad):
    labels = torch.tensor([0, 1, bad, 2])
    message = f"label {bad} (example 2 of the batch) is not a class of a model with 5 outputs: labels must be in [0, 5)"
    previous = native.set_enabled(kernels)
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            SoftmaxCrossEntropy()(torch.randn(4, 5), labels)
        with pytest.raises(ValueError, match=re.escape(message)):
            SoftmaxCrossEntropy().value(torch.randn(4, 5), labels)
    finally:
        native.set_enabled(previous)
