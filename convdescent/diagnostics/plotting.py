"""Small matplotlib helpers shared by the diagnostics: headless figures, atomic PNG writes, inline images."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from ..data.fileio import atomic_open


def new_figure(rows: int, cols: int, size=(3.2, 3.0)):
    """A figure with a (rows, cols) grid of axes, always returned as a 2-D array.

    The figure is a plain ``matplotlib.figure.Figure`` rendered by Agg, without pyplot, so the caller's
    matplotlib backend and open figures are left alone.

    Args:
        rows, cols: grid shape.
        size: (width, height) in inches of one panel.

    Returns:
        (figure, axes array of shape (rows, cols)).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def figure_to_png(fig, dpi: int = 100) -> bytes:
    """Render ``fig`` to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG through a temporary file and a rename (never a half-written file).

    Returns:
        The path written.
    """
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
    return path


def figure_to_data_uri(fig, dpi: int = 100) -> str:
    """Render ``fig`` to a ``data:image/png;base64,...`` URI (for self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(figure_to_png(fig, dpi)).decode("ascii")


def png_to_data_uri(path: str | Path) -> str:
    """Read a PNG file into a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
