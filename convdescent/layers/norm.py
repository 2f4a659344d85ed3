"""Batch normalization (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift") with an explicit backward.

For each channel c, over the M = N*H*W values it takes in the batch (M = N for dense features):

    mu = (1/M) sum x                    var = (1/M) sum (x - mu)^2       (biased, used to normalize)
    r  = 1 / sqrt(var + eps)            xhat = (x - mu) * r
    y  = weight * xhat + bias

Backward, with delta = dL/dy and the sums over the same M values:

    dL/dbias   = sum delta
    dL/dweight = sum delta * xhat
    dL/dx      = (weight * r / M) * (M * delta - dL/dbias - xhat * dL/dweight)

The last line is the compact form of the chain rule through mu and var (derived in docs/gradients.md).
In evaluation mode mu and var are the running statistics, constants, so dL/dx = delta * weight * r.

A frozen batch norm (``trainable = False``, ``--freeze``) normalizes with its running statistics in training
mode too and leaves them as they are, as a module put in ``eval()`` does in PyTorch: its statistics are
part of what was frozen, and a fine-tuned network then sees the same normalization it was trained with.
Its backward is the evaluation-mode one, dL/dx = delta * weight * r, without dL/dweight and dL/dbias.

Running statistics follow torch: running = (1 - momentum) * running + momentum * batch, with the unbiased
variance var * M / (M - 1) for running_var; ``momentum=None`` gives the cumulative average over all batches
seen so far. Parameter and buffer names (weight, bias, running_mean, running_var, num_batches_tracked) are
torch's, so ``to_torch()`` gives an ``nn.BatchNorm2d``/``nn.BatchNorm1d`` with an identical state_dict.

Statistics over several processes: a batch-norm layer whose ``stats_reducer`` is set (by
``convdescent.distributed.syncbn.sync_batchnorm``) takes mu and var over the global batch, every process holding a
slice of it. ``stats_reducer(t)`` must return the sum of ``t`` over the processes (an all-reduce). In training
the forward reduces one vector per channel, [sum x, sum x^2] and the count M of the global batch, and the
backward reduces [dL/dbias, dL/dweight] before the dL/dx formula above, so dL/dx is that of one process over
the whole batch; ``grads`` keep this process's own sums (the data-parallel mean over processes follows,
docs/gradients.md section 7.2).
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Layer

StatsReducer = Callable[[torch.Tensor], torch.Tensor]


class _BatchNorm(Layer):
    kind = "bn"
    _torch_cls = torch.nn.BatchNorm2d
    _ranks: tuple[int, ...] = (4,)
    _expect = "(N, C, H, W)"  # the accepted input shapes, for error messages
    # Sum over processes of a tensor, for statistics over the global batch; None: this process's batch only.
    stats_reducer: StatsReducer | None = None

    def __init__(self, momentum: float | None = 0.1, eps: float = 1e-5, num_features: int | None = None,
                 name: str | None = None):
        super().__init__(name)
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be a number in [0, 1] or None (cumulative average), got {momentum!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int)
                                         or num_features <= 0):
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.momentum = None if momentum is None else float(momentum)
        self.eps = float(eps)
        self.num_features = num_features
        self.running_mean: torch.Tensor | None = None
        self.running_var: torch.Tensor | None = None
        self.num_batches_tracked: torch.Tensor | None = None

    @property
    def samplewise(self) -> bool:
        """Frozen, it normalizes each example with constants: then it treats every example on its own."""
        return not self.trainable

    # -- shapes ------------------------------------------------------------------------------
    def compute_output_shape(self, input_shape):
        if len(input_shape) + 1 not in self._ranks:
            raise ValueError(f"{type(self).__name__} expects inputs of shape {self._expect}, "
                             f"got per-sample shape {tuple(input_shape)}")
        return tuple(input_shape)

    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        out = super().build(input_shape)
        c = input_shape[0]
        if self.num_features is not None and self.num_features != c:
            raise ValueError(f"{type(self).__name__} '{self.name}' was given num_features={self.num_features}, "
                             f"but its input has {c} channels")
        self.num_features = c
        self.params["weight"] = torch.ones(c, dtype=dtype, device=device)
        self.params["bias"] = torch.zeros(c, dtype=dtype, device=device)
        self.running_mean = torch.zeros(c, dtype=dtype, device=device)
        self.running_var = torch.ones(c, dtype=dtype, device=device)
        self.num_batches_tracked = torch.zeros((), dtype=torch.long, device=device)
        return out

    def buffers(self):
        if self.running_mean is None:
            return {}
        return {"running_mean": self.running_mean, "running_var": self.running_var,
                "num_batches_tracked": self.num_batches_tracked}

    def to(self, device=None, dtype=None):
        super().to(device=device, dtype=dtype)
        if self.running_mean is not None:
            self.running_mean = self.running_mean.to(device=device, dtype=dtype)
            self.running_var = self.running_var.to(device=device, dtype=dtype)
            self.num_batches_tracked = self.num_batches_tracked.to(device=device)
        return self

    # -- computation -------------------------------------------------------------------------
    def _dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """Axes reduced over: every axis but the channel axis 1."""
        return (0,) + tuple(range(2, x.dim()))

    def _view(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-channel vector (C,) shaped to broadcast against x (N, C, ...)."""
        return v.view((1, -1) + (1,) * (x.dim() - 2))

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() not in self._ranks or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__} '{self.name}' expects input of shape {self._expect} with "
                             f"C={self.num_features}, got shape {tuple(x.shape)}")

    def forward(self, x, train=False):
        self._check(x)
        dims = self._dims(x)
        weight, bias = self.params["weight"], self.params["bias"]
        batch = train and self.trainable  # frozen: the running statistics, left unchanged
        if batch and self.stats_reducer is not None:
            mean, var, m = self._global_stats(x, dims)
            centered = x - self._view(mean, x)
            self._update_running(mean, var, m)
        elif batch:
            m = x.numel() // x.shape[1]
            if m < 2:
                raise ValueError(f"{type(self).__name__} '{self.name}' needs more than one value per channel in "
                                 f"training mode, got input of shape {tuple(x.shape)}; use a batch of at least 2")
            mean = x.mean(dim=dims)
            centered = x - self._view(mean, x)
            # the mean of the squares without writing them out (a norm is one reading pass)
            var = torch.linalg.vector_norm(centered, dim=dims).square_().div_(m)
            self._update_running(mean, var, m)
        else:
            mean, var, m = self.running_mean, self.running_var, None
            centered = x - self._view(mean, x)
        r = torch.rsqrt(var + self.eps)
        xhat = centered.mul_(self._view(r, x))  # in place: centered is this forward's own tensor
        self._cache = (xhat, r, batch, m, self.stats_reducer if batch else None)
        return torch.addcmul(self._view(bias, x), xhat, self._view(weight, x))

    def _global_stats(self, x: torch.Tensor, dims: tuple[int, ...]):
        """Mean, biased variance (C,) and count M (0-d tensor) over the global batch, in one reduction.

        var = (sum x^2)/M - mu^2, clamped at 0; the count stays a tensor (no host sync), and a process may
        hold any share of the batch, none included. The global M must be at least 2, which is not checked
        here (that would read the count back to the host every step): a data-parallel batch holds at least
        one example per process.
        """
        c = x.shape[1]
        acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        xa = x.to(acc)
        count = torch.full((1,), float(x.numel() // c), dtype=acc, device=x.device)
        total = self.stats_reducer(torch.cat([xa.sum(dim=dims), (xa * xa).sum(dim=dims), count]))
        m = total[2 * c]
        mean = total[:c] / m
        var = (total[c:2 * c] / m - mean * mean).clamp(min=0.0)
        return mean.to(x.dtype), var.to(x.dtype), m

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, m) -> None:
        """``m``: the batch's count per channel, an int or (global statistics) a 0-d tensor."""
        # In place, so tensors handed out by state_dict() stay the live buffers.
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            # torch's cumulative moving average: factor 1/t at the t-th batch, kept on the device (no sync).
            factor = 1.0 / self.num_batches_tracked.to(mean.dtype)
        else:
            factor = self.momentum
        self.running_mean.mul_(1 - factor).add_(mean * factor)
        self.running_var.mul_(1 - factor).add_(var * (factor * m / (m - 1)))

    def backward(self, dy):
        xhat, r, batch, m, reducer = self._cache
        self._cache = None
        dims = self._dims(dy)
        weight = self.params["weight"]
        if not self.trainable:  # frozen: running statistics (constants) and no parameter gradients
            return dy * self._view(weight * r, dy) if self.needs_input_grad else None
        dbias = dy.sum(dim=dims)
        dweight = (dy * xhat).sum(dim=dims)
        self.grads["weight"] = dweight
        self.grads["bias"] = dbias
        if not self.needs_input_grad:
            return None
        scale = weight * r
        if not batch:
            return dy * self._view(scale, dy)
        if reducer is not None:
            # Statistics of the global batch: its two reductions too (grads keep this process's sums).
            c = dbias.shape[0]
            total = reducer(torch.cat([dbias, dweight]).to(m.dtype))
            dbias, dweight, m = total[:c].to(dy.dtype), total[c:].to(dy.dtype), m.to(dy.dtype)
        # the formula above as dy * scale + xhat * k2 + k3 with per-channel k2, k3: two passes over the map
        k2 = scale * dweight / -m
        k3 = scale * dbias / -m
        dx = torch.addcmul(self._view(k3, dy), xhat, self._view(k2, dy))
        return dx.addcmul_(dy, self._view(scale, dy))

    # -- description -------------------------------------------------------------------------
    def get_config(self):
        return {"momentum": self.momentum, "eps": self.eps, "num_features": self.num_features, "name": self.name}

    def to_torch(self):
        w = self.params["weight"]
        bn = self._torch_cls(self.num_features, eps=self.eps, momentum=self.momentum)
        bn = bn.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(self.params["bias"])
            bn.running_mean.copy_(self.running_mean)
            bn.running_var.copy_(self.running_var)
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        return bn


class BatchNorm2D(_BatchNorm):
    """Batch normalization of conv feature maps: statistics per channel over (N, H, W).

    Args:
        momentum: weight of the new batch in the running statistics (torch's convention, 0.1); None for
            the cumulative average over all batches.
        eps: added to the variance before the square root.
        num_features: optional; the channel count C, inferred when the model is built.

    Shapes: (N, C, H, W) -> (N, C, H, W); params ``weight`` (C,), ``bias`` (C,); buffers ``running_mean`` (C,),
    ``running_var`` (C,), ``num_batches_tracked`` ().
    """

    _torch_cls = torch.nn.BatchNorm2d
    _ranks = (4,)
    _expect = "(N, C, H, W)"


class BatchNorm1D(_BatchNorm):
    """Batch normalization of dense features: statistics per feature over the batch (and L when 3-D).

    Args:
        momentum: weight of the new batch in the running statistics (torch's convention, 0.1); None for
            the cumulative average over all batches.
        eps: added to the variance before the square root.
        num_features: optional; the feature count C, inferred when the model is built.

    Shapes: (N, C) or (N, C, L), unchanged; params ``weight`` (C,), ``bias`` (C,); buffers as BatchNorm2D.
    """

    _torch_cls = torch.nn.BatchNorm1d
    _ranks = (2, 3)
    _expect = "(N, C) or (N, C, L)"


class LayerNorm(Layer):
    """Layer normalization (Ba, Kiros & Hinton 2016): each example normalized over its trailing axes.

    For each example (and each token of a (N, T, D) input) over its M = prod(normalized shape) values:

        mu = (1/M) sum x,   r = 1 / sqrt((1/M) sum (x - mu)^2 + eps),   xhat = (x - mu) r,
        y  = weight * xhat + bias

    and backward, with the sums over the same M values and g = delta * weight:

        dL/dbias   = sum over the other axes of delta
        dL/dweight = sum over the other axes of delta * xhat
        dL/dx      = (r / M) * (M g - sum g - xhat * sum (g * xhat))

    the batch-norm formula with the roles of the axes swapped (derived in docs/gradients.md). There are no
    running statistics: training and evaluation compute the same thing, frozen or not (a frozen LayerNorm
    only skips dL/dweight and dL/dbias).

    Args:
        eps: added to the variance before the square root.
        normalized_dims: how many trailing axes are normalized together (1: the features of each token).
        elementwise_affine: whether to learn ``weight`` and ``bias``.

    Shapes: (N, *S) unchanged; params ``weight``, ``bias`` of the last ``normalized_dims`` axes of S.
    """

    kind = "ln"
    samplewise = True

    def __init__(self, eps: float = 1e-5, normalized_dims: int = 1, elementwise_affine: bool = True,
                 name: str | None = None):
        super().__init__(name)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        if isinstance(normalized_dims, bool) or not isinstance(normalized_dims, int) or normalized_dims <= 0:
            raise ValueError(f"normalized_dims must be a positive int, got {normalized_dims!r}")
        if not isinstance(elementwise_affine, bool):
            raise ValueError(f"elementwise_affine must be True or False, got {elementwise_affine!r}")
        self.eps = float(eps)
        self.normalized_dims = normalized_dims
        self.elementwise_affine = elementwise_affine

    def compute_output_shape(self, input_shape):
        if len(input_shape) < self.normalized_dims:
            raise ValueError(f"LayerNorm normalizes the last {self.normalized_dims} axes, but its input has "
                             f"per-sample shape {tuple(input_shape)}; lower normalized_dims")
        return tuple(input_shape)

    @property
    def normalized_shape(self) -> tuple[int, ...]:
        return tuple(self.input_shape[len(self.input_shape) - self.normalized_dims:])

    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        out = super().build(input_shape)
        if self.elementwise_affine:
            self.params["weight"] = torch.ones(self.normalized_shape, dtype=dtype, device=device)
            self.params["bias"] = torch.zeros(self.normalized_shape, dtype=dtype, device=device)
        return out

    def forward(self, x, train=False):
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"LayerNorm '{self.name}' expects inputs of shape (N, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        dims = tuple(range(x.dim() - self.normalized_dims, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        centered = x - mean
        r = torch.rsqrt((centered * centered).mean(dim=dims, keepdim=True) + self.eps)
        xhat = centered * r
        self._cache = (xhat, r)
        if not self.elementwise_affine:
            return xhat
        return torch.addcmul(self.params["bias"], xhat, self.params["weight"])

    def backward(self, dy):
        xhat, r = self._cache
        self._cache = None
        dims = tuple(range(dy.dim() - self.normalized_dims, dy.dim()))
        outer = tuple(range(dy.dim() - self.normalized_dims))
        if self.elementwise_affine:
            if self.trainable:
                self.grads["weight"] = (dy * xhat).sum(dim=outer)
                self.grads["bias"] = dy.sum(dim=outer)
            g = dy * self.params["weight"]
        else:
            g = dy
        if not self.needs_input_grad:
            return None
        # (r / M)(M g - sum g - xhat sum(g xhat)) = r (g - mean g - xhat mean(g xhat))
        return r * (g - g.mean(dim=dims, keepdim=True) - xhat * (g * xhat).mean(dim=dims, keepdim=True))

    def get_config(self):
        return {"eps": self.eps, "normalized_dims": self.normalized_dims,
                "elementwise_affine": self.elementwise_affine, "name": self.name}

    def to_torch(self):
        ln = torch.nn.LayerNorm(self.normalized_shape, eps=self.eps, elementwise_affine=self.elementwise_affine)
        if self.elementwise_affine:
            w = self.params["weight"]
            ln = ln.to(device=w.device, dtype=w.dtype)
            with torch.no_grad():
                ln.weight.copy_(w)
                ln.bias.copy_(self.params["bias"])
        return ln
