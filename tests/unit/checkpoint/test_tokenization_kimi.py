"""Our copy of the release's tokenizer class (runtime/checkpoint/assets/tokenization_kimi.py), loaded the way a
server loads the release's: AutoTokenizer with trust_remote_code, from a checkpoint made with --tokenizer tiktoken."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runtime.checkpoint.assets.tokenization_kimi import MAX_RUN_CHARS, load_ranks, split_long_runs
from runtime.checkpoint.tokenizer import SPECIAL_TOKENS
from runtime.checkpoint.tokenizer_loader import load_tokenizer, text_encoder
from runtime.models.config import load_model_config

REGULAR_VOCAB = 512
# Mixed text: CJK (Han runs and kana), emoji with modifiers and joiners, code, numbers, contractions,
# whitespace runs and newlines, and special tokens inside the text (a special and a non-special one).
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "混合 CJK 文字：你好，世界。日本語のテキスト これは画像です。这是一张图片。",
    "emoji 👋🏽 family 👨‍👩‍👧 flag 🇯🇵 and 🎉!",
    "def main(): return [x * 2 for x in range(10)] if x > 0 else None  # comment\n\tpass\n",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": true}}',
    "Numbers: 0 12 123 1234 12345678 3.14159 1e-5 -7 +8 50% $12.",
    "I'm sure they'll say it's what we've DONE'S best.",
    "spaces   and\n\n\nnewlines  \r\n  end   ",
    "<|im_user|>user<|im_middle|>What is 世界?<|im_end|><|im_assistant|>assistant<|im_middle|><think>hmm</think>",
    "text<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\nafter 🎉<|im_end|>",
    "combining: e\u0301 a\u0308 n\u0303 — café Ünïcödé ǅ",
    "",
]


@pytest.fixture(scope="module")
def path(checkpoints: Any) -> Path:
    return checkpoints("tiny", tokenizer="tiktoken")


@pytest.fixture(scope="module")
def tok(path: Path) -> Any:
    return load_tokenizer(path, trust_remote_code=True)


@pytest.fixture(scope="module")
def std(checkpoints: Any) -> Any:
    return load_tokenizer(checkpoints("tiny"), trust_remote_code=False)


def test_loaded_as_the_checkpoints_own_class(tok: Any) -> None:
    assert type(tok).__name__ == "TikTokenTokenizer" and not tok.is_fast
    assert type(tok).__module__.startswith("transformers_modules.")  # from the checkpoint, not our package


def test_vocabulary_maps_like_the_standard_tokenizer(tok: Any, std: Any, path: Path) -> None:
    regular = list(range(REGULAR_VOCAB))
    assert tok.convert_ids_to_tokens(regular) == std.convert_ids_to_tokens(regular)
    for text, _ in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(text) == std.convert_tokens_to_ids(text) >= REGULAR_VOCAB, text
    # As in the release, the reserved special tokens fill the vocabulary up to the embedding's rows.
    last = load_model_config(path).text.vocab_size - 1
    assert len(tok) == tok.vocab_size == last + 1
    assert tok.convert_ids_to_tokens(last) == f"<|reserved_token_{last}|>"
    assert tok.get_vocab()["<think>"] == std.get_vocab()["<think>"]


def test_ranks_merge_bytes_within_and_across_characters(path: Path) -> None:
    ranks = load_ranks(path / "tiktoken.model")
    assert sorted(ranks.values()) == list(range(REGULAR_VOCAB))
    multi = [b for b in ranks if len(b) > 1 and max(b) >= 0x80]
    assert any(_is_whole_utf8(b) for b in multi)  # whole CJK characters
    assert any(0x80 <= b[0] < 0xC0 and b[-1] >= 0xC0 for b in multi)  # the end of one and the start of the next


@pytest.mark.parametrize("text", CORPUS)
def test_fast_path_ids_equal_the_class_ids_and_decode_round_trips(tok: Any, text: str) -> None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert text_encoder(tok)(text) == ids == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_fast_path_on_the_whole_corpus_at_once(tok: Any) -> None:
    text = "\n".join(CORPUS) * 3
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert text_encoder(tok)(text) == ids and len(ids) > 500
    assert tok.decode(ids) == text


def test_standard_tokenizer_keeps_the_transformers_path(std: Any) -> None:
    assert text_encoder(std)("hi<|im_end|>") == std("hi<|im_end|>", add_special_tokens=False)["input_ids"]


def test_special_tokens_inside_text(tok: Any) -> None:
    im_end, think = tok.convert_tokens_to_ids(["<|im_end|>", "<think>"])
    ids = tok.encode("a<|im_end|>b<think>c")
    assert im_end in ids and think in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab<think>c"  # as the standard tokenizer's flags say
    assert tok.decode(ids, skip_special_tokens=False) == "a<|im_end|>b<think>c"
    as_text = tok.encode("a<|im_end|>b", allow_special_tokens=False)
    assert im_end not in as_text and tok.decode(as_text) == "a<|im_end|>b"


def test_skip_special_tokens_matches_the_standard_tokenizer(tok: Any, std: Any) -> None:
    ids = list(range(REGULAR_VOCAB - 40, REGULAR_VOCAB + len(SPECIAL_TOKENS)))
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == std.decode(ids, skip_special_tokens=skip)


def test_a_partial_character_decodes_to_the_replacement_character(tok: Any) -> None:
    ids = tok.encode("世")
    assert len(ids) > 1 and tok.decode(ids[:-1]).endswith("\ufffd") and tok.decode(ids) == "世"


def test_long_runs_are_split_and_still_round_trip(tok: Any) -> None:
    text = "a" + " " * (2 * MAX_RUN_CHARS + 5) + "b" + "x" * (MAX_RUN_CHARS + 3)
    pieces = list(split_long_runs(text))
    assert "".join(pieces) == text and len(pieces) > 2
    assert max(len(p.strip()) or len(p) for p in pieces) <= MAX_RUN_CHARS + 1
    assert tok.decode(tok.encode(text)) == text


def test_save_pretrained_round_trips(tok: Any, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tiktoken.model").is_file() and (tmp_path / "tokenization_kimi.py").is_file()
    again = load_tokenizer(tmp_path, trust_remote_code=True)
    text = "\n".join(CORPUS)
    assert again.encode(text) == tok.encode(text) and len(again) == len(tok)


def _is_whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
