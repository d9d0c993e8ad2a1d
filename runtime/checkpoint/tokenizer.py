"""A small byte-level BPE tokenizer with Kimi-K2.5's special tokens, for the tiny checkpoints.

Built with the `tokenizers` library and saved as tokenizer.json + tokenizer_config.json +
chat_template.jinja, so `transformers.AutoTokenizer.from_pretrained(dir)` loads it offline.
Special tokens follow the regular vocabulary, in the real model's relative order.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# (token, special): "special" tokens are dropped by skip_special_tokens; <think> and the tool-call
# markers stay in decoded text so reasoning and tool parsers can see them.
SPECIAL_TOKENS: list[tuple[str, bool]] = [
    ("[BOS]", True),
    ("[EOS]", True),
    ("<|im_end|>", True),
    ("<|im_user|>", True),
    ("<|im_assistant|>", True),
    ("<|im_system|>", True),
    ("<|im_middle|>", True),
    ("<|media_begin|>", True),
    ("<|media_content|>", True),
    ("<|media_end|>", True),
    ("<|media_pad|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<|tool_calls_section_begin|>", False),
    ("<|tool_calls_section_end|>", False),
    ("<|tool_call_begin|>", False),
    ("<|tool_call_argument_begin|>", False),
    ("<|tool_call_end|>", False),
    ("<|kimi_k25_video_placeholder|>", True),
    ("[UNK]", True),
    ("[PAD]", True),
]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe the image in one sentence. What colour is the square in the top left corner?
You are a helpful assistant. Please answer the question about the picture below.
Serving large models well means batching requests, caching keys and values, and keeping
every accelerator busy. The vision encoder turns pixels into embeddings; the language model
turns embeddings into words. Hello, world! How are you today? I am fine, thank you.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026 3.14159 1e-5 -7 +8 50% $12.
Code: def main(): return [x * 2 for x in range(10)] if x > 0 else None  # comment
{"key": "value", "list": [1, 2, 3], "nested": {"a": true, "b": null}}
Red, green, blue, yellow, black, white, orange, purple, grey, brown, pink, cyan.
Cats and dogs, trees and rivers, mountains and clouds, cities and roads, boats and trains.
Ce n'est pas une pipe. Das ist ein Bild. Esto es una imagen. これは画像です。这是一张图片。
"""


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE on the embedded corpus (deterministic), then append the specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    for text, special in SPECIAL_TOKENS:  # one at a time keeps the ids in list order
        token = AddedToken(text, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    return tok


def chat_template() -> str:
    return resources.files("runtime.checkpoint").joinpath("assets/chat_template.jinja").read_text()


def write_tokenizer(out: Path, tok: Tokenizer, max_length: int) -> dict[str, int]:
    """Write the tokenizer files; return the special token ids."""
    tok.save(str(out / "tokenizer.json"))
    ids = {t: _token_id(tok, t) for t, _ in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "special": s, "normalized": False, "lstrip": False, "rstrip": False,
                          "single_word": False}
            for t, s in SPECIAL_TOKENS
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(chat_template())
    return ids


def _token_id(tok: Tokenizer, text: str) -> int:
    token_id = tok.token_to_id(text)
    if token_id is None:
        raise ValueError(f"token {text!r} missing from the tokenizer")
    return token_id
