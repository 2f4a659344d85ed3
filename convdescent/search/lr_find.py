"""The learning-rate range test (Smith 2015), with several suggestion rules and exact state restoration.

The sweep trains the model for ``num_steps`` mini-batches while the learning rate grows geometrically from
``start_lr`` to ``end_lr``. The raw loss of each step is smoothed with a bias-corrected exponential moving
average (beta 0.98). The sweep stops when the smoothed loss exceeds ``diverge_factor`` times its best value
or when a loss is NaN or Inf; steps from that point on never feed a suggestion.

Reference: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", 2015 (arXiv:1506.01186),
section 3.3, "How can one estimate reasonable minimum and maximum boundary values?".

Suggestion rules (all computed, all printed and drawn; one is recommended with its reason):

- ``valley``: the longest stretch over which the smoothed loss keeps falling (its slope against log10(lr)
  stays below a small negative threshold); the suggestion lies two thirds of the way along it on the log
  scale, in its lower part, before the bottom where the loss is about to turn up. The stretch itself is
  reported as the good range.
- ``steepest``: the most negative slope of the smoothed loss against log10(lr), measured as a secant over
  +-3% of the steps, ignoring the first ``skip_start`` fraction of the steps, and judged against its noise:
  the rule takes the most negative slope plus two standard errors, where the standard error follows from the
  batch-to-batch noise of the loss and the moving average's weights. In the first steps the average rests on
  a few batches, so a lucky early drop has a large error and cannot pass for the steepest fall.
- ``min/10``: a tenth of the learning rate at the lowest smoothed loss (same early steps ignored).

Everything the sweep touches is put back afterwards, bit for bit: parameters, buffers (batch-norm running
statistics), the random generators of dropout layers and torch's global generator, the loader's position
in its epoch order, and the optimizer state passed in (which the sweep only reads; it trains a copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..optim import load_state_dict as load_opt_state
from ..optim import state_dict as opt_state_dict
from ..train.snapshot import Snapshot
from ..train.step import train_step

RULES = ("valley", "steepest", "min/10")


@dataclass
class Suggestion:
    """One rule's suggested learning rate.

    Attributes:
        rule: "valley", "steepest" or "min/10".
        lr: the suggested learning rate, or None when the rule found nothing usable.
        index: the sweep step it was read at (None for none).
        loss: the smoothed loss at that step.
        detail: one sentence saying what the rule saw, with its figures.
    """

    rule: str
    lr: float | None
    index: int | None
    loss: float | None
    detail: str


@dataclass
class LRFindResult:
    """What the range test measured and concluded.

    Attributes:
        lrs: learning rate of every step run and kept, shape (S,).
        losses: raw mini-batch loss of each step, shape (S,) (NaN/Inf kept as measured).
        smoothed: bias-corrected moving average of the loss, shape (S,) (NaN from the first bad step on).
        num_valid: steps usable for suggestions: those before the stopping step.
        stop_reason: why the sweep ended ("diverged", "non-finite loss", "reached end_lr").
        stop_detail: the figures behind stop_reason.
        suggestions: rule name -> Suggestion.
        recommended: the recommended rule (None when the sweep gives no usable suggestion).
        reason: why that rule was recommended (or why none was).
        good_range: (low, high) learning rates over which the loss fell steadily (the valley), or None.
        warnings: things the user should know about this sweep (e.g. it never diverged).
        settings: the sweep's settings.
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    num_valid: int
    stop_reason: str
    stop_detail: str
    suggestions: dict[str, Suggestion]
    recommended: str | None
    reason: str
    good_range: tuple[float, float] | None
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def recommended_lr(self) -> float | None:
        """The recommended learning rate, or None."""
        if self.recommended is None:
            return None
        return self.suggestions[self.recommended].lr

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything (non-finite numbers become None)."""
        def num(v):
            v = float(v)
            return v if math.isfinite(v) else None

        return {
            "settings": dict(self.settings),
            "steps_run": int(len(self.lrs)), "num_valid": int(self.num_valid),
            "stop_reason": self.stop_reason, "stop_detail": self.stop_detail,
            "recommended": self.recommended, "recommended_lr": self.recommended_lr, "reason": self.reason,
            "good_range": list(self.good_range) if self.good_range else None,
            "suggestions": {k: {"lr": s.lr, "step": s.index, "smoothed_loss": s.loss, "detail": s.detail}
                            for k, s in self.suggestions.items()},
            "warnings": list(self.warnings),
            "lrs": [num(v) for v in self.lrs], "losses": [num(v) for v in self.losses],
            "smoothed": [num(v) for v in self.smoothed],
        }

    def report(self) -> str:
        """The printed summary: every rule's suggestion, the recommendation with its reason, the range."""
        lines = [f"Swept {len(self.lrs)} steps from lr {self.lrs[0]:.2e} to {self.lrs[-1]:.2e}: "
                 f"{self.stop_reason} ({self.stop_detail})." if len(self.lrs) else "No step was run."]
        lines.append(f"{'rule':<10}{'lr':>11}  {'step':>5}  {'smoothed loss':>13}  what it saw")
        for rule in RULES:
            s = self.suggestions[rule]
            mark = "*" if rule == self.recommended else " "
            lr = f"{s.lr:.2e}" if s.lr is not None else "-"
            step = str(s.index) if s.index is not None else "-"
            loss = f"{s.loss:.4f}" if s.loss is not None else "-"
            lines.append(f"{mark}{rule:<9}{lr:>11}  {step:>5}  {loss:>13}  {s.detail}")
        if self.good_range:
            lines.append(f"Good range (the loss falls steadily): {self.good_range[0]:.2e} to {self.good_range[1]:.2e}")
        if self.recommended is not None:
            lines.append(f"Recommended: lr = {self.recommended_lr:.2e} ({self.recommended}). {self.reason}")
        else:
            lines.append(f"No recommendation: {self.reason}")
        for w in self.warnings:
            lines.append(f"Warning: {w}")
        return "\n".join(lines)

    def plot(self, path) -> str:
        """Draw the sweep with every rule's suggestion to a PNG; returns the path."""
        from .plots import plot_lr_find

        return plot_lr_find(self, path)


