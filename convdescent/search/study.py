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
trials, so it cannot be queued; its workers stop at ``trials`` trials (a trial past the budget in a race is
closed unrun as ``over_budget``).

Nothing lost: in a shared storage every running trial has a heartbeat (Optuna's trial heartbeats on
SQLite and PostgreSQL, the same protocol kept in trial attributes of a journal file). A worker that dies
mid-trial (kill -9, out of memory, a pre-empted job) stops beating; any live or later worker then marks
the trial failed and queues it again (Optuna's RetryHeartbeatStaleTrialCallback, ``max_retry`` times), so
the point is trained once more. The failed attempt is "retired": tables and counts show each point once.
A worker does not finish while another worker's trial is still running, and the results say
``complete: false`` (and list the points) while any point has no finished trial.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from .space import SearchSpace, point_key
from .trials import TrialOutcome, TrialRunner

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "halving", "none")
STUDY_ATTR = "convdescent_search"  # the study's definition, so workers joining later can check they match
HEARTBEAT_ATTR = "convdescent_heartbeat"  # journal files: the time.time() of a running trial's last beat
HEARTBEAT_S = 10  # seconds between heartbeats of a running trial
GRACE_S = 60  # a running trial whose last heartbeat is older than this belongs to a dead worker
MAX_RETRY = 3  # times a point whose worker died is queued again


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


def open_storage(spec: str | None, heartbeat: int = HEARTBEAT_S, grace: int = GRACE_S, max_retry: int = MAX_RETRY):
    """Open an Optuna storage from a --storage value, with trial heartbeats when it is shared.

    Args:
        spec: None or "memory"; "study.db" / "sqlite:///path"; "study.journal" / "journal:PATH";
            "postgresql://user:password@host:port/db" (or any SQLAlchemy URL Optuna's RDB storage takes).
        heartbeat: seconds between heartbeats of a running trial.
        grace: seconds without a heartbeat after which a running trial's worker counts as dead.
        max_retry: times the trial of a dead worker is queued again.

    Returns:
        An ``optuna.storages.BaseStorage``.
    """
    import optuna

    url = storage_url(spec)
    kind = storage_kind(spec)
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    retry = _retry_callback(max_retry)
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        # the open-lock works on every file system, where the default symlink lock needs symlink support
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        return _journal_with_heartbeat(backend, heartbeat, grace, retry)
    beats = {"heartbeat_interval": heartbeat, "grace_period": grace, _callback_keyword(): retry}
    if kind == "sqlite":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several processes write the file: wait for its lock instead of failing at once
        return _open_rdb(url, engine_kwargs={"connect_args": {"timeout": 120}}, beats=beats)
    if url.startswith(("postgresql", "postgres")):
        import importlib.util

        has3, has2 = importlib.util.find_spec("psycopg") is not None, importlib.util.find_spec("psycopg2") is not None
        if not (has3 or has2):
            raise SearchError("a PostgreSQL storage needs a driver: pip install psycopg2-binary "
                              "(or pip install 'convdescent[postgres]')")
        scheme, rest = url.split("://", 1)
        if "+" not in scheme:  # name the installed driver; SQLAlchemy's default differs between versions
            url = ("postgresql+psycopg://" if has3 else "postgresql+psycopg2://") + rest
    return _open_rdb(url, beats=beats)


