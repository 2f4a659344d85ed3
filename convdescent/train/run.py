"""Run directories: ``train_from_config`` (what ``convdescent train`` runs), ``load_run`` and ``list_runs``.

A run directory ``runs/<date>-<time>-<name>/`` holds:

- ``config.toml``: the resolved configuration (``convdescent train --config config.toml`` rebuilds the run);
- ``metrics.jsonl``: a record per epoch and every ``log_every`` steps;
- ``checkpoints/last.pt`` and ``checkpoints/best.pt``: model, optimizer and schedule state, random
  generator states, epoch, step and position in the data order (see ``Trainer.checkpoint_payload``);
- ``evaluation.npz``: test loss, accuracy, confusion matrix and the most confident mistakes;
- ``summary.json``: status, best and final validation accuracy, test accuracy, wall time;
- ``report.html``: the self-contained report, written after training by ``convdescent.report.build_report``
  (``convdescent train`` calls it); ``tensorboard/`` with --tensorboard.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

import torch
import torch.distributed

from .. import optim
from ..options import HYPERPARAMETERS
from ..argparsing import command_name
from .callbacks import (Callback, Checkpointer, EarlyStopping, MetricsWriter, TensorBoardLogger, _finite_json,
                        resolve_monitor, truncate_metrics)
from .checkpoint import CheckpointError, atomic_write_bytes, atomic_write_text, encode_checkpoint, load_checkpoint
from .config import ConfigError, dump_toml, load_toml, resolve_config
from .evaluation import EVALUATION_FILE, confusion_png, evaluate_model, load_evaluation, save_evaluation
from .history import History
from .liveness import RunLock, run_state
from .output import OutputWriteError, check_space, probe_folder, write_failure
from .resume import describe_changes, resume_config
from .trainer import NonFiniteError, Trainer, TrainingInterrupted, display_callbacks
from ..data import DataError
from ..distributed import (DistributedError, close_world, describe_parallel, describe_stats, make_parallel,
                           start_parallel, worker_device, world_from_env)

CONFIG_FILE = "config.toml"
# Errors a process can meet while setting a run up, agreed between the ranks of a data-parallel run.
KNOWN_SETUP_ERRORS = (ConfigError, CheckpointError, DataError, OutputWriteError, DistributedError, ValueError,
                      FileNotFoundError, ImportError)
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.toml"  # a model-file run's network, written out
REPORT_FILE = "report.html"


def default_runs_dir() -> Path:
    """Where run directories go by default: $CONVDESCENT_RUNS, else ./runs."""
    return Path(os.environ.get("CONVDESCENT_RUNS") or "runs")


@dataclass
class RunResult:
    """What ``train_from_config`` returns.

    Attributes:
        run_dir: the run directory.
        summary: the contents of summary.json.
        history: the per-epoch History.
        model: the trained model (final weights; the best ones if early stopping restored them).
        status: "completed" or "early_stopping".
    """

    run_dir: Path
    summary: dict
    history: History
    model: Any
    status: str


def resolve_device(name: str) -> str:
    """``auto`` -> "cuda" when a GPU is usable, else "cpu"; other names are checked."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but no CUDA device is available; use --device cpu "
                          f"or auto")
    return name


def _new_run_dir(out: Path, name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out / f"{stamp}-{name}"
    path, i = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            i += 1
            path = Path(f"{base}-{i}")


def apply_device_settings(cfg: dict) -> None:
    """Process-wide CUDA math settings of a run (TF32) for its device; nothing on the CPU."""
    if torch.device(cfg["device"]).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg["tf32"])
        torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])


def _cuda_settings(cfg: dict) -> str:
    """The header's words for the CUDA settings (empty on the CPU)."""
    if torch.device(cfg["device"]).type != "cuda":
        return ""
    return (f" ({torch.cuda.get_device_name(torch.device(cfg['device']))}, TF32 {'on' if cfg['tf32'] else 'off'}, "
            f"CUDA graph {'on' if cfg['cuda_graph'] else 'off'})")


