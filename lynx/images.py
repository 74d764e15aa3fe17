"""Safe loading of user images (reference photos) into RGB arrays.

Every stage that reads a picture a user handed us goes through ``load_image``: it refuses
decompression bombs before decoding (Pillow's own guard, with our limit), applies the EXIF
rotation a camera recorded, converts every mode we can interpret to 8-bit RGB, and turns each
failure into a typed ``ImageError`` with a one-line reason.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lynx.errors import InputError

__all__ = [
    "CorruptImageError",
    "ImageError",
    "ImageTooLargeError",
    "NotAnImageError",
    "UnsupportedImageError",
    "load_image",
]


class ImageError(InputError):
    """An input image cannot be used."""


class NotAnImageError(ImageError):
    """The file is missing, empty, or in no format Pillow can read."""


class CorruptImageError(ImageError):
    """The file claims an image format but its data is truncated or damaged."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than ``LYNX_MAX_IMAGE_PIXELS`` allows."""


class UnsupportedImageError(ImageError):
    """The image decodes, but into a mode with no faithful 8-bit RGB meaning (e.g. float)."""


# Pillow's bomb guard reads the module global MAX_IMAGE_PIXELS (and truncated data is accepted
# when ImageFile.LOAD_TRUNCATED_IMAGES is set); we set both for the duration of one load under a
# lock and restore them, so our policy never leaks into other code using Pillow, nor theirs in.
_PILLOW_LIMIT_LOCK = threading.Lock()

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255)


def load_image(path_or_bytes: str | Path | bytes, *, max_pixels: int) -> np.ndarray:
    """Decode an image file (or its bytes) into an RGB ``uint8`` array of shape ``(H, W, 3)``.

    The EXIF orientation is applied first, so faces are upright for detection. CMYK, palette,
    grey, 16-bit and images with alpha are converted (alpha is composited on white); the first
    frame of an animation is used. Raises an ``ImageError`` subclass on anything unusable.
    """
    source, name = _open_source(path_or_bytes)
    with _pillow_pixel_limit(max_pixels):
        try:
            with Image.open(source) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image, name)
        except Image.DecompressionBombError as err:  # more than twice the limit
            raise _too_large(name, max_pixels) from err
        except Image.DecompressionBombWarning as err:  # over the limit: escalated to an error
            raise _too_large(name, max_pixels) from err
        except UnidentifiedImageError as err:
            raise NotAnImageError(f"{name} is not an image in a format we can read") from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            # Pillow reports truncated and damaged data as OSError/SyntaxError while decoding.
            raise CorruptImageError(f"{name} is truncated or corrupt ({_first_line(err)})") from err


@contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    with _PILLOW_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _open_source(path_or_bytes: str | Path | bytes) -> tuple[io.BytesIO | Path, str]:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        if not data:
            raise NotAnImageError("the image data is empty")
        return io.BytesIO(data), "the image data"
    path = Path(path_or_bytes)
    if not path.is_file():
        raise NotAnImageError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise NotAnImageError(f"{path} is empty")
    return path, str(path)


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert() clips 16-bit grey at 255 (a white picture); keep the high byte.
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(grey.astype(np.uint8), mode="L")
    elif mode == "F":
        raise UnsupportedImageError(
            f"{name} holds 32-bit float pixels; save it as an 8-bit JPEG or PNG"
        )
    elif mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        image = Image.alpha_composite(background, rgba)
    try:
        rgb = image.convert("RGB")
    except ValueError as err:
        raise UnsupportedImageError(
            f"{name} uses image mode {mode!r}, which we cannot convert to RGB"
        ) from err
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise UnsupportedImageError(f"{name} decoded to an unusable shape {array.shape}")
    return np.ascontiguousarray(array)


def _too_large(name: str, max_pixels: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{name} has more than {max_pixels:,} pixels; downscale it or raise the limit",
        setting="LYNX_MAX_IMAGE_PIXELS",
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__

