"""The loss along the training path and around the final weights.

- Line: L((1 - a) * theta_0 + a * theta_1) for a on a grid around [0, 1], from the initial weights theta_0
  to the final ones theta_1 (Goodfellow, Vinyals and Saxe 2015, "Qualitatively characterizing neural
  network optimization problems").
- Plane: L(theta_1 + a * d1 + b * d2) on a grid, with d1, d2 random Gaussian directions that are
  filter-normalized: each filter (slice along the output axis) of a direction is rescaled to the norm of
  the same filter of theta_1, and the directions are zero on biases and batch-norm parameters (Li, Xu,
  Taylor, Studer and Goldstein 2018, "Visualizing the Loss Landscape of Neural Nets").

Losses are computed in evaluation mode on a fixed subset of the data, with the model's own forward;
batch-norm running statistics stay those of the final model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model import Sequential
from ..train.step import evaluate


def _check_same(a: dict, b: dict, what: str) -> None:
    if list(a) != list(b):
        raise ValueError(f"{what} do not match the model's parameters: expected names {list(b)}, got {list(a)}")
    for k in a:
        if tuple(a[k].shape) != tuple(b[k].shape):
            raise ValueError(f"{what}: {k!r} has shape {tuple(a[k].shape)}, the model has {tuple(b[k].shape)}")


@torch.no_grad()
def loss_on_line(model: Sequential, loss_fn, theta0: dict, theta1: dict, alphas, data: dict) -> dict:
    """Loss (and accuracy) at (1 - a) * theta0 + a * theta1 for each a (Goodfellow et al. 2015).

    The model's weights are restored afterwards.

    Args:
        model: a built Sequential.
        theta0, theta1: parameter dicts keyed like ``model.params()``.
        alphas: sequence of interpolation coefficients (0: theta0, 1: theta1).
        data: name -> (x, y), e.g. {"train": (x, y), "test": (x, y)}.

    Returns:
        dict name -> {"loss": [...], "accuracy": [...]} with one entry per alpha.
    """
    params = model.params()
    _check_same(theta0, params, "initial weights")
    _check_same(theta1, params, "final weights")
    # copies: either end may be the model's own tensors, which the loop below overwrites
    theta0 = {k: v.detach().to(params[k]).clone() for k, v in theta0.items()}
    theta1 = {k: v.detach().to(params[k]).clone() for k, v in theta1.items()}
    saved = {k: p.clone() for k, p in params.items()}
    out = {name: {"loss": [], "accuracy": []} for name in data}
    try:
        for a in alphas:
            for k, p in params.items():
                torch.lerp(theta0[k], theta1[k], float(a), out=p)
            for name, (x, y) in data.items():
                loss, acc = evaluate(model, loss_fn, x, y)
                out[name]["loss"].append(loss)
                out[name]["accuracy"].append(acc)
    finally:
        for k, p in params.items():
            p.copy_(saved[k])
    return out


def filter_normalized_direction(params: dict, generator: torch.Generator) -> dict:
    """A random direction with each filter scaled to the norm of the same filter of ``params`` (Li et al. 2018).

    A filter is one slice along the first (output) axis of a weight with two or more axes: a conv kernel
    (C, kh, kw) or a dense row. One-axis parameters (biases, batch-norm scale and shift) get zero, as in
    the paper, so they stay at their final values.

    Args:
        params: parameter dict (name -> tensor).
        generator: CPU generator for the Gaussian draw.

    Returns:
        dict with the same keys and shapes.
    """
    d = {}
    for k, p in params.items():
        if p.dim() <= 1:
            d[k] = torch.zeros_like(p)
            continue
        r = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
        pn = p.flatten(1).norm(dim=1)
        rn = r.flatten(1).norm(dim=1).clamp_min(1e-12)
        d[k] = r * (pn / rn).view(-1, *([1] * (p.dim() - 1)))
    return d


@torch.no_grad()
def loss_on_plane(model: Sequential, loss_fn, center: dict, d1: dict, d2: dict, a_values, b_values,
                  x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss at center + a * d1 + b * d2 on the grid a_values x b_values; the model's weights are restored.

    Returns:
        (len(b_values), len(a_values)) float64 tensor (rows: b, columns: a).
    """
    params = model.params()
    for what, d in (("center", center), ("direction 1", d1), ("direction 2", d2)):
        _check_same(d, params, what)
    center = {k: v.detach().to(params[k]).clone() for k, v in center.items()}
    saved = {k: p.clone() for k, p in params.items()}
    grid = torch.empty((len(b_values), len(a_values)), dtype=torch.float64)
    try:
        for j, b in enumerate(b_values):
            for i, a in enumerate(a_values):
                for k, p in params.items():
                    p.copy_(center[k] + float(a) * d1[k].to(p) + float(b) * d2[k].to(p))
                grid[j, i] = evaluate(model, loss_fn, x, y)[0]
    finally:
        for k, p in params.items():
            p.copy_(saved[k])
    return grid


