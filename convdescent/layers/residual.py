"""Residual block (He et al. 2016, "Deep Residual Learning for Image Recognition"): y = f(x) + s(x).

f is a list of layers run in sequence; the skip path s is the identity, or a projection (a 1x1 Conv2D with
the stride that matches f's downsampling, or a bias-free Dense for flat features) when the shapes differ.
Backward follows the sum rule: the same delta flows into both paths and their input gradients add,

    dL/dx = df/dx^T delta + ds/dx^T delta        (ds/dx^T delta = delta for the identity).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

import torch

from .base import Layer, assign_names, check_rank
from .conv import Conv2D
from .dense import Dense
from .registry import layer_config, layer_from_config


class ResidualModule(torch.nn.Module):
    """The ``torch.nn`` form of ``Residual``: submodules under the layer names, forward y = f(x) + s(x)."""

    def __init__(self, body: "OrderedDict[str, torch.nn.Module]", projection: torch.nn.Module | None = None):
        super().__init__()
        self.body_names = list(body)
        for name, module in body.items():
            self.add_module(name, module)
        self.projection = projection

    def forward(self, x):
        h = x
        for name in self.body_names:
            h = getattr(self, name)(h)
        return h + (x if self.projection is None else self.projection(x))


def _skip_stride(size: int, out: int, axis: str, name: str) -> int:
    """The stride s with (size - 1) // s + 1 == out: what a 1x1 valid conv needs to land on f's output size."""
    for s in range(1, size + 1):
        if (size - 1) // s + 1 == out:
            return s
    raise ValueError(f"Residual '{name}': no 1x1 projection stride maps {axis} {size} to {out}; "
                     f"make the block's output size reachable by striding (e.g. padding='same')")


class Residual(Layer):
    """Residual block y = f(x) + x, or y = f(x) + projection(x) when shapes differ.

    Args:
        layers: the layers of f, run in sequence (named automatically inside the block: ``conv1``, ``bn1``...).
        projection: None (identity skip; shapes must match), "auto" (add a projection only when f changes
            the shape) or True (always project). The projection is a 1x1 Conv2D with stride chosen to
            match f's downsampling (Dense without bias for flat features), named ``projection``.

    Shapes: (N, *S) -> (N, *f's output shape). Parameters are those of the sublayers, named
    ``<block>.<layer>.<param>``, e.g. ``residual1.conv1.weight``.
    """

    kind = "residual"

    def __init__(self, layers: Iterable[Layer], projection=None, name: str | None = None):
        super().__init__(name)
        self.layers: list[Layer] = list(layers)
        if not self.layers:
            raise ValueError("Residual needs at least one layer in its residual branch, got an empty list")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Residual takes convdescent layers; item {i} is {type(layer).__name__}. "
                                f"Wrap torch modules in TorchModule(...)")
        if projection not in (None, "auto", True, False):
            raise ValueError(f"projection must be None, 'auto' or True, got {projection!r}")
        self.projection_mode = None if projection is False else projection
        self.projection: Layer | None = None
        self._name_sublayers()

    def _name_sublayers(self) -> None:
        if any(layer.name == "projection" for layer in self.layers):
            raise ValueError("the name 'projection' is reserved for the skip path of a Residual block; "
                             "rename that layer")
        assign_names(self.layers, " inside a Residual block")

    def sublayers(self):
        return self.layers + ([self.projection] if self.projection is not None else [])

    # -- building ----------------------------------------------------------------------------
    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        in_shape = tuple(input_shape)
        shape = in_shape
        for layer in self.layers:
            layer.needs_input_grad = True  # the branch's input gradient is added to the skip path's
            shape = layer.build(shape, generator=generator, dtype=dtype, device=device)
        out_shape = tuple(shape)
        want = self.projection_mode is True or (self.projection_mode == "auto" and out_shape != in_shape)
        if not want and out_shape != in_shape:
            raise ValueError(f"Residual '{self.name}': the branch maps {in_shape} to {out_shape}, so x + f(x) "
                             f"is undefined; pass projection='auto' to add a projection on the skip path")
        self.projection = None
        if want:
            self.projection = self._make_projection(in_shape, out_shape)
            self.projection.build(in_shape, generator=generator, dtype=dtype, device=device)
        self.input_shape = in_shape
        self.output_shape = out_shape
        self.built = True
        return out_shape

    def _make_projection(self, in_shape, out_shape) -> Layer:
        if len(in_shape) == 3 and len(out_shape) == 3:
            sh = _skip_stride(in_shape[1], out_shape[1], "height", self.name)
            sw = _skip_stride(in_shape[2], out_shape[2], "width", self.name)
            return Conv2D(out_shape[0], 1, stride=(sh, sw), use_bias=False, name="projection")
        if len(in_shape) == 1 and len(out_shape) == 1:
            return Dense(out_shape[0], use_bias=False, name="projection")
        raise ValueError(f"Residual '{self.name}': cannot project {in_shape} to {out_shape}; the branch must "
                         f"keep the input's kind (maps (C, H, W) or features (F,))")

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = tuple(layer.compute_output_shape(shape))
        return shape

    def to(self, device=None, dtype=None):
        for layer in self.sublayers():
            layer.to(device=device, dtype=dtype)
        return self

    # -- computation -------------------------------------------------------------------------
    def forward(self, x, train=False):
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            check_rank(x, len(self.input_shape) + 1, self)
            raise ValueError(f"Residual '{self.name}' expects inputs of shape (N, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        for layer in self.sublayers():
            layer.training = train
        return self.forward_through(x, self._body_forward, self._skip_forward, train)

    def forward_through(self, x, body: Callable, skip: Callable | None, train: bool):
        """y = body(x) + skip(x), or body(x) + x without a projection: the block's forward, whoever runs the
        branch (these layers one by one, or the execution plan's nodes)."""
        h = body(x, train)
        return h + (skip(x, train) if self.projection is not None else x)

    def backward(self, dy):
        return self.backward_through(dy, self._body_backward, self._skip_backward)

    def backward_through(self, dy, body: Callable, skip: Callable | None):
        """The sum rule: the same dL/dy flows into the branch and the skip, and their input gradients add,
        dL/dx = dL/dx_branch + dL/dx_skip (dL/dy itself for an identity skip). Shared by ``backward`` and the
        execution plan's residual node, which pass the branch's and the projection's backward."""
        # The first branch layer and the projection produce dL/dx only when someone upstream needs it.
        self.layers[0].needs_input_grad = self.needs_input_grad
        dh = body(dy)
        if self.projection is not None:
            self.projection.needs_input_grad = self.needs_input_grad
            dskip = skip(dy)
        else:
            dskip = dy
        if not self.needs_input_grad:
            return None
        return dh + dskip

    def _body_forward(self, x, train):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def _skip_forward(self, x, train):
        return self.projection.forward(x, train)

    def _body_backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def _skip_backward(self, dy):
        return self.projection.backward(dy)

    # -- description -------------------------------------------------------------------------
    def get_config(self):
        return {"layers": [layer_config(layer) for layer in self.layers], "projection": self.projection_mode,
                "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        layers = [layer_from_config(entry) for entry in config.pop("layers")]
        return cls(layers, **config)

    def to_torch(self):
        body = OrderedDict((layer.name, layer.to_torch()) for layer in self.layers)
        projection = self.projection.to_torch() if self.projection is not None else None
        return ResidualModule(body, projection)

    def __repr__(self):
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Residual([{inner}], projection={self.projection_mode!r})"
