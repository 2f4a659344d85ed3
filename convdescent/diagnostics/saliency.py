"""What the network looks at: gradient saliency, SmoothGrad and Grad-CAM, all by the engine's explicit backward.

- Gradient saliency (Simonyan, Vedaldi and Zisserman 2014, "Deep Inside Convolutional Networks"):
  the map max_c |d score / d x[c, i, j]|, where score is the logit of the explained class.
- SmoothGrad (Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise"): the mean of that map
  over copies of the image with Gaussian noise of standard deviation ``noise * (max(x) - min(x))``.
- Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
  Localization"): with A the feature maps (K, h, w) of the last convolutional block and
  alpha_k = mean_{i,j} d score / d A[k, i, j], the map ReLU(sum_k alpha_k A[k]) upsampled to the input.

No autograd is involved: the score gradient is the model's backward started from a one-hot dL/dlogits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..layers.conv import Conv2D
from ..model import Sequential
from .border import _is_pointwise


def _targets(logits: torch.Tensor, target) -> torch.Tensor:
    n, k = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, dtype=torch.int64, device=logits.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.shape[0] != n:
        raise ValueError(f"target must be one class or one per image ({n}), got {t.numel()} values")
    if int(t.min()) < 0 or int(t.max()) >= k:
        bad = sorted({v for v in t.tolist() if not 0 <= v < k})
        raise ValueError(f"target classes must be in [0, {k - 1}], got {bad}")
    return t


def _clear(model: Sequential) -> None:
    model.clear_cache()


@torch.no_grad()
def score_gradient(model: Sequential, x: torch.Tensor, target=None) -> tuple[torch.Tensor, torch.Tensor]:
    """d logit[target] / d x for each image, by the explicit backward in evaluation mode.

    Args:
        model: a built Sequential whose output is logits (N, K).
        x: normalized images (N, C, H, W).
        target: class to explain: None (each image's predicted class), an int, or (N,) ints.

    Returns:
        (gradient (N, C, H, W), targets (N,) int64).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be images (N, C, H, W), got shape {tuple(x.shape)}")
    first = model.layers[0]
    old = first.needs_input_grad
    model.set_input_grad(True)
    try:
        logits = model.forward(x, train=False)
        t = _targets(logits, target)
        onehot = torch.zeros_like(logits)
        onehot[torch.arange(x.shape[0]), t] = 1.0
        dx = model.backward(onehot)
    finally:
        first.needs_input_grad = old
        _clear(model)
    return dx, t


def saliency(model: Sequential, x: torch.Tensor, target=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient saliency max_c |d score / d x| (Simonyan et al. 2014).

    Args:
        model: a built Sequential.
        x: normalized images (N, C, H, W).
        target: class to explain (None: the predicted class).

    Returns:
        (maps (N, H, W), targets (N,)).
    """
    g, t = score_gradient(model, x, target)
    return g.abs().amax(dim=1), t


@torch.no_grad()
def smoothgrad(model: Sequential, x: torch.Tensor, target=None, samples: int = 25, noise: float = 0.15,
               seed: int = 0, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """SmoothGrad: the saliency map averaged over noisy copies of each image (Smilkov et al. 2017).

    Args:
        model: a built Sequential.
        x: normalized images (N, C, H, W).
        target: class to explain; None explains the class predicted for the clean image (kept fixed for
            every noisy copy, as in the paper).
        samples: noisy copies per image.
        noise: noise standard deviation as a fraction of each image's value range (paper: 10-20%).
        seed: seed of the noise.
        batch_size: copies per forward/backward pass.

    Returns:
        (maps (N, H, W), targets (N,)).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be a non-negative fraction of the value range, got {noise!r}")
    if target is None:
        logits = model.predict(x)
        target = logits.argmax(dim=1)
    n = x.shape[0]
    t = torch.as_tensor(target, dtype=torch.int64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(n, 1, 1, 1)
    sigma = noise * span
    # every image repeated `samples` times, processed in chunks so memory stays bounded
    reps = x.repeat_interleave(samples, dim=0)
    sig = sigma.repeat_interleave(samples, dim=0)
    treps = t.repeat_interleave(samples)
    total = torch.zeros((n * samples, *x.shape[2:]), dtype=x.dtype, device=x.device)
    for i in range(0, reps.shape[0], batch_size):
        xb = reps[i:i + batch_size]
        xb = xb + torch.randn(xb.shape, generator=gen, dtype=xb.dtype, device=xb.device) * sig[i:i + batch_size]
        g, _ = score_gradient(model, xb, treps[i:i + batch_size])
        total[i:i + batch_size] = g.abs().amax(dim=1)
    return total.view(n, samples, *x.shape[2:]).mean(dim=1), t


def last_conv_block(model: Sequential) -> int:
    """Index in ``model.layers`` of the output of the last convolutional block.

    That is the last top-level Conv2D (or Residual block holding one), extended over the pointwise layers
    right after it (activation, batch norm), so Grad-CAM sees the rectified feature maps.

    Raises:
        ValueError: when the model has no convolution at the top level.
    """
    idx = None
    for i, layer in enumerate(model.layers):
        if isinstance(layer, Conv2D) or (type(layer).__name__ == "Residual" and
                                         any(isinstance(s, Conv2D) for s in layer.sublayers())):
            idx = i
    if idx is None:
        raise ValueError(f"Grad-CAM needs a convolutional layer; model '{model.name}' has none at its top level")
    while idx + 1 < len(model.layers) and _is_pointwise(model.layers[idx + 1]) \
            and type(model.layers[idx + 1]).__name__ != "Dropout":
        idx += 1
    return idx


@torch.no_grad()
def grad_cam(model: Sequential, x: torch.Tensor, target=None, layer: str | None = None):
    """Grad-CAM maps on the last convolutional block (Selvaraju et al. 2017).

    The score gradient with respect to the feature maps A comes from running the engine's backward,
    from a one-hot dL/dlogits, through the layers after A only.

    Args:
        model: a built Sequential.
        x: normalized images (N, C, H, W).
        target: class to explain (None: the predicted class).
        layer: name of the top-level layer whose output is A (default: ``last_conv_block``).

    Returns:
        (maps (N, H, W) in [0, 1], targets (N,), name of the layer used).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be images (N, C, H, W), got shape {tuple(x.shape)}")
    if layer is None:
        idx = last_conv_block(model)
    else:
        names = [l.name for l in model.layers]
        if layer not in names:
            raise ValueError(f"layer must name a top-level layer of the model, got {layer!r}; "
                             f"choose one of {names}")
        idx = names.index(layer)
        if model.layers[idx].output_shape is None or len(model.layers[idx].output_shape) != 3:
            raise ValueError(f"Grad-CAM needs a layer with (C, H, W) feature maps; {layer!r} outputs "
                             f"{model.layers[idx].output_shape}")
    after = model.layers[idx + 1:]
    try:
        h = x
        for i, l in enumerate(model.layers):
            l.training = False
            h = l.forward(h, False)
            if i == idx:
                feats = h
        logits = h
        t = _targets(logits, target)
        d = torch.zeros_like(logits)
        d[torch.arange(x.shape[0]), t] = 1.0
        saved = [l.needs_input_grad for l in after]
        for l in after:
            l.needs_input_grad = True
        try:
            for l in reversed(after):
                d = l.backward(d)
        finally:
            for l, s in zip(after, saved):
                l.needs_input_grad = s
    finally:
        _clear(model)
    weights = d.mean(dim=(2, 3))                                   # alpha_k, (N, K)
    cam = torch.relu((weights[:, :, None, None] * feats).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return cam / peak, t, model.layers[idx].name


# -- pictures ---------------------------------------------------------------------------------------------

def display_image(x: torch.Tensor, normalizer=None) -> torch.Tensor:
    """An image for display in [0, 1], (H, W) for one channel or (H, W, 3).

    Args:
        x: one normalized image (C, H, W).
        normalizer: the run's Normalizer, used to undo normalization when given.
    """
    img = x.detach().double().cpu()
    if normalizer is not None and hasattr(normalizer, "denormalize"):
        img = normalizer.denormalize(img[None].float())[0].double()  # back to [0, 1] pixel values
    else:
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    img = img.clamp(0, 1)
    return img[0] if img.shape[0] == 1 else img[:3].permute(1, 2, 0)


def _show(ax, img):
    if img.dim() == 2:
        ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def plot_overlay(img: torch.Tensor, heat: torch.Tensor, path: str | Path, title: str) -> Path:
    """Draw a heatmap (H, W) over a display image, next to the image alone; written as a PNG."""
    from .plotting import new_figure, save_figure

    fig, axes = new_figure(1, 2, size=(3.0, 3.0))
    _show(axes[0, 0], img)
    axes[0, 0].set_title("input", fontsize=9)
    _overlay(axes[0, 1], img, heat)
    axes[0, 1].set_title(title, fontsize=9)
    return save_figure(fig, path)


def _overlay(ax, img, heat):
    gray = img if img.dim() == 2 else img.mean(dim=2)
    ax.imshow(gray.numpy(), cmap="gray", vmin=0, vmax=1)
    h = heat.detach().double().cpu()
    h = h / h.max() if h.max() > 0 else h
    im = ax.imshow(h.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    # the maps are scaled to their own maximum: the bar says so, so colours read as relative importance
    bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03, ticks=[0, 0.5, 1])
    bar.ax.tick_params(labelsize=6)
    bar.set_label("relative to the map's max", fontsize=6)


def plot_explanations(img: torch.Tensor, maps: dict[str, torch.Tensor], path: str | Path, title: str) -> Path:
    """One row: the image, then each map overlaid on it; written as a PNG."""
    from .plotting import new_figure, save_figure

    fig, axes = new_figure(1, 1 + len(maps), size=(2.8, 3.0))
    _show(axes[0, 0], img)
    axes[0, 0].set_title("input", fontsize=9)
    for ax, (name, heat) in zip(axes[0, 1:], maps.items()):
        _overlay(ax, img, heat)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def explain(model: Sequential, x: torch.Tensor, target=None, samples: int = 25, noise: float = 0.15,
            seed: int = 0) -> dict:
    """All three explanations of one image.

    Args:
        model: a built Sequential.
        x: one normalized image (1, C, H, W).
        target: class to explain (None: the predicted class).

    Returns:
        dict with ``saliency``, ``smoothgrad``, ``gradcam`` maps (H, W), ``target`` (int), ``probs`` (K,),
        ``cam_layer`` (name).
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"explain takes one image of shape (1, C, H, W), got {tuple(x.shape)}")
    probs = torch.softmax(model.predict(x), dim=1)[0]
    t = int(probs.argmax()) if target is None else int(target)
    sal, _ = saliency(model, x, t)
    smooth, _ = smoothgrad(model, x, t, samples=samples, noise=noise, seed=seed)
    cam, _, cam_layer = grad_cam(model, x, t)
    return {"saliency": sal[0], "smoothgrad": smooth[0], "gradcam": cam[0], "target": t, "probs": probs,
            "cam_layer": cam_layer}


def load_image(path: str | Path, input_shape) -> torch.Tensor:
    """Read an image file as uint8 (1, C, H, W) for a model taking ``input_shape`` (C, H, W).

    Converted to grayscale for one channel and to RGB for three, and resized to (H, W) when needed.
    """
    from PIL import Image

    from ..data.errors import CorruptFile
    from ..data.images import open_image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {str(p)!r}; pass the path of a PNG or JPEG file")
    c, h, w = input_shape
    if c not in (1, 3):
        raise ValueError(f"only models with 1 or 3 input channels can read image files, this one takes {c}")
    try:
        im = open_image(p).convert("L" if c == 1 else "RGB")
    except CorruptFile as e:
        raise ValueError(f"{str(p)!r} is not an image file convdescent can read: {e.problem}; pass a PNG or "
                         f"JPEG") from None
    if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(h, w, c).permute(2, 0, 1)[None].contiguous()
