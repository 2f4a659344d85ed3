"""Layers with explicit forward and backward passes (see ``base.Layer`` for the contract)."""

from .activations import GELU, LeakyReLU, ReLU, SiLU, Sigmoid, Softmax, Tanh
from .attention import MultiHeadSelfAttention
from .base import Layer
from .conv import Conv2D
from .dense import Dense
from .dropout import Dropout
from .norm import BatchNorm1D, BatchNorm2D, LayerNorm
from .pool import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from .registry import LAYERS, layer_config, layer_from_config, register_layer
from .reshape import Flatten
from .residual import Residual
from .tokens import ClassToken, PatchEmbed, PositionEmbedding, TokenPool
from .torch_module import TorchModule

for _cls in (Conv2D, Dense, MaxPool2D, AvgPool2D, GlobalAvgPool2D, Flatten, ReLU, LeakyReLU, Tanh, Sigmoid,
             Softmax, Dropout, BatchNorm2D, BatchNorm1D, Residual, TorchModule, GELU, SiLU, LayerNorm,
             MultiHeadSelfAttention, PatchEmbed, PositionEmbedding, ClassToken, TokenPool):
    register_layer(_cls)


__all__ = ["Layer", "Conv2D", "Dense", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "Flatten", "ReLU",
           "LeakyReLU", "Tanh", "Sigmoid", "Softmax", "Dropout", "BatchNorm2D", "BatchNorm1D", "Residual",
           "TorchModule", "GELU", "SiLU", "LayerNorm", "MultiHeadSelfAttention", "PatchEmbed", "PositionEmbedding",
           "ClassToken", "TokenPool", "LAYERS", "register_layer", "layer_config", "layer_from_config"]
