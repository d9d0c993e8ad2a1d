"""Mixed chat workloads for engine tests: text-only and image requests of varied lengths."""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from runtime.requests import ChatRequest, SamplingParams
from runtime.vision_service.preprocess import decode_image, preprocess_batch

SIZES = [(56, 84), (500, 300), (100, 37), (29, 200), (140, 140)]


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def chat(text: str, images: list[bytes], params: SamplingParams, system: str | None = None) -> ChatRequest:
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": f"<image {i}>"}} for i in range(len(images))]
    parts.append({"type": "text", "text": text})
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    return ChatRequest(messages + [{"role": "user", "content": parts}], images, params)


def mixed(n: int, seed: int = 0, max_tokens: tuple[int, int] = (6, 14)) -> list[ChatRequest]:
    """n greedy requests: 0, 1 or 2 images, prompts of 1..40 words, varied answer lengths."""
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "cats",
             "watch", "it", "closely"]
    out = []
    for i in range(n):
        images = [png(*rng.choice(SIZES), seed=seed * 1000 + i * 10 + k) for k in range(rng.choice([0, 0, 1, 2]))]
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(*max_tokens), ignore_eos=True)
        out.append(chat(text, images, params))
    return out


def reference_inputs(llm, request: ChatRequest) -> dict:
    """Inputs for transformers' model: our prompt ids and pixels (both proven equal to its own
    processor's in test_parity), in its argument names."""
    decoded = [decode_image(b) for b in request.images]
    sizes = [(im.height, im.width) for im in decoded]
    ids = llm.prompts.token_ids(request.messages, sizes)
    inputs: dict = {"input_ids": torch.tensor([ids])}
    if decoded:
        pixels, grids = preprocess_batch(decoded, llm.processor)
        inputs["pixel_values"] = pixels
        inputs["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in grids])
    return inputs


def pushed_image_request(llm, seed: int = 23) -> tuple[ChatRequest, list, list[int], tuple[str, ...]]:
    """An image request of mixed(12, seed) as an LM replica receives it when the vision pool pushes:
    the request, its embeddings per image, its prompt ids and its image keys."""
    request = next(r for r in mixed(12, seed=seed) if r.images)
    embeds, sizes = llm.encode_images(request.images)
    return request, embeds, llm.prompts.token_ids(request.messages, sizes), tuple(map(llm.image_key, request.images))
