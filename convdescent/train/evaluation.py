"""Evaluation of a trained model: loss, accuracy, per-class accuracy, confusion matrix, misclassified
examples; and prediction on image files preprocessed exactly as in training."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write_bytes
from .step import predict_logits

EVALUATION_FILE = "evaluation.npz"


@torch.no_grad()
def evaluate_model(model, loss_fn, x: torch.Tensor, y: torch.Tensor, normalizer, num_classes: int,
                   batch_size: int = 1000, keep_misclassified: int = 36) -> dict[str, Any]:
    """Everything the report and ``convdescent evaluate`` show about a split.

    Args:
        model: the trained ``Sequential``.
        loss_fn: the loss (its ``value`` gives the mean loss).
        x: uint8 images (N, C, H, W); y: labels (N,).
        normalizer: the run's ``Normalizer``.
        num_classes: K.
        batch_size: images per forward pass.
        keep_misclassified: how many misclassified images to keep (the most confident mistakes first).

    Returns:
        dict with ``loss``, ``acc`` (floats), ``n``, ``confusion`` (K, K) int64 tensor (rows: true class,
        columns: predicted), ``per_class_acc`` (K,) float tensor (nan for classes absent from y),
        ``mis_images`` (M, C, H, W) uint8, ``mis_true``, ``mis_pred`` (M,), ``mis_prob`` (M,) the predicted
        class's probability, ``mis_index`` (M,) positions in x.
    """
    n = len(x)
    if n == 0:
        raise ValueError("cannot evaluate on an empty split (0 images)")
    dev = next(iter(model.params().values())).device
    logits = predict_logits(model, x.to(dev), batch_size, normalizer).float()
    y = y.to(device=logits.device, dtype=torch.int64)
    loss = float(loss_fn.value(logits, y))
    probs = torch.softmax(logits, dim=1)
    pred = probs.argmax(dim=1)
    conf = torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)
    totals = conf.sum(1)
    per_class = conf.diagonal().double() / totals.double()
    per_class[totals == 0] = math.nan
    wrong = (pred != y).nonzero().squeeze(1)
    top = probs.max(dim=1).values
    order = wrong[top[wrong].argsort(descending=True)][:keep_misclassified]
    return {"loss": loss, "acc": float((pred == y).double().mean()), "n": n, "confusion": conf.cpu(),
            "per_class_acc": per_class.cpu(), "mis_images": x[order.cpu()].cpu(), "mis_true": y[order].cpu(),
            "mis_pred": pred[order].cpu(), "mis_prob": top[order].cpu(), "mis_index": order.cpu()}


def save_evaluation(path: str | Path, ev: dict[str, Any], split: str = "test", dataset: str = "") -> Path:
    """Write an evaluation to an .npz (plain arrays, no pickle), atomically."""
    arrays = {"loss": np.array(ev["loss"]), "acc": np.array(ev["acc"]), "n": np.array(ev["n"]),
              "confusion": ev["confusion"].numpy(), "per_class_acc": ev["per_class_acc"].numpy(),
              "mis_images": ev["mis_images"].numpy(), "mis_true": ev["mis_true"].numpy(),
              "mis_pred": ev["mis_pred"].numpy(), "mis_prob": ev["mis_prob"].numpy(),
              "mis_index": ev["mis_index"].numpy(), "split": np.array(split), "dataset": np.array(dataset)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_evaluation(path: str | Path) -> dict[str, Any] | None:
    """Read ``save_evaluation`` output (None if the file is missing or unreadable)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError):
        return None
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v.ndim == 0:
            out[k] = v.item()
        else:
            out[k] = torch.from_numpy(v)
    return out


