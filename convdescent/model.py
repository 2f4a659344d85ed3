"""Sequential models: a list of layers run forward in order and backward in reverse."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch

from . import allocator, native
from .hooks import HookHandle, Hooks
from .layers.base import Layer, assign_names
from .layers.registry import layer_config, layer_from_config
from .plan import Plan, compile_plan
from .workspace import Workspace


# Examples per chunk for the leading conv/pool/activation layers; measured on a 2-core CPU with the
# tutorial's CNN (benchmarks/train_cpu.py), chunks of 32 run the conv block of a batch of 128 about 1.8x faster.
DEFAULT_CHUNK_SIZE = 32


def fusion_default() -> bool:
    """Fused plan nodes unless the environment says ``CONVDESCENT_FUSION=0`` (the reference plan)."""
    return os.environ.get("CONVDESCENT_FUSION", "1") != "0"


def _set_data(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"state_dict entry {name!r} has shape {tuple(value.shape)}, "
                         f"the model expects {tuple(target.shape)}")
    target.copy_(value)


class Sequential:
    """A stack of layers with named parameters, explicit backward, summary, state_dict and torch export.

    Args:
        layers: the layers, in order.
        input_shape: (C, H, W) or (features,), without the batch axis; builds the model at once when given.
        seed: seeds the initializers (``None``: torch's global generator).
        dtype, device: where parameters live.

    Parameters are named ``<layer>.<param>`` with automatic layer names such as ``conv1``, ``dense2``.
    """

    #: compiled plans kept for reuse (``plan()``)
    KEPT_PLANS = 4

    def __init__(self, layers: Iterable[Layer], input_shape=None, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device="cpu", name: str = "sequential"):
        self.layers: list[Layer] = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential takes convdescent layers; item {i} is {type(layer).__name__}. "
                                f"Wrap torch modules in TorchModule(...)")
        self.name = name
        self.input_shape = None
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.fusion = fusion_default()
        self.hooks = Hooks()
        self._plan: Plan | None = None
        self._plan_key = None
        # the last few compiled plans by key: a hook set paused and resumed (the health check's, every 50
        # steps) switches between two plans instead of compiling one twice per check
        self._plans: dict[tuple, Plan] = {}
        self._pending: Plan | None = None  # the plan of the last training forward, until its backward
        self._updated: frozenset = frozenset()  # parameters the last backward updated itself (no gradient)
        self._workspace = Workspace()  # the training step's reused buffers (step_buffers)
        self.dtype = dtype
        self.device = torch.device(device)
        assign_names(self.layers)
        if self.layers:
            self.layers[0].needs_input_grad = False
        if input_shape is not None:
            self.build(input_shape, seed=seed)

    # -- building ----------------------------------------------------------------------------
    def build(self, input_shape, seed: int | None = None) -> "Sequential":
        """Create every layer's parameters for inputs of ``input_shape`` (no batch axis)."""
        shape = tuple(int(s) for s in input_shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"input_shape must be positive sizes like (1, 28, 28), got {input_shape!r}")
        self.input_shape = shape
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
        for layer in self.layers:
            shape = layer.build(shape, generator=gen, dtype=self.dtype, device=self.device)
        self.output_shape = shape
        return self

    def _require_built(self) -> None:
        if self.input_shape is None:
            raise RuntimeError("the model is not built: pass input_shape=(C, H, W) or call build(input_shape)")

    # -- parameters --------------------------------------------------------------------------
    def params(self) -> "OrderedDict[str, torch.Tensor]":
        """All trainable tensors by qualified name (the model's own tensors, not copies)."""
        out = OrderedDict()
        for layer in self.layers:
            out.update(layer.named_params(f"{layer.name}."))
        return out

    def grads(self) -> "OrderedDict[str, torch.Tensor]":
        """The gradients written by the last ``backward``, keyed like ``params()``, less the parameters that
        backward updated itself (``updated_in_backward()``), whose gradients were never written out."""
        out = OrderedDict()
        updated = self._updated
        for layer in self.layers:
            try:
                out.update(layer.named_grads(f"{layer.name}.", updated))
            except KeyError:
                raise RuntimeError("no gradients yet: run forward and backward first") from None
        return out

    def updated_in_backward(self) -> frozenset:
        """Names of the parameters the last backward updated itself (``backward(dy, update=...)``): their
        gradients were never written out, so ``grads()`` leaves them out."""
        return self._updated

    def buffers(self) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict()
        for layer in self.layers:
            out.update(layer.named_buffers(f"{layer.name}."))
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params().values())

    def all_layers(self) -> list[tuple[str, Layer]]:
        """Every layer with its qualified name, nested ones included, in forward order."""
        found: list[tuple[str, Layer]] = []

        def visit(layer: Layer, prefix: str) -> None:
            found.append((prefix + layer.name, layer))
            for sub in layer.sublayers():
                visit(sub, f"{prefix}{layer.name}.")

        for layer in self.layers:
            visit(layer, "")
        return found

    # -- frozen layers -----------------------------------------------------------------------
    def select_params(self, patterns, what: str = "freeze") -> list[str]:
        """The qualified parameter names selected by layer names or prefixes.

        A pattern selects a parameter when it equals its name, a dotted prefix of it (``residual1`` selects
        ``residual1.conv1.weight``; ``conv1`` selects ``conv1.weight`` and ``conv1.bias``), or, ending in
        ``*``, when the name starts with the rest (``conv*``). ``patterns`` is a list or a comma-separated
        string.

        Raises:
            ValueError: a pattern selects no parameter (the message, which starts with ``what``, lists the
                layers that have some).
        """
        items = patterns.split(",") if isinstance(patterns, str) else list(patterns or [])
        names = list(self.params())
        chosen: list[str] = []
        for pattern in (p.strip() for p in items):
            if not pattern:
                continue
            if pattern.endswith("*"):
                hits = [n for n in names if n.startswith(pattern[:-1])]
            else:
                hits = [n for n in names if n == pattern or n.startswith(pattern + ".")]
            if not hits:
                layers = sorted({n.rsplit(".", 1)[0] for n in names})
                raise ValueError(f"{what} {pattern!r} matches no parameter of model '{self.name}'; its layers "
                                 f"with parameters are {', '.join(layers)}")
            chosen += [n for n in hits if n not in chosen]
        return chosen

    def freeze(self, patterns) -> list[str]:
        """Freeze the layers whose parameters ``patterns`` select (see ``select_params``); returns the names.

        A layer all of whose parameters are selected gets ``trainable = False``: its backward computes only
        dL/dx, a batch norm among them normalizes with its running statistics and stops updating them, and
        the plan's backward stops at the first node with trainable parameters (``plan()`` says where). The
        optimizer must leave the returned parameters alone: wrap it in ``optim.masked.freeze(opt, names)``
        (``--freeze`` does), or weight decay would still move them. A layer only some of whose parameters
        are selected stays trainable (only the optimizer keeps those fixed).
        """
        names = self.select_params(patterns)
        chosen = set(names)
        for qname, layer in self.all_layers():
            own = [f"{qname}.{key}" for key in layer.params]
            if own and all(n in chosen for n in own):
                layer.trainable = False
        return names

    def unfreeze(self) -> None:
        """Make every layer trainable again."""
        for _, layer in self.all_layers():
            if not layer.trainable:
                layer.trainable = True

    def frozen_layers(self) -> list[str]:
        """Qualified names of the frozen layers that have parameters."""
        return [name for name, layer in self.all_layers() if layer.params and not layer.trainable]

    # -- the execution plan and hooks -------------------------------------------------------
    def set_fusion(self, enabled: bool) -> bool:
        """Turn fused plan nodes (conv+pool passes, the ReLU after max-pool) on or off; returns the old value.

        Off, every layer runs on its own in written order: the reference the fused plan must match.
        The default comes from ``CONVDESCENT_FUSION`` (``0``: off)."""
        previous, self.fusion = self.fusion, bool(enabled)
        return previous

    def register_hook(self, event: str, fn: Callable, layer: Layer | str | None = None, *,
                      split: bool = True) -> HookHandle:
        """Call ``fn`` after a layer's forward or backward; returns a handle whose ``remove()`` undoes it.

        Args:
            event: "after_forward" (``fn(layer_name, layer, output)``), "after_backward"
                (``fn(layer_name, layer, grads)``: the layer's parameter gradients by qualified name, final)
                or "before_forward" (``fn(layer_name, layer, input)``).
            fn: a function that only reads what it is given.
            layer: a layer of this model (nested ones included), its qualified name, or None for every layer.
            split: forward events: whether the hook may split a fused node to see a layer's own input/output
                (False: such a layer's hook is not called and the node stays fused). ``plan()`` shows which.

        Returns:
            a ``HookHandle``.
        """
        target = None
        if layer is not None:
            names = {id(obj): name for name, obj in self.all_layers()}
            if isinstance(layer, Layer):
                if id(layer) not in names:
                    raise ValueError(f"register_hook: layer {layer!r} is not part of model '{self.name}'")
                target = names[id(layer)]
            elif isinstance(layer, str):
                if layer not in names.values():
                    raise ValueError(f"register_hook: model '{self.name}' has no layer named {layer!r}; "
                                     f"its layers: {', '.join(names.values())}")
                target = layer
            else:
                raise TypeError(f"register_hook: layer must be a Layer, a layer name or None, "
                                f"got {type(layer).__name__}")
        return self.hooks.add(event, fn, target, split)

    def plan(self) -> Plan:
        """The execution plan the next forward runs (``print(model.plan())`` describes it)."""
        self._require_built()
        key = (self.hooks.signature(), self.fusion, self.chunk_size, native.enabled(), self.input_shape,
               tuple(map(id, self.layers)), tuple(layer.trainable for _, layer in self.all_layers()))
        if key != self._plan_key:
            registered = self.hooks.registered()  # a plan that calls a removed hook is dropped with it
            self._plans = {k: p for k, p in self._plans.items() if k[0] <= registered}
            plan = self._plans.pop(key, None)
            if plan is None:
                plan = compile_plan(self.layers, self.hooks, self.fusion, self.chunk_size)
                self._workspace.clear()  # the new plan's buffers may differ; the old ones go with it
            self._plans[key] = plan  # the most recent last
            while len(self._plans) > self.KEPT_PLANS:
                del self._plans[next(iter(self._plans))]
            self._plan, self._plan_key = plan, key
        return self._plan

    def step_buffers(self):
        """A context in which the plan's kernels reuse their buffers from the last step instead of taking fresh
        memory (``workspace.py``); ``train_step`` runs in it. Tensors the nodes pass each other inside it (and
        the dL/dinput ``backward`` returns) are overwritten by the next step's, so it is a null context when a
        forward hook (which may keep what it is shown) is active; the model's output (what the loss function
        is given) is always fresh memory."""
        if self.hooks.observes_forward():
            return contextlib.nullcontext()
        return self._workspace

    # -- computation -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Run the plan on x of shape (N, *input_shape); keeps what backward needs.

        How the layers run (fused nodes, a chunked stage, where hooks fire) is ``self.plan()``; the result
        is the computation the layers describe, up to rounding. ``chunk_size = 0`` turns the chunks off,
        ``set_fusion(False)`` the fused nodes.
        """
        self._require_built()
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"model '{self.name}' expects inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        if train:
            allocator.tune()  # once per process: keep each step's scratch memory for the next
        plan = self.plan()
        for layer in self.layers:
            layer.training = train
        out = plan.forward(x, train, fresh_output=True)  # what the caller gets is never a reused buffer
        self._pending = plan
        return out

    __call__ = forward

    def backward(self, dy: torch.Tensor, update=None) -> torch.Tensor | None:
        """Propagate dL/doutput back; fills every layer's grads and returns dL/dinput (or None).

        ``update``: the optimizer's coming step (an ``optim.InlineAdam``), for the layers that can apply it to
        their own parameters inside their backward (see ``Plan.backward``); those parameters are updated and
        get no gradient (``updated_in_backward()`` names them)."""
        plan, self._pending = self._pending, None
        if plan is None:
            raise RuntimeError("backward needs a forward first (each forward allows one backward)")
        self._updated = frozenset()
        try:
            dx = plan.backward(dy, update)
        finally:  # also when a later layer's backward raised: what was updated already stays named
            if update is not None:
                self._updated = frozenset(update.taken)
        return dx

    def clear_cache(self) -> None:
        """Drop what the last forward kept (after evaluation, when no backward follows)."""
        self._pending = None
        if self._plan is not None:
            self._plan.clear_cache()
        for layer in self.layers:
            layer.clear_cache()

    def set_input_grad(self, needed: bool) -> None:
        """Ask the first layer to return dL/dinput (saliency, gradcheck) or to skip it (training)."""
        if self.layers:
            self.layers[0].needs_input_grad = needed

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Outputs (logits) for x in evaluation mode, in batches to bound memory."""
        outs = [self.forward(x[i:i + batch_size], train=False) for i in range(0, x.shape[0], batch_size)]
        self.clear_cache()  # drop what forward kept for a backward that will not come
        return torch.cat(outs) if outs else torch.empty(0)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """Parameters and buffers by name (references; clone before keeping across training)."""
        out = self.params()
        out.update(self.buffers())
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy tensors into the model by name; with ``strict`` every name must match both ways."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise ValueError(f"state_dict does not match the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for key, target in own.items():
                if key in state:
                    _set_data(target, state[key].to(device=target.device, dtype=target.dtype), key)

    def to(self, device=None, dtype=None) -> "Sequential":
        """Move every parameter and buffer (returns self)."""
        for _, layer in self.all_layers():
            layer.to(device=device, dtype=dtype)
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    # -- description -------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Everything needed to rebuild the architecture with ``Sequential.from_config``."""
        return {"name": self.name, "input_shape": list(self.input_shape) if self.input_shape else None,
                "layers": [layer_config(layer) for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int | None = None, dtype=torch.float32,
                    device="cpu") -> "Sequential":
        layers = [layer_from_config(c) for c in config["layers"]]
        return cls(layers, input_shape=config.get("input_shape"), seed=seed, dtype=dtype, device=device,
                   name=config.get("name", "sequential"))

    def summary(self) -> str:
        """A table of layers, output shapes and parameter counts."""
        self._require_built()
        rows = [("Layer (type)", "Output shape", "Params")]
        for layer in self.layers:
            count = sum(p.numel() for _, p in layer.named_params())
            rows.append((f"{layer.name} ({type(layer).__name__})",
                         "(None, " + ", ".join(map(str, layer.output_shape)) + ")", f"{count:,}"))
        w0 = max(len(r[0]) for r in rows) + 2
        w1 = max(len(r[1]) for r in rows) + 2
        w2 = max(len(r[2]) for r in rows)
        line = "-" * (w0 + w1 + w2)
        out = [f'Model "{self.name}"  input (None, ' + ", ".join(map(str, self.input_shape)) + ")", line]
        for i, r in enumerate(rows):
            out.append(f"{r[0]:<{w0}}{r[1]:<{w1}}{r[2]:>{w2}}")
            if i == 0:
                out.append(line)
        out.append(line)
        total = self.num_params()
        nbytes = sum(p.numel() * p.element_size() for p in self.params().values())
        out.append("Execution plan: " + "\n".join(self.plan().describe()))
        out.append(line)
        out.append(f"Total params: {total:,} ({nbytes / 2**20:.2f} MiB)")
        return "\n".join(out)

    def to_torch(self) -> torch.nn.Sequential:
        """An equivalent ``torch.nn.Sequential`` of standard modules with copies of the weights.

        Module names equal layer names, so its state_dict keys match ``self.state_dict()`` for plain layers.
        """
        self._require_built()
        return torch.nn.Sequential(OrderedDict((layer.name, layer.to_torch()) for layer in self.layers))

    def __repr__(self) -> str:
        return f"Sequential({', '.join(repr(layer) for layer in self.layers)})"
