"""The ``convdescent`` command: train, evaluate, predict, report, runs, optimizers, data, and the command
groups other modules register (``COMMAND_MODULES``).

Every command returns its exit status: 0 on success, 2 for bad arguments, data, configuration or
checkpoints (one ``convdescent: error: ...`` line, no traceback), 3 when training stopped on non-finite
values, 128 + the signal number when SIGINT/SIGTERM interrupted training.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

from .argparsing import CommandParser, command_name, hidden_alias
from .options import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_COUNT, number_type

# Modules that add their own command groups; each exposes register(subparsers) (the data module's is
# add_data_parser) and sets func(args) -> exit status on its parsers.
COMMAND_MODULES = ["convdescent.data.cli", "convdescent.diagnostics.cli", "convdescent.search.cli",
                   "convdescent.model_cli"]

EXIT_ERROR = 2
EXIT_NONFINITE = 3


class CliError(Exception):
    """A problem with the command's input, reported as one line."""


# ----------------------------------------------------------------------------------------------- flag types

def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _mark(fn, rng):
    fn.range = rng  # read by the tests that walk every numeric flag
    return fn


positive_int = _mark(positive_int, POSITIVE_COUNT)
non_negative_int = _mark(non_negative_int, COUNT)
positive_float = _mark(positive_float, POSITIVE)

CHECKPOINTS = ("best", "last")
DEFAULT_CHECKPOINT = "best"


def add_checkpoint_argument(p) -> None:
    """``--checkpoint best|last``, the same flag and default on every command that loads a run's weights."""
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default=DEFAULT_CHECKPOINT,
                   help="which of the run's checkpoints to load: best (the best monitored epoch) or last")


def add_device_argument(p) -> None:
    """``--device auto|cpu|cuda|cuda:N`` for commands that run a trained model (auto: the GPU when there is one)."""
    p.add_argument("--device", default="auto", help="where the model runs: auto (a CUDA GPU when torch sees one, "
                   "else the CPU), cpu, cuda or cuda:N")


def _device(args) -> str:
    from .train.config import ConfigError
    from .train.run import resolve_device

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise CliError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    try:
        return resolve_device(args.device)
    except ConfigError as e:
        raise CliError(str(e)) from None


def add_run_dir_argument(p, nargs=None) -> None:
    """The run directory, given the same way on every command: the first positional argument RUN_DIR."""
    kw = {"nargs": nargs} if nargs else {}
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by 'convdescent train'", **kw)


# ----------------------------------------------------------------------------------------------- train flags

