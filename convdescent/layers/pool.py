"""Pooling layers with explicit backward passes.

Max pooling, window (ph, pw), stride (sh, sw), dilation (dh, dw) (the spacing of the window's taps), on
the input padded with values that never win:

    y[n, c, i, j] = max_{k < ph, l < pw} x[n, c, i*sh + k*dh, j*sw + l*dw]
    dL/dx[n, c, p, q] = sum_{i, j} delta[n, c, i, j] * [ (p, q) is the first arg-max of window (i, j) ]

The window is reduced offset by offset, each offset a strided view of the whole input, first along the
width and then along the height, so the cost is a few elementwise operations per offset whatever the batch
size. Ties go to the first arg-max in row-major order, as in torch.

Average pooling, on the input zero-padded by (ph0, pw0) on each side:

    y[n, c, i, j] = 1/m[i, j] * sum_{k, l} xp[n, c, i*sh + k, j*sw + l]
    dL/dx[n, c, p, q] = sum_{windows (i, j) that contain (p, q)} delta[n, c, i, j] / m[i, j]

with m[i, j] = ph*pw when padded zeros count (torch's count_include_pad=True), else the number of real
(unpadded) positions in window (i, j).
"""

from __future__ import annotations

import torch

from .. import native
from .base import Layer, check_rank, pair
from .conv import same_padding


class _Pool2D(Layer):
    kind = "pool"
    samplewise = True

    def __init__(self, pool_size=2, stride=None, name: str | None = None):
        super().__init__(name)
        self.pool_size = pair(pool_size, "pool_size")
        self.stride = self.pool_size if stride is None else pair(stride, "stride")
        self.dilation = (1, 1)

    @property
    def reach(self) -> tuple[int, int]:
        """The span (rows, columns) of one window: the pool size with dilation's gaps."""
        (ph, pw), (dh, dw) = self.pool_size, self.dilation
        return dh * (ph - 1) + 1, dw * (pw - 1) + 1

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{type(self).__name__} expects inputs of shape (C, H, W), got {tuple(input_shape)}")
        c, h, w = input_shape
        (ph, pw), (sh, sw) = self.reach, self.stride
        if h < ph or w < pw:
            what = f"pool_size {self.pool_size}" + (f" at dilation {self.dilation}" if self.dilation != (1, 1) else "")
            raise ValueError(f"{type(self).__name__} '{self.name}': {what} is larger than its (padded) input {h}x{w}")
        return c, (h - ph) // sh + 1, (w - pw) // sw + 1

    def _windows(self, ho: int, wo: int):
        """Yield (k, l, slice_h, slice_w): the strided view of offset (k, l) of every window."""
        (ph, pw), (sh, sw), (dh, dw) = self.pool_size, self.stride, self.dilation
        for k in range(ph):
            for l in range(pw):
                yield (k, l, slice(k * dh, k * dh + sh * (ho - 1) + 1, sh),
                       slice(l * dw, l * dw + sw * (wo - 1) + 1, sw))

    def get_config(self):
        return {"pool_size": self.pool_size, "stride": self.stride, "name": self.name}


def _offset(ndim: int, dim: int, start: int, count: int, step: int) -> tuple:
    """Index selecting ``count`` positions ``start, start + step, ...`` along ``dim``."""
    index = [slice(None)] * ndim
    index[dim] = slice(start, start + step * (count - 1) + 1, step)
    return tuple(index)


def _max_1d(x: torch.Tensor, dim: int, k: int, s: int, n_out: int, d: int = 1):
    """Max over windows of k taps spaced d apart along ``dim`` with stride s, plus what the backward needs.

    Returns (best, gains) where gains[l-1] is 1.0 where offset l strictly beat offsets 0..l-1, else 0.0.
    The masks are kept as floats: comparisons that produce bool tensors are several times slower on CPU
    than float arithmetic, and sign(v - best) clamped at 0 is exactly the strict "greater than" indicator.
    """
    best = x[_offset(x.dim(), dim, 0, n_out, s)]
    gains = []
    for l in range(1, k):
        v = x[_offset(x.dim(), dim, l * d, n_out, s)]
        gains.append(torch.sign(v - best).clamp_min_(0.0))
        best = torch.maximum(best, v)
    if k == 1:
        best = best.clone()
    return best, gains


