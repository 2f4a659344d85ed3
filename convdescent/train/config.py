"""Run configuration: every choice of a training run as one flat dict, read from and written to TOML.

The keys are the ``convdescent train`` flags with underscores (``--batch-size`` is ``batch_size``), so a
TOML file, the command line and a Python dict describe a run the same way. ``resolve_config`` fills the
defaults and checks every value; the resolved dict is saved as ``config.toml`` in the run directory and
rebuilds the run.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..optim.schedules import check_schedule_params
from ..options import (COUNT, HYPERPARAMETERS, NON_NEGATIVE, POSITIVE_COUNT, SEED, UNIT_OPEN, OptionRangeError,
                       Range, check, given, label)


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class Option:
    """One configuration key: its default, its kind of value and what it means.

    ``kind`` is one of: str, int, float, bool, batch (int or "full"), count (int or fraction), floats (list),
    dict, strs (list of strings). ``range`` bounds a number (each item of ``floats``); ``scale`` is how a
    search samples a range of it ("log" or "linear"; None: linear); ``length`` is the number of items of
    ``floats``.
    """

    key: str
    default: Any
    kind: str
    help: str
    group: str
    choices: tuple = ()
    range: Range | None = None
    scale: str | None = None
    length: int = 0


def _hyperparameter_options() -> tuple[Option, ...]:
    """The optimizer group's options, one per entry of the schema (``convdescent.options.HYPERPARAMETERS``)."""
    return tuple(Option(h.name, h.default, h.kind, h.help, "optimizer", range=h.range, scale=h.scale,
                        length=h.length) for h in HYPERPARAMETERS)



OPTIONS: tuple[Option, ...] = (
    # what is trained
    Option("model", "seed_cnn", "str", "model name (see convdescent.models.MODELS)", "model"),
    Option("loss", "cross_entropy", "str", "loss name", "model", ("cross_entropy", "mse")),
    Option("label_smoothing", 0.0, "float", "label smoothing of the cross-entropy target", "model", range=UNIT_OPEN),
    Option("init_from", None, "str", "start from this run directory's weights (tensors matched by name and "
           "shape; the ones not loaded are listed)", "model"),
    Option("init_checkpoint", "best", "str", "which checkpoint of init_from: best or last", "model",
           ("best", "last")),
    Option("freeze", None, "str", "layers kept fixed: comma-separated names or prefixes (conv1,residual1; "
           "conv* for a plain prefix)", "model"),
    # data
    Option("dataset", "fashion-mnist", "str", "dataset name, 'npz:PATH' or 'folder:PATH'", "data"),
    Option("data_dir", None, "str", "folder searched first for the dataset files", "data"),
    Option("val_split", 5000, "count", "training images held out for validation (count or fraction; 0: none)",
           "data", range=COUNT),
    Option("split_seed", 0, "int", "seed of the validation split (fixed so runs with other seeds compare)", "data",
           range=SEED),
    Option("normalize", "unit", "str", "input scaling: unit (x/255) or dataset (per-channel mean/std)", "data",
           ("unit", "dataset")),
    Option("augment", "", "str", "augmentation spec such as 'crop:4,flip' ('' for none)", "data"),
    Option("batch_size", 32, "batch", "images per step, or 'full' for full-batch gradient descent", "data",
           range=POSITIVE_COUNT, scale="log"),
    Option("chunk_size", 4096, "int", "images per chunk when accumulating a full-batch gradient", "data",
           range=POSITIVE_COUNT),
    Option("drop_last", False, "bool", "skip the last incomplete batch of each epoch", "data"),
    # how long
    Option("epochs", 10, "int", "passes over the training set (ignored when steps is set)", "train", range=POSITIVE_COUNT),
    Option("steps", None, "int", "total optimizer steps instead of epochs", "train", range=POSITIVE_COUNT),
    # optimizer
    Option("optimizer", "adam", "str", "optimizer name (convdescent optimizers lists them)", "optimizer"),
    *_hyperparameter_options(),  # lr, momentum, ..., agc: declared once in convdescent/options.py
    Option("record_norms", False, "bool", "record gradient/update norms and clipping inside the optimizer "
           "every step", "optimizer"),
    Option("schedule", "constant", "str", "learning-rate schedule name", "optimizer"),
    Option("schedule_params", {}, "dict", "schedule parameters, e.g. {warmup_steps = 500}", "optimizer"),
    # trainer
    Option("seed", 0, "int", "seed of the initial weights, the batch order and augmentation", "train",
           range=SEED),
    Option("device", "auto", "str", "auto, cpu, cuda or cuda:N", "train"),
    Option("precision", "fp32", "str", "fp32, or bf16 compute with fp32 master weights", "train",
           ("fp32", "bf16")),
    Option("cuda_graph", True, "bool", "on CUDA, record the training step once as a CUDA graph and replay it "
           "for every batch (Adam/AdamW; other steps run eagerly)", "train"),
    Option("tf32", True, "bool", "on CUDA, TF32 matrix products and convolutions (10-bit mantissa inputs, "
           "float32 accumulation; about 2x faster matrix work)", "train"),
    Option("on_nan", "stop", "str", "on a non-finite loss or gradient: stop, or rollback (restore the last "
           "good state and halve the learning rate)", "train", ("stop", "rollback")),
    Option("max_rollbacks", 3, "int", "how many rollbacks --on-nan rollback may make", "train", range=COUNT),
    Option("nan_check_every", 50, "int", "steps between checks for non-finite values (one host sync each)",
           "train", range=POSITIVE_COUNT),
    Option("early_stopping", 0, "int", "stop after this many epochs without improvement (0: off)", "train",
           range=COUNT),
    Option("min_delta", 0.0, "float", "smallest change of the monitored value that counts as improvement",
           "train", range=NON_NEGATIVE),
    Option("monitor", "auto", "str", "value watched by early stopping and the best checkpoint: auto (val_acc "
           "when there is a validation split, else loss), val_acc, val_loss, acc or loss", "train",
           ("auto", "val_acc", "val_loss", "acc", "loss")),
    Option("restore_best", True, "bool", "early stopping restores the best weights", "train"),
    Option("eval_batch_size", 1000, "int", "images per evaluation batch", "train", range=POSITIVE_COUNT),
    # data parallel (convdescent.distributed)
    Option("nproc", 1, "int", "processes of a data-parallel run started on this machine (torchrun sets the "
           "world size itself); each takes batch_size / nproc examples per step", "train", range=POSITIVE_COUNT),
    Option("threads", None, "int", "CPU threads per process (default: 1 per process of a data-parallel run, "
           "torch's choice for a single process)", "train", range=POSITIVE_COUNT),
    Option("backend", "auto", "str", "torch.distributed backend: auto (NCCL on CUDA, gloo on the CPU), gloo "
           "or nccl", "train", ("auto", "gloo", "nccl")),
    Option("bucket_mb", 25.0, "float", "size in MiB of the gradient buckets all-reduced during the backward",
           "train", range=Range(0.001, 1024.0)),
    Option("sync_bn", False, "bool", "BatchNorm statistics over the global batch instead of each process's "
           "part", "train"),
    Option("shard_optimizer", False, "bool", "ZeRO stage 1: each process keeps the optimizer state of 1/nproc "
           "of the parameters", "train"),
    # output
    Option("out", "runs", "str", "folder that holds run directories", "output"),
    Option("name", None, "str", "run name (default: the model name)", "output"),
    Option("log_every", 50, "int", "steps between step records in metrics.jsonl (0: epochs only)", "output",
           range=COUNT),
    Option("health_every", 50, "int", "steps between gradient-health checks: per-layer gradient, update and "
           "activation figures in metrics.jsonl, with warnings (0: off)", "output", range=COUNT),
    Option("checkpoint_every", 0, "int", "also write the last checkpoint every N steps (0: at epoch ends)",
           "output", range=COUNT),
    Option("tensorboard", False, "bool", "write TensorBoard event files (needs the tensorboard package)",
           "output"),
)

