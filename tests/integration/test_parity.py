"""Parity with transformers 5.18's Kimi_K25ForConditionalGeneration (float32), every preset, both
weight/config dialects: image embeddings (1e-5 relative), prefill logits (1e-4), 32 greedy tokens."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.lm_service.engine import EngineConfig
from runtime.lm_service.offline import OfflineLLM
from runtime.models.deepseek_v3 import ContiguousLatentKV, SequenceBatch
from runtime.requests import SamplingParams
from tests.reference import reference_greedy, reference_image_processor, reference_model

PRESETS = ["tiny", "odd", "mla576"]
DIALECTS = ["transformers", "original"]

# (width, height): no resize (multiples of 28), resize (over the patch budget), very wide, very tall,
# odd sizes that need padding only.
PROMPTS = {
    "text-only": [],
    "one-image-no-resize": [(56, 84)],
    "one-image-resized": [(500, 300)],
    "several-images": [(100, 37), (2000, 30), (29, 900), (28, 28)],
}


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _messages(n_images: int) -> list[dict]:
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": f"<image {i}>"}} for i in range(n_images)]
    parts.append({"type": "text", "text": "Describe what you see, then count to ten."})
    return [{"role": "system", "content": "You are brief."}, {"role": "user", "content": parts}]


def _reference_inputs(model: OfflineLLM, images: list[bytes], messages: list[dict]) -> dict:
    """Prompt and pixels built by transformers' own processor rules, not ours."""
    from transformers.models.kimi_k25.processing_kimi_k25 import Kimi_K25Processor
    from transformers.models.kimi_k25.video_processing_kimi_k25 import Kimi_K25VideoProcessor

    p = model.processor
    ip = reference_image_processor(p.patch_size, p.merge_size, p.max_patches, p.max_patches_per_side)
    processor = Kimi_K25Processor(
        image_processor=ip, tokenizer=model.tokenizer, video_processor=Kimi_K25VideoProcessor()
    )
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    return processor(text=[text], images=pil or None, return_tensors="pt")


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_matches_transformers(checkpoints, preset: str, dialect: str) -> None:
    path = checkpoints(preset, dialect)
    ours, ref = OfflineLLM(path, EngineConfig(kv_cache_bytes=8 << 20)), reference_model(str(path))
    for case, sizes in PROMPTS.items():
        images = [_png(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
        messages = _messages(len(images))
        inputs = _reference_inputs(ours, images, messages)

        embeds, image_sizes = ours.encode_images(images)
        ids = ours.prompts.token_ids(messages, image_sizes)
        assert ids == inputs["input_ids"][0].tolist(), f"{case}: prompt ids differ from transformers' processor"

        if images:
            with torch.no_grad():
                features = ref.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                ref_embeds = features.pooler_output
            for a, b in zip(embeds, ref_embeds, strict=True):
                rel = ((a - b).norm() / b.norm()).item()
                assert rel < 1e-5, f"{case}: image embedding relative error {rel:.2e}"

        ref_tokens, ref_logits = reference_greedy(ref, inputs, steps=32)
        with torch.no_grad():
            kv = ContiguousLatentKV(ours.config.text, len(ids), torch.float32)
            lm = ours.engine.runner.lm
            logits = lm.logits(lm(ours.input_embeddings(ids, embeds), SequenceBatch([len(ids)], [kv])))
        assert (logits - ref_logits).abs().max().item() < 1e-4, f"{case}: prefill logits differ"

        greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        ours.submit_ids(case, ids, greedy, images, embeds)
        assert ours.run()[case].token_ids == ref_tokens, f"{case}: greedy tokens differ (paged engine)"
