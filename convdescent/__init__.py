"""convdescent: train convolutional networks by gradient descent with explicit, verified gradients."""

from .layers import (AvgPool2D, Conv2D, Dense, Flatten, GlobalAvgPool2D, Layer, LeakyReLU, MaxPool2D, ReLU,
                     Sigmoid, Softmax, Tanh)
from .losses import MSE, SoftmaxCrossEntropy, make_loss
from .model import Sequential
from .models import make_model, seed_cnn

__version__ = "0.1.0"
