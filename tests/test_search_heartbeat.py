"""A search worker killed mid-trial (kill -9) loses nothing: its trial stops beating, a live or a later
worker marks it failed and trains the point again, every point counts once, and nothing is reported
complete while a point is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from convdescent.search.space import SearchSpace, parse_dimension, point_key
from convdescent.search.study import (SearchSettings, TrialOutcome, open_storage, prepare_study,
                                      run_worker, trial_rows, write_results)

ROOT = Path(__file__).resolve().parents[1]

# a worker process of the search: trains with a stand-in runner that hangs in the trial the test kills
WORKER = """
import json, sys, time
from pathlib import Path
from convdescent.search.study import SearchSettings, TrialOutcome, run_worker

settings = SearchSettings.from_dict(json.loads(Path(sys.argv[1]).read_text()))
started, mode = Path(sys.argv[2]), sys.argv[3]

def runner(config, trial):
    if mode == "hang" or (mode == "hang-at-1e-3" and config["lr"] == 1e-3):
        started.write_text(str(trial.number))
        time.sleep(3600)
    time.sleep(0.2)
    return TrialOutcome(0.5 + 0.01 * trial.number, False, {"best_val_acc": 0.5, "epochs_run": 1})

run_worker(settings, worker=int(sys.argv[4]), runner=runner)
"""


def settings_for(tmp_path, storage, sampler="grid", **kw):
    space = SearchSpace([parse_dimension("lr", "1e-3,1e-2,1e-1")])
    return SearchSettings(space=space, base={"dataset": "unused", "val_split": 10}, sampler=sampler,
                          trials=kw.pop("trials", None), pruner="none", study_name="beats", storage=storage,
                          out=str(tmp_path / "out"), heartbeat=1, grace=3, **kw)


def start_worker(tmp_path, settings, mode, index):
    (tmp_path / "settings.json").write_text(json.dumps(settings.to_dict()))
    (tmp_path / "worker.py").write_text(WORKER)
    started = tmp_path / f"started-{index}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "settings.json"),
                             str(started), mode, str(index)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, started


def wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - t0 < timeout, "the worker never started its trial"
        time.sleep(0.05)


def kill9(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def fast_runner(calls):
    def runner(config, trial):
        calls.append(config["lr"])
        return TrialOutcome(0.5 + 0.01 * len(calls), False, {"best_val_acc": 0.5, "epochs_run": 1})
    return runner


def storage_path(tmp_path, kind):
    return str(tmp_path / ("study.db" if kind == "sqlite" else "study.journal"))


def check_each_point_once(settings, study):
    rows = trial_rows(study)
    keys = sorted(point_key({"lr": r["lr"]}) for r in rows)
    assert keys == sorted(point_key(p) for p in settings.points())
    assert all(r["state"] == "COMPLETE" for r in rows), rows
    return rows


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_later_worker_trains_the_point_of_a_killed_worker_again(tmp_path, kind):
    settings = settings_for(tmp_path, storage_path(tmp_path, kind))
    prepare_study(settings)
    proc, started = start_worker(tmp_path, settings, "hang", 0)
    wait_for(started, proc)
    kill9(proc)
    lost = int(started.read_text())
    study, storage = prepare_study(settings)
    assert [t.state.name for t in study.get_trials() if t.number == lost] == ["RUNNING"]
    # right after the crash the point is missing: the results say so
    summary = write_results(settings, study, stream=open(os.devnull, "w"))
    assert summary["complete"] is False and summary["unfinished"] == 3
    calls = []
    t0 = time.time()
    n = run_worker(settings, worker=1, runner=fast_runner(calls), stream=open(os.devnull, "w"), study=study,
                   storage=storage)
    assert n == 3 and sorted(calls) == [1e-3, 1e-2, 1e-1]  # the lost point too, after its heartbeat went stale
    assert time.time() - t0 >= settings.grace - 1
    study = optuna.load_study(study_name="beats", storage=open_storage(settings.storage))
    dead = next(t for t in study.get_trials() if t.number == lost)
    assert dead.state.name == "FAIL"
    check_each_point_once(settings, study)
    summary = write_results(settings, study)
    assert summary["complete"] is True and summary["by_state"] == {"COMPLETE": 3} and summary["trials"] == 3
    assert [r["attempts"] for r in summary["rows"] if r["lr"] == dead.user_attrs["params"]["lr"]] == [2]


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_live_worker_waits_and_takes_over_the_trial_of_a_killed_one(tmp_path, kind):
    settings = settings_for(tmp_path, storage_path(tmp_path, kind))
    prepare_study(settings)
    doomed, started = start_worker(tmp_path, settings, "hang", 0)
    wait_for(started, doomed)
    live, _ = start_worker(tmp_path, settings, "fast", 1)
    seen = []
    for line in live.stdout:  # the live worker trains the other two points, then waits for the doomed one's
        seen.append(line)
        if "waiting for trial(s)" in line:
            break
    assert live.poll() is None, "".join(seen)
    kill9(doomed)
    out = "".join(seen) + live.communicate(timeout=120)[0]
    assert live.returncode == 0, out
    assert "waiting for trial(s)" in out and "trains the point again" in out
    study = optuna.load_study(study_name="beats", storage=open_storage(settings.storage))
    rows = check_each_point_once(settings, study)
    assert {r["worker"] for r in rows} == {1}


def test_an_interrupted_trial_is_queued_again_for_the_next_run(tmp_path):
    settings = settings_for(tmp_path, str(tmp_path / "study.db"))
    study, storage = prepare_study(settings)
    calls = []

    def interrupted(config, trial):
        calls.append(config["lr"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_worker(settings, runner=interrupted, stream=open(os.devnull, "w"), study=study, storage=storage)
    assert write_results(settings, study)["complete"] is False
    study, storage = prepare_study(settings)
    run_worker(settings, runner=fast_runner(calls), stream=open(os.devnull, "w"), study=study, storage=storage)
    assert sorted(calls[1:]) == [1e-3, 1e-2, 1e-1] and calls[0] in calls[1:]
    check_each_point_once(settings, study)
    assert write_results(settings, study)["complete"] is True


def test_tpe_trains_its_budget_once_when_a_worker_dies(tmp_path):
    settings = settings_for(tmp_path, str(tmp_path / "tpe.db"), sampler="tpe", trials=4)
    prepare_study(settings)
    proc, started = start_worker(tmp_path, settings, "hang", 0)
    wait_for(started, proc)
    kill9(proc)
    study, storage = prepare_study(settings)
    calls = []
    run_worker(settings, runner=fast_runner(calls), stream=open(os.devnull, "w"), study=study, storage=storage)
    assert len(calls) == 4  # the lost one again and three new ones: the budget, not one more
    rows = trial_rows(study)
    assert len(rows) == 4 and all(r["state"] == "COMPLETE" for r in rows)
    assert write_results(settings, study)["complete"] is True


def test_a_point_whose_worker_always_dies_is_failed_after_its_retries(tmp_path):
    settings = settings_for(tmp_path, str(tmp_path / "study.db"), max_retry=1)
    prepare_study(settings)
    for i in range(2):  # the first attempt at lr 1e-3 and its one retry both die
        proc, started = start_worker(tmp_path, settings, "hang-at-1e-3", i)
        wait_for(started, proc)
        kill9(proc)
        time.sleep(settings.grace + 1)
    study, storage = prepare_study(settings)
    calls = []
    run_worker(settings, runner=fast_runner(calls), stream=open(os.devnull, "w"), study=study, storage=storage)
    assert calls == []  # the second worker trained the other two points; the third has no retry left
    rows = sorted(trial_rows(study), key=lambda r: r["lr"])
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert "stopped without finishing" in rows[0]["error"] and rows[0]["attempts"] == 2
    summary = write_results(settings, study)
    assert summary["complete"] is True and summary["by_state"] == {"FAIL": 1, "COMPLETE": 2}


def test_convdescent_search_finishes_the_grid_when_one_of_its_workers_is_killed(bands_npz, tmp_path):
    storage = tmp_path / "study.db"
    argv = [sys.executable, "-m", "convdescent.cli", "search", "--dataset", bands_npz, "--val-split", "40",
            "--epochs", "40", "--lr", "1e-3,3e-3,1e-2", "--optimizer", "adam", "--sampler", "grid",
            "--pruner", "none", "--storage", str(storage), "--study", "killed", "--workers", "2",
            "--heartbeat", "1", "--grace-period", "3", "--out", str(tmp_path / "out"), "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    victim, t0 = None, time.time()
    while victim is None:  # a worker process that is training a trial right now
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 180
        time.sleep(0.2)
        if not storage.exists():
            continue
        try:
            running = optuna.load_study(study_name="killed", storage=open_storage(str(storage))).get_trials(
                states=(optuna.trial.TrialState.RUNNING,))
        except Exception:  # the study is still being created
            continue
        pids = [t.user_attrs.get("pid") for t in running if t.user_attrs.get("pid")]
        if pids:
            victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads(out)  # the workers' progress lines went to stderr
    assert summary["complete"] is True and summary["by_state"] == {"COMPLETE": 3} and summary["trials"] == 3
    assert sorted(r["lr"] for r in summary["rows"]) == [1e-3, 3e-3, 1e-2]
    study = optuna.load_study(study_name="killed", storage=open_storage(str(storage)))
    assert any(t.state.name == "FAIL" and t.user_attrs.get("pid") == victim for t in study.get_trials())


# a worker that dies the instant its trial turns RUNNING, before the search code runs another line: the
# narrowest window a kill can hit (a test-only wrapper around the storage's two ways into RUNNING)
DIE_ON_CLAIM = """
import json, os, signal, sys
from pathlib import Path
from optuna.trial import TrialState
from convdescent.search.study import SearchSettings, prepare_study, run_worker

