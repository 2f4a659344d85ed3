"""Models written as TOML files: the layers in order, each with the keys of its ``get_config()``.

    name = "small"
    input_shape = [1, 28, 28]      # optional: the dataset's image shape when left out

    [[layers]]
    type = "Conv2D"
    filters = 32
    kernel_size = [3, 3]

    [[layers]]
    type = "Residual"              # a block's own layers are a nested [[layers.layers]] list
    projection = "auto"

    [[layers.layers]]
    type = "Conv2D"
    filters = 32
    kernel_size = 3
    padding = "same"

``convdescent train --model-file net.toml`` trains it like a named model; ``convdescent models --show NAME
--toml`` prints a named model in this form. Errors name the layer (position and type), the key and the value,
and which shapes met where they do not fit.
"""

from __future__ import annotations

import difflib
import inspect
import tomllib
from pathlib import Path
from typing import Any

import torch

from .layers import LAYERS
from .layers.base import Layer
from .model import Sequential

TOP_KEYS = ("name", "input_shape", "layers")
# Keys whose value is a list of nested layer tables.
NESTED_KEYS = ("layers",)


class ModelFileError(ValueError):
    """A model file is missing, not TOML, or describes a network that cannot be built; the message says where."""


def _where(path: tuple[tuple[int, str], ...]) -> str:
    return " > ".join(f"layer {i} ({t})" for i, t in path)


def _accepted_keys(cls: type[Layer]) -> list[str] | None:
    """The constructor's keyword names (None when it takes **kwargs and so accepts anything)."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name != "self" and p.kind is not p.VAR_POSITIONAL]


def _layer_from_table(table: Any, path: tuple[tuple[int, str], ...], source: str) -> Layer:
    index = path[-1][0]
    prefix = path[:-1]
    if not isinstance(table, dict):
        where = _where(prefix + ((index, "?"),))
        raise ModelFileError(f"{source}: {where} must be a table with a 'type' key, got {table!r}")
    kind = table.get("type")
    if kind not in LAYERS:
        close = difflib.get_close_matches(str(kind), list(LAYERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        what = "has no 'type' key" if kind is None else f"has unknown type {kind!r}"
        raise ModelFileError(f"{source}: layer {index} {'(in ' + _where(prefix) + ') ' if prefix else ''}"
                             f"{what}{hint}; known types: {', '.join(sorted(LAYERS))}")
    path = prefix + ((index, kind),)
    cls = LAYERS[kind]
    config = {k: v for k, v in table.items() if k != "type"}
    accepted = _accepted_keys(cls)
    if accepted is not None:
        for key, value in config.items():
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ModelFileError(f"{source}: {_where(path)}: unknown key {key!r} (value {value!r}){hint}; "
                                     f"{kind} takes {', '.join(accepted)}")
    for key in NESTED_KEYS:
        if key in config:
            items = config[key]
            if not isinstance(items, list):
                raise ModelFileError(f"{source}: {_where(path)}: key {key!r} must be a list of layer tables "
                                     f"([[...{key}]] sections), got {items!r}")
            config[key] = [_layer_from_table(sub, path + ((j, "?"),), source) for j, sub in enumerate(items, 1)]
    try:
        if any(key in config for key in NESTED_KEYS):
            return cls(**config)
        return cls.from_config(config)
    except (TypeError, ValueError) as e:
        message = str(e)
        named = [k for k in config if k in message]
        detail = "".join(f" (key {k!r} = {config[k]!r})" for k in named[:1])
        raise ModelFileError(f"{source}: {_where(path)}{detail}: {message}") from None


def _build_checked(layers: list[Layer], input_shape: tuple[int, ...], path: tuple, source: str) -> None:
    """Build each layer on the previous one's output, so a misfit names the two layers and the shapes."""
    shape = tuple(input_shape)
    before = "the input"
    for i, layer in enumerate(layers, 1):
        here = path + ((i, type(layer).__name__),)
        try:
            shape = tuple(layer.build(shape, dtype=torch.float64))
        except ModelFileError:
            raise
        except (TypeError, ValueError) as e:
            raise ModelFileError(f"{source}: {_where(here)} receives shape {shape} from {before}: {e}") from None
        before = f"layer {i} ({type(layer).__name__})"


