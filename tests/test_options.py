"""The hyperparameter schema and the ranges of every number: walked, so that an option added later is tested
without a new line here. A value just outside each bound of each numeric option is refused with a message
that names the option (flag, key, parameter) and the value; a value inside is accepted."""

from __future__ import annotations

import argparse
import inspect

import pytest

from convdescent import optim
from convdescent.argparsing import walk_parsers
from convdescent.cli import build_parser, main
from convdescent.data.augment import OPS, make_augment
from convdescent.optim.schedules import SCHEDULE_SPECS, WARMUP_PARAMS, make_schedule
from convdescent.options import HYPERPARAMETERS, Range
from convdescent.train.config import OPTIONS, ConfigError, load_toml, resolve_config


def _bounds(rng: Range) -> list[tuple[str, float]]:
    return [(f"outside-{i}", v) for i, v in enumerate(rng.outside())]


def _value(kind: str, v: float):
    return int(v) if kind in ("int", "batch", "count") else float(v)


NUMERIC_OPTIONS = [o for o in OPTIONS if o.range is not None]
OPTION_CASES = [(o, v) for o in NUMERIC_OPTIONS for v in o.range.outside()]


def test_every_numeric_option_has_a_range():
    numeric = [o.key for o in OPTIONS if o.kind in ("int", "float", "batch", "count", "floats")]
    assert numeric and [o.key for o in NUMERIC_OPTIONS] == numeric
    for o in NUMERIC_OPTIONS:
        assert o.range.outside(), f"{o.key} has a range with no bound"


@pytest.mark.parametrize("opt,value", OPTION_CASES, ids=[f"{o.key}={v!r}" for o, v in OPTION_CASES])
def test_a_value_just_outside_a_bound_is_refused_naming_key_and_value(opt, value):
    bad = [value, value] if opt.kind == "floats" else _value(opt.kind, value)
    with pytest.raises(ConfigError) as info:
        resolve_config({opt.key: bad})
    text = str(info.value)
    assert opt.key in text and "is out of range" in text and repr(_value(opt.kind, value))[:4] in text, text


@pytest.mark.parametrize("opt", NUMERIC_OPTIONS, ids=[o.key for o in NUMERIC_OPTIONS])
def test_a_value_inside_the_range_is_accepted(opt):
    inside = _value(opt.kind, opt.range.inside())
    value = [inside] * (opt.length or 1) if opt.kind == "floats" else inside
    assert resolve_config({opt.key: value})[opt.key] == value


@pytest.mark.parametrize("opt,value", OPTION_CASES, ids=[f"{o.key}={v!r}" for o, v in OPTION_CASES])
def test_the_train_flag_refuses_it_at_the_command_line(opt, value, capsys):
    flag = "--" + opt.key.replace("_", "-")
    text = f"{value},{value}" if opt.kind == "floats" else str(_value(opt.kind, value))
    with pytest.raises(SystemExit) as info:
        main(["train", f"{flag}={text}"])  # the = form, as a negative value needs on any command line
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"convdescent: error: train: {flag} {text} is out of range: "), err


