"""Commands that look inside the gradients: gradcheck, border, explain, filters, landscape.

``register(subparsers)`` adds them to the ``convdescent`` command line; each parsed namespace carries
``func(args) -> exit status``. ``main(argv)`` runs them on their own (``python -m convdescent.diagnostics.cli``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..argparsing import CommandParser, hidden_alias
from ..cli import (CliError, add_checkpoint_argument, add_run_dir_argument, non_negative_int,
                   positive_float, positive_int)
from ..options import ANY, COUNT, NON_NEGATIVE, SEED, number_type


# -- shared helpers ------------------------------------------------------------------------------------------

def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"--input-shape must be C,H,W with positive sizes like 1,28,28, got {text!r}")
    return shape


@contextmanager
def _single_thread():
    """Run with one intra-op thread: finite differences and per-image work use tiny tensors, where handing
    work to other threads costs more than it saves (and far more on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _load_run(path: str, checkpoint: str = "best"):
    from ..train.run import load_run

    return load_run(path, checkpoint=checkpoint)


def _run_dataset(run):
    from ..data import load_dataset

    cfg = run.config
    return load_dataset(run.dataset, data_dir=cfg.get("data_dir"), val_split=cfg.get("val_split", 5000),
                        seed=cfg.get("split_seed", 0))


def _split(dataset, split: str, n: int | None):
    x, y = dataset.split(split)
    if len(x) == 0:
        raise ValueError(f"the {split} split of dataset {dataset.name!r} is empty; pick another split")
    if n is not None:
        x, y = x[:n], y[:n]
    return x, y


def _out_dir(args, run_path: Path | None, fallback: str) -> Path:
    if args.out:
        return Path(args.out)
    if run_path is not None:
        return run_path / "diagnostics"
    return Path("diagnostics") / fallback


def _image_from_args(args, run, dataset_cache: dict):
    """(uint8 image (1, C, H, W), label or None, tag) for --image / --test-index."""
    from .saliency import load_image

    shape = tuple(run.model.input_shape)
    if getattr(args, "image", None):
        return load_image(args.image, shape), None, Path(args.image).stem
    index = args.test_index if args.test_index is not None else 0
    if "ds" not in dataset_cache:
        dataset_cache["ds"] = _run_dataset(run)
    x, y = dataset_cache["ds"].split("test")
    if not 0 <= index < len(x):
        raise ValueError(f"--test-index must be in [0, {len(x) - 1}] for the test split of {run.dataset!r}, "
                         f"got {index}")
    return x[index:index + 1], int(y[index]), f"test{index}"


def _print_json(obj) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    print(json.dumps(clean(obj), indent=2))


# -- gradcheck ---------------------------------------------------------------------------------------------

def cmd_gradcheck(args) -> int:
    """Check every layer type and one whole model; exit status 1 when any gradient is wrong."""
    from ..losses import SoftmaxCrossEntropy
    from ..models import make_model
    from .layer_check import (ACCEPTABLE, GOOD, autograd_rows, check_layer_types, format_rows, model_rows,
                              summarize)

    t0 = time.perf_counter()
    max_el = None if args.max_elements == 0 else args.max_elements
    with _single_thread():
        if _source_run(args):
            run = _load_run(args.run, args.checkpoint)
            model, loss = run.model, run.loss()
            ds = _run_dataset(run)
            xu, y = _split(ds, "test", args.batch_size)
            x = run.normalizer(xu)
            label = f"run {run.path} ({run.config.get('model')}), {len(y)} test images"
        else:
            name = args.model or "seed_cnn"
            model = make_model(name, args.input_shape, args.num_classes, seed=args.seed)
            loss = SoftmaxCrossEntropy()
            gen = torch.Generator().manual_seed(args.seed)
            x = torch.randn((args.batch_size, *args.input_shape), generator=gen)
            y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen)
            label = f"model {name}, random input {tuple(x.shape)}"
        sections = []
        missing: list[str] = []
        if not args.no_layer_types:
            rows, missing = check_layer_types(max_elements=max_el, seed=args.seed)
            sections.append(("Every layer type: check_layer on small random inputs (float64, L = sum(y * R))", rows))
        rows = model_rows(model, loss, x, y, eps=args.eps, max_elements=max_el, seed=args.seed)
        sections.append((f"Whole {label}: central differences of the loss, eps {args.eps:g}", rows))
        arows, mode = autograd_rows(model, loss, x, y)
        sections.append((f"Whole {label}: explicit backward vs torch.autograd through to_torch() "
                         f"({mode} mode, every element)", arows))
    all_rows = [r for _, rows in sections for r in rows]
    summary = summarize(all_rows)
    elapsed = time.perf_counter() - t0
    if args.json:
        _print_json({"ok": summary["ok"], "seconds": elapsed, "thresholds": {"good": GOOD, "acceptable": ACCEPTABLE},
                     "sections": [{"title": t, "rows": [r.as_dict() for r in rows]} for t, rows in sections],
                     "verdict_counts": summary["counts"], "kinks_crossed": summary["kinks"],
                     "wrong": summary["wrong"], "wrong_layers": summary["wrong_layers"],
                     "unchecked_layer_types": missing})
        return 0 if summary["ok"] else 1
    print(f"Verdicts (CS231n): max relative error below {GOOD:g} good, below {ACCEPTABLE:g} acceptable near "
          f"kinks, otherwise WRONG. A finite-difference step that crossed a kink (ReLU at 0, a max-pool tie) "
          f"is counted in 'kinks' and left out of the error.")
    for title, rows in sections:
        print()
        print(title)
        print(format_rows(rows))
    if missing:
        print(f"\nlayer types without a sample configuration (not checked): {', '.join(missing)}")
    counts = ", ".join(f"{n} {v}" for v, n in sorted(summary["counts"].items()))
    kinks = summary["kinks"]
    kink_text = (f"; {kinks} finite-difference steps crossed a kink and were left out" if kinks
                 else "; no finite-difference step crossed a kink")
    print()
    if summary["ok"]:
        print(f"OK: {counts}{kink_text} ({elapsed:.1f} s)")
        return 0
    print(f"WRONG gradients in {', '.join(summary['wrong_layers'])}: {'; '.join(summary['wrong'])} "
          f"({counts}{kink_text}; {elapsed:.1f} s)")
    return 1


