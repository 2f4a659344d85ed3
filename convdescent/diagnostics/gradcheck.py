"""Gradient checking: explicit backward passes against float64 central finite differences.

For a scalar loss L and one element theta_i of a parameter (or of the input), the numerical derivative is

    n_i = (L(theta_i + eps) - L(theta_i - eps)) / ((theta_i + eps) - (theta_i - eps))

(the denominator is the step actually taken in floating point, about 2 eps), and the analytic one a_i comes
from the layers' backward. Their disagreement is measured CS231n-style as a relative error,

    rel_i = |a_i - n_i| / max(|a_i|, |n_i|, floor),      floor = 1e-3 * G,

where G is the largest |analytic gradient| over every tensor of the check (input included; 1e-12 if all
are 0), and a tensor's error is the maximum of rel_i over its checked elements. Every element whose
gradient is at least a thousandth of G gets the plain relative error; smaller ones are measured against
that thousandth, because there finite differences see mostly rounding noise. The floor matters most for
gradients that are exactly zero, such as the bias of a layer followed by batch normalization in training
mode: both values are then rounding noise, and the error says how small that noise is next to G.

What to expect in float64 with the default step: a single layer (``check_layer``) gives errors of 1e-8 or
below when its backward is right; a whole model (``gradcheck``) gives 1e-9 to about 1e-6, rounding in the
forward pass divided by the step; a wrong backward gives 1e-2 to 1.

Large tensors are sampled: at most ``max_elements`` elements per tensor (default 64) are checked, always
including the element with the largest analytic gradient, the rest drawn uniformly without replacement
from a generator seeded with ``seed``. ``max_elements=None`` checks every element.

Kinks: ReLU at 0 and max-pooling when two window values swap order are not differentiable, and a finite
difference that straddles such a point is meaningless. Each forward records the kink pattern of every
layer that has one (which inputs of a ReLU are positive, which element of each pooling window wins); an
element whose +eps and -eps runs give different patterns "crossed a kink". Such elements are counted in
``kinks`` and left out of ``max_rel_error`` (they still count in ``max_rel_error_all``), so a kink neither
hides a real error nor passes for one.

Randomness is frozen during the check: dropout generators are reset to the same state before every
forward, so all evaluations see the same mask. Checks run on a float64 deep copy; the model or layer passed
in is not modified.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..layers.activations import LeakyReLU, ReLU
from ..layers.base import Layer
from ..layers.dropout import rng_states, set_rng_states
from ..layers.pool import MaxPool2D
from ..hooks import Hooks
from ..plan import compile_plan

DEFAULT_MAX_ELEMENTS = 64
FLOOR_FRACTION = 1e-3


@dataclass
class GradcheckResult:
    """The comparison for one tensor.

    Attributes:
        layer: qualified layer name (``conv1``, ``residual1.conv2``); for dL/dx the checked layer's name in
            ``check_layer`` and ``"input"`` in ``gradcheck``.
        param: parameter name (``weight``, ``bias``...), or ``"input"``.
        shape: the tensor's shape.
        checked: how many elements were compared.
        max_rel_error: max relative error over checked elements that crossed no kink (nan if all did).
        max_rel_error_all: the same over all checked elements.
        max_abs_error: max |a - n| over all checked elements.
        kinks: checked elements whose +-eps evaluations crossed a kink.
        worst_index: index of the element with the largest kink-free relative error (None if none).
    """

    layer: str
    param: str
    shape: tuple
    checked: int
    max_rel_error: float
    max_rel_error_all: float
    max_abs_error: float
    kinks: int
    worst_index: tuple | None

    @property
    def name(self) -> str:
        return "input" if self.param == "input" else f"{self.layer}.{self.param}"

    def passed(self, tol: float = 1e-6) -> bool:
        """True when the kink-free relative error is at most ``tol`` (nan, all kinks, counts as not passed)."""
        return self.max_rel_error <= tol

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GradcheckReport(dict):
    """``{tensor name: max relative error}`` plus the full rows in ``results``.

    Names are ``<layer>.<param>`` as in ``model.params()``, and ``"input"`` for dL/dx.
    """

    def __init__(self, results: list[GradcheckResult]):
        super().__init__((r.name, r.max_rel_error) for r in results)
        self.results = results

    def failures(self, tol: float = 1e-6) -> list[str]:
        """Names of tensors whose kink-free error exceeds ``tol``, in model order."""
        return [r.name for r in self.results if not r.passed(tol)]

    @property
    def kinks(self) -> int:
        return sum(r.kinks for r in self.results)

    def table(self, tol: float = 1e-6) -> str:
        """A plain-text table: layer, param, shape, checked, max rel error, kinks, verdict."""
        rows = [("layer", "param", "shape", "checked", "max rel error", "kinks", "")]
        for r in self.results:
            if r.kinks and math.isnan(r.max_rel_error):
                verdict = "kink crossed"
            elif not r.passed(tol):
                verdict = "FAIL"
            else:
                verdict = "ok" + (" (kink crossed)" if r.kinks else "")
            rows.append((r.layer, r.param, "x".join(map(str, r.shape)) or "scalar", str(r.checked),
                         f"{r.max_rel_error:.2e}", str(r.kinks), verdict))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


# -- kink probes -----------------------------------------------------------------------------------
def _positive(layer: Layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x > 0


def _pool_winners(layer: Layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    (ph, pw), (sh, sw) = layer.pool_size, layer.stride
    if hasattr(layer, "pads"):
        pt, pb, pl, pr = layer.pads(x.shape[2], x.shape[3])
        x = torch.nn.functional.pad(x, (pl, pr, pt, pb), value=float("-inf"))
    windows = x.unfold(2, ph, sh).unfold(3, pw, sw)  # (N, C, Ho, Wo, ph, pw)
    return windows.reshape(*windows.shape[:4], ph * pw).argmax(dim=-1)


KINK_PROBES: dict[type, Callable[[Layer, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    ReLU: _positive,
    LeakyReLU: _positive,
    MaxPool2D: _pool_winners,
}


def register_kink_probe(cls: type, probe: Callable[[Layer, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Declare where layers of ``cls`` are not differentiable.

    Args:
        cls: a layer class.
        probe: ``probe(layer, x, y) -> tensor`` whose value changes exactly when the input crosses a kink
            (for ReLU, the mask x > 0).
    """
    KINK_PROBES[cls] = probe