def build_run(cfg: dict, dataset=None, normalizer_dict=None, shard: tuple[int, int] = (0, 1), model_config=None):
    """Dataset, normalizer, model, loss, optimizer, loader and validation tensors of a resolved configuration.

    Args:
        shard: this process's (rank, world size) in a data-parallel run: its loader takes that part of every
            global batch.
        model_config: a resumed checkpoint's model configuration: rebuilds a model-file network without
            reading the file, which may have been edited or deleted since (the checkpoint holds the
            architecture that was trained).

    Returns:
        ``(dataset, normalizer, model, loss, optimizer, loader, val)``; ``val`` is ``(x, y)`` on the
        device, or None without a validation split.
    """
    from ..data import BatchLoader, Normalizer, load_dataset, make_augment
    from ..losses import make_loss
    from ..models import make_model

    device = torch.device(cfg["device"])
    apply_device_settings(cfg)
    if dataset is None:
        dataset = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"], val_split=cfg["val_split"],
                               seed=cfg["split_seed"])
    if len(dataset.x_train) == 0:
        raise ConfigError(f"dataset {cfg['dataset']!r} has no training images")
    if normalizer_dict is not None:
        normalizer = Normalizer.from_dict(normalizer_dict)
    elif cfg["normalize"] == "dataset":
        normalizer = Normalizer.from_data(dataset.x_train)
    else:
        normalizer = Normalizer.unit()
    if model_config is not None and str(cfg["model"]).startswith("file:"):
        from ..model import Sequential

        model = Sequential.from_config(model_config, seed=cfg["seed"], device=device)
    else:
        model = make_model(cfg["model"], dataset.input_shape, dataset.num_classes, seed=cfg["seed"], device=device)
    if cfg["loss"] == "cross_entropy":
        loss = make_loss("cross_entropy", label_smoothing=cfg["label_smoothing"])
    else:
        if cfg["label_smoothing"]:
            raise ConfigError(f"label_smoothing applies to the cross_entropy loss, not {cfg['loss']!r}")
        loss = make_loss(cfg["loss"])
    full = cfg["batch_size"] == "full"
    augment = make_augment(cfg["augment"], dataset=dataset.name) if cfg["augment"] else None
    loader = BatchLoader(dataset.x_train, dataset.y_train, cfg["batch_size"], shuffle=True,
                         drop_last=cfg["drop_last"] and not full, seed=cfg["seed"], normalizer=normalizer,
                         augment=augment, device=device, dtype=model.dtype,
                         chunk_size=cfg["chunk_size"] if full else None, shard=shard)
    spe = loader.steps_per_epoch
    total = cfg["steps"] if cfg["steps"] is not None else cfg["epochs"] * spe
    schedule = cfg["schedule"] if cfg["schedule"] != "constant" else None
    optimizer = optim.optimizer_from_args(
        cfg["optimizer"], cfg["lr"], schedule=schedule, schedule_params=cfg["schedule_params"], total_steps=total,
        steps_per_epoch=spe, record=cfg["record_norms"],
        **{h.name: cfg[h.name] for h in HYPERPARAMETERS if h.name != "lr"})
    val = None
    if len(dataset.x_val):
        val = (dataset.x_val.to(device), dataset.y_val.to(device))
    return dataset, normalizer, model, loss, optimizer, loader, val


def _init_and_freeze(cfg: dict, model, fresh: bool) -> list[str]:
    """Load init_from's weights into a fresh run's model and check the freeze names; the lines to print."""
    from ..transfer import frozen_params, init_from_run

    lines = []
    if cfg["init_from"] and fresh:
        lines += init_from_run(model, cfg["init_from"], cfg["init_checkpoint"]).lines()
    if cfg["freeze"]:
        names = frozen_params(model, cfg["freeze"])
        model.freeze(names)  # their layers' backward computes no parameter gradients (see model.plan())
        lines.append(f"Frozen: {len(names)} parameter tensors ({', '.join(names)}) are not updated")
    return lines


def _say(stream: TextIO | None, text: str) -> None:
    if stream is not None:
        stream.write(text + "\n")
        stream.flush()


