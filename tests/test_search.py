"""convdescent search: grids covered exactly once across worker processes, pruning, TPE, results."""

import json
import math

import optuna
import pytest

from convdescent.search.space import SearchSpace, SearchSpaceError, parse_dimension, point_key
from convdescent.search.study import (SearchError, SearchSettings, TrialOutcome, open_storage, prepare_study,
                                      run_search, run_worker, storage_kind, trial_rows)
from convdescent.train import load_toml, resolve_config


@pytest.fixture(scope="module")
def npz(bands_npz):
    return bands_npz


def _base(npz, epochs=1):
    return {"dataset": npz, "val_split": 60, "model": "seed_cnn", "epochs": epochs, "batch_size": 32,
            "log_every": 0}


def _grid_settings(npz, tmp_path, storage, study="grid"):
    space = SearchSpace([parse_dimension("optimizer", "sgd,adam"), parse_dimension("lr", "1e-4:1e-1")])
    return SearchSettings(space=space, base=_base(npz), sampler="grid", grid_points=3, pruner="none",
                          study_name=study, storage=storage, out=str(tmp_path / "out"))


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_worker_processes_cover_the_grid_exactly_once(npz, tmp_path, kind):
    storage = str(tmp_path / ("study.journal" if kind == "journal" else "study.db"))
    settings = _grid_settings(npz, tmp_path, storage)
    expected = {point_key(p) for p in settings.points()}
    assert len(expected) == 6
    summary = run_search(settings, workers=2, stream=open("/dev/null", "w"))
    study = optuna.load_study(study_name="grid", storage=open_storage(storage))
    trained = [t for t in study.get_trials() if "duplicate_of" not in t.user_attrs]
    keys = [point_key(t.user_attrs["params"]) for t in trained]
    assert sorted(keys) == sorted(expected)  # every point, none twice
    assert all(t.state.name == "COMPLETE" for t in trained)
    # the trials ran in worker processes, not in this one
    assert {t.user_attrs["worker"] for t in trained} <= {0, 1}
    assert all(t.user_attrs["pid"] != __import__("os").getpid() for t in trained)
    assert summary["by_state"] == {"COMPLETE": 6}
    # a second run of the same command finds nothing left to do and trains nothing again
    again = run_search(settings, workers=1, stream=open("/dev/null", "w"))
    assert again["trials"] == 6
    assert len(optuna.load_study(study_name="grid", storage=open_storage(storage)).get_trials()) == 6


def test_points_queued_twice_by_racing_launchers_are_trained_once(npz, tmp_path):
    storage = str(tmp_path / "race.journal")
    settings = _grid_settings(npz, tmp_path, storage, study="race")
    study, st = prepare_study(settings)
    # a second launcher that read the study before the first had marked the grid as queued queues it again
    for i, p in enumerate(settings.points()):
        study.enqueue_trial(p, user_attrs={"point": i, "point_key": point_key(p), "params": p})
    assert len(study.get_trials()) == 12
    calls = []

    def runner(config, trial):
        calls.append((config["optimizer"], config["lr"]))
        return TrialOutcome(0.5 + 0.01 * len(calls), False, {"epochs_run": 1})

    n = run_worker(settings, worker=0, runner=runner, stream=open("/dev/null", "w"), study=study, storage=st)
    assert n == 6 and len(calls) == 6 and len(set(calls)) == 6
    dupes = [t for t in study.get_trials() if "duplicate_of" in t.user_attrs]
    assert len(dupes) == 6 and all(t.state.name == "FAIL" and t.user_attrs["duplicate_of"] < t.number for t in dupes)
    assert len(trial_rows(study)) == 6


def test_a_hopeless_trial_is_pruned_after_its_first_epoch(npz, tmp_path):
    space = SearchSpace([parse_dimension("lr", "0.1,0.05,1e-7")])
    settings = SearchSettings(space=space, base=dict(_base(npz, epochs=2), optimizer="sgd"), sampler="grid",
                              pruner="median", prune_startup=2, prune_warmup=1, study_name="prune",
                              out=str(tmp_path / "out"))
    summary = run_search(settings, stream=open("/dev/null", "w"))
    rows = {r["lr"]: r for r in summary["rows"]}
    assert rows[0.1]["state"] == "COMPLETE" and rows[0.1]["epochs_run"] == 2
    assert rows[1e-7]["state"] == "PRUNED"
    assert rows[1e-7]["epochs_run"] == 1
    assert rows[1e-7]["last_val_acc"] < rows[0.1]["best_val_acc"]
    assert summary["best_params"]["lr"] in (0.1, 0.05)


