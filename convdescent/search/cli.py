"""Commands ``convdescent lr-find``, ``convdescent search`` and ``convdescent compare``."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
from pathlib import Path

from ..argparsing import command_name
from ..cli import add_option_argument, positive_float, positive_int
from ..options import COUNT, HYPERPARAMETERS, SEED, UNIT_OPEN, Range, number_type

# Configuration keys every command takes as flags (what is trained, on what data, how).
RUN_KEYS = ("model", "loss", "label_smoothing", "dataset", "data_dir", "val_split", "split_seed", "normalize",
            "augment", "epochs", "seed", "device", "precision", "eval_batch_size")
# What lr-find's sweep uses of them: not the length of a run, its precision or its evaluation batches.
LR_FIND_RUN_KEYS = tuple(k for k in RUN_KEYS if k not in ("epochs", "precision", "eval_batch_size"))
# Keys lr-find takes as plain settings of the optimizer being swept: every hyperparameter of the schema
# but the learning rate, which the sweep sets.
OPTIMIZER_SETTINGS = tuple(h.name for h in HYPERPARAMETERS if h.name != "lr")
LR_FIND_OPT_KEYS = ("batch_size", "optimizer", *OPTIMIZER_SETTINGS)
# Keys a search can vary (each flag takes a range, a list or a single value): the schema's hyperparameters
# that are numbers or switches, the optimizer, the batch size and the schedule.
SEARCH_DIMENSIONS = ("lr", "optimizer", *(h.name for h in HYPERPARAMETERS if h.name != "lr" and h.kind != "floats"),
                     "batch_size", "schedule")
SEARCH_HELP = {**{h.name: h.help for h in HYPERPARAMETERS}, "optimizer": "optimizer names",
               "batch_size": "images per step", "schedule": "learning-rate schedule names"}
SEARCH_EXAMPLES = {**{h.name: h.example for h in HYPERPARAMETERS}, "optimizer": "sgd,adam",
                   "batch_size": "32,64,128", "schedule": "constant,cosine"}


def _key_spec(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"must look like KEY=RANGE_OR_LIST (e.g. label_smoothing=0:0.2), got {text!r}")
    key, spec = text.split("=", 1)
    return key.strip().replace("-", "_"), spec.strip()


def _add_config_flags(parser: argparse.ArgumentParser, keys, title: str) -> None:
    """One flag per configuration key, typed as ``convdescent train`` types it."""
    from ..train.config import OPTION_BY_KEY

    g = parser.add_argument_group(title)
    for key in keys:
        add_option_argument(g, OPTION_BY_KEY[key])


def _base_config(args, keys) -> dict:
    """The --config file's settings with the given flags over them."""
    from ..train.config import load_toml

    cfg: dict = {}
    if getattr(args, "config", None):
        cfg.update(load_toml(args.config))
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    return cfg


def train_command(args, keys, **override) -> str:
    """The ``convdescent train`` command with the settings this command was given, ready to run from here."""
    from ..train.config import OPTION_BY_KEY

    words = [command_name(), "train"]
    if getattr(args, "config", None):
        words += ["--config", shlex.quote(str(args.config))]
    given = {k: getattr(args, k, None) for k in keys}
    given.update(override)
    for key, value in given.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if OPTION_BY_KEY[key].kind == "bool":
            words.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            words += [flag, ",".join(map(str, value))]
        elif isinstance(value, float):
            words += [flag, f"{value:.3g}"]
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def _default_out(kind: str) -> Path:
    from ..train.run import default_runs_dir

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return default_runs_dir() / f"{stamp}-{kind}"


# ----------------------------------------------------------------------------------------------- lr-find

