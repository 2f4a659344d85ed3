"""2-D convolution (a cross-correlation, as in every CNN library) with an explicit backward.

Forward, for input x of shape (N, C, H, W), weight w (F, C/G, kh, kw), bias b (F,), stride (sh, sw),
dilation (dh, dw), G groups and the input zero-padded by (pt, pb, pl, pr):

    y[n, f, i, j] = sum_{c in group(f), k, l} xp[n, c, i*sh + k*dh, j*sw + l*dw] * w[f, c', k, l] + b[f]

where group(f) is the block of C/G input channels that filter f's group reads and c' the index inside it
(G = 1: every channel; G = C: depthwise, one channel per group). Backward, with delta = dL/dy:

    dL/dw[f, c', k, l] = sum_{n, i, j} delta[n, f, i, j] * xp[n, c, i*sh + k*dh, j*sw + l*dw]
    dL/db[f]           = sum_{n, i, j} delta[n, f, i, j]
    dL/dxp[n, c, p, q] = sum_{f in group(c), k, l : i*sh + k*dh = p, j*sw + l*dw = q} delta[n, f, i, j] * w[f, c', k, l]

The last line is the "full" convolution of delta with the flipped kernel (for stride 1); here it is
computed as its scatter form (col2im), which is the same sum. See docs/gradients.md.

Implementation: the patches of x are laid out as a matrix ``cols`` of shape (N*Ho*Wo, C*kh*kw) (one row
per output position), so forward is one matrix product and dW another. The
output is returned as a logical (N, F, Ho, Wo) tensor in ``torch.channels_last`` memory format, which the
pooling and conv layers downstream read without copies.
"""

from __future__ import annotations

import torch

