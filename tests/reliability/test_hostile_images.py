"""The image decoder on hostile input: any bytes, mutated real images, decompression bombs, huge
dimensions, odd modes (CMYK, 16-bit, palette, alpha), animations. Each either decodes to RGB within
the limits or raises ImageError; nothing else escapes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.errors import ImageError, ImageTooLargeError
from runtime.images import ImageLimits, image_size
from runtime.vision_service.preprocess import decode_image

LIMITS = ImageLimits(max_pixels=4_000_000)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    return [_encode(rgb, "PNG"), _encode(rgb, "JPEG"), _encode(rgb, "GIF"), _encode(rgb, "WEBP"),
            _encode(rgb, "BMP"), _encode(rgb, "TIFF")]


SEEDS = _seed_images()


def _check(data: bytes) -> None:
    try:
        image = decode_image(data, LIMITS)
    except ImageError:
        return
    assert image.mode == "RGB" and 0 < image.width * image.height <= LIMITS.max_pixels


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.data())
def test_truncated_and_bit_flipped_images(seed: bytes, data) -> None:
    cut = data.draw(st.integers(0, len(seed)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(1, 255)), max_size=8))
    mutated = bytearray(seed[:cut] if data.draw(st.booleans()) else seed)
    for at, xor in flips:
        if at < len(mutated):
            mutated[at] ^= xor
    _check(bytes(mutated))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its (tiny) data does not have."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (2**31 - 1, 1), (5000, 5000)])
def test_decompression_bombs_are_refused_from_the_header(width, height) -> None:
    data = _png_header_only(width, height)
    with pytest.raises(ImageTooLargeError):
        image_size(data, LIMITS)
    with pytest.raises(ImageError):
        decode_image(data, LIMITS)


def test_a_real_bomb_compresses_small_and_is_refused() -> None:
    bomb = _encode(Image.new("1", (4000, 4000)), "PNG")  # 16 M pixels in a few KB
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb, LIMITS)


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "I", "F", "L", "LA", "P", "RGBA", "1", "YCbCr"])
def test_odd_modes_decode_to_rgb_or_are_refused(mode) -> None:
    image = Image.new(mode, (30, 20))
    for fmt in ("PNG", "TIFF", "JPEG"):
        try:
            data = _encode(image, fmt)
        except (OSError, KeyError, ValueError):
            continue  # Pillow cannot write this mode in this format
        _check(data)


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), (255 * (i % 2), 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    image = decode_image(buf.getvalue(), LIMITS)
    assert image.size == (16, 16) and image.getpixel((0, 0))[0] == 0
