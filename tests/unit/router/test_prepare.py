"""RequestPreparer: requests with tools need a tokenizer that carries the tool-call markers."""

from __future__ import annotations

import pytest

from runtime.errors import RequestError
from runtime.requests import parse_chat_request
from runtime.router.prepare import RequestPreparer

TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]


def test_tools_are_refused_when_the_tokenizer_cannot_carry_calls(checkpoints) -> None:
    prep = RequestPreparer(checkpoints("tiny"), "float32", trust_remote_code=False)
    assert prep.tools_problem is None  # the tiny tokenizer has the markers, not as special tokens
    chat = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS})
    assert prep.prepare("r", chat).prompt_ids
    prep.tools_problem = "the tokenizer has no <|tool_call_end|> token(s)"
    with pytest.raises(RequestError, match="cannot call tools") as info:
        prep.prepare("r", chat)
    assert info.value.field == "tools"
    prep.prepare("r", parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                                          "tool_choice": "none"}))
