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
                   pads: Pads = (0, 0, 0, 0), groups: int = 1, dilation=(1, 1)) -> torch.Tensor:
    """y[n, f, i, j] = sum_{c in group(f), k, l} xp[n, c, i*sh + k*dh, j*sw + l*dw] * w[f, c', k, l] + b[f].

    Args:
        x: (N, C, H, W). w: (F, C/G, kh, kw). b: (F,) or None. stride: (sh, sw).
        pads: (top, bottom, left, right). groups: G. dilation: (dh, dw).

    Returns:
        y: (N, F, Ho, Wo).
    """
    xp = _pad(x, pads)
    n, c, hp, wp = xp.shape
    f, cg, kh, kw = w.shape
    sh, sw = stride
    dh, dw = dilation
    ho, wo = _out_size(hp, dh * (kh - 1) + 1, sh), _out_size(wp, dw * (kw - 1) + 1, sw)
    fg = f // groups
    y = torch.zeros((n, f, ho, wo), dtype=x.dtype, device=x.device)
    for i in range(ho):
        for j in range(wo):
            # the window's taps, dilation apart: (N, C, kh, kw)
            window = xp[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
            for g in range(groups):
                y[:, g * fg:(g + 1) * fg, i, j] = torch.einsum(
                    "nckl,fckl->nf", window[:, g * cg:(g + 1) * cg], w[g * fg:(g + 1) * fg])
    if b is not None:
        y += b.view(1, -1, 1, 1)
    return y


def conv2d_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, stride=(1, 1),
                    pads: Pads = (0, 0, 0, 0), groups: int = 1, dilation=(1, 1)):
    """Gradients of the cross-correlation, from the formulas of docs/gradients.md.

    dW[f, c', k, l] = sum_{n, i, j} delta[n, f, i, j] xp[n, c, i*sh + k*dh, j*sw + l*dw]   (c in group(f))
    db[f]           = sum_{n, i, j} delta[n, f, i, j]
    dxp             = full convolution of the zero-dilated delta with the flipped kernel: dilate delta by
                      inserting sh-1 / sw-1 zeros between its entries, pad it by (reach - 1) on every side,
                      and cross-correlate it, group by group, with w rotated by 180 degrees (channels f and
                      c swapped) after spreading its taps dh / dw apart with zeros between them.

    Args:
        x: (N, C, H, W). w: (F, C/G, kh, kw). dy: (N, F, Ho, Wo). stride: (sh, sw).
        pads: (top, bottom, left, right). groups: G. dilation: (dh, dw).

    Returns:
        (dx (N, C, H, W), dw (F, C/G, kh, kw), db (F,)).
    """
    xp = _pad(x, pads)
    n, c, hp, wp = xp.shape
    f, cg, kh, kw = w.shape
    sh, sw = stride
    dh, dw_ = dilation
    fg = f // groups
    _, _, ho, wo = dy.shape
    dw = torch.zeros_like(w)
    for k in range(kh):
        for l in range(kw):
            patch = xp[:, :, k * dh:k * dh + sh * (ho - 1) + 1:sh,
                       l * dw_:l * dw_ + sw * (wo - 1) + 1:sw]  # (N, C, Ho, Wo)
            for g in range(groups):
                dw[g * fg:(g + 1) * fg, :, k, l] = torch.einsum(
                    "nfij,ncij->fc", dy[:, g * fg:(g + 1) * fg], patch[:, g * cg:(g + 1) * cg])
    db = dy.sum(dim=(0, 2, 3))
    # Full convolution: a cross-correlation of the dilated, (reach-1)-padded delta with the rotated kernel.
    dil = torch.zeros((n, f, sh * (ho - 1) + 1, sw * (wo - 1) + 1), dtype=dy.dtype, device=dy.device)
    dil[:, :, ::sh, ::sw] = dy
    rh, rw = dh * (kh - 1) + 1, dw_ * (kw - 1) + 1
    spread = torch.zeros((f, cg, rh, rw), dtype=w.dtype, device=w.device)
    spread[:, :, ::dh, ::dw_] = w
    parts = []
    for g in range(groups):
        w_rot = spread[g * fg:(g + 1) * fg].flip(2, 3).transpose(0, 1)  # (C/G, F/G, rh, rw)
        parts.append(conv2d_forward(dil[:, g * fg:(g + 1) * fg], w_rot, None, (1, 1),
                                    (rh - 1, rh - 1, rw - 1, rw - 1)))
    full = torch.cat(parts, dim=1)
    # Rows/columns of xp that no window reaches (when (size - k) % stride != 0) get no gradient.
    dxp = torch.zeros((n, c, hp, wp), dtype=dy.dtype, device=dy.device)
    dxp[:, :, :full.shape[2], :full.shape[3]] = full
    pt, pb, pl, pr = pads
    dx = dxp[:, :, pt:hp - pb, pl:wp - pr]
    return dx, dw, db