def _retry_callback(max_retry: int):
    """Optuna's callback that queues a dead worker's trial again (named RetryFailedTrialCallback before 4.9)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental / renamed-class notices, not the user's business
        cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
            optuna.storages.RetryFailedTrialCallback
        return cls(max_retry=max_retry)


def _callback_keyword() -> str:
    import inspect

    import optuna

    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


def _journal_with_heartbeat(backend, heartbeat: int, grace: int, callback):
    """A JournalStorage that takes part in Optuna's heartbeat protocol (Optuna gives it only to RDB storages).

    The last beat of a running trial is kept as a trial system attribute holding ``time.time()``; the
    machines sharing a journal file are assumed to agree on the time within the grace period.
    """
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class JournalHeartbeatStorage(optuna.storages.JournalStorage, BaseHeartbeat):
        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                    if isinstance(t.system_attrs.get(HEARTBEAT_ATTR), (int, float))
                    and now - t.system_attrs[HEARTBEAT_ATTR] > grace]

        def get_heartbeat_interval(self) -> int:
            return heartbeat

        def get_heartbeat_stale_trial_callback(self):
            return callback

        def get_failed_trial_callback(self):  # the same, under its name before Optuna 4.9
            return callback

    return JournalHeartbeatStorage(backend)


def _open_rdb(url: str, engine_kwargs: dict | None = None, attempts: int = 6, beats: dict | None = None):
    """RDBStorage(url), retried when another process is creating the same tables at this moment.

    Processes that start together on an empty database all try to create Optuna's schema; all but one
    fail on the duplicate table or type, and a moment later the schema is there for them.
    """
    import random

    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeats are an "experimental" argument in Optuna
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **(beats or {}))
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
        heartbeat: seconds between heartbeats of a running trial (shared storages).
        grace: seconds without a heartbeat after which a trial's worker counts as dead and the trial is retried.
        max_retry: times one point is retried after its worker died.
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
    heartbeat: int = HEARTBEAT_S
    grace: int = GRACE_S
    max_retry: int = MAX_RETRY

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise SearchError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise SearchError(f"pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        for name in ("grid_points", "prune_startup", "prune_warmup", "seed", "heartbeat", "grace", "max_retry"):
            v = getattr(self, name)
            positive = name in ("grid_points", "heartbeat", "grace")
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if positive else 0):
                raise SearchError(f"{name} must be a {'positive' if positive else 'non-negative'} "
                                  f"integer, got {v!r}")
        if self.grace <= self.heartbeat:
            raise SearchError(f"the grace period ({self.grace} s) must be longer than the heartbeat interval "
                              f"({self.heartbeat} s), or live workers would count as dead")
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
        d.update({"study_name": self.study_name, "storage": storage_url(self.storage), "out": str(self.out),
                  "heartbeat": self.heartbeat, "grace": self.grace, "max_retry": self.max_retry})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSettings":
        storage = d.get("storage")
        return cls(space=SearchSpace.from_dict(d["space"]), base=dict(d["base"]), sampler=d["sampler"],
                   trials=d["trials"], grid_points=d["grid_points"], pruner=d["pruner"],
                   prune_startup=d["prune_startup"], prune_warmup=d["prune_warmup"], study_name=d["study_name"],
                   storage=storage, seed=d["seed"], train_subset=d["train_subset"], out=d["out"],
                   heartbeat=d.get("heartbeat", HEARTBEAT_S), grace=d.get("grace", GRACE_S),
                   max_retry=d.get("max_retry", MAX_RETRY))


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
    storage = storage if storage is not None else open_storage(settings.storage, settings.heartbeat, settings.grace,
                                                               settings.max_retry)
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
            # beat before the claim: a worker killed right after claiming leaves a trial that goes stale
            # (a trial that never beat would count as alive forever)
            if _beats(storage):
                storage.record_heartbeat(trial_id)
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _dedup_key(t) -> str | None:
    """What makes two trials copies of one another: the point of a queued trial, else the trial a retry
    replaces (two workers may both queue a retry of one dead trial in a journal file)."""
    key = t.user_attrs.get("point_key")
    if key is not None:
        return key
    history = t.system_attrs.get("retry_history")
    return f"retry-of-{history[0]}" if history else None


def retired_numbers(trials) -> set[int]:
    """Numbers of trials whose worker died and that were queued again (a retry carries their numbers)."""
    out: set[int] = set()
    for t in trials:
        out.update(int(n) for n in t.system_attrs.get("retry_history") or ())
    return out


def _is_duplicate(study, trial) -> int | None:
    """The number of a lower-numbered live trial for the same point, or None if this one is the first."""
    trials = study.get_trials(deepcopy=False)
    mine = next(t for t in trials if t.number == trial.number)
    key = _dedup_key(mine)
    if key is None:
        return None
    retired = retired_numbers(trials)
    same = [t.number for t in trials if _dedup_key(t) == key and t.number not in retired
            and "duplicate_of" not in t.user_attrs]
    first = min(same, default=trial.number)
    return first if first < trial.number else None


def _beats(storage) -> bool:
    """Whether a storage keeps trial heartbeats (shared storages do; the in-memory one has one process)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def retry_dead_trials(study) -> None:
    """Fail the running trials of dead workers and queue them again (Optuna's heartbeat machinery)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" notice
        optuna.storages.fail_stale_trials(study)


class _Heartbeat:
    """Records a trial's heartbeat every ``interval`` seconds in a thread while the trial trains."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread = None

    def __enter__(self):
        if _beats(self.storage):
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._run, name="convdescent-heartbeat", daemon=True)
            self.thread.start()
        return self

    def _run(self):
        interval = self.storage.get_heartbeat_interval()
        while not self.stop.wait(interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a storage hiccup: the next beat tries again; the grace period covers a few
                pass

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        return False


def _live_trials(trials):
    """Trials that stand for a point or a budget slot: not retired, not duplicates, not over budget."""
    retired = retired_numbers(trials)
    return [t for t in trials if t.number not in retired and "duplicate_of" not in t.user_attrs
            and not t.user_attrs.get("over_budget")]


def _requeue(study, frozen) -> None:
    """Queue an interrupted trial's point again, in the form Optuna's retry callback gives a dead worker's."""
    _retry_callback(None)(study, frozen)


# ----------------------------------------------------------------------------------------------- trials

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
    from optuna.trial import TrialState

    out = stream if stream is not None else sys.stdout
    if study is None:
        study, storage = prepare_study(settings, worker=worker)
    if runner is None:
        runner = TrialRunner(settings.base, train_subset=settings.train_subset)
    done = 0
    waiting_said = False
    while True:
        if _beats(storage):
            retry_dead_trials(study)
        trial = _next_trial(settings, study, storage)
        if trial is None:
            running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
            if not running or not _beats(storage):
                break
            # another worker trains these: stay until they finish, to queue them again if that worker dies
            if not waiting_said:
                print(f"[worker {worker}] waiting for trial(s) {', '.join(str(t.number) for t in running)} of "
                      f"other workers (a trial without a heartbeat for {settings.grace} s is trained again)",
                      file=out, flush=True)
                waiting_said = True
            time.sleep(min(settings.heartbeat, settings.grace / 4))
            continue
        waiting_said = False
        if trial == "duplicate":
            continue
        with _Heartbeat(storage, trial._trial_id):
            done += _train_trial(settings, study, trial, worker, runner, out)
    return done


def _next_trial(settings: SearchSettings, study, storage):
    """The next trial this worker trains (its point suggested), "duplicate" for a copy closed unrun, or None."""
    from optuna.trial import Trial, TrialState

    if settings.sampler == "tpe":
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and len(_live_trials(trials)) >= settings.trials:
            return None
        trial = _ask_with_beat(study, storage)
        if trial is None:
            return "duplicate"  # another worker claimed the slot this one opened: look again
        if not _frozen(study, trial.number).system_attrs.get("retry_history"):
            live = _live_trials(study.get_trials(deepcopy=False))
            if sum(1 for t in live if t.number < trial.number and not t.system_attrs.get("retry_history")) \
                    >= settings.trials:
                trial.set_user_attr("over_budget", True)
                study.tell(trial, state=TrialState.FAIL)
                return None
        first = _is_duplicate(study, trial)
        if first is not None:
            trial.set_user_attr("duplicate_of", first)
            study.tell(trial, state=TrialState.FAIL)
            return "duplicate"
        return trial
    trial_id = _claim_waiting(study, storage)
    if trial_id is None:
        return None
    trial = Trial(study, trial_id)
    first = _is_duplicate(study, trial)
    if first is not None:
        trial.set_user_attr("duplicate_of", first)
        study.tell(trial, state=TrialState.FAIL)
        return "duplicate"
    return trial


def _ask_with_beat(study, storage):
    """``study.ask()`` for TPE with the heartbeat recorded before the trial becomes RUNNING.

    ``study.ask()`` creates its trial RUNNING and only then could a beat be recorded: a worker killed in
    between would leave a RUNNING trial that never beat, which Optuna's stale-trial check never sees, so the
    budget slot would be lost for good. Here the slot is opened as a WAITING trial without fixed values
    (``enqueue_trial({})``: the sampler still suggests every value) and claimed the way grid points are
    (``_claim_waiting``: beat, then WAITING -> RUNNING). A retried trial queued by the retry callback is
    WAITING too and is claimed first. Returns None when another worker claimed every waiting trial first.
    """
    from optuna.trial import Trial

    trial_id = _claim_waiting(study, storage)
    if trial_id is None:
        study.enqueue_trial({}, skip_if_exists=False)
        trial_id = _claim_waiting(study, storage)
        if trial_id is None:
            return None
    trial = Trial(study, trial_id)
    study.sampler.before_trial(study, _frozen(study, trial.number))
    return trial


def _frozen(study, number: int):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _train_trial(settings: SearchSettings, study, trial, worker: int, runner: Callable, out: TextIO) -> int:
    """Train one claimed trial and record its result; returns 1."""
    from optuna.trial import TrialState

    point = settings.space.suggest(trial)
    trial.set_user_attr("params", point)
    trial.set_user_attr("worker", worker)
    trial.set_user_attr("pid", os.getpid())
    retry = _frozen(study, trial.number).system_attrs.get("retry_history")
    if retry:
        print(f"trial {trial.number} [worker {worker}] {_fmt_point(point)}: trains the point again (trial "
              f"{retry[-1]} stopped without finishing)", file=out, flush=True)
    config = trial_config(settings, point, trial.number)
    t0 = time.time()
    try:
        outcome = runner(config, trial)
    except KeyboardInterrupt:
        frozen = _frozen(study, trial.number)
        trial.set_user_attr("error", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        _requeue(study, frozen)  # the next run of the search trains this point
        raise
    except Exception as e:  # a failed trial is recorded and the search goes on
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        trial.set_user_attr("seconds", time.time() - t0)
        study.tell(trial, state=TrialState.FAIL)
        print(f"trial {trial.number} [worker {worker}] {_fmt_point(point)}: failed: {type(e).__name__}: {e}",
              file=out, flush=True)
        return 1
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
    return 1


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
    live = _live_trials(trials)
    first_of: dict[str, int] = {}
    for t in live:
        key = _dedup_key(t)
        if key is not None:
            first_of[key] = min(first_of.get(key, t.number), t.number)
    for t in live:
        ua = t.user_attrs
        key = _dedup_key(t)
        if key is not None and first_of[key] != t.number:
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
            "attempts": len(t.system_attrs.get("retry_history") or ()) + 1,
        })
        if t.state.name == "FAIL" and row["error"] is None and ua.get("seconds") is None:
            row["error"] = (f"its worker stopped without finishing it (no heartbeat) {row['attempts']} time(s); "
                            f"not retried again")
        rows.append(row)
    return rows


