"""What the convolutions learned: the first layer's filters and every conv layer's activation maps for one image."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..layers.conv import Conv2D
from ..model import Sequential
from .border import _is_pointwise


def first_conv(model: Sequential) -> tuple[str, Conv2D]:
    """The first Conv2D of the model in forward order (nested ones included), with its qualified name."""
    for name, layer in model.all_layers():
        if isinstance(layer, Conv2D):
            return name, layer
    raise ValueError(f"model '{model.name}' has no Conv2D layer, so it has no filters to show")


def _activation_targets(layers, prefix: str = "") -> list[tuple[str, object]]:
    """(label, layer whose output is the map) for each Conv2D: its activation when one follows, else itself."""
    out = []
    for i, layer in enumerate(layers):
        if isinstance(layer, Conv2D):
            label = prefix + layer.name
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if nxt is not None and _is_pointwise(nxt) and type(nxt).__name__ not in ("Dropout", "BatchNorm2D"):
                out.append((f"{label} + {nxt.name}", nxt))
            else:
                out.append((label, layer))
        elif type(layer).__name__ == "Residual":
            out.extend(_activation_targets(layer.layers, prefix + layer.name + "."))
    return out


@torch.no_grad()
def conv_activations(model: Sequential, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Every conv layer's activation maps (after its activation function when one follows) for one image.

    Args:
        model: a built Sequential.
        x: one normalized image (1, C, H, W).

    Returns:
        list of (label, maps (F, Ho, Wo)) in forward order.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"conv_activations takes one image of shape (1, C, H, W), got {tuple(x.shape)}")
    targets = _activation_targets(model.layers)
    if not targets:
        raise ValueError(f"model '{model.name}' has no Conv2D layer, so it has no activation maps")
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for idx, (_, layer) in enumerate(targets):
        def keep(name, lyr, out, _idx=idx):
            captured[_idx] = out.detach().clone()

        handles.append(model.register_hook("after_forward", keep, layer=layer))
    try:
        model.predict(x)
    finally:
        for handle in handles:
            handle.remove()
    return [(label, captured[i][0]) for i, (label, _) in enumerate(targets)]


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def filters_figure(weight: torch.Tensor, size=(0.9, 0.9)):
    """A figure of conv filters (F, C, kh, kw) in a grid: RGB when C == 3, else the mean over input channels.

    Each filter is scaled to its own [min, max] so its pattern shows whatever its magnitude.
    """
    from .plotting import new_figure

    if weight.dim() != 4:
        raise ValueError(f"weight must be conv filters (F, C, kh, kw), got shape {tuple(weight.shape)}")
    w = weight.detach().double().cpu()
    f, c = w.shape[:2]
    rows, cols = _grid(f)
    fig, axes = new_figure(rows, cols, size=size)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= f:
            ax.axis("off")
            continue
        k = w[i].permute(1, 2, 0) if c == 3 else w[i].mean(dim=0)
        lo, hi = k.min(), k.max()
        k = (k - lo) / (hi - lo) if hi > lo else torch.zeros_like(k)
        ax.imshow(k.numpy(), cmap=None if c == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
    return fig


def activation_maps_figure(maps: torch.Tensor, max_maps: int = 64, size=(1.0, 1.0)):
    """A figure of activation maps (F, H, W) in a grid (the first ``max_maps`` channels), one color scale.

    Returns:
        (figure, number of maps shown).
    """
    from .plotting import new_figure

    if maps.dim() != 3:
        raise ValueError(f"maps must be (F, H, W), got shape {tuple(maps.shape)}")
    m = maps.detach().double().cpu()[:max_maps]
    rows, cols = _grid(m.shape[0])
    fig, axes = new_figure(rows, cols, size=size)
    vmin, vmax = float(m.min()), float(m.max())
    if vmax <= vmin:
        vmax = vmin + 1.0
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= m.shape[0]:
            ax.axis("off")
            continue
        ax.imshow(m[i].numpy(), cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
    return fig, m.shape[0]


def plot_filters(weight: torch.Tensor, path: str | Path, title: str) -> Path:
    """Write the grid of ``filters_figure`` with a title as a PNG; returns the path."""
    from .plotting import save_figure

    fig = filters_figure(weight)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_activation_maps(maps: torch.Tensor, path: str | Path, title: str, max_maps: int = 64) -> Path:
    """Write the grid of ``activation_maps_figure`` with a title as a PNG; returns the path."""
    from .plotting import save_figure

    fig, shown_count = activation_maps_figure(maps, max_maps)
    shown = f" (first {shown_count} of {maps.shape[0]})" if maps.shape[0] > shown_count else ""
    fig.suptitle(f"{title}{shown}", fontsize=9)
    return save_figure(fig, path)


def safe_name(label: str) -> str:
    """A file-name-safe version of a layer label ("conv1 + relu1" -> "conv1_relu1")."""
    keep = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)
    while "__" in keep:
        keep = keep.replace("__", "_")
    return keep.strip("_")


def write_filter_pictures(model: Sequential, x: torch.Tensor, out_dir: str | Path) -> list[Path]:
    """PNGs of the first layer's filters and of every conv layer's activation maps for image ``x``.

    Args:
        model: a built Sequential.
        x: one normalized image (1, C, H, W).
        out_dir: folder to write into (created).

    Returns:
        The written paths: ``filters_<conv>.png`` then ``activations_<layer>.png`` per conv layer.
    """
    out_dir = Path(out_dir)
    name, conv = first_conv(model)
    paths = [plot_filters(conv.params["weight"], out_dir / f"filters_{safe_name(name)}.png",
                          f"{name}: {conv.filters} filters {conv.kernel_size[0]}x{conv.kernel_size[1]}")]
    for label, maps in conv_activations(model, x):
        paths.append(plot_activation_maps(maps, out_dir / f"activations_{safe_name(label)}.png",
                                          f"{label}: {maps.shape[0]} maps {maps.shape[1]}x{maps.shape[2]}"))
    return paths