# -- pooling -------------------------------------------------------------------------------------
def _taps(i: int, s: int, k: int, d: int) -> slice:
    """The k positions of window i along one axis: i*s, i*s + d, ..., i*s + (k-1)*d."""
    return slice(i * s, i * s + d * (k - 1) + 1, d)


def maxpool2d_forward(x: torch.Tensor, pool=(2, 2), stride=None, pads: Pads = (0, 0, 0, 0),
                      dilation=(1, 1)) -> torch.Tensor:
    """y[n, c, i, j] = max_{k, l} xp[n, c, i*sh + k*dh, j*sw + l*dw], xp padded with -inf.

    Args:
        x: (N, C, H, W). pool: (ph, pw). stride: (sh, sw), default pool. pads: (top, bottom, left, right).
        dilation: (dh, dw).

    Returns:
        y: (N, C, Ho, Wo).
    """
    stride = pool if stride is None else stride
    xp = _pad(x, pads, float("-inf"))
    n, c, hp, wp = xp.shape
    (ph, pw), (sh, sw), (dh, dw) = pool, stride, dilation
    ho, wo = _out_size(hp, dh * (ph - 1) + 1, sh), _out_size(wp, dw * (pw - 1) + 1, sw)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
    for i in range(ho):
        for j in range(wo):
            y[:, :, i, j] = xp[:, :, _taps(i, sh, ph, dh), _taps(j, sw, pw, dw)].amax(dim=(2, 3))
    return y


def maxpool2d_backward(x: torch.Tensor, dy: torch.Tensor, pool=(2, 2), stride=None,
                       pads: Pads = (0, 0, 0, 0), dilation=(1, 1)) -> torch.Tensor:
    """dx[n, c, p, q] = sum_{i, j} delta[n, c, i, j] [(p, q) is the first arg-max of window (i, j)].

    "First" is in row-major order within the window, as torch breaks ties.

    Args:
        x: (N, C, H, W). dy: (N, C, Ho, Wo). pool, stride, pads, dilation: as in ``maxpool2d_forward``.

    Returns:
        dx: (N, C, H, W).
    """
    stride = pool if stride is None else stride
    xp = _pad(x, pads, float("-inf"))
    n, c, hp, wp = xp.shape
    (ph, pw), (sh, sw), (dh, dw) = pool, stride, dilation
    _, _, ho, wo = dy.shape
    dxp = torch.zeros_like(xp)
    for i in range(ho):
        for j in range(wo):
            rows, cols = _taps(i, sh, ph, dh), _taps(j, sw, pw, dw)
            window = xp[:, :, rows, cols].reshape(n, c, ph * pw)
            first = window.argmax(dim=2)  # torch returns the first maximal index
            onehot = torch.nn.functional.one_hot(first, ph * pw).to(dy.dtype).view(n, c, ph, pw)
            dxp[:, :, rows, cols] += onehot * dy[:, :, i, j, None, None]
    pt, pb, pl, pr = pads
    return dxp[:, :, pt:hp - pb, pl:wp - pr]


def _avg_divisor(h: int, w: int, i: int, j: int, pool, stride, padding, count_include_pad: bool) -> int:
    """How many positions window (i, j) averages: all ph*pw, or only those inside the unpadded input."""
    (ph, pw), (sh, sw), (pad_h, pad_w) = pool, stride, padding
    if count_include_pad:
        return ph * pw
    rows = [p for p in range(i * sh - pad_h, i * sh - pad_h + ph) if 0 <= p < h]
    cols = [q for q in range(j * sw - pad_w, j * sw - pad_w + pw) if 0 <= q < w]
    return len(rows) * len(cols)