def confusion_png(confusion: torch.Tensor, classes: list[str], title: str = "Confusion matrix") -> bytes:
    """The confusion matrix (rows: true, columns: predicted) as PNG bytes, counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = confusion.shape[0]
    size = max(4.0, min(0.55 * k + 2.0, 14.0))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    m = confusion.numpy()
    ax.imshow(m, cmap="Blues")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if k <= 30:
        labels = [c if len(c) <= 14 else c[:13] + "." for c in classes]
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
        peak = m.max() if m.size else 0
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] > peak / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def format_evaluation(ev: dict[str, Any], classes: list[str], title: str) -> str:
    """Printable report: loss, accuracy, per-class accuracy and the confusion matrix."""
    k = len(classes)
    lines = [title, f"  loss {ev['loss']:.4f}   accuracy {ev['acc']:.4f}   ({ev['n']} images)", "",
             "  per-class accuracy:"]
    width = max(len(c) for c in classes) if classes else 5
    totals = ev["confusion"].sum(1).tolist()
    for i, c in enumerate(classes):
        acc = float(ev["per_class_acc"][i])
        shown = "   n/a" if math.isnan(acc) else f"{acc:6.3f}"
        lines.append(f"    {c:<{width}}  {shown}  ({int(totals[i])} images)")
    lines += ["", "  confusion matrix (rows: true class, columns: predicted class, numbered as the rows):"]
    conf = ev["confusion"].tolist()
    cell = max(4, len(str(max((max(r) for r in conf), default=0))) + 1, len(str(k - 1)) + 2)
    label = len(str(k - 1)) + 1 + width  # "<number> <name>"
    corner = "true \\ predicted"
    label = max(label, len(corner))
    lines.append(f"    {corner:<{label}}" + "".join(f"{j:>{cell}}" for j in range(k)))
    lines.append("    " + "-" * label + "-" * (cell * k))
    for i, row in enumerate(conf):
        name = f"{i:>{len(str(k - 1))}} {classes[i]}"
        lines.append(f"    {name:<{label}}" + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- predict

def load_image(path: str | Path, input_shape: tuple[int, int, int], strict: bool = False):
    """Read an image file as uint8 (1, C, H, W) for a model taking ``input_shape`` (C, H, W).

    An image of another channel count is converted (RGB <-> grayscale, alpha dropped) and one of another
    size is resized (bilinear), unless ``strict``, which refuses them.

    Returns:
        (tensor (1, C, H, W) uint8, list of notes describing any conversion).

    Raises:
        ValueError: unreadable file, unsupported channel count, or a mismatch with ``strict``.
    """
    from PIL import Image

    from ..data.errors import CorruptFile
    from ..data.images import open_image

    path = Path(path)
    c, h, w = input_shape
    if c not in (1, 3):
        raise ValueError(f"the model takes {c}-channel images; predict reads image files with 1 or 3 channels only")
    if not path.exists():
        raise ValueError(f"image {path} does not exist")
    try:
        img = open_image(path)
    except CorruptFile as e:
        raise ValueError(f"cannot read image {e}") from None
    notes = []
    have = {"L": 1, "1": 1, "I;16": 1, "I": 1, "F": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}.get(img.mode, 3)
    target = "L" if c == 1 else "RGB"
    if img.mode != target:
        if strict and have != c:
            raise ValueError(f"image {path} has {have} channels ({img.mode}); the model takes {c}-channel "
                             f"{h}x{w} images (drop --strict to convert)")
        if have != c:
            notes.append(f"converted {img.mode} to {'grayscale' if c == 1 else 'RGB'}")
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            # Transparent pixels become black, the background of the bundled datasets.
            img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
        img = img.convert(target)
    if img.size != (w, h):
        if strict:
            raise ValueError(f"image {path} is {img.size[0]}x{img.size[1]}; the model takes {w}x{h} images "
                             f"(drop --strict to resize)")
        notes.append(f"resized {img.size[0]}x{img.size[1]} to {w}x{h}")
        img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).contiguous(), notes


@torch.no_grad()
def predict_files(model, normalizer, classes: list[str], paths, top_k: int = 3, strict: bool = False) -> list[dict]:
    """Top-k classes with probabilities for image files, preprocessed as in training.

    Returns:
        One dict per path: ``path``, ``top`` (list of (class name, probability)), ``notes``.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    k = min(top_k, len(classes))
    images, notes = [], []
    for p in paths:
        img, note = load_image(p, model.input_shape, strict=strict)
        images.append(img)
        notes.append(note)
    if not images:
        return []
    x = torch.cat(images)
    dev = next(iter(model.params().values())).device
    probs = torch.softmax(predict_logits(model, x.to(dev), 256, normalizer).float(), dim=1).cpu()
    values, idx = probs.topk(k, dim=1)
    return [{"path": str(p), "top": [(classes[j], float(v)) for v, j in zip(values[i].tolist(), idx[i].tolist())],
             "notes": notes[i]} for i, p in enumerate(paths)]
