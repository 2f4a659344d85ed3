"""The training step: forward, loss, explicit backward, optimizer update. The hot path of every run.

This module is the one step engine: the trainer, full-batch accumulation, the NaN replay, the learning-rate
range test and the loss landscape all run their steps and evaluations through these functions.

The step functions run with subnormal floats flushed to zero (``native.flush_subnormals``: a gradient that
stops leaves Adam's first moment decaying into the subnormal range, which slowed steps 3x); the caller's own
floating-point setting is restored when each returns. ``CONVDESCENT_FLUSH_SUBNORMALS=0`` turns that off.

Everything here stays on the device: the loss and the count of correct predictions are returned as
tensors, so a step never waits for the device (no ``.item()``); the caller reads them when it reports.
"""

from __future__ import annotations

import contextlib

import torch

from ..native import flush_subnormals
from ..optim import inline_step, update_and_apply


@flush_subnormals
@torch.no_grad()
def train_step(model, loss_fn, optimizer, opt_state, xb: torch.Tensor, yb: torch.Tensor):
    """One gradient-descent step on a batch.

    Args:
        model: a built ``Sequential``.
        loss_fn: a loss returning ``(loss, dL/dlogits)``.
        optimizer: a ``GradientTransformation``; ``opt_state`` its state.
        xb: inputs (B, C, H, W), already normalized; yb: labels (B,) int64.

    Where the optimizer is Adam or AdamW on the fused path, the layers that can take the update inside their
    backward do (``model.updated_in_backward()`` names them; ``model.grads()`` then has no gradient for them).

    Returns:
        (loss tensor (), number of correct predictions tensor (), new optimizer state).
    """
    # The kernels reuse last step's buffers for what lives only inside the step (activations, dL/dx,
    # scratch); the logits loss_fn is given are fresh memory (it may keep them), and so are the gradients.
    with model.step_buffers():
        logits = model.forward(xb, train=True)
        loss, dlogits = loss_fn(logits, yb)
        params = model.params()
        # Nobody reads this step's gradients: the layers that can apply an Adam step inside their backward do
        # (Dense's native pass updates its weight while the weight's gradient is in the cache), the rest after.
        inline = inline_step(optimizer, params, opt_state)
        try:
            model.backward(dlogits, update=inline)
        except Exception as exc:
            if inline is not None and inline.taken and hasattr(exc, "add_note"):
                exc.add_note(f"{', '.join(sorted(inline.taken))} had already taken this step's update in the "
                             "backward (weights and moments); the optimizer state's step count was not advanced")
            raise
        correct = (logits.argmax(dim=1) == yb).sum()
    if inline is not None:
        opt_state = inline.finish(model.grads())
    else:
        opt_state = update_and_apply(optimizer, params, model.grads(), opt_state)
    return loss, correct, opt_state


@flush_subnormals
@torch.no_grad()
def compute_gradients(model, loss_fn, xb: torch.Tensor, yb: torch.Tensor, precision=None,
                      denominator: int | None = None):
    """Forward, loss and backward on a batch, without updating anything.

    Args:
        xb: inputs (B, C, H, W); yb: labels (B,).
        precision: a ``Precision`` (None: compute in the model's own dtype).
        denominator: the loss's mean denominator (full-batch chunks pass the whole set's size).

    Returns:
        (loss tensor (), correct tensor (), grads dict name -> tensor in the parameters' dtype). With fp32
        the grads are the layers' own tensors, overwritten by the next backward.
    """
    if precision is None or not precision.mixed:
        logits = model.forward(xb, train=True)
        loss, dlogits = loss_fn(logits, yb, denominator=denominator)
        model.backward(dlogits)
        return loss, (logits.argmax(dim=1) == yb).sum(), model.grads()
    with precision.compute():
        logits = precision.cast_logits(model.forward(precision.cast_input(xb), train=True))
        loss, dlogits = loss_fn(logits, yb, denominator=denominator)
        model.backward(precision.cast_output_grad(dlogits))
        grads = precision.master_grads(model.grads())
    return loss, (logits.argmax(dim=1) == yb).sum(), grads


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