def _probe_for(layer: Layer):
    for cls in type(layer).__mro__:
        if cls in KINK_PROBES:
            return KINK_PROBES[cls]
    return None


def _kink_recorder(record: list[torch.Tensor]):
    """(before_forward hook, after_forward hook) that append each kinked layer's pattern to ``record``."""
    inputs: dict[str, torch.Tensor] = {}

    def before(name, layer, x):
        inputs[name] = x

    def after(name, layer, y):
        x = inputs.pop(name)
        probe = _probe_for(layer)
        if probe is not None:
            record.append(probe(layer, x, y))

    return before, after


def _kinked_names(named_layers) -> list[str]:
    return [name for name, layer in named_layers if _probe_for(layer) is not None]


def _layer_names(layer: Layer, prefix: str = "") -> list[tuple[str, Layer]]:
    found = [(prefix + layer.name, layer)]
    for sub in layer.sublayers():
        found.extend(_layer_names(sub, f"{prefix}{layer.name}."))
    return found


# -- the finite-difference engine ------------------------------------------------------------------
def _choose(analytic: torch.Tensor, max_elements: int | None, gen: torch.Generator) -> torch.Tensor:
    numel = analytic.numel()
    if max_elements is None or numel <= max_elements:
        return torch.arange(numel)
    biggest = int(analytic.detach().abs().reshape(-1).argmax())
    others = torch.randperm(numel, generator=gen)
    others = others[others != biggest][:max_elements - 1]
    return torch.cat([torch.tensor([biggest]), others])


def _compare(evaluate: Callable[[], torch.Tensor], difference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             record: list[torch.Tensor], target: torch.Tensor, eps: float, indices: torch.Tensor):
    """Central differences for the chosen elements of ``target`` (perturbed in place).

    ``evaluate()`` runs the forward; ``difference(plus, minus)`` turns the two runs into L(+eps) - L(-eps).
    """
    diffs, steps, crossed = [], [], []
    for flat_idx in indices.tolist():
        # index by position rather than through a flat view: parameters need not be contiguous
        # (Dense keeps its weight column-major)
        idx = tuple(int(i) for i in np.unravel_index(flat_idx, tuple(target.shape)))
        orig = target[idx].clone()
        up, down = orig + eps, orig - eps
        target[idx] = up
        mark = len(record)
        plus = evaluate()
        sig_plus = record[mark:]
        target[idx] = down
        mark = len(record)
        minus = evaluate()
        sig_minus = record[mark:]
        target[idx] = orig
        diffs.append(difference(plus, minus))
        steps.append(up - down)
        if sig_plus:
            crossed.append(torch.stack([(a != b).any() for a, b in zip(sig_plus, sig_minus)]).any())
        else:
            crossed.append(torch.zeros((), dtype=torch.bool, device=target.device))
        record.clear()
    numeric = (torch.stack(diffs) / torch.stack(steps)).cpu()
    kinked = torch.stack(crossed).cpu()
    return numeric, kinked