def _max_1d_backward(dbest: torch.Tensor, gains, shape, dim: int, k: int, s: int, n_out: int,
                     d: int = 1) -> torch.Tensor:
    """Route dbest to the first arg-max of each window: the last offset whose gain is 1, else offset 0."""
    ndim = len(shape)
    if k == s and d == 1:
        # Windows tile the axis without overlap: every input position gets exactly one value (or none,
        # past the last window), so write the shares in place instead of zero-filling and adding.
        dx = torch.empty(shape, dtype=dbest.dtype, device=dbest.device)
        if n_out * s < shape[dim]:
            dx.narrow(dim, n_out * s, shape[dim] - n_out * s).zero_()
        rest = dbest
        for l in range(k - 1, 0, -1):
            share = dx[_offset(ndim, dim, l, n_out, s)]
            torch.mul(rest, gains[l - 1], out=share)
            rest = rest - share
        dx[_offset(ndim, dim, 0, n_out, s)] = rest
        return dx
    dx = torch.zeros(shape, dtype=dbest.dtype, device=dbest.device)
    rest = dbest
    for l in range(k - 1, 0, -1):
        share = rest * gains[l - 1]
        dx[_offset(ndim, dim, l * d, n_out, s)] += share
        rest = rest - share
    dx[_offset(ndim, dim, 0, n_out, s)] += rest
    return dx


def _route_by_code(dy, code, shape, pool_size, stride):
    """The native backward's formula in torch ops: each window's gradient goes to its recorded winner.

    Used when a forward ran natively but its backward cannot (the kernels were turned off in between,
    or an unusual gradient tensor)."""
    n, c, h, w = shape
    (ph, pw), (sh, sw) = pool_size, stride
    ho, wo = code.shape[1], code.shape[2]
    g = dy.permute(0, 2, 3, 1)
    dx = torch.zeros((n, h, w, c), dtype=dy.dtype, device=dy.device)
    for k in range(ph):
        for l in range(pw):
            hit = (code == k * pw + l).to(dy.dtype)
            dx[:, k:k + sh * (ho - 1) + 1:sh, l:l + sw * (wo - 1) + 1:sw, :] += g * hit
    return dx.permute(0, 3, 1, 2)


def backward_by_code(dy, code, in_shape, pool_size, stride) -> torch.Tensor:
    """dL/dx of a max-pool whose forward recorded each window's winner as a byte ``k*pw + l``.

    Args:
        dy: (N, C, Ho, Wo); code: uint8 (N, Ho, Wo, C); in_shape: the pool's input shape (N, C, H, W).

    Returns:
        dL/dx (N, C, H, W), laid out channels-last.
    """
    n, c, h, w = in_shape
    ho, wo = code.shape[1], code.shape[2]
    (ph, pw), (sh, sw) = pool_size, stride
    fn = native.kernel("cd_maxpool_bwd", dy)
    if fn is not None and dy.shape == (n, c, ho, wo):
        dx = torch.empty((n, h, w, c), dtype=dy.dtype, device=dy.device)
        fn(dy.data_ptr(), code.data_ptr(), dx.data_ptr(), n, c, h, w, ho, wo, *dy.stride(),
           ph, pw, sh, sw, native.threads())
        return dx.permute(0, 3, 1, 2)
    return _route_by_code(dy, code, in_shape, pool_size, stride)


