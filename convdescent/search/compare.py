"""Compare optimizers on one model and dataset, each at its own tuned learning rate (the DeepOBS protocol).

Protocol (Schneider, Balles and Hennig, "DeepOBS: A Deep Learning Optimizer Benchmark Suite", ICLR 2019):
first tune the learning rate of each optimizer on a log grid with short runs (one seed, judged by the best
validation accuracy), then rerun the best learning rate with K seeds for the full length and report the
mean and standard deviation of the final test accuracy, plus how many epochs and seconds each optimizer
needs to reach a target validation accuracy, and all the curves in one plot.

Optimizers are given by name (``sgd``, ``adam``, ...), by the aliases ``momentum`` (SGD with momentum 0.9)
and ``nesterov`` (SGD with Nesterov momentum 0.9), or with settings: ``sgd:momentum=0.5:nesterov=true``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from ..options import HYPERPARAMETER_BY_NAME, HYPERPARAMETERS
from .space import parse_value

ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "momentum": ("sgd", {"momentum": 0.9}),
    "nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
}
# Centre of the default learning-rate grid per optimizer: the usual working value on small CNNs.
TYPICAL_LR = {"gd": 0.1, "sgd": 0.05, "momentum": 0.01, "nesterov": 0.01, "rmsprop": 1e-3, "adagrad": 1e-2,
              "adadelta": 1.0, "adam": 1e-3, "adamw": 1e-3, "nadam": 2e-3, "radam": 1e-3, "adamax": 2e-3,
              "lion": 1e-4}
# Settings an optimizer of a comparison may carry: the schema's hyperparameters but the tuned learning rate.
SETTING_KEYS = (*(h.name for h in HYPERPARAMETERS if h.name != "lr"), "schedule")


class CompareError(ValueError):
    """A comparison is set up wrongly; the message names the argument and the value."""


def parse_optimizer(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``"sgd:momentum=0.9"`` -> (label, optimizer name, settings).

    Args:
        spec: a name, an alias (momentum, nesterov), or ``name:key=value:key=value``.

    Returns:
        (label shown in tables, optimizer name for the configuration, configuration settings).
    """
    from ..optim import OPTIMIZERS

    text = spec.strip()
    if not text:
        raise CompareError("optimizers must be names such as sgd,momentum,adam; got an empty name")
    head, *rest = text.split(":")
    if head in ALIASES:
        name, settings = ALIASES[head][0], dict(ALIASES[head][1])
    elif head in OPTIMIZERS:
        name, settings = head, {}
    else:
        raise CompareError(f"unknown optimizer {head!r} in --optimizers; choose from "
                           f"{', '.join([*OPTIMIZERS, *ALIASES])}")
    for part in rest:
        if "=" not in part:
            raise CompareError(f"optimizer settings are key=value, got {part!r} in {spec!r}")
        key, value = part.split("=", 1)
        key = key.strip()
        if key not in SETTING_KEYS:
            raise CompareError(f"unknown optimizer setting {key!r} in {spec!r}; use one of {', '.join(SETTING_KEYS)}")
        value = parse_value(value)
        if key != "schedule":
            h = HYPERPARAMETER_BY_NAME[key]
            if not h.applies_to(name):
                raise CompareError(f"{key} does not apply to {name} (in {spec!r})")
            try:
                value = h.check(value)
            except ValueError as e:
                raise CompareError(f"{e} (in --optimizers {spec})") from None
        settings[key] = value
    return text, name, settings


def default_lr_grid(label: str, name: str, points: int = 5, decades: float = 3.0) -> list[float]:
    """``points`` learning rates spaced evenly in log over ``decades`` decades around the usual value."""
    centre = TYPICAL_LR.get(label.split(":")[0], TYPICAL_LR.get(name, 1e-3))
    if points == 1:
        return [centre]
    lo = math.log10(centre) - decades / 2
    return [float(f"{10 ** (lo + decades * i / (points - 1)):.3g}") for i in range(points)]


def parse_lr_grid(text: str) -> tuple[float, float, int] | list[float]:
    """``"1e-4:1e-1:4"`` (LOW:HIGH:POINTS, log-spaced) or ``"1e-3,1e-2"`` (a list)."""
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
            if not (0 < lo < hi) or n < 2:
                raise ValueError
            return lo, hi, n
        values = [float(v) for v in text.split(",") if v.strip()]
        if not values or any(v <= 0 or not math.isfinite(v) for v in values):
            raise ValueError
        return sorted(values)
    except ValueError:
        raise CompareError(f"lr grid must be LOW:HIGH:POINTS (log-spaced, e.g. 1e-4:1e-1:4) or a list of positive "
                           f"numbers (e.g. 1e-3,1e-2), got {text!r}") from None


