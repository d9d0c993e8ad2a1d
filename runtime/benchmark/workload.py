"""Benchmark workloads: OpenAI chat bodies of random text with random images, reproducible by seed.

Text is random words (one word is about one token of a real tokenizer; the report uses the
server's own usage counts). Images are random-noise PNGs of a given size; with `image_reuse` r, each
image slot reuses an image sent earlier with probability r (what an embedding cache or a prefix
cache can exploit), else it is a new one.
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

_TEXT = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "number group problem fact red blue green small large quick slow bright dark open close run walk see "
         "think make take give find tell ask seem feel try leave call picture color shape light edge corner")
WORDS = _TEXT.split(" ")


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 64
    input_len: int = 128  # words of text per request
    output_len: int = 64  # max_tokens
    images_per_request: int = 1
    image_width: int = 224
    image_height: int = 224
    image_reuse: float = 0.0  # probability an image slot repeats an earlier image
    ignore_eos: bool = True
    seed: int = 0


def png_data_url(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_requests(spec: WorkloadSpec, model: str) -> list[dict[str, Any]]:
    rng = random.Random(spec.seed)
    sent: list[int] = []  # seeds of images used so far
    bodies = []
    for i in range(spec.num_requests):
        parts: list[dict[str, Any]] = []
        for _ in range(spec.images_per_request):
            if sent and rng.random() < spec.image_reuse:
                seed = rng.choice(sent)
            else:
                seed = spec.seed * 1_000_003 + len(sent) + 1
                sent.append(seed)
            parts.append({"type": "image_url",
                          "image_url": {"url": png_data_url(spec.image_width, spec.image_height, seed)}})
        text = f"request {i}: " + " ".join(rng.choice(WORDS) for _ in range(spec.input_len))
        parts.append({"type": "text", "text": text})
        bodies.append({"model": model, "messages": [{"role": "user", "content": parts}],
                       "max_tokens": spec.output_len, "temperature": 0.0, "ignore_eos": spec.ignore_eos,
                       "stream": True, "stream_options": {"include_usage": True}})
    return bodies
