"""Naive twins of the fast layers, written straight from the formulas for the tests.

Everything here works on plain NCHW tensors with loops over output positions or kernel offsets and einsum
for the sums, so each line can be read against docs/gradients.md. They are slow and meant for small shapes;
the fast layers must agree with them.

Padding is given as (top, bottom, left, right); a conv input is zero-padded, a max-pool input is padded with
-inf (padded positions never win).
"""

from __future__ import annotations

import torch

Pads = tuple[int, int, int, int]


def _pad(x: torch.Tensor, pads: Pads, value: float = 0.0) -> torch.Tensor:
    pt, pb, pl, pr = pads
    return torch.nn.functional.pad(x, (pl, pr, pt, pb), value=value)


def _out_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


# -- convolution (cross-correlation) --------------------------------------------------------------
def conv2d_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride=(1, 1),
                   pads: Pads = (0, 0, 0, 0)) -> torch.Tensor:
    """y[n, f, i, j] = sum_{c, k, l} xp[n, c, i*sh + k, j*sw + l] * w[f, c, k, l] + b[f].

    Args:
        x: (N, C, H, W). w: (F, C, kh, kw). b: (F,) or None. stride: (sh, sw). pads: (top, bottom, left, right).

    Returns:
        y: (N, F, Ho, Wo).
    """
    xp = _pad(x, pads)
    n, _, hp, wp = xp.shape
    f, _, kh, kw = w.shape
    sh, sw = stride
    ho, wo = _out_size(hp, kh, sh), _out_size(wp, kw, sw)
    y = torch.zeros((n, f, ho, wo), dtype=x.dtype, device=x.device)
    for i in range(ho):
        for j in range(wo):
            window = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]  # (N, C, kh, kw)
            y[:, :, i, j] = torch.einsum("nckl,fckl->nf", window, w)
    if b is not None:
        y += b.view(1, -1, 1, 1)
    return y


def conv2d_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, stride=(1, 1),
                    pads: Pads = (0, 0, 0, 0)):
    """Gradients of the cross-correlation, from the formulas of docs/gradients.md.

    dW[f, c, k, l] = sum_{n, i, j} delta[n, f, i, j] xp[n, c, i*sh + k, j*sw + l]
    db[f]          = sum_{n, i, j} delta[n, f, i, j]
    dxp            = full convolution of the zero-dilated delta with the flipped kernel: dilate delta by
                     inserting sh-1 / sw-1 zeros between its entries, pad it by kh-1 / kw-1 on every side,
                     and cross-correlate it with w rotated by 180 degrees (channels f and c swapped).

    Args:
        x: (N, C, H, W). w: (F, C, kh, kw). dy: (N, F, Ho, Wo). stride: (sh, sw). pads: (top, bottom, left, right).

    Returns:
        (dx (N, C, H, W), dw (F, C, kh, kw), db (F,)).
    """
    xp = _pad(x, pads)
    n, c, hp, wp = xp.shape
    f, _, kh, kw = w.shape
    sh, sw = stride
    _, _, ho, wo = dy.shape
    dw = torch.zeros_like(w)
    for k in range(kh):
        for l in range(kw):
            patch = xp[:, :, k:k + sh * (ho - 1) + 1:sh, l:l + sw * (wo - 1) + 1:sw]  # (N, C, Ho, Wo)
            dw[:, :, k, l] = torch.einsum("nfij,ncij->fc", dy, patch)
    db = dy.sum(dim=(0, 2, 3))
    # Full convolution: a cross-correlation of the dilated, (k-1)-padded delta with the rotated kernel.
    dil = torch.zeros((n, f, sh * (ho - 1) + 1, sw * (wo - 1) + 1), dtype=dy.dtype, device=dy.device)
    dil[:, :, ::sh, ::sw] = dy
    w_rot = w.flip(2, 3).transpose(0, 1)  # (C, F, kh, kw)
    full = conv2d_forward(dil, w_rot, None, (1, 1), (kh - 1, kh - 1, kw - 1, kw - 1))
    # Rows/columns of xp that no window reaches (when (size - k) % stride != 0) get no gradient.
    dxp = torch.zeros((n, c, hp, wp), dtype=dy.dtype, device=dy.device)
    dxp[:, :, :full.shape[2], :full.shape[3]] = full
    pt, pb, pl, pr = pads
    dx = dxp[:, :, pt:hp - pb, pl:wp - pr]
    return dx, dw, db