def model_from_toml(data: dict, input_shape=None, num_classes: int | None = None, seed: int | None = None,
                    dtype=torch.float32, device="cpu", source: str = "the model file") -> Sequential:
    """Build the network described by parsed model-file TOML.

    Args:
        data: the parsed TOML (``name``, optional ``input_shape``, ``layers``).
        input_shape: (C, H, W) of the data; must equal the file's ``input_shape`` when both are given.
        num_classes: when given, the network's output must be ``(num_classes,)``.
        seed, dtype, device: as for ``Sequential``.
        source: the file's name, for messages.

    Raises:
        ModelFileError: naming the layer, key, value or shapes that are wrong.
    """
    if not isinstance(data, dict):
        raise ModelFileError(f"{source}: a model file is a TOML table with name, input_shape and [[layers]]")
    for key in data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(key, TOP_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ModelFileError(f"{source}: unknown top-level key {key!r}{hint}; a model file has "
                                 f"{', '.join(TOP_KEYS)}")
    tables = data.get("layers")
    if not isinstance(tables, list) or not tables:
        raise ModelFileError(f"{source}: no layers; write each layer as a [[layers]] section with a 'type' key")
    name = data.get("name", Path(source).stem if source != "the model file" else "model_file")
    if not isinstance(name, str) or not name:
        raise ModelFileError(f"{source}: name must be a non-empty string, got {name!r}")
    shape = data.get("input_shape")
    if shape is not None:
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise ModelFileError(f"{source}: input_shape must be a list of positive integers such as [1, 28, 28], "
                                 f"got {shape!r}")
        if input_shape is not None and tuple(shape) != tuple(input_shape):
            raise ModelFileError(f"{source}: the file's input_shape {shape} does not match the data's images "
                                 f"{list(input_shape)}; change input_shape or leave it out")
    shape = tuple(input_shape) if input_shape is not None else (tuple(shape) if shape is not None else None)
    if shape is None:
        raise ModelFileError(f"{source}: no input_shape in the file and none given; add input_shape = [C, H, W]")
    layers = [_layer_from_table(t, ((i, "?"),), source) for i, t in enumerate(tables, 1)]
    try:
        trial = Sequential(layers, name=name)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{source}: {e}") from None
    _build_checked(trial.layers, shape, (), source)
    out = tuple(trial.layers[-1].output_shape)
    if num_classes is not None and out != (num_classes,):
        raise ModelFileError(f"{source}: the last layer, layer {len(layers)} ({type(layers[-1]).__name__}), "
                             f"gives outputs of shape {out}, the data has {num_classes} classes; end with a "
                             f"Dense layer of units = {num_classes} (after a Flatten or a global pooling)")
    # The checked build used a scratch dtype; the real one draws the initial weights as a named model does.
    return Sequential.from_config(trial.get_config() | {"input_shape": list(shape)}, seed=seed, dtype=dtype,
                                  device=device)


def read_model_file(path) -> dict:
    """Parse a model file's TOML (errors name the file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFileError(f"model file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"cannot read model file {path}: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ModelFileError(f"model file {path} is not valid TOML: {e}") from None


def load_model_file(path, input_shape=None, num_classes: int | None = None, seed: int | None = None,
                    dtype=torch.float32, device="cpu") -> Sequential:
    """Build the network of a TOML model file (see the module doc for the format)."""
    return model_from_toml(read_model_file(path), input_shape, num_classes, seed=seed, dtype=dtype, device=device,
                           source=str(path))


# ------------------------------------------------------------------------------------------------ writing

def _table(entry: dict) -> dict:
    """A ``layer_config`` entry ({"class", "config"}) as a model-file table; None values are left out."""
    out: dict[str, Any] = {"type": entry["class"]}
    for key, value in entry["config"].items():
        if value is None:
            continue
        if key in NESTED_KEYS and isinstance(value, list) and all(isinstance(v, dict) and "class" in v
                                                                   for v in value):
            value = [_table(v) for v in value]
        out[key] = value
    return out


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise ModelFileError(f"cannot write {type(value).__name__} value {value!r} to a model file")


def _write_layers(tables: list[dict], section: str, lines: list[str]) -> None:
    for table in tables:
        lines.append("")
        lines.append(f"[[{section}]]")
        nested = []
        for key, value in table.items():
            if key in NESTED_KEYS and isinstance(value, list):
                nested.append((key, value))
                continue
            lines.append(f"{key} = {_value(value)}")
        for key, value in nested:
            _write_layers(value, f"{section}.{key}", lines)


def model_to_toml(model: Sequential, header: str = "") -> str:
    """The model-file text of a built model: reading it back gives the same ``get_config()``."""
    cfg = model.get_config()
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines.append(f"name = {_value(cfg['name'])}")
    if cfg.get("input_shape"):
        lines.append(f"input_shape = {_value(cfg['input_shape'])}")
    _write_layers([_table(e) for e in cfg["layers"]], "layers", lines)
    return "\n".join(lines) + "\n"
