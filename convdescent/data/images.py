"""Opening image files safely: the size a header announces is checked before any pixel is decoded.

An image file says in its header how many pixels it holds; a decompression bomb (a few kilobytes announcing
20000x20000 pixels) would make a plain decoder allocate gigabytes. Two checks come first: the announced
pixel count against ``MAX_IMAGE_PIXELS``, and against what the file's bytes can decode to at all (deflate,
PNG's compression, expands at most about 1032:1; at one bit per pixel that bounds the pixels a file of a
given size can really hold).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from .errors import CorruptFile

# The largest image decoded (64 megapixels: far more than any training image, more than camera photos).
MAX_IMAGE_PIXELS = 1 << 26
# Deflate's largest expansion, rounded up; JPEG's is smaller.
MAX_EXPANSION = 1100
# Headers, palettes and chunk overhead of a tiny file, in bytes, allowed on top of the ratio.
_SLACK_BYTES = 1 << 16


def check_announced_size(path: Path, width: int, height: int, file_bytes: int,
                         max_pixels: int | None = None) -> None:
    """Refuse an image whose header announces more pixels than allowed or than its bytes can hold.

    Args:
        path: the file (for the message).
        width, height: the size its header announces.
        file_bytes: the file's size on disk.
        max_pixels: the limit (default ``MAX_IMAGE_PIXELS``).

    Raises:
        CorruptFile: the message names the file, the announced size and the limit.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    pixels = int(width) * int(height)
    if pixels > limit:
        raise CorruptFile(path, f"the image header announces {width}x{height} pixels ({pixels / 1e6:.0f} "
                                f"megapixels), more than the {limit / 1e6:.0f} megapixels convdescent decodes; "
                                f"it is a decompression bomb or a damaged file: remove it or shrink the image")
    if pixels / 8 > MAX_EXPANSION * file_bytes + _SLACK_BYTES:
        raise CorruptFile(path, f"the image header announces {width}x{height} pixels, but the file holds only "
                                f"{file_bytes} bytes, which cannot decode to that many; the file is damaged or "
                                f"hostile: remove it")


def open_image(path: str | Path, max_pixels: int | None = None):
    """Open and decode an image file after checking the size its header announces.

    Args:
        path: a PNG, JPEG or other file PIL reads.
        max_pixels: the largest pixel count decoded (default ``MAX_IMAGE_PIXELS``).

    Returns:
        A loaded ``PIL.Image.Image`` (independent of the file, which is closed).

    Raises:
        CorruptFile: missing, unreadable, a decompression bomb, or a header announcing more than the file holds.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptFile(path, "no such image file") from None
    except OSError as e:
        raise CorruptFile(path, f"cannot read the image file ({e.strerror or e})") from None
    if not path.is_file():
        raise CorruptFile(path, "not a regular file; pass the path of a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its own two limits; here every oversize image is one error
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_announced_size(path, im.size[0], im.size[1], size, max_pixels)
                im.load()
                return im.copy()
    except CorruptFile:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refuses these while opening, before the size can be read: its message holds the pixel count
        found = re.search(r"\((\d+) pixels\)", str(e))
        what = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "more pixels than allowed"
        raise CorruptFile(path, f"the image header announces {what}, more than the "
                                f"{(MAX_IMAGE_PIXELS if max_pixels is None else max_pixels) / 1e6:.0f} megapixels "
                                f"convdescent decodes; it is a decompression bomb or a damaged file: remove it or "
                                f"shrink the image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise CorruptFile(path, f"unreadable image ({e})") from None