def test_successive_halving_prunes_the_hopeless_trial_too(npz, tmp_path):
    space = SearchSpace([parse_dimension("lr", "0.1,1e-7")])
    settings = SearchSettings(space=space, base=dict(_base(npz, epochs=3), optimizer="sgd"), sampler="grid",
                              pruner="halving", study_name="halving", out=str(tmp_path / "out"))
    summary = run_search(settings, stream=open("/dev/null", "w"))
    rows = {r["lr"]: r for r in summary["rows"]}
    assert rows[1e-7]["state"] == "PRUNED" and rows[1e-7]["epochs_run"] < 3


def test_tpe_runs_its_budget_and_learns_where_the_optimum_is(tmp_path):
    space = SearchSpace([parse_dimension("lr", "1e-5:1")], fixed={"optimizer": "sgd"})
    settings = SearchSettings(space=space, base={"optimizer": "sgd"}, sampler="tpe", trials=30, pruner="none",
                              study_name="tpe", out=str(tmp_path / "out"), seed=1)

    def runner(config, trial):  # a smooth objective peaked at lr = 1e-2
        return TrialOutcome(1.0 - 0.1 * (math.log10(config["lr"]) + 2) ** 2, False, {"epochs_run": 1})

    study, st = prepare_study(settings)
    n = run_worker(settings, runner=runner, stream=open("/dev/null", "w"), study=study, storage=st)
    assert n == 30 and len(study.get_trials()) == 30
    later = sorted(study.get_trials(), key=lambda t: t.number)[15:]
    # after its random start-up, TPE proposes points near the optimum more often than random search would
    near = sum(1 for t in later if abs(math.log10(t.params["lr"]) + 2) < 1)
    assert near >= 8
    assert abs(math.log10(study.best_params["lr"]) + 2) < 0.5


def test_random_search_draws_the_same_points_for_any_number_of_workers(tmp_path):
    space = SearchSpace([parse_dimension("lr", "1e-5:1e-1")])
    s1 = SearchSettings(space=space, base={}, sampler="random", trials=5, seed=7, study_name="a", out=str(tmp_path))
    s2 = SearchSettings(space=space, base={}, sampler="random", trials=5, seed=7, study_name="b", out=str(tmp_path))
    assert s1.points() == s2.points()


def test_joining_a_study_with_other_settings_is_refused(tmp_path):
    storage = str(tmp_path / "s.db")
    space = SearchSpace([parse_dimension("lr", "1e-4:1e-1")])
    prepare_study(SearchSettings(space=space, base={}, sampler="grid", study_name="x", storage=storage,
                                 out=str(tmp_path)))
    other = SearchSettings(space=space, base={}, sampler="grid", grid_points=7, study_name="x", storage=storage,
                           out=str(tmp_path))
    with pytest.raises(SearchError, match="created by a different search .differs in: grid_points"):
        prepare_study(other)


@pytest.mark.parametrize("spec, kind", [(None, "memory"), ("a/study.db", "sqlite"), ("sqlite:///x.db", "sqlite"),
                                        ("s.journal", "journal"), ("journal:s.log", "journal"),
                                        ("postgresql://u:p@127.0.0.1:5432/db", "rdb")])
def test_storage_kinds(spec, kind):
    assert storage_kind(spec) == kind


def test_bad_settings_say_what_to_do(tmp_path):
    space = SearchSpace([parse_dimension("lr", "1e-4:1e-1")])
    with pytest.raises(SearchError, match="storage 'study.txt' is not understood"):
        SearchSettings(space=space, base={}, sampler="grid", storage="study.txt")
    with pytest.raises(SearchError, match="the random sampler needs a number of trials"):
        SearchSettings(space=space, base={}, sampler="random")
    with pytest.raises(SearchError, match="val_split must not be 0"):
        SearchSettings(space=space, base={"val_split": 0}, sampler="grid")
    with pytest.raises(SearchError, match="the grid has 5 points but trials=2"):
        SearchSettings(space=space, base={}, sampler="grid", trials=2).points()
    with pytest.raises(SearchError, match="sampler must be one of grid, random, tpe, got 'bayes'"):
        SearchSettings(space=space, base={}, sampler="bayes")