@dataclass
class Landscape:
    """Results of :func:`compute_landscape`, JSON-ready through ``to_dict``.

    Attributes:
        alphas: line coefficients.
        line: split name -> {"loss": [...], "accuracy": [...]}.
        a_values, b_values: plane coordinates.
        plane: (len(b), len(a)) losses, or None when the plane was skipped.
        init_source: where theta_0 came from ("checkpoint ..." or "rebuilt from seed N").
        examples: number of examples each loss averages over.
    """

    alphas: list
    line: dict
    a_values: list = field(default_factory=list)
    b_values: list = field(default_factory=list)
    plane: torch.Tensor | None = None
    init_source: str = ""
    examples: int = 0

    def to_dict(self) -> dict:
        return {"alphas": list(self.alphas), "line": self.line, "a_values": list(self.a_values),
                "b_values": list(self.b_values),
                "plane": None if self.plane is None else self.plane.tolist(),
                "init_source": self.init_source, "examples": self.examples}

    def summary(self) -> str:
        """A few lines with the figures: loss at theta_0 and theta_1, the highest loss on the segment, the
        plane's minimum and where it lies."""
        lines = []
        al = list(self.alphas)
        for name, res in self.line.items():
            loss = res["loss"]
            i0 = min(range(len(al)), key=lambda i: abs(al[i]))
            i1 = min(range(len(al)), key=lambda i: abs(al[i] - 1))
            inside = [i for i in range(len(al)) if 0 <= al[i] <= 1]
            peak = max(inside, key=lambda i: loss[i]) if inside else i0
            mono = all(loss[inside[j + 1]] <= loss[inside[j]] + 1e-12 for j in range(len(inside) - 1))
            # the grid may miss 0 and 1 exactly: say which point each figure is read at
            a0 = "a=0" if abs(al[i0]) < 1e-9 else f"a={al[i0]:.3g}, the point nearest 0"
            a1 = "a=1" if abs(al[i1] - 1) < 1e-9 else f"a={al[i1]:.3g}, the point nearest 1"
            shape = ("monotone decrease" if mono else "not monotone") if len(inside) > 1 else \
                "too few points on [0, 1] to tell its shape"
            lines.append(f"line ({name}): loss {loss[i0]:.4f} at {a0} (initial) -> {loss[i1]:.4f} at {a1} (final); "
                         f"highest on [0, 1]: {loss[peak]:.4f} at a={al[peak]:.2f}; {shape} along the segment")
        if self.plane is not None:
            flat = int(torch.argmin(self.plane))
            j, i = divmod(flat, self.plane.shape[1])
            ci = min(range(len(self.a_values)), key=lambda t: abs(self.a_values[t]))
            cj = min(range(len(self.b_values)), key=lambda t: abs(self.b_values[t]))
            centre = abs(self.a_values[ci]) < 1e-9 and abs(self.b_values[cj]) < 1e-9
            at = "at the final weights" if centre else \
                f"at ({self.a_values[ci]:.2f}, {self.b_values[cj]:.2f}), the point nearest the final weights"
            split = next(iter(self.line), None)
            lines.append(f"plane{f' ({split})' if split else ''}: loss {float(self.plane[cj, ci]):.4f} {at}; "
                         f"minimum {float(self.plane.min()):.4f} at (a, b) = ({self.a_values[i]:.2f}, "
                         f"{self.b_values[j]:.2f}); maximum {float(self.plane.max()):.4f}")
        return "\n".join(lines)


