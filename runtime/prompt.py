"""Chat messages -> prompt token ids, with the checkpoint's own chat template and tokenizer.

The template renders one image placeholder token per image; each is then expanded to that image's
token count (runtime.images.placeholder_count), as transformers' processor does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from runtime.checkpoint.tokenizer_loader import load_tokenizer, text_encoder
from runtime.errors import RequestError
from runtime.images import ProcessorConfig, placeholder_count
from runtime.models.config import ModelConfig


@dataclass(frozen=True)
class GenerationDefaults:
    """What the checkpoint's generation_config.json says: stop ids and default sampling values."""

    eos_token_ids: tuple[int, ...]
    sampling: dict[str, Any]

    @classmethod
    def load(cls, model_dir: str | Path, cfg: ModelConfig) -> GenerationDefaults:
        path = Path(model_dir) / "generation_config.json"
        raw = json.loads(path.read_text()) if path.exists() else {}
        eos = raw.get("eos_token_id", list(cfg.eos_token_ids))
        eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
        sampling = {k: raw[k] for k in ("temperature", "top_p", "top_k", "min_p") if raw.get(k) is not None}
        return cls(eos_token_ids=eos_ids, sampling=sampling)


class PromptBuilder:
    def __init__(self, tokenizer: Any, image_token_id: int, processor: ProcessorConfig, max_context: int):
        self.tokenizer = tokenizer
        self.encode = text_encoder(tokenizer)
        self.image_token_id = image_token_id
        self.processor = processor
        self.max_context = max_context

    @classmethod
    def from_dir(cls, model_dir: str | Path, cfg: ModelConfig, processor: ProcessorConfig,
                 trust_remote_code: bool) -> PromptBuilder:
        tokenizer = load_tokenizer(model_dir, trust_remote_code)
        return cls(tokenizer, cfg.image_token_id, processor, cfg.text.max_position_embeddings)

    def render(self, messages: list[dict[str, Any]], tools: list | None = None, **kwargs: Any) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except (TemplateError, TypeError, KeyError, ValueError) as e:
            raise RequestError(f"the chat template cannot render these messages: {e}", "messages") from e

    def token_ids(
        self,
        messages: list[dict[str, Any]],
        image_sizes: list[tuple[int, int]],
        tools: list | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Rendered, tokenized and expanded prompt; image_sizes are (height, width) in order."""
        text = self.render(messages, tools, **(template_kwargs or {}))
        ids = self.encode(text)
        return self.expand_placeholders(ids, image_sizes)

    def expand_placeholders(self, ids: list[int], image_sizes: list[tuple[int, int]]) -> list[int]:
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(image_sizes):
            raise RequestError(
                f"the prompt has {len(slots)} image placeholder(s) but the request carries {len(image_sizes)} image(s)",
                "messages",
            )
        out: list[int] = []
        start = 0
        for slot, (h, w) in zip(slots, image_sizes, strict=True):
            out += ids[start:slot] + [self.image_token_id] * placeholder_count(h, w, self.processor)
            start = slot + 1
        out += ids[start:]
        if len(out) >= self.max_context:
            raise RequestError(
                f"prompt is {len(out)} tokens; the model's context is {self.max_context} tokens", "messages"
            )
        return out
