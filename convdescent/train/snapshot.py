"""One snapshot of everything a training step changes, saved and put back exactly.

The trainer's last verified state (for rollbacks and the NaN replay), the learning-rate range test (which
trains and must leave no trace) and checkpoints all use it: weights and buffers, the optimizer state, the
random generators (torch's, CUDA's, and every random layer's own) and the loader's epoch and position.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import optim
from ..layers.dropout import rng_states, set_rng_states


def random_states(model) -> dict[str, Any]:
    """The random generators a step draws from: torch's global one, CUDA's (once initialized) and the
    model's random layers' own (by qualified name).

    Returns:
        {"torch": uint8 tensor, "cuda": [uint8 tensors] (when CUDA is in use), "layers": {name: uint8 tensor}}.
    """
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    out["layers"] = rng_states(model)
    return out


def set_random_states(model, states: dict[str, Any]) -> None:
    """Put back generator states from ``random_states``; the model's random layers must match them."""
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    set_rng_states(model, states.get("layers", {}))


class Snapshot:
    """Weights, buffers, optimizer state, random generators and loader position at one moment.

    Args:
        model: a built ``Sequential``.
        opt_state: the optimizer state to keep (None: none).
        loader: a ``BatchLoader`` (or anything with ``state_dict``/``load_state_dict``), or None.
    """

    def __init__(self, model, opt_state=None, loader=None):
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer = optim.state_dict(opt_state) if opt_state is not None else None
        self.random = random_states(model)
        self.random["layers"] = {k: v.clone() for k, v in self.random["layers"].items()}
        self.loader = loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None

    def restore(self, model, opt_state=None, loader=None):
        """Put the model, generators and loader back as they were; returns the optimizer state rebuilt
        into ``opt_state``'s structure (None when no optimizer state was saved or none is given).

        Args:
            model: the model the snapshot was taken of.
            opt_state: a state of the same optimizer (its structure; its values are not read).
            loader: the loader the snapshot was taken of.
        """
        model.load_state_dict(self.model)
        model.clear_cache()
        set_random_states(model, self.random)
        if loader is not None and self.loader is not None:
            loader.load_state_dict(self.loader)
        if opt_state is None or self.optimizer is None:
            return None
        return optim.load_state_dict(opt_state, self.optimizer)