@pytest.mark.parametrize("opt,value", OPTION_CASES, ids=[f"{o.key}={v!r}" for o, v in OPTION_CASES])
def test_a_toml_file_refuses_it_naming_the_file_and_key(opt, value, tmp_path):
    bad = [value, value] if opt.kind == "floats" else _value(opt.kind, value)
    path = tmp_path / "run.toml"
    path.write_text(f"{opt.key} = {bad!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert str(info.value).startswith(f"{path}: {opt.key} = "), str(info.value)
    assert "is out of range" in str(info.value)


# ----------------------------------------------------------------------------------------------- optimizers

def test_the_schema_says_which_optimizers_take_each_hyperparameter():
    for h in HYPERPARAMETERS:
        if not h.applies:
            continue  # the learning rate and clipping: every optimizer
        takers = {n for n, e in optim.OPTIMIZERS.items() if h.name in inspect.signature(e.builder).parameters}
        assert set(h.applies) == takers, h.name


HP_CASES = [(h, o, v) for h in HYPERPARAMETERS if h.range is not None
            for o in (h.applies or ("adam",)) for v in h.range.outside()]


@pytest.mark.parametrize("h,name,value", HP_CASES, ids=[f"{h.name}-{o}-{v!r}" for h, o, v in HP_CASES])
def test_optimizer_from_args_refuses_values_outside_the_schema(h, name, value):
    bad = [value, 0.5] if h.kind == "floats" else value
    kw = {"lr": 1e-3} if h.name == "lr" else {"lr": 1e-3, h.name: bad}
    if h.name == "lr":
        kw["lr"] = value
    with pytest.raises(ValueError, match=f"{h.name}.* is out of range"):
        optim.optimizer_from_args(name, **kw)
    inside = h.range.inside()
    good = [inside] * h.length if h.kind == "floats" else inside
    kw[h.name] = good
    optim.optimizer_from_args(name, **kw)


def test_python_builders_keep_the_schema_momentum_range():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1\.0"):
        optim.sgd(momentum=1.0)
    with pytest.raises(ValueError, match=r"momentum=1\.5 is out of range: momentum must be in \[0, 1\)"):
        optim.optimizer_from_args("rmsprop", 1e-3, momentum=1.5)


# ----------------------------------------------------------------------------------------------- schedules

def _required(spec) -> dict:
    out = {}
    for p in spec.params:
        if spec.defaults[p.name] is None:
            out[p.name] = [10, 20] if p.kind == "ints" else int(p.range.inside()) + 10
    return out


SCHEDULE_CASES = [(s, p, v) for s in SCHEDULE_SPECS for p in (*s.params, *WARMUP_PARAMS) if p.range is not None
                  for v in p.range.outside()]


@pytest.mark.parametrize("spec,param,value", SCHEDULE_CASES,
                         ids=[f"{s.name}-{p.name}={v!r}" for s, p, v in SCHEDULE_CASES])
def test_schedule_parameters_outside_their_declared_range_are_refused(spec, param, value):
    params = _required(spec)
    params[param.name] = [int(value)] if param.kind == "ints" else (int(value) if param.kind == "int" else value)
    with pytest.raises(ValueError, match=f"{param.name}.* is out of range: {param.name} must be"):
        make_schedule(spec.name, 0.1, **params)


OWN_CASES = [(s, p, v) for s, p, v in SCHEDULE_CASES if p in s.params]


@pytest.mark.parametrize("spec,param,value", OWN_CASES, ids=[f"{s.name}-{p.name}={v!r}" for s, p, v in OWN_CASES])
def test_the_schedule_functions_refuse_what_their_declaration_refuses(spec, param, value):
    """Called directly (the Python API), each builder keeps the range its declaration states."""
    params = _required(spec)
    params[param.name] = [int(value)] if param.kind == "ints" else (int(value) if param.kind == "int" else value)
    with pytest.raises(ValueError, match=param.name):
        spec.build(0.1, **params)


@pytest.mark.parametrize("spec", SCHEDULE_SPECS, ids=[s.name for s in SCHEDULE_SPECS])
def test_schedule_parameters_inside_their_range_build(spec):
    params = _required(spec)
    for p in spec.params:
        if p.range is not None and p.name not in params and p.kind in ("int", "float"):
            inside = p.range.inside()
            params[p.name] = int(inside) if p.kind == "int" else inside
    schedule = make_schedule(spec.name, 0.1, **params)
    assert schedule(0) >= 0.0
    assert optim.SCHEDULES[spec.name].defaults == spec.defaults  # the registry is derived from the declaration


def test_schedule_flags_and_schedule_params_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--gamma", "-0.5"])
    assert "--gamma -0.5 is out of range: gamma must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--milestones", "3,0"])
    assert "--milestones 3,0 is out of range: each of milestones must be an integer >= 1" in capsys.readouterr().err
    code = main(["train", "--schedule", "cosine", "--schedule-param", "alpha=1.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--schedule-param alpha=1.5 is out of range: alpha must be in [0, 1]" in err, err
    with pytest.raises(ConfigError, match=r"warmup_steps=-1 is out of range: warmup_steps must be an integer >= 0"):
        resolve_config({"schedule": "cosine", "schedule_params": {"warmup_steps": -1}})
    path = tmp_path / "run.toml"
    path.write_text('schedule = "step"\nschedule_params = {step_size = 0}\n')
    with pytest.raises(ConfigError, match=f"{path}: step_size = 0 is out of range: step_size must be an integer"):
        load_toml(path)


# ----------------------------------------------------------------------------------------------- augmentation

AUGMENT_CASES = [(op, v) for op, row in OPS.items() for v in row[3].outside()]


@pytest.mark.parametrize("op,value", AUGMENT_CASES, ids=[f"{op}:{v!r}" for op, v in AUGMENT_CASES])
def test_augmentation_parameters_outside_their_range_are_refused(op, value):
    with pytest.raises(ValueError, match=f"augment: {op} = .* is out of range: {op} must be"):
        make_augment(f"{op}:{value!r}")
    inside = OPS[op][3].inside()
    assert op in make_augment(f"{op}:{int(inside) if OPS[op][1] is int else inside}").ops


# ----------------------------------------------------------------------------------------------- every flag

def _numeric_actions():
    for path, parser in walk_parsers(build_parser()):
        for action in parser._actions:
            if action.type is not None and action.option_strings:
                yield " ".join(path), action


def test_no_numeric_flag_goes_unchecked():
    plain = [f"{cmd} {a.option_strings[0]}" for cmd, a in _numeric_actions() if a.type in (int, float)]
    assert not plain, f"flags typed int/float without a range: {plain}"


RANGED = [(cmd, a) for cmd, a in _numeric_actions() if getattr(a.type, "range", None) is not None]


@pytest.mark.parametrize("cmd,action", RANGED, ids=[f"{c} {a.option_strings[0]}" for c, a in RANGED])
def test_every_ranged_flag_refuses_values_outside_and_takes_one_inside(cmd, action, capsys):
    rng = action.type.range
    assert rng.outside() or rng == Range(), action.option_strings
    def text(v):
        one = str(int(v)) if rng.integer else repr(v)
        return f"{one},{one}" if getattr(action.type, "items", False) else one  # a list flag (--betas)

    for value in rng.outside():
        with pytest.raises(argparse.ArgumentTypeError, match="is out of range|must be a (positive|non-negative)") \
                as info:
            action.type(text(value))
        assert text(value).split(",")[0] in str(info.value)  # the value is named
    assert action.type(text(rng.inside())) is not None


@pytest.mark.parametrize("argv,flag", [
    (["lr-find", "--beta", "1.0"], "--beta 1.0 is out of range: beta must be in [0, 1)"),
    (["search", "--max-retry", "-1"], "--max-retry -1 is out of range: max_retry must be an integer >= 0"),
    (["compare", "--target", "0"], "--target 0 is out of range: target must be in (0, 1]"),
    (["data", "show", "mnist", "--count", "0"], "--count 0 is out of range: count must be an integer >= 1"),
    (["explain", "run", "--test-index", "0", "--noise", "-0.1"], "--noise -0.1 is out of range: noise must be >= 0"),
    (["predict", "run", "x.png", "--top-k", "0"], "--top-k: must be a positive integer, got 0"),
])
def test_commands_refuse_out_of_range_flags_in_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and flag in err, err


# ----------------------------------------------------------------------------------------------- TOML

@pytest.mark.parametrize("text,places", [
    ('lr = 0.1\n[optimizer]\nlr = 0.2\n', "at the top level and in section [optimizer]"),
    ('[optimizer]\nlr = 0.1\n[train]\nlr = 0.2\n', "at section [optimizer] and in section [train]"),
    ('epochs = 2\n[train]\nepochs = 2\n', "at the top level and in section [train]"),
])
def test_a_key_given_twice_in_one_file_is_an_error_naming_both_places(text, places, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    key = text.split("\n")[-2].split(" =")[0]
    assert str(info.value) == f"{path}: key {key!r} is given twice, {places}; keep one of them"


def test_a_file_with_a_key_once_per_section_reads(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optimizer]\nlr = 0.1\noptimizer = "sgd"\n[train]\nepochs = 2\n')
    assert load_toml(path) == {"lr": 0.1, "optimizer": "sgd", "epochs": 2}


def test_the_command_line_reports_a_twice_given_key(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('momentum = 0.5\n[optimizer]\nmomentum = 0.9\n')
    code = main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}: key 'momentum' is given twice" in err and err.count("\n") == 1, err


def test_a_model_file_with_a_key_twice_in_a_layer_is_refused(tmp_path):
    from convdescent.model_file import ModelFileError, read_model_file

    path = tmp_path / "net.toml"
    path.write_text('[[layers]]\ntype = "Dense"\nunits = 3\nunits = 4\n')
    with pytest.raises(ModelFileError, match=f"model file {path} is not valid TOML"):
        read_model_file(path)
