"""Mixed precision without autocast: bf16 compute on fp32 master weights.

The engine has no autograd, so mixed precision is explicit. Before each step the fp32 master parameters
are copied into persistent bf16 shadows, the layers are pointed at the shadows, the inputs are cast to
bf16, and forward and backward run in bf16. The logits are cast to fp32 for the loss (softmax and log in
bf16 lose too much), the gradient of the loss is cast back to bf16 for backward, and the layers' bf16
gradients are cast to fp32 for the optimizer, which updates the fp32 masters. Evaluation uses the fp32
masters. (Micikevicius et al. 2018, "Mixed precision training", keep fp32 master weights for the same
reason: small updates vanish when added to low-precision weights.)
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


class Precision:
    """How a step computes: ``fp32`` (the model as it is) or ``bf16`` (shadows, as described above).

    Args:
        model: the ``Sequential`` whose parameters are the fp32 masters.
        name: "fp32" or "bf16".
    """

    def __init__(self, model, name: str = "fp32"):
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        self.name = name
        self.model = model
        self.compute_dtype = torch.bfloat16 if name == "bf16" else None
        self._slots: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []
        if self.compute_dtype is not None:
            self._build_shadows()

    @property
    def mixed(self) -> bool:
        return self.compute_dtype is not None

    def _build_shadows(self) -> None:
        self._slots = []
        for _, layer in self.model.all_layers():
            for key, master in layer.params.items():
                self._slots.append((layer.params, key, master, torch.empty_like(master, dtype=self.compute_dtype)))
        self._masters = [s[2] for s in self._slots]
        self._shadows = [s[3] for s in self._slots]

    def refresh(self) -> None:
        """Rebuild the shadows after the model's parameter tensors were replaced (e.g. ``model.to``)."""
        if self.mixed:
            self._build_shadows()

    @contextlib.contextmanager
    def compute(self):
        """Inside the block the layers use bf16 copies of the current masters (fp32: a no-op)."""
        if not self.mixed:
            yield
            return
        torch._foreach_copy_(self._shadows, self._masters)
        for params, key, _, shadow in self._slots:
            params[key] = shadow
        try:
            yield
        finally:
            for params, key, master, _ in self._slots:
                params[key] = master

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if not self.mixed else x.to(self.compute_dtype)

    def cast_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if not self.mixed else logits.float()

    def cast_output_grad(self, dlogits: torch.Tensor) -> torch.Tensor:
        return dlogits if not self.mixed else dlogits.to(self.compute_dtype)

    def master_grads(self, grads: dict) -> dict:
        """Gradients in the masters' dtype (fresh fp32 tensors for bf16; the layers' own tensors for fp32)."""
        if not self.mixed:
            return grads
        keys = list(grads)
        return dict(zip(keys, (g.float() for g in grads.values())))
