"""Sequential models: a list of layers run forward in order and backward in reverse."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

import torch

from . import allocator
from .layers.base import Layer, assign_names
from .layers.conv import Conv2D
from .layers.pool import MaxPool2D


# Examples per chunk for the leading conv/pool/activation layers; measured on a 2-core CPU with the
# tutorial's CNN (benchmarks/train_cpu.py), chunks of 32 run the conv block of a batch of 128 about 1.8x faster.
DEFAULT_CHUNK_SIZE = 32


def _set_data(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"state_dict entry {name!r} has shape {tuple(value.shape)}, "
                         f"the model expects {tuple(target.shape)}")
    target.copy_(value)


def _fusable_pair(a: Layer, b: Layer) -> bool:
    """A plain Conv2D right before a plain MaxPool2D, neither forward replaced on the instance (a probe)."""
    return (type(a) is Conv2D and type(b) is MaxPool2D
            and "forward" not in a.__dict__ and "forward" not in b.__dict__)


class Sequential:
    """A stack of layers with named parameters, explicit backward, summary, state_dict and torch export.

    Args:
        layers: the layers, in order.
        input_shape: (C, H, W) or (features,), without the batch axis; builds the model at once when given.
        seed: seeds the initializers (``None``: torch's global generator).
        dtype, device: where parameters live.

    Parameters are named ``<layer>.<param>`` with automatic layer names such as ``conv1``, ``dense2``.
    """

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
        self._run = None  # (chunked layers, other layers, per-chunk caches, chunk sizes) of the last forward
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
        """The gradients written by the last ``backward``, keyed like ``params()``."""
        out = OrderedDict()
        for layer in self.layers:
            try:
                out.update(layer.named_grads(f"{layer.name}."))
            except KeyError:
                raise RuntimeError("no gradients yet: run forward and backward first") from None
        return out

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

    # -- computation -------------------------------------------------------------------------
    def _chunked_prefix(self) -> int:
        """How many leading layers run chunk by chunk (0: none).

        Only worth it when a conv among them writes its whole feature map: a conv fused with the max-pool
        after it (``_run_forward``) never does, and with every conv fused the chunks only add work
        (measured: the tutorial's CNN at batch 128 ran 5-8% faster unchunked once its conv was fused)."""
        count = 0
        for layer in self.layers:
            if not layer.samplewise:
                break
            count += 1
        order = self._execution_order(self.layers[:count])
        for i, layer in enumerate(order):
            if layer.kind != "conv":
                continue
            fused = (i + 1 < len(order) and _fusable_pair(layer, order[i + 1])
                     and layer.fuses_with(order[i + 1]))
            if not fused:
                return count
        return 0

    @staticmethod
    def _execution_order(layers: list[Layer]) -> list[Layer]:
        """The layers in the order they run: a ReLU followed by a max-pool runs after it instead.

        Max-pooling and ReLU commute exactly, values and gradients alike: max is monotone, so
        pool(relu(x)) = relu(pool(x)); where a window's maximum is positive both route its gradient to the
        same element, and where it is not both give zero. Running the ReLU on the pooled map does its
        forward and backward on a quarter of the elements (for 2x2 pools). A layer whose ``forward`` was
        replaced on the instance (a probe recording its output) keeps its written place.
        """
        order = list(layers)
        i = 0
        while i < len(order) - 1:
            a, b = order[i], order[i + 1]
            if (type(a).__name__ == "ReLU" and type(b).__name__ == "MaxPool2D"
                    and "forward" not in a.__dict__ and "forward" not in b.__dict__):
                order[i], order[i + 1] = b, a
                i += 2
            else:
                i += 1
        return order

    @staticmethod
    def _run_forward(order: list[Layer], x: torch.Tensor, train: bool) -> torch.Tensor:
        """Run ``order``'s forwards; a Conv2D directly followed by a MaxPool2D runs as one native pass
        (``Conv2D.forward_pooled``) where it applies. That pass leaves both layers' caches as their own
        forwards would, so the backward is unchanged; it is skipped when either forward was replaced on
        the instance (a probe that records outputs), as the conv's own output is never written."""
        i = 0
        while i < len(order):
            layer = order[i]
            if i + 1 < len(order) and _fusable_pair(layer, order[i + 1]):
                y = layer.forward_pooled(x, order[i + 1], train)
                if y is not None:
                    x = y
                    i += 2
                    continue
            x = layer.forward(x, train)
            i += 1
        return x

    @staticmethod
    def _run_backward(order: list[Layer], dy: torch.Tensor) -> torch.Tensor | None:
        """Run ``order``'s backwards, last first; a first-layer Conv2D and the MaxPool2D after it take one
        native pass (``Conv2D.backward_pooled``) where it applies, unless either backward was replaced on
        the instance."""
        i = len(order) - 1
        while i >= 0:
            layer = order[i]
            if (i >= 1 and _fusable_pair(order[i - 1], layer) and "backward" not in layer.__dict__
                    and "backward" not in order[i - 1].__dict__ and order[i - 1].backward_pooled(dy, layer)):
                dy = None
                i -= 2
                continue
            dy = layer.backward(dy)
            i -= 1
        return dy

    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Run all layers; x is (N, *input_shape). Keeps what backward needs.

        The leading sample-wise layers (convolutions, pooling, activations, flatten) run on chunks of
        ``chunk_size`` examples and their outputs are concatenated: each chunk's activations stay in the
        CPU caches from one layer to the next, which makes large batches markedly faster. The result is
        the same computation; gradients are summed over chunks in ``backward``. ``chunk_size = 0``
        turns this off (one pass over the whole batch). See also ``_execution_order``.
        """
        self._require_built()
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"model '{self.name}' expects inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        if train:
            allocator.tune()  # once per process: keep each step's scratch memory for the next
        for layer in self.layers:
            layer.training = train
        prefix = self._chunked_prefix() if self.chunk_size else 0
        if not (prefix and x.shape[0] > self.chunk_size):
            prefix = 0
        head = self._execution_order(self.layers[:prefix])
        rest = self._execution_order(self.layers[prefix:])
        caches, sizes = [], []
        if head:
            outs = []
            for piece in x.split(self.chunk_size):
                sizes.append(piece.shape[0])
                outs.append(self._run_forward(head, piece, train))
                caches.append([layer._cache for layer in head])
            x = torch.cat(outs)
        x = self._run_forward(rest, x, train)
        self._run = (head, rest, caches, sizes)
        return x

    __call__ = forward

    def backward(self, dy: torch.Tensor) -> torch.Tensor | None:
        """Propagate dL/doutput back; fills every layer's grads and returns dL/dinput (or None)."""
        if self._run is None:
            raise RuntimeError("backward needs a forward first (each forward allows one backward)")
        head, rest, caches, sizes = self._run
        self._run = None
        dy = self._run_backward(rest, dy)
        if not head:
            return dy
        # Chunks of a gradient laid out batch-innermost (Dense's dx comes transposed) would be read with
        # long strides by every chunked layer; one copy first is cheaper (measured at batch 128).
        dy = dy.contiguous()
        sums: list[dict[str, torch.Tensor]] = [{} for _ in head]
        dxs = []
        start = 0
        for cache, size in zip(caches, sizes):
            for layer, c in zip(head, cache):
                layer._cache = c
            d = dy[start:start + size]
            start += size
            d = self._run_backward(head, d)
            dxs.append(d)
            for acc, layer in zip(sums, head):
                for key, g in layer.grads.items():
                    if key in acc:
                        acc[key].add_(g)
                    else:
                        acc[key] = g
        for acc, layer in zip(sums, head):
            layer.grads.update(acc)
        if dxs[0] is None:
            return None
        return torch.cat(dxs)

    def set_input_grad(self, needed: bool) -> None:
        """Ask the first layer to return dL/dinput (saliency, gradcheck) or to skip it (training)."""
        if self.layers:
            self.layers[0].needs_input_grad = needed

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Outputs (logits) for x in evaluation mode, in batches to bound memory."""
        outs = [self.forward(x[i:i + batch_size], train=False) for i in range(0, x.shape[0], batch_size)]
        for layer in self.layers:  # drop what forward kept for a backward that will not come
            layer.clear_cache()
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


def layer_config(layer: Layer) -> dict[str, Any]:
    cfg = layer.get_config()
    return {"class": type(layer).__name__, "config": _plain(cfg)}


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def layer_from_config(entry: dict[str, Any]) -> Layer:
    from .layers import LAYERS

    cls_name = entry.get("class")
    if cls_name not in LAYERS:
        raise ValueError(f"unknown layer class {cls_name!r} in model config; known: {sorted(LAYERS)}")
    return LAYERS[cls_name].from_config(entry.get("config", {}))
