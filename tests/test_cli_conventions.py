"""Every subcommand's parser follows the command line's conventions: no abbreviations, one name for the output
folder, the run directory as the positional RUN_DIR, --json, --checkpoint best|last with one default, help with
defaults, and one-line 'convdescent: error:' messages with exit status 2."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from convdescent.argparsing import DefaultsHelpFormatter, walk_parsers
from convdescent.cli import DEFAULT_CHECKPOINT, build_parser, main

PARSER = build_parser()
ALL = [(" ".join(path), p) for path, p in walk_parsers(PARSER)]
LEAVES = [(name, p) for name, p in ALL
          if name and not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]
OTHER_OUTPUT_NAMES = {"--output", "--dest", "--dir", "--out-dir", "--output-dir", "--outdir", "--save-dir"}


def _number(text):
    try:
        return float(text.rstrip(".,"))
    except ValueError:
        return None


def _visible(p):
    return [a for a in p._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            and not isinstance(a, argparse._SubParsersAction)]


def test_every_command_is_walked():
    names = {n for n, _ in LEAVES}
    assert {"train", "evaluate", "predict", "report", "runs", "optimizers", "data list", "data show",
            "landscape", "search", "compare"} <= names


@pytest.mark.parametrize("name, parser", ALL, ids=[n or "convdescent" for n, _ in ALL])
def test_abbreviations_are_off_and_help_shows_defaults(name, parser):
    assert parser.allow_abbrev is False
    assert parser.formatter_class is DefaultsHelpFormatter
    formatter = parser._get_formatter()
    for action in _visible(parser):
        if isinstance(action, argparse._VersionAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help, f"{name} {label} has no help text"
        default = action.default
        if default is None or default is argparse.SUPPRESS or isinstance(default, bool) or default in ([], ()):
            continue
        text = formatter._expand_help(action)
        if isinstance(default, (list, tuple)):
            shown = {",".join(map(str, default)), " ".join(map(str, default))}
        elif isinstance(default, (int, float)):
            numbers = re.findall(r"-?[0-9][0-9.e+-]*", text)
            shown = {n for n in numbers if _number(n) == default}
        else:
            shown = {str(default)}
        assert "default" in text and any(s in text for s in shown), \
            f"{name} {label}: help {text!r} does not show its default {default!r}"


@pytest.mark.parametrize("name, parser", LEAVES, ids=[n for n, _ in LEAVES])
def test_one_convention_for_outputs_run_dirs_json_and_checkpoints(name, parser):
    flags = {s for a in _visible(parser) for s in a.option_strings}
    assert not flags & OTHER_OUTPUT_NAMES, f"{name}: the output flag is --out everywhere, not {flags & OTHER_OUTPUT_NAMES}"
    assert "--run" not in flags and "--run-dir" not in flags, f"{name}: the run directory is the positional RUN_DIR"
    for a in _visible(parser):
        if not a.option_strings and "run" in a.dest:
            assert a.dest == "run_dir" and a.metavar == "RUN_DIR", f"{name}: run directory given as {a.dest}"
        if "--checkpoint" in a.option_strings:
            assert tuple(a.choices) == ("best", "last") and a.default == DEFAULT_CHECKPOINT, name
    assert "--json" in flags, f"{name} reports results but has no --json"


@pytest.mark.parametrize("name", [n for n, _ in LEAVES])
def test_unknown_flags_and_abbreviations_are_one_line_errors_with_a_suggestion(name, capsys):
    path = name.split()
    parser = dict(LEAVES)[name]
    flags = sorted(s for a in _visible(parser) for s in a.option_strings if s.startswith("--"))
    # the required positionals get a value, so that the flag is what is wrong
    path += ["x" for a in _visible(parser) if not a.option_strings and a.nargs in (None, "+")]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            path += [group._group_actions[-1].option_strings[0], "0"]
    with pytest.raises(SystemExit) as info:
        main([*path, "--no-such-flag-at-all"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("convdescent: error: ") and len(err.strip().splitlines()) == 1
    assert "--no-such-flag-at-all" in err and "Traceback" not in err
    flag = flags[-1]
    with pytest.raises(SystemExit) as info:
        main([*path, flag[:-1], "1"])  # an abbreviation of a real flag is refused and the flag suggested
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("convdescent: error: ") and len(err.strip().splitlines()) == 1
    assert f"did you mean {flag}" in err or "did you mean --" in err, err


def test_the_issue_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--epoch", "3"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.strip() == ("convdescent: error: train: unrecognized argument --epoch; did you mean --epochs? "
                           "(see 'convdescent train --help')")
    with pytest.raises(SystemExit) as info:
        main(["trian"])
    assert info.value.code == 2 and "did you mean 'train'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["evaluate"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("convdescent: error: evaluate: ") and "RUN_DIR" in err


def test_old_spellings_still_parse_but_are_hidden():
    args = PARSER.parse_args(["evaluate", "r", "--output", "c.png"])
    assert args.out == "c.png"
    args = PARSER.parse_args(["runs", "--dir", "somewhere"])
    assert args.out == "somewhere"
    args = PARSER.parse_args(["train", "--json-lines"])
    assert args.json_lines is True
    args = PARSER.parse_args(["border", "--run", "r"])
    assert args.run_flag == "r"
    assert "--output" not in dict(ALL)["evaluate"].format_help()


def test_optimizers_fits_100_columns(capsys):
    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "adam" in out and "reduce_on_plateau" in out
    assert main(["optimizers", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "adam" in data["optimizers"] and "cosine" in data["schedules"]


def test_the_text_confusion_matrix_labels_rows_and_columns():
    import torch

    from convdescent.train.evaluation import format_evaluation

    ev = {"loss": 0.5, "acc": 0.8, "n": 30, "per_class_acc": torch.tensor([0.9, 0.7, 0.8]),
          "confusion": torch.tensor([[9, 1, 0], [2, 7, 1], [0, 2, 8]])}
    lines = format_evaluation(ev, ["T-shirt/top", "Trouser", "Bag"], "t").splitlines()
    head = next(i for i, ln in enumerate(lines) if "true \\ predicted" in ln)
    assert lines[head].split()[-3:] == ["0", "1", "2"]
    assert lines[head + 2].split() == ["0", "T-shirt/top", "9", "1", "0"]
    assert lines[head + 4].split() == ["2", "Bag", "0", "2", "8"]