def avgpool2d_forward(x: torch.Tensor, pool=(2, 2), stride=None, padding=(0, 0),
                      count_include_pad: bool = True) -> torch.Tensor:
    """y[n, c, i, j] = 1/m(i, j) sum_{k, l} xp[n, c, i*sh + k, j*sw + l], xp zero-padded by ``padding``.

    m(i, j) is ph*pw with ``count_include_pad``, else the count of window (i, j)'s unpadded positions.

    Args:
        x: (N, C, H, W). pool: (ph, pw). stride: (sh, sw), default pool. padding: (pad_h, pad_w) each side.

    Returns:
        y: (N, C, Ho, Wo).
    """
    stride = pool if stride is None else stride
    n, c, h, w = x.shape
    (ph, pw), (sh, sw) = pool, stride
    xp = _pad(x, (padding[0], padding[0], padding[1], padding[1]))
    ho, wo = _out_size(h + 2 * padding[0], ph, sh), _out_size(w + 2 * padding[1], pw, sw)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
    for i in range(ho):
        for j in range(wo):
            m = _avg_divisor(h, w, i, j, pool, stride, padding, count_include_pad)
            y[:, :, i, j] = xp[:, :, i * sh:i * sh + ph, j * sw:j * sw + pw].sum(dim=(2, 3)) / m
    return y


def avgpool2d_backward(x: torch.Tensor, dy: torch.Tensor, pool=(2, 2), stride=None, padding=(0, 0),
                       count_include_pad: bool = True) -> torch.Tensor:
    """dx[n, c, p, q] = sum over windows (i, j) containing (p, q) of delta[n, c, i, j] / m(i, j).

    Returns:
        dx: (N, C, H, W).
    """
    stride = pool if stride is None else stride
    (ph, pw), (sh, sw) = pool, stride
    n, c, h, w = x.shape
    _, _, ho, wo = dy.shape
    dxp = torch.zeros((n, c, h + 2 * padding[0], w + 2 * padding[1]), dtype=dy.dtype, device=dy.device)
    for i in range(ho):
        for j in range(wo):
            m = _avg_divisor(h, w, i, j, pool, stride, padding, count_include_pad)
            dxp[:, :, i * sh:i * sh + ph, j * sw:j * sw + pw] += dy[:, :, i, j, None, None] / m
    return dxp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w]


# -- dense ---------------------------------------------------------------------------------------
def dense_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """y[n, o] = sum_i x[n, i] w[o, i] + b[o].  x (N, in) or (N, T, in), w (out, in), b (out,) -> y (N, [T,] out)."""
    y = torch.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b


def dense_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    """dW[o, i] = sum_n delta[n, o] x[n, i];  db[o] = sum_n delta[n, o];  dx[n, i] = sum_o delta[n, o] w[o, i].

    For tokens (N, T, in) the sums over n run over every (n, t).

    Returns:
        (dx like x, dw (out, in), db (out,)).
    """
    return (torch.einsum("...o,oi->...i", dy, w), torch.einsum("...o,...i->oi", dy, x),
            dy.reshape(-1, dy.shape[-1]).sum(0))


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


# -- layer normalization -------------------------------------------------------------------------
def layernorm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, dims: int = 1,
                      eps: float = 1e-5) -> torch.Tensor:
    """y = weight * (x - mu) / sqrt(var + eps) + bias, mu and (biased) var over the last ``dims`` axes.

    Args:
        x: (N, ...). weight, bias: the shape of x's last ``dims`` axes, or None (no affine part).

    Returns:
        y: the shape of x.
    """
    axes = tuple(range(x.dim() - dims, x.dim()))
    m = 1
    for a in axes:
        m *= x.shape[a]
    mu = x.sum(dim=axes, keepdim=True) / m
    var = ((x - mu) ** 2).sum(dim=axes, keepdim=True) / m
    xhat = (x - mu) / torch.sqrt(var + eps)
    return xhat if weight is None else weight * xhat + bias


