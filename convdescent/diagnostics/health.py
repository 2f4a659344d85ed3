"""Gradient-health monitor: per-layer gradient, update and activation figures every N steps, with rules.

Every ``every`` optimizer steps the monitor records, for each parameter tensor,

- the gradient norm ||g||, the largest and the smallest |g| element,
- the update-to-weight ratio ||delta theta|| / ||theta|| of the step (about 1e-3 is healthy; the update
  is measured as the change of the weights, so it is exactly what the optimizer applied),
- the fraction of gradient elements that the optimizer's clipping changed,

and for each layer the mean and standard deviation of its output and, for ReLU layers, the fraction of
units that are dead on the whole batch (zero for every example). Rules read these figures and warn,
each warning naming the figure that set it off and a remedy:

    vanishing_gradients   a weight's gradient norm under ``vanish_threshold`` for ``patience`` checks running
    exploding_gradients   the global gradient norm over ``explode_threshold``, growing more than
                          ``explode_factor`` times from one check to the next, or not finite
    update_ratio          a weight's update-to-weight ratio outside ``ratio_range`` for ``patience`` checks
    dead_relus            more than ``dead_threshold`` of a ReLU layer's units dead for ``patience`` checks
    loss_plateau          the mean loss of the last ``plateau_window`` checks less than ``plateau_tol``
                          (relative) below that of the ``plateau_window`` checks before

Cost: the monitor does nothing on other steps. On a monitored step it hooks the layers' forward (``model.register_hook``)
for that step only, computes its figures on the device and reads them back with a single host sync.
``benchmarks/monitor_overhead.py`` measures the cost against a run without the monitor.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import torch

from .. import native
from ..layers.activations import ReLU
from ..layers.conv import Conv2D
from ..optim import peak_magnitudes
from ..train.callbacks import Callback

# Layer kinds whose outputs are summarized (activation mean/std); pure reshapes and dropout are skipped.
_SKIP_KINDS = {"flatten", "dropout"}
_STDERR: Any = object()  # "print to whatever sys.stderr is when a warning comes"

REMEDIES = {
    "vanishing_gradients": "use ReLU-family activations instead of sigmoid/tanh, He or Glorot initialization, "
                           "batch normalization or residual connections; a shallower network also helps",
    "exploding_gradients": "lower the learning rate (try 10x lower), clip gradients (e.g. --clip-norm 1.0), "
                           "or add batch normalization",
    "update_ratio_high": "updates are large next to the weights: lower the learning rate about {factor} times",
    "update_ratio_low": "updates are tiny next to the weights: raise the learning rate about {factor} times, "
                        "or check for vanishing gradients",
    "dead_relus": "lower the learning rate, use LeakyReLU, He initialization, or batch normalization before "
                  "the ReLU",
    "loss_plateau": "the loss stopped improving: decay the learning rate (a schedule or ReduceOnPlateau), or "
                    "raise it if the loss never went down; check that inputs and labels match",
}


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if v == 0 or (1e-3 <= abs(v) < 1e4):
        return f"{v:.4g}"
    return f"{v:.2e}"


# -- clipping: which fraction of gradient elements did the optimizer's clippers change ---------------------

@dataclass(frozen=True)
class ClipSpec:
    """One clipping transform of an optimizer, as read from its description.

    Attributes:
        kind: "value", "global_norm", "norm" (per tensor) or "agc" (unit-wise, Brock et al. 2021).
        bound: clip_value, max_norm, or the AGC clipping factor.
        eps: AGC's floor on the weight norm.
        exclude: AGC's excluded parameter names.
    """

    kind: str
    bound: float
    eps: float = 1e-3
    exclude: tuple = ()


def clip_specs(optimizer) -> list[ClipSpec]:
    """The clipping transforms inside an optimizer built by ``convdescent.optim`` (empty if none or unknown)."""
    if optimizer is None:
        return []
    try:
        from ..optim.base import walk_infos
    except ImportError:  # optimizers from elsewhere: no clipping to report
        return []
    specs = []
    for info in walk_infos(optimizer):
        kw = info.kwargs or {}
        if info.name == "clip_by_value":
            specs.append(ClipSpec("value", float(kw["clip_value"])))
        elif info.name == "clip_by_global_norm":
            specs.append(ClipSpec("global_norm", float(kw["max_norm"])))
        elif info.name == "clip_by_norm":
            specs.append(ClipSpec("norm", float(kw["max_norm"])))
        elif info.name == "adaptive_grad_clip":
            specs.append(ClipSpec("agc", float(kw["clipping"]), float(kw.get("eps", 1e-3)),
                                  tuple(kw.get("exclude", ()))))
    return specs


def clipped_fractions(names, grads, params, norms, specs: list[ClipSpec]) -> list[torch.Tensor]:
    """Per tensor, the fraction of gradient elements a clipper changes (measured on the unclipped gradients).

    With several clippers the largest fraction counts. Global and per-tensor norm clipping rescale whole
    tensors, so their fraction is 0 or 1.

    Returns:
        list of 0-d float tensors, one per name.
    """
    out = [torch.zeros((), dtype=torch.float32, device=g.device) for g in grads]
    if not specs:
        return out
    total = None
    for spec in specs:
        for i, (name, g) in enumerate(zip(names, grads)):
            if spec.kind == "value":
                frac = (g.abs() > spec.bound).float().mean()
            elif spec.kind == "global_norm":
                if total is None:
                    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
                frac = (total > spec.bound).float()
            elif spec.kind == "norm":
                frac = (norms[i] > spec.bound).float()
            else:  # agc: units whose gradient norm exceeds clipping * max(||W_unit||, eps)
                if name in spec.exclude:
                    continue
                if g.dim() <= 1:
                    gn, wn = g.norm(), params[i].norm()
                    frac = (gn > spec.bound * wn.clamp_min(spec.eps)).float()
                else:
                    gn = g.flatten(1).norm(dim=1)
                    wn = params[i].flatten(1).norm(dim=1)
                    frac = (gn > spec.bound * wn.clamp_min(spec.eps)).float().mean()
            out[i] = torch.maximum(out[i], frac.float())
    return out


# -- activations: hooks on monitored steps only -----------------------------------------------------

class ActivationProbe:
    """Collects output statistics of chosen layers during training forwards, through after_forward hooks.

    ``arm()`` registers one read-only hook per layer on the model (``split=False``: the plan keeps its fused
    nodes); ``disarm()`` pauses them, so unmonitored steps run the plan without hooks, and the next ``arm()``
    resumes them (the model keeps the plan compiled for them); ``close()`` removes them. A layer inside a fused
    node writes no output of its own there (the conv of a conv+ReLU+pool pass never writes its map): when such
    a node has run, the probe runs the node's layers one by one on the node's input to read their outputs,
    the values they give when the plan runs them apart, and puts their caches back as the node left them
    (cheaper than splitting the node for the whole step: a check step of the tutorial's CNN at batch 32 took
    6.8 ms against 9.2 ms split). Where the watched members are a fused node's conv and the ReLU right after
    it, one native pass over the node's input computes their figures without writing either map instead
    (``_conv_figures``: 1.7 against 3.5 ms for the tutorial's CNN at batch 128). A forward may reach a layer in
    several chunks (a chunked stage of the plan), so sums are accumulated.
    """

    def __init__(self, model):
        self.model = model
        self.layers = []
        for name, layer in model.all_layers():
            if layer.sublayers() or layer.kind in _SKIP_KINDS:
                continue
            if not layer.params and layer.kind not in ("relu", "leaky_relu", "tanh", "sigmoid", "act"):
                continue  # pooling, reshapes: nothing new to say about the distribution
            self.layers.append((name, layer))
        self.armed = False
        self._handles: list = []
        self._spec: tuple | None = None  # what the registered (maybe paused) hooks are: (event, layer, role)
        self._acc: dict[str, list] = {}
        # a fused node's output layer -> (its input layer, its members, the watched members inside it)
        self._replays: dict[str, tuple[str, list, set]] = {}
        self._inputs: dict[str, torch.Tensor] = {}

    def arm(self) -> None:
        if self.armed:
            return
        self._acc, self._inputs = {}, {}
        watched = {name for name, _ in self.layers}
        self._replays = {}
        for node in self.model.plan().walk():
            inside = {name for name, _ in node.members if name in watched and name != node.output_of}
            if inside:
                self._replays[node.output_of] = (node.input_of, list(node.members), inside)
        spec = tuple([("after_forward", name, self._on_forward) for name, _ in self.layers]
                     + [entry for output, (first, _, _) in self._replays.items()
                        for entry in (("before_forward", first, self._on_node_input),
                                      ("after_forward", output, self._on_node_output))])
        if spec == self._spec:  # the same hooks as at the last check: resume them
            for handle in self._handles:
                handle.resume()
        else:
            self.close()
            self._handles = [self.model.register_hook(event, fn, layer=name, split=False) for event, name, fn in spec]
            self._spec = spec
        self.armed = True

    def disarm(self) -> None:
        """Pause the hooks until the next ``arm()``."""
        if not self.armed:
            return
        for handle in self._handles:
            handle.pause()
        self._inputs = {}
        self.armed = False

    def close(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._spec, self._inputs = [], None, {}
        self.armed = False

    def _on_forward(self, name: str, layer, y: torch.Tensor) -> None:
        if layer.training:  # evaluation forwards say nothing about the training step
            self._record(name, y, isinstance(layer, ReLU))

    def _on_node_input(self, name: str, layer, x: torch.Tensor) -> None:
        if layer.training:
            self._inputs[name] = x  # read by _on_node_output, right after the node, before anything else runs

    @torch.no_grad()
    def _on_node_output(self, name: str, layer, y: torch.Tensor) -> None:
        """A fused node with watched layers inside has run: its layers, one by one, on the node's input."""
        first, members, inside = self._replays[name]
        x = self._inputs.pop(first, None)
        if x is None or not layer.training:
            return
        if self._conv_figures(members, inside, x):
            return
        saved = [member.take_cache() for _, member in members]
        todo = set(inside)
        try:
            for member_name, member in members:
                x = member.forward(x, True)
                if member_name in todo:
                    self._record(member_name, x, isinstance(member, ReLU))
                    todo.discard(member_name)
                    if not todo:
                        break
        finally:
            for (_, member), cache in zip(members, saved):
                member.put_cache(cache)

    def _conv_figures(self, members, inside, x: torch.Tensor) -> bool:
        """The figures of a fused node's first conv and of a ReLU right after it, when those are the node's
        only watched members, from one native pass over the node's input that writes neither output map
        (``cd_conv_stats``); False where that does not apply (the caller replays the layers). Their values
        differ from the replay's at float rounding (other summation orders; the sums are kept in double)."""
        conv_name, conv = members[0]
        relu_name = members[1][0] if len(members) > 1 and type(members[1][1]) is ReLU else None
        if (type(conv) is not Conv2D or not conv.plain() or inside - {conv_name, relu_name}
                or conv_name not in inside or x.dim() != 4 or tuple(x.shape[1:]) != conv.input_shape):
            return False
        weight = conv.params["weight"]
        fn = native.kernel("cd_conv_stats", x, weight)
        if fn is None:
            return False
        xp, ((n, _, _, _), _, (ho, wo)) = conv.padded(x)
        f = conv.filters
        w = weight.reshape(f, -1).contiguous()
        bias = conv.params["bias"].contiguous() if conv.use_bias else None
        sums = torch.empty(4, dtype=torch.float64)
        unit_max = torch.empty((f, ho, wo), dtype=x.dtype) if relu_name in inside else None
        failed = fn(xp.data_ptr(), w.data_ptr(), bias.data_ptr() if bias is not None else None, n, f,
                    conv.in_channels, *conv.kernel_size, *xp.stride(), ho, wo, *conv.stride, sums.data_ptr(),
                    unit_max.data_ptr() if unit_max is not None else None, native.threads())
        if failed:  # out of memory for the kernel's buffers: the replay runs instead
            return False
        count = n * f * ho * wo
        self._add(conv_name, sums[0], sums[1], count, None)
        if unit_max is not None:
            self._add(relu_name, sums[2], sums[3], count, unit_max)
        return True

    @torch.no_grad()
    def _record(self, name: str, y: torch.Tensor, relu: bool) -> None:
        flat = y.reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        # the sum of squares as a dot product: one pass and no temporary (about 10x faster than (y * y).sum()
        # on a batch-32 conv output on the CPU)
        self._add(name, flat.sum(), torch.dot(flat, flat), y.numel(), y.amax(dim=0) if relu else None)

    def _add(self, name: str, s: torch.Tensor, ss: torch.Tensor, n: int, unit_max: torch.Tensor | None) -> None:
        """Accumulate one output's sum, sum of squares, element count and (a ReLU's) per-unit maximum."""
        relu = unit_max is not None
        acc = self._acc.get(name)
        if acc is None:
            self._acc[name] = [s, ss, n, unit_max]
        else:
            acc[0] = acc[0] + s
            acc[1] = acc[1] + ss
            acc[2] += n
            if relu:
                acc[3] = torch.maximum(acc[3], unit_max)

    def take(self, parallel=None) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(name, mean, std, dead fraction or None) per layer seen since ``arm``, as 0-d tensors; resets.

        With ``parallel`` (a data-parallel run's ``DataParallel``, on every rank at once) the sums and the
        per-unit maxima are taken over the global batch first.
        """
        if parallel is not None and self._acc:
            self._reduce(parallel)
        out = []
        order = [name for name, _ in self.layers if name in self._acc]
        for name, (s, ss, n, unit_max) in ((k, self._acc[k]) for k in order):
            mean = s / n
            var = (ss / n - mean * mean).clamp_min(0.0)
            # a unit is dead when its output is zero for every example of the batch
            dead = None if unit_max is None else (unit_max <= 0).float().mean()
            out.append((name, mean, var.sqrt(), dead))
        self._acc = {}
        return out


    def _reduce(self, parallel) -> None:
        names = list(self._acc)
        sums = [torch.stack([torch.as_tensor(self._acc[k][0], dtype=torch.float64).cpu(),
                             torch.as_tensor(self._acc[k][1], dtype=torch.float64).cpu(),
                             torch.tensor(float(self._acc[k][2]), dtype=torch.float64)]) for k in names]
        sums = parallel.sum_tensors(sums, "the health check's activation figures")
        maxima = [self._acc[k][3] for k in names if self._acc[k][3] is not None]
        maxima = iter(parallel.max_tensors(maxima, "the health check's activation figures"))
        for k, total in zip(names, sums):
            acc = self._acc[k]
            acc[0], acc[1], acc[2] = total[0], total[1], float(total[2])
            if acc[3] is not None:
                acc[3] = next(maxima)


# -- rules -------------------------------------------------------------------------------------------------

class HealthRules:
    """The warning rules, fed one health record at a time; each condition warns once until it clears.

    Args: see ``HealthMonitor``.
    """

    def __init__(self, vanish_threshold: float = 1e-7, explode_threshold: float = 1e4, explode_factor: float = 10.0,
                 ratio_range: tuple[float, float] = (1e-4, 1e-2), dead_threshold: float = 0.5, patience: int = 3,
                 plateau_window: int = 10, plateau_tol: float = 0.01):
        if not vanish_threshold > 0:
            raise ValueError(f"vanish_threshold must be positive, got {vanish_threshold!r}")
        if not explode_threshold > 0:
            raise ValueError(f"explode_threshold must be positive, got {explode_threshold!r}")
        if not explode_factor > 1:
            raise ValueError(f"explode_factor must be greater than 1, got {explode_factor!r}")
        lo, hi = ratio_range
        if not 0 < lo < hi:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low < high, got {ratio_range!r}")
        if not 0 < dead_threshold <= 1:
            raise ValueError(f"dead_threshold must be a fraction in (0, 1], got {dead_threshold!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int (checks running), got {patience!r}")
        if isinstance(plateau_window, bool) or not isinstance(plateau_window, int) or plateau_window < 1:
            raise ValueError(f"plateau_window must be a positive int (checks), got {plateau_window!r}")
        if not 0 <= plateau_tol < 1:
            raise ValueError(f"plateau_tol must be a relative improvement in [0, 1), got {plateau_tol!r}")
        self.vanish_threshold = float(vanish_threshold)
        self.explode_threshold = float(explode_threshold)
        self.explode_factor = float(explode_factor)
        self.ratio_range = (float(lo), float(hi))
        self.dead_threshold = float(dead_threshold)
        self.patience = patience
        self.plateau_window = plateau_window
        self.plateau_tol = float(plateau_tol)
        self._streaks: dict[tuple[str, str], int] = {}
        self._active: set[tuple[str, str]] = set()
        self._prev_norm: float | None = None
        self._losses: deque = deque(maxlen=2 * plateau_window)

    def set_plateau_window(self, checks: int) -> None:
        """Change the plateau window (checks per window), keeping the most recent losses."""
        if isinstance(checks, bool) or not isinstance(checks, int) or checks < 1:
            raise ValueError(f"plateau_window must be a positive int (checks), got {checks!r}")
        self.plateau_window = checks
        self._losses = deque(self._losses, maxlen=2 * checks)

    def config(self) -> dict[str, Any]:
        return {"vanish_threshold": self.vanish_threshold, "explode_threshold": self.explode_threshold,
                "explode_factor": self.explode_factor, "ratio_range": list(self.ratio_range),
                "dead_threshold": self.dead_threshold, "patience": self.patience,
                "plateau_window": self.plateau_window, "plateau_tol": self.plateau_tol}

    def _track(self, key: tuple[str, str], bad: bool, needed: int) -> bool:
        """Count consecutive bad checks; True exactly when the streak first reaches ``needed``."""
        if not bad:
            self._streaks.pop(key, None)
            self._active.discard(key)
            return False
        self._streaks[key] = self._streaks.get(key, 0) + 1
        if self._streaks[key] >= needed and key not in self._active:
            self._active.add(key)
            return True
        return False

    def evaluate(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """Warnings set off by one ``type == "health"`` record (see ``HealthMonitor``)."""
        step = record["step"]
        found = []

        def warn(rule, where, value, threshold, message, remedy_key=None, **fmt):
            remedy = REMEDIES[remedy_key or rule].format(**fmt)
            found.append({"type": "health_warning", "step": step, "rule": rule, "where": where,
                          "value": value, "threshold": threshold, "message": message, "remedy": remedy})

        params = record["params"]
        weights = {k: v for k, v in params.items() if v.get("ndim", 2) >= 2}

        # exploding: the global norm, too large, growing too fast, or not finite
        gnorm = record["grad_norm"]
        worst = max(params, key=lambda k: params[k]["grad_norm"] if math.isfinite(params[k]["grad_norm"])
                    else math.inf) if params else "-"
        if not math.isfinite(gnorm):
            bad, msg, thr = True, f"gradient norm is not finite ({_fmt(gnorm)}); worst tensor {worst}", None
        elif gnorm > self.explode_threshold:
            bad, thr = True, self.explode_threshold
            msg = (f"global gradient norm {_fmt(gnorm)} is above {_fmt(thr)} "
                   f"(largest: {worst} at {_fmt(params[worst]['grad_norm'])})")
        elif self._prev_norm is not None and self._prev_norm > 0 and gnorm > self.explode_factor * self._prev_norm:
            bad, thr = True, self.explode_factor
            msg = (f"global gradient norm grew {_fmt(gnorm / self._prev_norm)}x in one check "
                   f"({_fmt(self._prev_norm)} -> {_fmt(gnorm)}; more than {_fmt(thr)}x), largest in {worst}")
        else:
            bad, msg, thr = False, "", None
        if self._track(("exploding_gradients", "model"), bad, 1):
            warn("exploding_gradients", worst, gnorm, thr, msg)
        self._prev_norm = gnorm if math.isfinite(gnorm) else self._prev_norm

        # per-tensor rules: firings of one rule in one check are merged into a single warning
        fired: dict[str, list[tuple[str, float]]] = {}
        lo, hi = self.ratio_range
        for name, st in weights.items():
            n = st["grad_norm"]
            if self._track(("vanishing_gradients", name), math.isfinite(n) and n < self.vanish_threshold,
                           self.patience):
                fired.setdefault("vanishing_gradients", []).append((name, n))
            r = st.get("update_ratio")
            if r is None or not math.isfinite(r):
                continue
            if self._track(("update_ratio_high", name), r > hi, self.patience):
                fired.setdefault("update_ratio_high", []).append((name, r))
            if self._track(("update_ratio_low", name), r < lo, self.patience):
                fired.setdefault("update_ratio_low", []).append((name, r))
        for name, st in record.get("layers", {}).items():
            dead = st.get("dead_frac")
            if dead is not None and self._track(("dead_relus", name), dead > self.dead_threshold, self.patience):
                fired.setdefault("dead_relus", []).append((name, dead))

        def listing(items, fmt):
            shown = ", ".join(f"{n} {fmt(v)}" for n, v in items[:4])
            return shown + (f" and {len(items) - 4} more" if len(items) > 4 else "")

        running = f"for {self.patience} checks running"
        if "vanishing_gradients" in fired:
            items = sorted(fired["vanishing_gradients"], key=lambda t: t[1])
            warn("vanishing_gradients", ", ".join(n for n, _ in items), items[0][1], self.vanish_threshold,
                 f"gradient norm under {_fmt(self.vanish_threshold)} {running}: {listing(items, _fmt)}")
        if "update_ratio_high" in fired:
            items = sorted(fired["update_ratio_high"], key=lambda t: -t[1])
            warn("update_ratio", ", ".join(n for n, _ in items), items[0][1], hi,
                 f"update-to-weight ratio above {_fmt(hi)} {running} (healthy: about 1e-3): "
                 f"{listing(items, _fmt)}", "update_ratio_high", factor=_fmt(items[0][1] / 1e-3))
        if "update_ratio_low" in fired:
            items = sorted(fired["update_ratio_low"], key=lambda t: t[1])
            worst = items[-1][1]  # the least extreme one: raising the rate this much helps them all
            warn("update_ratio", ", ".join(n for n, _ in items), items[0][1], lo,
                 f"update-to-weight ratio below {_fmt(lo)} {running} (healthy: about 1e-3): "
                 f"{listing(items, _fmt)}", "update_ratio_low",
                 factor=_fmt(1e-3 / worst) if worst > 0 else "many")
        if "dead_relus" in fired:
            items = sorted(fired["dead_relus"], key=lambda t: -t[1])
            warn("dead_relus", ", ".join(n for n, _ in items), items[0][1], self.dead_threshold,
                 f"more than {self.dead_threshold:.0%} of the units dead (zero for every example of the batch) "
                 f"{running}: {listing(items, lambda v: f'{v:.0%}')}")

        loss = record.get("loss")
        if loss is not None and math.isfinite(loss):
            self._losses.append(loss)
            w = self.plateau_window
            flat = False
            if len(self._losses) == 2 * w:
                seq = list(self._losses)
                before, last = sum(seq[:w]) / w, sum(seq[w:]) / w
                gain = (before - last) / abs(before) if before else 0.0
                flat = gain < self.plateau_tol
            if self._track(("loss_plateau", "model"), flat, 1):
                # judge the next plateau on fresh windows, so noise around the tolerance cannot repeat it
                self._losses.clear()
                change = f"{gain:.2%} below" if gain >= 0 else f"{-gain:.2%} above"
                warn("loss_plateau", "loss", gain, self.plateau_tol,
                     f"mean loss over the last {w} checks is {_fmt(last)}, {change} the {w} checks before "
                     f"({_fmt(before)}); an improvement under {self.plateau_tol:.0%}")
        return found


# -- the callback -------------------------------------------------------------------------------------------

class HealthMonitor(Callback):
    """Training callback that records per-layer gradient health every ``every`` steps and warns.

    Works with ``convdescent.train.fit`` (hooks ``on_train_begin``, ``wants_grads``, ``on_gradients``,
    ``on_step_end``, ``on_train_end``). Each check makes one record

        {"type": "health", "step", "epoch", "loss", "step_loss", "grad_norm" (global),
         "params": {name: {"grad_norm", "grad_max", "grad_min", "weight_norm", "update_norm",
                           "update_ratio", "clip_frac", "ndim"}},
         "layers": {name: {"act_mean", "act_std", "dead_frac" (ReLU layers only)}}}

    and each warning one record ``{"type": "health_warning", "step", "rule", "where", "value", "threshold",
    "message", "remedy"}``. Records go to the run's metrics.jsonl (through the trainer's ``MetricsWriter``,
    or ``sink``) and stay in ``records`` / ``warnings``; warnings are also printed. ``loss`` is the mean
    training loss over the steps since the previous check (``step_loss``: the checked batch's own loss).

    Steps count updates from 1, as the trainer does: with ``every=50`` steps 50, 100, ... are checked.

    Args:
        every: steps between checks (a check costs a few passes over the parameters and activations).
        vanish_threshold: gradient norm under which a weight's gradient counts as vanished.
        explode_threshold: global gradient norm over which gradients count as exploding.
        explode_factor: growth of the global gradient norm between two checks that counts as exploding.
        ratio_range: healthy (low, high) update-to-weight ratio of weight tensors.
        dead_threshold: fraction of dead units of a ReLU layer that raises a warning.
        patience: checks running a condition must hold before it warns (vanishing, ratio, dead units).
        plateau_window: checks per window of the plateau rule; None (the default): an epoch's worth of
            checks, at least 10. Windows shorter than an epoch compare different stretches of one pass over
            the data, whose losses differ by a few percent in a run that still improves by 10% an epoch,
            and so raised false plateau warnings.
        plateau_tol: smallest relative improvement between windows that is not a plateau.
        activations: also record activation statistics (hooks the forward on monitored steps).
        stream: where warnings are printed (default: sys.stderr at the time of printing; None: not printed).
        sink: callable receiving every record; default: the ``write`` of the trainer's ``MetricsWriter``.
    """

    state_key = "health_monitor"

    def __init__(self, every: int = 50, *, vanish_threshold: float = 1e-7, explode_threshold: float = 1e4,
                 explode_factor: float = 10.0, ratio_range=(1e-4, 1e-2), dead_threshold: float = 0.5,
                 patience: int = 3, plateau_window: int | None = None, plateau_tol: float = 0.01,
                 activations: bool = True, stream: TextIO | None = _STDERR, sink: Callable[[dict], None] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        self.every = every
        self.auto_plateau_window = plateau_window is None
        self.rules = HealthRules(vanish_threshold, explode_threshold, explode_factor, tuple(ratio_range),
                                 dead_threshold, patience, 10 if plateau_window is None else plateau_window,
                                 plateau_tol)
        self.activations = bool(activations)
        self.stream = stream
        self.sink = sink
        self.records: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        self._probe: ActivationProbe | None = None
        self._clips: list[ClipSpec] = []
        self._pending: dict[str, Any] | None = None
        self._loss_mark: tuple | None = None  # (epoch, running loss sum, examples seen) at the last check

    # -- hooks -------------------------------------------------------------------------------------
    def wants_grads(self, step: int) -> bool:
        """True on monitored steps: update numbers (from 1) that are multiples of ``every``."""
        return step % self.every == 0

    def on_train_begin(self, trainer) -> None:
        loader = getattr(trainer, "loader", None)
        if self.auto_plateau_window and loader is not None:
            self.rules.set_plateau_window(max(10, loader.steps_per_epoch // self.every))
        if self._probe is not None:  # a run before this one that did not end: its hooks go
            self._probe.close()
        self._probe = ActivationProbe(trainer.model) if self.activations else None
        self._clips = clip_specs(getattr(trainer, "optimizer", None))
        self._pending = None
        self._loss_mark = None
        self._writer = None
        if self.sink is None:
            from ..train.callbacks import MetricsWriter

            writers = [cb for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, MetricsWriter)]
            self._writer = writers[0].write if writers else None
        self._arm_for(_current_step(trainer) + 1)

    def _arm_for(self, step: int) -> None:
        if self._probe is not None and self.wants_grads(step):
            self._probe.arm()

    @torch.no_grad()
    def on_gradients(self, trainer, step: int, grads: dict, params: dict) -> None:
        names = list(grads)
        g = [grads[k] for k in names]
        p = [params[k] for k in names]
        norms = torch._foreach_norm(g)
        maxs = peak_magnitudes(g)
        mins = [t.abs().amin() for t in g]
        clips = clipped_fractions(names, g, p, norms, self._clips)
        acts = self._probe.take(getattr(trainer, "parallel", None)) if self._probe is not None else []
        if self._probe is not None:
            self._probe.disarm()
        # weights before the update: the step's update is read as the change it makes
        before = [t.detach().clone() for t in p]
        wnorms = torch._foreach_norm(before)
        self._pending = {"step": step, "names": names, "ndims": [t.dim() for t in g], "params": p,
                         "before": before, "wnorms": wnorms, "grad": [norms, maxs, mins, clips], "acts": acts}

    def on_step_end(self, trainer, step: int, logs: dict | None = None) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            with torch.no_grad():
                self._finish(trainer, pending, logs or {})
        self._arm_for(step + 1)  # when the next step is monitored, collect its activations

    def on_train_end(self, trainer) -> None:
        if self._probe is not None:
            self._probe.close()

    def on_event(self, trainer, event: dict) -> None:
        if event.get("event") == "rollback":
            # the trainer went back to an earlier state: drop what was half collected
            self._pending = None
            if self._probe is not None:
                self._probe.disarm()
                self._probe.take()
            self._arm_for(_current_step(trainer) + 1)

    def state_dict(self) -> dict:
        """The rules' running state (streaks, last norm, recent losses), so a resumed run carries on."""
        r = self.rules
        return {"streaks": {f"{a}|{b}": n for (a, b), n in r._streaks.items()},
                "active": sorted(f"{a}|{b}" for a, b in r._active),
                "prev_norm": r._prev_norm, "losses": list(r._losses),
                "loss_mark": None if self._loss_mark is None else list(self._loss_mark)}

    def load_state_dict(self, state: dict) -> None:
        r = self.rules
        r._streaks = {tuple(k.split("|", 1)): int(v) for k, v in state.get("streaks", {}).items()}
        r._active = {tuple(k.split("|", 1)) for k in state.get("active", [])}
        r._prev_norm = state.get("prev_norm")
        r._losses.clear()
        r._losses.extend(float(v) for v in state.get("losses", []))
        mark = state.get("loss_mark")
        self._loss_mark = None if mark is None else (int(mark[0]), float(mark[1]), int(mark[2]))

    # -- the check ---------------------------------------------------------------------------------
    def _finish(self, trainer, pending: dict, logs: dict) -> None:
        names, p, before, wnorms = pending["names"], pending["params"], pending["before"], pending["wnorms"]
        torch._foreach_sub_(before, p)  # the copy becomes the step's change (its sign does not matter)
        unorms = torch._foreach_norm(before)
        norms, maxs, mins, clips = pending["grad"]
        acts = pending["acts"]
        figures = [*norms, *maxs, *mins, *clips, *unorms, *wnorms]
        for _, mean, std, dead in acts:
            figures += [mean, std, dead if dead is not None else torch.zeros(())]
        device = figures[0].device if figures else torch.device("cpu")
        # the step's own loss, and the trainer's running loss sum of the epoch (for the interval mean)
        extra = [logs.get("loss"), logs.get("epoch_loss_sum")]
        present = [isinstance(v, (torch.Tensor, int, float)) and not isinstance(v, bool) for v in extra]
        figures += [torch.as_tensor(v, device=device) for v, ok in zip(extra, present) if ok]
        if device.type == "cpu":  # nothing to wait for: read each figure (50 conversions cost 0.5 ms, this 0.03)
            values = [float(f) for f in figures]
        else:  # one host sync for all of them
            values = torch.stack([f.to(device=device, dtype=torch.float64).reshape(()) for f in figures]).tolist()
        k = len(names)
        cols = [values[i * k:(i + 1) * k] for i in range(6)]
        params = {}
        sq = 0.0
        for i, name in enumerate(names):
            gn, gmax, gmin, clip, un, wn = (c[i] for c in cols)
            sq += gn * gn
            params[name] = {"grad_norm": gn, "grad_max": gmax, "grad_min": gmin, "weight_norm": wn,
                            "update_norm": un, "update_ratio": un / wn if wn > 0 else None,
                            "clip_frac": clip, "ndim": pending["ndims"][i]}
        rest = values[6 * k:]
        tail = rest[3 * len(acts):]
        step_loss = tail.pop(0) if present[0] else None
        loss = self._interval_loss(tail[0] if present[1] else None, logs, step_loss)
        layers = {}
        for j, (name, _, _, dead) in enumerate(acts):
            mean, std, d = rest[3 * j:3 * j + 3]
            layers[name] = {"act_mean": mean, "act_std": std, "dead_frac": d if dead is not None else None}
        record = {"type": "health", "step": int(pending["step"]), "grad_norm": math.sqrt(sq), "loss": loss,
                  "step_loss": step_loss, "params": params, "layers": layers}
        if isinstance(logs.get("epoch"), int):
            record["epoch"] = logs["epoch"]
        self.records.append(record)
        self._emit(trainer, record)
        for w in self.rules.evaluate(record):
            self.warnings.append(w)
            self._emit(trainer, w)
            stream = sys.stderr if self.stream is _STDERR else self.stream
            if stream is not None:
                print(f"health warning at step {w['step']} [{w['rule']}] {w['message']}. Remedy: {w['remedy']}",
                      file=stream, flush=True)

    def _interval_loss(self, loss_sum: float | None, logs: dict, step_loss: float | None) -> float | None:
        """Mean training loss over the steps since the previous check, from the trainer's running epoch sums.

        A single batch's loss is too noisy for the plateau rule; the trainer already keeps the epoch's loss
        sum on the device, so the mean over the interval costs nothing extra. Falls back to the step's own
        loss when the runner does not provide the sums.
        """
        seen, epoch = logs.get("epoch_seen"), logs.get("epoch")
        if loss_sum is None or not isinstance(seen, int) or seen <= 0:
            return step_loss
        prev = self._loss_mark
        self._loss_mark = (epoch, loss_sum, seen)
        if prev is not None and prev[0] == epoch and prev[2] < seen:
            return (loss_sum - prev[1]) / (seen - prev[2])
        return loss_sum / seen  # first check of an epoch: the epoch so far

    def _emit(self, trainer, record: dict) -> None:
        target = self.sink if self.sink is not None else getattr(self, "_writer", None)
        if target is not None:
            target(record)


def _current_step(trainer) -> int:
    """Updates made so far (the trainer's ``step``)."""
    value = getattr(trainer, "step", 0)
    return value if isinstance(value, int) else 0


def health_records(records) -> tuple[list[dict], list[dict]]:
    """Split metric records (dicts with a "type" field) into (health records, health warnings)."""
    checks, warns = [], []
    for r in records:
        kind = (r.get("type") or r.get("kind")) if isinstance(r, dict) else None
        if kind == "health":
            checks.append(r)
        elif kind == "health_warning":
            warns.append(r)
    return checks, warns