# -- border ------------------------------------------------------------------------------------------------

def cmd_border(args) -> int:
    """Coverage counts and mean |dL/dx| per input position, valid and same padding side by side."""
    from ..data import Normalizer, load_dataset
    from ..losses import make_loss
    from ..models import make_model
    from .border import analyze, conv_paddings, format_table, plot_maps, with_padding

    run_path = None
    if _source_run(args):
        run = _load_run(args.run, args.checkpoint)
        run_path = run.path
        ds = _run_dataset(run)
        base, loss, norm = run.model, run.loss(), run.normalizer
        seed = run.config.get("seed", 0) if args.seed is None else args.seed
        name = run.config.get("model", base.name)
    else:
        name = args.model or "seed_cnn"
        ds = load_dataset(args.dataset, data_dir=args.data_dir, val_split=0)  # only the test split is used
        seed = 0 if args.seed is None else args.seed
        base = make_model(name, ds.input_shape, ds.num_classes, seed=seed)
        loss, norm = make_loss("cross_entropy"), Normalizer.unit()
    xu, y = _split(ds, "test", args.examples)
    x = norm(xu)
    out = _out_dir(args, run_path, f"border-{name}")
    variants = []
    with torch.no_grad():
        for padding in ("valid", "same"):
            model = with_padding(base, padding, seed=seed)
            variants.append(analyze(model, loss, x, y, f"{padding} (init)"))
        if args.run:
            own = sorted(set(conv_paddings(base)))
            variants.append(analyze(base, loss, x, y, f"trained ({'/'.join(own)})", with_coverage=False))
    counts_png = plot_maps([(f"{v.label.split()[0]}: positions reached", v.coverage.reach) for v in variants
                            if v.coverage is not None] +
                           [(f"{v.label.split()[0]}: window paths", v.coverage.paths) for v in variants
                            if v.coverage is not None],
                           out / "border_counts.png",
                           f"{name}: how many output positions / paths each input pixel reaches "
                           f"(through {variants[0].coverage.geometry.ops[-1].name}, stops at "
                           f"{variants[0].coverage.geometry.stopped_at})")
    grads_png = plot_maps([(v.label, v.grad_map) for v in variants], out / "border_gradients.png",
                          f"{name}: mean |dL/dx| over {len(y)} test images of {ds.name}")
    figures = {v.label: v.figures for v in variants}
    if args.json:
        _print_json({"model": name, "dataset": ds.name, "examples": len(y), "figures": figures,
                     "files": [str(counts_png), str(grads_png)]})
        return 0
    print(f"Border effects of {name} on {len(y)} test images of {ds.name} (ratios of means; edge = outer ring "
          f"of pixels, center = central half of the height and width)")
    print(format_table(variants))
    for v in variants:
        if v.coverage is not None:
            r = v.coverage.reach
            print(f"{v.label}: positions reached per pixel: corner {int(r[0, 0])}, edge middle "
                  f"{int(r[0, r.shape[1] // 2])}, center {int(r[r.shape[0] // 2, r.shape[1] // 2])}; window "
                  f"paths: corner {int(v.coverage.paths[0, 0])}, center "
                  f"{int(v.coverage.paths[r.shape[0] // 2, r.shape[1] // 2])}")
    print(f"wrote {counts_png}")
    print(f"wrote {grads_png}")
    return 0