from .. import init as initializers
from .. import native
from .base import Layer, check_rank, pair


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Padding (before, after) that gives ceil(size / stride) outputs, extra on the after side (TF/Keras)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2D(Layer):
    """2-D convolution layer: ``filters`` kernels of ``kernel_size`` slid over the input.

    Args:
        filters: number of output channels F.
        kernel_size: int or (kh, kw).
        stride: int or (sh, sw).
        padding: "valid" (none), "same" (output ceil(H / stride), like Keras), an int, or a pair (ph, pw).
        use_bias: whether to add a per-filter bias.
        groups: G; input channels and filters are split into G blocks, filter block g reading only input
            block g (both counts must be divisible by G). G equal to the input channels is a depthwise conv.
        dilation: int or (dh, dw): the spacing of the kernel's taps (1: adjacent).
        kernel_init, bias_init: initializer names or callables (default Glorot uniform / zeros, as Keras).
        in_channels: optional; inferred from the input shape when the model is built.

    Shapes: input (N, C, H, W) -> output (N, F, Ho, Wo); params ``weight`` (F, C/G, kh, kw), ``bias`` (F,).
    """

    kind = "conv"
    samplewise = True

    def __init__(self, filters: int, kernel_size=3, stride=1, padding="valid", use_bias: bool = True,
                 kernel_init="glorot_uniform", bias_init="zeros", in_channels: int | None = None,
                 groups: int = 1, dilation=1, name: str | None = None):
        super().__init__(name)
        if isinstance(filters, bool) or not isinstance(filters, int) or filters <= 0:
            raise ValueError(f"filters must be a positive int, got {filters!r}")
        self.filters = filters
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got {padding!r}")
            self.padding = padding
        else:
            self.padding = pair(padding, "padding", allow_zero=True)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if filters % groups:
            raise ValueError(f"filters ({filters}) must be divisible by groups ({groups})")
        self.groups = groups
        self.dilation = pair(dilation, "dilation")
        self.use_bias = bool(use_bias)
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self.in_channels = in_channels
        initializers.get_initializer(kernel_init)
        initializers.get_initializer(bias_init)

    # -- shapes ------------------------------------------------------------------------------
    @property
    def reach(self) -> tuple[int, int]:
        """The span (rows, columns) one output position reads: the kernel size with dilation's gaps."""
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        return dh * (kh - 1) + 1, dw * (kw - 1) + 1

    def plain(self) -> bool:
        """No groups and no dilation: the case the native kernels and the fused conv + pool pass handle."""
        return self.groups == 1 and self.dilation == (1, 1)

    def pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        """Zero padding (top, bottom, left, right) for an input of spatial size (h, w)."""
        kh, kw = self.reach
        sh, sw = self.stride
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":
            return (*same_padding(h, kh, sh), *same_padding(w, kw, sw))
        ph, pw = self.padding
        return ph, ph, pw, pw

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"Conv2D expects inputs of shape (C, H, W), got {tuple(input_shape)}")
        c, h, w = input_shape
        pt, pb, pl, pr = self.pads(h, w)
        kh, kw = self.reach
        sh, sw = self.stride
        ho = (h + pt + pb - kh) // sh + 1
        wo = (w + pl + pr - kw) // sw + 1
        if ho <= 0 or wo <= 0:
            dil = f" at dilation {self.dilation}" if self.dilation != (1, 1) else ""
            raise ValueError(f"Conv2D '{self.name}': kernel {self.kernel_size}{dil} does not fit input {h}x{w} "
                             f"with padding {self.padding!r}; use padding='same' or a smaller kernel")
        return self.filters, ho, wo

    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        c = input_shape[0]
        if self.in_channels is not None and self.in_channels != c:
            raise ValueError(f"Conv2D '{self.name}' was given in_channels={self.in_channels}, "
                             f"but its input has {c} channels")
        if c % self.groups:
            raise ValueError(f"Conv2D '{self.name}' has groups={self.groups}, which does not divide its "
                             f"{c} input channels; pick groups dividing both {c} and filters={self.filters}")
        self.in_channels = c
        out = super().build(input_shape)
        kh, kw = self.kernel_size
        wshape = (self.filters, c // self.groups, kh, kw)
        self.params["weight"] = initializers.get_initializer(self.kernel_init)(wshape, generator, dtype, device)
        if self.use_bias:
            self.params["bias"] = initializers.get_initializer(self.bias_init)((self.filters,), generator,
                                                                                dtype, device)
        return out

    # -- computation -------------------------------------------------------------------------
    def padded(self, x: torch.Tensor):
        """Check x and pad it: (padded x, the cache fields (shape, pads, (Ho, Wo)))."""
        check_rank(x, 4, self)
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"Conv2D '{self.name}' expects {self.in_channels} input channels, "
                             f"got input of shape {tuple(x.shape)}")
        kh, kw = self.reach
        sh, sw = self.stride
        pt, pb, pl, pr = self.pads(h, w)
        if pt or pb or pl or pr:
            x = torch.nn.functional.pad(x, (pl, pr, pt, pb))
        ho = (h + pt + pb - kh) // sh + 1
        wo = (w + pl + pr - kw) // sw + 1
        return x, ((n, c, h, w), (pt, pb, pl, pr), (ho, wo))

    def im2col(self, x: torch.Tensor, ho: int, wo: int) -> torch.Tensor:
        """The patches of the padded input x: cols (N*Ho*Wo, C*kh*kw), one row per output position."""
        n, c = x.shape[:2]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        # cols_t[(c, k, l), (n, i, j)] = xp[n, c, i*sh + k*dh, j*sw + l*dw], filled by one strided copy per
        # kernel offset (much faster than copying unfold()'s patches, whose innermost run is only kw long).
        cols_t = torch.empty((c, kh, kw, n, ho, wo), dtype=x.dtype, device=x.device)
        fn = native.kernel("cd_im2col", x, cols_t) if self.dilation == (1, 1) else None
        if fn is not None:  # the same copies in one native pass (native/kernels.c)
            fn(x.data_ptr(), cols_t.data_ptr(), n, c, ho, wo, kh, kw, sh, sw, *x.stride(), native.threads())
        else:
            for k in range(kh):
                for l in range(kw):
                    cols_t[:, k, l] = x[:, :, k * dh:k * dh + sh * (ho - 1) + 1:sh,
                                        l * dw:l * dw + sw * (wo - 1) + 1:sw].transpose(0, 1)
        return cols_t.view(c * kh * kw, n * ho * wo).t()

    def _grouped_forward(self, cols: torch.Tensor) -> torch.Tensor:
        """The G per-group products: out[:, group g] = cols[:, block g] @ w[group g]^T, as one batched product.

        Returns:
            (N*Ho*Wo, F), the filters in order.
        """
        g = self.groups
        m, ck = cols.shape
        k = ck // g
        fg = self.filters // g
        w_g = self.params["weight"].reshape(g, fg, k).transpose(1, 2)  # (G, K, Fg)
        out = torch.bmm(cols.t().reshape(g, k, m).transpose(1, 2), w_g)  # (G, M, Fg)
        out = out.transpose(0, 1).reshape(m, self.filters)  # (M, G, Fg) -> (M, F)
        if self.use_bias:
            out = out + self.params["bias"]
        return out

    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        xp, (shape, pads, (ho, wo)) = self.padded(x)
        cols = self.im2col(xp, ho, wo)
        if self.groups > 1:
            out = self._grouped_forward(cols)
            self._cache = (cols if self.trainable else None, shape, pads, (ho, wo), None)
            return out.view(shape[0], ho, wo, self.filters).permute(0, 3, 1, 2)
        wmat = self.params["weight"].reshape(self.filters, cols.shape[1])
        if self.use_bias:
            out = torch.addmm(self.params["bias"], cols, wmat.t())
        else:
            out = cols @ wmat.t()
        # the cache: the patches, the shapes, and a padded input to lay the patches out from when they are
        # None (the fused conv + max-pool node of ``convdescent.plan`` hands over only the input); a frozen
        # conv's backward needs no patches (dL/dx reads only the weights)
        self._cache = (cols if self.trainable else None, shape, pads, (ho, wo), None)
        return out.view(shape[0], ho, wo, self.filters).permute(0, 3, 1, 2)

    # Fused with a following max-pool when a patch has at most this many entries (C*kh*kw): the product per
    # output position is then a handful of multiply-adds, cheaper computed inside the pooling loop than
    # written out as a whole feature map and read back (measured on the tutorial's 1x3x3 patches).
    FUSE_MAX_PATCH = 32

    def fuses_with(self, pool) -> bool:
        """Whether this built layer and a built ``pool`` can run as one native pass (``plan.ConvPool``)."""
        return (self.built and pool.built and self.plain() and self.in_channels * self.kernel_size[0] * self.kernel_size[1]
                <= self.FUSE_MAX_PATCH and pool.native_ready(self.output_shape)
                and native.library() is not None and native.enabled())

    def backward(self, dy: torch.Tensor) -> torch.Tensor | None:
        cols, (n, c, h, w), (pt, pb, pl, pr), (ho, wo), xp = self._cache
        self._cache = None
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        f, g = self.filters, self.groups
        m, k_g, fg = n * ho * wo, c // g * kh * kw, f // g
        d = dy.permute(0, 2, 3, 1).reshape(m, f)  # delta, one row per output position
        d_g = d.reshape(m, g, fg).transpose(0, 1) if g > 1 else None  # (G, M, Fg)
        if self.trainable:  # a frozen conv passes dL/dx on and leaves dW, db alone
            if cols is None:  # the fused forward read the patches from the input directly
                cols = self.im2col(xp, ho, wo)
            if self.use_bias:
                self.grads["bias"] = d.sum(0)
            if g == 1:
                # dW[f, (c,k,l)] = sum_rows delta[row, f] * cols[row, (c,k,l)]
                self.grads["weight"] = (cols.t() @ d).t().reshape(f, c, kh, kw)
            else:
                # the same product within each group: dW[group g] = delta[:, group g]^T cols[:, block g]
                cols_g = cols.t().reshape(g, k_g, m)                          # (G, K, M)
                self.grads["weight"] = torch.bmm(cols_g, d_g).transpose(1, 2).reshape(f, c // g, kh, kw)
        if not self.needs_input_grad:
            return None
        # dcols[row, (c,k,l)] = sum_f delta[row, f] * w[f, (c,k,l)] over the filters of c's group; then
        # scatter-add back (col2im).
        if g == 1:
            dcols = (d @ self.params["weight"].reshape(f, c * kh * kw)).view(n, ho, wo, c, kh, kw)
        else:
            dcols = torch.bmm(d_g, self.params["weight"].reshape(g, fg, k_g))  # (G, M, K)
            dcols = dcols.transpose(0, 1).reshape(n, ho, wo, c, kh, kw)
        dxp = torch.zeros((n, h + pt + pb, w + pl + pr, c), dtype=dy.dtype, device=dy.device)
        for k in range(kh):
            for l in range(kw):
                dxp[:, k * dh:k * dh + sh * (ho - 1) + 1:sh, l * dw:l * dw + sw * (wo - 1) + 1:sw, :] += \
                    dcols[..., k, l]
        dx = dxp[:, pt:pt + h, pl:pl + w, :]
        return dx.permute(0, 3, 1, 2)

    # -- description -------------------------------------------------------------------------
    def get_config(self):
        return {"filters": self.filters, "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "use_bias": self.use_bias,
                "kernel_init": initializers.initializer_name(self.kernel_init),
                "bias_init": initializers.initializer_name(self.bias_init),
                "in_channels": self.in_channels, "groups": self.groups, "dilation": self.dilation,
                "name": self.name}

    def to_torch(self) -> torch.nn.Module:
        _, h, w = self.input_shape
        pt, pb, pl, pr = self.pads(h, w)
        conv = torch.nn.Conv2d(self.in_channels, self.filters, self.kernel_size, stride=self.stride,
                               padding=(pt, pl) if (pt == pb and pl == pr) else 0, bias=self.use_bias,
                               groups=self.groups, dilation=self.dilation)
        p = self.params["weight"]
        conv = conv.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            conv.weight.copy_(p)
            if self.use_bias:
                conv.bias.copy_(self.params["bias"])
        if pt == pb and pl == pr:
            return conv
        return torch.nn.Sequential(torch.nn.ZeroPad2d((pl, pr, pt, pb)), conv)
