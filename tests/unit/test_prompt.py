from __future__ import annotations

import pytest

from runtime.checkpoint.tokenizer_loader import load_tokenizer
from runtime.errors import RequestError
from runtime.images import ProcessorConfig, load_processor_config, placeholder_count
from runtime.models.config import load_model_config
from runtime.prompt import PromptBuilder

IMAGE = {"type": "image_url", "image_url": {"url": "<image 0>"}}


@pytest.fixture(params=["tokenizers", "tiktoken"])
def builder(checkpoints, request: pytest.FixtureRequest) -> PromptBuilder:
    tok = load_tokenizer(checkpoints("tiny", tokenizer=request.param), trust_remote_code=True)
    return PromptBuilder(tok, tok.convert_tokens_to_ids("<|media_pad|>"), ProcessorConfig(), max_context=300)


def test_each_placeholder_expands_to_its_image_token_count(builder: PromptBuilder) -> None:
    messages = [{"role": "user", "content": [IMAGE, {"type": "text", "text": "and"}, IMAGE]}]
    ids = builder.token_ids(messages, [(56, 84), (140, 28)])
    pad = builder.image_token_id
    counts = [placeholder_count(56, 84, builder.processor), placeholder_count(140, 28, builder.processor)]
    assert ids.count(pad) == sum(counts) == 6 + 5
    first = ids.index(pad)
    assert ids[first:first + counts[0]] == [pad] * counts[0] and ids[first + counts[0]] != pad


def test_placeholder_and_image_count_must_agree(builder: PromptBuilder) -> None:
    with pytest.raises(RequestError, match="1 image placeholder"):
        builder.token_ids([{"role": "user", "content": [IMAGE]}], [])


def test_prompt_longer_than_context_is_refused(builder: PromptBuilder) -> None:
    with pytest.raises(RequestError, match="context"):
        builder.token_ids([{"role": "user", "content": "word " * 400}], [])


def test_template_kwargs_reach_the_template(builder: PromptBuilder) -> None:
    messages = [{"role": "user", "content": "hi"}]
    on = builder.tokenizer.decode(builder.token_ids(messages, []))
    off = builder.tokenizer.decode(builder.token_ids(messages, [], template_kwargs={"thinking": False}))
    assert on.endswith("<think>") and off.endswith("<think></think>")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALLS = [{"id": "functions.get_weather:0", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]


def test_tools_calls_and_results_render_in_kimis_format(builder: PromptBuilder) -> None:
    """As moonshotai's template: a compact tool_declare turn first, calls after the assistant's content,
    and each result as its own tool turn headed `## Return of <id>` and a newline."""
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": CALLS},
                {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    text = builder.render(messages, TOOLS)
    assert text == (
        '<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather",'
        '"parameters":{"type":"object"}}}]<|im_end|>'
        "<|im_user|>user<|im_middle|>weather?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>Checking."
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>")
    assert "tool_declare" not in builder.render(messages[:1], None)


def test_both_tokenizer_formats_build_the_same_prompt(checkpoints) -> None:
    """The tiny vocabulary maps identically in both formats, and this prompt pre-tokenizes alike under both
    regexes, so the ids agree: what lets test_offline compare generations across the formats."""
    messages = [{"role": "user", "content": [IMAGE, {"type": "text", "text": "Describe the image in one sentence."}]}]
    built = []
    for fmt in ("tokenizers", "tiktoken"):
        path = checkpoints("tiny", tokenizer=fmt)
        cfg = load_model_config(path)
        prompts = PromptBuilder.from_dir(path, cfg, load_processor_config(path), trust_remote_code=fmt == "tiktoken")
        built.append(prompts.token_ids(messages, [(56, 84)]))
    assert built[0] == built[1]
