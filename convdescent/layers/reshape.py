"""Flatten: (N, C, H, W) -> (N, C*H*W) in torch's (C, H, W) order; its backward is the inverse reshape."""

from __future__ import annotations

import math

import torch

from .base import Layer


class Flatten(Layer):
    """Flatten every axis but the batch axis, in (C, H, W) order so weights match torch.nn.Flatten."""

    kind = "flatten"
    samplewise = True

    def compute_output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def forward(self, x, train=False):
        self._cache = tuple(x.shape)
        # reshape copies a channels_last input into logical (C, H, W) order, as torch.nn.Flatten reads it
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        # unflatten is a view whenever the strides allow it (a transposed gradient from Dense included)
        return dy.unflatten(1, self._cache[1:])

    def get_config(self):
        return {"name": self.name}

    def to_torch(self):
        return torch.nn.Flatten()
