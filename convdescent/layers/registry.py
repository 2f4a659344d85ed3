"""Layer classes by name, and a layer's config as plain data: what model files and checkpoints store.

The registry sits apart from the layer modules so that containers (``Residual``) can rebuild their nested
layers from a config without importing the package that imports them.
"""

from __future__ import annotations

from typing import Any

from .base import Layer

LAYERS: dict[str, type[Layer]] = {}


def register_layer(cls: type[Layer]) -> type[Layer]:
    """Make a layer class known to ``Sequential.from_config`` (usable as a decorator)."""
    LAYERS[cls.__name__] = cls
    return cls


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def layer_config(layer: Layer) -> dict[str, Any]:
    """``{"class": name, "config": get_config()}`` with tuples as lists (JSON and TOML friendly)."""
    return {"class": type(layer).__name__, "config": _plain(layer.get_config())}


def layer_from_config(entry: dict[str, Any]) -> Layer:
    """The layer ``layer_config`` described; the class must be registered."""
    cls_name = entry.get("class")
    if cls_name not in LAYERS:
        raise ValueError(f"unknown layer class {cls_name!r} in model config; known: {sorted(LAYERS)}")
    return LAYERS[cls_name].from_config(entry.get("config", {}))
