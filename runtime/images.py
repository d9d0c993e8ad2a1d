"""The rules about an input image that every service shares, below all of them (no torch).

- `ProcessorConfig` is the checkpoint's image-processor schema (`load_processor_config` reads it).
- `image_size` reads (height, width) from the header alone, checked against `ImageLimits`.
- `resize_plan` / `placeholder_count` are the one rule for "image size -> number of
  <|media_pad|> tokens": the router calls it on the header, the vision service on the pixels.
- `image_key` is an image's content identity. The router computes it once per image and the
  request carries it (`ImagePayload.key`): the LM replica keys its prefix cache and the request
  router its affinity on it, and the vision pool checks it against the bytes it decodes.
"""

from __future__ import annotations

import functools
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as settings

from runtime.cache.embedding_cache import embedding_key
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


# --- identity ----------------------------------------------------------------------------------


def image_key(data: bytes, processor: ProcessorConfig, model_dir: str | Path, dtype: str) -> str:
    """The image's content key: its bytes plus everything its embeddings depend on. The vision
    cache and the engine's prefix cache both key on it."""
    return embedding_key(data, *_key_context(processor, str(model_dir)), dtype)


@functools.lru_cache(maxsize=16)
def _key_context(processor: ProcessorConfig, model_dir: str) -> tuple[str, str]:
    """What image_key hashes besides the bytes, once per (processor, model): resolving the path
    costs file-system calls that every image would otherwise pay again."""
    return json.dumps(asdict(processor), sort_keys=True), str(Path(model_dir).resolve())


# --- the size rule -----------------------------------------------------------------------------


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


# --- the header --------------------------------------------------------------------------------


@settings(frozen=True, config=ConfigDict(extra="forbid"))
class ImageLimits:
    """What an image may be, checked from its header before any decode. Validated like every other
    setting (runtime.settings): the deploy YAML's `vision:` section is made of it."""

    max_pixels: int = Field(default=40_000_000, ge=1, description="decompression-bomb guard, checked from the header")


def open_image(data: bytes) -> Image.Image:
    """The image, opened lazily: its header is read, its pixels are not."""
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


def check_size(img: Image.Image, limits: ImageLimits) -> None:
    if img.width <= 0 or img.height <= 0:
        raise InvalidImageError(f"image has zero size ({img.width}x{img.height})")
    if img.width * img.height > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {img.width}x{img.height} = {img.width * img.height} pixels, "
            f"over the limit of {limits.max_pixels}"
        )


def image_size(data: bytes, limits: ImageLimits = ImageLimits()) -> tuple[int, int]:
    """(height, width) from the header alone, checked against the limits."""
    img = open_image(data)
    check_size(img, limits)
    return img.height, img.width
