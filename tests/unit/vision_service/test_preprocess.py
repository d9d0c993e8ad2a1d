from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.errors import ImageTooLargeError, InvalidImageError
from runtime.images import ImageLimits, ProcessorConfig, image_size, placeholder_count, resize_plan
from runtime.vision_service.preprocess import decode_image, preprocess
from tests.reference import reference_image_processor

CFG = ProcessorConfig(max_patches=256, max_patches_per_side=24)
SIZES = [(28, 28), (1, 1), (13, 500), (56, 84), (100, 37), (300, 500), (30, 2000), (900, 29), (4000, 3000)]


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(w * 7 + h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("h,w", SIZES)
def test_size_rule_matches_transformers(h: int, w: int) -> None:
    from transformers.models.kimi_k25.image_processing_kimi_k25 import navit_resize

    ref = reference_image_processor(CFG.patch_size, CFG.merge_size, CFG.max_patches, CFG.max_patches_per_side)
    assert resize_plan(h, w, CFG) == navit_resize(h, w, 14, 2, CFG.max_patches, CFG.max_patches_per_side)
    assert placeholder_count(h, w, CFG) * 4 == ref.get_number_of_image_patches(h, w)


@pytest.mark.parametrize("h,w", SIZES)
def test_size_rule_properties(h: int, w: int) -> None:
    (rh, rw), (ph, pw) = resize_plan(h, w, CFG)
    assert rh <= h and rw <= w, "never upscales"
    assert ph % 28 == 0 and pw % 28 == 0 and ph - rh < 28 and pw - rw < 28
    assert (ph // 14) <= CFG.max_patches_per_side + 1 and (pw // 14) <= CFG.max_patches_per_side + 1


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
@pytest.mark.parametrize("w,h", [(56, 84), (300, 500), (2000, 30)])
def test_pixels_equal_transformers_processor(mode: str, w: int, h: int) -> None:
    data = _encode(_noise(w, h, mode), "JPEG" if mode == "CMYK" else "PNG")
    ours, grid = preprocess(decode_image(data), CFG)
    ref = reference_image_processor(14, 2, CFG.max_patches, CFG.max_patches_per_side)
    out = ref(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
    assert tuple(out["image_grid_thw"][0, 1:].tolist()) == grid
    assert torch.equal(out["pixel_values"], ours), "preprocessing differs from the reference"


def test_header_size_without_decoding() -> None:
    assert image_size(_encode(_noise(37, 100))) == (100, 37)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image (a decompression bomb) with almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data,error",
    [
        (b"", InvalidImageError),
        (b"definitely not an image", InvalidImageError),
        (_encode(_noise(64, 64))[:200], InvalidImageError),  # truncated
        (_png_header_only(60000, 60000), ImageTooLargeError),  # bomb beyond Pillow's own limit
        (_png_header_only(5000, 5000), ImageTooLargeError),  # beyond our configured limit
        (_png_header_only(0, 10), InvalidImageError),  # zero size
    ],
)
def test_bad_images_raise_typed_errors(data: bytes, error: type[Exception]) -> None:
    limits = ImageLimits(max_pixels=10_000_000)
    with pytest.raises(error):
        image_size(data, limits)
        decode_image(data, limits)


def test_configurable_pixel_limit() -> None:
    data = _encode(_noise(50, 50))
    with pytest.raises(ImageTooLargeError, match="2500 pixels"):
        decode_image(data, ImageLimits(max_pixels=2000))
    assert decode_image(data, ImageLimits(max_pixels=2500)).size == (50, 50)


def test_sixteen_bit_and_animated_images_decode_or_fail_cleanly() -> None:
    deep = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    frames = [_noise(32, 32), _noise(33, 32).resize((32, 32))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    for data in (_encode(deep), gif.getvalue()):
        try:
            img = decode_image(data)
        except InvalidImageError:
            continue
        assert img.mode == "RGB" and img.size[0] > 0
