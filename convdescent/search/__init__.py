"""Choosing the learning rate and the optimizer: the range test, grid/random/TPE search, optimizer comparison.

- :func:`lr_find`: the learning-rate range test (Smith 2015) with three suggestion rules and a reasoned
  recommendation, restoring every piece of state it touches.
- :func:`run_search` with :class:`SearchSettings` and :class:`SearchSpace`: grid, random (log-uniform) and
  TPE search on Optuna, with pruning and in-memory, SQLite, journal-file or PostgreSQL storages shared by
  worker processes; each grid point runs exactly once.
- :func:`run_compare` with :class:`CompareSettings`: optimizers compared at their tuned learning rates over
  several seeds (the DeepOBS protocol).

See docs/search.md.
"""

from .compare import CompareError, CompareSettings, parse_optimizer, run_compare
from .lr_find import LRFindResult, Suggestion, analyze, lr_find, smooth_losses, suggest, sweep_lrs
from .space import Dimension, SearchSpace, SearchSpaceError, parse_dimension
from .study import (SearchError, SearchSettings, TrialOutcome, open_storage, prepare_study, run_search, run_worker,
                    trial_rows)
from .trials import PruningCallback, TrialRunner, subset_dataset

__all__ = [
    "CompareError", "CompareSettings", "parse_optimizer", "run_compare",
    "LRFindResult", "Suggestion", "analyze", "lr_find", "smooth_losses", "suggest", "sweep_lrs",
    "Dimension", "SearchSpace", "SearchSpaceError", "parse_dimension",
    "SearchError", "SearchSettings", "TrialOutcome", "open_storage", "prepare_study", "run_search", "run_worker",
    "trial_rows",
    "PruningCallback", "TrialRunner", "subset_dataset",
]