class MaxPool2D(_Pool2D):
    """Max pooling over (ph, pw) windows.

    Max over a rectangle is the max over rows of the max within each row, so the window is reduced in
    two 1-D passes (width, then height); taking the first strict maximum in each pass picks the first
    arg-max in row-major order, the same element torch picks on ties.

    Args:
        pool_size: int or (ph, pw).
        stride: int or pair; defaults to pool_size (non-overlapping windows).
        padding: "valid" (none, the default), "same" (output ceil(H / stride), extra padding after, as
            TensorFlow), or an int / pair of at most half the pool size (as torch). Padded positions
            never win a window.
        dilation: int or (dh, dw): the spacing of a window's taps (torch's ``dilation``).

    Shapes: (N, C, H, W) -> (N, C, (H + pad_h - (dh*(ph-1)+1)) // sh + 1, likewise for W).
    """

    def __init__(self, pool_size=2, stride=None, padding="valid", dilation=1, name: str | None = None):
        super().__init__(pool_size, stride, name)
        self.dilation = pair(dilation, "dilation")
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got {padding!r}")
            self.padding = padding
        else:
            self.padding = pair(padding, "padding", allow_zero=True)
            if any(p > k // 2 for p, k in zip(self.padding, self.pool_size)):
                raise ValueError(f"padding must be at most half of pool_size {self.pool_size}, got {padding!r}")

    def pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        """Padding (top, bottom, left, right) for an input of spatial size (h, w)."""
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":
            return (*same_padding(h, self.reach[0], self.stride[0]),
                    *same_padding(w, self.reach[1], self.stride[1]))
        ph, pw = self.padding
        return ph, ph, pw, pw

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"MaxPool2D expects inputs of shape (C, H, W), got {tuple(input_shape)}")
        c, h, w = input_shape
        pt, pb, pl, pr = self.pads(h, w)
        return super().compute_output_shape((c, h + pt + pb, w + pl + pr))

    def native_ready(self, input_shape) -> bool:
        """Whether inputs of ``input_shape`` (C, H, W) take the native kernel: no padding, no dilation, and
        window codes fit a byte (at most 256 positions per window)."""
        _, h, w = input_shape
        return (not any(self.pads(h, w)) and self.dilation == (1, 1)
                and self.pool_size[0] * self.pool_size[1] <= 256)

    def forward(self, x, train=False):
        check_rank(x, 4, self)
        n, c, h, w = x.shape
        _, ho, wo = self.compute_output_shape((c, h, w))
        (ph, pw), (sh, sw) = self.pool_size, self.stride
        pt, pb, pl, pr = pads = self.pads(h, w)
        fn = native.kernel("cd_maxpool_fwd", x) if self.native_ready((c, h, w)) else None
        if fn is not None:
            # One pass in C (native/kernels.c): the maxima, and each window's winner as a byte k*pw + l.
            # The output is written in plain (N, C, Ho, Wo) order, which Flatten reads without a copy.
            out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
            code = torch.empty((n, ho, wo, c), dtype=torch.uint8, device=x.device)
            fn(x.data_ptr(), out.data_ptr(), code.data_ptr(), n, c, ho, wo, *x.stride(), *out.stride(),
               ph, pw, sh, sw, native.threads())
            self._cache = ("native", code, (n, c, h, w), (ho, wo))
            return out
        xh = x.permute(0, 2, 3, 1)  # channels-last view: offsets read runs of C contiguous floats
        if any(pads):
            # The lowest finite value rather than -inf: it never wins a window, and the difference of two
            # padded entries is 0 rather than nan.
            xh = torch.nn.functional.pad(xh, (0, 0, pl, pr, pt, pb), value=torch.finfo(x.dtype).min)
            h, w = h + pt + pb, w + pl + pr
        dh, dw = self.dilation
        row_max, gains_w = _max_1d(xh, 2, pw, sw, wo, dw)       # (N, H, Wo, C)
        out, gains_h = _max_1d(row_max, 1, ph, sh, ho, dh)      # (N, Ho, Wo, C)
        self._cache = (gains_w, gains_h, (n, h, w, c), tuple(row_max.shape), (ho, wo), pads)
        return out.permute(0, 3, 1, 2)

    def backward(self, dy):
        cache, self._cache = self._cache, None
        (ph, pw), (sh, sw) = self.pool_size, self.stride
        if cache[0] == "native":
            _, code, in_shape, _ = cache
            return backward_by_code(dy, code, in_shape, self.pool_size, self.stride)
        gains_w, gains_h, x_shape, row_shape, (ho, wo), (pt, pb, pl, pr) = cache
        dh, dw = self.dilation
        d_row = _max_1d_backward(dy.permute(0, 2, 3, 1), gains_h, row_shape, 1, ph, sh, ho, dh)
        dx = _max_1d_backward(d_row, gains_w, x_shape, 2, pw, sw, wo, dw)
        if pt or pb or pl or pr:
            dx = dx[:, pt:x_shape[1] - pb, pl:x_shape[2] - pr, :]
        return dx.permute(0, 3, 1, 2)

    def get_config(self):
        return {"pool_size": self.pool_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "name": self.name}

    def to_torch(self):
        pt, pb, pl, pr = self.pads(*self.input_shape[1:]) if self.input_shape else (0, 0, 0, 0)
        if pt == pb and pl == pr and pt <= self.pool_size[0] // 2 and pl <= self.pool_size[1] // 2:
            return torch.nn.MaxPool2d(self.pool_size, self.stride, padding=(pt, pl), dilation=self.dilation)
        return torch.nn.Sequential(torch.nn.ConstantPad2d((pl, pr, pt, pb), float("-inf")),
                                   torch.nn.MaxPool2d(self.pool_size, self.stride, dilation=self.dilation))