def cmd_lr_find(args) -> int:
    from ..train.checkpoint import atomic_write_text
    from ..train.config import resolve_config
    from ..train.run import build_run, resolve_device
    from .lr_find import lr_find
    from .trials import subset_dataset

    cfg = resolve_config(_base_config(args, LR_FIND_RUN_KEYS + LR_FIND_OPT_KEYS), source="arguments")
    if cfg["batch_size"] == "full":
        raise ValueError("batch_size must be a number for the range test (it needs many steps), got 'full'")
    cfg["device"] = resolve_device(cfg["device"])
    from ..data import load_dataset

    dataset = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"], val_split=cfg["val_split"],
                           seed=cfg["split_seed"], progress=False)
    dataset = subset_dataset(dataset, args.train_subset, seed=cfg["split_seed"])
    _, _, model, loss, _, loader, _ = build_run(cfg, dataset)
    name = cfg["optimizer"]
    hp = {k: cfg[k] for k in OPTIMIZER_SETTINGS if cfg.get(k) is not None}
    if "betas" in hp:
        hp["betas"] = tuple(hp["betas"])
    print(f"Range test: {cfg['model']} on {dataset.name} ({len(dataset.x_train)} training images), {name}, "
          f"batch {cfg['batch_size']}, lr {args.start:g} -> {args.end:g} over {args.steps} steps",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    result = lr_find(model, loss, loader, name, start_lr=args.start, end_lr=args.end, num_steps=args.steps,
                     beta=args.beta, diverge_factor=args.diverge, skip_start=args.skip_start, **hp)
    out = Path(args.out) if args.out else _default_out("lr-find")
    out.mkdir(parents=True, exist_ok=True)
    plot = result.plot(out / "lr_find.png")
    data = result.to_dict()
    data["config"] = {k: v for k, v in cfg.items() if v is not None}
    data["train_subset"] = args.train_subset
    data["plot"] = plot
    atomic_write_text(out / "lr_find.json", json.dumps(data, indent=2) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in data.items() if k not in ("lrs", "losses", "smoothed")}, indent=2))
    else:
        print(result.report())
        print(f"Plot: {plot}\nData: {out / 'lr_find.json'}")
        if result.recommended_lr is not None:
            print(f"Train with it: {train_command(args, LR_FIND_RUN_KEYS + LR_FIND_OPT_KEYS, lr=result.recommended_lr)}")
    return 0 if result.recommended is not None else 1


def _add_lr_find(sub) -> None:
    p = sub.add_parser("lr-find", help="learning-rate range test: sweep the lr, suggest one with reasons",
                       description="The learning-rate range test (Smith 2015): train for --steps mini-batches while "
                                   "the learning rate grows geometrically from --start to --end, smooth the loss "
                                   "(EMA, --beta), stop when it exceeds --diverge times its best or is NaN/Inf, and "
                                   "print the suggestions of three rules (valley, steepest, min/10) with the "
                                   "recommended one and why. The model and optimizer state are restored afterwards. "
                                   "Exit status 1 when no rule found a usable learning rate.")
    p.add_argument("--config", metavar="TOML", help="take model, data and optimizer settings from a run "
                   "configuration (flags override)")
    _add_config_flags(p, LR_FIND_RUN_KEYS, "What is trained")
    _add_config_flags(p, LR_FIND_OPT_KEYS, "Optimizer swept")
    g = p.add_argument_group("Sweep")
    g.add_argument("--start", type=positive_float, default=1e-7, help="first learning rate (default 1e-7)")
    g.add_argument("--end", type=positive_float, default=10.0, help="last learning rate (default 10)")
    g.add_argument("--steps", type=number_type("steps", Range(5, integer=True)), default=100,
                   help="mini-batches of the sweep, at least 5 (default 100)")
    g.add_argument("--beta", type=number_type("beta", UNIT_OPEN), default=0.98,
                   help="decay of the loss's moving average (default 0.98)")
    g.add_argument("--diverge", type=number_type("diverge", Range(1.0, low_open=True)), default=4.0,
                   help="stop when the smoothed loss exceeds this times its best (default 4)")
    g.add_argument("--skip-start", type=number_type("skip_start", Range(0.0, 0.5, high_open=True)), default=0.1,
                   help="fraction of the first steps the rules ignore as early noise (default 0.1)")
    g.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                   help="draw batches from a random subset of N training images")
    o = p.add_argument_group("Output")
    o.add_argument("--out", metavar="DIR", help="folder for lr_find.png and lr_find.json "
                   "(default: runs/<date>-<time>-lr-find)")
    o.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_lr_find)


# ----------------------------------------------------------------------------------------------- search

def search_settings_from_args(args):
    """A SearchSettings from the search command's arguments."""
    from ..train.config import resolve_config
    from .space import SearchSpace, SearchSpaceError, parse_dimension
    from .study import SearchSettings

    base = _base_config(args, RUN_KEYS)
    specs = []
    for key in SEARCH_DIMENSIONS:
        spec = getattr(args, f"dim_{key}")
        if spec is not None:
            specs.append((key, spec))
    for key, spec in args.param:
        specs.append((key, spec))
    if not any(k == "lr" for k, _ in specs) and "lr" not in base:
        specs.insert(0, ("lr", "1e-5:1"))
    dims = []
    for key, spec in specs:
        dim = parse_dimension(key, spec)
        if hasattr(dim, "key") and hasattr(dim, "grid"):
            dims.append(dim)
        else:
            base[key] = dim
    keys = {d.key for d in dims}
    # check the fixed settings and each dimension's values the way a run would
    resolve_config({k: v for k, v in base.items()}, source="arguments")
    for d in dims:
        sample = d.choices if d.choices is not None else (d.low, d.high)
        for v in sample:
            resolve_config({**base, d.key: v}, source=f"--{d.key.replace('_', '-')}")
    if not dims:
        raise SearchSpaceError("nothing varies: give a range or a list, e.g. --lr 1e-4:1e-1")
    if "epochs" not in base:
        base["epochs"] = 2
    out = Path(args.out) if args.out else _default_out(f"search-{args.study}")
    space = SearchSpace(dims, fixed=base)
    trials = args.trials
    if args.sampler in ("random", "tpe") and trials is None:
        trials = 12
    return SearchSettings(space=space, base={k: v for k, v in base.items() if k not in keys}, sampler=args.sampler,
                          trials=trials, grid_points=args.grid_points, pruner=args.pruner,
                          prune_startup=args.prune_startup, prune_warmup=args.prune_warmup, study_name=args.study,
                          storage=args.storage, seed=args.search_seed if args.search_seed is not None
                          else int(base.get("seed", 0) or 0), train_subset=args.train_subset, out=str(out),
                          heartbeat=args.heartbeat, grace=args.grace_period, max_retry=args.max_retry)