def _floor(grads) -> float:
    """FLOOR_FRACTION of the largest |gradient| among ``grads`` (1e-12 when all are zero)."""
    scale = max((float(g.detach().abs().max()) for g in grads if g.numel()), default=0.0)
    return FLOOR_FRACTION * scale if scale > 0 else 1e-12


def _result(layer: str, param: str, analytic: torch.Tensor, numeric: torch.Tensor, kinked: torch.Tensor,
            indices: torch.Tensor, floor: float) -> GradcheckResult:
    a = analytic.detach().reshape(-1).cpu().double()[indices]
    n = numeric.double()
    abs_err = (a - n).abs()
    rel = abs_err / torch.maximum(torch.maximum(a.abs(), n.abs()), torch.tensor(floor, dtype=torch.float64))
    smooth = ~kinked
    worst_index = None
    if smooth.any():
        rel_smooth = torch.where(smooth, rel, torch.tensor(-1.0, dtype=torch.float64))
        pos = int(rel_smooth.argmax())
        max_rel = float(rel_smooth[pos])
        flat_index = int(indices[pos])
        worst_index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), tuple(analytic.shape))) \
            if analytic.dim() else ()
    else:
        max_rel = float("nan")
    return GradcheckResult(layer=layer, param=param, shape=tuple(analytic.shape), checked=int(indices.numel()),
                           max_rel_error=max_rel, max_rel_error_all=float(rel.max()) if rel.numel() else 0.0,
                           max_abs_error=float(abs_err.max()) if abs_err.numel() else 0.0,
                           kinks=int(kinked.sum()), worst_index=worst_index)


def _check_eps(eps: float, max_elements) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if max_elements is not None and (isinstance(max_elements, bool) or not isinstance(max_elements, int)
                                     or max_elements <= 0):
        raise ValueError(f"max_elements must be a positive int or None (check everything), got {max_elements!r}")


# -- public entry points ---------------------------------------------------------------------------
def gradcheck(model, loss, x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6,
              max_elements: int | None = DEFAULT_MAX_ELEMENTS, train: bool = True, seed: int = 0,
              include_input: bool = True) -> GradcheckReport:
    """Check a whole model's explicit backward against float64 central finite differences of its loss.

    Args:
        model: a built ``Sequential`` (not modified: the check runs on a float64 deep copy).
        loss: a loss object, ``loss(outputs, y) -> (value, doutputs)`` (e.g. ``SoftmaxCrossEntropy()``).
        x: inputs (N, *input_shape).
        y: targets for the loss (labels (N,) or a tensor like the outputs).
        eps: finite-difference step.
        max_elements: elements checked per tensor (see the module docstring); None checks all.
        train: run the layers in training mode (batch statistics, dropout with a frozen mask).
        seed: seeds the choice of sampled elements.
        include_input: also check dL/dx under the name ``"input"``.

    Returns:
        A ``GradcheckReport``: {``<layer>.<param>`` or ``"input"``: max relative error}, with per-tensor
        rows (shape, elements checked, kinks crossed...) in ``.results`` and a printable ``.table()``.
    """
    _check_eps(eps, max_elements)
    model = copy.deepcopy(model)
    model.to(dtype=torch.float64)
    device = model.device
    x = x.detach().to(device=device, dtype=torch.float64).clone(memory_format=torch.contiguous_format)
    if y.is_floating_point():
        y = y.detach().to(device=device, dtype=torch.float64)
    else:
        y = y.to(device)
    record: list[torch.Tensor] = []
    before, after = _kink_recorder(record)
    for name in _kinked_names(model.all_layers()):  # their own inputs and outputs: fused nodes split there
        model.register_hook("before_forward", before, layer=name)
        model.register_hook("after_forward", after, layer=name)
    rng = rng_states(model)
    model.set_input_grad(include_input)

    def run_forward():
        set_rng_states(model, rng)
        return model.forward(x, train=train)

    out = run_forward()
    _, dout = loss(out, y)
    dx = model.backward(dout)
    record.clear()
    analytic = [(name, tensor, grad.clone()) for (name, tensor), (_, grad)
                in zip(model.params().items(), model.grads().items())]
    if include_input:
        analytic.insert(0, ("input", x, dx.clone()))

    def evaluate():
        value, _ = loss(run_forward(), y)
        return value

    gen = torch.Generator().manual_seed(int(seed))
    floor = _floor([grad for _, _, grad in analytic])
    results = []
    for name, tensor, grad in analytic:
        indices = _choose(grad, max_elements, gen)
        numeric, kinked = _compare(evaluate, torch.sub, record, tensor, eps, indices)
        layer_name, _, param = name.rpartition(".")
        if name == "input":
            layer_name, param = "input", "input"
        results.append(_result(layer_name, param, grad, numeric, kinked, indices, floor))
    model.clear_cache()
    return GradcheckReport(results)


