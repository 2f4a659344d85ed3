"""convdescent: train convolutional networks by gradient descent with explicit, verified gradients."""

from .layers import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, Layer,
                     LeakyReLU, MaxPool2D, ReLU, Residual, Sigmoid, Softmax, Tanh, TorchModule)
from .losses import MSE, SoftmaxCrossEntropy, make_loss
from .model import Sequential
from .models import deepobs_2c2d, deepobs_3c3d, make_model, seed_cnn, seed_cnn_bn
from .serialization import load_model, save_model
from .diagnostics.gradcheck import check_layer, gradcheck

__version__ = "0.1.0"
