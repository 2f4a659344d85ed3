"""Checks behind ``convdescent gradcheck``: every layer type, a whole model, and autograd through ``to_torch()``.

Verdicts follow the CS231n guidance on relative errors of analytic against numerical gradients:

    below 1e-7   good
    below 1e-4   acceptable near kinks (ReLU at 0, ties in max pooling)
    otherwise    wrong

Finite-difference steps that crossed a kink are reported (``kinks``) and left out of the judged error by
``convdescent.diagnostics.gradcheck``; a tensor whose every checked element crossed one is reported as
"kink crossed", neither passed nor failed.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..layers import LAYERS
from ..layers.base import Layer
from .gradcheck import GradcheckResult, check_layer, gradcheck

GOOD = 1e-7
ACCEPTABLE = 1e-4


def verdict(rel: float, kinks: int = 0) -> str:
    """CS231n verdict of a relative error: "good", "acceptable near kinks", "wrong" or "kink crossed"."""
    if rel is None or math.isnan(rel):
        return "kink crossed" if kinks else "wrong"
    if rel < GOOD:
        return "good"
    if rel < ACCEPTABLE:
        return "acceptable near kinks"
    return "wrong"


@dataclass
class Row:
    """One line of the gradcheck table.

    Attributes:
        section: "layer types", "model" or "autograd".
        layer: layer (or layer type) name; param: parameter name or "input".
        shape: tensor shape; checked: elements compared.
        rel_error: the judged relative error; kinks: finite-difference steps that crossed a kink.
        verdict: see :func:`verdict`; note: free text (e.g. the layer's sample configuration).
    """

    section: str
    layer: str
    param: str
    shape: tuple
    checked: int
    rel_error: float
    kinks: int
    verdict: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"section": self.section, "layer": self.layer, "param": self.param, "shape": list(self.shape),
                "checked": self.checked, "rel_error": None if math.isnan(self.rel_error) else self.rel_error,
                "kinks": self.kinks, "verdict": self.verdict, "note": self.note}


def rows_from_results(section: str, results: list[GradcheckResult], note: str = "",
                      layer_label: str | None = None) -> list[Row]:
    """Turn gradcheck results into table rows with verdicts."""
    return [Row(section, layer_label or r.layer, r.param, tuple(r.shape), r.checked, r.max_rel_error, r.kinks,
                verdict(r.max_rel_error, r.kinks), note) for r in results]


# -- every layer type -------------------------------------------------------------------------------------

def _residual_samples():
    from ..layers import Conv2D, ReLU, Residual

    return [("Residual([Conv2D(3, 3, same), ReLU()])", lambda: Residual([Conv2D(3, 3, padding="same"), ReLU()]),
             (3, 5, 5), True),
            ("Residual([Conv2D(4, 3, stride 2, same)], projection auto)",
             lambda: Residual([Conv2D(4, 3, stride=2, padding="same")], projection="auto"), (2, 6, 6), True)]


def layer_samples() -> list[tuple[str, Callable[[], Layer], tuple, bool]]:
    """Small configurations of each layer type: (label, factory, per-sample input shape, train mode).

    Batch norm and dropout are checked in both modes (batch statistics / running statistics; a frozen mask /
    identity).
    """
    from ..layers import (GELU, AvgPool2D, BatchNorm1D, BatchNorm2D, ClassToken, Conv2D, Dense, Dropout, Flatten,
                          GlobalAvgPool2D, LayerNorm, LeakyReLU, MaxPool2D, MultiHeadSelfAttention, PatchEmbed,
                          PositionEmbedding, ReLU, Sigmoid, SiLU, Softmax, Tanh, TokenPool, TorchModule)

    samples = [
        ("Conv2D(3, 3, valid)", lambda: Conv2D(3, 3), (2, 6, 6), True),
        ("Conv2D(2, (3, 2), stride 2, same)", lambda: Conv2D(2, (3, 2), stride=2, padding="same"), (2, 7, 6), True),
        ("Conv2D(2, 1, padding 1, no bias)", lambda: Conv2D(2, 1, padding=1, use_bias=False), (3, 4, 4), True),
        ("Dense(4)", lambda: Dense(4), (5,), True),
        ("MaxPool2D(2)", lambda: MaxPool2D(2), (2, 6, 6), True),
        ("MaxPool2D(3, stride 2, same)", lambda: MaxPool2D(3, stride=2, padding="same"), (2, 7, 7), True),
        ("AvgPool2D(2)", lambda: AvgPool2D(2), (2, 6, 6), True),
        ("GlobalAvgPool2D()", lambda: GlobalAvgPool2D(), (3, 4, 4), True),
        ("Flatten()", lambda: Flatten(), (2, 3, 3), True),
        ("ReLU()", lambda: ReLU(), (2, 4, 4), True),
        ("LeakyReLU(0.1)", lambda: LeakyReLU(0.1), (2, 4, 4), True),
        ("Tanh()", lambda: Tanh(), (6,), True),
        ("Sigmoid()", lambda: Sigmoid(), (6,), True),
        ("Softmax()", lambda: Softmax(), (6,), True),
        ("BatchNorm2D() train", lambda: BatchNorm2D(), (3, 4, 4), True),
        ("BatchNorm2D() eval", lambda: BatchNorm2D(), (3, 4, 4), False),
        ("BatchNorm1D() train", lambda: BatchNorm1D(), (6,), True),
        ("BatchNorm1D() eval", lambda: BatchNorm1D(), (6,), False),
        ("Dropout(0.3) train", lambda: Dropout(0.3, seed=1), (2, 4, 4), True),
        ("Dropout(0.3) eval", lambda: Dropout(0.3, seed=1), (2, 4, 4), False),
        ("TorchModule(torch.nn.GELU)", lambda: TorchModule("torch.nn.GELU"), (6,), True),
        ("Conv2D(4, 3, groups 2, dilation 2, same)", lambda: Conv2D(4, 3, padding="same", groups=2, dilation=2),
         (2, 7, 7), True),
        ("Conv2D(3, 3, depthwise)", lambda: Conv2D(3, 3, groups=3), (3, 5, 5), True),
        ("MaxPool2D(2, stride 1, dilation 2)", lambda: MaxPool2D(2, stride=1, dilation=2), (2, 6, 6), True),
        ("AvgPool2D(3, stride 2, padding 1, count_include_pad False)",
         lambda: AvgPool2D(3, stride=2, padding=1, count_include_pad=False), (2, 6, 6), True),
        ("Dense(3) on tokens", lambda: Dense(3), (4, 5), True),
        ("LayerNorm() on tokens", lambda: LayerNorm(), (4, 5), True),
        ("LayerNorm(normalized_dims 3)", lambda: LayerNorm(normalized_dims=3), (2, 3, 3), True),
        ("GELU()", lambda: GELU(), (6,), True),
        ("GELU(tanh)", lambda: GELU("tanh"), (6,), True),
        ("SiLU()", lambda: SiLU(), (6,), True),
        ("MultiHeadSelfAttention(2)", lambda: MultiHeadSelfAttention(2), (3, 4), True),
        ("MultiHeadSelfAttention(2, causal)", lambda: MultiHeadSelfAttention(2, causal=True), (3, 4), True),
        ("PatchEmbed(4, 2)", lambda: PatchEmbed(4, 2), (2, 4, 5), True),
        ("PositionEmbedding()", lambda: PositionEmbedding(), (3, 4), True),
        ("ClassToken()", lambda: ClassToken(), (3, 4), True),
        ("TokenPool(mean)", lambda: TokenPool("mean"), (3, 4), True),
        ("TokenPool(cls)", lambda: TokenPool("cls"), (3, 4), True),
    ]
    samples += _residual_samples()
    return samples


def check_layer_types(eps: float = 1e-6, max_elements: int | None = 64, seed: int = 0,
                      batch_size: int = 3) -> tuple[list[Row], list[str]]:
    """Run ``check_layer`` on a small configuration of every registered layer type.

    Returns:
        (rows, names of registered layer classes that have no sample configuration and were not checked).
    """
    rows: list[Row] = []
    covered = set()
    for label, factory, shape, train in layer_samples():
        layer = factory()
        covered.add(type(layer).__name__)
        results = check_layer(layer, shape, batch_size=batch_size, train=train, eps=eps,
                              max_elements=max_elements, seed=seed)
        kind = type(layer).__name__
        own = layer.name or layer.kind
        for r in results:
            param = r.param
            if r.layer not in ("input", own) and r.layer.startswith(own + "."):
                param = f"{r.layer[len(own) + 1:]}.{r.param}"  # a nested layer's parameter
            rows.append(Row("layer types", kind, param, tuple(r.shape), r.checked, r.max_rel_error, r.kinks,
                            verdict(r.max_rel_error, r.kinks), label))
    missing = sorted(set(LAYERS) - covered)
    return rows, missing


# -- whole model ------------------------------------------------------------------------------------------

def _has_dropout(model) -> bool:
    return any(type(layer).__name__ == "Dropout" for _, layer in model.all_layers())


def model_rows(model, loss, x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5,
               max_elements: int | None = 64, seed: int = 0) -> list[Row]:
    """Finite differences on the whole model's loss (every parameter and the input).

    The default step 1e-5 balances truncation error (grows as eps^2) against float64 rounding of the loss
    (grows as 1/eps); CS231n suggests the same order.
    """
    report = gradcheck(model, loss, x, y, eps=eps, max_elements=max_elements, train=True, seed=seed)
    return rows_from_results("model", report.results)


def _torch_loss(loss, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    name = getattr(loss, "name", None)
    if name == "cross_entropy":
        return torch.nn.functional.cross_entropy(out, y, label_smoothing=getattr(loss, "label_smoothing", 0.0))
    if name == "mse":
        target = y
        if not y.is_floating_point():
            target = torch.nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
        return torch.nn.functional.mse_loss(out, target)
    raise ValueError(f"the autograd comparison knows the losses cross_entropy and mse, got {name!r}")


def autograd_rows(model, loss, x: torch.Tensor, y: torch.Tensor) -> tuple[list[Row], str]:
    """Compare the explicit backward with torch.autograd through ``model.to_torch()``, in float64.

    Both run in training mode (batch statistics), except with dropout, whose random masks cannot be
    matched between the two: then both run in evaluation mode.

    Returns:
        (one row per parameter plus the input, the mode used).
    """
    m = copy.deepcopy(model)
    m.to(dtype=torch.float64)
    train = not _has_dropout(m)
    x64 = x.detach().to(device=m.device, dtype=torch.float64).clone()
    y = y.to(m.device) if not y.is_floating_point() else y.to(device=m.device, dtype=torch.float64)
    tm = m.to_torch()  # copies of the float64 weights, taken before the engine's forward changes any buffer
    m.set_input_grad(True)
    with torch.no_grad():
        out = m.forward(x64, train=train)
        _, dout = loss(out, y)
        dx = m.backward(dout)
    ours = [("input", dx)] + list(m.grads().items())
    tm.train(train)
    xin = x64.clone().requires_grad_(True)
    with torch.enable_grad():
        value = _torch_loss(loss, tm(xin), y)
        tparams = [p for p in tm.parameters() if p.requires_grad]
        grads = torch.autograd.grad(value, [xin] + tparams, allow_unused=True)
    ref_names = ["input"] + [n for n, p in tm.named_parameters() if p.requires_grad]
    rows = []
    if len(grads) != len(ours):
        raise ValueError(f"to_torch() of model '{model.name}' has {len(grads) - 1} trainable parameters, the "
                         f"model has {len(ours) - 1}; cannot pair them")
    for (name, g), ref, rname in zip(ours, grads, ref_names):
        if ref is None:
            ref = torch.zeros_like(g)
        if tuple(ref.shape) != tuple(g.shape):
            raise ValueError(f"parameter {name!r} has shape {tuple(g.shape)} but its to_torch() counterpart "
                             f"{rname!r} has {tuple(ref.shape)}")
        scale = float(torch.maximum(g.abs().max(), ref.abs().max())) if g.numel() else 0.0
        floor = max(1e-3 * scale, 1e-12)
        rel = float(((g - ref).abs() / torch.clamp(torch.maximum(g.abs(), ref.abs()), min=floor)).max()) \
            if g.numel() else 0.0
        layer, _, param = name.rpartition(".")
        if name == "input":
            layer, param = "input", "input"
        rows.append(Row("autograd", layer, param, tuple(g.shape), g.numel(), rel, 0, verdict(rel),
                        f"vs torch {rname}"))
    m.clear_cache()
    return rows, "train" if train else "eval"


# -- the table --------------------------------------------------------------------------------------------

def format_rows(rows: list[Row]) -> str:
    """A plain-text table: layer, parameter, shape, elements checked, largest relative error, kinks, verdict."""
    head = ("layer", "parameter", "shape", "checked", "max rel error", "kinks", "verdict", "")
    table = [head]
    for r in rows:
        err = "n/a" if math.isnan(r.rel_error) else f"{r.rel_error:.2e}"
        kinks = f"{r.kinks} crossed" if r.kinks else "0"
        table.append((r.layer, r.param, "x".join(map(str, r.shape)) or "scalar", str(r.checked), err, kinks,
                      r.verdict.upper() if r.verdict == "wrong" else r.verdict, r.note))
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
    lines.insert(1, "-" * max(len(l) for l in lines))
    return "\n".join(lines)


def summarize(rows: list[Row]) -> dict[str, Any]:
    """Counts of verdicts, kink crossings, and the rows judged wrong."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    wrong = [r for r in rows if r.verdict == "wrong"]
    return {"counts": counts, "kinks": sum(r.kinks for r in rows),
            "wrong": [f"{r.section}: {r.layer}.{r.param}" if r.param != "input" else f"{r.section}: {r.layer} input"
                      for r in wrong],
            "wrong_layers": sorted({r.layer for r in wrong}), "ok": not wrong}


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
