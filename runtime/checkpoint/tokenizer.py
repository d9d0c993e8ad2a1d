"""A small byte-level BPE tokenizer with Kimi-K2.5's special tokens, for the tiny checkpoints.

Built with the `tokenizers` library and saved in one of two formats, both loaded by
`transformers.AutoTokenizer.from_pretrained(dir)` offline:
- "tokenizers": tokenizer.json + tokenizer_config.json + chat_template.jinja;
- "tiktoken", the official release's: tiktoken.model (the same BPE as ranks) + tokenizer_config.json whose
  auto_map names tokenization_kimi.TikTokenTokenizer, a class that ships in the checkpoint as code (ours:
  assets/tokenization_kimi.py) and so loads only with trust_remote_code=True.
Special tokens follow the regular vocabulary, in the real model's relative order, with the same ids in both.
"""

from __future__ import annotations

import base64
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
    return _asset("chat_template.jinja")


def _asset(name: str) -> str:
    return resources.files("runtime.checkpoint").joinpath("assets", name).read_text()


TOKENIZER_FORMATS = ("tokenizers", "tiktoken")
TIKTOKEN_FILE = "tiktoken.model"
TIKTOKEN_CLASS_FILE = "tokenization_kimi.py"
TIKTOKEN_CLASS = "tokenization_kimi.TikTokenTokenizer"
NAMED_TOKENS = {"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]"}


def write_tokenizer(out: Path, tok: Tokenizer, max_length: int) -> dict[str, int]:
    """Write tokenizer.json and its config; return the special token ids."""
    tok.save(str(out / "tokenizer.json"))
    ids = {t: _token_id(tok, t) for t, _ in SPECIAL_TOKENS}
    _write_config(out, ids, max_length, {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
                                         "add_eos_token": False})
    return ids


def write_tiktoken_tokenizer(out: Path, tok: Tokenizer, max_length: int, vocab_size: int) -> dict[str, int]:
    """The release's format: tiktoken.model (the same BPE, a token's rank being its id in `tok`), the
    tokenizer class file, and a config whose auto_map names it. The special tokens keep their ids in `tok`,
    the first ones after the ranks, and the reserved ids fill the vocabulary up to vocab_size, as in the
    release. Return the special token ids."""
    from runtime.checkpoint.assets.tokenization_kimi import byte_alphabet  # imports tiktoken and transformers

    ids = {t: _token_id(tok, t) for t, _ in SPECIAL_TOKENS}
    ranks = tok.get_vocab(with_added_tokens=False)
    if sorted(ranks.values()) != list(range(len(ranks))) or min(ids.values()) != len(ranks):
        raise ValueError("the BPE's ids are not 0..n-1 followed by the special tokens")
    byte_of = {c: b for b, c in byte_alphabet().items()}
    lines = [f"{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {i}"
             for token, i in sorted(ranks.items(), key=lambda item: item[1])]
    (out / TIKTOKEN_FILE).write_text("\n".join(lines) + "\n")
    (out / TIKTOKEN_CLASS_FILE).write_text(_asset(TIKTOKEN_CLASS_FILE))
    named = set(NAMED_TOKENS.values())
    _write_config(out, ids, max_length, {
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": [TIKTOKEN_CLASS, None]},
        "additional_special_tokens": [t for t, special in SPECIAL_TOKENS if special and t not in named],
        "num_reserved_special_tokens": vocab_size - len(ranks),
    })
    return ids


def _write_config(out: Path, ids: dict[str, int], max_length: int, extra: dict) -> None:
    config = {
        **extra,
        **NAMED_TOKENS,
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


def _token_id(tok: Tokenizer, text: str) -> int:
    token_id = tok.token_to_id(text)
    if token_id is None:
        raise ValueError(f"token {text!r} missing from the tokenizer")
    return token_id
