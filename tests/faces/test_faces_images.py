"""lynx.images.load_image on real files: conversions, EXIF rotation, and every kind of bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lynx.errors import InputError
from lynx.images import (
    CorruptImageError,
    ImageTooLargeError,
    NotAnImageError,
    UnsupportedImageError,
    load_image,
)

LIMIT = 40_000_000


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds (almost) no pixels: how a decompression bomb starts."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_jpeg_loads_as_rgb_uint8(tmp_path, astronaut_rgb):
    path = _save(Image.fromarray(astronaut_rgb), tmp_path / "a.jpg", quality=95)
    image = load_image(path, max_pixels=LIMIT)
    assert image.dtype == np.uint8 and image.shape == (512, 512, 3)
    assert np.abs(image.astype(int) - astronaut_rgb).mean() < 3


def test_bytes_and_path_give_the_same_pixels(tmp_path, astronaut_rgb):
    path = _save(Image.fromarray(astronaut_rgb), tmp_path / "a.png")
    assert np.array_equal(load_image(path.read_bytes(), max_pixels=LIMIT), astronaut_rgb)
    assert np.array_equal(load_image(str(path), max_pixels=LIMIT), astronaut_rgb)


def test_exif_orientation_is_applied(tmp_path, astronaut_rgb):
    # Stored rotated 90 degrees counter-clockwise, with the tag that tells viewers to turn it back.
    stored = np.ascontiguousarray(np.rot90(astronaut_rgb[:, :400], k=1))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(Image.fromarray(stored), tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(path, max_pixels=LIMIT)
    assert image.shape == (512, 400, 3)
    assert np.abs(image.astype(int) - astronaut_rgb[:, :400]).mean() < 3


def test_cmyk_is_converted(tmp_path, astronaut_rgb):
    path = _save(Image.fromarray(astronaut_rgb).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    image = load_image(path, max_pixels=LIMIT)
    assert image.shape == (512, 512, 3)
    assert np.abs(image.astype(int) - astronaut_rgb).mean() < 6


def test_sixteen_bit_grey_keeps_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    path = _save(Image.fromarray(ramp), tmp_path / "grey16.png")
    assert Image.open(path).mode.startswith("I")
    image = load_image(path, max_pixels=LIMIT)
    assert image.shape == (8, 256, 3)
    assert image[0, 0, 0] == 0 and image[0, -1, 0] == 255
    assert 120 <= image[0, 128, 0] <= 135  # mid-grey, not clipped to white


def test_alpha_is_composited_on_white(tmp_path, astronaut_rgb):
    rgba = np.dstack([astronaut_rgb, np.full(astronaut_rgb.shape[:2], 255, np.uint8)])
    rgba[:100, :, 3] = 0
    image = load_image(_save(Image.fromarray(rgba), tmp_path / "a.png"), max_pixels=LIMIT)
    assert (image[:100] == 255).all()
    assert np.array_equal(image[100:], astronaut_rgb[100:])
    grey_alpha = Image.fromarray(rgba).convert("LA")
    assert load_image(_save(grey_alpha, tmp_path / "la.png"), max_pixels=LIMIT).shape == (512, 512, 3)


def test_palette_with_and_without_transparency(tmp_path, astronaut_rgb):
    palette = Image.fromarray(astronaut_rgb).quantize(64)
    plain = load_image(_save(palette, tmp_path / "p.png"), max_pixels=LIMIT)
    assert plain.shape == (512, 512, 3) and np.abs(plain.astype(int) - astronaut_rgb).mean() < 12
    see_through = _save(palette, tmp_path / "pt.png", transparency=int(np.asarray(palette)[0, 0]))
    assert load_image(see_through, max_pixels=LIMIT)[0, 0].tolist() == [255, 255, 255]


def test_float_pixels_are_unsupported(tmp_path):
    path = _save(Image.fromarray(np.random.rand(16, 16).astype(np.float32)), tmp_path / "f.tiff")
    with pytest.raises(UnsupportedImageError, match="float"):
        load_image(path, max_pixels=LIMIT)


@pytest.mark.parametrize(
    "content",
    [b"", b"just some text, not a picture\n", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"],
    ids=["empty", "text", "pdf"],
)
def test_files_that_are_not_images(tmp_path, content):
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(NotAnImageError):
        load_image(path, max_pixels=LIMIT)
    with pytest.raises(NotAnImageError):
        load_image(content, max_pixels=LIMIT)


def test_missing_file(tmp_path):
    with pytest.raises(NotAnImageError, match="does not exist"):
        load_image(tmp_path / "nope.jpg", max_pixels=LIMIT)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_files_are_corrupt(tmp_path, astronaut_rgb, suffix):
    buffer = io.BytesIO()
    Image.fromarray(astronaut_rgb).save(buffer, format="JPEG" if suffix == ".jpg" else "PNG")
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(CorruptImageError, match="truncated or corrupt"):
        load_image(path, max_pixels=LIMIT)


def test_garbled_png_data_is_corrupt(tmp_path, astronaut_rgb):
    buffer = io.BytesIO()
    Image.fromarray(astronaut_rgb).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[200:400] = bytes(200)  # inside the compressed pixel data
    path = tmp_path / "garbled.png"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError):
        load_image(path, max_pixels=LIMIT)


@pytest.mark.parametrize("side", [7_000, 100_000], ids=["over-limit", "over-twice-limit"])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageTooLargeError) as caught:
        load_image(path, max_pixels=LIMIT)
    assert caught.value.setting == "LYNX_MAX_IMAGE_PIXELS"


def test_limit_comes_from_the_caller_and_does_not_leak(tmp_path, astronaut_rgb):
    before = Image.MAX_IMAGE_PIXELS
    path = _save(Image.fromarray(astronaut_rgb), tmp_path / "a.png")
    with pytest.raises(ImageTooLargeError):
        load_image(path, max_pixels=100_000)
    assert load_image(path, max_pixels=512 * 512).shape == (512, 512, 3)
    assert Image.MAX_IMAGE_PIXELS == before


def test_every_image_error_is_an_input_error():
    for error in (NotAnImageError, CorruptImageError, ImageTooLargeError, UnsupportedImageError):
        assert issubclass(error, InputError)
