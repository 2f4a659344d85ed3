"""Border effects: how strongly each input pixel is connected to the output, and how large its gradient is.

A pixel near the edge of a feature map lies in fewer windows of a convolution than an interior pixel, so
fewer output positions depend on it and fewer terms add up in its gradient. For one k x k convolution
with stride 1 and no padding ("valid") on an n x n input, pixel (i, j) is covered by c(i) * c(j) windows,

    c(i) = min(i, n - k) - max(0, i - k + 1) + 1,

which is 1 at a corner and k^2 in the interior. "same" padding adds windows centred off the image, so the
corner count rises to ceil(k/2)^2. This module measures both sides of the effect for a whole network:

- ``coverage``: through every convolution and pooling layer up to the first non-spatial layer, how many
  positions of the last spatial map each input pixel reaches (``reach``) and by how many window chains
  (``paths``; the product of the per-layer window counts along each chain, summed). Max pooling is counted
  structurally, every element of a window as connected, because which element wins depends on the data.
- ``input_gradient_map``: the mean |dL/dx| at each input position over a batch of real data, computed by
  the engine's explicit backward.

Both are drawn as heatmaps for "valid" and "same" padding side by side by :func:`border_report`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..layers.base import Layer
from ..layers.conv import Conv2D
from ..layers.pool import AvgPool2D, MaxPool2D
from ..model import Sequential

#: Layers that act on each position separately, so they do not change which pixels connect where.
_POINTWISE_KINDS = {"relu", "leaky_relu", "tanh", "sigmoid", "act", "softmax", "bn", "batchnorm", "dropout"}


@dataclass
class SpatialOp:
    """One sliding-window layer as geometry only.

    Attributes:
        name: the layer's qualified name.
        kernel: (kh, kw) window size.
        stride: (sh, sw).
        pads: zero padding (top, bottom, left, right) for the input size it sees.
        in_size: (H, W) of its input.
        out_size: (Ho, Wo) of its output.
    """

    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    in_size: tuple[int, int]
    out_size: tuple[int, int]


@dataclass
class SkipBlock:
    """A residual block as geometry: the branch's ops plus a skip path (identity or a 1x1 strided projection)."""

    name: str
    branch: list = field(default_factory=list)
    skip: SpatialOp | None = None
    in_size: tuple[int, int] = (0, 0)
    out_size: tuple[int, int] = (0, 0)


@dataclass
class Geometry:
    """The spatial part of a network: the ops from the input to the last spatial map.

    Attributes:
        ops: ``SpatialOp`` / ``SkipBlock`` in forward order.
        input_size: (H, W) of the input.
        output_size: (H, W) of the last spatial map.
        stopped_at: name and type of the first layer that is not spatial (e.g. ``flatten1 (Flatten)``).
    """

    ops: list
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    stopped_at: str