# -- explain -----------------------------------------------------------------------------------------------

def cmd_explain(args) -> int:
    """Gradient saliency, SmoothGrad and Grad-CAM of one image, as PNGs."""
    from .saliency import display_image, explain, plot_explanations, plot_overlay

    run = _load_run(args.run_dir, args.checkpoint)
    k = run.model.output_shape[-1]
    if args.target is not None and not 0 <= args.target < k:
        raise ValueError(f"--class must be in [0, {k - 1}] for this model, got {args.target}")
    cache: dict = {}
    xu, label, tag = _image_from_args(args, run, cache)
    x = run.normalizer(xu)
    with _single_thread():
        res = explain(run.model, x, target=args.target, samples=args.samples, noise=args.noise, seed=args.seed)
    out = _out_dir(args, run.path, "explain")
    img = display_image(x[0], run.normalizer)
    cls = run.classes[res["target"]] if res["target"] < len(run.classes) else str(res["target"])
    pred = int(res["probs"].argmax())
    title = (f"{tag}: explaining class {res['target']} ({cls}), p = {float(res['probs'][res['target']]):.3f}; "
             f"predicted {run.classes[pred] if pred < len(run.classes) else pred}"
             + (f", true {run.classes[label]}" if label is not None else ""))
    maps = {"gradient saliency": res["saliency"], f"SmoothGrad (n={args.samples})": res["smoothgrad"],
            f"Grad-CAM ({res['cam_layer']})": res["gradcam"]}
    paths = [plot_explanations(img, maps, out / f"explain_{tag}.png", title)]
    for key, heat in (("saliency", res["saliency"]), ("smoothgrad", res["smoothgrad"]), ("gradcam", res["gradcam"])):
        paths.append(plot_overlay(img, heat, out / f"explain_{tag}_{key}.png", key))
    if args.json:
        _print_json({"image": tag, "target": res["target"], "class": cls, "predicted": pred,
                     "probability": float(res["probs"][res["target"]]), "true": label,
                     "cam_layer": res["cam_layer"], "files": [str(p) for p in paths]})
        return 0
    print(title)
    for p in paths:
        print(f"wrote {p}")
    return 0


# -- filters -----------------------------------------------------------------------------------------------

def cmd_filters(args) -> int:
    """First-layer filters and every conv layer's activation maps for one image, as PNGs."""
    from .filters import write_filter_pictures

    run = _load_run(args.run_dir, args.checkpoint)
    xu, _, tag = _image_from_args(args, run, {})
    out = _out_dir(args, run.path, "filters")
    paths = write_filter_pictures(run.model, run.normalizer(xu), out)
    if args.json:
        _print_json({"image": tag, "files": [str(p) for p in paths]})
        return 0
    for p in paths:
        print(f"wrote {p}")
    return 0


# -- landscape ---------------------------------------------------------------------------------------------

def initial_weights(run, init_seed: int | None = None) -> tuple[dict, str]:
    """The run's initial weights: ``checkpoints/init.pt`` when the run kept it, else rebuilt from the seed.

    The model's initialization is deterministic given the seed, so rebuilding with the run's seed gives
    the exact starting point.

    Returns:
        (params dict keyed like ``run.model.params()``, a description of the source).
    """
    from ..models import make_model

    init_path = run.path / "checkpoints" / "init.pt"
    own = run.model.params()
    if init_seed is None and init_path.is_file():
        from ..train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(init_path)
        state = ckpt.get("model", ckpt)
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"{init_path} lacks the parameters {missing}; pass --init-seed to rebuild them")
        return {k: state[k] for k in own}, f"checkpoint {init_path}"
    seed = run.config.get("seed", 0) if init_seed is None else init_seed
    name = run.config.get("model")
    if str(name).startswith("file:"):
        # a model file draws its weights as Sequential.from_config of its layers does: the run's own
        # architecture rebuilds them even when the file has been edited or deleted since
        from ..model import Sequential

        fresh = Sequential.from_config(run.model.get_config(), seed=seed)
    else:
        fresh = make_model(name, run.model.input_shape, run.model.output_shape[-1], seed=seed)
    if fresh.get_config()["layers"] != run.model.get_config()["layers"]:
        raise ValueError(f"rebuilding model {name!r} does not give the run's architecture, so its initial "
                         f"weights cannot be recreated from the seed")
    return dict(fresh.params()), f"rebuilt from seed {seed} (model {name})"


