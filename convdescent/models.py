"""Named networks: the tutorial's CNN, its batch-norm/dropout variant, and DeepOBS test networks."""

from __future__ import annotations

from typing import Callable

import torch

from . import init as initializers
from .layers import (GELU, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, LayerNorm,
                     MaxPool2D, MultiHeadSelfAttention, PatchEmbed, PositionEmbedding, ReLU, Residual, TokenPool)
from .model import Sequential
from .model_file import load_model_file


def seed_cnn(input_shape=(1, 28, 28), num_classes: int = 10, seed: int | None = None,
             dtype=torch.float32, device="cpu") -> Sequential:
    """The tutorial's network: Conv2D(32, 3x3, ReLU) -> MaxPool 2x2 -> Flatten -> Dense(128, ReLU) -> Dense(K).

    The softmax of the tutorial's last layer is fused into the cross-entropy loss (logits out).
    Input (N, 1, 28, 28) for MNIST-style data or (N, 3, 32, 32) for CIFAR-style data.
    """
    return Sequential([Conv2D(32, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(128), ReLU(), Dense(num_classes)],
                      input_shape=input_shape, seed=seed, dtype=dtype, device=device, name="seed_cnn")


MODELS: dict[str, Callable[..., Sequential]] = {"seed_cnn": seed_cnn}


def register_model(name: str):
    """Decorator adding a model builder ``f(input_shape, num_classes, seed, dtype, device)`` by name."""
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


@register_model("seed_cnn_bn")
def seed_cnn_bn(input_shape=(1, 28, 28), num_classes: int = 10, seed: int | None = None,
                dtype=torch.float32, device="cpu") -> Sequential:
    """The tutorial's network with its remedies for unstable gradients: batch normalization and dropout.

    Conv2D(32, 3x3, no bias) -> BatchNorm2D -> ReLU -> MaxPool 2x2 -> Flatten -> Dense(128, no bias)
    -> BatchNorm1D -> ReLU -> Dropout(0.5) -> Dense(K).

    Choices: the layers before a batch norm have no bias, since the norm's shift replaces it (Ioffe &
    Szegedy 2015). Dropout sits only after the last normalized layer, right before the classifier: dropout
    placed before a batch norm shifts the variance its running statistics see between training and
    evaluation (Li et al. 2019, "Understanding the Disharmony between Dropout and Batch Normalization by
    Variance Shift"), so the Dropout(0.25) after pooling of the classic Keras example is left out.
    """
    return Sequential([Conv2D(32, 3, use_bias=False), BatchNorm2D(), ReLU(), MaxPool2D(2), Flatten(),
                       Dense(128, use_bias=False), BatchNorm1D(), ReLU(), Dropout(0.5), Dense(num_classes)],
                      input_shape=input_shape, seed=seed, dtype=dtype, device=device, name="seed_cnn_bn")


def _deepobs_truncated_normal(shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Normal with std 0.05 truncated at two standard deviations (TensorFlow's truncated_normal), as DeepOBS."""
    t = torch.empty(shape, dtype=dtype)
    torch.nn.init.trunc_normal_(t, mean=0.0, std=0.05, a=-0.1, b=0.1, generator=generator)
    return t.to(device)


def _deepobs_bias(shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The constant 0.05 DeepOBS gives the biases of its 2c2d network."""
    return torch.full(shape, 0.05, dtype=dtype, device=device)


# Registered by name so that get_config()/from_config() can rebuild the DeepOBS networks.
initializers.INITIALIZERS.setdefault("deepobs_truncated_normal", _deepobs_truncated_normal)
initializers.INITIALIZERS.setdefault("deepobs_bias", _deepobs_bias)


@register_model("2c2d")
def deepobs_2c2d(input_shape=(1, 28, 28), num_classes: int = 10, seed: int | None = None,
                 dtype=torch.float32, device="cpu") -> Sequential:
    """DeepOBS' 2c2d network for (Fashion-)MNIST (Schneider et al. 2019, "DeepOBS: A Deep Learning Optimizer
    Benchmark Suite").

    Conv2D(32, 5x5, same) -> ReLU -> MaxPool 2x2 stride 2 same -> Conv2D(64, 5x5, same) -> ReLU
    -> MaxPool 2x2 stride 2 same -> Flatten -> Dense(1024) -> ReLU -> Dense(K); weights from a normal with
    std 0.05 truncated at two std, biases 0.05, as in DeepOBS. For 28x28 inputs: 3,274,634 parameters.
    """
    w, b = "deepobs_truncated_normal", "deepobs_bias"
    return Sequential([
        Conv2D(32, 5, padding="same", kernel_init=w, bias_init=b), ReLU(), MaxPool2D(2, 2, padding="same"),
        Conv2D(64, 5, padding="same", kernel_init=w, bias_init=b), ReLU(), MaxPool2D(2, 2, padding="same"),
        Flatten(), Dense(1024, kernel_init=w, bias_init=b), ReLU(), Dense(num_classes, kernel_init=w, bias_init=b),
    ], input_shape=input_shape, seed=seed, dtype=dtype, device=device, name="2c2d")


@register_model("3c3d")
def deepobs_3c3d(input_shape=(3, 32, 32), num_classes: int = 10, seed: int | None = None,
                 dtype=torch.float32, device="cpu") -> Sequential:
    """DeepOBS' 3c3d network for CIFAR-10/100 (Schneider et al. 2019).

    Conv2D(64, 5x5, valid) -> ReLU -> MaxPool 3x3 stride 2 same -> Conv2D(96, 3x3, valid) -> ReLU
    -> MaxPool 3x3 stride 2 same -> Conv2D(128, 3x3, same) -> ReLU -> MaxPool 3x3 stride 2 same -> Flatten
    -> Dense(512) -> ReLU -> Dense(256) -> ReLU -> Dense(K). Conv weights Glorot normal, dense weights Glorot
    uniform, biases 0, as in DeepOBS. For 32x32 inputs the flattened features are 3x3x128 = 1152 and the
    network has 895,210 parameters. DeepOBS trains it with an L2 penalty of 0.002 on the weights; that
    belongs to the optimizer settings, not to the network.
    """
    conv = {"kernel_init": "glorot_normal", "bias_init": "zeros"}
    return Sequential([
        Conv2D(64, 5, padding="valid", **conv), ReLU(), MaxPool2D(3, 2, padding="same"),
        Conv2D(96, 3, padding="valid", **conv), ReLU(), MaxPool2D(3, 2, padding="same"),
        Conv2D(128, 3, padding="same", **conv), ReLU(), MaxPool2D(3, 2, padding="same"),
        Flatten(), Dense(512), ReLU(), Dense(256), ReLU(), Dense(num_classes),
    ], input_shape=input_shape, seed=seed, dtype=dtype, device=device, name="3c3d")


def _basic_block(filters: int, stride: int) -> list:
    """A ResNet basic block (He et al. 2016): two 3x3 convs with batch norm, the skip added before the ReLU.

    The skip gets a 1x1 projection (stride ``stride``) only where the block changes the shape.
    """
    conv = {"padding": 1, "use_bias": False, "kernel_init": "he_normal"}
    body = [Conv2D(filters, 3, stride=stride, **conv), BatchNorm2D(), ReLU(), Conv2D(filters, 3, **conv),
            BatchNorm2D()]
    return [Residual(body, projection="auto"), ReLU()]


@register_model("resnet8")
def resnet8(input_shape=(1, 28, 28), num_classes: int = 10, seed: int | None = None,
            dtype=torch.float32, device="cpu") -> Sequential:
    """A small ResNet: a 3x3 stem conv, three stages of one basic block each, global average pooling.

    Stem Conv2D(16, 3x3) -> BatchNorm2D -> ReLU, then basic blocks of 16, 32 and 64 filters (the second and
    third halve the resolution with stride 2, 28x28 -> 14x14 -> 7x7, their skips projected by 1x1 convs),
    GlobalAvgPool2D -> Dense(K). Eight weight layers on the main path, as the name says (He et al. 2016's
    CIFAR family, "Deep Residual Learning for Image Recognition", with n = 1). Convs have no bias (batch norm
    shifts) and He-normal weights; padding 1 keeps the torch export a plain Conv2d.
    """
    return Sequential([
        Conv2D(16, 3, padding=1, use_bias=False, kernel_init="he_normal"), BatchNorm2D(), ReLU(),
        *_basic_block(16, 1), *_basic_block(32, 2), *_basic_block(64, 2),
        GlobalAvgPool2D(), Dense(num_classes),
    ], input_shape=input_shape, seed=seed, dtype=dtype, device=device, name="resnet8")


def _separable(in_channels: int, filters: int, stride: int) -> list:
    """A depthwise-separable block (Howard et al. 2017): a 3x3 depthwise conv (one filter per input channel,
    ``groups`` equal to the channels) then a 1x1 pointwise conv mixing channels, each with batch norm and ReLU."""
    return [Conv2D(in_channels, 3, stride=stride, padding=1, groups=in_channels, use_bias=False,
                   kernel_init="he_normal"), BatchNorm2D(), ReLU(),
            Conv2D(filters, 1, use_bias=False, kernel_init="he_normal"), BatchNorm2D(), ReLU()]


@register_model("mobilenet_tiny")
def mobilenet_tiny(input_shape=(1, 28, 28), num_classes: int = 10, seed: int | None = None,
                   dtype=torch.float32, device="cpu") -> Sequential:
    """A small MobileNet: a 3x3 stem conv, four depthwise-separable blocks, global average pooling.

    Stem Conv2D(16, 3x3) -> BatchNorm2D -> ReLU, then separable blocks of 32 (stride 2), 64, 128 (stride 2)
    and 128 filters (28x28 -> 14x14 -> 7x7), GlobalAvgPool2D -> Dense(K). A separable block costs
    C*9 + C*F weights where a full 3x3 conv costs C*F*9 (Howard et al. 2017, "MobileNets: Efficient
    Convolutional Neural Networks for Mobile Vision Applications").
    """
    layers = [Conv2D(16, 3, padding=1, use_bias=False, kernel_init="he_normal"), BatchNorm2D(), ReLU()]
    width = 16
    for filters, stride in ((32, 2), (64, 1), (128, 2), (128, 1)):
        layers += _separable(width, filters, stride)
        width = filters
    layers += [GlobalAvgPool2D(), Dense(num_classes)]
    return Sequential(layers, input_shape=input_shape, seed=seed, dtype=dtype, device=device,
                      name="mobilenet_tiny")


def _encoder_block(width: int, heads: int, hidden: int) -> list:
    """A pre-norm Transformer encoder block: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)) with a GELU
    MLP (Vaswani et al. 2017; the norm placed before each branch, as ViT does)."""
    return [Residual([LayerNorm(), MultiHeadSelfAttention(heads)]),
            Residual([LayerNorm(), Dense(hidden), GELU(), Dense(width)])]


@register_model("vit_tiny")
def vit_tiny(input_shape=(1, 28, 28), num_classes: int = 10, seed: int | None = None,
             dtype=torch.float32, device="cpu") -> Sequential:
    """A small Vision Transformer: 4x4 patches, width 64, depth 4, 4 heads, pre-LayerNorm, GELU MLP, mean pooling.

    PatchEmbed(64, 4x4) turns a 28x28 image into 49 tokens of width 64, PositionEmbedding adds a learned vector
    per position, four pre-norm encoder blocks (4 heads of 16 dimensions, MLP 64 -> 128 -> 64) follow, then a
    final LayerNorm, the mean over the tokens and Dense(K) (Dosovitskiy et al. 2021, "An Image is Worth 16x16
    Words"; mean pooling in place of the class token, which small images train as well with). The MLP is twice
    the width rather than ViT's four times, to keep a CPU epoch short.
    """
    layers = [PatchEmbed(64, patch_size=4), PositionEmbedding()]
    for _ in range(4):
        layers += _encoder_block(64, 4, 128)
    layers += [LayerNorm(), TokenPool("mean"), Dense(num_classes)]
    return Sequential(layers, input_shape=input_shape, seed=seed, dtype=dtype, device=device, name="vit_tiny")


def make_model(name: str, input_shape, num_classes: int = 10, seed: int | None = None,
               dtype=torch.float32, device="cpu") -> Sequential:
    """Build a named model, or the model file ``"file:PATH"`` (see ``model_file``), for inputs of
    ``input_shape`` (C, H, W) and ``num_classes`` outputs."""
    if isinstance(name, str) and name.startswith("file:"):
        return load_model_file(name[len("file:"):], input_shape, num_classes, seed=seed, dtype=dtype, device=device)
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return builder(input_shape=tuple(input_shape), num_classes=num_classes, seed=seed, dtype=dtype, device=device)


def default_run_name(model: str) -> str:
    """The run-directory name for a model setting: the model's name, or a model file's stem."""
    if model.startswith("file:"):
        stem = model[len("file:"):].replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        return stem.removesuffix(".toml") or "model_file"
    return model