OPTION_BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}
GROUP_TITLES = {"model": "What is trained", "data": "Data", "train": "Training", "optimizer": "Optimizer",
                "output": "Output"}
# Keys that may change when a run is resumed; the others define the run and must stay as saved.
RESUMABLE_KEYS = ("epochs", "steps", "on_nan", "max_rollbacks", "nan_check_every", "log_every",
                  "checkpoint_every", "tensorboard", "device", "data_dir", "eval_batch_size", "cuda_graph", "tf32",
                  # how many processes share the work does not change the training (the loader's position is
                  # global, the gradient is the global batch's mean): a run may resume on another nproc
                  "nproc", "threads", "backend", "bucket_mb", "shard_optimizer")


def default_config() -> dict[str, Any]:
    """Every key with its default value (None for unset optional settings)."""
    return {o.key: (dict(o.default) if isinstance(o.default, dict) else o.default) for o in OPTIONS}


# Names other tools use for the same settings: suggested, never accepted silently.
SYNONYMS = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "batchsize": "batch_size",
            "opt": "optimizer", "wd": "weight_decay", "lr_schedule": "schedule", "scheduler": "schedule",
            "validation_split": "val_split", "patience": "early_stopping", "grad_clip": "clip_norm",
            "max_grad_norm": "clip_norm", "output_dir": "out", "run_name": "name"}


def _unknown_key(key: str, source: str) -> ConfigError:
    close = [SYNONYMS[key]] if key in SYNONYMS else difflib.get_close_matches(key, list(OPTION_BY_KEY), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(OPTION_BY_KEY)}"
    return ConfigError(f"unknown configuration key {key!r} in {source}{hint}")