# -- pooling -------------------------------------------------------------------------------------
def maxpool2d_forward(x: torch.Tensor, pool=(2, 2), stride=None, pads: Pads = (0, 0, 0, 0)) -> torch.Tensor:
    """y[n, c, i, j] = max_{k, l} xp[n, c, i*sh + k, j*sw + l], xp padded with -inf.

    Args:
        x: (N, C, H, W). pool: (ph, pw). stride: (sh, sw), default pool. pads: (top, bottom, left, right).

    Returns:
        y: (N, C, Ho, Wo).
    """
    stride = pool if stride is None else stride
    xp = _pad(x, pads, float("-inf"))
    n, c, hp, wp = xp.shape
    (ph, pw), (sh, sw) = pool, stride
    ho, wo = _out_size(hp, ph, sh), _out_size(wp, pw, sw)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
    for i in range(ho):
        for j in range(wo):
            y[:, :, i, j] = xp[:, :, i * sh:i * sh + ph, j * sw:j * sw + pw].amax(dim=(2, 3))
    return y


def maxpool2d_backward(x: torch.Tensor, dy: torch.Tensor, pool=(2, 2), stride=None,
                       pads: Pads = (0, 0, 0, 0)) -> torch.Tensor:
    """dx[n, c, p, q] = sum_{i, j} delta[n, c, i, j] [(p, q) is the first arg-max of window (i, j)].

    "First" is in row-major order within the window, as torch breaks ties.

    Args:
        x: (N, C, H, W). dy: (N, C, Ho, Wo). pool, stride, pads: as in ``maxpool2d_forward``.

    Returns:
        dx: (N, C, H, W).
    """
    stride = pool if stride is None else stride
    xp = _pad(x, pads, float("-inf"))
    n, c, hp, wp = xp.shape
    (ph, pw), (sh, sw) = pool, stride
    _, _, ho, wo = dy.shape
    dxp = torch.zeros_like(xp)
    for i in range(ho):
        for j in range(wo):
            window = xp[:, :, i * sh:i * sh + ph, j * sw:j * sw + pw].reshape(n, c, ph * pw)
            first = window.argmax(dim=2)  # torch returns the first maximal index
            onehot = torch.nn.functional.one_hot(first, ph * pw).to(dy.dtype).view(n, c, ph, pw)
            dxp[:, :, i * sh:i * sh + ph, j * sw:j * sw + pw] += onehot * dy[:, :, i, j, None, None]
    pt, pb, pl, pr = pads
    return dxp[:, :, pt:hp - pb, pl:wp - pr]


def avgpool2d_forward(x: torch.Tensor, pool=(2, 2), stride=None) -> torch.Tensor:
    """y[n, c, i, j] = 1/(ph*pw) sum_{k, l} x[n, c, i*sh + k, j*sw + l].

    Args:
        x: (N, C, H, W). pool: (ph, pw). stride: (sh, sw), default pool.

    Returns:
        y: (N, C, Ho, Wo).
    """
    stride = pool if stride is None else stride
    n, c, h, w = x.shape
    (ph, pw), (sh, sw) = pool, stride
    ho, wo = _out_size(h, ph, sh), _out_size(w, pw, sw)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
    for i in range(ho):
        for j in range(wo):
            y[:, :, i, j] = x[:, :, i * sh:i * sh + ph, j * sw:j * sw + pw].sum(dim=(2, 3)) / (ph * pw)
    return y


