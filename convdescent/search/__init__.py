"""Choosing the learning rate and the optimizer: the range test, grid/random/TPE search, optimizer comparison.

- :func:`lr_find`: the learning-rate range test (Smith 2015) with several suggestion rules, restoring every
  piece of state it touches.
"""

from .lr_find import LRFindResult, Suggestion, analyze, lr_find, smooth_losses, suggest, sweep_lrs

__all__ = ["LRFindResult", "Suggestion", "analyze", "lr_find", "smooth_losses", "suggest", "sweep_lrs"]
