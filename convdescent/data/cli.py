"""The `convdescent data` command group: list, fetch, verify and show datasets.

`add_data_parser(subparsers)` registers the group on an argparse subparsers object; the parsed
arguments carry `func`, the subcommand's handler, which returns the process exit status.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import re
import sys
from pathlib import Path

from ..argparsing import CommandParser, command_name, hidden_alias
from ..options import POSITIVE_COUNT, SEED, number_type
from .errors import DataError


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Register `data {list,fetch,verify,show}` on an argparse subparsers object.

    Args:
        subparsers: the object returned by `ArgumentParser.add_subparsers()`.

    Returns:
        The `data` parser; parsed arguments have `func` set to the subcommand's handler.
    """
    p = subparsers.add_parser("data", help="list, download, verify and look at datasets",
                              description="Datasets: where they are, downloading, verification and sample grids.")
    sub = p.add_subparsers(dest="data_command", metavar="{list,fetch,verify,show}")
    sub.required = True

    ls = sub.add_parser("list", help="show every dataset and where it was found, or that it is missing")
    ls.add_argument("--data-dir", help="folder searched first")
    ls.add_argument("--json", action="store_true", help="one JSON object per dataset")

    fe = sub.add_parser("fetch", help="download a dataset from its official mirrors into the user cache")
    fe.add_argument("name", help="dataset name, e.g. fashion-mnist")
    fe.add_argument("--out", metavar="DIR", help="download into this folder instead of the user cache (then give "
                    "it to other commands as --data-dir)")
    hidden_alias(fe, "--dest", dest="out")
    fe.add_argument("--json", action="store_true", help="print the folder and the checks as one JSON object")
    fe.add_argument("--mirror", action="append", metavar="URL",
                    help="base URL to download from instead of the official mirrors (repeatable)")
    fe.add_argument("--force", action="store_true", help="download even if valid files are present")
    fe.add_argument("--no-progress", action="store_true", help="no progress bar")

    ve = sub.add_parser("verify", help="check a dataset's files again and say which check each passed")
    ve.add_argument("name", help="dataset name")
    ve.add_argument("--data-dir", help="folder searched first")
    ve.add_argument("--json", action="store_true", help="print the files and their checks as one JSON object")

    sh = sub.add_parser("show", help="write a PNG grid of samples labelled with their class names")
    sh.add_argument("name", help="dataset name, folder:PATH or npz:PATH")
    sh.add_argument("--data-dir", help="folder searched first")
    sh.add_argument("--split", choices=("train", "test"), default="train", help="which split to sample")
    sh.add_argument("--augment", default=None, metavar="SPEC",
                    help="augmentation to apply, e.g. 'crop:4,flip,cutout:8' or 'default'")
    sh.add_argument("--count", type=number_type("count", POSITIVE_COUNT), default=36,
                    help="number of images (default 36)")
    sh.add_argument("--seed", type=number_type("seed", SEED), default=0, help="seed of the sample choice and augmentation (default 0)")
    sh.add_argument("--out", metavar="PATH", help="PNG file to write, or a folder to write <name>-samples.png into "
                    "(default: ./<name>-samples.png)")
    sh.add_argument("--json", action="store_true", help="print the written file as a JSON object")
    sh.add_argument("--image-size", type=number_type("image_size", POSITIVE_COUNT), help="image folders: resize to this size")
    sh.add_argument("--color-mode", choices=("grayscale", "rgb"), help="image folders: channel layout")
    sh.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing dataset")
    p.set_defaults(func=run_data_command)
    for parser, handler in ((ls, _cmd_list), (fe, _cmd_fetch), (ve, _cmd_verify), (sh, _cmd_show)):
        parser.set_defaults(func=_handled(handler))  # each subcommand runs its own handler
    return p


def _handled(handler):
    """``handler(args)`` with bad input reported as one ``convdescent: error:`` line and exit status 2."""

    @functools.wraps(handler)
    def run(args) -> int:
        try:
            return handler(args)
        except (DataError, ValueError) as e:
            print(f"convdescent: error: {e}", file=sys.stderr)
            return 2

    return run


