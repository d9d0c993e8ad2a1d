"""Tiny checkpoints whose greedy answer is a chosen text (a tool call, say), for end-to-end tests.

Random weights answer noise. steer_checkpoint rewrites a tiny `transformers`-dialect checkpoint into a
bigram table: every residual branch is zeroed (attention o_proj, every MLP / expert down projection),
so the final hidden state is the current token's embedding; each token of the answer gets its own
embedding axis, and lm_head maps that axis to the token that must follow it. The answer is spelled
with distinct tokens (byte-level BPE decodes any split of a text to that text), so each token has one
successor; after the last one comes an end-of-sequence id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer


def distinct_spelling(tokenizer: Any, text: str, used: set[int]) -> list[int]:
    """Ids that decode to `text`, none repeated nor in `used` (longest tokens first, backtracking)."""
    vocab = tokenizer.get_vocab()
    pieces = {tokenizer.convert_tokens_to_string([t]): i for t, i in vocab.items()}
    longest = max(len(p) for p in pieces)

    def spell(at: int) -> list[int] | None:
        if at == len(text):
            return []
        for end in range(min(len(text), at + longest), at, -1):
            token = pieces.get(text[at:end])
            if token is None or token in used:
                continue
            used.add(token)
            rest = spell(end)
            if rest is not None:
                return [token, *rest]
            used.discard(token)
        return None

    ids = spell(0)
    if ids is None:
        raise ValueError(f"no spelling of {text!r} with distinct tokens")
    return ids


def steer_checkpoint(path: Path, answer: str, after: str = "<think>") -> list[int]:
    """Rewrite the checkpoint at `path` in place so that a prompt ending in the token `after` is
    answered greedily with `answer`, then the first generation_config eos id. Returns the answer's ids."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    start = tokenizer.convert_tokens_to_ids(after)
    ids = distinct_spelling(tokenizer, answer, {start})
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    chain = [start, *ids, eos[0] if isinstance(eos, list) else eos]
    weights = load_file(str(path / "model.safetensors"))
    hidden = weights["lm_head.weight"].shape[1]
    if len(chain) - 1 > hidden:
        raise ValueError(f"{len(chain) - 1} tokens need more than {hidden} embedding axes")
    for name, tensor in weights.items():
        if name.startswith("model.language_model.") and name.endswith(("o_proj.weight", "down_proj.weight",
                                                                        "experts.down_proj")):
            tensor.zero_()
    embed, head = weights["model.language_model.embed_tokens.weight"], weights["lm_head.weight"]
    weights["model.language_model.norm.weight"].fill_(1.0)
    head.zero_()
    for axis, (token, following) in enumerate(zip(chain, chain[1:], strict=False)):
        embed[token] = torch.nn.functional.one_hot(torch.tensor(axis), hidden).to(embed.dtype)
        head[following, axis] = 10.0
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return ids
