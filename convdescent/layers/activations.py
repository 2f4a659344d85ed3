"""Elementwise activations and the output softmax, each with its derivative written out.

    ReLU       y = max(x, 0)              dL/dx = delta * [x > 0]
    LeakyReLU  y = x if x > 0 else a*x    dL/dx = delta * (1 if x > 0 else a)
    Tanh       y = tanh(x)                dL/dx = delta * (1 - y^2)
    Sigmoid    y = 1 / (1 + exp(-x))      dL/dx = delta * y * (1 - y)
    Softmax    y_i = exp(x_i) / sum_j exp(x_j)   dL/dx_i = y_i * (delta_i - sum_j delta_j y_j)

The derivative of ReLU at exactly 0 is taken as 0, as in torch.
"""

from __future__ import annotations

import torch

from .base import Layer


class _Elementwise(Layer):
    kind = "act"
    samplewise = True

    def get_config(self):
        return {"name": self.name}


class ReLU(_Elementwise):
    """Rectified linear unit, max(x, 0). Any shape."""

    kind = "relu"

    def forward(self, x, train=False):
        y = torch.relu(x)
        self._cache = y
        return y

    def backward(self, dy):
        y = self._cache
        self._cache = None
        # y >= 0, so sign(y) is exactly the indicator [x > 0]; float arithmetic is much faster on CPU
        # than building a bool mask.
        grad = torch.sign(y)
        return grad.mul_(dy)

    def to_torch(self):
        return torch.nn.ReLU()


class LeakyReLU(_Elementwise):
    """max(x, 0) + negative_slope * min(x, 0). Any shape.

    Args:
        negative_slope: slope for x < 0 (torch's default 0.01).
    """

    kind = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01, name=None):
        super().__init__(name)
        if not (negative_slope >= 0):
            raise ValueError(f"negative_slope must be non-negative, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def forward(self, x, train=False):
        self._cache = positive = x > 0
        return torch.where(positive, x, x * self.negative_slope)

    def backward(self, dy):
        positive = self._cache
        self._cache = None
        return torch.where(positive, dy, dy * self.negative_slope)

    def get_config(self):
        return {"negative_slope": self.negative_slope, "name": self.name}

    def to_torch(self):
        return torch.nn.LeakyReLU(self.negative_slope)


class Tanh(_Elementwise):
    """Hyperbolic tangent. Any shape."""

    kind = "tanh"

    def forward(self, x, train=False):
        self._cache = y = torch.tanh(x)
        return y

    def backward(self, dy):
        y = self._cache
        self._cache = None
        return dy * (1 - y * y)

    def to_torch(self):
        return torch.nn.Tanh()


class Sigmoid(_Elementwise):
    """Logistic function 1 / (1 + exp(-x)). Any shape."""

    kind = "sigmoid"

    def forward(self, x, train=False):
        self._cache = y = torch.sigmoid(x)
        return y

    def backward(self, dy):
        y = self._cache
        self._cache = None
        return dy * y * (1 - y)

    def to_torch(self):
        return torch.nn.Sigmoid()


class Softmax(_Elementwise):
    """Softmax over the class axis, for models whose outputs must be probabilities: (N, K) -> (N, K).

    Training normally feeds logits to ``SoftmaxCrossEntropy`` instead, which fuses the two and is
    numerically safer; this layer exists for prediction heads and for checking that fusion.
    """

    kind = "softmax"

    def forward(self, x, train=False):
        self._cache = y = torch.softmax(x, dim=1)
        return y

    def backward(self, dy):
        y = self._cache
        self._cache = None
        return y * (dy - (dy * y).sum(dim=1, keepdim=True))

    def to_torch(self):
        return torch.nn.Softmax(dim=1)