def cmd_search(args) -> int:
    from .study import run_search

    settings = search_settings_from_args(args)
    summary = run_search(settings, workers=args.workers, stream=sys.stderr if args.json else None)
    if args.json:
        print(json.dumps(summary, default=str))
        return 0 if summary.get("best_trial") is not None and summary.get("complete", True) else 1
    files = summary["files"]
    if summary.get("best_trial") is not None:
        params = " ".join(f"--{k.replace('_', '-')} {v:.3g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                          for k, v in summary["best_params"].items())
        print(f"Best: trial {summary['best_trial']}, validation accuracy {summary['best_value']:.4f} with {params}")
        print(f"Best configuration: {files['best_config']} ({command_name()} train --config "
              f"{shlex.quote(str(files['best_config']))})")
    else:
        print("No trial completed; see the table for the errors.")
    print(f"Table: {files['table_csv']}, {files['table_md']}; plot: {files['plot']}; summary: "
          f"{Path(settings.out) / 'search.json'}")
    if not summary.get("complete", True):
        print(f"Not complete: {summary['unfinished']} point(s) have no finished trial yet; run the same command "
              f"again to train them")
        return 1
    return 0 if summary.get("best_trial") is not None else 1


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="grid, random or TPE search over lr and other settings (Optuna)",
                       description="Search training settings with Optuna. Each flag of the search space (and "
                                   "--param KEY=SPEC for any other configuration key) takes a range LOW:HIGH (lr, "
                                   "weight decay, eps, clipping and batch size log-uniform; add :lin or :log to "
                                   "choose), a list A,B,C, or a single value. "
                                   "Trials are judged by their best validation accuracy; hopeless ones are pruned "
                                   "from their per-epoch validation accuracy. Writes trials.csv/md, best.toml "
                                   "(for convdescent train --config), trials.png and search.json.")
    p.add_argument("--config", metavar="TOML", help="shared settings from a run configuration (flags override)")
    _add_config_flags(p, RUN_KEYS, "What is trained (shared by every trial)")
    d = p.add_argument_group("Search space")
    for key in SEARCH_DIMENSIONS:
        example = SEARCH_EXAMPLES[key]
        default = " (default 1e-5:1)" if key == "lr" else ""
        d.add_argument("--" + key.replace("_", "-"), dest=f"dim_{key}", metavar="SPEC", default=None,
                       help=f"{SEARCH_HELP[key]}, e.g. {example}{default}")
    d.add_argument("--param", type=_key_spec, action="append", default=[], metavar="KEY=SPEC",
                   help="another configuration key to vary or fix, e.g. label_smoothing=0:0.2 (repeatable)")
    s = p.add_argument_group("Search")
    s.add_argument("--sampler", choices=("grid", "random", "tpe"), default="random",
                   help="grid (every point once), random (log-uniform draws), or tpe (default random)")
    s.add_argument("--trials", type=positive_int, default=None,
                   help="number of trials (random, tpe; default 12); grid: the whole grid")
    s.add_argument("--grid-points", type=positive_int, default=4, help="grid values per range (default 4)")
    s.add_argument("--pruner", choices=("median", "halving", "none"), default="median",
                   help="stop hopeless trials by their per-epoch validation accuracy: median, successive halving, "
                        "or none (default median)")
    s.add_argument("--prune-startup", type=number_type("prune_startup", COUNT), default=3,
                   help="trials that finish before the median pruner acts (default 3)")
    s.add_argument("--prune-warmup", type=number_type("prune_warmup", COUNT), default=1,
                   help="epochs every trial runs before it may be pruned (default 1)")
    s.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                   help="train each trial on a random subset of N training images (quick searches)")
    s.add_argument("--search-seed", type=number_type("search_seed", SEED), default=None, help="seed of the random draws and TPE (default --seed)")
    w = p.add_argument_group("Storage and workers")
    w.add_argument("--storage", default=None, metavar="URL",
                   help="where the study lives: in memory (default), a SQLite file (study.db), an Optuna journal "
                        "file (study.journal) for several local workers, or postgresql://user:pass@host/db for "
                        "workers on several machines")
    w.add_argument("--study", default="convdescent-search",
                   help="study name; workers that give the same name and storage share the trials")
    w.add_argument("--workers", type=positive_int, default=1,
                   help="local worker processes sharing the storage (default 1)")
    w.add_argument("--heartbeat", type=positive_int, default=10, metavar="SECONDS",
                   help="seconds between heartbeats of a running trial in a shared storage (default 10)")
    w.add_argument("--grace-period", type=positive_int, default=60, metavar="SECONDS",
                   help="a trial without a heartbeat for this long belongs to a dead worker and is trained "
                        "again (default 60)")
    w.add_argument("--max-retry", type=number_type("max_retry", COUNT), default=3, metavar="N",
                   help="times a point whose worker died is trained again (default 3)")
    p.add_argument("--out", metavar="DIR", help="results folder (default runs/<date>-<time>-search-<study>)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object (progress on stderr)")
    p.set_defaults(func=cmd_search)


