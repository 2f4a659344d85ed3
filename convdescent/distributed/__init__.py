"""Data-parallel training on torch.distributed: many processes, one training.

    convdescent train --model seed_cnn --nproc 2                      # two local workers
    torchrun --nproc-per-node 4 -m convdescent train --config run.toml

Every rank runs the same plan on its part of each global batch (``BatchLoader(shard=(rank, size))``); the
gradients go into buckets that are all-reduced while the backward goes on (``reducer.py``); the optimizer
waits on them and makes the same update on every rank. Rank 0 alone writes the run directory. The pieces:

- ``world.py``: this process's rank from torchrun's environment, joining the process group, clear errors;
- ``reducer.py``: the gradient buckets and their timing (wait per step, the share that overlapped);
- ``parallel.py``: ``DataParallel``, every collective the trainer makes (steps, agreement, validation);
- ``launch.py``: ``--nproc N`` starts N workers through torch's elastic launcher and names a lost worker;
- ``syncbn.py``: BatchNorm over the global batch (``--sync-bn``); ``zero.py``: the sharded optimizer
  (``--shard-optimizer``, ZeRO stage 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .parallel import DataParallel, describe_stats
from .reducer import GradientReducer
from .world import (DistributedError, World, close_world, collective_timeout, free_port, init_world,
                    port_in_use, resolve_backend, world_from_env, worker_device)

__all__ = ["DataParallel", "DistributedError", "GradientReducer", "World", "close_world", "collective_timeout",
           "describe_parallel", "describe_stats", "free_port", "init_world", "make_parallel", "port_in_use",
           "resolve_backend", "start_parallel", "world_from_env", "worker_device"]


def _early_setting(key: str, config: dict | None, resume, default: str) -> str:
    """A setting needed before the configuration is resolved: given now, else the resumed run's, else default."""
    value = (config or {}).get(key)
    if value is not None:
        return value
    if resume is not None:
        import tomllib

        try:
            recorded = tomllib.loads((Path(resume) / "config.toml").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = {}
        for section in recorded.values() if isinstance(recorded, dict) else ():
            if isinstance(section, dict) and isinstance(section.get(key), str):
                return section[key]
        if isinstance(recorded.get(key), str):
            return recorded[key]
    return default


def start_parallel(world: World, config: dict | None, resume=None) -> DataParallel:
    """Join the process group of a data-parallel run and return its ``DataParallel`` (no model yet).

    The backend follows the device (gloo on the CPU, NCCL on CUDA) unless ``backend`` says otherwise.
    """
    device = _early_setting("device", config, resume, "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = resolve_backend(_early_setting("backend", config, resume, "auto"), device)
    device = worker_device(device, world, backend)
    init_world(world, backend, device)
    return DataParallel(world)


def make_parallel(par: DataParallel, model, optimizer, cfg: dict) -> DataParallel:
    """Configure ``par`` for a built model and optimizer: bucket size, ``sync_bn``, ``shard_optimizer``."""
    par.bucket_mb = float(cfg["bucket_mb"])
    if cfg.get("sync_bn"):
        from .syncbn import sync_batchnorm

        par.sync_bn_layers = sync_batchnorm(model, par.group)
    if cfg.get("shard_optimizer"):
        from .zero import ShardedOptimizer

        par.sharded = ShardedOptimizer(optimizer, model.params(), par.group)
    return par


def describe_parallel(par: DataParallel, cfg: dict) -> str:
    """The header line of a data-parallel run."""
    import torch.distributed as dist

    per = cfg["batch_size"] // par.size if isinstance(cfg["batch_size"], int) else cfg["batch_size"]
    line = (f"Data parallel: {par.size} processes ({dist.get_backend(par.group)}, {torch.get_num_threads()} "
            f"thread{'s' if torch.get_num_threads() != 1 else ''} each), {per} of the global batch of "
            f"{cfg['batch_size']} per process")
    if par.reducer is not None:
        line += f", gradients in {par.reducer.describe()}"
    if getattr(par, "sync_bn_layers", 0):
        line += f", BatchNorm over the global batch ({par.sync_bn_layers} layers)"
    if par.sharded is not None:
        line += ", optimizer state sharded (ZeRO-1)"
    return line