def train_from_config(config: dict | None = None, callbacks: Iterable[Callback] = (), out=None, *,
                      resume=None, run_dir=None, display="auto", stream: TextIO | None = None, dataset=None,
                      handle_signals: bool = True, allow_change: Iterable[str] = ()) -> RunResult:
    """Train a run described by a configuration dict and write its run directory.

    The report is not part of training: ``convdescent.report.build_report(result.run_dir)`` writes
    report.html afterwards (``convdescent train`` does so when the run finished or stopped on non-finite
    values).

    Args:
        config: configuration keys (see ``convdescent.train.config.OPTIONS``); missing keys take defaults.
            With ``resume`` these are overrides, of which only ``RESUMABLE_KEYS`` and ``allow_change`` may
            differ from the settings the checkpoint recorded (see ``convdescent.train.resume``).
        callbacks: extra callbacks (e.g. a pruning callback reading ``logs["val_acc"]`` in ``on_epoch_end``).
        out: folder holding run directories (overrides ``config["out"]``).
        resume: a run directory to continue from its last checkpoint.
        run_dir: exact run directory to create (instead of ``<out>/<date>-<time>-<name>``).
        display: "auto" (progress bar on a terminal, else epoch lines), "lines", "bar", "json" (JSON lines),
            "quiet" (only the final summary lines) or "none" (nothing at all).
        stream: where display lines go (default sys.stdout).
        dataset: an already loaded ``Dataset`` to use instead of loading ``config["dataset"]``.
        handle_signals: stop cleanly on SIGINT/SIGTERM after the current step, with a checkpoint.
        allow_change: with ``resume``, settings that may differ from those the checkpoint recorded.

    Returns:
        ``RunResult`` with the run directory, the summary, the History and the model.

    Raises:
        ConfigError, DataError, CheckpointError: bad configuration, data or checkpoint (clear messages).
        NonFiniteError: training hit non-finite values (the summary records it; the last good checkpoint stays).
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was written and ``--resume`` continues.
    """
    out_stream = stream if stream is not None else sys.stdout
    if display not in ("auto", "lines", "bar", "json", "quiet", "none"):
        raise ValueError(f"display must be auto, lines, bar, json, quiet or none, got {display!r}")
    world = world_from_env()
    main = world.is_main
    if not main:
        display = "none"  # ranks other than 0 print nothing and write nothing
    talk = out_stream if display in ("auto", "lines", "bar") else None
    par, owned = None, False
    if world.distributed:
        owned = not torch.distributed.is_initialized()  # a caller's own process group stays open
        par = start_parallel(world, config, resume)
    try:
        setup = _setup(config, resume, run_dir, dataset, allow_change, out, world, par)
        return _train(setup, callbacks, display, talk, out_stream, handle_signals, world, par)
    finally:
        if par is not None:
            par.close()
            if owned:
                close_world()


@dataclass
class _Setup:
    cfg: dict
    ckpt: dict | None
    resume_changes: list
    run_path: Path
    made_dir: bool
    parts: tuple
    init_lines: list


def _resolve(config, resume, allow_change, out, world) -> tuple[dict, dict | None, list, Path | None]:
    """The configuration (and the checkpoint and run directory when resuming) of this process."""
    if resume is not None:
        run_path = Path(resume)
        if not (run_path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{run_path} is not a run directory (no {CONFIG_FILE}); pass the folder that "
                                  f"'convdescent train' wrote")
        ckpt = load_checkpoint(run_path / "checkpoints" / "last.pt")
        cfg, changes = resume_config(run_path, ckpt.get("config"), config, allow_change)
    else:
        if allow_change:
            raise ConfigError("--allow-change applies to --resume only")
        run_path, ckpt, changes = None, None, []
        cfg = resolve_config(config)
        if out is not None:
            cfg["out"] = str(out)
        if cfg["name"] is None:
            from ..models import default_run_name

            cfg["name"] = default_run_name(cfg["model"])
    given = (config or {}).get("nproc")
    if not world.distributed and given is not None and given > 1:
        raise ConfigError(f"nproc {given} needs {given} processes; start them with convdescent train --nproc "
                          f"{given} or torchrun --nproc-per-node {given} -m convdescent train ...")
    if world.distributed and given is not None and given != world.size:
        raise ConfigError(f"nproc {given} was asked for, but this process is one of {world.size} started by "
                          f"torchrun; give --nproc-per-node to torchrun or --nproc to convdescent, not both")
    if cfg["nproc"] != world.size:
        if ckpt is not None and (config or {}).get("nproc") is None:
            changes = changes + [("nproc", cfg["nproc"], world.size, "the number of processes started")]
        cfg["nproc"] = world.size
    if world.distributed:
        if cfg["batch_size"] == "full":
            raise ConfigError("batch_size 'full' (full-batch gradient descent) runs on one process only; "
                              "drop --nproc or give a batch size")
        if cfg["shard_optimizer"] and cfg["on_nan"] == "rollback":
            raise ConfigError("--on-nan rollback halves the learning rate of a running optimizer, which "
                              "--shard-optimizer does not support yet; use --on-nan stop with it")
    cfg["device"] = worker_device(resolve_device(cfg["device"]), world, cfg["backend"])
    return cfg, ckpt, changes, run_path


