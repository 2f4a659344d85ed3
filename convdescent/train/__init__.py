"""Training: the loop (``fit``, ``Trainer``), callbacks, checkpoints, run directories and configuration.

``fit(model, loss, optimizer, data, epochs=...)`` is the loop for notebooks and scripts;
``train_from_config(config)`` is what ``convdescent train`` runs (a run directory with config.toml,
metrics.jsonl, checkpoints, summary.json and report.html); ``load_run(run_dir)`` reads such a run back.
"""

from .callbacks import (Callback, Checkpointer, EarlyStopping, EpochLogger, LambdaCallback, MetricsWriter,
                        ProgressBar, TensorBoardLogger, format_epoch_line)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import OPTIONS, ConfigError, default_config, dump_toml, load_toml, resolve_config
from .history import History
from .precision import Precision
from .run import Run, RunResult, load_run, train_from_config
from .step import accumulate_gradients, compute_gradients, evaluate, predict_logits, train_step
from .trainer import NonFiniteError, Trainer, TrainingInterrupted, fit

__all__ = [
    "Callback", "CheckpointError", "Checkpointer", "ConfigError", "EarlyStopping", "EpochLogger", "History",
    "LambdaCallback", "MetricsWriter", "NonFiniteError", "OPTIONS", "Precision", "ProgressBar", "Run", "RunResult",
    "TensorBoardLogger", "Trainer", "TrainingInterrupted", "accumulate_gradients", "compute_gradients",
    "default_config", "dump_toml", "evaluate", "fit", "format_epoch_line", "load_checkpoint", "load_toml",
    "load_run", "predict_logits", "resolve_config", "save_checkpoint", "train_from_config", "train_step",
]
