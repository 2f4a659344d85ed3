"""Elementwise activations and the output softmax, each with its derivative written out.

    ReLU       y = max(x, 0)              dL/dx = delta * [x > 0]
    LeakyReLU  y = x if x > 0 else a*x    dL/dx = delta * (1 if x > 0 else a)
    Tanh       y = tanh(x)                dL/dx = delta * (1 - y^2)
    Sigmoid    y = 1 / (1 + exp(-x))      dL/dx = delta * y * (1 - y)
    Softmax    y_i = exp(x_i) / sum_j exp(x_j)   dL/dx_i = y_i * (delta_i - sum_j delta_j y_j)
    GELU       y = x Phi(x)               dL/dx = delta * (Phi(x) + x phi(x))
    GELU tanh  y = x (1 + tanh u) / 2,  u = sqrt(2/pi) (x + 0.044715 x^3)
                                          dL/dx = delta * ((1 + t) / 2 + x (1 - t^2) u' / 2),  t = tanh u,
                                                  u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    SiLU       y = x s(x), s = sigmoid    dL/dx = delta * s (1 + x (1 - s))

Phi and phi are the standard normal distribution function and density.

The derivative of ReLU at exactly 0 is taken as 0, as in torch.
"""

from __future__ import annotations

import math

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


class GELU(_Elementwise):
    """Gaussian error linear unit (Hendrycks & Gimpel 2016), x Phi(x), exactly or by its tanh form. Any shape.

    Args:
        approximate: "none" (the exact erf form) or "tanh" (torch's names).
    """

    kind = "gelu"
    _C = math.sqrt(2.0 / math.pi)
    _A = 0.044715

    def __init__(self, approximate: str = "none", name=None):
        super().__init__(name)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x, train=False):
        if self.approximate == "tanh":
            t = torch.tanh(self._C * (x + self._A * x * x * x))
            self._cache = (x, t)
            return 0.5 * x * (1 + t)
        cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2.0))))
        self._cache = (x, cdf)
        return x * cdf

    def backward(self, dy):
        x, aux = self._cache
        self._cache = None
        if self.approximate == "tanh":
            t = aux
            du = self._C * (1 + 3 * self._A * x * x)
            return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du)
        pdf = torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return dy * (aux + x * pdf)

    def get_config(self):
        return {"approximate": self.approximate, "name": self.name}

    def to_torch(self):
        return torch.nn.GELU(approximate=self.approximate)


class SiLU(_Elementwise):
    """Sigmoid linear unit (swish), x * sigmoid(x). Any shape."""

    kind = "silu"

    def forward(self, x, train=False):
        s = torch.sigmoid(x)
        self._cache = (x, s)
        return x * s

    def backward(self, dy):
        x, s = self._cache
        self._cache = None
        return dy * s * (1 + x * (1 - s))

    def to_torch(self):
        return torch.nn.SiLU()