def _check_value(opt: Option, value: Any, source: str) -> Any:
    """``value`` checked against ``opt`` (type, choices, range) and converted as the configuration keeps it.

    ``source`` names where it came from in messages: "arguments" (Python or the command line), a file.
    """
    where = label(opt.key, source)
    if value is None:
        if opt.default is None:
            return None
        raise ConfigError(f"{where} must be set, got None; its default is {opt.default!r}")
    kind = opt.kind
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        value = float(value)
    elif kind == "batch":
        if value == "full":
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a positive integer or 'full', got {value!r}")
    elif kind == "count":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be an image count or a fraction in [0, 1), got {value!r}")
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            if value.is_integer() and value >= 1:
                value = int(value)
            else:
                raise ConfigError(f"{where} as a fraction must be in [0, 1), got {value!r}")
        if isinstance(value, float):
            return value  # a fraction in [0, 1); the range below is the count's
    elif kind == "floats":
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where} must be a list of numbers such as [0.9, 0.999], got {value!r}")
        if opt.length and len(value) != opt.length:
            raise ConfigError(f"{where} must be a list of {opt.length} numbers such as [0.9, 0.999], got {value!r}")
        value = [float(v) for v in value]
    elif kind == "dict":
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table such as {{warmup_steps = 500}}, got {value!r}")
        value = dict(value)
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, opt.choices))}, got {value!r}")
    if opt.range is not None:
        try:
            if isinstance(value, list):
                for v in value:
                    if not opt.range.contains(v):
                        raise OptionRangeError(f"{given(opt.key, value, source)} is out of range: each of "
                                               f"{opt.key} must be {opt.range.text()}")
            else:
                check(opt.key, value, opt.range, source)
        except OptionRangeError as e:
            raise ConfigError(str(e)) from None
    return value


def resolve_config(config: dict[str, Any] | None = None, source: str = "arguments") -> dict[str, Any]:
    """Defaults filled in and every value checked: the configuration a run is built from.

    Args:
        config: any subset of the keys of ``OPTIONS``; None values mean "use the default".
        source: where the values came from, for error messages ("run.toml", "arguments").

    Returns:
        A new dict with every key.

    Raises:
        ConfigError: an unknown key or a bad value (the message names both).
    """
    out = default_config()
    for key, value in (config or {}).items():
        if key not in OPTION_BY_KEY:
            raise _unknown_key(key, source)
        if value is None and OPTION_BY_KEY[key].default is not None:
            continue
        out[key] = _check_value(OPTION_BY_KEY[key], value, source)
    if out["name"] is not None and (not out["name"] or "/" in out["name"] or out["name"] in (".", "..")):
        raise ConfigError(f"name must be a plain folder name without '/', got {out['name']!r}")
    if out["device"] != "auto" and not (out["device"] == "cpu" or out["device"].startswith("cuda")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {out['device']!r}")
    try:
        check_schedule_params(out["schedule"], out["schedule_params"], source)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run configuration from a TOML file (flat keys; the section headers written by
    ``dump_toml`` are accepted too and flattened).

    Raises:
        ConfigError: the file is missing, not TOML, holds an unknown key, a key twice (at the top level and
            in a section, or in two sections) or a value out of its range (each message names the file).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read configuration file {path}: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    places: dict[str, str] = {}
    for key, value in data.items():
        is_section = key in GROUP_TITLES and isinstance(value, dict) and (
            key not in OPTION_BY_KEY or OPTION_BY_KEY[key].kind != "dict")
        place = f"section [{key}]" if is_section else "the top level"
        for k, v in (value.items() if is_section else [(key, value)]):
            if k in flat:
                raise ConfigError(f"{path}: key {k!r} is given twice, at {places[k]} and in {place}; keep one "
                                  f"of them")
            flat[k], places[k] = v, place
    for key in flat:
        if key not in OPTION_BY_KEY:
            raise _unknown_key(key, str(path))
    for key, value in flat.items():
        _check_value(OPTION_BY_KEY[key], value, str(path))  # the file named in any error; values kept as read
    if isinstance(flat.get("schedule_params"), dict):
        try:
            check_schedule_params(flat.get("schedule", "constant"), flat["schedule_params"], str(path))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return flat


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "_-" for c in key):
        return key
    return _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            if ch == '"':
                out.append('\\"')
            elif ch == "\\":
                out.append("\\\\")
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\t":
                out.append("\\t")
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}" if items else "{}"
    raise ConfigError(f"cannot write {type(value).__name__} value {value!r} to TOML")


def dump_toml(config: dict[str, Any], header: str = "") -> str:
    """TOML text for a configuration: flat keys in groups with comments; None values are left out
    (reading the file back gives the same resolved configuration)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    for group, title in GROUP_TITLES.items():
        opts = [o for o in OPTIONS if o.group == group and config.get(o.key) is not None]
        if not opts:
            continue
        if lines:
            lines.append("")
        lines.append(f"# {title}")
        for o in opts:
            lines.append(f"{o.key} = {_toml_value(config[o.key])}  # {o.help}")
    extra = [k for k in config if k not in OPTION_BY_KEY]
    if extra:
        raise ConfigError(f"unknown configuration keys {extra}")
    return "\n".join(lines) + "\n"