def check_layer(layer: Layer, input_shape, batch_size: int = 2, train: bool = True,
                x: torch.Tensor | None = None, eps: float = 1e-6,
                max_elements: int | None = DEFAULT_MAX_ELEMENTS, seed: int = 0, device="cpu",
                upstream: torch.Tensor | None = None) -> list[GradcheckResult]:
    """Check one layer's backward with the scalar loss L = sum(layer(x) * R), R random, in float64.

    Args:
        layer: the layer (built or not; a float64 deep copy is checked, built here with ``seed`` if needed).
        input_shape: per-sample input shape (C, H, W) or (features,).
        batch_size: N of the random input.
        train: training mode (batch statistics, frozen dropout mask) or evaluation mode.
        x: optional input (N, *input_shape), e.g. drawn away from kinks; random normal by default.
        eps, max_elements, seed: as in ``gradcheck``; ``seed`` also draws x, R and the parameters.
        device: where to run.
        upstream: optional R (the upstream gradient dL/dy); random normal by default.

    Returns:
        One ``GradcheckResult`` per tensor: the input first (param ``"input"``, name ``"input"``), then the
        parameters, nested layers included (``layer`` is the qualified name of the layer owning them).
    """
    _check_eps(eps, max_elements)
    if not isinstance(layer, Layer):
        raise TypeError(f"check_layer takes a convdescent layer, got {type(layer).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    gen = torch.Generator().manual_seed(int(seed))
    layer = copy.deepcopy(layer)
    if layer.name is None:
        layer.name = layer.kind
    if layer.built:
        layer.to(device=device, dtype=torch.float64)
    else:
        layer.build(tuple(input_shape), generator=gen, dtype=torch.float64, device=device)
    shape = (batch_size,) + tuple(input_shape)
    if x is None:
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    else:
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise ValueError(f"x must have shape (N, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}")
        x = x.detach().to(device=device, dtype=torch.float64).clone(memory_format=torch.contiguous_format)
    record: list[torch.Tensor] = []
    named = _layer_names(layer)
    everything = [sub for _, sub in named]
    hooks = Hooks()
    before, after = _kink_recorder(record)
    for name in _kinked_names(named):
        hooks.add("before_forward", before, name)
        hooks.add("after_forward", after, name)
    # the layer alone as a plan, so nested layers (a Residual's) report their kinks through the same hooks
    plan = compile_plan([layer], hooks, fusion=False, chunk_size=0)
    rng = rng_states(layer)
    layer.needs_input_grad = True

    def run_forward():
        set_rng_states(layer, rng)
        for sub in everything:
            sub.training = train
        return plan.forward(x, train)

    out = run_forward()
    if upstream is None:
        r = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    else:
        if tuple(upstream.shape) != tuple(out.shape):
            raise ValueError(f"upstream must have the output's shape {tuple(out.shape)}, got {tuple(upstream.shape)}")
        r = upstream.detach().to(device=device, dtype=torch.float64)
    dx = plan.backward(r)
    record.clear()
    targets = [("input", "input", x, dx.clone())]
    for (name, tensor), (_, grad) in zip(layer.named_params(), layer.named_grads()):
        owner, _, param = name.rpartition(".")  # owner is "" for the layer's own parameters
        targets.append((owner, param, tensor, grad.clone()))

    def difference(plus, minus):
        # sum((y+ - y-) * R) instead of sum(y+ R) - sum(y- R): outputs the perturbation does not reach cancel
        # exactly, so the rounding error of the whole sum does not swamp the difference.
        return ((plus - minus) * r).sum()

    floor = _floor([grad for _, _, _, grad in targets])
    results = []
    for owner, param, tensor, grad in targets:
        qualified = f"{layer.name}.{owner}" if owner and param != "input" else layer.name
        indices = _choose(grad, max_elements, gen)
        # clone: an output may be a view of the input (Flatten), which the next perturbation would change
        numeric, kinked = _compare(lambda: run_forward().clone(), difference, record, tensor, eps, indices)
        results.append(_result(qualified, param, grad, numeric, kinked, indices, floor))
    plan.clear_cache()
    return results


def check_model_layers(model, batch_size: int = 2, train: bool = True, eps: float = 1e-6,
                       max_elements: int | None = DEFAULT_MAX_ELEMENTS, seed: int = 0) -> list[GradcheckResult]:
    """Run ``check_layer`` on every top-level layer of a built model, with its real input shape.

    Returns:
        The rows of all layers in model order (parameters by their model names, e.g. ``conv1.weight``).
    """
    model._require_built()
    rows: list[GradcheckResult] = []
    for layer in model.layers:
        rows.extend(check_layer(layer, layer.input_shape, batch_size=batch_size, train=train, eps=eps,
                                max_elements=max_elements, seed=seed, device=model.device))
    return rows
