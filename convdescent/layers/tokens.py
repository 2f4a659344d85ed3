"""Layers between images and token sequences, for Vision Transformers (Dosovitskiy et al. 2021, "An Image is
Worth 16x16 Words"): patch embedding, a learned position embedding, a class token, and pooling the tokens.

    PatchEmbed          (N, C, H, W) -> (N, T, D)   y[n, t] = W patch_t(x_n) + b, T = (H // p) * (W // p)
    PositionEmbedding   (N, T, D) -> (N, T, D)      y[n, t] = x[n, t] + E[t]
    ClassToken          (N, T, D) -> (N, T + 1, D)  y[n, 0] = c, y[n, 1:] = x[n]
    TokenPool           (N, T, D) -> (N, D)         mean over t, or token 0 (the class token)

Backwards (derived in docs/gradients.md): PatchEmbed is a Dense layer on the flattened patches (a conv with
kernel and stride p), so dW = delta^T patches, db = sum delta, and dx puts each patch row of delta W back in
its place (pixels past the last whole patch get zero); dE = sum_n delta[n]; dc = sum_n delta[n, 0] and
dx = delta[:, 1:]; the mean's dx = delta / T at every token, token 0's dx = delta at token 0 and zero elsewhere.
"""

from __future__ import annotations

import torch

from .. import init as initializers
from .base import Layer, check_rank, pair


def _check_tokens(x: torch.Tensor, layer: Layer) -> None:
    if x.dim() != 3 or tuple(x.shape[1:]) != tuple(layer.input_shape):
        raise ValueError(f"{type(layer).__name__} '{layer.name}' expects tokens of shape (N, "
                         f"{', '.join(map(str, layer.input_shape))}), got {tuple(x.shape)}")


def _tokens_shape(layer: Layer, input_shape) -> tuple[int, int]:
    if len(input_shape) != 2:
        raise ValueError(f"{type(layer).__name__} expects tokens of shape (T, D), got {tuple(input_shape)}; "
                         f"put a PatchEmbed before it")
    return tuple(input_shape)


class PatchEmbedModule(torch.nn.Conv2d):
    """The ``torch.nn`` form of ``PatchEmbed``: a ``Conv2d`` with kernel = stride = patch, whose (N, D, H', W')
    output is read as H'*W' tokens of width D."""

    def forward(self, x):  # noqa: D102 - the class docstring says it
        return super().forward(x).flatten(2).transpose(1, 2)


