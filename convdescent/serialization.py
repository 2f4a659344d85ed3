"""One-file models: ``save_model`` writes the architecture and the weights, ``load_model`` rebuilds them.

The file is a plain ``torch.save`` dict of strings, numbers, lists and tensors, so
``torch.load(path, weights_only=True)`` reads it without running any pickled code:

    {"format": "convdescent-model", "version": 1, "config": model.get_config(),
     "state": model.state_dict(), "dtype": "float32"}
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from .model import Sequential
from .train.checkpoint import atomic_write_bytes

FORMAT = "convdescent-model"
VERSION = 1


class ModelFileError(ValueError):
    """A model file is missing, damaged or not one ``save_model`` wrote; the message says which."""


def model_payload(model: Sequential) -> dict:
    """The dict ``save_model`` writes: configuration and CPU copies of parameters and buffers."""
    if model.input_shape is None:
        raise ValueError("save_model needs a built model: pass input_shape=(C, H, W) or call build(input_shape)")
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "version": VERSION, "config": model.get_config(), "state": state,
            "dtype": str(model.dtype).removeprefix("torch.")}


def save_model(model: Sequential, path) -> Path:
    """Write ``model`` (architecture and weights) to one file, atomically.

    Args:
        model: a built ``Sequential``.
        path: the file to write (conventionally ``*.pt``).

    Returns:
        The path written.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(model_payload(model), buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def model_from_payload(payload, source: str = "the payload", device="cpu", dtype=None) -> Sequential:
    """Rebuild the model of a dict written by ``model_payload`` (``source`` names it in errors)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{source} is not a convdescent model file (written by save_model); "
                             f"a run's checkpoint is read with load_run instead")
    if payload.get("version") != VERSION:
        raise ModelFileError(f"{source} has model-file version {payload.get('version')!r}; this convdescent "
                             f"reads version {VERSION}")
    if dtype is None:
        dtype = getattr(torch, str(payload.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise ModelFileError(f"{source} names an unknown dtype {payload.get('dtype')!r}")
    try:
        model = Sequential.from_config(payload["config"], dtype=dtype, device=device)
        model.load_state_dict(payload["state"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{source} does not describe a loadable model: {e}") from None
    return model


def load_model(path, device="cpu", dtype=None) -> Sequential:
    """Read a file written by ``save_model``: the model, built, with its weights.

    Args:
        path: the file.
        device: where to put the parameters.
        dtype: parameter dtype (default: the saved one).

    Raises:
        ModelFileError: the file is missing, damaged or of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle: torch raises many kinds
        raise ModelFileError(f"cannot read model file {path}: {type(e).__name__}: {e}") from None
    return model_from_payload(payload, str(path), device=device, dtype=dtype)
