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

Implementation: forward is torch's convolution primitive (``conv2d``: oneDNN on the CPU, cuDNN on CUDA)
and dL/dx its transposed convolution (``conv_transpose2d``), which is the scatter sum above; dW is evaluated
by whichever of four forms of its sum measured fastest for the conv's shape (``Conv2D._weight_grad``). With
``Conv2D.USE_PRIMITIVES = False`` everything runs on the explicit reference, which the tests also check: the
patches of x laid out as a matrix ``cols`` of shape (N*Ho*Wo, C*kh*kw) (one row per output position), so
forward is one matrix product, dW another, and dL/dx a product scattered back (col2im). Measured at batch
128 on a 2-core CPU, the primitives made a training step of resnet8 about 2x and of mobilenet_tiny about
2.5x faster than the patches (docs/performance.md). The output is a logical (N, F, Ho, Wo) tensor in
``torch.channels_last`` memory format, which the pooling and conv layers downstream read without copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

    @property
    def patch_entries(self) -> int:
        """Entries of one input patch, C*kh*kw over all input channels (what ``FUSE_MAX_PATCH`` and
        ``CORRELATE_MIN_PATCH`` bound)."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

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
        if self.primitives:
            return self._primitive_forward(x)
        xp, (shape, pads, (ho, wo)) = self.padded(x)
        cols = self.im2col(xp, ho, wo)
        if self.groups > 1:
            out = self._grouped_forward(cols)
            self._cache = ("cols", cols if self.trainable else None, shape, pads, (ho, wo))
            return out.view(shape[0], ho, wo, self.filters).permute(0, 3, 1, 2)
        wmat = self.params["weight"].reshape(self.filters, cols.shape[1])
        if self.use_bias:
            out = torch.addmm(self.params["bias"], cols, wmat.t())
        else:
            out = cols @ wmat.t()
        # the cache: what the weight gradient is computed from ("cols": the patches; "padded": a padded
        # input, as the fused conv + max-pool node of ``convdescent.plan`` hands over; "input": the input
        # itself, padded by the products), the shapes; a frozen conv's backward needs neither (dL/dx reads
        # only the weights)
        self._cache = ("cols", cols if self.trainable else None, shape, pads, (ho, wo))
        return out.view(shape[0], ho, wo, self.filters).permute(0, 3, 1, 2)

    #: Forward and backward through torch's convolution primitives (oneDNN on the CPU, cuDNN on CUDA; see
    #: the module doc). False: patches and matrix products only (the explicit reference the tests also run).
    USE_PRIMITIVES = True

    @property
    def primitives(self) -> bool:
        return self.USE_PRIMITIVES

    def _primitive_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = the cross-correlation of the module doc by ``torch.nn.functional.conv2d``."""
        check_rank(x, 4, self)
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"Conv2D '{self.name}' expects {self.in_channels} input channels, "
                             f"got input of shape {tuple(x.shape)}")
        pt, pb, pl, pr = pads = self.pads(h, w)
        (kh, kw), (sh, sw) = self.reach, self.stride
        ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
        bias = self.params["bias"] if self.use_bias else None
        weight = self._weight_layout(x)
        if pt == pb and pl == pr:
            kind, data = "input", x
            y = F.conv2d(x, weight, bias, self.stride, (pt, pl), self.dilation, self.groups)
        else:  # "same" padding with an odd total: the extra row and column go after, as in the im2col path
            kind, data = "padded", F.pad(x, (pl, pr, pt, pb))
            y = F.conv2d(data, weight, bias, self.stride, 0, self.dilation, self.groups)
        self._cache = (kind, data if self.trainable else None, (n, c, h, w), pads, (ho, wo))
        return y

    def _weight_layout(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in the memory layout of x: a channels-last input with a channels-last weight gives a
        channels-last output, the layout the layers after a conv read fastest (measured: a 16-channel 3x3
        conv at batch 128 ran 32 ms channels-last against 74 ms on contiguous maps)."""
        w = self.params["weight"]
        if x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return w.contiguous(memory_format=torch.channels_last)
        return w

    # Fused with a following max-pool when a patch has at most this many entries (C*kh*kw): the product per
    # output position is then a handful of multiply-adds, cheaper computed inside the pooling loop than
    # written out as a whole feature map and read back (measured on the tutorial's 1x3x3 patches).
    FUSE_MAX_PATCH = 32

    # dW by the batch correlation only from this many patch entries (C*kh*kw) up; below it the patches and a
    # matrix product are faster. Measured, 3x3 convs on 28x28-32x32 maps at batch 32 and 128, 2 threads:
    # patches 3-10x faster at 9 entries, 1.5-3.5x at 27 and 36, 1.6-1.7x at 72; the correlation 1.05-3.6x
    # faster at 144.
    CORRELATE_MIN_PATCH = 100

    def fuses_with(self, pool) -> bool:
        """Whether this built layer and a built ``pool`` can run as one native pass (``plan.ConvPool``)."""
        return (self.built and pool.built and self.plain() and self.patch_entries
                <= self.FUSE_MAX_PATCH and pool.native_ready(self.output_shape)
                and native.library() is not None and native.enabled())

    def backward(self, dy: torch.Tensor) -> torch.Tensor | None:
        kind, data, (n, c, h, w), pads, (ho, wo) = self._cache
        self._cache = None
        if self.primitives:
            # one layout for delta, whichever layer made it: the primitives then round the same way (a plan
            # that reorders a ReLU and a pool gives bit-identical gradients), and the pointwise product
            # reads it without a copy
            dy = dy.contiguous(memory_format=torch.channels_last)
        if self.trainable:  # a frozen conv passes dL/dx on and leaves dW, db alone
            if self.use_bias:
                self.grads["bias"] = dy.sum(dim=(0, 2, 3))
            self.grads["weight"] = self._weight_grad(kind, data, dy, (n, c, h, w), pads, (ho, wo))
        if not self.needs_input_grad:
            return None
        if self.primitives:
            return self._input_grad_by_transpose(dy, (n, c, h, w), pads, (ho, wo))
        return self._input_grad_by_patches(dy, (n, c, h, w), pads, (ho, wo))

    def _weight_grad_by_patches(self, cols: torch.Tensor, dy: torch.Tensor, sizes) -> torch.Tensor:
        """dW[f, (c,k,l)] = sum_rows delta[row, f] * cols[row, (c,k,l)], within each group when G > 1."""
        n, c, ho, wo = sizes
        (kh, kw), f, g = self.kernel_size, self.filters, self.groups
        m = n * ho * wo
        d = dy.permute(0, 2, 3, 1).reshape(m, f)  # delta, one row per output position
        # every evaluation returns dW in the weight's own (contiguous) layout, which the optimizer streams
        if g == 1:
            return (cols.t() @ d).t().reshape(f, c, kh, kw).contiguous()
        k_g, fg = c // g * kh * kw, f // g
        d_g = d.reshape(m, g, fg).transpose(0, 1)                     # (G, M, Fg)
        cols_g = cols.t().reshape(g, k_g, m)                          # (G, K, M)
        return torch.bmm(cols_g, d_g).transpose(1, 2).reshape(f, c // g, kh, kw).contiguous()

    def _weight_grad(self, kind, data, dy, shape, pads, sizes) -> torch.Tensor:
        """dW by the cheapest of four evaluations of the same sum, chosen by measurement at batch 128 on a
        2-core CPU (the rest of the engine's convs lay out patches):

        - 1x1, stride 1, no padding (pointwise): delta^T x as one matrix product over the positions; both
          are (N*H*W, channels) matrices without a copy in channels-last memory (12 against 48 ms for
          64 -> 128 channels on 7x7 maps, against the correlation below);
        - depthwise (one filter per channel): one multiply-and-sum per kernel tap (2-10 against 30-60 ms);
        - other stride-1 convs without groups whose patch has at least ``CORRELATE_MIN_PATCH`` entries
          (C*kh*kw): one correlation over the batch (below; 33 against 122 ms for 16 channels on 28x28 maps,
          against the patches);
        - the rest (strided, grouped, small patches): patches and a matrix product (33 against 51 ms for a
          strided 16 -> 32 conv; 1.0 against 11.7 ms for the tutorial's 1 -> 32 3x3 conv on 28x28 maps).
        """
        n, c, h, w = shape
        ho, wo = sizes
        if kind != "cols" and self.primitives:
            f, g = self.filters, self.groups
            if self.kernel_size == (1, 1) and self.stride == (1, 1) and not any(pads) and g == 1:
                d = dy.permute(0, 2, 3, 1).reshape(-1, f)
                return (d.t() @ data.permute(0, 2, 3, 1).reshape(-1, c)).view(f, c, 1, 1).contiguous()
            if g == c == f and g > 1:
                return self._weight_grad_by_taps(kind, data, dy, pads, sizes)
            if g == 1 and self.stride == (1, 1) and self.patch_entries >= self.CORRELATE_MIN_PATCH:
                return self._weight_grad_by_correlation(kind, data, dy, pads, sizes)
        cols = data
        if kind != "cols":  # lay the patches out from the (padded) input
            xp = data if kind == "padded" else F.pad(data, (pads[2], pads[3], pads[0], pads[1]))
            cols = self.im2col(xp, ho, wo)
        return self._weight_grad_by_patches(cols, dy, (n, c, ho, wo))

    def _weight_grad_by_taps(self, kind, data, dy, pads, sizes) -> torch.Tensor:
        """Depthwise dW[c, 0, k, l] = sum_{n, i, j} delta[n, c, i, j] xp[n, c, i*sh + k*dh, j*sw + l*dw], tap by tap."""
        ho, wo = sizes
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        xp = data if kind == "padded" else F.pad(data, (pads[2], pads[3], pads[0], pads[1]))
        out = torch.empty((self.filters, 1, kh, kw), dtype=dy.dtype, device=dy.device)
        for k in range(kh):
            for l in range(kw):
                window = xp[:, :, k * dh:k * dh + sh * (ho - 1) + 1:sh, l * dw:l * dw + sw * (wo - 1) + 1:sw]
                out[:, 0, k, l] = (dy * window).sum(dim=(0, 2, 3))
        return out

    def _weight_grad_by_correlation(self, kind, data, dy, pads, sizes) -> torch.Tensor:
        """dW[f, c, k, l] = sum_{n, i, j} delta[n, f, i, j] xp[n, c, i*sh + k*dh, j*sw + l*dw] as a convolution
        whose channels are the batch: the padded input (examples as channels) correlated with delta
        (examples as channels, taps spaced by the stride). Its output at offset (u, v) is the sum for a
        kernel tap at (u, v); the taps are the offsets k*dh, l*dw.

        Plain conv: input (C, N, Hp, Wp), kernels (F, N, Ho, Wo) -> (C, F, ., .). Depthwise (G = C, filter f
        reading channel f // (F/C)): input (1, C*N, Hp, Wp) in C groups, kernels (F, N, Ho, Wo) -> (1, F, ., .).
        """
        pt, pb, pl, pr = pads
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        pad = (pt, pl) if kind == "input" else 0
        if self.groups == 1:
            out = F.conv2d(data.transpose(0, 1), dy.transpose(0, 1), None, 1, pad, self.stride).transpose(0, 1)
        else:
            n, c = data.shape[:2]
            inp = data.transpose(0, 1).reshape(1, c * n, *data.shape[2:])
            kernels = dy.transpose(0, 1).reshape(self.filters, n, *dy.shape[2:])
            out = F.conv2d(inp, kernels, None, 1, pad, self.stride, self.groups).transpose(0, 1)
        return out[:, :, :dh * (kh - 1) + 1:dh, :dw * (kw - 1) + 1:dw].contiguous()

    def _input_grad_by_transpose(self, dy, shape, pads, sizes) -> torch.Tensor:
        """dL/dx: the scatter sum of the module doc, which is the transposed convolution of delta with the same
        weights (``conv_transpose2d``); rows and columns of the padded input no window reads get zero."""
        n, c, h, w = shape
        pt, pb, pl, pr = pads
        ho, wo = sizes
        (rh, rw), (sh, sw), (dh, dw) = self.reach, self.stride, self.dilation
        hp, wp = h + pt + pb, w + pl + pr
        full_h, full_w = (ho - 1) * sh + rh, (wo - 1) * sw + rw  # the padded rows and columns windows read
        weight = self._weight_layout(dy)
        if pt == pb and pl == pr:
            oph, opw = hp - full_h, wp - full_w
            if (oph < sh or oph < dh) and (opw < sw or opw < dw):
                return F.conv_transpose2d(dy, weight, None, self.stride, (pt, pl), (oph, opw), self.groups,
                                          self.dilation)
        dxp = F.conv_transpose2d(dy, weight, None, self.stride, 0, 0, self.groups, self.dilation)
        if full_h < hp or full_w < wp:
            dxp = F.pad(dxp, (0, wp - full_w, 0, hp - full_h))
        return dxp[:, :, pt:pt + h, pl:pl + w]

    def _input_grad_by_patches(self, dy, shape, pads, sizes) -> torch.Tensor:
        """dL/dx by the scatter form: dcols[row, (c,k,l)] = sum_f delta[row, f] * w[f, (c,k,l)] over the filters
        of c's group, then added back into place (col2im)."""
        n, c, h, w = shape
        pt, pb, pl, pr = pads
        ho, wo = sizes
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        f, g = self.filters, self.groups
        m, k_g, fg = n * ho * wo, c // g * kh * kw, f // g
        d = dy.permute(0, 2, 3, 1).reshape(m, f)
        if g == 1:
            dcols = (d @ self.params["weight"].reshape(f, c * kh * kw)).view(n, ho, wo, c, kh, kw)
        else:
            d_g = d.reshape(m, g, fg).transpose(0, 1)                             # (G, M, Fg)
            dcols = torch.bmm(d_g, self.params["weight"].reshape(g, fg, k_g))    # (G, M, K)
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