def _setup(config, resume, run_dir, dataset, allow_change, out, world, par) -> _Setup:
    """Configuration, checkpoint, run directory and training parts, agreed by every rank.

    In a data-parallel run rank 0 alone reads a resumed run and creates a new run directory; every rank
    builds its own parts. A failure on any rank is raised on every rank with the same message, so no rank
    is left waiting for the others.
    """
    if par is None:
        cfg, ckpt, changes, run_path = _resolve(config, resume, allow_change, out, world)
    else:
        failure = None
        if resume is not None:
            try:  # rank 0 reads the run; the others get its reading (no shared disk needed)
                picked = _resolve(config, resume, allow_change, out, world) if world.is_main else None
            except KNOWN_SETUP_ERRORS as e:
                picked, failure = None, e
            picked = par.broadcast((picked, _describe_failure(failure, 0)), "reading the resumed run")
            if picked[1] is not None:
                raise _agreed_error(picked[1], world.rank)
            cfg, ckpt, changes, run_path = picked[0]
            cfg = dict(cfg, device=worker_device(resolve_device(
                (config or {}).get("device") or cfg["device"].split(":")[0]), world, cfg["backend"]))
        else:
            try:
                cfg, ckpt, changes, run_path = _resolve(config, resume, allow_change, out, world)
            except KNOWN_SETUP_ERRORS as e:
                failure = e
            _agree(par, failure, "checking the settings")
            par.check_same({k: v for k, v in cfg.items() if k not in PER_PROCESS_KEYS})
    torch.manual_seed(cfg["seed"])
    if cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    elif world.distributed and torch.device(cfg["device"]).type == "cpu":
        torch.set_num_threads(1)
    failure, made_dir, parts, init_lines = None, False, None, []
    try:
        parts = build_run(cfg, dataset, ckpt.get("normalizer") if ckpt else None, shard=(world.rank, world.size),
                          model_config=ckpt.get("model_config") if ckpt else None)
        init_lines = _init_and_freeze(cfg, parts[2], ckpt is None)
        if ckpt is not None:
            classes = parts[0].classes
            if ckpt.get("classes") is not None and list(ckpt["classes"]) != list(classes):
                raise CheckpointError(f"the checkpoint in {run_path} was trained on classes {ckpt['classes'][:5]}"
                                      f"..., the dataset now has {classes[:5]}...; resume with the same data")
        elif world.is_main:
            probe_folder(Path(run_dir).parent if run_dir is not None else Path(cfg["out"]))
            made_dir = run_dir is None or not Path(run_dir).exists()
            run_path = Path(run_dir) if run_dir is not None else _new_run_dir(Path(cfg["out"]), cfg["name"])
            run_path.mkdir(parents=True, exist_ok=True)
    except ValueError as e:
        failure = e if isinstance(e, (ConfigError, CheckpointError, OutputWriteError)) else ConfigError(str(e))
    except KNOWN_SETUP_ERRORS as e:
        failure = e
    if par is not None:
        try:
            _agree(par, failure, "building the model and data")
        except BaseException:
            if made_dir and run_path is not None:  # another rank failed: leave no half-made run directory
                with contextlib.suppress(OSError):
                    shutil.rmtree(run_path)
            raise
        if ckpt is None:
            run_path = Path(par.broadcast(str(run_path) if world.is_main else None, "naming the run directory"))
    elif failure is not None:
        raise failure
    return _Setup(cfg, ckpt, changes, run_path, made_dir, parts, init_lines)


# Settings each process may hold its own value of (where it runs, where it reads and writes).
PER_PROCESS_KEYS = ("device", "data_dir", "out", "name", "threads")


def _describe_failure(e: BaseException | None, rank: int):
    if e is None:
        return None
    return (type(e).__name__, str(e), rank)


def _agreed_error(desc, me: int) -> BaseException:
    """The error of ``desc`` (class name, message, rank), raised on every rank; ranks other than 0 stay quiet."""
    name, message, rank = desc
    cls = {c.__name__: c for c in KNOWN_SETUP_ERRORS}.get(name, ConfigError)
    text = message if rank == 0 else f"on rank {rank}: {message}"
    try:
        err = cls(text)
    except TypeError:
        err = ConfigError(text)
    err.quiet_rank = me != 0  # one message for the run: rank 0 prints it
    return err


