"""Offline generation without Ray: chat requests in, results out, through the engine's continuous
batching, with the vision tower in the same process standing in for the vision pool."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.checkpoint.loader import load_vision
from runtime.images import ImageLimits, image_key, load_processor_config
from runtime.lm_service.engine import EngineHooks, placeholder_runs
from runtime.lm_service.loading import build_engine
from runtime.lm_service.request_state import EngineRequest
from runtime.lm_service.runner import ImageRows, StepInput
from runtime.prompt import GenerationDefaults, PromptBuilder
from runtime.protocol import ExpertRouting, RequestOutput
from runtime.requests import ChatRequest, SamplingParams
from runtime.settings import EngineConfig

# The in-process stand-in for the vision pool: the one user of the pool's pixel code outside it.
from runtime.vision_service.preprocess import decode_image, preprocess_batch


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[dict] | None = None
    error: str | None = None
    routed_experts: ExpertRouting | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.token_ids
        self.routed_experts = out.routed_experts or self.routed_experts
        self.text += out.text
        self.prompt_tokens, self.cached_tokens = out.prompt_tokens, out.cached_tokens
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + [
                {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                for lp in out.logprobs
            ]
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": {"message": self.error, "type": "server_error", "param": None}}
        out: dict[str, Any] = {
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(self.token_ids),
                "total_tokens": self.prompt_tokens + len(self.token_ids),
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            },
        }
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.routed_experts is not None:
            out["routed_experts"] = self.routed_experts.to_json()
        return out


class OfflineLLM:
    """Engine + vision tower + prompt builder of one checkpoint, in one process."""

    def __init__(self, model_dir: str | Path, config: EngineConfig = EngineConfig(),
                 image_limits: ImageLimits = ImageLimits()):
        hooks = EngineHooks(need_embeddings=self._encode_again)
        self.engine = build_engine(model_dir, config, hooks)
        self.config = self.engine.model_config
        self.processor = load_processor_config(model_dir)
        self.vision = load_vision(model_dir, self.config, config.torch_dtype, config.device)
        self.prompts = PromptBuilder.from_dir(model_dir, self.config, self.processor, config.trust_remote_code)
        self.defaults = GenerationDefaults.load(model_dir, self.config)
        self.tokenizer = self.prompts.tokenizer
        self.image_limits = image_limits
        self.model_dir = model_dir
        self._images: dict[str, list[bytes]] = {}  # kept so a preempted request can be re-encoded
        self._results: dict[str, GenerationResult] = {}

    def image_key(self, data: bytes) -> str:
        return image_key(data, self.processor, self.model_dir, self.engine.config.dtype)

    @torch.inference_mode()
    def encode_images(self, images: list[bytes]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Image bytes -> per-image embeddings [tokens, hidden], and each image's (height, width)."""
        if not images:
            return [], []
        decoded = [decode_image(b, self.image_limits) for b in images]
        pixels, grids = preprocess_batch(decoded, self.processor)
        embeds = self.vision(pixels.to(self.engine.cache.device, self.engine.config.torch_dtype), grids)
        return embeds, [(im.height, im.width) for im in decoded]

    def input_embeddings(self, ids: list[int], embeds: list[torch.Tensor]) -> torch.Tensor:
        """[T, hidden]: the prompt's embeddings as the runner builds them (images scattered in)."""
        runs = placeholder_runs(ids, self.config.image_token_id)
        images = [ImageRows(start, e) for (start, _), e in zip(runs, embeds, strict=True)]
        return self.engine.runner.input_embeddings([StepInput(ids, [], 0, True, images)])

    def submit(self, request_id: str, chat: ChatRequest) -> None:
        """Encode the images, render the prompt and queue the request (RequestError if invalid)."""
        embeds, sizes = self.encode_images(chat.images)
        ids = self.prompts.token_ids(chat.messages, sizes, chat.tools, chat.chat_template_kwargs)
        self.submit_ids(request_id, ids, chat.sampling, chat.images, embeds)

    def submit_ids(self, request_id: str, ids: list[int], params: SamplingParams,
                   images: Sequence[bytes] = (), embeds: Sequence[torch.Tensor] = ()) -> None:
        hashes = tuple(self.image_key(b) for b in images)
        self.engine.add_request(EngineRequest(request_id, ids, params, hashes))
        self._images[request_id] = list(images)
        self._results[request_id] = GenerationResult()
        for i, e in enumerate(embeds):
            self.engine.add_embeddings(request_id, i, e)

    def _encode_again(self, request_id: str, indexes: list[int]) -> None:
        images = self._images[request_id]
        embeds, _ = self.encode_images([images[i] for i in indexes])
        for i, e in zip(indexes, embeds, strict=True):
            self.engine.add_embeddings(request_id, i, e)

    def abort(self, request_id: str) -> bool:
        out = self.engine.abort(request_id)
        if out is not None:
            self._results[request_id].add(out)
            self._images.pop(request_id, None)
        return out is not None

    def step(self) -> list[RequestOutput]:
        outputs = self.engine.step()
        for out in outputs:
            self._results[out.request_id].add(out)
            if out.finished:
                self._images.pop(out.request_id, None)
        return outputs

    def run(self) -> dict[str, GenerationResult]:
        """Step until every submitted request has finished; return (and forget) their results."""
        while self.engine.has_unfinished():
            self.step()
        results, self._results = self._results, {}
        return results

    def generate(self, chat: ChatRequest, request_id: str = "offline") -> GenerationResult:
        self.submit(request_id, chat)
        return self.run()[request_id]

    def close(self) -> None:
        self.engine.close()