def cmd_landscape(args) -> int:
    """Loss on the line from the initial to the final weights and on a filter-normalized plane."""
    from .landscape import compute_landscape, plot_line, plot_plane
    from ..train.checkpoint import atomic_write_text

    if args.line_range[0] >= args.line_range[1]:
        raise ValueError(f"--line-range must be LOW HIGH with LOW < HIGH, got {args.line_range}")
    run = _load_run(args.run_dir, checkpoint=args.checkpoint)
    theta0, source = initial_weights(run, args.init_seed)
    ds = _run_dataset(run)
    xtr, ytr = _split(ds, "train", args.examples)
    data = {"train": (run.normalizer(xtr), ytr)}
    if len(ds.x_test):
        xte, yte = _split(ds, "test", args.examples)
        data["test"] = (run.normalizer(xte), yte)
    t0 = time.perf_counter()
    result = compute_landscape(run.model, run.loss(), theta0, data, line_points=args.line_points,
                               line_range=tuple(args.line_range), plane_points=args.plane_points,
                               plane_range=args.plane_range, seed=args.seed, init_source=source)
    elapsed = time.perf_counter() - t0
    out = _out_dir(args, run.path, "landscape")
    paths = [plot_line(result, out / "landscape_line.png")]
    if result.plane is not None:
        paths.append(plot_plane(result, out / "landscape_plane.png"))
    paths.append(atomic_write_text(out / "landscape.json", json.dumps(result.to_dict(), indent=1)))
    if args.json:
        _print_json({**result.to_dict(), "seconds": elapsed, "files": [str(p) for p in paths]})
        return 0
    print(f"Initial weights: {source}; losses over {result.examples} images per split, evaluation mode "
          f"({elapsed:.1f} s)")
    print(result.summary())
    for p in paths:
        print(f"wrote {p}")
    return 0


# -- registration ------------------------------------------------------------------------------------------

def _source_args(p, what: str) -> None:
    add_run_dir_argument(p, nargs="?")
    p.add_argument("--model", help=f"named model to {what} instead of a run's, freshly initialized (default "
                   "seed_cnn when no RUN_DIR is given)")
    hidden_alias(p, "--run", dest="run_flag", metavar="RUN_DIR")
    add_checkpoint_argument(p)


def _source_run(args) -> str | None:
    """The run directory of gradcheck/border (positional, or the older --run), checked against --model."""
    run = args.run_dir or getattr(args, "run_flag", None)
    if args.run_dir and getattr(args, "run_flag", None):
        raise CliError("give the run directory once (RUN_DIR), not also with --run")
    if run and args.model:
        raise CliError(f"give RUN_DIR or --model, not both (got {run} and --model {args.model})")
    args.run = run
    return run


