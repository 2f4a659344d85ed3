"""Layers with explicit forward and backward passes (see ``base.Layer`` for the contract)."""

from .activations import GELU, LeakyReLU, ReLU, SiLU, Sigmoid, Softmax, Tanh
from .attention import MultiHeadSelfAttention
from .base import Layer
from .conv import Conv2D
from .dense import Dense
from .dropout import Dropout
from .norm import BatchNorm1D, BatchNorm2D, LayerNorm
from .pool import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from .reshape import Flatten
from .residual import Residual
from .tokens import ClassToken, PatchEmbed, PositionEmbedding, TokenPool
from .torch_module import TorchModule

LAYERS: dict[str, type[Layer]] = {
    cls.__name__: cls
    for cls in (Conv2D, Dense, MaxPool2D, AvgPool2D, GlobalAvgPool2D, Flatten, ReLU, LeakyReLU, Tanh,
                Sigmoid, Softmax, Dropout, BatchNorm2D, BatchNorm1D, Residual, TorchModule, GELU, SiLU, LayerNorm, MultiHeadSelfAttention,
                PatchEmbed, PositionEmbedding, ClassToken, TokenPool)
}


def register_layer(cls: type[Layer]) -> type[Layer]:
    """Make a layer class known to ``Sequential.from_config`` (usable as a decorator)."""
    LAYERS[cls.__name__] = cls
    return cls


__all__ = ["Layer", "Conv2D", "Dense", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "Flatten", "ReLU",
           "LeakyReLU", "Tanh", "Sigmoid", "Softmax", "Dropout", "BatchNorm2D", "BatchNorm1D", "Residual",
           "TorchModule", "GELU", "SiLU", "LayerNorm", "MultiHeadSelfAttention", "PatchEmbed", "PositionEmbedding",
           "ClassToken", "TokenPool", "LAYERS", "register_layer"]
