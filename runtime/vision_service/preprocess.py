"""Image decoding and Kimi-K2.5 preprocessing, with Pillow and torch only (no torchvision).

`placeholder_count` is the one rule for "image size -> number of <|media_pad|> tokens"; the router
calls it on the image header, the vision service gets the same number from the pixels.

The resize matches transformers' Kimi_K25ImageProcessor on CPU exactly: it resizes the uint8 image
with torch's antialiased bicubic interpolation, pads with zeros at the bottom/right to a multiple of
patch*merge, and normalises (x - 255*mean) / (255*std) in float32.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from runtime.errors import ImageTooLargeError, InvalidImageError


@dataclass(frozen=True)
class ProcessorConfig:
    patch_size: int = 14
    merge_size: int = 2
    max_patches: int = 16384
    max_patches_per_side: int = 512
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ProcessorConfig:
        """Both layouts: the original release nests its keys under `media_proc_cfg`."""
        if "media_proc_cfg" in raw:
            m = raw["media_proc_cfg"]
            return cls(
                patch_size=m.get("patch_size", 14),
                merge_size=_first(m.get("merge_kernel_size", 2)),
                max_patches=m.get("in_patch_limit", 16384),
                max_patches_per_side=m.get("patch_limit_on_one_side", 512),
                image_mean=tuple(m.get("image_mean", (0.5,) * 3)),
                image_std=tuple(m.get("image_std", (0.5,) * 3)),
            )
        size = raw.get("size") or {}
        return cls(
            patch_size=raw.get("patch_size", 14),
            merge_size=raw.get("merge_size", 2),
            max_patches=raw.get("max_patches", 16384),
            max_patches_per_side=size.get("max_height", 512),
            image_mean=tuple(raw.get("image_mean", (0.5,) * 3)),
            image_std=tuple(raw.get("image_std", (0.5,) * 3)),
        )


def load_processor_config(model_dir: str | Path) -> ProcessorConfig:
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(model_dir) / name
        if path.exists():
            raw = json.loads(path.read_text())
            return ProcessorConfig.from_json(raw.get("image_processor", raw))
    return ProcessorConfig()


def _first(v: Any) -> int:
    return int(v[0]) if isinstance(v, list | tuple) else int(v)


# --- the size rule (shared with the router) ----------------------------------------------------


def resize_plan(height: int, width: int, cfg: ProcessorConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized h, w), (padded h, w): scale down to the patch budgets (never up), then pad to a
    multiple of patch_size * merge_size."""
    p = cfg.patch_size
    patches_h, patches_w = max(1.0, height // p), max(1.0, width // p)
    scale = min(
        1.0,
        math.sqrt(cfg.max_patches / (patches_h * patches_w)),
        cfg.max_patches_per_side * p / height,
        cfg.max_patches_per_side * p / width,
    )
    new_h = min(max(1, int(height * scale)), cfg.max_patches_per_side * p)
    new_w = min(max(1, int(width * scale)), cfg.max_patches_per_side * p)
    factor = cfg.merge_size * p
    return (new_h, new_w), (-(-new_h // factor) * factor, -(-new_w // factor) * factor)


def patch_grid(height: int, width: int, cfg: ProcessorConfig) -> tuple[int, int]:
    _, (pad_h, pad_w) = resize_plan(height, width, cfg)
    return pad_h // cfg.patch_size, pad_w // cfg.patch_size


def placeholder_count(height: int, width: int, cfg: ProcessorConfig) -> int:
    """Number of image tokens (= <|media_pad|> placeholders) for an image of this size."""
    grid_h, grid_w = patch_grid(height, width, cfg)
    return grid_h * grid_w // (cfg.merge_size * cfg.merge_size)


# --- decoding ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 40_000_000  # decompression-bomb guard, checked from the header


def _open(data: bytes) -> Image.Image:
    if not data:
        raise InvalidImageError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"image has too many pixels: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InvalidImageError("data is not a decodable image") from e


def image_size(data: bytes, limits: ImageLimits = ImageLimits()) -> tuple[int, int]:
    """(height, width) from the header alone, checked against the limits."""
    img = _open(data)
    _check_size(img, limits)
    return img.height, img.width


def _check_size(img: Image.Image, limits: ImageLimits) -> None:
    if img.width <= 0 or img.height <= 0:
        raise InvalidImageError(f"image has zero size ({img.width}x{img.height})")
    if img.width * img.height > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {img.width}x{img.height} = {img.width * img.height} pixels, "
            f"over the limit of {limits.max_pixels}"
        )


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes -> RGB image (first frame of animations; EXIF orientation not applied, as the reference)."""
    img = _open(data)
    _check_size(img, limits)
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
