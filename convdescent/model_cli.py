"""The ``convdescent models`` and ``convdescent export`` commands (registered through ``cli.COMMAND_MODULES``)."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from . import models as named_models
from .argparsing import hidden_alias
from .cli import add_checkpoint_argument, add_run_dir_argument, positive_int
from .model_file import model_to_toml


def default_input_shape(name: str) -> tuple[int, ...]:
    """The input shape a named model is built for when none is given (its builder's default)."""
    param = inspect.signature(named_models.MODELS[name]).parameters.get("input_shape")
    default = param.default if param is not None else inspect.Parameter.empty
    return tuple(default) if default is not inspect.Parameter.empty and default is not None else (1, 28, 28)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated sizes such as 3,32,32, got {text!r}") from None
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"must be three positive sizes C,H,W such as 1,28,28, got {text!r}")
    return shape


def _first_sentence(text: str, width: int = 72) -> str:
    text = text.split(" (")[0].rstrip(".:") if len(text) > width else text.rstrip(".:")
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def model_rows() -> list[dict]:
    """Every named model with its default input shape and parameter count (built once, seed 0)."""
    rows = []
    for name in sorted(named_models.MODELS):
        shape = default_input_shape(name)
        model = named_models.make_model(name, shape, 10, seed=0)
        doc = (inspect.getdoc(named_models.MODELS[name]) or "").splitlines()
        rows.append({"name": name, "input_shape": list(shape), "params": model.num_params(),
                     "description": _first_sentence(doc[0]) if doc else ""})
    return rows


def cmd_models(args) -> int:
    if args.show is None:
        if args.toml:
            raise ValueError("--toml prints one model: give it with --show NAME (e.g. --show resnet8 --toml)")
        rows = model_rows()
        if args.json:
            for row in rows:
                print(json.dumps(row))
            return 0
        table = [("model", "input shape", "params", "")]
        table += [(r["name"], "x".join(map(str, r["input_shape"])), f"{r['params']:,}", r["description"])
                  for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(3)]
        for i, row in enumerate(table):
            print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}".rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))
        print("\nconvdescent models --show NAME prints a model's layers; --toml prints it as a model file for "
              "convdescent train --model-file")
        return 0
    name = args.show
    if name not in named_models.MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(named_models.MODELS))}")
    shape = args.input_shape or default_input_shape(name)
    model = named_models.make_model(name, shape, args.classes, seed=0)
    if args.toml:
        print(model_to_toml(model, header=f"The named model {name} for inputs {'x'.join(map(str, shape))} and "
                                          f"{args.classes} classes.\nTrain it with: convdescent train "
                                          f"--model-file {name}.toml"), end="")
    elif args.json:
        print(json.dumps(model.get_config()))
    else:
        print(model.summary())
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    out = args.out
    if out is None:
        out = Path(args.run_dir) / ("model.onnx" if args.format == "onnx" else "model.torchscript.pt")
    path = export_run(args.run_dir, out, format=args.format, checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps({"path": str(path), "format": args.format, "checkpoint": args.checkpoint,
                          "input": "pixels", "output": "logits"}))
        return 0
    print(f"{args.format} model written to {path}: input 'pixels' float32 0..255 (N, C, H, W), output 'logits' "
          f"(N, K); the run's normalization is inside")
    return 0


def register(sub) -> None:
    """Add the ``models`` and ``export`` commands to the ``convdescent`` parser."""
    p = sub.add_parser("models", help="list the named models (input shape, parameters) or show one",
                       description="List the named models with their input shape and parameter count, or show "
                                   "one model's layers; --toml prints it as a model file that "
                                   "'convdescent train --model-file FILE' trains.")
    p.add_argument("--show", metavar="NAME", help="show one model's layers")
    p.add_argument("--toml", action="store_true", help="with --show: print the model as a TOML model file")
    p.add_argument("--input-shape", type=_shape, metavar="C,H,W",
                   help="with --show: build for this input shape (default: the model's own)")
    p.add_argument("--classes", type=positive_int, default=10, help="with --show: number of classes (default: 10)")
    p.add_argument("--json", action="store_true", help="JSON: one object per model, or the shown model's config")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("export", help="write a run's model as ONNX or TorchScript (pixels in, logits out)",
                       description="Export a trained run: the file takes float32 pixel values 0..255 shaped "
                                   "(N, C, H, W), applies the run's normalization and returns logits.")
    add_run_dir_argument(p)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                   help="file format (onnx needs pip install 'convdescent[export]')")
    add_checkpoint_argument(p)
    p.add_argument("--out", metavar="FILE", help="the file to write (default: RUN_DIR/model.onnx, or "
                   "RUN_DIR/model.torchscript.pt)")
    hidden_alias(p, "--output", dest="out")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    p.set_defaults(func=cmd_export)