class PatchEmbed(Layer):
    """Cut images into non-overlapping patches and project each to a token of width ``dim``.

    Args:
        dim: D, the token width.
        patch_size: int or (ph, pw); rows and columns past the last whole patch are dropped (as a conv
            with stride = kernel does).
        use_bias: whether to add a bias.
        kernel_init, bias_init: initializers (default Glorot uniform / zeros).

    Shapes: (N, C, H, W) -> (N, (H // ph) * (W // pw), D), tokens in row-major patch order; params
    ``weight`` (D, C, ph, pw), ``bias`` (D,) (the layout of the equivalent conv).
    """

    kind = "patch"
    samplewise = True

    def __init__(self, dim: int, patch_size=4, use_bias: bool = True, kernel_init="glorot_uniform",
                 bias_init="zeros", name: str | None = None):
        super().__init__(name)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.patch_size = pair(patch_size, "patch_size")
        self.use_bias = bool(use_bias)
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        initializers.get_initializer(kernel_init)
        initializers.get_initializer(bias_init)

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"PatchEmbed expects images of shape (C, H, W), got {tuple(input_shape)}")
        c, h, w = input_shape
        ph, pw = self.patch_size
        if h < ph or w < pw:
            raise ValueError(f"PatchEmbed '{self.name}': patch_size {self.patch_size} is larger than its input "
                             f"{h}x{w}")
        return ((h // ph) * (w // pw), self.dim)

    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        out = super().build(input_shape)
        c = input_shape[0]
        ph, pw = self.patch_size
        self.params["weight"] = initializers.get_initializer(self.kernel_init)((self.dim, c, ph, pw), generator,
                                                                                dtype, device)
        if self.use_bias:
            self.params["bias"] = initializers.get_initializer(self.bias_init)((self.dim,), generator, dtype,
                                                                                device)
        return out

    def forward(self, x, train=False):
        check_rank(x, 4, self)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"PatchEmbed '{self.name}' expects images of shape (N, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        n, c, h, w = x.shape
        ph, pw = self.patch_size
        gh, gw = h // ph, w // pw
        # patches[(n, a, b), (c, k, l)] = x[n, c, a*ph + k, b*pw + l]
        patches = (x[:, :, :gh * ph, :gw * pw].reshape(n, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
                   .reshape(n * gh * gw, c * ph * pw))
        wmat = self.params["weight"].reshape(self.dim, -1)
        y = torch.addmm(self.params["bias"], patches, wmat.t()) if self.use_bias else patches @ wmat.t()
        self._cache = (patches, (n, c, h, w))
        return y.view(n, gh * gw, self.dim)

    def backward(self, dy):
        patches, (n, c, h, w) = self._cache
        self._cache = None
        ph, pw = self.patch_size
        gh, gw = h // ph, w // pw
        d = dy.reshape(n * gh * gw, self.dim)
        if self.trainable:  # frozen: dL/dx only
            self.grads["weight"] = (d.t() @ patches).view(self.dim, c, ph, pw)
            if self.use_bias:
                self.grads["bias"] = d.sum(0)
        if not self.needs_input_grad:
            return None
        dpatches = (d @ self.params["weight"].reshape(self.dim, -1)).view(n, gh, gw, c, ph, pw)
        inner = dpatches.permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * ph, gw * pw)
        if gh * ph == h and gw * pw == w:
            return inner
        dx = torch.zeros((n, c, h, w), dtype=dy.dtype, device=dy.device)
        dx[:, :, :gh * ph, :gw * pw] = inner
        return dx

    def get_config(self):
        return {"dim": self.dim, "patch_size": self.patch_size, "use_bias": self.use_bias,
                "kernel_init": initializers.initializer_name(self.kernel_init),
                "bias_init": initializers.initializer_name(self.bias_init), "name": self.name}

    def to_torch(self):
        w = self.params["weight"]
        module = PatchEmbedModule(self.input_shape[0], self.dim, self.patch_size, stride=self.patch_size,
                                  bias=self.use_bias).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.weight.copy_(w)
            if self.use_bias:
                module.bias.copy_(self.params["bias"])
        return module


class _LearnedTokens(torch.nn.Module):
    """The ``torch.nn`` form of ``PositionEmbedding`` (``weight`` added) and ``ClassToken`` (``token`` prepended)."""

    def __init__(self, key: str, value: torch.Tensor):
        super().__init__()
        self.key = key
        self.register_parameter(key, torch.nn.Parameter(value.detach().clone()))

    def forward(self, x):  # noqa: D102 - the class docstring says it
        value = getattr(self, self.key)
        if self.key == "weight":
            return x + value
        return torch.cat([value.expand(x.shape[0], 1, -1), x], dim=1)


def _normal_init(shape, std, generator, dtype, device):
    return (torch.randn(shape, generator=generator, dtype=dtype) * std).to(device)


class PositionEmbedding(Layer):
    """A learned embedding per token position, added to the tokens.

    Args:
        init_std: standard deviation of the normal initialization (0.02, as in ViT).

    Shapes: (N, T, D) -> (N, T, D); param ``weight`` (T, D).
    """

    kind = "pos"
    samplewise = True

    def __init__(self, init_std: float = 0.02, name: str | None = None):
        super().__init__(name)
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or init_std < 0:
            raise ValueError(f"init_std must be a non-negative number, got {init_std!r}")
        self.init_std = float(init_std)

    def compute_output_shape(self, input_shape):
        return _tokens_shape(self, input_shape)

    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        out = super().build(input_shape)
        self.params["weight"] = _normal_init(tuple(input_shape), self.init_std, generator, dtype, device)
        return out

    def forward(self, x, train=False):
        _check_tokens(x, self)
        self._cache = True
        return x + self.params["weight"]

    def backward(self, dy):
        self._cache = None
        if self.trainable:
            self.grads["weight"] = dy.sum(0)
        return dy if self.needs_input_grad else None

    def get_config(self):
        return {"init_std": self.init_std, "name": self.name}

    def to_torch(self):
        return _LearnedTokens("weight", self.params["weight"])


class ClassToken(Layer):
    """A learned token put in front of every sequence, whose final state a classifier reads (TokenPool("cls")).

    Args:
        init_std: standard deviation of the normal initialization (0.02).

    Shapes: (N, T, D) -> (N, T + 1, D); param ``token`` (1, D).
    """

    kind = "cls"
    samplewise = True

    def __init__(self, init_std: float = 0.02, name: str | None = None):
        super().__init__(name)
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or init_std < 0:
            raise ValueError(f"init_std must be a non-negative number, got {init_std!r}")
        self.init_std = float(init_std)

    def compute_output_shape(self, input_shape):
        t, d = _tokens_shape(self, input_shape)
        return (t + 1, d)

    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        out = super().build(input_shape)
        self.params["token"] = _normal_init((1, input_shape[1]), self.init_std, generator, dtype, device)
        return out

    def forward(self, x, train=False):
        _check_tokens(x, self)
        self._cache = True
        return torch.cat([self.params["token"].expand(x.shape[0], 1, -1), x], dim=1)

    def backward(self, dy):
        self._cache = None
        if self.trainable:
            self.grads["token"] = dy[:, :1].sum(0)
        return dy[:, 1:] if self.needs_input_grad else None

    def get_config(self):
        return {"init_std": self.init_std, "name": self.name}

    def to_torch(self):
        return _LearnedTokens("token", self.params["token"])


class TokenPoolModule(torch.nn.Module):
    """The ``torch.nn`` form of ``TokenPool``."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x):  # noqa: D102 - the class docstring says it
        return x.mean(dim=1) if self.mode == "mean" else x[:, 0]


class TokenPool(Layer):
    """Reduce a token sequence to one vector: the mean over tokens, or the first token (a class token).

    Args:
        mode: "mean" or "cls".

    Shapes: (N, T, D) -> (N, D).
    """

    kind = "tokenpool"
    samplewise = True

    def __init__(self, mode: str = "mean", name: str | None = None):
        super().__init__(name)
        if mode not in ("mean", "cls"):
            raise ValueError(f"mode must be 'mean' or 'cls', got {mode!r}")
        self.mode = mode

    def compute_output_shape(self, input_shape):
        return (_tokens_shape(self, input_shape)[1],)

    def forward(self, x, train=False):
        _check_tokens(x, self)
        self._cache = tuple(x.shape)
        return x.mean(dim=1) if self.mode == "mean" else x[:, 0]

    def backward(self, dy):
        n, t, d = self._cache
        self._cache = None
        if not self.needs_input_grad:
            return None
        if self.mode == "mean":
            return (dy / t)[:, None, :].expand(n, t, d)
        dx = torch.zeros((n, t, d), dtype=dy.dtype, device=dy.device)
        dx[:, 0] = dy
        return dx

    def get_config(self):
        return {"mode": self.mode, "name": self.name}

    def to_torch(self):
        return TokenPoolModule(self.mode)