def _image_args(p, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--image", metavar="FILE", help="an image file (PNG, JPEG), resized to the model's input")
    g.add_argument("--test-index", type=non_negative_int, metavar="I",
                   help="the I-th image of the run's test split" + ("" if required else " (default 0)"))


def register(subparsers) -> None:
    """Add gradcheck, border, explain, filters and landscape to a ``convdescent`` subparsers object."""
    p = subparsers.add_parser(
        "gradcheck", help="check every layer's backward against finite differences and autograd",
        description="Check the explicit backward of every layer type and of one whole model against float64 "
                    "central finite differences and torch.autograd through to_torch(). Exit status 1 when a "
                    "gradient is wrong.")
    _source_args(p, "check")
    p.add_argument("--input-shape", type=_shape, default=(1, 28, 28), metavar="C,H,W",
                   help="input shape for --model (default 1,28,28)")
    p.add_argument("--num-classes", type=positive_int, default=10,
                   help="outputs for --model (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=2,
                   help="examples in the checked batch (default 2)")
    p.add_argument("--max-elements", type=non_negative_int, default=64,
                   help="elements checked per tensor, always including the largest gradient (0: all; default 64)")
    p.add_argument("--eps", type=positive_float, default=1e-5,
                   help="finite-difference step for the whole model (default 1e-5)")
    p.add_argument("--seed", type=number_type("seed", SEED), default=0, help="seed of the random inputs and sampled "
                   "elements")
    p.add_argument("--no-layer-types", action="store_true", help="skip the per-layer-type checks")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_gradcheck)

    p = subparsers.add_parser(
        "border", help="measure border effects: coverage counts and |dL/dx| per input pixel",
        description="How many output positions each input pixel reaches through the conv/pool stack, and the "
                    "mean |dL/dx| per input position over real images, for 'valid' and 'same' padding side by "
                    "side; writes heatmaps and prints edge-to-center ratios.")
    _source_args(p, "analyze")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset for --model (default fashion-mnist)")
    p.add_argument("--data-dir", help="folder searched first for the dataset")
    p.add_argument("--examples", type=positive_int, default=512,
                   help="test images averaged for |dL/dx| (default 512)")
    p.add_argument("--seed", type=number_type("seed", SEED), default=None, help="initialization seed of the padding "
                   "variants")
    p.add_argument("--out", help="output folder (default RUN_DIR/diagnostics or diagnostics/border-MODEL)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_border)

    p = subparsers.add_parser(
        "explain", help="gradient saliency, SmoothGrad and Grad-CAM of one image",
        description="What the network looks at: |d score / d input| (Simonyan et al. 2014), SmoothGrad "
                    "(Smilkov et al. 2017) and Grad-CAM on the last conv layer (Selvaraju et al. 2017), "
                    "overlaid on the image, as PNGs.")
    add_run_dir_argument(p)
    add_checkpoint_argument(p)
    _image_args(p, required=True)
    p.add_argument("--class", dest="target", type=number_type("class", COUNT), default=None, metavar="K",
                   help="class to explain (default: the predicted one)")
    p.add_argument("--samples", type=positive_int, default=25, help="SmoothGrad samples (default 25)")
    p.add_argument("--noise", type=number_type("noise", NON_NEGATIVE), default=0.15,
                   help="SmoothGrad noise, fraction of the image's value range (default 0.15)")
    p.add_argument("--seed", type=number_type("seed", SEED), default=0, help="seed of the SmoothGrad noise")
    p.add_argument("--out", help="output folder (default RUN_DIR/diagnostics)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_explain)

    p = subparsers.add_parser(
        "filters", help="first-layer filters and every conv layer's activation maps",
        description="Draw the first conv layer's filters and the activation maps of every conv layer for one "
                    "image, as PNGs.")
    add_run_dir_argument(p)
    add_checkpoint_argument(p)
    _image_args(p, required=False)
    p.add_argument("--out", help="output folder (default RUN_DIR/diagnostics)")
    p.add_argument("--json", action="store_true", help="print the written files as JSON")
    p.set_defaults(func=cmd_filters)

    p = subparsers.add_parser(
        "landscape", help="loss on the line from initial to final weights and on a random plane",
        description="The loss on the line from the initial to the final weights (Goodfellow et al. 2015) and "
                    "on a plane through the final weights spanned by two filter-normalized random directions "
                    "(Li et al. 2018), as plots. Small grids by default.")
    add_run_dir_argument(p)
    add_checkpoint_argument(p)
    p.add_argument("--examples", type=positive_int, default=1000,
                   help="images per split each loss averages over (default 1000)")
    p.add_argument("--line-points", type=positive_int, default=13,
                   help="points on the line (default 13)")
    p.add_argument("--line-range", type=number_type("line_range", ANY), nargs=2, default=(-0.25, 1.25), metavar=("LOW", "HIGH"),
                   help="interpolation range, 0 initial and 1 final (default -0.25 1.25)")
    p.add_argument("--plane-points", type=non_negative_int, default=9,
                   help="points per axis of the plane, 0 for none (default 9)")
    p.add_argument("--plane-range", type=positive_float, default=1.0,
                   help="plane coordinates span [-R, R] (default 1)")
    p.add_argument("--init-seed", type=number_type("init_seed", SEED), default=None,
                   help="rebuild the initial weights from this seed (default: checkpoints/init.pt, else the "
                        "run's seed)")
    p.add_argument("--seed", type=number_type("seed", SEED), default=0, help="seed of the random plane directions")
    p.add_argument("--out", help="output folder (default RUN_DIR/diagnostics)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_landscape)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="convdescent", description="Look inside the gradients.")
    sub = parser.add_subparsers(dest="command", metavar="{gradcheck,border,explain,filters,landscape}")
    sub.required = True
    register(sub)
    return parser


def main(argv=None) -> int:
    """Parse ``argv`` and run the command; errors in the input print one line and give exit status 2."""
    from ..cli import known_errors

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except known_errors() as e:
        print(f"convdescent: error: {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