# ----------------------------------------------------------------------------------------------- analysis

def smooth_losses(losses, beta: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average of a loss sequence.

    avg_t = beta * avg_{t-1} + (1 - beta) * loss_t, smoothed_t = avg_t / (1 - beta^(t+1)), so the first
    values are not pulled towards zero. From the first non-finite loss on, the result is NaN.

    Args:
        losses: raw losses, shape (S,).
        beta: the average's decay, in [0, 1).

    Returns:
        Smoothed losses, shape (S,), float64.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    losses = np.asarray(losses, dtype=np.float64)
    out = np.full(losses.shape, np.nan)
    avg = 0.0
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            break
        avg = beta * avg + (1.0 - beta) * v
        out[i] = avg / (1.0 - beta ** (i + 1))
    return out


def ema_weights(n: int, beta: float) -> np.ndarray:
    """The weight of raw loss j in the bias-corrected moving average at step i, as an (n, n) matrix.

    W[i, j] = (1 - beta) * beta^(i - j) / (1 - beta^(i + 1)) for j <= i, else 0; each row sums to 1.
    """
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    k = np.where(j <= i, i - j, 0)
    w = (1.0 - beta) * beta ** k / (1.0 - beta ** (i + 1))
    return np.where(j <= i, w, 0.0)


def loss_noise(raw) -> float:
    """Robust estimate of the batch-to-batch standard deviation of the raw loss.

    From the median absolute deviation of successive differences (the trend changes slowly next to the
    noise), scaled so it estimates sigma for Gaussian noise: 1.4826 * MAD / sqrt(2).
    """
    raw = np.asarray(raw, dtype=np.float64)
    if len(raw) < 3:
        return 0.0
    d = np.diff(raw)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def slopes(lrs, smoothed, half_window: int = 1, raw=None, beta: float = 0.98, first: int = 0):
    """Slope of the smoothed loss against log10(lr), with its standard error from the batch noise.

    The slope at step i is the secant from step i - h to i + h (shortened at the ends): far less sensitive
    to the wiggle of the average than a two-point derivative. Its standard error is
    sigma * ||W[i+h] - W[i-h]|| / (log10 lr[i+h] - log10 lr[i-h]), with W the moving average's weights
    (:func:`ema_weights`) and sigma the raw loss noise (:func:`loss_noise`): large in the first steps, where
    the average rests on a few batches, small later on.

    Args:
        lrs: learning rates, shape (S,).
        smoothed: smoothed losses, shape (S,).
        half_window: h.
        raw: raw losses, shape (S,) (None: standard errors are zero).
        beta: the average's decay.
        first: steps before this index are ignored (windows do not reach into them; slopes there are 0).

    Returns:
        (slopes (S,), standard errors (S,)).
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    smoothed = np.asarray(smoothed, dtype=np.float64)
    n = len(lrs)
    if n < 2:
        return np.zeros(n), np.zeros(n)
    x = np.log10(lrs)
    idx = np.arange(n)
    first = min(max(int(first), 0), n - 2)
    lo = np.clip(idx - half_window, first, n - 1)
    hi = np.clip(np.maximum(idx + half_window, first + 1), 0, n - 1)
    dx = x[hi] - x[lo]
    g = (smoothed[hi] - smoothed[lo]) / dx
    if raw is None:
        return g, np.zeros(n)
    sigma = loss_noise(raw)
    if n <= 4000:
        w = ema_weights(n, beta)
        spread = np.linalg.norm(w[hi] - w[lo], axis=1)
    else:  # the rows' difference is bounded by the sum of their norms; exact norms would need n^2 memory
        sq = (1 - beta) * (1 + beta ** (idx + 1)) / ((1 + beta) * (1 - beta ** (idx + 1)))
        spread = np.sqrt(sq[hi]) + np.sqrt(sq[lo])
    return g, sigma * spread / dx


def suggest(lrs, smoothed, skip_start: float = 0.1, valley_threshold: float = 0.05, raw=None,
            beta: float = 0.98):
    """Apply the three rules to a sweep's usable part.

    Args:
        lrs: learning rates, shape (S,), increasing.
        smoothed: smoothed losses, shape (S,), all finite (pass only the usable steps).
        skip_start: fraction of the first steps ignored by the rules.
        valley_threshold: a step belongs to a valley when its slope is below ``-valley_threshold`` times the
            steepest slope's magnitude (so flat stretches do not count as falling).
        raw: raw losses, shape (S,): with them, slopes are judged against their noise (a step counts as
            falling only when its slope plus one standard error is negative, and the steepest rule takes the
            most negative slope plus two standard errors, the steepest fall that noise cannot explain).
        beta: the moving average's decay (for the noise).

    Returns:
        (suggestions dict rule -> Suggestion, valley (start, end) indices or None).
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    s = np.asarray(smoothed, dtype=np.float64)
    n = len(s)
    if n != len(lrs):
        raise ValueError(f"lrs and smoothed must have the same length, got {len(lrs)} and {n}")
    if n and not np.all(np.isfinite(s)):
        raise ValueError("smoothed losses must be finite; pass only the steps before the sweep stopped")
    if raw is not None and len(raw) != n:
        raise ValueError(f"raw must have the same length as smoothed, got {len(raw)} and {n}")
    out = {r: Suggestion(r, None, None, None, "") for r in RULES}
    skip = min(max(1, int(math.ceil(skip_start * n))), n)
    if n - skip < 3:
        why = f"too few usable steps ({n}, of which the first {skip} are ignored as early noise)"
        for r in RULES:
            out[r].detail = why
        return out, None
    g, se = slopes(lrs, s, half_window=max(1, int(round(0.03 * n))), raw=raw, beta=beta, first=skip)
    i_min = skip + int(np.argmin(s[skip:]))
    # min/10
    out["min/10"] = Suggestion("min/10", float(lrs[i_min] / 10.0), i_min, float(s[i_min]),
                               f"lowest smoothed loss {s[i_min]:.4f} at lr {lrs[i_min]:.2e}; a tenth of that")
    # steepest: only up to the minimum, where the loss is still falling
    bound = g[skip:i_min + 1] + 2.0 * se[skip:i_min + 1]
    if len(bound) and bound.min() < 0:
        i_st = skip + int(np.argmin(bound))
        noise = f" (+-{se[i_st]:.2g})" if raw is not None else ""
        out["steepest"] = Suggestion("steepest", float(lrs[i_st]), i_st, float(s[i_st]),
                                     f"loss falls fastest here: {g[i_st]:.3g}{noise} per decade of lr")
    else:
        out["steepest"].detail = "no fall of the smoothed loss stands out from the batch noise"
    # valley: longest run of clearly negative slope
    valley = None
    steep = -float(g[skip:].min())
    if steep > 0:
        falling = (g < -valley_threshold * steep) & (g + se < 0)
        falling[:skip] = False
        best_len, start = 0, None
        for i in range(n + 1):
            if i < n and falling[i]:
                if start is None:
                    start = i
            elif start is not None:
                if i - start > best_len:
                    best_len, valley = i - start, (start, i - 1)
                start = None
    if valley is not None and valley[1] > valley[0]:
        a, b = valley
        la, lb = math.log10(lrs[a]), math.log10(lrs[b])
        target = la + (2.0 / 3.0) * (lb - la)
        i_v = a + int(np.argmin(np.abs(np.log10(lrs[a:b + 1]) - target)))
        drop = s[a] - s[b]
        out["valley"] = Suggestion(
            "valley", float(lrs[i_v]), i_v, float(s[i_v]),
            f"loss falls steadily over {b - a + 1} steps, lr {lrs[a]:.2e} to {lrs[b]:.2e} "
            f"(by {drop:.3g}); two thirds along it")
    else:
        valley = None
        out["valley"].detail = "no stretch where the smoothed loss keeps falling"
    return out, valley


def recommend(suggestions: dict[str, Suggestion], valley, lrs, smoothed, min_valley_fraction: float = 0.1):
    """Choose one rule and say why.

    The valley is preferred when it is long enough (at least ``min_valley_fraction`` of the usable steps):
    it rests on a sustained fall, not on one slope that a noisy batch can fake, and it points into the
    lower part of that fall. Otherwise the steepest slope, and failing that min/10.

    Returns:
        (rule or None, reason).
    """
    n = len(smoothed)
    have = {r: s for r, s in suggestions.items() if s.lr is not None}
    if not have:
        return None, ("no rule found a falling loss: widen the range (--start/--end), take more steps, "
                      "or check that the model can learn this data")
    initial, lowest = float(smoothed[0]), float(np.min(smoothed))
    if not lowest < initial * (1 - 1e-3):
        return None, (f"the smoothed loss never fell below its start ({initial:.4f}); the sweep shows no "
                      "learning-rate range where training works")
    lr_values = [s.lr for s in have.values()]
    spread = max(lr_values) / min(lr_values)
    agree = (f"the rules agree within a factor of {spread:.1f}" if spread <= 10
             else f"the rules spread over a factor of {spread:.0f}, so treat the choice with care")
    if valley is not None and "valley" in have:
        a, b = valley
        length = b - a + 1
        if length >= max(3, min_valley_fraction * n):
            decades = math.log10(lrs[b] / lrs[a])
            return "valley", (f"The loss falls steadily over {length} of {n} usable steps "
                              f"({decades:.1f} decades of lr), so this rests on a sustained decrease rather "
                              f"than one noisy slope; {agree}.")
    if "steepest" in have:
        vlen = 0 if valley is None else valley[1] - valley[0] + 1
        return "steepest", (f"No sustained valley (the longest fall spans {vlen} of {n} steps), so the "
                            f"steepest descent of the smoothed loss is used; {agree}.")
    return "min/10", ("Neither a valley nor a falling slope was found; a tenth of the best learning rate is the "
                      f"safe fallback; {agree}.")


def analyze(lrs, losses, beta: float = 0.98, diverge_factor: float = 4.0, skip_start: float = 0.1,
            stop_reason: str | None = None, settings: dict | None = None) -> LRFindResult:
    """Turn a sweep's raw record into an :class:`LRFindResult` (smoothing, stopping point, suggestions).

    Args:
        lrs: learning rate of each step, shape (S,).
        losses: raw loss of each step, shape (S,).
        beta: moving-average decay.
        diverge_factor: the sweep is cut where the smoothed loss first exceeds this times its best.
        skip_start: see :func:`suggest`.
        stop_reason: why the steps ended when not cut here (default "reached end_lr").
        settings: recorded in the result.

    Returns:
        The result, cut at the first non-finite or diverged step.
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    cut, reason, detail = _find_stop(lrs, losses, beta, diverge_factor)
    if cut is None:
        cut = len(lrs)
        reason = stop_reason or "reached end_lr"
        detail = f"{len(lrs)} steps, last lr {lrs[-1]:.2e}" if len(lrs) else "no steps"
    keep = min(cut + 1, len(lrs))  # the stopping step is kept for the plot, not for the suggestions
    lrs, losses = lrs[:keep], losses[:keep]
    smoothed = smooth_losses(losses, beta)
    valid_s = smoothed[:cut]
    sugg, valley = suggest(lrs[:cut], valid_s, skip_start=skip_start, raw=losses[:cut], beta=beta)
    rule, why = recommend(sugg, valley, lrs[:cut], valid_s) if cut else (None, "no usable step")
    warnings = []
    if reason == "reached end_lr" and cut:
        i_low = int(np.argmin(valid_s))
        fall = float(valid_s[0] - valid_s[i_low])
        rise = float(valid_s[-1] - valid_s[i_low])
        if fall > 0 and rise > 0.2 * fall:
            warnings.append(f"the loss turned up after lr {lrs[i_low]:.2e} (smoothed {valid_s[i_low]:.4g} -> "
                            f"{valid_s[-1]:.4g}) without exceeding {diverge_factor:g}x its best, as when units "
                            f"die rather than explode; treat {lrs[i_low]:.2e} as the top of the usable range")
        else:
            warnings.append(f"the loss never blew up up to lr {lrs[-1]:.2e}: the good range may extend higher; "
                            "sweep further with a larger --end")
    elif cut < max(5, 0.1 * max(len(losses), 1)) and reason in ("diverged", "non-finite loss"):
        warnings.append(f"the sweep stopped after only {cut} steps: the start lr {lrs[0]:.2e} may already be "
                        "too high; try a smaller --start")
    if rule is not None:
        lr_values = [s.lr for s in sugg.values() if s.lr is not None]
        if max(lr_values) / min(lr_values) > 10:
            warnings.append("the rules disagree by more than 10x; look at the plot before trusting one number")
    good = (float(lrs[valley[0]]), float(lrs[valley[1]])) if valley is not None else None
    return LRFindResult(lrs=lrs, losses=losses, smoothed=smoothed, num_valid=cut, stop_reason=reason,
                        stop_detail=detail, suggestions=sugg, recommended=rule, reason=why, good_range=good,
                        warnings=warnings, settings=dict(settings or {}))


def _find_stop(lrs, losses, beta, diverge_factor):
    """(index of the stopping step, reason, detail), or (None, None, None) when the sweep never stopped."""
    avg, best = 0.0, math.inf
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            return i, "non-finite loss", f"loss {v} at step {i}, lr {lrs[i]:.2e}"
        avg = beta * avg + (1.0 - beta) * v
        sm = avg / (1.0 - beta ** (i + 1))
        if i > 0 and best > 0 and sm > diverge_factor * best:
            return i, "diverged", (f"smoothed loss {sm:.4g} > {diverge_factor:g} x best {best:.4g} "
                                   f"at step {i}, lr {lrs[i]:.2e}")
        best = min(best, sm)
    return None, None, None


def sweep_lrs(start_lr: float, end_lr: float, num_steps: int) -> np.ndarray:
    """The geometric learning-rate sequence of the sweep: start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))."""
    return start_lr * (end_lr / start_lr) ** (np.arange(num_steps) / max(num_steps - 1, 1))


# ----------------------------------------------------------------------------------------------- the sweep

class _SweepLR:
    """A learning-rate schedule whose value the sweep sets before each step (the optimizer calls it)."""

    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, step: int) -> float:
        return self.value

    def __repr__(self) -> str:
        return "lr_range_test_sweep"


def _check_args(start_lr, end_lr, num_steps, beta, diverge_factor, skip_start, sync_every):
    def pos(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    pos("start_lr", start_lr)
    pos("end_lr", end_lr)
    if end_lr <= start_lr:
        raise ValueError(f"end_lr must be larger than start_lr, got start_lr={start_lr!r} and end_lr={end_lr!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 5:
        raise ValueError(f"num_steps must be an integer of at least 5, got {num_steps!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    pos("diverge_factor", diverge_factor)
    if diverge_factor <= 1:
        raise ValueError(f"diverge_factor must be larger than 1, got {diverge_factor!r}")
    if isinstance(skip_start, bool) or not isinstance(skip_start, (int, float)) or not 0.0 <= skip_start < 0.5:
        raise ValueError(f"skip_start must be a fraction in [0, 0.5), got {skip_start!r}")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be a positive integer, got {sync_every!r}")


def lr_find(model, loss_fn, loader, optimizer: str | Callable = "sgd", *, start_lr: float = 1e-7,
            end_lr: float = 10.0, num_steps: int = 100, beta: float = 0.98, diverge_factor: float = 4.0,
            skip_start: float = 0.1, opt_state=None, sync_every: int = 10, **optimizer_args) -> LRFindResult:
    """Run the learning-rate range test and restore everything it changed.

    Args:
        model: a built ``Sequential``; trained during the sweep, then put back exactly as it was.
        loss_fn: a loss returning ``(loss, dL/dlogits)`` for ``(logits (B, K), labels (B,))``.
        loader: a ``BatchLoader`` of normalized batches ``xb (B, C, H, W)``, ``yb (B,)``; iterated for as many
            epochs as the sweep needs; its epoch and position are restored afterwards.
        optimizer: an optimizer name for ``make_optimizer`` (e.g. "sgd", "adam"), or a function
            ``lr_schedule -> GradientTransformation`` that builds the chain to sweep with that learning rate.
        start_lr, end_lr: the sweep's first and last learning rate (geometric steps between them).
        num_steps: the sweep's length in mini-batches.
        beta: decay of the loss's moving average.
        diverge_factor: stop when the smoothed loss exceeds this times its best value.
        skip_start: fraction of the first steps ignored as early noise by the rules.
        opt_state: an existing state of the same optimizer chain to start from (e.g. Adam moments of a
            run in progress); it is only read: the sweep trains a copy.
        sync_every: read the losses from the device every this many steps (a sweep may run up to
            ``sync_every - 1`` steps past the stopping point; they are discarded and undone).
        **optimizer_args: hyperparameters for ``make_optimizer`` (momentum, betas, weight_decay, clip_norm,
            ...); None values are left out (the optimizer's default applies).

    Returns:
        LRFindResult with the curve, every rule's suggestion, the recommendation and its reason.
    """
    _check_args(start_lr, end_lr, num_steps, beta, diverge_factor, skip_start, sync_every)
    sched = _SweepLR(start_lr)
    optimizer_args = {k: v for k, v in optimizer_args.items() if v is not None}
    if isinstance(optimizer, str):
        from ..optim import make_optimizer

        if "lr" in optimizer_args:
            raise ValueError("lr is what the range test sweeps; pass start_lr and end_lr instead of lr")
        opt = make_optimizer(optimizer, lr=sched, **optimizer_args)
        opt_name = optimizer
    elif callable(optimizer):
        if optimizer_args:
            raise ValueError(f"optimizer arguments {sorted(optimizer_args)} only apply when optimizer is a "
                             "name; build them into your optimizer function instead")
        opt = optimizer(sched)
        opt_name = getattr(optimizer, "__name__", "custom")
    else:
        raise ValueError(f"optimizer must be a name such as 'sgd' or a function lr -> GradientTransformation, "
                         f"got {optimizer!r}")
    lrs = sweep_lrs(start_lr, end_lr, num_steps)
    params = model.params()
    template = opt.init(params)
    state = template if opt_state is None else load_opt_state(template, opt_state_dict(opt_state))
    saved = Snapshot(model, loader=loader)  # the sweep's own optimizer state is thrown away
    device = next(iter(params.values())).device
    loss_buf = torch.empty(num_steps, dtype=torch.float64, device=device)
    raw = np.empty(0)
    stop_early = None
    try:
        it = iter(loader)
        done = 0
        with torch.no_grad():
            while done < num_steps:
                chunk_end = min(done + sync_every, num_steps)
                for i in range(done, chunk_end):
                    try:
                        xb, yb = next(it)
                    except StopIteration:
                        it = iter(loader)
                        xb, yb = next(it)
                    sched.value = float(lrs[i])
                    loss, _, state = train_step(model, loss_fn, opt, state, xb, yb)
                    loss_buf[i] = loss.detach()
                raw = loss_buf[:chunk_end].cpu().numpy()
                done = chunk_end
                cut, _, _ = _find_stop(lrs[:done], raw, beta, diverge_factor)
                if cut is not None:
                    stop_early = cut
                    break
    finally:
        saved.restore(model, loader=loader)
    steps_run = len(raw) if stop_early is None else stop_early + 1
    settings = {"optimizer": opt_name, "start_lr": start_lr, "end_lr": end_lr, "num_steps": num_steps,
                "beta": beta, "diverge_factor": diverge_factor, "skip_start": skip_start,
                "batch_size": getattr(loader, "batch_size", None), **optimizer_args}
    return analyze(lrs[:steps_run], raw[:steps_run], beta=beta, diverge_factor=diverge_factor,
                   skip_start=skip_start, settings=settings)
