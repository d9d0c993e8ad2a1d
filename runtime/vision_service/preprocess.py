"""Image decoding and Kimi-K2.5 preprocessing, with Pillow and torch only (no torchvision).

The rules (processor config, limits, the size rule, the content key) are runtime.images'; this
module only turns bytes into pixels and pixels into patches, following `resize_plan`.

The resize matches transformers' Kimi_K25ImageProcessor on CPU exactly: it resizes the uint8 image
with torch's antialiased bicubic interpolation, pads with zeros at the bottom/right to a multiple of
patch*merge, and normalises (x - 255*mean) / (255*std) in float32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from runtime.errors import InvalidImageError
from runtime.images import ImageLimits, ProcessorConfig, check_size, open_image, resize_plan


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes -> RGB image (first frame of animations; EXIF orientation not applied, as the reference)."""
    img = open_image(data)
    check_size(img, limits)
    try:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidImageError(f"image cannot be decoded ({type(e).__name__}: {e})") from e


# --- pixels ------------------------------------------------------------------------------------


def preprocess(image: Image.Image, cfg: ProcessorConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB image -> patches [h*w, 3, patch, patch] (raster order) and the patch grid (h, w)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W] uint8
    (new_h, new_w), (pad_h, pad_w) = resize_plan(image.height, image.width, cfg)
    if (new_h, new_w) != (image.height, image.width):
        pixels = F.interpolate(
            pixels[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
        )[0]
    pixels = F.pad(pixels, (0, pad_w - new_w, 0, pad_h - new_h), value=0)
    mean = torch.tensor(cfg.image_mean) * (1.0 / (1 / 255))
    std = torch.tensor(cfg.image_std) * (1.0 / (1 / 255))
    x = (pixels.float() - mean[:, None, None]) / std[:, None, None]
    return _patchify(x, cfg.patch_size), (pad_h // cfg.patch_size, pad_w // cfg.patch_size)


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    c, h, w = x.shape
    patches = x.view(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)
    return patches.reshape((h // p) * (w // p), c, p, p)


def preprocess_batch(
    images: list[Image.Image], cfg: ProcessorConfig
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Several images packed into one patch tensor [sum h*w, 3, p, p], with their grids."""
    parts = [preprocess(img, cfg) for img in images]
    return torch.cat([p for p, _ in parts]), [g for _, g in parts]
