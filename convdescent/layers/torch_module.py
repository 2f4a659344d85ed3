"""Adapter that lets any ``torch.nn.Module`` take part in a model under the same layer contract.

The engine runs with autograd off; this layer is the one place where it is switched on. Forward runs the
module under ``torch.enable_grad()`` on a detached copy of the input that requires grad, keeping the graph;
backward asks ``torch.autograd.grad`` for dL/dx and dL/dparams given delta = dL/dy, and writes the latter
into ``grads`` under the module's own parameter names (``weight``, ``0.bias``...).
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import torch

from .base import Layer


def _resolve(path: str) -> type:
    module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"module must be a torch.nn.Module or the dotted path of a torch.nn.Module class "
                         f"such as 'torch.nn.GELU', got {path!r}")
    return cls


class TorchModule(Layer):
    """Wrap a ``torch.nn.Module`` as a layer whose gradients come from torch.autograd.

    Args:
        module: a module instance, or the dotted path of a module class (``"torch.nn.GELU"``) built with
            ``kwargs``; only the second form can be rebuilt from ``get_config()``.
        kwargs: constructor arguments when ``module`` is a path.

    Shapes: whatever the module maps (N, *input_shape) to; found by running it once on zeros at build.
    ``params`` are the module's trainable parameters under their torch names (tensors sharing the
    module's storage, so in-place optimizer updates reach the module); frozen parameters and the module's
    buffers appear in ``buffers()``.
    """

    kind = "torch"

    def __init__(self, module, kwargs: dict[str, Any] | None = None, name: str | None = None):
        super().__init__(name)
        if isinstance(module, str):
            cls = _resolve(module)
            self.module_path = module
            self.module_kwargs = dict(kwargs or {})
            try:
                module = cls(**self.module_kwargs)
            except TypeError as err:
                raise ValueError(f"could not build {module}(**{self.module_kwargs!r}): {err}") from None
        elif isinstance(module, torch.nn.Module):
            if kwargs:
                raise ValueError("kwargs are only used with a module path such as 'torch.nn.GELU', "
                                 f"got a module instance and kwargs={kwargs!r}")
            self.module_path = None
            self.module_kwargs = None
        else:
            raise ValueError(f"module must be a torch.nn.Module or a dotted class path, got {type(module).__name__}")
        self.module: torch.nn.Module = module
        self._buffers: dict[str, torch.Tensor] = {}
        self._collect()

    def _collect(self) -> None:
        # Detached views share storage with the module's parameters: updates through params reach the module,
        # and in-place updates are allowed on them without autograd complaining about leaf tensors.
        self.params = {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}
        self._buffers = {n: p.detach() for n, p in self.module.named_parameters() if not p.requires_grad}
        self._buffers.update({n: b for n, b in self.module.named_buffers()})
        self.grads = {}

    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        self.module.to(device=device, dtype=dtype)
        self._collect()
        self.input_shape = tuple(input_shape)
        was_training = self.module.training
        self.module.eval()  # shape probing must not touch running statistics
        try:
            with torch.no_grad():
                probe = self.module(torch.zeros((2,) + self.input_shape, dtype=dtype, device=device))
        except Exception as err:
            raise ValueError(f"TorchModule '{self.name}' ({type(self.module).__name__}) fails on inputs of shape "
                             f"(N, {', '.join(map(str, self.input_shape))}): {err}") from None
        finally:
            self.module.train(was_training)
        if not isinstance(probe, torch.Tensor):
            raise ValueError(f"TorchModule '{self.name}': the module must return one tensor, "
                             f"got {type(probe).__name__}")
        self.output_shape = tuple(probe.shape[1:])
        self.built = True
        return self.output_shape

    def buffers(self):
        return dict(self._buffers)

    def to(self, device=None, dtype=None):
        self.module.to(device=device, dtype=dtype)
        self._collect()
        return self

    def forward(self, x, train=False):
        self.module.train(train)
        with torch.enable_grad():
            xin = x.detach().requires_grad_(self.needs_input_grad)
            y = self.module(xin)
        self._cache = (xin, y)
        return y.detach()

    def backward(self, dy):
        xin, y = self._cache
        self._cache = None
        # a frozen module differentiates only its input
        names = [n for n, p in self.module.named_parameters() if p.requires_grad and self.trainable]
        tensors = [p for p in self.module.parameters() if p.requires_grad and self.trainable]
        if self.needs_input_grad:
            tensors = [xin] + tensors
        if not tensors:
            return None
        if y.grad_fn is None:
            raise RuntimeError(f"TorchModule '{self.name}': the module's output does not depend on its input or "
                               f"parameters, so there is nothing to differentiate")
        grads = torch.autograd.grad(y, tensors, grad_outputs=dy, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
        dx = grads.pop(0) if self.needs_input_grad else None
        if self.trainable:
            self.grads = dict(zip(names, grads))
        return dx

    def get_config(self):
        return {"module": self.module_path or f"{type(self.module).__module__}.{type(self.module).__qualname__}",
                "kwargs": self.module_kwargs, "name": self.name}

    @classmethod
    def from_config(cls, config):
        if config.get("kwargs") is None:
            raise ValueError(f"TorchModule {config.get('name')!r} wraps a module instance of "
                             f"{config.get('module')}, which cannot be rebuilt from a config; build it as "
                             f"TorchModule('{config.get('module')}', kwargs={{...}}) to make it rebuildable")
        return cls(config["module"], kwargs=config["kwargs"], name=config.get("name"))

    def to_torch(self):
        return copy.deepcopy(self.module)

    def __repr__(self):
        return f"TorchModule({self.module!r})"