def _count(text: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an image count or a fraction, got {text!r}") from None


def _floats(text: str):
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers such as 0.9,0.999, got {text!r}") from None


def _ints(text: str):
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 3000,6000, got {text!r}") from None


def _scalar(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if "," in text:
        return [_scalar(t) for t in text.split(",") if t]
    return text


def _key_value(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"must look like KEY=VALUE (e.g. warmup_steps=500), got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise argparse.ArgumentTypeError(f"must look like KEY=VALUE, got {text!r}")
    return key, _scalar(value.strip())


# Schedule parameters with flags of their own on ``convdescent train`` (each typed and range-checked as the
# schedule declares it, see ``convdescent.optim.schedules.SCHEDULE_SPECS``); ``--schedule-param`` sets any other.
SCHEDULE_FLAGS = ("warmup_steps", "warmup_epochs", "decay_steps", "step_size", "gamma", "milestones")


def _schedule_flag_type(name: str):
    """The argparse type of a schedule-parameter flag: its declared type and range."""
    from .optim.schedules import schedule_param

    if name.endswith("_epochs"):
        return number_type(name, NON_NEGATIVE, integer=False)
    p = schedule_param(name)
    if p.kind == "ints":
        def ints(text: str):
            values = _ints(text)
            for v in values:
                if not p.range.contains(v):
                    raise argparse.ArgumentTypeError(f"{text} is out of range: each of {name} must be "
                                                     f"{p.range.text()}")
            return values

        ints.range, ints.option, ints.items = p.range, name, True
        return ints
    return number_type(name, p.range, integer=p.kind == "int")


def _ranged_floats(o):
    """The argparse type of a list option such as --betas: comma-separated numbers, each in its range."""

    def parse(text: str):
        values = _floats(text)
        if o.length and len(values) != o.length:
            raise argparse.ArgumentTypeError(f"must be {o.length} comma-separated numbers such as 0.9,0.999, "
                                             f"got {text!r}")
        for v in values:
            if not o.range.contains(v):
                raise argparse.ArgumentTypeError(f"{text} is out of range: each of {o.key} must be {o.range.text()}")
        return values

    parse.range, parse.option, parse.items = o.range, o.key, True
    return parse


def _ranged_batch(o):
    def parse(text: str):
        if text == "full":
            return text
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive integer or 'full', got {text!r}") from None
        if not o.range.contains(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {o.key} must be {o.range.text()} or 'full'")
        return value

    parse.range, parse.option = o.range, o.key
    return parse


def _ranged_count(o):
    def parse(text: str):
        value = _count(text)
        if isinstance(value, float):
            if not 0.0 <= value < 1.0:
                raise argparse.ArgumentTypeError(f"{text} is out of range: {o.key} as a fraction must be in [0, 1)")
        elif not o.range.contains(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {o.key} must be {o.range.text()} or a "
                                             f"fraction in [0, 1)")
        return value

    parse.range, parse.option = o.range, o.key
    return parse


def add_option_argument(group, o) -> None:
    """Add the flag ``--<key>`` of a configuration option to an argparse group (default None: unset); a
    number is checked against the option's range as the flag is read."""
    kw: dict = {"dest": o.key, "default": None}
    shown = f" (default: {o.default})" if o.default not in (None, "", {}) else ""
    if o.kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif o.kind in ("int", "float"):
        kw["type"] = number_type(o.key, o.range, integer=o.kind == "int") if o.range is not None else \
            (int if o.kind == "int" else float)
    elif o.kind == "batch":
        kw["type"] = _ranged_batch(o)
        kw["metavar"] = "N|full"
    elif o.kind == "count":
        kw["type"] = _ranged_count(o)
    elif o.kind == "floats":
        kw["type"] = _ranged_floats(o)
        kw["metavar"] = "B1,B2"
    else:
        kw["type"] = str
    if o.choices:
        kw["choices"] = o.choices
    if o.key == "early_stopping":
        kw["metavar"] = "PATIENCE"
    group.add_argument("--" + o.key.replace("_", "-"), help=o.help + shown, **kw)


def _plateau_type(name: str):
    """The argparse type of --reduce-on-plateau / --plateau-factor: the reduce_on_plateau parameter's range."""
    from .optim.schedules import schedule_param

    p = schedule_param(name, "reduce_on_plateau")
    return number_type(name, p.range, integer=p.kind == "int")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The train flags: one per configuration key (``--batch-size`` is ``batch_size``), plus the
    schedule-parameter shortcuts and the display switches."""
    from .train.config import GROUP_TITLES, OPTIONS

    p.add_argument("--config", metavar="TOML", help="read settings from a TOML file; flags override them")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--allow-change", metavar="KEY", action="append", default=[],
                   help="with --resume: let setting KEY differ from what the checkpoint was trained with "
                        "(repeatable; other differences are refused)")
    groups = {g: p.add_argument_group(title) for g, title in GROUP_TITLES.items()}
    for o in OPTIONS:
        if o.key in ("schedule_params", "init_checkpoint"):  # init_checkpoint: --checkpoint below
            continue
        add_option_argument(groups[o.group], o)
    groups["model"].add_argument("--model-file", metavar="TOML", help="train the network of a TOML model file "
                                 "('convdescent models --show NAME --toml' prints one) instead of --model")
    groups["model"].add_argument("--checkpoint", dest="init_checkpoint", choices=CHECKPOINTS,
                                 default=DEFAULT_CHECKPOINT, help="with --init-from: which checkpoint's weights")
    g = groups["optimizer"]
    for flag in SCHEDULE_FLAGS:
        g.add_argument("--" + flag.replace("_", "-"), dest=f"sched_{flag}", type=_schedule_flag_type(flag),
                       default=None, help=f"schedule parameter {flag}")
    g.add_argument("--reduce-on-plateau", dest="sched_plateau", type=_plateau_type("patience"), metavar="PATIENCE",
                   default=None, help="use the reduce_on_plateau schedule: cut the rate after PATIENCE epochs "
                                      "without improvement of the validation loss")
    g.add_argument("--plateau-factor", dest="sched_plateau_factor", type=_plateau_type("factor"), default=None,
                   help="factor of the reduce_on_plateau cut (default 0.1)")
    g.add_argument("--schedule-param", dest="schedule_param", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="any schedule parameter, e.g. --schedule-param alpha=0.01 (repeatable)")
    d = p.add_argument_group("Display")
    mode = d.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true", help="print only the final summary")
    mode.add_argument("--json", dest="json_lines", action="store_true",
                      help="print epoch records, events and the summary as JSON objects, one per line")
    hidden_alias(mode, "--json-lines", dest="json_lines", action="store_true")
    d.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write report.html at the end ('convdescent report RUN_DIR' writes it later)")


def train_config_from_args(args) -> dict:
    """The configuration given on the command line: the --config file, then the flags over it."""
    from .train.config import OPTIONS, load_toml

    cfg: dict = {}
    if args.config:
        cfg.update(load_toml(args.config))
    for o in OPTIONS:
        value = getattr(args, o.key, None)
        if value is not None:
            cfg[o.key] = value
    if getattr(args, "model_file", None):
        if args.model is not None:
            raise CliError(f"give --model or --model-file, not both (got --model {args.model} --model-file "
                           f"{args.model_file})")
        cfg["model"] = "file:" + str(Path(args.model_file).resolve())
    params = dict(cfg.get("schedule_params") or {})
    for flag in SCHEDULE_FLAGS:
        value = getattr(args, f"sched_{flag}", None)
        if value is not None:
            params[flag] = value
    if args.sched_plateau is not None:
        if cfg.get("schedule", "constant") not in ("constant", "reduce_on_plateau"):
            raise CliError(f"--reduce-on-plateau conflicts with --schedule {cfg['schedule']}; give one of them")
        cfg["schedule"] = "reduce_on_plateau"
        params["patience"] = args.sched_plateau
    if args.sched_plateau_factor is not None:
        params["factor"] = args.sched_plateau_factor
    for key, value in args.schedule_param:
        _check_schedule_param(key, value, cfg.get("schedule"))
        params[key] = value
    if params:
        cfg["schedule_params"] = params
    if args.epochs is not None and args.steps is not None:
        raise CliError(f"give --epochs or --steps, not both (got --epochs {args.epochs} --steps {args.steps})")
    if args.epochs is not None:
        cfg.pop("steps", None)
        cfg["epochs"] = args.epochs
    return cfg


def _check_schedule_param(key: str, value, schedule: str | None) -> None:
    """A ``--schedule-param KEY=VALUE`` of a declared parameter, checked as the flag's own would be."""
    from .optim.schedules import schedule_param
    from .options import OptionRangeError

    p = schedule_param(key, schedule)
    if p is None:
        return  # an unknown name is reported with the schedule's parameters when the optimizer is built
    try:
        p.check(value)
    except OptionRangeError:
        raise CliError(f"--schedule-param {key}={value!r} is out of range: {key} must be {p.range.text()}") from None
    except ValueError as e:
        raise CliError(f"--schedule-param {key}: {e}") from None


def _launch_count(args, config: dict) -> int:
    """How many local workers ``convdescent train`` starts: --nproc (or the config's nproc, or the resumed
    run's); 1 inside a worker that torchrun or the launcher started."""
    if os.environ.get("WORLD_SIZE"):
        return 1
    if config.get("nproc") is not None:
        return int(config["nproc"])
    if args.resume:
        from .train.config import ConfigError, load_toml

        try:
            recorded = load_toml(Path(args.resume) / "config.toml")
        except ConfigError:
            return 1
        value = recorded.get("nproc", 1)
        return value if isinstance(value, int) and value >= 1 else 1
    return 1


def cmd_train(args) -> int:
    from .train.run import train_from_config
    from .train.trainer import NonFiniteError, TrainingInterrupted

    display = "quiet" if args.quiet else "json" if args.json_lines else "auto"
    config = train_config_from_args(args)
    nproc = _launch_count(args, config)
    if nproc > 1:
        from .distributed.launch import launch_local

        argv = list(getattr(args, "argv", None) or sys.argv[1:])
        if config.get("nproc") is None:
            argv += ["--nproc", str(nproc)]
        return launch_local(argv, nproc, config.get("threads"))
    try:
        if args.resume:
            result = train_from_config(config, resume=args.resume, display=display, allow_change=args.allow_change)
        else:
            result = train_from_config(config, display=display, allow_change=args.allow_change)
    except NonFiniteError as e:
        if getattr(e, "quiet_rank", False):
            return EXIT_NONFINITE  # rank 0 reports the stop and writes the report
        if args.report and getattr(e, "run_dir", None) is not None:
            _write_report(e.run_dir)  # the curves up to the blow-up are what the user needs to see
        print(f"convdescent: training stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except TrainingInterrupted as e:
        if getattr(e, "quiet_rank", False):
            return 128 + e.signum
        run_dir = getattr(e, "run_dir", None) or args.resume or "RUN_DIR"
        print(f"convdescent: {e.signal_name} received: stopped after step {e.step} (epoch {e.epoch}); a "
              f"checkpoint was written. Continue with: {command_name()} train --resume {shlex.quote(str(run_dir))}", file=sys.stderr)
        return 128 + e.signum  # an interrupted run exits promptly, without a report
    if args.report and _writes_run_dir():
        _write_report(result.run_dir)
    return 0


def _writes_run_dir() -> bool:
    """Whether this process writes the run directory: a single process, or rank 0 of a data-parallel run."""
    from .distributed import world_from_env

    return world_from_env().is_main


def _write_report(run_dir) -> None:
    """report.html of a run that has stopped; a failure is a warning, never the loss of a finished run."""
    from .report import build_report

    try:
        build_report(Path(run_dir))
    except Exception as e:  # a broken figure must not turn a finished run into a failed command
        print(f"convdescent: warning: report.html could not be written: {e}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- evaluate / predict

def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "data"


def cmd_evaluate(args) -> int:
    from .data import load_dataset
    from .train.checkpoint import atomic_write_bytes
    from .train.evaluation import (EVALUATION_FILE, confusion_png, evaluate_model, format_evaluation,
                                   save_evaluation)
    from .train.run import load_run

    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=_device(args))
    name = args.dataset or run.dataset
    same = name == run.dataset
    cfg = run.config
    data = load_dataset(name, data_dir=args.data_dir or cfg.get("data_dir"),
                        val_split=cfg["val_split"] if same else (0 if args.split == "test" else cfg["val_split"]),
                        seed=cfg.get("split_seed", 0))
    if tuple(data.input_shape) != tuple(run.model.input_shape):
        raise CliError(f"dataset {name} has images of shape {tuple(data.input_shape)}, the model of "
                       f"{run.path} takes {tuple(run.model.input_shape)}")
    if data.num_classes != len(run.classes):
        raise CliError(f"dataset {name} has {data.num_classes} classes, the model of {run.path} predicts "
                       f"{len(run.classes)}")
    x, y = data.split(args.split)
    if len(x) == 0:
        raise CliError(f"dataset {name} has no {args.split} images"
                       + ("; the run used val_split 0" if args.split == "val" else ""))
    ev = evaluate_model(run.model, run.loss(), x, y, run.normalizer, len(run.classes), cfg["eval_batch_size"])
    title = f"{run.path.name}: {args.checkpoint} checkpoint ({run.checkpoint}.pt) on {name} {args.split}"
    if args.json:
        print(json.dumps({"run": str(run.path), "checkpoint": run.checkpoint, "dataset": name, "split": args.split,
                          "loss": ev["loss"], "acc": ev["acc"], "n": ev["n"],
                          "per_class_acc": {c: (None if math.isnan(a) else a)
                                            for c, a in zip(run.classes, ev["per_class_acc"].tolist())},
                          "confusion": ev["confusion"].tolist()}))
    else:
        print(format_evaluation(ev, run.classes, title))
    if args.out:
        png_path = Path(args.out)
    elif same and args.split == "test":
        png_path = run.path / "confusion.png"
    else:
        png_path = run.path / f"confusion-{_safe(name)}-{args.split}.png"
    atomic_write_bytes(png_path, confusion_png(ev["confusion"], run.classes, title))
    if same and args.split == "test" and not (run.path / EVALUATION_FILE).exists():
        save_evaluation(run.path / EVALUATION_FILE, ev, "test", name)
    if not args.json:
        print(f"\nconfusion matrix written to {png_path}")
    return 0


def cmd_predict(args) -> int:
    from .train.evaluation import predict_files
    from .train.run import load_run

    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=_device(args))
    results = predict_files(run.model, run.normalizer, run.classes, args.images, top_k=args.top_k, strict=args.strict)
    for r in results:
        if args.json:
            print(json.dumps({"path": r["path"], "top": [{"class": c, "probability": p} for c, p in r["top"]],
                              "notes": r["notes"]}))
            continue
        for note in r["notes"]:
            print(f"note: {r['path']}: {note}", file=sys.stderr)
        ranked = "  ".join(f"{i + 1}. {c} {p:.3f}" for i, (c, p) in enumerate(r["top"]))
        print(f"{r['path']}: {ranked}")
    return 0


# ----------------------------------------------------------------------------------------------- report / runs

def cmd_report(args) -> int:
    from .report import build_report

    path = build_report(Path(args.run_dir), args.out)
    if args.json:
        print(json.dumps({"run": str(args.run_dir), "report": str(path)}))
    else:
        print(f"report written to {path}")
    return 0


def _cell(v, spec=".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def cmd_runs(args) -> int:
    from .train.run import default_runs_dir, list_runs

    root = Path(args.out) if args.out else default_runs_dir()
    rows = list_runs(root)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print(f"no runs in {root}")
        return 0
    table = [("run", "status", "model", "dataset", "epochs", "best val_acc", "test acc", "wall time")]
    for r in rows:
        wall = r.get("wall_time_s")
        table.append((r["run"], str(r.get("status") or "-"), str(r.get("model") or "-"), str(r.get("dataset") or "-"),
                      r["epochs"], _cell(r.get("best_val_acc")), _cell(r.get("test_acc")),
                      "-" if wall is None else f"{wall:.0f}s"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        print("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{len(rows)} run(s) in {root}")
    return 0


def cmd_optimizers(args) -> int:
    from .optim import list_optimizers_text

    if args.json:
        from .optim.aliases import OPTIMIZERS, SCHEDULES

        print(json.dumps({"optimizers": {n: {"defaults": e.defaults, "description": e.description}
                                         for n, e in OPTIMIZERS.items()},
                          "schedules": {n: {"defaults": e.defaults, "description": e.description}
                                        for n, e in SCHEDULES.items()}}, default=str))
        return 0
    print(list_optimizers_text())
    return 0


# ----------------------------------------------------------------------------------------------- parser

def _register_modules(sub) -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that command group is not part of this installation
            raise
        register = getattr(mod, "register", None) or getattr(mod, "add_data_parser", None)
        if register is None:
            raise RuntimeError(f"{name} is listed in COMMAND_MODULES but has no register(subparsers)")
        register(sub)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command."""
    from . import __version__

    ap = CommandParser(prog="convdescent", description="Train convolutional networks by gradient "
                                 "descent with explicit, verified, observable gradients.")
    ap.add_argument("--version", action="version", version=f"convdescent {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a model and write a run directory",
                       description="Train a model. Every setting is a flag or a key of a TOML file given with "
                                   "--config (flags win); the resolved settings are saved as config.toml in "
                                   "the run directory.")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test loss, accuracy, per-class accuracy and confusion matrix of a run")
    add_run_dir_argument(p)
    p.add_argument("--dataset", help="evaluate on another dataset (default: the run's)")
    p.add_argument("--data-dir", help="folder searched first for the dataset (default: the run's data_dir)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="which split to evaluate")
    add_checkpoint_argument(p)
    add_device_argument(p)
    p.add_argument("--out", metavar="PNG", help="where to write the confusion-matrix PNG (default "
                   "RUN_DIR/confusion.png for the run's test set, else RUN_DIR/confusion-DATASET-SPLIT.png)")
    hidden_alias(p, "--output", dest="out")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k classes of image files with a trained run")
    add_run_dir_argument(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top-k", type=positive_int, default=3, help="classes shown per image")
    add_checkpoint_argument(p)
    add_device_argument(p)
    p.add_argument("--strict", action="store_true",
                   help="refuse images of another size or channel count instead of converting them")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="rebuild a run's report.html")
    add_run_dir_argument(p)
    p.add_argument("--out", metavar="HTML", help="where to write the report (default RUN_DIR/report.html)")
    hidden_alias(p, "--output", dest="out")
    p.add_argument("--json", action="store_true", help="print the written path as a JSON object")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("runs", help="list runs with their key figures")
    p.add_argument("--out", metavar="DIR", help="folder holding the runs, as given to 'train --out' (default "
                   "$CONVDESCENT_RUNS or ./runs)")
    hidden_alias(p, "--dir", dest="out")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("optimizers", help="list optimizers and learning-rate schedules")
    p.add_argument("--json", action="store_true", help="print the optimizers and schedules as one JSON object")
    p.set_defaults(func=cmd_optimizers)

    _register_modules(sub)
    return ap


def known_errors() -> tuple:
    from .data import DataError
    from .distributed import DistributedError
    from .train.checkpoint import CheckpointError
    from .train.config import ConfigError

    return (CliError, ConfigError, CheckpointError, DataError, DistributedError, ValueError, FileNotFoundError,
            ImportError)


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return int(args.func(args) or 0)
    except known_errors() as e:
        if not getattr(e, "quiet_rank", False):  # an error every rank met: rank 0 says it for the run
            message = str(e).strip() or type(e).__name__
            print(f"convdescent: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("convdescent: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (convdescent runs | head): stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
