"""The run report: one self-contained report.html per run directory (figures embedded as base64 PNG).

``build_report(run_dir)`` writes it; ``convdescent report RUN_DIR`` calls it. Built-in sections: summary,
loss and accuracy curves, learning rate over steps, gradient norm per layer over steps, confusion matrix,
misclassified test images, events and the configuration. Other modules add sections with
``register_section(title, fn)``, where ``fn(run) -> html or None`` receives the ``Run`` (``run.model`` may be
None when the run has no readable checkpoint); modules named in ``SECTION_MODULES`` are imported first so
their sections register themselves.
"""

from __future__ import annotations

import base64
import html
import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable

from . import plots

SECTIONS: list[tuple[str, Callable[[Any], str | None]]] = []
# Optional modules that register sections when imported (skipped when not installed).
SECTION_MODULES: list[str] = ["convdescent.diagnostics.report"]


def register_section(title: str, fn: Callable[[Any], str | None]) -> None:
    """Add a report section after the built-in ones; ``fn(run)`` returns HTML (or None to leave it out).

    Registering the same title again replaces the earlier function.
    """
    if not isinstance(title, str) or not title:
        raise ValueError(f"title must be a non-empty string, got {title!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable as fn(run) -> html or None, got {fn!r}")
    for i, (t, _) in enumerate(SECTIONS):
        if t == title:
            SECTIONS[i] = (title, fn)
            return
    SECTIONS.append((title, fn))


def figure_html(png: bytes, caption: str, fig_id: str) -> str:
    """An embedded PNG figure with a caption (for section functions); one wider than half the page is
    stretched to the page's width."""
    data = base64.b64encode(png).decode("ascii")
    wide = " data-wide" if _png_width(png) >= 470 else ""
    return (f'<figure id="{html.escape(fig_id)}"><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{data}"{wide}><figcaption>{html.escape(caption)}</figcaption></figure>')


def _png_width(png: bytes) -> int:
    # the IHDR chunk of a PNG holds the width in bytes 16-19
    return int.from_bytes(png[16:20], "big") if png[:8] == b"\x89PNG\r\n\x1a\n" else 0


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    if v is None:
        return "n/a"
    return html.escape(str(v))


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _summary_section(run) -> str:
    s = run.summary or {}
    rows = [("status", s.get("status", "unknown")), ("model", run.config.get("model")), ("dataset", run.dataset),
            ("epochs", f"{s.get('epochs_done', len(run.history))} of {s.get('epochs', run.config.get('epochs'))}"),
            ("steps", s.get("steps")), ("best val_acc", s.get("best_val_acc")), ("best epoch", s.get("best_epoch")),
            ("final val_acc", s.get("final_val_acc")), ("final loss", s.get("final_loss")),
            ("test acc", s.get("test_acc")), ("test loss", s.get("test_loss")),
            ("test weights", s.get("test_weights")), ("wall time (s)", s.get("wall_time_s")),
            ("optimizer", s.get("optimizer")), ("parameters", s.get("params")), ("device", s.get("device")),
            ("precision", s.get("precision")), ("rollbacks", s.get("rollbacks"))]
    par = s.get("distributed")
    if isinstance(par, dict):  # a data-parallel run (convdescent.distributed)
        rows += [("processes", par.get("world_size")),
                 ("communication wait per step (ms)", 1e3 * par.get("wait_per_step_s", math.nan)),
                 ("communication overlapped with the backward",
                  f"{100 * par['overlap']:.0f}%" if isinstance(par.get("overlap"), (int, float)) else None),
                 ("optimizer state on rank 0 (MiB)", par["optimizer_state_bytes"] / 2 ** 20
                  if isinstance(par.get("optimizer_state_bytes"), (int, float)) else None)]
    out = _table(rows)
    if s.get("error"):
        out += f"<p class='error'>{html.escape(str(s['error']))}</p>"
    if s.get("resume"):
        out += f"<p>Resume with <code>{html.escape(s['resume'])}</code></p>"
    return out


def _missing(what: str) -> str:
    return f"<p class='missing'>{html.escape(what)}</p>"


def _curves_section(run) -> str:
    parts = []
    for metric, fig_id, caption in (("loss", "loss-curves", "Training and validation loss"),
                                    ("acc", "accuracy-curves", "Training and validation accuracy")):
        png = plots.curves_png(run.metrics, metric)
        parts.append(figure_html(png, caption, fig_id) if png else _missing(f"no {metric} records yet"))
    return "".join(parts)


def _lr_section(run) -> str:
    png = plots.lr_png(run.metrics)
    return figure_html(png, "Learning rate over steps (dashed: rollbacks)", "learning-rate") if png else \
        _missing("no learning-rate records yet")


def _grad_section(run) -> str:
    png = plots.grad_norm_png(run.metrics)
    if not png:
        return _missing("no gradient-norm records (they are written every log_every steps; log_every was 0 or "
                        "the run was shorter)")
    return figure_html(png, "Gradient L2 norm per layer over steps (before clipping and the optimizer)",
                       "grad-norms")


