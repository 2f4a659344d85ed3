"""Grid, random and TPE search over training settings on Optuna, with pruning and shared storages.

Each trial is a training run. A study lives in an Optuna storage: in memory (one process), a SQLite file
or a journal file (several processes on one machine, ``workers``), or a PostgreSQL URL (processes on
several machines that run the same command with the same study name).

Exactly once: for grid and random search the whole list of points is known before the first trial (the
grid, or the draws of Optuna's RandomSampler from the search seed), so it is queued in the study as waiting
trials, each tagged with its point. Workers claim waiting trials with the storage's atomic
WAITING -> RUNNING transition (two workers cannot both win it), so no point is claimed twice. If two
processes queued the list at the same moment, a point may be queued twice; a worker that claims a copy
whose point has a lower-numbered trial marks it as a duplicate (FAIL, ``duplicate_of``) without training,
so the lowest-numbered copy is the only one that runs. TPE proposes points one by one from the finished
trials, so it cannot be queued; its workers stop at ``trials`` trials (a trial numbered past the budget in
a race is closed unrun as ``over_budget``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from .space import SearchSpace, point_key

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "halving", "none")
STUDY_ATTR = "convdescent_search"  # the study's definition, so workers joining later can check they match


class SearchError(ValueError):
    """A search is set up wrongly (storage, study name, sampler); the message says what to do."""


# ----------------------------------------------------------------------------------------------- storage

def storage_kind(spec: str | None) -> str:
    """"memory", "sqlite", "journal" or "rdb" (another database URL) for a --storage value."""
    if spec is None or spec in ("", "memory", ":memory:"):
        return "memory"
    s = str(spec)
    if s.startswith("sqlite:///"):
        return "sqlite"
    if s.startswith("journal:"):
        return "journal"
    if "://" in s:
        return "rdb"
    suffix = Path(s).suffix.lower()
    if suffix in (".db", ".sqlite", ".sqlite3"):
        return "sqlite"
    if suffix in (".journal", ".log", ".jsonl"):
        return "journal"
    raise SearchError(f"storage {spec!r} is not understood; use a SQLite file (study.db or sqlite:///path), "
                      f"a journal file (study.journal or journal:PATH), or a database URL such as "
                      f"postgresql://user:password@host:5432/dbname")


def storage_url(spec: str | None) -> str | None:
    """The --storage value in a form every worker process can open (absolute paths); None for memory."""
    kind = storage_kind(spec)
    s = str(spec) if spec is not None else None
    if kind == "memory":
        return None
    if kind == "sqlite":
        path = s[len("sqlite:///"):] if s.startswith("sqlite:///") else s
        return "sqlite:///" + str(Path(path).expanduser().resolve())
    if kind == "journal":
        path = s[len("journal:"):] if s.startswith("journal:") else s
        return "journal:" + str(Path(path).expanduser().resolve())
    return s


def open_storage(spec: str | None):
    """Open an Optuna storage from a --storage value.

    Args:
        spec: None or "memory"; "study.db" / "sqlite:///path"; "study.journal" / "journal:PATH";
            "postgresql://user:password@host:port/db" (or any SQLAlchemy URL Optuna's RDB storage takes).

    Returns:
        An ``optuna.storages.BaseStorage``.
    """
    import optuna

    url = storage_url(spec)
    kind = storage_kind(spec)
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        # the open-lock works on every file system, where the default symlink lock needs symlink support
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if kind == "sqlite":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several processes write the file: wait for its lock instead of failing at once
        return _open_rdb(url, engine_kwargs={"connect_args": {"timeout": 120}})
    if url.startswith(("postgresql", "postgres")):
        import importlib.util

        has3, has2 = importlib.util.find_spec("psycopg") is not None, importlib.util.find_spec("psycopg2") is not None
        if not (has3 or has2):
            raise SearchError("a PostgreSQL storage needs a driver: pip install psycopg2-binary "
                              "(or pip install 'convdescent[postgres]')")
        scheme, rest = url.split("://", 1)
        if "+" not in scheme:  # name the installed driver; SQLAlchemy's default differs between versions
            url = ("postgresql+psycopg://" if has3 else "postgresql+psycopg2://") + rest
    return _open_rdb(url)


def _open_rdb(url: str, engine_kwargs: dict | None = None, attempts: int = 6):
    """RDBStorage(url), retried when another process is creating the same tables at this moment.

    Processes that start together on an empty database all try to create Optuna's schema; all but one
    fail on the duplicate table or type, and a moment later the schema is there for them.
    """
    import random

    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except SQLAlchemyError as e:
            if attempt == attempts - 1:
                raise SearchError(f"cannot open the storage {_hide_password(url)}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0]}") from None
            time.sleep(0.5 + random.random() * (attempt + 1))
        except Exception as e:  # a missing driver, a bad URL: one message naming the URL and the cause
            raise SearchError(f"cannot open the storage {_hide_password(url)}: {type(e).__name__}: {e}") from None


def _hide_password(url: str) -> str:
    if "://" in url and "@" in url:
        head, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        return f"{head}://{cred}@{host}"
    return url


# ----------------------------------------------------------------------------------------------- settings

@dataclass
class SearchSettings:
    """Everything that defines a search.

    Attributes:
        space: the dimensions searched.
        base: training settings shared by every trial (keys of ``convdescent train``'s configuration).
        sampler: "grid", "random" or "tpe".
        trials: number of trials (random, tpe); for grid, None means the whole grid.
        grid_points: values per range in a grid.
        pruner: "median", "halving" or "none".
        prune_startup: trials that must finish before the median pruner acts.
        prune_warmup: epochs a trial always runs before it may be pruned.
        study_name: the study's name in the storage.
        storage: the --storage value (None: in memory).
        seed: seed of the random draws and of TPE.
        train_subset: train each trial on this many training images (a seeded random subset), or None.
        out: folder for the results.
    """

    space: SearchSpace
    base: dict[str, Any]
    sampler: str = "random"
    trials: int | None = None
    grid_points: int = 5
    pruner: str = "median"
    prune_startup: int = 3
    prune_warmup: int = 1
    study_name: str = "convdescent-search"
    storage: str | None = None
    seed: int = 0
    train_subset: int | None = None
    out: str = "runs/search"

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise SearchError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise SearchError(f"pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        for name in ("grid_points", "prune_startup", "prune_warmup", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "grid_points" else 0):
                raise SearchError(f"{name} must be a {'positive' if name == 'grid_points' else 'non-negative'} "
                                  f"integer, got {v!r}")
        if self.trials is not None and (isinstance(self.trials, bool) or not isinstance(self.trials, int)
                                        or self.trials < 1):
            raise SearchError(f"trials must be a positive integer, got {self.trials!r}")
        if self.sampler in ("random", "tpe") and self.trials is None:
            raise SearchError(f"the {self.sampler} sampler needs a number of trials, e.g. --trials 12")
        if self.train_subset is not None and (isinstance(self.train_subset, bool)
                                              or not isinstance(self.train_subset, int) or self.train_subset < 1):
            raise SearchError(f"train_subset must be a positive number of images, got {self.train_subset!r}")
        if not self.study_name or not isinstance(self.study_name, str):
            raise SearchError(f"study name must be a non-empty string, got {self.study_name!r}")
        varying = {d.key for d in self.space.dimensions}
        for key in ("out", "name"):
            if key in varying:
                raise SearchError(f"{key} cannot be searched over")
        if self.base.get("val_split", 5000) == 0:
            raise SearchError("a search needs a validation split to judge trials: val_split must not be 0")
        storage_kind(self.storage)

    def points(self) -> list[dict[str, Any]] | None:
        """The list of points to queue (grid, random), or None for TPE."""
        if self.sampler == "grid":
            grid = self.space.grid(self.grid_points)
            if self.trials is not None and self.trials < len(grid):
                raise SearchError(f"the grid has {len(grid)} points but trials={self.trials}; a grid search covers "
                                  f"every point: leave --trials out or shrink the grid")
            return grid
        if self.sampler == "random":
            return self.space.sample(self.trials, self.seed)
        return None

    def identity(self) -> dict[str, Any]:
        """The parts that must agree between processes sharing a study."""
        return {"space": self.space.to_dict(), "base": _jsonable(self.base), "sampler": self.sampler,
                "trials": self.trials, "grid_points": self.grid_points, "pruner": self.pruner,
                "prune_startup": self.prune_startup, "prune_warmup": self.prune_warmup, "seed": self.seed,
                "train_subset": self.train_subset}

    def to_dict(self) -> dict[str, Any]:
        d = self.identity()
        d.update({"study_name": self.study_name, "storage": storage_url(self.storage), "out": str(self.out)})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSettings":
        storage = d.get("storage")
        return cls(space=SearchSpace.from_dict(d["space"]), base=dict(d["base"]), sampler=d["sampler"],
                   trials=d["trials"], grid_points=d["grid_points"], pruner=d["pruner"],
                   prune_startup=d["prune_startup"], prune_warmup=d["prune_warmup"], study_name=d["study_name"],
                   storage=storage, seed=d["seed"], train_subset=d["train_subset"], out=d["out"])


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def make_pruner(settings: SearchSettings):
    """The Optuna pruner for the settings (reports are per epoch, numbered from 1)."""
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.prune_startup,
                                           n_warmup_steps=settings.prune_warmup)
    if settings.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, settings.prune_warmup),
                                                      reduction_factor=3)
    return optuna.pruners.NopPruner()


def make_sampler(settings: SearchSettings, worker: int = 0):
    """The Optuna sampler. Grid and random points are queued, so their sampler never draws; TPE differs per
    worker so parallel workers do not propose the same first points."""
    import optuna

    if settings.sampler == "tpe":
        startup = min(10, max(2, settings.trials // 3))
        return optuna.samplers.TPESampler(seed=settings.seed * 1000 + worker, n_startup_trials=startup,
                                          constant_liar=True)
    return optuna.samplers.RandomSampler(seed=settings.seed * 1000 + worker)


# ----------------------------------------------------------------------------------------------- the study

def prepare_study(settings: SearchSettings, storage=None, worker: int = 0):
    """Create or join the study, check it is the same search, and queue the points once.

    Args:
        settings: the search.
        storage: an open storage (default: opened from settings.storage).
        worker: worker index (seeds TPE).

    Returns:
        (study, storage).

    Raises:
        SearchError: the study exists with a different definition.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage if storage is not None else open_storage(settings.storage)
    study = optuna.create_study(storage=storage, study_name=settings.study_name, direction="maximize",
                                sampler=make_sampler(settings, worker), pruner=make_pruner(settings),
                                load_if_exists=True)
    mine = _jsonable(settings.identity())
    attrs = study.user_attrs
    if STUDY_ATTR in attrs:
        if attrs[STUDY_ATTR] != mine:
            theirs = attrs[STUDY_ATTR]
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise SearchError(f"study {settings.study_name!r} in this storage was created by a different search "
                              f"(differs in: {', '.join(diff)}); use another --study name or the same settings")
    else:
        study.set_user_attr(STUDY_ATTR, mine)
    points = settings.points()
    if points is not None and not attrs.get("queued"):
        queued = {t.user_attrs.get("point_key") for t in study.get_trials(deepcopy=False)}
        for i, p in enumerate(points):
            key = point_key(p)
            if key not in queued:
                study.enqueue_trial(p, user_attrs={"point": i, "point_key": key, "params": p})
        study.set_user_attr("queued", True)
    return study, storage


def _claim_waiting(study, storage) -> int | None:
    """Take one waiting trial for this process (atomic in every storage); None when none is left."""
    import optuna
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _is_duplicate(study, trial) -> int | None:
    """The number of a lower-numbered trial queued for the same point, or None if this one is the first."""
    key = trial.user_attrs.get("point_key")
    if key is None:
        return None
    same = [t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get("point_key") == key]
    first = min(same)
    return first if first < trial.number else None


# ----------------------------------------------------------------------------------------------- trials

@dataclass
class TrialOutcome:
    """What one training trial gave: the objective and the figures kept with the trial."""

    value: float | None
    pruned: bool
    attrs: dict[str, Any] = field(default_factory=dict)


def _settings_for(settings: SearchSettings, point: dict[str, Any]) -> dict[str, Any]:
    """Shared settings with the point's values, without shared hyperparameters the point's optimizer lacks
    (a fixed momentum applies to the sgd trials of an sgd/adam search, not to the adam ones)."""
    config = dict(settings.base)
    config.update(point)
    optimizer = config.get("optimizer", "adam")
    for key in list(config):
        if key not in point and not settings.space.applies(key, optimizer):
            del config[key]
    return config


def trial_config(settings: SearchSettings, point: dict[str, Any], number: int) -> dict[str, Any]:
    """The training configuration of one trial: the shared settings with the point's values."""
    config = _settings_for(settings, point)
    config["out"] = str(Path(settings.out) / "trials")
    config["name"] = f"trial-{number:04d}"
    return config


def run_worker(settings: SearchSettings, worker: int = 0, runner: Callable | None = None,
               stream: TextIO | None = None, study=None, storage=None) -> int:
    """Run trials of a study until none is left; returns how many this worker trained.

    Args:
        settings: the search.
        worker: index of this worker (for messages and TPE seeds).
        runner: ``runner(config, trial) -> TrialOutcome`` trains one trial (default: a
            :class:`~convdescent.search.trials.TrialRunner`, which loads the data once for this worker).
        stream: where progress lines go (default stdout).
        study, storage: an already prepared study (else joined here).

    Returns:
        Trials trained by this worker.
    """
    from optuna.trial import Trial, TrialState

    out = stream if stream is not None else sys.stdout
    if study is None:
        study, storage = prepare_study(settings, worker=worker)
    if runner is None:
        from .trials import TrialRunner

        runner = TrialRunner(settings.base, train_subset=settings.train_subset)
    done = 0
    while True:
        if settings.sampler == "tpe":
            if len(study.get_trials(deepcopy=False)) >= settings.trials:
                break
            trial = study.ask()
            if trial.number >= settings.trials:
                trial.set_user_attr("over_budget", True)
                study.tell(trial, state=TrialState.FAIL)
                break
            point = settings.space.suggest(trial)
        else:
            trial_id = _claim_waiting(study, storage)
            if trial_id is None:
                break
            trial = Trial(study, trial_id)
            first = _is_duplicate(study, trial)
            if first is not None:
                trial.set_user_attr("duplicate_of", first)
                study.tell(trial, state=TrialState.FAIL)
                continue
            point = settings.space.suggest(trial)
        trial.set_user_attr("params", point)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("pid", os.getpid())
        config = trial_config(settings, point, trial.number)
        t0 = time.time()
        try:
            outcome = runner(config, trial)
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as e:  # a failed trial is recorded and the search goes on
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            trial.set_user_attr("seconds", time.time() - t0)
            study.tell(trial, state=TrialState.FAIL)
            print(f"trial {trial.number} [worker {worker}] {_fmt_point(point)}: failed: {type(e).__name__}: {e}",
                  file=out, flush=True)
            done += 1
            continue
        for k, v in outcome.attrs.items():
            trial.set_user_attr(k, _jsonable(v))
        trial.set_user_attr("seconds", time.time() - t0)
        if outcome.pruned:
            study.tell(trial, state=TrialState.PRUNED)
            what = f"pruned after epoch {outcome.attrs.get('epochs_run')} (val_acc {_fmt_acc(outcome.value)})"
        elif outcome.value is None or not math.isfinite(outcome.value):
            study.tell(trial, state=TrialState.FAIL)
            what = f"failed: {outcome.attrs.get('error', 'no finite validation accuracy')}"
        else:
            study.tell(trial, outcome.value)
            what = f"val_acc {outcome.value:.4f}"
        print(f"trial {trial.number} [worker {worker}] {_fmt_point(point)}: {what} "
              f"({time.time() - t0:.1f} s)", file=out, flush=True)
        done += 1
    return done


def _fmt_point(point: dict[str, Any]) -> str:
    parts = []
    for k, v in point.items():
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _fmt_acc(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


# ----------------------------------------------------------------------------------------------- results

def trial_rows(study) -> list[dict[str, Any]]:
    """One record per trial that was trained (duplicates and over-budget placeholders left out).

    Keys: number, state, value, the point's parameters, best_val_acc, last_val_acc, epochs_run, seconds,
    test_acc, run_dir, worker, error.
    """
    rows = []
    trials = study.get_trials(deepcopy=False)
    first_of: dict[str, int] = {}
    for t in trials:
        key = t.user_attrs.get("point_key")
        if key is not None:
            first_of[key] = min(first_of.get(key, t.number), t.number)
    for t in trials:
        ua = t.user_attrs
        if "duplicate_of" in ua or ua.get("over_budget"):
            continue
        if ua.get("point_key") is not None and first_of[ua["point_key"]] != t.number:
            continue  # a copy another process claimed a moment ago and is about to mark as a duplicate
        params = ua.get("params") or dict(t.params)
        if t.state.name == "WAITING":
            continue
        row = {"number": t.number, "state": t.state.name, "value": t.value}
        row.update(params)
        curve = ua.get("val_acc_curve") or []
        row.update({
            "best_val_acc": ua.get("best_val_acc"), "last_val_acc": curve[-1] if curve else None,
            "epochs_run": ua.get("epochs_run"), "seconds": ua.get("seconds"), "test_acc": ua.get("test_acc"),
            "run_dir": ua.get("run_dir"), "worker": ua.get("worker"), "error": ua.get("error"),
            "val_acc_curve": curve, "diverged": ua.get("diverged"),
        })
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], keys: list[str], markdown: bool = False) -> str:
    """The trials as a text (or Markdown) table, best first."""
    cols = ["number", "state", *keys, "best_val_acc", "epochs_run", "seconds", "diverged"]
    heads = ["trial", "state", *keys, "val_acc", "epochs", "seconds", "note"]

    def cell(row, c):
        v = row.get(c)
        if v is None:
            return "-"
        if c == "best_val_acc":
            return f"{v:.4f}"
        if c == "seconds":
            return f"{v:.1f}"
        if c == "diverged":
            return f"DIVERGED: {v}"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    order = sorted(rows, key=lambda r: (r["state"] != "COMPLETE", -(r.get("value") or -1.0), r["number"]))
    table = [[cell(r, c) for c in cols] for r in order]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


def best_config(settings: SearchSettings, best_params: dict[str, Any]) -> dict[str, Any]:
    """The configuration ``convdescent train --config`` takes for the best trial, on the full training set."""
    config = _settings_for(settings, best_params)
    config.pop("out", None)
    config.pop("name", None)
    return config


def write_results(settings: SearchSettings, study, stream: TextIO | None = None) -> dict[str, Any]:
    """Write the table, the best configuration, the plot and a JSON summary to ``settings.out``.

    Files: trials.csv, trials.md, best.toml, trials.png, search.json.

    Returns:
        The summary dict (also search.json): best trial, its parameters and value, counts by state, files.
    """
    import csv
    import io

    from ..train import dump_toml, resolve_config
    from ..train.checkpoint import atomic_write_text
    from .plots import plot_trials

    out_dir = Path(settings.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    keys = [d.key for d in settings.space.dimensions]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    complete = [r for r in rows if r["state"] == "COMPLETE" and r.get("value") is not None]
    files = {}
    url = storage_url(settings.storage)
    summary: dict[str, Any] = {"study": settings.study_name, "storage": _hide_password(url) if url else None,
                               "sampler": settings.sampler, "pruner": settings.pruner,
                               "space": settings.space.describe(), "trials": len(rows), "by_state": counts,
                               "train_subset": settings.train_subset}
    # csv
    fields = ["number", "state", *keys, "best_val_acc", "last_val_acc", "epochs_run", "seconds", "test_acc",
              "worker", "run_dir", "error", "diverged"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in sorted(rows, key=lambda r: r["number"]):
        w.writerow({k: r.get(k) for k in fields})
    atomic_write_text(out_dir / "trials.csv", buf.getvalue())
    files["table_csv"] = str(out_dir / "trials.csv")
    atomic_write_text(out_dir / "trials.md", format_table(rows, keys, markdown=True) + "\n")
    files["table_md"] = str(out_dir / "trials.md")
    if complete:
        best = max(complete, key=lambda r: (r["value"], -r["number"]))
        params = {k: best[k] for k in keys if k in best}
        config = resolve_config(best_config(settings, params), source="search")
        header = (f"Best trial {best['number']} of search {settings.study_name!r}: validation accuracy "
                  f"{best['value']:.4f}" + (f" (trained on {settings.train_subset} images)" if settings.train_subset
                                            else "") + "\nTrain it with: convdescent train --config best.toml")
        atomic_write_text(out_dir / "best.toml", dump_toml(config, header=header))
        files["best_config"] = str(out_dir / "best.toml")
        summary.update({"best_trial": best["number"], "best_value": best["value"], "best_params": params,
                        "best_run_dir": best.get("run_dir")})
    else:
        summary.update({"best_trial": None, "best_value": None, "best_params": None})
    plot_rows = [dict(r, lr=r.get("lr", settings.base.get("lr")),
                      optimizer=r.get("optimizer", settings.base.get("optimizer", "adam"))) for r in rows]
    files["plot"] = plot_trials(plot_rows, out_dir / "trials.png", metric="value")
    summary["files"] = files
    summary["rows"] = rows
    summary["diverged"] = [r["number"] for r in rows if r.get("diverged")]
    atomic_write_text(out_dir / "search.json", json.dumps(_jsonable(summary), indent=2) + "\n")
    if stream is not None:
        print(format_table(rows, keys), file=stream)
        if summary["diverged"]:
            print(f"{len(summary['diverged'])} trial(s) diverged (trial {', '.join(map(str, summary['diverged']))}): "
                  f"their settings are too aggressive; the range searched may be too wide", file=stream)
    return summary


# ----------------------------------------------------------------------------------------------- driver

def _worker_main(settings_dict: dict[str, Any], worker: int, threads: int) -> None:
    """Entry point of a worker process (spawned): join the study and run trials."""
    import torch

    torch.set_num_threads(max(1, threads))
    settings = SearchSettings.from_dict(settings_dict)
    run_worker(settings, worker=worker)


def run_search(settings: SearchSettings, workers: int = 1, stream: TextIO | None = None,
               runner: Callable | None = None) -> dict[str, Any]:
    """Run a whole search: prepare the study, run the workers, write the results.

    Args:
        settings: the search.
        workers: local worker processes sharing the storage (1: run in this process). With several workers
            an in-memory storage is replaced by a journal file in ``settings.out`` (said on ``stream``).
        stream: where progress and the table go (default stdout).
        runner: the trial runner for a single in-process worker (tests); default trains for real.

    Returns:
        The summary written to search.json.
    """
    import multiprocessing

    out = stream if stream is not None else sys.stdout
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SearchError(f"workers must be a positive integer, got {workers!r}")
    if workers > 1 and storage_kind(settings.storage) == "memory":
        settings.storage = str(Path(settings.out) / "study.journal")
        print(f"{workers} workers need a shared storage: using the journal file {settings.storage}",
              file=out, flush=True)
    if workers > 1 and runner is not None:
        raise SearchError("a custom runner only works with workers=1 (worker processes train for real)")
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    study, storage = prepare_study(settings)
    todo = settings.points()
    planned = len(todo) if todo is not None else settings.trials
    print(f"Search {settings.study_name!r}: {settings.sampler} over {settings.space.describe()}; "
          f"{planned} trials, pruner {settings.pruner}, storage {storage_kind(settings.storage)}"
          + (f", {settings.train_subset} training images per trial" if settings.train_subset else ""),
          file=out, flush=True)
    if workers == 1:
        run_worker(settings, worker=0, runner=runner, stream=out, study=study, storage=storage)
    else:
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // workers)
        procs = [ctx.Process(target=_worker_main, args=(settings.to_dict(), i, threads), daemon=False)
                 for i in range(workers)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            raise
        bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            print(f"warning: worker processes ended with errors: {bad}", file=out, flush=True)
        study, storage = prepare_study(settings)
    return write_results(settings, study, stream=out)
