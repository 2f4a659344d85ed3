"""No command shows a flag it ignores: every flag of every command's parser is read by that command.

The reads are found in the source: from the function a command runs (``func``), every ``args.NAME`` and
``getattr(args, ...)`` of it and of the functions it hands ``args`` to, following them into other modules.
A ``getattr`` whose name is computed in a loop (``for key in RUN_KEYS: getattr(args, key)``) is resolved
by evaluating the loop's values, taking a parameter's value from the call that passed it. A read that
cannot be resolved fails the test rather than being guessed.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import textwrap

import pytest

from convdescent.argparsing import walk_parsers
from convdescent.cli import build_parser


class Unresolved(Exception):
    pass


def _local_imports(tree: ast.AST, module: str) -> dict:
    """Names bound by ``from x import y`` statements inside a function."""
    env = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), module.rsplit(".", 1)[0]
                                               if node.level else None) if node.level else node.module
            mod = importlib.import_module(base)
            for a in node.names:
                try:
                    env[a.asname or a.name] = getattr(mod, a.name)
                except AttributeError:
                    env[a.asname or a.name] = importlib.import_module(f"{base}.{a.name}")
    return env


def _eval(expr: ast.expr, env: dict):
    return eval(compile(ast.Expression(expr), "<flags>", "eval"), env)  # noqa: S307 - our own source


def _loops_over(tree: ast.AST, target: ast.AST):
    """The (loop variable, iterable) pairs of the for-loops and comprehensions enclosing ``target``."""
    found = []

    def visit(node, stack):
        if node is target:
            found.extend(stack)
            return True
        pushed = list(stack)
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
            pushed.append((node.target.id, node.iter))
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            for gen in node.generators:
                if isinstance(gen.target, ast.Name):
                    pushed.append((gen.target.id, gen.iter))
        return any(visit(child, pushed) for child in ast.iter_child_nodes(node))

    visit(tree, [])
    return found


def reads(func, argname: str, bound: dict, seen: set) -> set[str]:
    """The attributes of the namespace ``argname`` that ``func`` (and what it hands it to) reads."""
    key = (func.__code__, argname, tuple(sorted((k, repr(v)) for k, v in bound.items())))
    if key in seen:
        return set()
    seen.add(key)
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    env = {**func.__globals__, **_local_imports(tree, func.__module__), **bound}
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == argname \
                and isinstance(node.ctx, ast.Load):
            out.add(node.attr)
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") and node.args \
                and isinstance(node.args[0], ast.Name) and node.args[0].id == argname:
            name = node.args[1]
            if isinstance(name, ast.Constant):
                out.add(name.value)
                continue
            loops = [(v, it) for v, it in _loops_over(tree, node) if v in {n.id for n in ast.walk(name)
                                                                           if isinstance(n, ast.Name)}]
            if not loops:
                raise Unresolved(f"{func.__qualname__}: getattr({argname}, {ast.unparse(name)})")
            var, iterable = loops[-1]
            try:
                for item in _eval(iterable, env):
                    out.add(_eval(name, {**env, var: item}))
            except Exception as e:
                raise Unresolved(f"{func.__qualname__}: for {var} in {ast.unparse(iterable)}: {e}") from None
            continue
        positions = [i for i, a in enumerate(node.args) if isinstance(a, ast.Name) and a.id == argname]
        if not positions:
            continue
        try:
            callee = _eval(node.func, env)
        except Exception:
            continue  # a method of a local object: it is not given the command's arguments
        callee = getattr(callee, "__wrapped__", callee)
        if not inspect.isfunction(callee) or not callee.__module__.startswith("convdescent"):
            continue
        params = list(inspect.signature(callee).parameters)
        values = {}
        for i, a in enumerate(node.args):
            if i < len(params) and i not in positions:
                try:
                    values[params[i]] = _eval(a, env)
                except Exception:
                    pass
        for kw in node.keywords:
            if kw.arg:
                try:
                    values[kw.arg] = _eval(kw.value, env)
                except Exception:
                    pass
        for i in positions:
            out |= reads(callee, params[i], values, seen)
    return out


def _commands():
    funcs = {}
    for path, parser in walk_parsers(build_parser()):
        # a group's subcommands (data list, data show) run the group's func unless they set their own
        func = funcs[path] = parser._defaults.get("func") or funcs.get(path[:-1])
        has_sub = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        if path and func is not None and not has_sub:
            yield " ".join(path), parser, func


def _dests(parser) -> set[str]:
    skip = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    return {a.dest for a in parser._actions if not isinstance(a, skip)}


COMMANDS = list(_commands())


@pytest.mark.parametrize("command,parser,func", COMMANDS, ids=[c for c, _, _ in COMMANDS])
def test_every_flag_of_a_command_is_read_by_it(command, parser, func):
    name = next(iter(inspect.signature(func).parameters))
    used = reads(func, name, {}, set())
    ignored = sorted(_dests(parser) - used)
    flags = [next(a.option_strings[0] if a.option_strings else a.dest for a in parser._actions if a.dest == d)
             for d in ignored]
    assert not ignored, f"'convdescent {command}' shows {', '.join(flags)} but never reads them"


def test_the_check_finds_a_flag_nobody_reads():
    def cmd(args):
        return args.used + helper(args)

    p = argparse.ArgumentParser()
    p.add_argument("--used")
    p.add_argument("--other")
    p.add_argument("--never")
    globals()["helper"] = lambda a: 0  # not a convdescent function: not followed
    assert _dests(p) - reads(cmd, "args", {}, set()) == {"other", "never"}


def test_the_check_follows_loops_and_calls():
    from convdescent.search.cli import RUN_KEYS, _base_config

    assert reads(_base_config, "args", {"keys": RUN_KEYS}, set()) >= set(RUN_KEYS) | {"config"}