def _is_pointwise(layer: Layer) -> bool:
    return layer.kind in _POINTWISE_KINDS or type(layer).__name__ in (
        "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "BatchNorm2D", "Dropout")


def _ops_of(layers, size: tuple[int, int], prefix: str):
    """Walk ``layers`` from an input of spatial ``size``; return (ops, size, stop description or None)."""
    ops: list = []
    for layer in layers:
        name = prefix + layer.name
        if isinstance(layer, Conv2D):
            h, w = size
            pads = layer.pads(h, w)
            _, ho, wo = layer.compute_output_shape((layer.in_channels or 1, h, w))
            ops.append(SpatialOp(name, layer.kernel_size, layer.stride, pads, size, (ho, wo)))
            size = (ho, wo)
        elif isinstance(layer, (MaxPool2D, AvgPool2D)):
            h, w = size
            _, ho, wo = layer.compute_output_shape((1, h, w))
            pads = layer.pads(h, w) if hasattr(layer, "pads") else (0, 0, 0, 0)
            ops.append(SpatialOp(name, layer.pool_size, layer.stride, pads, size, (ho, wo)))
            size = (ho, wo)
        elif type(layer).__name__ == "Residual":
            branch, out, stop = _ops_of(layer.layers, size, name + ".")
            if stop is not None:
                return ops, size, stop
            block = SkipBlock(name, branch, None, size, out)
            proj = getattr(layer, "projection", None)
            if proj is not None:
                if not isinstance(proj, Conv2D):
                    return ops, size, f"{name} ({type(layer).__name__} with a non-spatial projection)"
                _, ho, wo = proj.compute_output_shape((proj.in_channels or 1, *size))
                block.skip = SpatialOp(name + ".projection", proj.kernel_size, proj.stride,
                                       proj.pads(*size), size, (ho, wo))
            ops.append(block)
            size = out
        elif _is_pointwise(layer):
            continue
        else:
            return ops, size, f"{name} ({type(layer).__name__})"
    return ops, size, None


def spatial_geometry(model: Sequential) -> Geometry:
    """The sliding-window layers of ``model`` from its input to the first non-spatial layer.

    Args:
        model: a built Sequential whose input is (C, H, W).

    Returns:
        A ``Geometry``; ``stopped_at`` names the layer where the spatial part ends ("end of model" if none).
    """
    if model.input_shape is None or len(model.input_shape) != 3:
        raise ValueError(f"border analysis needs a model with image inputs (C, H, W), got input_shape "
                         f"{model.input_shape!r}")
    size = tuple(model.input_shape[1:])
    ops, out, stop = _ops_of(model.layers, size, "")
    if not ops:
        raise ValueError(f"model '{model.name}' has no convolution or pooling layer before "
                         f"{stop or 'its end'}; border analysis needs at least one")
    return Geometry(ops, size, out, stop or "end of model")


def _transpose_ones(m: torch.Tensor, op: SpatialOp) -> torch.Tensor:
    """Apply the transpose of a window-sum operator to maps ``m`` (B, 1, Ho, Wo) -> (B, 1, H, W).

    The window-sum with an all-ones kernel sends each input pixel to every output window that covers it,
    so its transpose counts, for each input pixel, the (weighted) windows that cover it.
    """
    kh, kw = op.kernel
    ones = torch.ones((1, 1, kh, kw), dtype=m.dtype)
    full = F.conv_transpose2d(m, ones, stride=op.stride)
    pt, pb, pl, pr = op.pads
    h, w = op.in_size
    # conv_transpose2d covers the padded input up to the last window; rows/cols past it get zero windows.
    padded = torch.zeros((m.shape[0], 1, h + pt + pb, w + pl + pr), dtype=m.dtype)
    hh = min(full.shape[2], padded.shape[2])
    ww = min(full.shape[3], padded.shape[3])
    padded[:, :, :hh, :ww] = full[:, :, :hh, :ww]
    return padded[:, :, pt:pt + h, pl:pl + w]


def _forward_ones(m: torch.Tensor, op: SpatialOp) -> torch.Tensor:
    """Window sums with an all-ones kernel: (B, 1, H, W) -> (B, 1, Ho, Wo)."""
    pt, pb, pl, pr = op.pads
    x = F.pad(m, (pl, pr, pt, pb)) if any(op.pads) else m
    return F.conv2d(x, torch.ones((1, 1, *op.kernel), dtype=m.dtype), stride=op.stride)


def _backward_paths(ops, m: torch.Tensor) -> torch.Tensor:
    for op in reversed(ops):
        if isinstance(op, SkipBlock):
            through = _backward_paths(op.branch, m)
            skip = m if op.skip is None else _transpose_ones(m, op.skip)
            m = through + skip
        else:
            m = _transpose_ones(m, op)
    return m


def _forward_paths(ops, m: torch.Tensor) -> torch.Tensor:
    for op in ops:
        if isinstance(op, SkipBlock):
            through = _forward_paths(op.branch, m)
            m = through + (m if op.skip is None else _forward_ones(m, op.skip))
        else:
            m = _forward_ones(m, op)
    return m


@dataclass
class Coverage:
    """How each input pixel connects to the last spatial map.

    Attributes:
        reach: (H, W) number of positions of the last spatial map whose receptive field holds the pixel.
        paths: (H, W) number of window chains from the pixel to any position of the last spatial map.
        geometry: the layers this was computed through.
    """

    reach: torch.Tensor
    paths: torch.Tensor
    geometry: Geometry


def coverage(model: Sequential, chunk: int = 1024) -> Coverage:
    """Count, for every input pixel, the output positions and window chains it reaches.

    Args:
        model: a built Sequential with (C, H, W) inputs.
        chunk: how many one-hot input pixels are pushed through at once (bounds memory for large images).

    Returns:
        ``Coverage`` with ``reach`` and ``paths`` as float64 (H, W) tensors of whole numbers.
    """
    geo = spatial_geometry(model)
    return coverage_of(geo, chunk=chunk)


def coverage_of(geo: Geometry, chunk: int = 1024) -> Coverage:
    """``coverage`` for a ``Geometry`` (see :func:`spatial_geometry`)."""
    h, w = geo.input_size
    ho, wo = geo.output_size
    paths = _backward_paths(geo.ops, torch.ones((1, 1, ho, wo), dtype=torch.float64))[0, 0]
    # reach: push one-hot images forward and count the output positions they land on.
    reach = torch.empty(h * w, dtype=torch.float64)
    for start in range(0, h * w, chunk):
        idx = torch.arange(start, min(start + chunk, h * w))
        onehot = torch.zeros((len(idx), 1, h * w), dtype=torch.float64)
        onehot[torch.arange(len(idx)), 0, idx] = 1.0
        out = _forward_paths(geo.ops, onehot.view(len(idx), 1, h, w))
        reach[idx] = (out > 0).flatten(1).sum(1).to(torch.float64)
    return Coverage(reach.view(h, w), paths, geo)


def window_count_1d(n: int, k: int, stride: int = 1, pad_before: int = 0, pad_after: int = 0) -> torch.Tensor:
    """Closed form: how many windows of one 1-D sliding-window layer cover each of the n input positions.

    Windows start at s = -pad_before + t * stride for t = 0 .. m - 1, m = (n + pads - k) // stride + 1;
    position i is covered by those with s <= i <= s + k - 1.

    Returns:
        (n,) int64 counts.
    """
    m = (n + pad_before + pad_after - k) // stride + 1
    i = torch.arange(n)
    # t ranges over ceil((i - k + 1 + pad_before) / stride) .. floor((i + pad_before) / stride), within [0, m-1]
    lo = torch.clamp(torch.div(i - k + 1 + pad_before + stride - 1, stride, rounding_mode="floor"), min=0)
    hi = torch.clamp(torch.div(i + pad_before, stride, rounding_mode="floor"), max=m - 1)
    return torch.clamp(hi - lo + 1, min=0)


# -- measured gradients ---------------------------------------------------------------------------------

@torch.no_grad()
def input_gradient_map(model: Sequential, loss_fn, x: torch.Tensor, y: torch.Tensor,
                       batch_size: int = 256) -> torch.Tensor:
    """Mean |dL/dx| at each input position over a batch, by the engine's explicit backward.

    The model runs in evaluation mode (dropout off, batch norm on running statistics), and each example's
    gradient is that of its own loss term (the loss summed, not averaged, over the batch), so the map does
    not shrink with the batch size.

    Args:
        model: a built Sequential.
        loss_fn: a loss returning ``(loss, dL/dlogits)``, e.g. ``SoftmaxCrossEntropy()``.
        x: normalized inputs (N, C, H, W).
        y: labels (N,).
        batch_size: examples per forward/backward pass.

    Returns:
        (H, W) float64 tensor: mean over examples and channels of |dL/dx|.
    """
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of images (N, C, H, W), got shape {tuple(x.shape)}")
    if y.shape[:1] != x.shape[:1]:
        raise ValueError(f"y must have one label per image ({x.shape[0]},), got shape {tuple(y.shape)}")
    first = model.layers[0]
    old = first.needs_input_grad
    model.set_input_grad(True)
    total = torch.zeros(x.shape[2:], dtype=torch.float64)
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            logits = model.forward(xb, train=False)
            _, dlogits = loss_fn(logits, yb, denominator=1)
            dx = model.backward(dlogits)
            total += dx.abs().sum(dim=(0, 1)).double()
    finally:
        first.needs_input_grad = old
        model.clear_cache()
    return total / (x.shape[0] * x.shape[1])


# -- summaries -------------------------------------------------------------------------------------------

def edge_center_ratios(m: torch.Tensor) -> dict[str, float]:
    """Edge-to-center figures of an (H, W) map.

    ``edge`` is the outermost ring of pixels, ``corner`` the four corner pixels, ``center`` the central
    block of half the height and width.

    Returns:
        dict with ``edge_mean``, ``corner_mean``, ``center_mean``, ``edge_to_center``, ``corner_to_center``.
    """
    if m.dim() != 2 or min(m.shape) < 2:
        raise ValueError(f"expected an (H, W) map with H, W >= 2, got shape {tuple(m.shape)}")
    h, w = m.shape
    m = m.double()
    ring = torch.ones((h, w), dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    corners = torch.stack([m[0, 0], m[0, -1], m[-1, 0], m[-1, -1]])
    ch0, ch1 = h // 4, h - h // 4
    cw0, cw1 = w // 4, w - w // 4
    center = m[ch0:ch1, cw0:cw1].mean()
    edge = m[ring].mean()
    corner = corners.mean()
    c = float(center)
    return {"edge_mean": float(edge), "corner_mean": float(corner), "center_mean": c,
            "edge_to_center": float(edge) / c if c else math.nan,
            "corner_to_center": float(corner) / c if c else math.nan}


def with_padding(model: Sequential, padding: str, seed: int | None = 0) -> Sequential:
    """The same architecture with every Conv2D's padding set to ``padding``, freshly initialized.

    Layers whose input size depends on the padding (Dense after Flatten) are rebuilt for the new size, so
    weights cannot be carried over; the new model is initialized from ``seed``.

    Args:
        model: a built Sequential.
        padding: "valid" or "same".
        seed: initialization seed of the new model.

    Returns:
        A new built Sequential.
    """
    if padding not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    config = copy.deepcopy(model.get_config())

    def fix(entries):
        for entry in entries:
            cfg = entry.get("config", {})
            if entry.get("class") == "Conv2D":
                cfg["padding"] = padding
            if entry.get("class") == "Dense":
                cfg["in_features"] = None
            if entry.get("class") in ("BatchNorm1D",):
                cfg["num_features"] = None
            if isinstance(cfg.get("layers"), list):
                fix(cfg["layers"])

    fix(config["layers"])
    try:
        return Sequential.from_config(config, seed=seed, dtype=model.dtype, device=model.device)
    except ValueError as exc:
        raise ValueError(f"model '{model.name}' cannot be rebuilt with padding={padding!r}: {exc}") from None


def conv_paddings(model: Sequential) -> list[str]:
    """The padding setting of every Conv2D in the model (nested ones included), in forward order."""
    return [str(layer.padding) for _, layer in model.all_layers() if isinstance(layer, Conv2D)]


@dataclass
class BorderVariant:
    """Border figures of one model.

    Attributes:
        label: e.g. "valid", "same", "trained (same)".
        coverage: the ``Coverage`` (None for a trained model whose geometry equals another variant's).
        grad_map: (H, W) mean |dL/dx|.
        figures: dict of ratios: ``reach``/``paths``/``grad`` -> ``edge_center_ratios`` dict.
    """

    label: str
    coverage: Coverage | None
    grad_map: torch.Tensor | None
    figures: dict


def analyze(model: Sequential, loss_fn, x: torch.Tensor | None, y: torch.Tensor | None, label: str,
            with_coverage: bool = True, batch_size: int = 256) -> BorderVariant:
    """Coverage and gradient map of one model, with their edge-to-center figures.

    Args:
        model: a built Sequential.
        loss_fn: loss for the gradient map.
        x, y: normalized inputs (N, C, H, W) and labels (N,); None skips the gradient map.
        label: name of this variant in tables and plots.
        with_coverage: whether to compute the coverage counts.

    Returns:
        A ``BorderVariant``.
    """
    cov = coverage(model) if with_coverage else None
    figures = {}
    if cov is not None:
        figures["reach"] = edge_center_ratios(cov.reach)
        figures["paths"] = edge_center_ratios(cov.paths)
    grad = None
    if x is not None:
        grad = input_gradient_map(model, loss_fn, x, y, batch_size=batch_size)
        figures["grad"] = edge_center_ratios(grad)
    return BorderVariant(label, cov, grad, figures)


def format_table(variants: list[BorderVariant]) -> str:
    """A text table of the edge-to-center and corner-to-center ratios of each variant."""
    rows = [("quantity", "ratio", *[v.label for v in variants])]
    names = {"reach": "positions reached", "paths": "window paths", "grad": "mean |dL/dx|"}
    for key, title in names.items():
        if not any(key in v.figures for v in variants):
            continue
        for ratio in ("edge_to_center", "corner_to_center"):
            cells = []
            for v in variants:
                f = v.figures.get(key)
                cells.append(f"{f[ratio]:.3f}" if f else "-")
            rows.append((title, ratio.replace("_to_", "/"), *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def plot_maps(panels: list[tuple[str, torch.Tensor]], path: str | Path, title: str, log: bool = False) -> Path:
    """Draw (H, W) maps side by side as heatmaps with a colorbar each; written atomically as a PNG.

    Args:
        panels: (title, (H, W) tensor) pairs.
        path: output PNG file.
        title: figure title.
        log: color on a log scale (for counts spanning orders of magnitude).

    Returns:
        The written path.
    """
    from .plotting import new_figure, save_figure

    fig, axes = new_figure(1, len(panels), size=(3.6, 3.2))
    for ax, (name, m) in zip(axes[0], panels):
        data = m.double().cpu().numpy()
        if log:
            import matplotlib.colors as mcolors

            positive = data[data > 0]
            vmin = float(positive.min()) if positive.size else 1.0
            im = ax.imshow(data, cmap="viridis", norm=mcolors.LogNorm(vmin=vmin, vmax=max(float(data.max()), vmin)))
        else:
            im = ax.imshow(data, cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