def unfinished(settings: SearchSettings, study) -> tuple[int, list[dict[str, Any]]]:
    """How many points (or TPE trials) have no finished trial yet, and those points (grid, random).

    Returns:
        (count, points): points is empty for TPE, whose points are not known in advance.
    """
    from optuna.trial import TrialState

    live = _live_trials(study.get_trials(deepcopy=False))
    finished = [t for t in live if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    points = settings.points()
    if points is None:
        return max(0, settings.trials - len(finished)), []
    keys = {_dedup_key(t) for t in finished}
    missing = [p for p in points if point_key(p) not in keys]
    return len(missing), missing


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
    left, missing = unfinished(settings, study)
    summary.update({"complete": left == 0, "unfinished": left, "missing_points": missing})
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
        if left:
            print(f"warning: the search is not complete: {left} of its {'points' if missing or settings.sampler != 'tpe' else 'trials'} "
                  f"have no finished trial yet"
                  + (f" ({'; '.join(_fmt_point(p) for p in missing[:5])}{' ...' if len(missing) > 5 else ''})"
                     if missing else "")
                  + ". Run the same command again to train them (a trial whose worker died is trained again "
                    f"once it has had no heartbeat for {settings.grace} s)", file=stream, flush=True)
    return summary


# ----------------------------------------------------------------------------------------------- driver

def _worker_main(settings_dict: dict[str, Any], worker: int, threads: int, to_stderr: bool = False) -> None:
    """Entry point of a worker process (spawned): join the study and run trials."""
    import torch

    torch.set_num_threads(max(1, threads))
    settings = SearchSettings.from_dict(settings_dict)
    run_worker(settings, worker=worker, stream=sys.stderr if to_stderr else sys.stdout)


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
        procs = [ctx.Process(target=_worker_main, args=(settings.to_dict(), i, threads, out is sys.stderr),
                             daemon=False)
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
        study, storage = prepare_study(settings)
        if bad:
            print(f"warning: worker processes ended with errors (worker, exit code): {bad}", file=out, flush=True)
            if unfinished(settings, study)[0]:
                # no worker is left to notice the dead one's trial: this process trains what is missing
                print("finishing the remaining points in this process", file=out, flush=True)
                run_worker(settings, worker=workers, stream=out, study=study, storage=storage)
    return write_results(settings, study, stream=out)