@flush_subnormals
@torch.no_grad()
def checked_gradients(model, loss_fn, xb: torch.Tensor, yb: torch.Tensor, precision=None,
                      denominator: int | None = None):
    """``compute_gradients`` through the same plan, noting the first non-finite tensor (slow; for diagnosis).

    Hooks check every value the plan writes: each node's output (``split=False``: fused nodes stay fused, so
    the replay recomputes exactly what the fast step computed) and each layer's gradients as they become
    final. When the first non-finite output is a fused node's, the node's members are then run one by one on
    the node's own input (a copy kept when the problem was seen) to name the member that produced it.

    Returns:
        (loss, correct, grads, problem) where problem is None or a dict with ``where`` ("forward", "loss",
        "backward"), ``layer`` and ``tensor`` naming the first non-finite value in computation order.
    """
    model.plan()  # raises the model's own message when it is not built
    found: list[dict] = []
    if not _finite(xb):
        found.append({"where": "forward", "layer": "input", "tensor": "input batch"})

    fused = _fused_nodes(model.plan())
    inputs: dict[str, torch.Tensor] = {}
    node_input: list[tuple] = []

    def before_forward(name, layer, x):
        inputs[name] = x

    def after_forward(name, layer, out):
        if not found and not _finite(out):
            found.append({"where": "forward", "layer": name, "tensor": f"output of {name} ({type(layer).__name__})"})
            node = fused.get(name)
            if node is not None and node.input_of in inputs:
                node_input.append((node, inputs[node.input_of].clone()))

    def after_backward(name, layer, grads):
        if any(p["where"] == "backward" for p in found):
            return
        for key, g in grads.items():
            if not _finite(g):
                found.append({"where": "backward", "layer": name, "tensor": f"gradient of {key}"})
                return

    handles = [model.register_hook("before_forward", before_forward, split=False),
               model.register_hook("after_forward", after_forward, split=False),
               model.register_hook("after_backward", after_backward)]
    try:
        loss, correct, grads = compute_gradients(model, loss_fn, xb, yb, precision, denominator)
    finally:
        for handle in handles:
            handle.remove()
    forward = [p for p in found if p["where"] == "forward"]
    if forward:
        problem = forward[0]
        if node_input:
            problem = _inside_node(*node_input[0], precision) or problem
    elif not _finite(loss):
        problem = {"where": "loss", "layer": model.layers[-1].name, "tensor": "loss"}
    else:
        problem = found[0] if found else None
    return loss, correct, grads, problem


def _fused_nodes(plan) -> dict:
    """Every node of ``plan`` (and of the plans inside residual blocks) that runs several layers, by the
    name of the member whose output is the node's output."""
    return {node.output_of: node for node in plan.walk() if len(node.members) > 1}


def _inside_node(node, x: torch.Tensor, precision) -> dict | None:
    """Run a fused node's members one at a time on its input; the first member whose output is not finite.

    The members run their own forward in training mode on a copy of the input the fused pass was given (the
    layers fused today keep no state between steps); their caches are cleared afterwards.
    """
    try:
        with precision.compute() if precision is not None and precision.mixed else contextlib.nullcontext():
            for name, layer in node.members:
                x = layer.forward(x, True)
                if not _finite(x):
                    return {"where": "forward", "layer": name,
                            "tensor": f"output of {name} ({type(layer).__name__}), inside the fused pass "
                                      f"{node.label}"}
    finally:
        node.clear_cache()
    return None


@torch.no_grad()
def accumulate_gradients(model, loss_fn, chunks, total: int, precision=None, checked: bool = False):
    """Full-batch gradient: sum the gradients of chunks so the result is the gradient of the mean loss.

    Args:
        chunks: iterable of (xb, yb) covering the whole training set once.
        total: the number of examples over all chunks (the mean's denominator).
        precision: a ``Precision`` or None.
        checked: compute layer by layer and report the first non-finite tensor (see ``checked_gradients``).

    Returns:
        (grads dict, loss tensor (), correct tensor ()) for the whole set; with ``checked`` a fourth item,
        the problem found (or None).
    """
    acc = None
    loss_sum = None
    correct = None
    problem = None
    for xb, yb in chunks:
        if checked:
            loss, c, grads, p = checked_gradients(model, loss_fn, xb, yb, precision, denominator=total)
            problem = problem or p
        else:
            loss, c, grads = compute_gradients(model, loss_fn, xb, yb, precision, denominator=total)
        if acc is None:
            acc = {k: g.clone() for k, g in grads.items()}
            loss_sum = loss.clone()
            correct = c
        else:
            torch._foreach_add_(list(acc.values()), list(grads.values()))
            loss_sum += loss
            correct += c
    if acc is None:
        raise ValueError("full-batch gradient over an empty training set")
    if checked:
        return acc, loss_sum, correct, problem
    return acc, loss_sum, correct


@torch.no_grad()
def evaluate(model, loss_fn, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, normalizer=None):
    """Mean loss and accuracy of ``model`` on (x, y) in evaluation mode, in batches.

    Args:
        x: inputs (N, C, H, W), uint8 (normalized here with ``normalizer``) or float.
        y: labels (N,).

    Returns:
        (mean loss, accuracy) as Python floats.
    """
    n = x.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, n, batch_size):
        xb = x[i:i + batch_size]
        yb = y[i:i + batch_size]
        if normalizer is not None:
            xb = normalizer(xb)
        logits = model.forward(xb, train=False)
        loss_sum += loss_fn.value(logits, yb).double() * xb.shape[0]
        correct += (logits.argmax(dim=1) == yb).sum()
    model.clear_cache()
    return float(loss_sum) / n, float(correct) / n


@torch.no_grad()
def predict_logits(model, x: torch.Tensor, batch_size: int = 1000, normalizer=None) -> torch.Tensor:
    """Logits (N, K) of ``model`` on uint8 (normalized with ``normalizer``) or float inputs (N, C, H, W)."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        if normalizer is not None:
            xb = normalizer(xb)
        outs.append(model.forward(xb, train=False))
    model.clear_cache()
    if not outs:
        return torch.empty((0, 0))
    return torch.cat(outs)