def layernorm_backward(x: torch.Tensor, weight: torch.Tensor | None, dy: torch.Tensor, dims: int = 1,
                       eps: float = 1e-5):
    """The long chain rule through mu and var, per normalized group of M values (as batch norm's, axes swapped):

        g     = delta * weight
        dvar  = sum g * xmu * (-1/2) s^3
        dmu   = -sum g * s + dvar * (-2/M) sum xmu
        dx    = g * s + dvar * 2 xmu / M + dmu / M

    Args:
        x: (N, ...). weight: the normalized shape or None. dy: like x.

    Returns:
        (dx like x, dweight, dbias) (the last two None without weight).
    """
    axes = tuple(range(x.dim() - dims, x.dim()))
    outer = tuple(range(x.dim() - dims))
    m = 1
    for a in axes:
        m *= x.shape[a]
    mu = x.sum(dim=axes, keepdim=True) / m
    xmu = x - mu
    var = (xmu ** 2).sum(dim=axes, keepdim=True) / m
    s = (var + eps) ** -0.5
    g = dy if weight is None else dy * weight
    dvar = (g * xmu).sum(dim=axes, keepdim=True) * (-0.5) * s ** 3
    dmu = -(g * s).sum(dim=axes, keepdim=True) + dvar * (-2.0 / m) * xmu.sum(dim=axes, keepdim=True)
    dx = g * s + dvar * 2.0 * xmu / m + dmu / m
    if weight is None:
        return dx, None, None
    return dx, (dy * xmu * s).sum(dim=outer), dy.sum(dim=outer)


# -- activations ---------------------------------------------------------------------------------
def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / 2 ** 0.5))


