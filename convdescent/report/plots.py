"""The report's figures, each drawn with matplotlib (Agg) into PNG bytes from a run's records."""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# The report's column is 940 px wide: 9.4 in at 100 dpi fills it without scaling text up or down.
FIG_SIZE = (9.4, 4.0)
LEGEND_SIZE = 9


def png_bytes(fig) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _series(records: list[dict], kind: str, key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        if r.get("type") != kind:
            continue
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"] if kind == "step" else r["epoch"])
            ys.append(float(v))
    return xs, ys


def _epoch_steps(records: list[dict]) -> dict[int, int]:
    return {int(r["epoch"]): int(r["step"]) for r in records if r.get("type") == "epoch" and "step" in r}


def curves_png(records: list[dict], metric: str) -> bytes | None:
    """Training and validation ``metric`` ("loss" or "acc") per epoch, with the step records behind them.

    The x axis is the optimizer step, so step records and epoch ends line up.
    """
    ep = _epoch_steps(records)
    tx, ty = _series(records, "epoch", metric)
    vx, vy = _series(records, "epoch", f"val_{metric}")
    sx, sy = _series(records, "step", metric)
    if not (ty or vy or sy):
        return None
    fig, ax = plt.subplots(figsize=FIG_SIZE)
    if sy:
        # drawn in a lighter blue of its own (not a faint copy of the epoch line) so it stays visible
        ax.plot(sx, sy, color="#7fb3e0", lw=1.3, label=f"train {metric} (every logged step)", zorder=1)
    if ty:
        ax.plot([ep.get(e, e) for e in tx], ty, "o-", color="tab:blue", label=f"train {metric} (epoch mean)")
    if vy:
        ax.plot([ep.get(e, e) for e in vx], vy, "s-", color="tab:orange", label=f"validation {metric}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if metric == "loss" else "accuracy")
    if metric == "loss" and all(v > 0 for v in sy + ty + vy):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=LEGEND_SIZE, framealpha=0.9)
    ax.set_title("Loss" if metric == "loss" else "Accuracy")
    return png_bytes(fig)


def lr_png(records: list[dict]) -> bytes | None:
    """Learning rate over steps (step records, else epoch ends), marking rollbacks."""
    xs, ys = _series(records, "step", "lr")
    if not xs:
        ep = _epoch_steps(records)
        ex, ey = _series(records, "epoch", "lr")
        xs, ys = [ep.get(e, e) for e in ex], ey
    if not xs:
        return None
    fig, ax = plt.subplots(figsize=(FIG_SIZE[0], 3.2))
    ax.plot(xs, ys, ".-", color="tab:green", ms=3)
    for r in records:
        if r.get("type") == "event" and r.get("event") == "rollback":
            ax.axvline(r.get("to_step", r.get("step", 0)), color="tab:red", ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    if all(v > 0 for v in ys) and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title("Learning rate")
    return png_bytes(fig)


def grad_norm_png(records: list[dict]) -> bytes | None:
    """Gradient norm of each layer over steps (before clipping and the optimizer), log scale."""
    layers: dict[str, tuple[list, list]] = {}
    gx, gy = _series(records, "step", "grad_norm")
    for r in records:
        if r.get("type") != "step" or not isinstance(r.get("layer_grad_norms"), dict):
            continue
        for name, v in r["layer_grad_norms"].items():
            if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
                xs, ys = layers.setdefault(name, ([], []))
                xs.append(r["step"])
                ys.append(v)
    if not layers and not gx:
        return None
    fig, ax = plt.subplots(figsize=FIG_SIZE)
    for name, (xs, ys) in layers.items():
        ax.plot(xs, ys, lw=1.2, label=name)
    if gx:
        ax.plot(gx, gy, color="black", lw=1.5, ls="--", label="all layers")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=LEGEND_SIZE, ncol=min(4, len(layers) + bool(gx)), framealpha=0.9)
    ax.set_title("Gradient norm per layer")
    return png_bytes(fig)


def confusion_png(confusion, classes: list[str]) -> bytes:
    """The confusion matrix (rows: true class, columns: predicted) with counts."""
    from ..train.evaluation import confusion_png as draw

    return draw(confusion, classes, "Confusion matrix (test set)")


def misclassified_png(ev: dict[str, Any], classes: list[str], cols: int = 6) -> bytes | None:
    """A grid of misclassified test images titled "true -> predicted (probability)"."""
    images = ev.get("mis_images")
    if images is None or len(images) == 0:
        return None
    n = len(images)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 1.95), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img[:3].permute(1, 2, 0).numpy())
        t, p = int(ev["mis_true"][i]), int(ev["mis_pred"][i])
        prob = float(ev["mis_prob"][i])
        name = lambda k: classes[k] if k < len(classes) else str(k)  # noqa: E731
        ax.set_title(f"true: {name(t)}\npred: {name(p)} ({prob:.2f})", fontsize=7)
    fig.suptitle("Misclassified test images (most confident mistakes first)", fontsize=9)
    return png_bytes(fig)
