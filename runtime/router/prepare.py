"""The router's half of a request: a validated ChatRequest -> the GenerateRequest an LM replica runs.

Each image's size comes from its header alone (no decode here); its placeholder count uses the same
function the vision service checks against, and the checkpoint's own chat template and tokenizer
render the prompt. Anything wrong is a RequestError naming the field (HTTP 400); nothing is queued.
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ImageError, RequestError
from runtime.images import ImageLimits, image_key, image_size, load_processor_config, placeholder_count
from runtime.models.config import load_model_config
from runtime.prompt import GenerationDefaults, PromptBuilder
from runtime.protocol import GenerateRequest, ImagePayload
from runtime.requests import ChatRequest
from runtime.router.tool_calls import tool_markers_problem


class RequestPreparer:
    def __init__(self, model_dir: str | Path, dtype: str, trust_remote_code: bool, limits: ImageLimits = ImageLimits()):
        self.model_dir, self.dtype, self.limits = model_dir, dtype, limits
        self.model_config = load_model_config(model_dir)
        self.processor = load_processor_config(model_dir)
        self.prompts = PromptBuilder.from_dir(model_dir, self.model_config, self.processor, trust_remote_code)
        self.defaults = GenerationDefaults.load(model_dir, self.model_config)
        self.tokenizer = self.prompts.tokenizer
        self.tools_problem = tool_markers_problem(self.tokenizer)  # None: tool calls can be parsed

    def image_sizes(self, images: list[bytes]) -> list[tuple[int, int]]:
        sizes = []
        for i, data in enumerate(images):
            try:
                sizes.append(image_size(data, self.limits))
            except ImageError as e:
                raise RequestError(f"image {i}: {e}", "messages") from e
        return sizes

    def prepare(self, request_id: str, chat: ChatRequest) -> GenerateRequest:
        if chat.tools and self.tools_problem is not None:
            raise RequestError(f"this checkpoint cannot call tools: {self.tools_problem}", "tools")
        sizes = self.image_sizes(chat.images)
        ids = self.prompts.token_ids(chat.messages, sizes, chat.tools, chat.chat_template_kwargs)
        payloads = [ImagePayload(data, placeholder_count(h, w, self.processor), self.image_key(data))
                    for data, (h, w) in zip(chat.images, sizes, strict=True)]
        return GenerateRequest(request_id, ids, chat.sampling, payloads)

    def image_key(self, data: bytes) -> str:
        """Computed here once per image; every service downstream uses the key the request carries."""
        return image_key(data, self.processor, self.model_dir, self.dtype)