def _agree(par, failure: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed; the first failure (by rank) is raised on all of them."""
    found = par.gather_objects(_describe_failure(failure, par.rank), what)
    first = next((f for f in found if f is not None), None)
    if first is not None:
        raise _agreed_error(first, par.rank)


def _rank_callbacks(cfg: dict, run_path: Path, monitor: str, talk, world) -> tuple[list, Checkpointer]:
    """The run's own callbacks. Rank 0 writes the run directory; the other ranks keep the callbacks that
    take decisions or join collectives (early stopping, checkpoint points, health figures), writing nothing."""
    cbs: list[Callback] = []
    if cfg["early_stopping"]:
        cbs.append(EarlyStopping(monitor, cfg["early_stopping"], cfg["min_delta"], cfg["restore_best"]))
    checkpointer = Checkpointer(run_path / "checkpoints", monitor, cfg["checkpoint_every"], write=world.is_main)
    cbs.append(checkpointer)
    if world.is_main:
        cbs.append(RunLock(run_path))
        cbs.append(MetricsWriter(run_path / METRICS_FILE, cfg["log_every"]))
    if cfg["health_every"]:
        from ..diagnostics.health import HealthMonitor

        if world.is_main:
            cbs.append(HealthMonitor(every=cfg["health_every"], stream=sys.stderr if talk is not None else None))
        else:
            cbs.append(HealthMonitor(every=cfg["health_every"], stream=None, sink=lambda record: None))
    if cfg["tensorboard"] and world.is_main:
        cbs.append(TensorBoardLogger(run_path / "tensorboard", max(cfg["log_every"], 1)))
    return cbs, checkpointer


def _train(setup: _Setup, callbacks, display, talk, out_stream, handle_signals, world, par) -> RunResult:
    cfg, ckpt, run_path, made_dir = setup.cfg, setup.ckpt, setup.run_path, setup.made_dir
    dataset, normalizer, model, loss, optimizer, loader, val = setup.parts
    main = world.is_main
    if cfg["freeze"]:
        from ..optim.masked import freeze
        from ..transfer import frozen_params

        optimizer = freeze(optimizer, frozen_params(model, cfg["freeze"]))
    parallel = None
    if par is not None:
        parallel = make_parallel(par, model, optimizer, cfg)
    has_val = val is not None
    monitor, _ = resolve_monitor(cfg["monitor"], has_val)
    own, checkpointer = _rank_callbacks(cfg, run_path, monitor, talk, world)
    cbs: list[Callback] = list(callbacks) + own
    cbs += display_callbacks("quiet" if display == "none" else display, out_stream)
    trainer = Trainer(model, loss, optimizer, loader, val, epochs=cfg["epochs"] if cfg["steps"] is None else None,
                      steps=cfg["steps"], callbacks=cbs, precision=cfg["precision"], on_nan=cfg["on_nan"],
                      max_rollbacks=cfg["max_rollbacks"], nan_check_every=cfg["nan_check_every"],
                      eval_batch_size=cfg["eval_batch_size"], handle_signals=handle_signals,
                      notice_stream=sys.stderr if display != "none" else None, cuda_graph=cfg["cuda_graph"],
                      parallel=parallel)
    trainer.extra = {"config": cfg, "classes": list(dataset.classes), "normalizer": normalizer.to_dict(),
                     "dataset": dataset.name, "input_shape": list(dataset.input_shape)}
    if ckpt is not None:
        try:
            trainer.load_checkpoint_state(ckpt)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint {run_path / 'checkpoints' / 'last.pt'} does not fit this run's "
                                  f"model and optimizer: {e}") from None
        if trainer.step >= trainer.total_steps:
            raise ConfigError(f"the run in {run_path} already finished its {trainer.total_steps} steps "
                              f"({trainer.epochs} epochs); pass a larger --epochs or --steps to train further")
    # a sharded optimizer gathers its state for a checkpoint on every rank; otherwise rank 0 alone builds it
    payload = trainer.checkpoint_payload() if main or (parallel is not None and parallel.sharded is not None) \
        else None
    failure = None
    if main:
        try:
            # the disk must hold the checkpoints before the first step is spent on the run
            probe_folder(run_path)
            check_space(run_path, len(encode_checkpoint(payload)))
            if ckpt is not None:
                truncate_metrics(run_path / METRICS_FILE, trainer.step, len(trainer.history))
            header = "convdescent run configuration; rebuild the run with: convdescent train --config config.toml"
            atomic_write_text(run_path / CONFIG_FILE, dump_toml(cfg, header))
            if ckpt is None and str(cfg["model"]).startswith("file:"):
                from ..model_file import model_to_toml

                # the trained network in the run itself: resume, evaluate and export read the checkpoint's copy
                # of it, and this file trains it again after the original was edited or deleted
                source = cfg["model"][len("file:"):]
                atomic_write_text(run_path / MODEL_FILE, model_to_toml(model, header=(
                    f"the network of this run, from {source}; train it again with: convdescent train "
                    f"--model-file {MODEL_FILE}")))
        except (OutputWriteError, OSError) as e:
            if ckpt is None and made_dir:
                with contextlib.suppress(OSError):
                    shutil.rmtree(run_path)  # nothing of the run was written: leave no half-written run directory
            failure = e if isinstance(e, OutputWriteError) else OutputWriteError(
                f"cannot write the run directory {run_path}: {e.strerror or e}; free space or choose a writable "
                f"folder with --out")
    if par is not None:
        _agree(par, failure, "preparing the run directory")
    elif failure is not None:
        raise failure
    started = _dt.datetime.now().isoformat(timespec="seconds")
    if ckpt is not None:
        _say(talk, f"Resuming {run_path} at step {trainer.step} (epoch {loader.epoch + 1}, batch "
                   f"{loader.position} of {len(loader)})")
        if setup.resume_changes:
            _say(talk, describe_changes(setup.resume_changes))
    else:
        _say(talk, f"Run {run_path}")
    origin = f" (from {dataset.origin})" if getattr(dataset, "origin", "") else ""
    _say(talk, f"Model {cfg['model']} ({model.num_params():,} parameters) on {dataset.name}{origin}: "
               f"{len(dataset.x_train)} train / {len(dataset.x_val)} val / {len(dataset.x_test)} test images, "
               f"device {cfg['device']}{_cuda_settings(cfg)}, {cfg['precision']}")
    if parallel is not None:
        _say(talk, describe_parallel(parallel, cfg))
    _say(talk, f"Optimizer {optim.describe(optimizer)}")
    for line in setup.init_lines:
        _say(talk, line)
    status = "completed"
    error: BaseException | None = None
    try:
        trainer.run()
        status = trainer.stop_reason or "completed"
    except NonFiniteError as e:
        status, error = "nonfinite", e
    except TrainingInterrupted as e:
        status, error = "interrupted", e
    except BaseException as e:
        status, error = ("failed" if not isinstance(e, KeyboardInterrupt) else "interrupted"), e
    if not main:
        if error is not None:
            if isinstance(error, (NonFiniteError, TrainingInterrupted)):
                error.quiet_rank = True  # rank 0 says it for the run
            raise error
        return RunResult(run_path, {}, trainer.history, model, status)
    disk_failed = isinstance(error, OutputWriteError)
    try:
        summary = _write_summary(run_path, cfg, trainer, dataset, model, loss, normalizer, status, started, error,
                                 checkpointer)
    except OSError as e:
        if not disk_failed:
            last = checkpointer.last_path if checkpointer.saved_step is not None else None
            error = write_failure(run_path / SUMMARY_FILE, e, run_path, checkpointer.checkpoint_bytes, last,
                                  checkpointer.saved_step)
            status = "failed"
        summary = {}
    if error is not None:
        error.run_dir = run_path
        if isinstance(error, DistributedError):
            saved = checkpointer.saved_step
            kept = (f"the checkpoint of step {saved} is kept" if saved is not None else "no checkpoint was written")
            error.args = (f"{error}; {kept}. Continue with: {command_name()} train --resume "
                          f"{shlex.quote(str(run_path))} (on any number of processes)",)
        if isinstance(error, NonFiniteError):
            last = run_path / "checkpoints" / "last.pt"
            kept = f" The last good checkpoint is kept: {last}" if last.exists() else ""
            error.args = (str(error) + "." + kept,)
        raise error
    if display not in ("json", "none"):
        if parallel is not None:
            _say(out_stream, describe_stats(summary["distributed"]))
        _say(out_stream, _final_block(summary))
    elif display == "json":
        out_stream.write(json.dumps(_finite_json({"type": "summary", **summary})) + "\n")
        out_stream.flush()
    return RunResult(run_path, summary, trainer.history, model, status)


def _write_summary(run_path: Path, cfg: dict, trainer: Trainer, dataset, model, loss, normalizer, status: str,
                   started: str, error, checkpointer: Checkpointer) -> dict:
    h = trainer.history
    summary: dict[str, Any] = {
        "status": status, "run_dir": str(run_path), "name": cfg["name"], "model": cfg["model"],
        "dataset": dataset.name, "optimizer": optim.describe(trainer.optimizer), "epochs": trainer.epochs,
        "epochs_done": len(h), "steps": trainer.step, "total_steps": trainer.total_steps,
        "best_val_acc": h.best_val_acc, "best_epoch": h.best_epoch,
        "final_val_acc": h.final.get("val_acc", math.nan), "final_val_loss": h.final.get("val_loss", math.nan),
        "final_loss": h.final.get("loss", math.nan), "final_acc": h.final.get("acc", math.nan),
        "test_loss": math.nan, "test_acc": math.nan, "train_time_s": trainer.elapsed,
        "rollbacks": trainer.rollbacks, "device": cfg["device"], "precision": cfg["precision"],
        "params": model.num_params(), "started": started,
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    prev = read_json(run_path / SUMMARY_FILE)
    summary["wall_time_s"] = trainer.elapsed
    if prev and isinstance(prev.get("first_started"), str):
        summary["first_started"] = prev["first_started"]
    else:
        summary["first_started"] = started
    if error is not None:
        summary["error"] = str(error) if isinstance(error, (NonFiniteError, TrainingInterrupted)) else \
            f"{type(error).__name__}: {error}"
        if isinstance(error, TrainingInterrupted):
            summary["resume"] = f"{command_name()} train --resume {shlex.quote(str(Path(run_path).absolute()))}"
    if status in ("completed", "early_stopping") and len(dataset.x_test):
        ev = evaluate_model(model, loss, dataset.x_test, dataset.y_test, normalizer, dataset.num_classes,
                            cfg["eval_batch_size"])
        save_evaluation(run_path / EVALUATION_FILE, ev, "test", dataset.name)
        for cb in trainer.callbacks:
            if isinstance(cb, TensorBoardLogger):
                cb.add_test(ev["acc"], ev["loss"], trainer.step)
        atomic_write_bytes(run_path / "confusion.png",
                           confusion_png(ev["confusion"], dataset.classes, f"{dataset.name} test"))
        summary["test_loss"], summary["test_acc"] = ev["loss"], ev["acc"]
        summary["test_weights"] = "best (restored by early stopping)" if any(
            e.get("event") == "restored_best" for e in h.events) else "final"
    parallel = getattr(trainer, "parallel", None)
    if parallel is not None:
        from ..distributed.zero import state_nbytes

        summary["distributed"] = parallel.stats()
        summary["distributed"]["optimizer_state_bytes"] = state_nbytes(trainer.opt_state)  # rank 0's share
    if checkpointer.best is not None:
        summary["best_checkpoint"] = {"monitor": checkpointer.monitor, "value": checkpointer.best,
                                      "epoch": checkpointer.best_epoch}
    atomic_write_text(run_path / SUMMARY_FILE, json.dumps(_finite_json(summary), indent=2) + "\n")
    return summary


def _fmt(v, spec=".4f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _final_block(s: dict) -> str:
    best = _fmt(s.get("best_val_acc"))
    if s.get("best_epoch"):
        best += f" (epoch {s['best_epoch']})"
    return "\n".join([
        f"Best val_acc {best} - final val_acc {_fmt(s.get('final_val_acc'))} - "
        f"test_acc {_fmt(s.get('test_acc'))} - wall time {s['wall_time_s']:.1f}s",
        f"Run written to {s['run_dir']}",
    ])


def read_json(path: Path) -> dict | None:
    """A JSON file holding an object (summary.json), or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (lines cut short by a crash are skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def history_from_metrics(records: list[dict]) -> History:
    """The History of a run rebuilt from its metrics.jsonl records (epoch records and events)."""
    h = History()
    for r in records:
        if r.get("type") == "epoch":
            h.append({k: (math.nan if r.get(k) is None else r[k]) for k in ("epoch", "step", "loss", "acc",
                                                                            "val_loss", "val_acc", "lr", "time")})
        elif r.get("type") == "event":
            h.events.append({k: v for k, v in r.items() if k != "type"})
    return h


@dataclass
class Run:
    """A run directory read back by ``load_run``.

    Attributes:
        path: the run directory.
        config: the resolved configuration (config.toml).
        model: the model with the chosen checkpoint's weights, in evaluation mode.
        normalizer: the run's input normalizer; ``classes``: class names; ``dataset``: dataset name.
        checkpoint: which checkpoint was loaded ("best" or "last"); ``checkpoint_path``: its file.
        metrics: records of metrics.jsonl; ``summary``: summary.json (empty dict if absent).
        history: the whole run's History (from metrics.jsonl).
    """

    path: Path
    config: dict
    model: Any
    normalizer: Any
    classes: list
    dataset: str
    checkpoint: str
    checkpoint_path: Path
    metrics: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    history: History = field(default_factory=History)

    @property
    def evaluation(self) -> dict | None:
        """The test evaluation saved with the run (evaluation.npz), or None."""
        return load_evaluation(self.path / EVALUATION_FILE)

    @property
    def name(self) -> str:
        return self.path.name

    def loss(self):
        from ..losses import make_loss

        if self.config.get("loss", "cross_entropy") == "cross_entropy":
            return make_loss("cross_entropy", label_smoothing=self.config.get("label_smoothing", 0.0))
        return make_loss(self.config["loss"])


def load_run(run_dir, checkpoint: str = "best", device="cpu") -> Run:
    """Read a run directory: configuration, model (best or last checkpoint), normalizer, classes, metrics.

    Args:
        run_dir: a folder written by ``convdescent train`` / ``train_from_config``.
        checkpoint: "best" (falls back to "last" when the run has no best.pt yet) or "last".
        device: where to put the model.

    Raises:
        CheckpointError: not a run directory, or its checkpoint is missing, truncated or foreign.
    """
    from ..data import Normalizer
    from ..model import Sequential

    path = Path(run_dir)
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    if not path.is_dir():
        raise CheckpointError(f"run directory {path} does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} is not a run directory (no {CONFIG_FILE}); pass a folder written by "
                              f"'convdescent train'")
    config = resolve_config(load_toml(path / CONFIG_FILE), source=str(path / CONFIG_FILE))
    ck_dir = path / "checkpoints"
    which = checkpoint
    if which == "best" and not (ck_dir / "best.pt").exists():
        which = "last"
    ck_path = ck_dir / f"{which}.pt"
    ckpt = load_checkpoint(ck_path)
    try:
        model = Sequential.from_config(ckpt["model_config"], device=device)
        model.load_state_dict(ckpt["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ck_path} does not describe a loadable model: {e}") from None
    normalizer = Normalizer.from_dict(ckpt["normalizer"]) if ckpt.get("normalizer") else Normalizer.unit()
    classes = list(ckpt.get("classes") or [str(i) for i in range(model.output_shape[-1])])
    metrics = read_metrics(path / METRICS_FILE)
    history = history_from_metrics(metrics) if metrics else History.from_dict(ckpt.get("history") or {})
    return Run(path=path, config=config, model=model, normalizer=normalizer, classes=classes,
               dataset=str(ckpt.get("dataset", config["dataset"])), checkpoint=which, checkpoint_path=ck_path,
               metrics=metrics, summary=read_json(path / SUMMARY_FILE) or {}, history=history)


def list_runs(out=None) -> list[dict]:
    """Key figures of every run directory under ``out`` (default ``default_runs_dir()``), newest first."""
    root = Path(out) if out is not None else default_runs_dir()
    if not root.is_dir():
        return []
    rows = []
    for d in sorted(root.iterdir(), reverse=True):
        if not (d / CONFIG_FILE).is_file():
            continue
        s = read_json(d / SUMMARY_FILE) or {}
        live = run_state(d)
        if not s:
            try:
                cfg = load_toml(d / CONFIG_FILE)
            except ConfigError:
                cfg = {}
            # no summary and no process holding the run: it died before its first summary
            s = {"status": "crashed", "model": cfg.get("model"), "dataset": cfg.get("dataset")}
        status = s.get("status")
        if live is not None:
            status = {"running": "running", "crashed": "crashed",
                      "elsewhere": f"running on {live['host']}? (last heard {live['heartbeat']})"}[live["state"]]
        rows.append({"run": d.name, "path": str(d), "status": status, "model": s.get("model"),
                     "dataset": s.get("dataset"), "epochs": f"{s.get('epochs_done', '?')}/{s.get('epochs', '?')}",
                     "best_val_acc": s.get("best_val_acc"), "test_acc": s.get("test_acc"),
                     "wall_time_s": s.get("wall_time_s")})
    return rows
