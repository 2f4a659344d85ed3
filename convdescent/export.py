"""Trained runs as deployable files: ONNX or TorchScript models that take raw pixels and return logits.

The exported network is ``model.to_torch()`` behind the run's normalization, so a deployment feeds it what
a camera or an image file gives, float32 pixel values 0..255 shaped (N, C, H, W), and gets (N, K) logits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from .train.checkpoint import atomic_write_bytes

FORMATS = ("onnx", "torchscript")


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says why and what to do."""


class PixelModel(torch.nn.Module):
    """``net((x / 255 - mean) / std)``: a torch network behind the per-channel normalization of a run.

    Args:
        net: the ``torch.nn`` form of the trained model (``Sequential.to_torch()``).
        mean, std: per-channel statistics in units of the [0, 1]-scaled image (length 1 or C).
        channels: C, the number of input channels.

    Shapes: (N, C, H, W) float32 pixels 0..255 -> (N, K) logits.
    """

    def __init__(self, net: torch.nn.Module, mean, std, channels: int):
        super().__init__()
        self.net = net
        mean = torch.tensor(list(mean), dtype=torch.float32)
        std = torch.tensor(list(std), dtype=torch.float32)
        if mean.numel() == 1:
            mean, std = mean.expand(channels), std.expand(channels)
        # One multiply-add per pixel: x * scale + shift equals (x / 255 - mean) / std.
        self.register_buffer("scale", (1.0 / (255.0 * std)).reshape(1, channels, 1, 1).clone())
        self.register_buffer("shift", (-mean / std).reshape(1, channels, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.scale + self.shift)


def pixel_model(run) -> PixelModel:
    """The run's model (a ``load_run`` result) as a float32 ``PixelModel`` in evaluation mode."""
    net = run.model.to_torch().to(dtype=torch.float32, device="cpu").eval()
    channels = run.model.input_shape[0]
    return PixelModel(net, run.normalizer.mean, run.normalizer.std, channels).eval()


def export_run(run_dir, output, format: str = "onnx", checkpoint: str = "best") -> Path:
    """Write a run's model as an ONNX or TorchScript file taking float32 pixels 0..255 (N, C, H, W).

    Args:
        run_dir: a run directory (``convdescent train``'s).
        output: the file to write.
        format: "onnx" (opset chosen by torch's exporter; needs the ``onnx`` and ``onnxscript`` packages,
            ``pip install convdescent[export]``) or "torchscript" (``torch.jit.load`` reads it).
        checkpoint: "best" or "last".

    Returns:
        The path written. The batch axis is dynamic in both formats.
    """
    from .train.run import load_run

    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    run = load_run(run_dir, checkpoint=checkpoint)
    module = pixel_model(run)
    example = torch.full((2, *run.model.input_shape), 127.0)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if format == "torchscript":
        tmp = output.with_name(f".{output.name}.tmp")
        try:
            # torch marks TorchScript deprecated in favour of torch.export; the format is still what
            # torch.jit.load and libtorch read, which is why it is offered.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.save(torch.jit.trace(module, example), str(tmp))
            atomic_write_bytes(output, tmp.read_bytes())
        finally:
            tmp.unlink(missing_ok=True)
        return output
    try:
        import onnx  # noqa: F401  (the exporter needs it; say so here rather than deep inside torch)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages ({e.name} is missing); "
                          f"install them with: pip install 'convdescent[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    # The exporter logs every optional operator library it does not find (torchvision) as a warning.
    exporter_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["pixels"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
    finally:
        exporter_log.setLevel(level)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        program.save(str(tmp))
        atomic_write_bytes(output, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return output