def gelu_forward(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x Phi(x); or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with ``approximate="tanh"``."""
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    return x * _normal_cdf(x)


def gelu_backward(x: torch.Tensor, dy: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """delta * d/dx of ``gelu_forward``: Phi(x) + x phi(x), or the tanh form's derivative by the chain rule."""
    if approximate == "tanh":
        c = (2 / torch.pi) ** 0.5
        u = c * (x + 0.044715 * x ** 3)
        sech2 = 1 / torch.cosh(u) ** 2
        return dy * (0.5 * (1 + torch.tanh(u)) + 0.5 * x * sech2 * c * (1 + 3 * 0.044715 * x ** 2))
    pdf = torch.exp(-x ** 2 / 2) / (2 * torch.pi) ** 0.5
    return dy * (_normal_cdf(x) + x * pdf)


def silu_forward(x: torch.Tensor) -> torch.Tensor:
    """x / (1 + exp(-x))."""
    return x / (1 + torch.exp(-x))


def silu_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """delta * d/dx [x / (1 + e^-x)] = delta * (1 + e^-x + x e^-x) / (1 + e^-x)^2 (the quotient rule)."""
    e = torch.exp(-x)
    return dy * (1 + e + x * e) / (1 + e) ** 2


# -- self-attention ------------------------------------------------------------------------------
def attention_forward(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
                      b_out: torch.Tensor | None, heads: int, causal: bool = False) -> torch.Tensor:
    """y = concat_h(softmax(q_h k_h^T / sqrt(e) + mask) v_h) W_out^T + b_out, one head and one row at a time.

    Args:
        x: (N, T, D). w_in: (3D, D), rows [W_q; W_k; W_v]. b_in: (3D,) or None. w_out: (D, D). b_out: (D,) or None.
        heads: H (e = D / H). causal: token i attends to tokens j <= i only.

    Returns:
        y: (N, T, D).
    """
    n, t, d = x.shape
    e = d // heads
    qkv = dense_forward(x, w_in, b_in)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    o = torch.zeros((n, t, d), dtype=x.dtype, device=x.device)
    for h in range(heads):
        cols = slice(h * e, (h + 1) * e)
        for i in range(t):
            keys = i + 1 if causal else t
            scores = torch.einsum("ne,nje->nj", q[:, i, cols], k[:, :keys, cols]) / e ** 0.5
            weights = torch.exp(scores - scores.amax(dim=1, keepdim=True))
            weights = weights / weights.sum(dim=1, keepdim=True)
            o[:, i, cols] = torch.einsum("nj,nje->ne", weights, v[:, :keys, cols])
    return dense_forward(o, w_out, b_out)


def attention_backward(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
                       dy: torch.Tensor, heads: int, causal: bool = False):
    """Gradients of ``attention_forward``, each softmax row through its full Jacobian diag(p) - p p^T.

    Returns:
        (dx (N, T, D), dw_in (3D, D), db_in (3D,), dw_out (D, D), db_out (D,)).
    """
    n, t, d = x.shape
    e = d // heads
    qkv = dense_forward(x, w_in, b_in)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    # the forward again, keeping each head's attention weights and the merged output
    o = torch.zeros((n, t, d), dtype=x.dtype, device=x.device)
    probs = {}
    for h in range(heads):
        cols = slice(h * e, (h + 1) * e)
        for i in range(t):
            keys = i + 1 if causal else t
            scores = torch.einsum("ne,nje->nj", q[:, i, cols], k[:, :keys, cols]) / e ** 0.5
            p = torch.exp(scores - scores.amax(dim=1, keepdim=True))
            p = p / p.sum(dim=1, keepdim=True)
            probs[h, i] = p
            o[:, i, cols] = torch.einsum("nj,nje->ne", p, v[:, :keys, cols])
    do, dw_out, db_out = dense_backward(o, w_out, dy)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for h in range(heads):
        cols = slice(h * e, (h + 1) * e)
        for i in range(t):
            keys = i + 1 if causal else t
            p = probs[h, i]                                                    # (N, keys)
            dp = torch.einsum("ne,nje->nj", do[:, i, cols], v[:, :keys, cols])
            dv[:, :keys, cols] += torch.einsum("nj,ne->nje", p, do[:, i, cols])
            jac = torch.diag_embed(p) - torch.einsum("nj,nl->njl", p, p)       # d p_l / d s_j
            ds = torch.einsum("njl,nl->nj", jac, dp) / e ** 0.5
            dq[:, i, cols] += torch.einsum("nj,nje->ne", ds, k[:, :keys, cols])
            dk[:, :keys, cols] += torch.einsum("nj,ne->nje", ds, q[:, i, cols])
    dqkv = torch.cat([dq, dk, dv], dim=-1)
    dx, dw_in, db_in = dense_backward(x, w_in, dqkv)
    return dx, dw_in, db_in, dw_out, db_out


# -- tokens --------------------------------------------------------------------------------------
def patch_embed_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """y[n, a*Gw + c, :] = sum_{ch, k, l} x[n, ch, a*ph + k, c*pw + l] w[:, ch, k, l] + b, patch by patch.

    Args:
        x: (N, C, H, W). w: (D, C, ph, pw). b: (D,) or None.

    Returns:
        y: (N, (H // ph) * (W // pw), D).
    """
    n, _, h, wd = x.shape
    dim, _, ph, pw = w.shape
    gh, gw = h // ph, wd // pw
    y = torch.zeros((n, gh * gw, dim), dtype=x.dtype, device=x.device)
    for a in range(gh):
        for c in range(gw):
            patch = x[:, :, a * ph:(a + 1) * ph, c * pw:(c + 1) * pw]
            y[:, a * gw + c] = torch.einsum("nckl,dckl->nd", patch, w)
    return y if b is None else y + b


def patch_embed_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    """dw = sum over patches of delta_t (x) patch_t; db = sum delta; dx[patch t] = sum_d delta[t, d] w[d].

    Returns:
        (dx (N, C, H, W), dw (D, C, ph, pw), db (D,)).
    """
    n, _, h, wd = x.shape
    dim, _, ph, pw = w.shape
    gh, gw = h // ph, wd // pw
    dx, dw = torch.zeros_like(x), torch.zeros_like(w)
    for a in range(gh):
        for c in range(gw):
            rows, cols = slice(a * ph, (a + 1) * ph), slice(c * pw, (c + 1) * pw)
            dw += torch.einsum("nd,nckl->dckl", dy[:, a * gw + c], x[:, :, rows, cols])
            dx[:, :, rows, cols] = torch.einsum("nd,dckl->nckl", dy[:, a * gw + c], w)
    return dx, dw, dy.sum(dim=(0, 1))