settings = SearchSettings.from_dict(json.loads(Path(sys.argv[1]).read_text()))
study, storage = prepare_study(settings)
study_id = storage.get_study_id_from_name(study.study_name)

def dying(real):
    def call(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        running = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            Path(sys.argv[2]).write_text(str(running[0].number))
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return call

for cls in {type(storage), type(study._storage)}:
    for name in ("create_new_trial", "set_trial_state_values"):
        setattr(cls, name, dying(getattr(cls, name)))
run_worker(settings, study=study, storage=storage, runner=lambda config, trial: None)
"""


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
@pytest.mark.parametrize("sampler", ["tpe", "grid"])
def test_a_worker_killed_the_moment_its_trial_starts_loses_no_trial(tmp_path, kind, sampler):
    settings = settings_for(tmp_path, storage_path(tmp_path, kind), sampler=sampler,
                            trials=3 if sampler == "tpe" else None)
    prepare_study(settings)
    (tmp_path / "settings.json").write_text(json.dumps(settings.to_dict()))
    (tmp_path / "dying.py").write_text(DIE_ON_CLAIM)
    started = tmp_path / "claimed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    dying = subprocess.run([sys.executable, str(tmp_path / "dying.py"), str(tmp_path / "settings.json"),
                            str(started)], env=env, capture_output=True, text=True, timeout=120)
    assert dying.returncode == -signal.SIGKILL, dying.stdout + dying.stderr
    lost = int(started.read_text())
    live, _ = start_worker(tmp_path, settings, "fast", 1)
    try:
        out = live.communicate(timeout=60)[0]  # a RUNNING trial that never beat would make it wait forever
    finally:
        live.kill()
    assert live.returncode == 0, out
    study = optuna.load_study(study_name="beats", storage=open_storage(settings.storage))
    assert next(t for t in study.get_trials() if t.number == lost).state.name == "FAIL"
    summary = write_results(settings, study, stream=open(os.devnull, "w"))
    assert summary["complete"] is True and summary["by_state"] == {"COMPLETE": 3}, summary
    if sampler == "grid":
        check_each_point_once(settings, study)
