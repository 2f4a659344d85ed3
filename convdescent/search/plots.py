"""Plots of the search tools: the range test, search trials against the learning rate, optimizer curves.

matplotlib with the Agg backend (no display needed); each function writes a PNG atomically and returns
its path.
"""

from __future__ import annotations

import math

import numpy as np

from ..data.fileio import atomic_open

RULE_COLORS = {"valley": "tab:green", "steepest": "tab:orange", "min/10": "tab:purple"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> str:
    """Write a figure as PNG through a temporary file and a rename, then close it."""
    try:
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return str(path)


def plot_lr_find(result, path) -> str:
    """The range test: raw and smoothed loss against the learning rate, each rule's suggestion marked.

    Args:
        result: an ``LRFindResult``.
        path: PNG file to write.

    Returns:
        The path written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    lrs, raw, sm = result.lrs, result.losses, result.smoothed
    n = result.num_valid
    finite = np.isfinite(raw)
    ax.plot(lrs[finite], raw[finite], color="0.75", lw=0.8, label="loss per batch")
    ax.plot(lrs[:n], sm[:n], color="tab:blue", lw=2, label="smoothed loss (EMA)")
    if len(lrs) > n:
        stop_lr = lrs[n]
        ax.axvline(stop_lr, color="tab:red", ls=":", lw=1)
        ax.annotate(f"stop: {result.stop_reason}", (stop_lr, 0.98), xycoords=("data", "axes fraction"),
                    ha="right", va="top", rotation=90, color="tab:red", fontsize=8)
    if result.good_range:
        ax.axvspan(*result.good_range, color="tab:green", alpha=0.08, label="valley (good range)")
    for rule, s in result.suggestions.items():
        if s.lr is None:
            continue
        rec = rule == result.recommended
        ax.axvline(s.lr, color=RULE_COLORS.get(rule, "k"), lw=2.2 if rec else 1.2, ls="-" if rec else "--",
                   label=f"{rule}: {s.lr:.1e}" + ("  (recommended)" if rec else ""))
        if s.index is not None and s.index < n and rule != "min/10":
            ax.plot([s.lr], [sm[s.index]], "o", color=RULE_COLORS.get(rule, "k"), ms=8 if rec else 5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    valid = sm[:n][np.isfinite(sm[:n])]
    if len(valid):
        lo, hi = float(valid.min()), float(max(valid[0], np.median(valid)))
        pad = 0.1 * max(hi - lo, 1e-12)
        finite_raw = raw[:n][finite[:n]]
        top = hi + 4 * pad if not len(finite_raw) else min(float(finite_raw.max()), hi + 6 * pad)
        ax.set_ylim(lo - 2 * pad, max(top, hi + pad))
    title = "Learning-rate range test"
    if result.recommended is not None:
        title += f": recommended {result.recommended_lr:.1e} ({result.recommended})"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left")
    if result.reason:
        fig.text(0.01, -0.02, _wrap(result.reason, 120), fontsize=8, va="top")
    return save_figure(fig, path)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def plot_trials(rows, path, metric: str = "val_acc") -> str:
    """Validation accuracy against learning rate, one panel per optimizer, pruned and failed trials marked.

    Args:
        rows: trial records (dicts with "lr", "optimizer", "state", "number", metric and "last_val_acc").
        path: PNG file to write.
        metric: the key plotted for complete trials.

    Returns:
        The path written.
    """
    plt = _pyplot()
    optimizers = sorted({r.get("optimizer", "?") for r in rows}) or ["?"]
    cols = min(len(optimizers), 3)
    nrows = math.ceil(len(optimizers) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    done_all = [r for r in rows if r["state"] == "COMPLETE" and r.get(metric) is not None]
    best = max(done_all, key=lambda r: r[metric]) if done_all else None
    for k, name in enumerate(optimizers):
        ax = axes[k // cols][k % cols]
        color = cmap(k % 10)
        mine = [r for r in rows if r.get("optimizer", "?") == name and r.get("lr") is not None]
        done = [r for r in mine if r["state"] == "COMPLETE" and r.get(metric) is not None]
        pruned = [r for r in mine if r["state"] == "PRUNED" and r.get("last_val_acc") is not None]
        failed = [r for r in mine if r["state"] == "FAIL"]
        if done:
            ax.scatter([r["lr"] for r in done], [r[metric] for r in done], color=color, s=40, zorder=3,
                       label="complete")
        if pruned:
            ax.scatter([r["lr"] for r in pruned], [r["last_val_acc"] for r in pruned], color=color, marker="x",
                       s=50, zorder=3, label="pruned (last reported)")
        if failed:
            ax.scatter([r["lr"] for r in failed], [0.0] * len(failed), color="tab:red", marker="v", s=30, zorder=3,
                       label="failed")
        if best is not None and best.get("optimizer", "?") == name:
            ax.scatter([best["lr"]], [best[metric]], s=220, facecolors="none", edgecolors="k", lw=1.5, zorder=4,
                       label=f"best: trial {best['number']}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{name} ({len(mine)} trials)")
        ax.grid(True, which="both", alpha=0.25)
        if mine:
            ax.legend(fontsize=8, loc="best")
    for k in range(len(optimizers), nrows * cols):
        axes[k // cols][k % cols].set_visible(False)
    for row in axes:
        row[0].set_ylabel("validation accuracy")
    fig.suptitle("Search trials: validation accuracy against learning rate")
    return save_figure(fig, path)


def plot_curves(curves, path, key: str = "val_acc", ylabel: str = "validation accuracy", title: str = "") -> str:
    """Per-epoch curves of several optimizers (each seed thin, the mean thick) in one plot.

    Args:
        curves: {optimizer: [list of per-epoch values, one list per seed]}.
        path: PNG file to write.
        key, ylabel, title: labels.

    Returns:
        The path written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab10")
    for k, (name, runs) in enumerate(curves.items()):
        color = cmap(k % 10)
        runs = [list(r) for r in runs if r]
        for r in runs:
            ax.plot(range(1, len(r) + 1), r, color=color, alpha=0.3, lw=0.8)
        if runs:
            length = min(len(r) for r in runs)
            mean = np.mean(np.array([r[:length] for r in runs], dtype=float), axis=0)
            ax.plot(range(1, length + 1), mean, color=color, lw=2, label=f"{name} (mean of {len(runs)})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} per epoch")
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_lr_grid(results, path) -> str:
    """The learning-rate tuning stage of a comparison: score against learning rate, per optimizer.

    Args:
        results: {optimizer: [(lr, score or nan), ...]}.
        path: PNG file to write.

    Returns:
        The path written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab10")
    for k, (name, pts) in enumerate(results.items()):
        pts = sorted(pts)
        xs = [p[0] for p in pts]
        ys = [p[1] if p[1] is not None and math.isfinite(p[1]) else np.nan for p in pts]
        ax.plot(xs, ys, "o-", color=cmap(k % 10), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Learning-rate tuning (log grid)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
