"""convdescent: train convolutional networks by gradient descent with explicit, verified gradients."""

__version__ = "0.1.0"