def _cmd_list(args) -> int:
    from .registry import REGISTRY, find

    rows = []
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        found = find(name, args.data_dir)
        if args.json:
            print(json.dumps({"dataset": name, "classes": spec.num_classes, "shape": list(spec.input_shape),
                              "path": None if found is None else str(found.path),
                              "place": None if found is None else found.place.label}))
            continue
        if found is None:
            status = f"missing ({command_name()} data fetch {name})"
        else:
            extra = {"archive": ", packed archive", "keras_npz": ", Keras mnist.npz"}.get(found.layout, "")
            status = f"{found.path} ({found.place.label}{extra})"
        rows.append((name, str(spec.num_classes), "x".join(map(str, spec.input_shape)), status))
    if args.json:
        return 0
    header = ("DATASET", "CLASSES", "SHAPE", "WHERE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for r in [header, *rows]:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return 0


def _cmd_fetch(args) -> int:
    from .download import fetch
    from .registry import Found, Place, get_spec
    from .sources import summarize_checks, verify_found

    spec = get_spec(args.name)
    dest = fetch(spec.name, dest_dir=args.out, mirrors=args.mirror, progress=not args.no_progress, force=args.force)
    paths = {fs.name: dest / fs.name for fs in spec.files}
    checks = verify_found(Found(spec, Place("fetched", dest), "files", paths))
    if args.json:
        print(json.dumps({"dataset": spec.name, "path": str(dest),
                          "checks": [{"file": c.path.name, "check": c.check, "detail": c.detail} for c in checks]}))
        return 0
    print(f"{spec.name}: {dest}; {summarize_checks(checks)}")
    return 0


def _cmd_verify(args) -> int:
    from .download import verify

    found, checks = verify(args.name, args.data_dir)
    if args.json:
        print(json.dumps({"dataset": found.spec.name, "path": str(found.path), "place": found.place.label,
                          "checks": [{"file": c.path.name, "check": c.check, "detail": c.detail} for c in checks]}))
        return 0
    print(f"{found.spec.name}: {found.path} ({found.place.label})")
    for c in checks:
        print(f"  ok  {c.path.name:<28} {c.check}: {c.detail}")
    return 0


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "dataset"


def render_grid(images, labels, classes, title: str | None = None, cols: int | None = None) -> bytes:
    """Draw images in a grid, each titled with its class name, and return PNG bytes.

    Args:
        images: float images `(N, C, H, W)` with values in [0, 1] (C is 1 or 3).
        labels: int labels `(N,)`.
        classes: class names.
        title: figure title.
        cols: images per row (default: about square).

    Returns:
        The PNG file's bytes.
    """
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(images)
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(1.6 * cols, 1.75 * rows + (0.4 if title else 0)), dpi=100)
    # An explicit Agg canvas: no pyplot, so the caller's global matplotlib backend is left alone.
    FigureCanvasAgg(fig)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i >= n:
            continue
        img = images[i].clamp(0, 1)
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(classes[int(labels[i])], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cmd_show(args) -> int:
    import torch

    from .augment import make_augment
    from .dataset import load_dataset
    from .fileio import atomic_write
    from .normalize import Normalizer

    ds = load_dataset(args.name, data_dir=args.data_dir, download=not args.no_download, val_split=0,
                      image_size=args.image_size, color_mode=args.color_mode)
    x, y = ds.split(args.split)
    if len(x) == 0:
        raise DataError(f"{ds.name} has no {args.split} images to show")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(x), generator=g)[: args.count]
    imgs = Normalizer.unit()(x[idx])
    aug = make_augment(args.augment, dataset=ds.name) if args.augment else None
    if aug:
        imgs = aug(imgs, generator=torch.Generator().manual_seed(args.seed), fill=0.0)
    title = f"{ds.name} ({args.split})" + (f", augment {aug.spec}" if aug else "")
    png = render_grid(imgs, y[idx], ds.classes, title)
    default_name = f"{_safe_stem(Path(ds.name).name)}-samples.png"
    out = Path(args.out) if args.out else Path(default_name)
    if out.is_dir() or (args.out and args.out.endswith(("/", "\\"))) or (args.out and not out.suffix):
        out = out / default_name  # --out names a folder: the grid goes inside it, under the usual name
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, png)
    if args.json:
        print(json.dumps({"path": str(out), "images": len(idx), "split": args.split, "dataset": ds.name}))
        return 0
    print(f"wrote {out} ({len(idx)} {args.split} images of {ds.name})")
    return 0


def run_data_command(args) -> int:
    """Run a parsed `data` command by its name (``args.data_command``); print errors as one clear message and
    return the exit status. Parsers built by `add_data_parser` give each subcommand its own ``func``."""
    handlers = {"list": _cmd_list, "fetch": _cmd_fetch, "verify": _cmd_verify, "show": _cmd_show}
    return _handled(handlers[args.data_command])(args)


def main(argv=None) -> int:
    """Run `data ...` on its own: `python -m convdescent.data.cli list`."""
    parser = CommandParser(prog="convdescent")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
