"""Fully connected layer with an explicit backward.

    y = x W^T + b                    x (N, in), W (out, in), b (out,)
    dL/dW = delta^T x                (out, in)
    dL/db = sum_n delta[n]           (out,)
    dL/dx = delta W                  (N, in)

A (N, T, in) input (a sequence of tokens) is the same layer applied to each token: the N*T tokens are
the rows of x, and the sums over n above run over every token of every example.
"""

from __future__ import annotations

import torch

from .. import init as initializers
from .. import native, workspace
from .base import Layer, check_rank


class Dense(Layer):
    """Fully connected layer.

    Args:
        units: number of outputs.
        use_bias: whether to add a bias.
        kernel_init, bias_init: initializer names or callables (default Glorot uniform / zeros, as Keras).

    Shapes: input (N, in) -> output (N, units), or token-wise (N, T, in) -> (N, T, units); params
    ``weight`` (units, in), ``bias`` (units,).
    """

    kind = "dense"
    #: Weights of at least this many elements run their three products through the native dense kernels
    #: (``_native``); smaller ones gain nothing from them and keep torch's.
    NATIVE_MIN_WEIGHT = 1 << 16

    def __init__(self, units: int, use_bias: bool = True, kernel_init="glorot_uniform", bias_init="zeros",
                 in_features: int | None = None, name: str | None = None):
        super().__init__(name)
        if isinstance(units, bool) or not isinstance(units, int) or units <= 0:
            raise ValueError(f"units must be a positive int, got {units!r}")
        self.units = units
        self.use_bias = bool(use_bias)
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self.in_features = in_features
        initializers.get_initializer(kernel_init)
        initializers.get_initializer(bias_init)

    def compute_output_shape(self, input_shape):
        if len(input_shape) not in (1, 2):
            raise ValueError(f"Dense expects flat inputs of shape (features,), got {tuple(input_shape)}; "
                             f"put a Flatten() before it (or give it tokens of shape (T, features))")
        return tuple(input_shape[:-1]) + (self.units,)

    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        out = super().build(input_shape)
        if self.in_features is not None and self.in_features != input_shape[-1]:
            raise ValueError(f"Dense '{self.name}' was given in_features={self.in_features}, "
                             f"but its input has {input_shape[-1]} features")
        self.in_features = input_shape[-1]
        # The weight has torch's shape (units, in) but is stored column-major (its transpose is contiguous):
        # measured on a 2-core CPU, x @ W^T and the weight gradient x^T @ delta run 1.2x and 3x faster with
        # this layout than with a row-major weight, and the gradient comes out in the same layout, so the
        # optimizer's elementwise updates still stream through memory in order.
        self.params["weight"] = initializers.get_initializer(self.kernel_init)(
            (self.units, self.in_features), generator, dtype, device).t().contiguous().t()
        if self.use_bias:
            self.params["bias"] = initializers.get_initializer(self.bias_init)((self.units,), generator,
                                                                                dtype, device)
        return out

    def forward(self, x, train=False):
        if x.dim() == 3:  # tokens: each of the N*T rows goes through the layer on its own
            return self.forward(x.reshape(-1, x.shape[2]), train).view(*x.shape[:2], self.units)
        check_rank(x, 2, self)
        if x.shape[1] != self.in_features:
            raise ValueError(f"Dense '{self.name}' expects {self.in_features} input features, "
                             f"got input of shape {tuple(x.shape)}")
        self._cache = x
        w = self.params["weight"]
        kernel = self._native("cd_dense_fwd", x)
        if kernel is not None:
            fn, gemm = kernel
            n, threads = x.shape[0], native.threads()
            # inside train_step the same buffers every step (workspace.py); fresh memory elsewhere
            y = workspace.empty(self, "output", (n, self.units), x.dtype)
            scratch = workspace.empty(self, "partial sums", (threads, n, self.units), x.dtype)
            bias = self.params["bias"].data_ptr() if self.use_bias else None
            fn(gemm, x.data_ptr(), w.data_ptr(), bias, y.data_ptr(), scratch.data_ptr(), n, self.in_features,
               self.units, self.in_features, threads)
            return y
        if self.use_bias:
            return torch.addmm(self.params["bias"], x, w.t())
        return x @ w.t()

    def _native(self, name, x):
        """(kernel, BLAS address) for the native dense products (native/kernels.c), or None for torch's.

        They split the input features over threads the way torch's fused Adam step splits the weight, so
        the weight, its gradient and Adam's moments stay with one core from the forward to the update (see
        the kernels' comment for what that saved). Used for large weights in their column-major layout, a
        contiguous non-empty input, on CPU in float32/float64."""
        w = self.params["weight"]
        if (w.numel() < self.NATIVE_MIN_WEIGHT or not w.t().is_contiguous() or x.shape[0] == 0
                or not x.is_contiguous()):
            return None
        b = self.params.get("bias")
        if b is not None and (b.dtype != w.dtype or b.device != w.device or not b.is_contiguous()):
            return None
        fn = native.kernel(name, x, w)
        if fn is None:
            return None
        gemm = native.gemm(w.dtype)
        return None if gemm is None else (fn, gemm)

    def backward(self, dy):
        if dy.dim() == 3:  # tokens, as in forward (the cache holds the (N*T, in) rows)
            dx = self.backward(dy.reshape(-1, dy.shape[2]))
            return None if dx is None else dx.reshape(*dy.shape[:2], self.in_features)
        x = self._cache
        self._cache = None
        if not self.trainable:  # frozen: dL/dx only
            return self._input_grad(x, dy) if self.needs_input_grad else None
        kernel = self._native("cd_dense_dw", x)
        # the kernels read dy by pointer: anything but an (N, units) tensor like x takes the torch path,
        # which reports a mismatch
        if (kernel is not None and tuple(dy.shape) == (x.shape[0], self.units) and dy.dtype == x.dtype
                and dy.device == x.device):
            return self._native_backward(x, dy, *kernel)
        self.grads["weight"] = (x.t() @ dy).t()  # dL/dW = delta^T x, computed in the weight's layout
        if self.use_bias:
            self.grads["bias"] = dy.sum(0)
        if not self.needs_input_grad:
            return None
        # dL/dx = delta W, computed as (W^T delta^T)^T: with the weight stored column-major, W^T is a plain
        # row-major matrix and this orientation ran 1.2-2x faster on a 2-core CPU. The result is a
        # transposed view; Flatten's backward reshapes it without a copy.
        w = self.params["weight"]
        return (w.t() @ dy.t()).t()

    def _input_grad(self, x, dy):
        """dL/dx = delta W alone (a frozen layer): the native kernel where the backward would use it."""
        kernel = self._native("cd_dense_dx", x) if x is not None else None
        if (kernel is None or tuple(dy.shape) != (x.shape[0], self.units) or dy.dtype != x.dtype
                or dy.device != x.device):
            w = self.params["weight"]
            return (w.t() @ dy.t()).t()
        fn, gemm = kernel
        return self._native_dx(dy, fn, gemm)

    def _native_dx(self, dy, fn, gemm):
        n, k, o, threads = dy.shape[0], self.in_features, self.units, native.threads()
        dy, transposed, ld = _dy_layout(dy, n, o)
        dx = workspace.empty(self, "input grad", (n, k), dy.dtype)
        fn(gemm, self.params["weight"].data_ptr(), dy.data_ptr(), dx.data_ptr(), n, k, o, ld, transposed, threads)
        return dx

    def _native_backward(self, x, dy, dw_kernel, gemm):
        """The backward through the native kernels: the same products; dL/dx comes row-major here (each
        thread writes its columns), which the ReLU and pooling backwards before it read faster than the
        transposed result above (measured at batch 128: 0.13 against 0.52 ms for the ReLU)."""
        n, k, o, threads = x.shape[0], self.in_features, self.units, native.threads()
        dy, transposed, ld = _dy_layout(dy, n, o)
        dwt = torch.empty(k, o, dtype=x.dtype)
        dw_kernel(gemm, x.data_ptr(), dy.data_ptr(), dwt.data_ptr(), n, k, o, k, ld, transposed, threads)
        self.grads["weight"] = dwt.t()
        if self.use_bias:
            self.grads["bias"] = dy.sum(0)
        if not self.needs_input_grad:
            return None
        return self._native_dx(dy, native.kernel("cd_dense_dx", x), gemm)

    def backward_and_update(self, dy, update, prefix):
        """The backward with the optimizer's coming Adam step on the weight done inside it (``update.take``
        hands over the weight's moments): one native pass computes dL/dx with the weight as it was, the
        weight's gradient a block at a time, and the update of that block while its gradient is in the cache
        (``cd_dense_bwd_adam``). The weight's gradient is never written out and ``grads`` gets none; the
        bias's gradient is computed as usual for the step to update. Anything the native backward would not
        take runs the plain backward."""
        x = self._cache
        if x is None or not self.trainable or dy.dim() != 2:
            return self.backward(dy)
        kernel = self._native("cd_dense_bwd_adam", x)
        if (kernel is None or tuple(dy.shape) != (x.shape[0], self.units) or dy.dtype != x.dtype
                or dy.device != x.device):
            return self.backward(dy)
        w = self.params["weight"]
        moments = update.take(prefix + "weight", w)
        if moments is None:
            return self.backward(dy)
        mu, nu, nu_max = moments
        self._cache = None
        fn, gemm = kernel
        n, k, o, threads = x.shape[0], self.in_features, self.units, native.threads()
        dy, transposed, ld = _dy_layout(dy, n, o)
        dx = workspace.empty(self, "input grad", (n, k), x.dtype) if self.needs_input_grad else None
        rows = native.dense_update_rows(o)
        scratch = workspace.empty(self, "gradient blocks", (threads, rows, o), x.dtype)
        fn(gemm, x.data_ptr(), dy.data_ptr(), w.data_ptr(), mu.data_ptr(), nu.data_ptr(),
           None if nu_max is None else nu_max.data_ptr(), None if dx is None else dx.data_ptr(),
           scratch.data_ptr(), n, k, o, k, ld, transposed, rows, update.hyper_array(), threads)
        self.grads.pop("weight", None)
        if self.use_bias:
            self.grads["bias"] = dy.sum(0)
        return dx

    def get_config(self):
        return {"units": self.units, "use_bias": self.use_bias,
                "kernel_init": initializers.initializer_name(self.kernel_init),
                "bias_init": initializers.initializer_name(self.bias_init),
                "in_features": self.in_features, "name": self.name}

    def to_torch(self):
        w = self.params["weight"]
        lin = torch.nn.Linear(self.in_features, self.units, bias=self.use_bias).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.use_bias:
                lin.bias.copy_(self.params["bias"])
        return lin


def _dy_layout(dy, n: int, o: int):
    """How the native kernels read dL/dy (n, o): row-major as it is (ld o), its transpose row-major (ld n,
    flag 1: Dense's dx comes transposed from the layer after it), or a row-major copy."""
    if dy.is_contiguous():
        return dy, 0, o
    if dy.t().is_contiguous():
        return dy, 1, n
    return dy.contiguous(), 0, o