def avgpool2d_backward(x: torch.Tensor, dy: torch.Tensor, pool=(2, 2), stride=None) -> torch.Tensor:
    """dx[n, c, p, q] = 1/(ph*pw) sum over windows (i, j) containing (p, q) of delta[n, c, i, j].

    Returns:
        dx: (N, C, H, W).
    """
    stride = pool if stride is None else stride
    (ph, pw), (sh, sw) = pool, stride
    _, _, ho, wo = dy.shape
    dx = torch.zeros_like(x)
    for i in range(ho):
        for j in range(wo):
            dx[:, :, i * sh:i * sh + ph, j * sw:j * sw + pw] += dy[:, :, i, j, None, None] / (ph * pw)
    return dx


# -- dense ---------------------------------------------------------------------------------------
def dense_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """y[n, o] = sum_i x[n, i] w[o, i] + b[o].  x (N, in), w (out, in), b (out,) -> y (N, out)."""
    y = torch.einsum("ni,oi->no", x, w)
    return y if b is None else y + b


def dense_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    """dW[o, i] = sum_n delta[n, o] x[n, i];  db[o] = sum_n delta[n, o];  dx[n, i] = sum_o delta[n, o] w[o, i].

    Returns:
        (dx (N, in), dw (out, in), db (out,)).
    """
    return torch.einsum("no,oi->ni", dy, w), torch.einsum("no,ni->oi", dy, x), dy.sum(0)


# -- batch normalization -------------------------------------------------------------------------
def batchnorm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                      mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> torch.Tensor:
    """y = weight * (x - mu) / sqrt(var + eps) + bias per channel (axis 1).

    With ``mean``/``var`` None the batch statistics are used (biased variance over every axis but 1);
    otherwise the given (running) statistics.

    Args:
        x: (N, C, ...). weight, bias, mean, var: (C,).

    Returns:
        y: the shape of x.
    """
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    if mean is None:
        mean = x.mean(dim=dims)
        var = ((x - mean.view(shape)) ** 2).mean(dim=dims)
    xhat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    return weight.view(shape) * xhat + bias.view(shape)


def batchnorm_backward(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, eps: float = 1e-5,
                       mean: torch.Tensor | None = None, var: torch.Tensor | None = None):
    """Gradients of batch normalization by the long chain rule through mu and var (Ioffe & Szegedy 2015, §3).

    With M values per channel, xmu = x - mu, s = (var + eps)^(-1/2):

        dxhat = delta * weight
        dvar  = sum dxhat * xmu * (-1/2) s^3
        dmu   = -sum dxhat * s + dvar * (-2/M) sum xmu
        dx    = dxhat * s + dvar * 2 xmu / M + dmu / M

    When ``mean``/``var`` are given (evaluation with running statistics) they are constants and
    dx = dxhat * s.

    Args:
        x: (N, C, ...). weight: (C,). dy: like x. mean, var: (C,) running statistics, or None for batch ones.

    Returns:
        (dx like x, dweight (C,), dbias (C,)).
    """
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    m = x.numel() // x.shape[1]
    batch_stats = mean is None
    if batch_stats:
        mean = x.mean(dim=dims)
        var = ((x - mean.view(shape)) ** 2).mean(dim=dims)
    s = ((var + eps) ** -0.5).view(shape)
    xmu = x - mean.view(shape)
    dxhat = dy * weight.view(shape)
    dweight = (dy * xmu * s).sum(dim=dims)
    dbias = dy.sum(dim=dims)
    if not batch_stats:
        return dxhat * s, dweight, dbias
    dvar = (dxhat * xmu).sum(dim=dims) * (-0.5) * s.view(-1) ** 3
    dmu = -(dxhat * s).sum(dim=dims) + dvar * (-2.0 / m) * xmu.sum(dim=dims)
    dx = dxhat * s + dvar.view(shape) * 2.0 * xmu / m + dmu.view(shape) / m
    return dx, dweight, dbias
