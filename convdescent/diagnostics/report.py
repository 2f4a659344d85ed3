"""Report sections of the diagnostics, registered with ``convdescent.report`` when this module is imported.

- "Gradient health": the monitor's figures over steps (gradient norm, largest |g|, update-to-weight ratio,
  clipped fraction, dead ReLUs, activation mean and std) and its warnings with their remedies.
- "What the network looks at": gradient saliency, SmoothGrad and Grad-CAM for a few test images, the first
  layer's filters and every conv layer's activation maps for one image.
- "Border effects and loss landscape": the pictures written by ``convdescent border`` / ``landscape`` into
  the run's diagnostics folder, when those commands were run.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from .health import health_records
from .plotting import figure_to_png, new_figure

EXPLAIN_IMAGES = 3       # test images explained in the report
SMOOTHGRAD_SAMPLES = 16  # fewer than the command's default: the report is rebuilt after every run


def _figure(png: bytes, caption: str, fig_id: str) -> str:
    from ..report import figure_html

    return figure_html(png, caption, fig_id)


def _note(text: str) -> str:
    return f"<p class='missing'>{html.escape(text)}</p>"


# -- gradient health ---------------------------------------------------------------------------------------

def _series(checks: list[dict], group: str, key: str, only=None) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in checks:
        for name, st in r.get(group, {}).items():
            if only is not None and not only(st):
                continue
            v = st.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs, ys = out.setdefault(name, ([], []))
                xs.append(r["step"])
                ys.append(float(v))
    return out


def health_png(checks: list[dict], warnings: list[dict]) -> bytes:
    """Six panels of monitor figures over steps, with vertical marks at the steps that raised warnings."""
    weight = lambda st: st.get("ndim", 2) >= 2  # noqa: E731
    panels = [
        ("grad", _series(checks, "params", "grad_norm"), "gradient norm ||g||", True),
        ("max", _series(checks, "params", "grad_max"), "largest |g| element", True),
        ("ratio", _series(checks, "params", "update_ratio", weight), "update / weight norm (weights)", True),
        ("clip", _series(checks, "params", "clip_frac"), "fraction of elements clipped", False),
        ("dead", _series(checks, "layers", "dead_frac"), "dead ReLU units (fraction)", False),
        ("act", _series(checks, "layers", "act_std"), "activation std (solid), mean (dotted)", False),
    ]
    # a panel with nothing to show is left out: no records, or no clipping at all (none configured)
    panels = [p for p in panels if p[1] and not (p[0] == "clip" and not any(y for _, ys in p[1].values() for y in ys))]
    if not panels:
        panels = [("grad", {}, "gradient norm ||g||", True)]
    cols = min(3, len(panels))
    fig, axes = new_figure(math.ceil(len(panels) / cols), cols, size=(4.2, 3.0))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    panels = [(ax, *rest) for ax, rest in zip(axes.flat, panels)]
    means = _series(checks, "layers", "act_mean")
    warn_steps = sorted({w["step"] for w in warnings})
    for ax, kind, series, title, log in panels:
        for name, (xs, ys) in series.items():
            line, = ax.plot(xs, ys, lw=1.0, label=name)
            if kind == "act" and name in means:
                ax.plot(*means[name], lw=0.8, ls=":", color=line.get_color())
        if log and any(y > 0 for _, ys in series.values() for y in ys):
            ax.set_yscale("log")
        if kind == "ratio":
            ax.axhspan(1e-4, 1e-2, color="green", alpha=0.08, label="healthy band")
            ax.axhline(1e-3, color="green", lw=0.6, ls="--")
        if kind == "dead":
            ax.axhline(0.5, color="red", lw=0.6, ls="--")
            ax.set_ylim(-0.02, 1.02)
        for s in warn_steps:
            ax.axvline(s, color="red", lw=0.5, alpha=0.4)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if series and len(series) <= 12:
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
        if not series:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    return figure_to_png(fig)


def health_section(run) -> str | None:
    """HTML of the gradient-health section (None when the run has no monitor records)."""
    checks, warnings = health_records(run.metrics)
    if not checks and not warnings:
        return _note("no gradient-health records: the monitor was off, or the run ended before its first check")
    parts = []
    if checks:
        every = checks[1]["step"] - checks[0]["step"] if len(checks) > 1 else None
        parts.append(_figure(health_png(checks, warnings),
                             f"Gradient health at {len(checks)} checks" + (f", every {every} steps" if every else "")
                             + "; red lines: steps that raised a warning", "gradient-health"))
    if warnings:
        rows = "".join(
            f"<tr><td>{w.get('step')}</td><td>{html.escape(str(w.get('rule')))}</td>"
            f"<td>{html.escape(str(w.get('message')))}</td><td>{html.escape(str(w.get('remedy')))}</td></tr>"
            for w in warnings)
        parts.append(f"<table><tr><th>step</th><th>rule</th><th>what set it off</th><th>remedy</th></tr>{rows}"
                     f"</table>")
    else:
        parts.append("<p>No warnings: gradients neither vanished nor exploded, update-to-weight ratios stayed in "
                     "[1e-4, 1e-2], fewer than half of any ReLU layer's units were dead, and the loss kept "
                     "improving.</p>")
    if checks:
        last = checks[-1]
        rows = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{_g(st.get('grad_norm'))}</td><td>{_g(st.get('grad_max'))}</td>"
            f"<td>{_g(st.get('grad_min'))}</td><td>{_g(st.get('update_ratio'))}</td><td>{_g(st.get('clip_frac'))}</td></tr>"
            for n, st in last.get("params", {}).items())
        parts.append(f"<details><summary>Figures at the last check (step {last['step']})</summary><table><tr>"
                     f"<th>tensor</th><th>||g||</th><th>max |g|</th><th>min |g|</th><th>update/weight</th>"
                     f"<th>clipped</th></tr>{rows}</table></details>")
    return "".join(parts)


def _g(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.3g}"


# -- saliency and filters ----------------------------------------------------------------------------------

def _explanations_png(model, x, labels, classes, normalizer) -> bytes:
    from .saliency import _overlay, _show, display_image, explain

    n = x.shape[0]
    has_conv = True
    fig, axes = new_figure(n, 4, size=(2.4, 2.5))
    for i in range(n):
        try:
            res = explain(model, x[i:i + 1], samples=SMOOTHGRAD_SAMPLES)
        except ValueError:  # no conv layer: no Grad-CAM
            has_conv = False
            from .saliency import saliency, smoothgrad

            sal, t = saliency(model, x[i:i + 1])
            smooth, _ = smoothgrad(model, x[i:i + 1], t, samples=SMOOTHGRAD_SAMPLES)
            res = {"saliency": sal[0], "smoothgrad": smooth[0], "gradcam": None, "target": int(t[0]),
                   "cam_layer": None}
        img = display_image(x[i], normalizer)
        _show(axes[i, 0], img)
        name = lambda k: classes[k] if k < len(classes) else str(k)  # noqa: E731
        axes[i, 0].set_title(f"true {name(labels[i])}\npred {name(res['target'])}", fontsize=8)
        _overlay(axes[i, 1], img, res["saliency"])
        _overlay(axes[i, 2], img, res["smoothgrad"])
        if res["gradcam"] is not None:
            _overlay(axes[i, 3], img, res["gradcam"])
        else:
            axes[i, 3].axis("off")
        if i == 0:
            axes[i, 1].set_title("gradient saliency", fontsize=8)
            axes[i, 2].set_title(f"SmoothGrad (n={SMOOTHGRAD_SAMPLES})", fontsize=8)
            axes[i, 3].set_title(f"Grad-CAM ({res['cam_layer']})" if has_conv else "Grad-CAM: no conv layer",
                                 fontsize=8)
    return figure_to_png(fig)


def _filters_pngs(model, x) -> list[tuple[bytes, str, str]]:
    from .filters import activation_maps_figure, conv_activations, filters_figure, first_conv

    out = []
    name, conv = first_conv(model)
    f = conv.params["weight"].shape[0]
    fig = filters_figure(conv.params["weight"], size=(0.8, 0.8))
    out.append((figure_to_png(fig), f"First-layer filters ({name}: {f} filters "
                                    f"{conv.kernel_size[0]}x{conv.kernel_size[1]}, each scaled to its own range)",
                "first-layer-filters"))
    for label, maps in conv_activations(model, x):
        fig, count = activation_maps_figure(maps, max_maps=32, size=(0.9, 0.9))
        shown = f"first {count} of {maps.shape[0]}" if maps.shape[0] > count else f"{maps.shape[0]}"
        out.append((figure_to_png(fig), f"Activation maps of {label} for the first test image ({shown} maps "
                                        f"{maps.shape[1]}x{maps.shape[2]})", f"activations-{label}"))
    return out


def looks_at_section(run) -> str | None:
    """HTML of the saliency / Grad-CAM / filters section (a note when the model or data is unavailable)."""
    if run.model is None:
        return _note("no readable checkpoint, so nothing to explain")
    if run.model.input_shape is None or len(run.model.input_shape) != 3:
        return None
    from ..layers.conv import Conv2D
    from .cli import _run_dataset

    try:
        ds = _run_dataset(run)
    except Exception as e:  # the data may have moved since training; the rest of the report still stands
        return _note(f"the run's dataset could not be loaded ({type(e).__name__}: {e}); "
                     f"'convdescent explain RUN_DIR --image FILE' works without it")
    x, y = ds.split("test")
    if len(x) == 0:
        x, y = ds.split("val")
    if len(x) == 0:
        return _note("the dataset has no test or validation images to explain")
    n = min(EXPLAIN_IMAGES, len(x))
    xb = run.normalizer(x[:n])
    parts = [_figure(_explanations_png(run.model, xb, y[:n].tolist(), run.classes, run.normalizer),
                     f"What the network looks at, first {n} test images: |d score / d input| (Simonyan et al. "
                     f"2014), SmoothGrad (Smilkov et al. 2017) and Grad-CAM (Selvaraju et al. 2017) for the "
                     f"predicted class", "saliency")]
    if any(isinstance(layer, Conv2D) for _, layer in run.model.all_layers()):
        for png, caption, fig_id in _filters_pngs(run.model, xb[:1]):
            parts.append(_figure(png, caption, fig_id))
    return "".join(parts)


# -- pictures written by the commands ----------------------------------------------------------------------

def command_pictures_section(run) -> str | None:
    """Embed border_*.png and landscape_*.png from RUN_DIR/diagnostics when the commands wrote them."""
    folder = Path(run.path) / "diagnostics"
    if not folder.is_dir():
        return None
    parts = []
    captions = {"border_counts.png": "Border effects: output positions and window paths per input pixel "
                                     "(convdescent border)",
                "border_gradients.png": "Border effects: mean |dL/dx| per input position (convdescent border)",
                "landscape_line.png": "Loss on the line from the initial to the final weights "
                                      "(convdescent landscape; Goodfellow et al. 2015)",
                "landscape_plane.png": "Loss on a filter-normalized random plane through the final weights "
                                       "(convdescent landscape; Li et al. 2018)"}
    for name, caption in captions.items():
        p = folder / name
        if p.is_file():
            parts.append(_figure(p.read_bytes(), caption, name.removesuffix(".png").replace("_", "-")))
    return "".join(parts) or None


def register() -> None:
    """Register the three sections with ``convdescent.report``."""
    from ..report import register_section

    register_section("Gradient health", health_section)
    register_section("What the network looks at", looks_at_section)
    register_section("Border effects and loss landscape", command_pictures_section)


register()