class AvgPool2D(_Pool2D):
    """Average pooling over (ph, pw) windows.

    Args:
        pool_size: int or (ph, pw).
        stride: int or pair; defaults to pool_size.
        padding: int or pair of zeros added on each side, at most half the pool size (as torch).
        count_include_pad: whether the padded zeros count in a window's divisor (torch's default, True) or
            only the real positions do.

    Shapes: (N, C, H, W) -> (N, C, (H + 2*pad_h - ph) // sh + 1, (W + 2*pad_w - pw) // sw + 1).
    """

    def __init__(self, pool_size=2, stride=None, padding=0, count_include_pad: bool = True,
                 name: str | None = None):
        super().__init__(pool_size, stride, name)
        self.padding = pair(padding, "padding", allow_zero=True)
        if any(p > k // 2 for p, k in zip(self.padding, self.pool_size)):
            raise ValueError(f"padding must be at most half of pool_size {self.pool_size}, got {padding!r}")
        if not isinstance(count_include_pad, bool):
            raise ValueError(f"count_include_pad must be True or False, got {count_include_pad!r}")
        self.count_include_pad = count_include_pad

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"AvgPool2D expects inputs of shape (C, H, W), got {tuple(input_shape)}")
        c, h, w = input_shape
        ph, pw = self.padding
        return super().compute_output_shape((c, h + 2 * ph, w + 2 * pw))

    def _divisor(self, h: int, w: int, ho: int, wo: int, like: torch.Tensor) -> torch.Tensor | float:
        """m[i, j], shaped (Ho, Wo, 1) to broadcast over channels-last windows, or the plain ph*pw."""
        (ph, pw), (pad_h, pad_w) = self.pool_size, self.padding
        if self.count_include_pad or not (pad_h or pad_w):
            return float(ph * pw)
        (sh, sw) = self.stride

        def real(size, pad, k, s, n_out):
            start = torch.arange(n_out, dtype=like.dtype, device=like.device) * s - pad
            return (torch.clamp(start + k, max=size) - torch.clamp(start, min=0))

        return (real(h, pad_h, ph, sh, ho)[:, None] * real(w, pad_w, pw, sw, wo)[None, :])[..., None]

    def forward(self, x, train=False):
        check_rank(x, 4, self)
        n, c, h, w = x.shape
        _, ho, wo = self.compute_output_shape((c, h, w))
        pad_h, pad_w = self.padding
        xh = x.permute(0, 2, 3, 1)
        if pad_h or pad_w:
            xh = torch.nn.functional.pad(xh, (0, 0, pad_w, pad_w, pad_h, pad_h))
        acc = torch.zeros((n, ho, wo, c), dtype=x.dtype, device=x.device)
        for k, l, sl_h, sl_w in self._windows(ho, wo):
            acc += xh[:, sl_h, sl_w, :]
        divisor = self._divisor(h, w, ho, wo, x)
        acc /= divisor
        self._cache = ((n, c, h, w), (ho, wo), divisor)
        return acc.permute(0, 3, 1, 2)

    def backward(self, dy):
        (n, c, h, w), (ho, wo), divisor = self._cache
        self._cache = None
        pad_h, pad_w = self.padding
        share = dy.permute(0, 2, 3, 1) / divisor
        dx = torch.zeros((n, h + 2 * pad_h, w + 2 * pad_w, c), dtype=dy.dtype, device=dy.device)
        for k, l, sl_h, sl_w in self._windows(ho, wo):
            dx[:, sl_h, sl_w, :] += share
        if pad_h or pad_w:
            dx = dx[:, pad_h:pad_h + h, pad_w:pad_w + w, :]
        return dx.permute(0, 3, 1, 2)

    def get_config(self):
        return {"pool_size": self.pool_size, "stride": self.stride, "padding": self.padding,
                "count_include_pad": self.count_include_pad, "name": self.name}

    def to_torch(self):
        return torch.nn.AvgPool2d(self.pool_size, self.stride, padding=self.padding,
                                  count_include_pad=self.count_include_pad)


class GlobalAvgPool2D(Layer):
    """Mean over all spatial positions: (N, C, H, W) -> (N, C).

    y[n, c] = 1/(H*W) sum_{p, q} x[n, c, p, q];  dL/dx[n, c, p, q] = delta[n, c] / (H*W).
    """

    kind = "gap"
    samplewise = True

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"GlobalAvgPool2D expects inputs of shape (C, H, W), got {tuple(input_shape)}")
        return (input_shape[0],)

    def forward(self, x, train=False):
        check_rank(x, 4, self)
        self._cache = tuple(x.shape)
        return x.mean(dim=(2, 3))

    def backward(self, dy):
        n, c, h, w = self._cache
        return (dy / (h * w))[:, :, None, None].expand(n, c, h, w)

    def to_torch(self):
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
