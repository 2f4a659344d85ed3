"""Starting from a trained network: weights taken from a run (``--init-from``) and frozen layers (``--freeze``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import Sequential
from .train.checkpoint import CheckpointError, load_checkpoint


@dataclass
class InitReport:
    """What ``init_from_run`` did.

    Attributes:
        source: the checkpoint file read.
        loaded: the model's tensors (parameters and buffers) that took the run's values.
        not_loaded: the model's tensors left at their initial values, each with the reason.
        unused: the run's tensors that matched nothing in the model.
    """

    source: Path
    loaded: list[str] = field(default_factory=list)
    not_loaded: list[tuple[str, str]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A readable account: how many tensors were loaded, then each one that was not."""
        out = [f"Initialized {len(self.loaded)} of {len(self.loaded) + len(self.not_loaded)} tensors from "
               f"{self.source}"]
        out += [f"  not loaded: {name} ({why})" for name, why in self.not_loaded]
        if self.unused:
            out.append(f"  unused from the run: {', '.join(self.unused)}")
        return out


def run_checkpoint_path(run_dir, checkpoint: str = "best") -> Path:
    """The checkpoint file of a run: best.pt (last.pt when there is no best yet) or last.pt."""
    if checkpoint not in ("best", "last"):
        raise CheckpointError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"--init-from: run directory {run} does not exist")
    folder = run / "checkpoints"
    path = folder / f"{checkpoint}.pt"
    if checkpoint == "best" and not path.exists():
        path = folder / "last.pt"
    if not path.exists():
        raise CheckpointError(f"--init-from: {run} has no checkpoint ({path.name}); pass a run directory "
                              f"written by 'convdescent train'")
    return path


def init_from_run(model: Sequential, run_dir, checkpoint: str = "best") -> InitReport:
    """Copy a run's weights into ``model`` wherever a tensor has the same qualified name and shape.

    Args:
        model: a built ``Sequential``.
        run_dir: a run directory.
        checkpoint: "best" or "last".

    Returns:
        ``InitReport`` listing what was and was not loaded.
    """
    path = run_checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(path).get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no model weights")
    report = InitReport(path)
    own = model.state_dict()
    with torch.no_grad():
        for name, target in own.items():
            source = state.get(name)
            if source is None:
                report.not_loaded.append((name, "not in the run"))
            elif tuple(source.shape) != tuple(target.shape):
                report.not_loaded.append((name, f"shape {tuple(target.shape)} here, {tuple(source.shape)} in the run"))
            else:
                target.copy_(source.to(device=target.device, dtype=target.dtype))
                report.loaded.append(name)
    report.unused = [name for name in state if name not in own]
    return report


def split_names(spec) -> list[str]:
    """``"conv1, conv2"`` or ``["conv1", "conv2"]`` as a list of names."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [s.strip() for s in items if s.strip()]


def frozen_params(model: Sequential, patterns) -> list[str]:
    """The qualified parameter names selected by layer names or prefixes (``Sequential.select_params``).

    Raises:
        ValueError: a pattern selects no parameter (the message lists the layers that have some).
    """
    return model.select_params(split_names(patterns), what="--freeze")
