"""Offline generation without Ray, one request at a time (the engine issue replaces the loop with
continuous batching; the model, prompt and sampling pieces stay)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.checkpoint.loader import load_language_model, load_vision
from runtime.errors import RequestError
from runtime.lm_service.sampling import choose, new_generator, suppress, token_logprobs
from runtime.models.config import load_model_config
from runtime.models.deepseek_v3 import ContiguousLatentKV, SequenceBatch
from runtime.prompt import GenerationDefaults, PromptBuilder
from runtime.requests import ChatRequest, SamplingParams
from runtime.vision_service.preprocess import (
    ImageLimits,
    decode_image,
    load_processor_config,
    preprocess_batch,
)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: list[dict] | None = None
    prompt_token_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(self.token_ids),
                "total_tokens": self.prompt_tokens + len(self.token_ids),
            },
        }
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


class OfflineModel:
    """Vision tower + language model + tokenizer of one checkpoint, in one process."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 image_limits: ImageLimits = ImageLimits()):
        self.config = load_model_config(model_dir)
        self.processor = load_processor_config(model_dir)
        self.vision = load_vision(model_dir, self.config, dtype, device)
        self.lm = load_language_model(model_dir, self.config, dtype, device)
        self.prompts = PromptBuilder.from_dir(model_dir, self.config, self.processor)
        self.defaults = GenerationDefaults.load(model_dir, self.config)
        self.tokenizer = self.prompts.tokenizer
        self.dtype, self.device, self.image_limits = dtype, device, image_limits

    @torch.inference_mode()
    def encode_images(self, images: list[bytes]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Image bytes -> per-image embeddings [tokens, hidden], and each image's (height, width)."""
        if not images:
            return [], []
        decoded = [decode_image(b, self.image_limits) for b in images]
        pixels, grids = preprocess_batch(decoded, self.processor)
        embeds = self.vision(pixels.to(self.device, self.dtype), grids)
        return embeds, [(im.height, im.width) for im in decoded]

    def input_embeddings(self, ids: list[int], image_embeds: list[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with each image's embeddings scattered into its placeholder positions.
        Placeholder ids (image or video) embed as token 0 wherever they occur, generated ones too,
        as in the reference model."""
        ids_t = torch.tensor(ids, device=self.device)
        image_mask = ids_t == self.config.image_token_id
        embeds = self.lm.embed(ids_t.masked_fill(image_mask | (ids_t == self.config.video_token_id), 0))
        if image_embeds:
            embeds[image_mask] = torch.cat(image_embeds).to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def generate(self, request: ChatRequest) -> GenerationResult:
        image_embeds, sizes = self.encode_images(request.images)
        ids = self.prompts.token_ids(request.messages, sizes, request.tools, request.chat_template_kwargs)
        return self.generate_from_embeddings(ids, self.input_embeddings(ids, image_embeds), request.sampling)

    def generate_from_embeddings(
        self, ids: list[int], embeds: torch.Tensor, params: SamplingParams
    ) -> GenerationResult:
        context = self.config.text.max_position_embeddings
        max_new = params.max_tokens if params.max_tokens is not None else context - len(ids)
        if len(ids) + max_new > context:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the context of {context}", "max_tokens"
            )
        kv = ContiguousLatentKV(self.config.text, len(ids) + max_new, self.dtype, self.device)
        stops = _StopChecker(self, params)
        generator = new_generator(params)
        out: list[int] = []
        logprobs: list[dict] | None = [] if params.logprobs else None
        hidden = self.lm(embeds, SequenceBatch([len(ids)], [kv]))
        while True:
            logits = self.lm.logits(hidden[-1:])[0].float()
            banned = stops.banned_before_min_tokens(len(out))
            token = choose(suppress(logits, banned), params, generator)
            out.append(token)
            if logprobs is not None:
                logprobs.append(token_logprobs(logits, token, params.top_logprobs))
            reason = stops.check(out)
            if reason is None and len(out) >= max_new:
                reason = "length"
            if reason is not None:
                return GenerationResult(out, stops.text(out), reason, len(ids), logprobs, ids)
            hidden = self.lm(self.input_embeddings([token], []), SequenceBatch([1], [kv]))


class _StopChecker:
    """EOS ids (unless ignore_eos), stop_token_ids and stop strings; text is cut before a stop string."""

    def __init__(self, model: OfflineModel, params: SamplingParams):
        self.tokenizer, self.params = model.tokenizer, params
        eos = () if params.ignore_eos else model.defaults.eos_token_ids
        self.stop_ids = set(eos) | set(params.stop_token_ids)
        self._cut: int | None = None

    def banned_before_min_tokens(self, generated: int) -> list[int]:
        return sorted(self.stop_ids) if generated < self.params.min_tokens else []

    def check(self, out: list[int]) -> str | None:
        if len(out) < self.params.min_tokens:
            return None
        if out[-1] in self.stop_ids:
            return "stop"
        if self.params.stop:
            text = self._decode(out)
            hits = [text.find(s) for s in self.params.stop if s in text]
            if hits:
                self._cut = min(hits)
                return "stop"
        return None

    def text(self, out: list[int]) -> str:
        visible = out[:-1] if out and out[-1] in self.stop_ids else out
        text = self._decode(visible)
        return text[: self._cut] if self._cut is not None else text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)