def _confusion_section(run) -> str:
    ev = run.evaluation
    if ev is None:
        return _missing("no test evaluation (the run did not finish, or its dataset has no test split); "
                        "'convdescent evaluate RUN_DIR' computes one")
    parts = [figure_html(plots.confusion_png(ev["confusion"], run.classes),
                         f"Confusion matrix on the {ev.get('split', 'test')} set "
                         f"(accuracy {ev['acc']:.4f}, {ev['n']} images)", "confusion-matrix")]
    per_class = ev["per_class_acc"].tolist()
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{_fmt(float(a))}</td></tr>"
                   for c, a in zip(run.classes, per_class))
    parts.append(f"<details><summary>Per-class accuracy</summary><table><tr><th>class</th><th>accuracy</th></tr>"
                 f"{rows}</table></details>")
    return "".join(parts)


def _misclassified_section(run) -> str:
    ev = run.evaluation
    if ev is None:
        return _missing("no test evaluation, so no misclassified images")
    png = plots.misclassified_png(ev, run.classes)
    if png is None:
        return "<p>No test image was misclassified.</p>"
    return figure_html(png, "Misclassified test images: true and predicted labels, with the predicted "
                            "probability", "misclassified")


def _events_section(run) -> str | None:
    events = [r for r in run.metrics if r.get("type") == "event"]
    if not events:
        return None
    from ..train.callbacks import format_event

    items = "".join(f"<li>step {_fmt(e.get('step'))}: {html.escape(format_event(e))}</li>" for e in events)
    return f"<ul>{items}</ul>"


def _config_section(run) -> str:
    from ..train.config import dump_toml

    try:
        text = dump_toml(run.config)
    except ValueError:
        text = json.dumps(run.config, indent=2, default=str)
    return f'<pre id="configuration">{html.escape(text)}</pre>'


BUILTIN_SECTIONS: list[tuple[str, Callable[[Any], str | None]]] = [
    ("Summary", _summary_section),
    ("Loss and accuracy", _curves_section),
    ("Learning rate", _lr_section),
    ("Gradient norms", _grad_section),
    ("Confusion matrix", _confusion_section),
    ("Misclassified test images", _misclassified_section),
    ("Events", _events_section),
    ("Configuration", _config_section),
]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;
font-size:.9em}th{background:#f6f6f6}figure{margin:1em 0}img{max-width:100%;height:auto}
figure img[data-wide]{width:100%}figcaption{font-size:.85em;color:#555}
pre{background:#f6f6f6;padding:.8em;white-space:pre-wrap;overflow-wrap:anywhere;font-size:.85em}
td,h1,h2,p,li,figcaption,code{overflow-wrap:anywhere}.missing{color:#777;font-style:italic}
.error{color:#b00}
"""


def _load_for_report(run_dir: Path):
    from ..train.checkpoint import CheckpointError, UnsafeCheckpointError
    from ..train.run import Run, load_run, read_json, read_metrics
    from ..train.config import load_toml, resolve_config
    from ..data import Normalizer

    try:
        return load_run(run_dir, checkpoint="last")
    except UnsafeCheckpointError:
        raise  # a planted file is news to the user, not a gap to report around
    except CheckpointError:
        pass
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.toml); pass a folder written by "
                              f"'convdescent train'")
    config = resolve_config(load_toml(run_dir / "config.toml"), source=str(run_dir / "config.toml"))
    summary = read_json(run_dir / "summary.json") or {}
    return Run(path=run_dir, config=config, model=None, normalizer=Normalizer.unit(), classes=[],
               dataset=str(summary.get("dataset", config["dataset"])), checkpoint="none",
               checkpoint_path=run_dir / "checkpoints" / "last.pt", metrics=read_metrics(run_dir / "metrics.jsonl"),
               summary=summary)


def _import_section_modules() -> None:
    for name in SECTION_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise


def build_report(run_or_dir, path=None) -> Path:
    """Write the self-contained report.html of a run.

    Args:
        run_or_dir: a run directory or a ``Run`` from ``load_run``.
        path: output file (default ``<run_dir>/report.html``).

    Returns:
        The path written (atomically).
    """
    from ..train.checkpoint import atomic_write_text

    run = run_or_dir if hasattr(run_or_dir, "metrics") and hasattr(run_or_dir, "path") else \
        _load_for_report(Path(run_or_dir))
    _import_section_modules()
    sections = []
    for title, fn in BUILTIN_SECTIONS + SECTIONS:
        try:
            body = fn(run)
        except Exception as e:  # one broken section must not cost the whole report
            body = f"<p class='error'>this section failed: {html.escape(type(e).__name__)}: {html.escape(str(e))}</p>"
        if body is None:
            continue
        anchor = "".join(c if c.isalnum() else "-" for c in title.lower())
        sections.append(f'<section id="section-{anchor}"><h2>{html.escape(title)}</h2>{body}</section>')
    title = f"convdescent run {run.path.name}"
    doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_STYLE}</style></head>"
           f"<body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")
    out = Path(path) if path is not None else run.path / "report.html"
    atomic_write_text(out, doc)
    return out


__all__ = ["BUILTIN_SECTIONS", "SECTIONS", "SECTION_MODULES", "build_report", "figure_html", "register_section"]