def compute_landscape(model: Sequential, loss_fn, theta0: dict, data: dict, line_points: int = 13,
                      line_range=(-0.25, 1.25), plane_points: int = 9, plane_range: float = 1.0, seed: int = 0,
                      init_source: str = "") -> Landscape:
    """The line from theta0 to the model's weights, and the filter-normalized plane around them.

    Args:
        model: a built Sequential holding the final weights theta_1.
        loss_fn: the training loss.
        theta0: initial weights, keyed like ``model.params()``.
        data: split name -> (x, y) normalized; the plane uses the first entry.
        line_points: points on the line over ``line_range``.
        plane_points: points per axis on the plane over [-plane_range, plane_range]; 0 skips the plane.
        seed: seed of the two random directions.

    Returns:
        A ``Landscape``.
    """
    if isinstance(line_points, bool) or not isinstance(line_points, int) or line_points < 2:
        raise ValueError(f"line_points must be an int of at least 2, got {line_points!r}")
    if isinstance(plane_points, bool) or not isinstance(plane_points, int) or plane_points == 1 or plane_points < 0:
        raise ValueError(f"plane_points must be 0 (no plane) or an int of at least 2, got {plane_points!r}")
    if not (plane_range > 0 and math.isfinite(plane_range)):
        raise ValueError(f"plane_range must be a positive number, got {plane_range!r}")
    lo, hi = line_range
    if not lo < hi:
        raise ValueError(f"line_range must be (low, high) with low < high, got {line_range!r}")
    if not data:
        raise ValueError("data must hold at least one split name -> (x, y)")
    theta1 = {k: p.clone() for k, p in model.params().items()}
    alphas = torch.linspace(lo, hi, line_points, dtype=torch.float64).tolist()
    line = loss_on_line(model, loss_fn, theta0, theta1, alphas, data)
    result = Landscape(alphas, line, init_source=init_source, examples=int(next(iter(data.values()))[0].shape[0]))
    if plane_points:
        gen = torch.Generator().manual_seed(int(seed))
        d1 = filter_normalized_direction(theta1, gen)
        d2 = filter_normalized_direction(theta1, gen)
        coords = torch.linspace(-plane_range, plane_range, plane_points, dtype=torch.float64).tolist()
        x, y = next(iter(data.values()))
        result.a_values, result.b_values = coords, coords
        result.plane = loss_on_plane(model, loss_fn, theta1, d1, d2, coords, coords, x, y)
    return result


def plot_line(result: Landscape, path: str | Path) -> Path:
    """Loss (and accuracy) against the interpolation coefficient; written as a PNG."""
    from .plotting import new_figure, save_figure

    fig, axes = new_figure(1, 2, size=(4.2, 3.2))
    for name, res in result.line.items():
        axes[0, 0].plot(result.alphas, res["loss"], marker="o", ms=3, label=name)
        axes[0, 1].plot(result.alphas, res["accuracy"], marker="o", ms=3, label=name)
    for ax, what in zip(axes[0], ("loss", "accuracy")):
        ax.axvline(0.0, color="gray", lw=0.8, ls="--")
        ax.axvline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("a  (0: initial weights, 1: final weights)")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    axes[0, 0].set_yscale("log")
    fig.suptitle("Loss on the line (1 - a) theta_0 + a theta_1 (Goodfellow et al. 2015)", fontsize=10)
    return save_figure(fig, path)


def plot_plane(result: Landscape, path: str | Path) -> Path:
    """Contour map and surface of the loss on the filter-normalized plane; written as a PNG."""
    from .plotting import new_figure, save_figure

    if result.plane is None:
        raise ValueError("this landscape has no plane (computed with plane_points=0)")
    import numpy as np

    a = np.asarray(result.a_values)
    b = np.asarray(result.b_values)
    z = result.plane.numpy()
    fig, axes = new_figure(1, 2, size=(4.2, 3.6))
    ax = axes[0, 0]
    levels = np.geomspace(max(z.min(), 1e-8), max(z.max(), z.min() * 1.0001 + 1e-8), 20)
    cs = ax.contour(a, b, z, levels=levels, cmap="viridis")
    ax.clabel(cs, fontsize=6, fmt="%.2f")
    ax.plot([0], [0], "r*", ms=8)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title("contours (star: final weights)", fontsize=9)
    axes[0, 1].remove()
    ax3 = fig.add_subplot(1, 2, 2, projection="3d")
    aa, bb = np.meshgrid(a, b)
    ax3.plot_surface(aa, bb, z, cmap="viridis", linewidth=0)
    ax3.set_xlabel("d1")
    ax3.set_ylabel("d2")
    ax3.set_zlabel("loss")
    fig.suptitle("Loss around the final weights, filter-normalized directions (Li et al. 2018)", fontsize=10)
    return save_figure(fig, path)
