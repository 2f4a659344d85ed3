"""The settings a resumed run continues with: those its checkpoint was trained with, changed only on request.

A checkpoint records the run's resolved settings. On resume they are compared with the run directory's
``config.toml`` (which a user may have edited) and with the settings given now. Keys that only steer how
the run is carried out (``RESUMABLE_KEYS``: length, logging, device, ...) may change; any other difference is
an error that lists each changed key, unless the caller allows that key by name (``--allow-change KEY``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .config import OPTION_BY_KEY, RESUMABLE_KEYS, ConfigError, load_toml, resolve_config

CONFIG_FILE = "config.toml"


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value)


def check_allowed_keys(allow_change: Iterable[str]) -> set[str]:
    """The keys of ``--allow-change``, each checked to be a configuration key.

    Raises:
        ConfigError: a name that is not a configuration key.
    """
    allowed = set()
    for key in allow_change or ():
        name = str(key).replace("-", "_")
        if name not in OPTION_BY_KEY:
            raise ConfigError(f"--allow-change {key}: {key!r} is not a configuration key; known keys: "
                              f"{', '.join(OPTION_BY_KEY)}")
        allowed.add(name)
    return allowed


def resume_config(run_dir: str | Path, recorded: dict | None, overrides: dict | None,
                  allow_change: Iterable[str] = ()) -> tuple[dict, list[tuple[str, Any, Any, str]]]:
    """The resolved configuration to continue a run with.

    Args:
        run_dir: the run directory (its config.toml is read).
        recorded: the settings saved in the checkpoint (``ckpt["config"]``); None for checkpoints written
            before they were recorded, in which case config.toml stands in for them.
        overrides: settings given now (None values mean "not given").
        allow_change: keys that may differ from the recorded settings although they change the training.

    Returns:
        (configuration, changes): changes are (key, old value, new value, where the new value came from).

    Raises:
        ConfigError: a setting differs from the recorded one and is neither resumable nor allowed; the
            message lists every such key with both values and says what to do.
    """
    run_dir = Path(run_dir)
    allowed = check_allowed_keys(allow_change)
    file_cfg = resolve_config(load_toml(run_dir / CONFIG_FILE), source=str(run_dir / CONFIG_FILE))
    if recorded is not None:
        known = {k: v for k, v in recorded.items() if k in OPTION_BY_KEY}
        base = resolve_config(known, source=f"the checkpoint of {run_dir}")
    else:
        base = dict(file_cfg)
    cfg = dict(base)
    changes: list[tuple[str, Any, Any, str]] = []
    refused: list[tuple[str, Any, Any, str]] = []
    for key in OPTION_BY_KEY:
        if file_cfg[key] != base[key]:
            change = (key, base[key], file_cfg[key], f"{run_dir / CONFIG_FILE}")
            (changes if key in RESUMABLE_KEYS or key in allowed else refused).append(change)
            cfg[key] = file_cfg[key]
    given = {}
    for key, value in (overrides or {}).items():
        if key not in OPTION_BY_KEY:
            raise ConfigError(f"unknown configuration key {key!r}")
        if value is None:
            continue
        given[key] = resolve_config({key: value})[key]
    for key, value in given.items():
        if value == cfg[key]:
            continue
        refused = [r for r in refused if r[0] != key]  # the value given now replaces the edited one
        changes = [c for c in changes if c[0] != key]
        change = (key, base[key], value, "the command line")
        if value == base[key]:
            cfg[key] = value
            continue
        (changes if key in RESUMABLE_KEYS or key in allowed else refused).append(change)
        cfg[key] = value
    if refused:
        raise ConfigError(_refusal(run_dir, refused))
    if given.get("epochs") is not None and given.get("steps") is None:
        cfg["steps"] = None  # asking for epochs on resume means epochs, even if the run was planned in steps
    return cfg, changes


def _refusal(run_dir: Path, refused: list[tuple[str, Any, Any, str]]) -> str:
    lines = [f"resuming {run_dir} would train with other settings than its checkpoint was trained with:"]
    for key, old, new, where in refused:
        lines.append(f"  {key}: {_show(old)} in the checkpoint, {_show(new)} from {where}")
    keys = " ".join(f"--allow-change {k}" for k, *_ in refused)
    lines.append(f"To train with the new settings, start a new run from these weights: convdescent train "
                 f"--config {run_dir / CONFIG_FILE} --init-from {run_dir}; to continue this run with them "
                 f"anyway, add {keys}; to continue it as it was, undo the change")
    return "\n".join(lines)


def describe_changes(changes: list[tuple[str, Any, Any, str]]) -> str:
    """One line naming the settings a resumed run changed (empty when none)."""
    if not changes:
        return ""
    return "Changed on resume: " + "; ".join(f"{k} {_show(old)} -> {_show(new)}" for k, old, new, _ in changes)