def test_results_best_config_trains_and_plot_marks_pruned(npz, tmp_path):
    space = SearchSpace([parse_dimension("lr", "0.1,1e-7"), parse_dimension("optimizer", "sgd,adam")])
    settings = SearchSettings(space=space, base=_base(npz, epochs=2), sampler="grid", pruner="median",
                              prune_startup=1, prune_warmup=1, study_name="res", out=str(tmp_path / "res"))
    summary = run_search(settings, stream=open("/dev/null", "w"))
    out = tmp_path / "res"
    for name in ("trials.csv", "trials.md", "best.toml", "trials.png", "search.json"):
        assert (out / name).is_file(), name
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "search.json").read_text())
    assert data["best_params"]["lr"] == 0.1
    lines = (out / "trials.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 4 and lines[0].startswith("number,state,lr,optimizer")
    cfg = resolve_config(load_toml(out / "best.toml"))
    assert cfg["lr"] == 0.1 and cfg["optimizer"] == summary["best_params"]["optimizer"] and cfg["epochs"] == 2
    from convdescent.train.run import train_from_config

    result = train_from_config(dict(load_toml(out / "best.toml"), out=str(tmp_path / "again")), display="quiet")
    assert result.summary["best_val_acc"] > 0.9
    # every trial directory is a real run directory
    for r in summary["rows"]:
        assert (tmp_path / "res" / "trials").exists() and r["run_dir"] and (
            __import__("pathlib").Path(r["run_dir"]) / "config.toml").is_file()


def test_a_fixed_hyperparameter_goes_only_to_the_optimizers_that_take_it(tmp_path):
    space = SearchSpace([parse_dimension("optimizer", "sgd,adam")], fixed={"momentum": 0.9, "lr": 0.01})
    settings = SearchSettings(space=space, base={"momentum": 0.9, "lr": 0.01}, sampler="grid", pruner="none",
                              study_name="fixed", out=str(tmp_path))
    seen = {}

    def runner(config, trial):
        seen[config["optimizer"]] = config
        return TrialOutcome(0.5, False, {"epochs_run": 1})

    study, st = prepare_study(settings)
    run_worker(settings, runner=runner, stream=open("/dev/null", "w"), study=study, storage=st)
    assert seen["sgd"]["momentum"] == 0.9 and "momentum" not in seen["adam"]
    assert seen["adam"]["lr"] == 0.01
    with pytest.raises(SearchSpaceError, match="momentum=0.9 is set but no optimizer searched takes it"):
        SearchSpace([parse_dimension("lr", "1e-3,1e-2")], fixed={"momentum": 0.9, "optimizer": "adam"})


def test_the_last_epoch_is_reported_but_never_pruned(npz, tmp_path):
    space = SearchSpace([parse_dimension("lr", "0.1,0.05,1e-7")])
    settings = SearchSettings(space=space, base=dict(_base(npz, epochs=1), optimizer="sgd"), sampler="grid",
                              pruner="median", prune_startup=2, prune_warmup=1, study_name="last",
                              out=str(tmp_path / "out"))
    summary = run_search(settings, stream=open("/dev/null", "w"))
    rows = {r["lr"]: r for r in summary["rows"]}
    assert rows[1e-7]["state"] == "COMPLETE" and rows[1e-7]["value"] < rows[0.1]["value"]
    assert rows[1e-7]["val_acc_curve"] == [rows[1e-7]["value"]]  # the epoch was still reported


def test_diverged_trials_are_flagged(npz, tmp_path):
    import io

    from convdescent.search.trials import diverged

    assert diverged([1.0, 0.5]) is None and diverged([1.0, float("nan")]) == "non-finite training loss"
    assert diverged([1.0, 2.0]) == "training loss rose from 1 to 2"
    # sgd at lr 1e6 blows up within the first steps; 1e-2 trains
    space = SearchSpace([parse_dimension("lr", "1e-2,1e6")])
    settings = SearchSettings(space=space, base=dict(_base(npz), optimizer="sgd"), sampler="grid", pruner="none",
                              study_name="div", out=str(tmp_path / "div"))
    stream = io.StringIO()
    summary = run_search(settings, stream=stream)
    rows = {r["lr"]: r for r in summary["rows"]}
    assert rows[1e6]["diverged"] and not rows[1e-2]["diverged"]
    assert summary["diverged"] == [rows[1e6]["number"]]
    text = stream.getvalue()
    assert "DIVERGED: " in text and f"1 trial(s) diverged (trial {rows[1e6]['number']})" in text
    assert "DIVERGED: " in (tmp_path / "div" / "trials.md").read_text()