def expand_lr_grid(grid) -> list[float]:
    if isinstance(grid, tuple):
        lo, hi, n = grid
        a, b = math.log10(lo), math.log10(hi)
        return [float(f"{10 ** (a + (b - a) * i / (n - 1)):.3g}") for i in range(n)]
    return list(grid)


@dataclass
class CompareSettings:
    """Everything that defines a comparison.

    Attributes:
        optimizers: optimizer specs (see :func:`parse_optimizer`).
        base: training settings shared by every run (model, dataset, batch_size, ...).
        epochs: epochs of the final runs.
        tune_epochs: epochs of the tuning runs.
        seeds: K, the number of seeds of the final runs.
        lr_grid: None for per-optimizer default grids, or (low, high, points) / a list for all.
        grid_points: points of the default grids.
        target: target validation accuracy for "epochs/seconds to target" (None: 0.9 x the best mean).
        train_subset: train every run on this many training images, or None.
        out: folder for the results.
    """

    optimizers: list[str]
    base: dict[str, Any]
    epochs: int = 5
    tune_epochs: int = 2
    seeds: int = 3
    lr_grid: Any = None
    grid_points: int = 5
    target: float | None = None
    train_subset: int | None = None
    out: str = "runs/compare"
    parsed: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.optimizers:
            raise CompareError("optimizers must list at least one optimizer, e.g. sgd,momentum,adam")
        labels = [o.strip() for o in self.optimizers]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise CompareError(f"optimizers lists {dupes} twice")
        self.parsed = [parse_optimizer(o) for o in labels]
        for name in ("epochs", "tune_epochs", "seeds", "grid_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CompareError(f"{name} must be a positive integer, got {v!r}")
        if self.target is not None and not (0.0 < self.target <= 1.0):
            raise CompareError(f"target must be an accuracy in (0, 1], got {self.target!r}")
        if self.train_subset is not None and (isinstance(self.train_subset, bool)
                                              or not isinstance(self.train_subset, int) or self.train_subset < 1):
            raise CompareError(f"train_subset must be a positive number of images, got {self.train_subset!r}")
        if self.base.get("val_split", 5000) == 0:
            raise CompareError("tuning needs a validation split: val_split must not be 0")
        if "lr" in self.base and self.base["lr"] is not None:
            raise CompareError("lr is tuned per optimizer; give --lr-grid instead of lr")

    def grid_for(self, label: str, name: str) -> list[float]:
        if self.lr_grid is None:
            return default_lr_grid(label, name, self.grid_points)
        return expand_lr_grid(self.lr_grid)

    def to_dict(self) -> dict[str, Any]:
        return {"optimizers": list(self.optimizers), "base": dict(self.base), "epochs": self.epochs,
                "tune_epochs": self.tune_epochs, "seeds": self.seeds,
                "lr_grid": list(self.lr_grid) if self.lr_grid is not None else None,
                "grid_points": self.grid_points, "target": self.target, "train_subset": self.train_subset,
                "out": str(self.out)}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    # one value has no spread: None, shown as the mean alone rather than as "± 0"
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _to_target(curve: list[float], times: list[float], target: float) -> tuple[int | None, float | None]:
    """(epoch, seconds) at which the validation accuracy first reaches the target, or (None, None)."""
    total = 0.0
    for i, (acc, t) in enumerate(zip(curve, times)):
        total += t
        if acc is not None and acc >= target:
            return i + 1, total
    return None, None


def run_compare(settings: CompareSettings, runner: Callable | None = None,
                stream: TextIO | None = None) -> dict[str, Any]:
    """Tune, rerun with seeds, and write the comparison (report.html, compare.md, compare.json, plots).

    Args:
        settings: the comparison.
        runner: ``runner(config, trial=None) -> TrialOutcome`` trains one run (default: trains for real,
            with the data loaded once).
        stream: where progress and the table go (default stdout).

    Returns:
        The summary (also compare.json).
    """
    from .trials import TrialRunner

    out = stream if stream is not None else sys.stdout
    out_dir = Path(settings.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if runner is None:
        runner = TrialRunner(settings.base, train_subset=settings.train_subset, out=out_dir / "runs")
    tuning: dict[str, list[dict[str, Any]]] = {}
    results: dict[str, dict[str, Any]] = {}
    base_seed = int(settings.base.get("seed", 0) or 0)
    for label, name, extra in settings.parsed:
        grid = settings.grid_for(label, name)
        print(f"[{label}] tuning lr over {', '.join(f'{v:g}' for v in grid)} ({settings.tune_epochs} epochs each)",
              file=out, flush=True)
        rows = []
        for lr in grid:
            config = dict(settings.base, optimizer=name, lr=lr, epochs=settings.tune_epochs, seed=base_seed, **extra)
            config["name"] = f"tune-{_slug(label)}-lr{lr:g}"
            outcome = _safe_run(runner, config)
            score = outcome.attrs.get("best_val_acc")
            rows.append({"lr": lr, "score": score, "error": outcome.attrs.get("error")})
            print(f"[{label}]   lr {lr:<8g} best val_acc {_fmt(score)}", file=out, flush=True)
        tuning[label] = rows
        scored = [r for r in rows if r["score"] is not None and math.isfinite(r["score"])]
        if not scored:
            results[label] = {"optimizer": name, "settings": extra, "lr": None, "runs": [],
                              "note": "every tuning run failed"}
            continue
        best = max(scored, key=lambda r: (r["score"], -r["lr"]))
        note = ""
        if best["lr"] in (grid[0], grid[-1]) and len(grid) > 1:
            note = f"the best lr {best['lr']:g} is at the edge of the grid; widen it to be sure"
        print(f"[{label}] best lr {best['lr']:g}; rerunning with {settings.seeds} seeds for {settings.epochs} epochs",
              file=out, flush=True)
        runs = []
        for k in range(settings.seeds):
            seed = base_seed + k
            config = dict(settings.base, optimizer=name, lr=best["lr"], epochs=settings.epochs, seed=seed, **extra)
            config["name"] = f"final-{_slug(label)}-seed{seed}"
            outcome = _safe_run(runner, config)
            a = outcome.attrs
            runs.append({"seed": seed, "test_acc": a.get("test_acc"), "val_acc_curve": a.get("val_acc_curve", []),
                         "loss_curve": a.get("loss_curve", []), "epoch_times": a.get("epoch_times", []),
                         "seconds": a.get("train_seconds"), "run_dir": a.get("run_dir"), "error": a.get("error")})
            print(f"[{label}]   seed {seed}: test_acc {_fmt(a.get('test_acc'))}", file=out, flush=True)
        results[label] = {"optimizer": name, "settings": extra, "lr": best["lr"], "tuning_score": best["score"],
                          "runs": runs, "note": note}
    summary = _summarize(settings, tuning, results)
    write_compare(settings, summary, out_dir)
    print(summary["markdown"], file=out, flush=True)
    print(f"Wrote {out_dir / 'report.html'}, {out_dir / 'compare.md'}", file=out, flush=True)
    return summary


def _safe_run(runner, config):
    from .trials import TrialOutcome

    try:
        return runner(config, None)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one failed run is a result of the comparison, not the end of it
        return TrialOutcome(None, False, {"error": f"{type(e).__name__}: {e}"})


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _fmt(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _summarize(settings: CompareSettings, tuning, results) -> dict[str, Any]:
    finals = {}
    for label, r in results.items():
        curves = [run["val_acc_curve"] for run in r["runs"] if run["val_acc_curve"]]
        finals[label] = statistics.fmean([c[-1] for c in curves]) if curves else None
    target = settings.target
    if target is None:
        best_final = max((v for v in finals.values() if v is not None), default=None)
        target = round(0.9 * best_final, 4) if best_final is not None else None
    rows = []
    for label, r in results.items():
        test_mean, test_std = _mean_std([run["test_acc"] for run in r["runs"]])
        reach_epochs, reach_secs = [], []
        for run in r["runs"]:
            if target is None:
                continue
            e, s = _to_target(run["val_acc_curve"], run["epoch_times"], target)
            if e is not None:
                reach_epochs.append(e)
                reach_secs.append(s)
        ep_mean, ep_std = _mean_std(reach_epochs)
        s_mean, s_std = _mean_std(reach_secs)
        rows.append({"optimizer": label, "lr": r.get("lr"), "test_acc_mean": test_mean, "test_acc_std": test_std,
                     "final_val_acc_mean": finals.get(label), "reached": len(reach_epochs), "seeds": len(r["runs"]),
                     "epochs_to_target_mean": ep_mean, "epochs_to_target_std": ep_std,
                     "seconds_to_target_mean": s_mean, "seconds_to_target_std": s_std, "note": r.get("note", "")})
    md = markdown_table(rows, target)
    return {"settings": settings.to_dict(), "target": target, "rows": rows, "tuning": tuning, "results": results,
            "markdown": md}


def _pm(mean, std, digits=4, scale=1.0) -> str:
    if mean is None:
        return "-"
    if std is None:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], target: float | None) -> str:
    """The comparison as a Markdown table: lr, test accuracy mean ± std, epochs and seconds to target."""
    tgt = f"{target:.3f}" if target is not None else "-"
    spread = " (mean ± std)" if any(r.get("test_acc_std") is not None for r in rows) else ""
    lines = [f"| optimizer | lr | test acc{spread} | final val acc | epochs to val acc {tgt} | "
             f"seconds to val acc {tgt} | reached |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = f"{r['lr']:g}" if r["lr"] is not None else "-"
        lines.append(f"| {r['optimizer']} | {lr} | {_pm(r['test_acc_mean'], r['test_acc_std'])} | "
                     f"{_fmt(r['final_val_acc_mean'])} | "
                     f"{_pm(r['epochs_to_target_mean'], r['epochs_to_target_std'], 1)} | "
                     f"{_pm(r['seconds_to_target_mean'], r['seconds_to_target_std'], 1)} | "
                     f"{r['reached']}/{r['seeds']} |")
    notes = [f"- {r['optimizer']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_compare(settings: CompareSettings, summary: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write the plots, compare.md, compare.json and a self-contained report.html."""
    from ..train.checkpoint import atomic_write_text
    from .plots import plot_curves, plot_lr_grid

    results = summary["results"]
    files = {}
    files["val_acc_plot"] = plot_curves({k: [run["val_acc_curve"] for run in r["runs"]] for k, r in results.items()},
                                        out_dir / "val_acc.png", ylabel="validation accuracy",
                                        title="Validation accuracy per epoch (thin: seeds, thick: mean)")
    files["loss_plot"] = plot_curves({k: [run["loss_curve"] for run in r["runs"]] for k, r in results.items()},
                                     out_dir / "train_loss.png", ylabel="training loss",
                                     title="Training loss per epoch (thin: seeds, thick: mean)")
    files["tuning_plot"] = plot_lr_grid({k: [(row["lr"], row["score"]) for row in rows]
                                         for k, rows in summary["tuning"].items()}, out_dir / "lr_tuning.png")
    atomic_write_text(out_dir / "compare.md", summary["markdown"] + "\n")
    files["markdown"] = str(out_dir / "compare.md")
    summary["files"] = files
    atomic_write_text(out_dir / "compare.json", json.dumps(_clean(summary), indent=2) + "\n")
    atomic_write_text(out_dir / "report.html", _html(settings, summary, files))
    files["report"] = str(out_dir / "report.html")
    return files


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _img(path: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _html(settings: CompareSettings, summary: dict[str, Any], files: dict[str, str]) -> str:
    e = html.escape
    rows_html = []
    for r in summary["rows"]:
        lr = f"{r['lr']:g}" if r["lr"] is not None else "-"
        rows_html.append(
            "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in (
                r["optimizer"], lr, _pm(r["test_acc_mean"], r["test_acc_std"]), _fmt(r["final_val_acc_mean"]),
                _pm(r["epochs_to_target_mean"], r["epochs_to_target_std"], 1),
                _pm(r["seconds_to_target_mean"], r["seconds_to_target_std"], 1), f"{r['reached']}/{r['seeds']}",
                r.get("note", ""))) + "</tr>")
    tuning_rows = []
    for label, rows in summary["tuning"].items():
        cells = ", ".join(f"{row['lr']:g}: {_fmt(row['score'])}" for row in rows)
        tuning_rows.append(f"<tr><td>{e(label)}</td><td>{e(cells)}</td></tr>")
    target = summary["target"]
    base = ", ".join(f"{k}={v}" for k, v in settings.base.items() if v is not None)
    subset = (f" on a random subset of {settings.train_subset} training images" if settings.train_subset else "")
    spread = " (mean ± std)" if any(r.get("test_acc_std") is not None for r in summary["rows"]) else ""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Optimizer comparison</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;}}table{{border-collapse:collapse;margin:1em 0;}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;}}img{{max-width:100%;}}</style></head><body>
<h1>Optimizer comparison</h1>
<p>Protocol (DeepOBS, Schneider et al. 2019): each optimizer's learning rate tuned on a log grid with
{settings.tune_epochs}-epoch runs (seed {settings.base.get('seed', 0)}, best validation accuracy), then the best
rerun with {settings.seeds} seeds for {settings.epochs} epochs{e(subset)}. Target validation accuracy:
{_fmt(target, 3)}.</p>
<p>Shared settings: {e(base)}</p>
<h2>Results</h2>
<table><tr><th>optimizer</th><th>lr</th><th>test acc{spread}</th><th>final val acc</th>
<th>epochs to target</th><th>seconds to target</th><th>reached</th><th>note</th></tr>
{''.join(rows_html)}</table>
<h2>Curves</h2>
{_img(files['val_acc_plot'])}
{_img(files['loss_plot'])}
<h2>Learning-rate tuning</h2>
{_img(files['tuning_plot'])}
<table><tr><th>optimizer</th><th>lr: best validation accuracy</th></tr>{''.join(tuning_rows)}</table>
</body></html>
"""