# ----------------------------------------------------------------------------------------------- compare

def cmd_compare(args) -> int:
    from .compare import CompareSettings, parse_lr_grid, run_compare

    base = _base_config(args, RUN_KEYS + ("batch_size",))
    base.pop("epochs", None)
    for key in ("lr", "optimizer", "out", "name"):  # chosen per run by the comparison
        base.pop(key, None)
    from ..train.config import resolve_config

    resolve_config(base, source="arguments")
    out = Path(args.out) if args.out else _default_out("compare")
    settings = CompareSettings(optimizers=[o for o in args.optimizers.split(",") if o.strip()], base=base,
                               epochs=args.epochs if args.epochs is not None else 5, tune_epochs=args.tune_epochs,
                               seeds=args.seeds, lr_grid=parse_lr_grid(args.lr_grid) if args.lr_grid else None,
                               grid_points=args.grid_points, target=args.target, train_subset=args.train_subset,
                               out=str(out))
    summary = run_compare(settings, stream=sys.stderr if args.json else None)
    if args.json:
        print(json.dumps(summary, default=str))
    return 0 if any(r["test_acc_mean"] is not None for r in summary["rows"]) else 1


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare optimizers, each at its tuned learning rate, over seeds",
                       description="Train the same model on the same data with several optimizers. Each one's "
                                   "learning rate is tuned on a log grid with short runs, then the best is rerun "
                                   "with --seeds seeds (the DeepOBS protocol). Reports the mean and standard "
                                   "deviation of the final test accuracy, epochs and seconds to a target "
                                   "validation accuracy, and all curves, as report.html, compare.md and "
                                   "compare.json.")
    p.add_argument("--config", metavar="TOML", help="shared settings from a run configuration (flags override)")
    p.add_argument("--optimizers", default="sgd,momentum,rmsprop,adam,adamw",
                   help="comma-separated optimizers: names, the aliases momentum and nesterov, or "
                        "name:key=value (e.g. sgd:momentum=0.5) (default sgd,momentum,rmsprop,adam,adamw)")
    _add_config_flags(p, RUN_KEYS + ("batch_size",), "What is trained (shared by every run)")
    c = p.add_argument_group("Protocol")
    c.add_argument("--tune-epochs", type=positive_int, default=2, help="epochs of each tuning run (default 2)")
    c.add_argument("--lr-grid", default=None, metavar="SPEC",
                   help="learning rates tried for every optimizer: LOW:HIGH:POINTS (log-spaced) or a list; "
                        "default: --grid-points values over 3 decades around each optimizer's usual rate")
    c.add_argument("--grid-points", type=positive_int, default=5, help="points of the default grids (default 5)")
    c.add_argument("--seeds", type=positive_int, default=3, help="seeds of the final runs (default 3)")
    c.add_argument("--target", type=number_type("target", Range(0.0, 1.0, low_open=True)), default=None,
                   help="target validation accuracy for epochs/seconds to target (default 0.9 x the best mean)")
    c.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                   help="train every run on a random subset of N training images (quick comparisons)")
    p.add_argument("--out", metavar="DIR", help="results folder (default runs/<date>-<time>-compare)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object (progress on stderr)")
    p.set_defaults(func=cmd_compare)


def register(subparsers) -> None:
    """Add lr-find, search and compare to the ``convdescent`` command."""
    _add_lr_find(subparsers)
    _add_search(subparsers)
    _add_compare(subparsers)
