from __future__ import annotations

import random
from typing import Any

import pytest

from runtime.checkpoint.tokenizer_loader import load_tokenizer
from runtime.lm_service.detokenize import IncrementalDetokenizer

REGULAR_VOCAB = 512  # the tiny tokenizer's byte-level BPE; ids from here on are added/special tokens
TEXTS = [
    "Hello, world! Plain ASCII with digits 12345.",
    "混合 CJK 文字：你好，世界。日本語のテキスト",
    "emoji 👋🏽 family 👨‍👩‍👧 flag 🇯🇵 and 🎉!",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0336\u0337 — café",
]


@pytest.fixture(scope="module", params=["tokenizers", "tiktoken"])
def tok(checkpoints: Any, request: pytest.FixtureRequest) -> Any:
    """Each test runs on both formats of the tiny tokenizer: tokenizer.json (transformers' fast tokenizer) and
    the release's tiktoken.model with its own class (byte tokens and merges that cut characters, decoded in
    Python)."""
    return load_tokenizer(checkpoints("tiny", tokenizer=request.param), trust_remote_code=True)


def _encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _random_chunks(ids: list[int], rng: random.Random, most: int = 5) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(1, most)
        chunks.append(ids[i : i + n])
        i += n
    return chunks


def _stream(tok: Any, chunks: list[list[int]], **kw: Any) -> tuple[list[str], str, IncrementalDetokenizer]:
    det = IncrementalDetokenizer(tok, **kw)
    deltas = [det.push(c) for c in chunks]
    return deltas, det.finish(), det


def test_texts_split_characters_across_tokens(tok: Any) -> None:
    # Guards the other tests' premise: otherwise they would never see a partial character.
    for text in TEXTS[1:]:
        assert any("\ufffd" in tok.decode([i]) for i in _encode(tok, text)), text


def test_tokens_that_end_one_character_and_start_the_next(checkpoints: Any) -> None:
    """The release format's ranks merge across character boundaries (b"\\xa7\\xe3\\x81": the end of one kana
    and the start of the next): no delta may show the half characters."""
    tok = load_tokenizer(checkpoints("tiny", tokenizer="tiktoken"), trust_remote_code=True)
    text = "これは画像です。这是一张图片。"
    ids = _encode(tok, text)
    straddling = [i for i in ids if _straddles(tok.model.decode_single_token_bytes(i))]
    assert straddling, "premise: some token holds the end of one character and the start of another"
    deltas, flush, det = _stream(tok, [[i] for i in ids], stop=("图片",))
    assert not any("\ufffd" in d for d in deltas) and flush == ""
    assert det.stopped and det.text == text[: text.index("图片")]


def _straddles(data: bytes) -> bool:
    return 0x80 <= data[0] < 0xC0 and data[-1] >= 0xC0


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_matches_full_decode(tok: Any, text: str) -> None:
    ids = _encode(tok, text)
    deltas, flush, det = _stream(tok, [[i] for i in ids])
    assert "".join(deltas) + flush == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert det.text == text and not det.stopped


@pytest.mark.parametrize("seed", range(4))
def test_random_chunks_match_full_decode(tok: Any, seed: int) -> None:
    rng = random.Random(seed)
    text = " ".join(rng.sample(TEXTS, len(TEXTS)))
    ids = _encode(tok, text)
    deltas, flush, _ = _stream(tok, _random_chunks(ids, rng, most=7))
    assert "".join(deltas) + flush == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_partial_character_is_held_until_completed(tok: Any) -> None:
    ids = _encode(tok, "世")
    assert len(ids) > 1
    det = IncrementalDetokenizer(tok)
    assert [det.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert det.push(ids[-1:]) == "世"
    assert det.finish() == ""


def test_finish_flushes_an_incomplete_character(tok: Any) -> None:
    ids = _encode(tok, "ok 世")[:-1]
    deltas, flush, det = _stream(tok, [[i] for i in ids])
    assert "".join(deltas) == "ok "
    assert flush == tok.decode(ids)[len("ok ") :] and flush.endswith("\ufffd")
    assert det.text == tok.decode(ids)


def test_decode_window_stays_small(tok: Any) -> None:
    lengths: list[int] = []

    class Recording:
        def decode(self, ids: list[int], **kw: Any) -> str:
            lengths.append(len(ids))
            return tok.decode(ids, **kw)

    ids = _encode(tok, " ".join(TEXTS) * 3)
    deltas, flush, _ = _stream(Recording(), [[i] for i in ids])
    assert "".join(deltas) + flush == tok.decode(ids)
    assert len(ids) > 100 and max(lengths) <= 8


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_in_the_middle(tok: Any, skip: bool) -> None:
    im_end, think = tok.convert_tokens_to_ids(["<|im_end|>", "<think>"])
    assert im_end >= REGULAR_VOCAB and think >= REGULAR_VOCAB
    world = _encode(tok, "世界")
    # A special token between the bytes of one character, one between words, and a non-special added token.
    ids = _encode(tok, "hi ") + world[:1] + [im_end] + world[1:] + [im_end] + _encode(tok, " 👋") + [think] + [im_end]
    expected = tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in expected) is not skip and "<think>" in expected
    for chunks in ([[i] for i in ids], _random_chunks(ids, random.Random(7))):
        deltas, flush, det = _stream(tok, chunks, skip_special_tokens=skip)
        assert "".join(deltas) + flush == expected == det.text


def test_stop_string_in_the_middle_is_cut(tok: Any) -> None:
    ids = _encode(tok, "Hello world. STOP and then more text")
    deltas, flush, det = _stream(tok, [[i] for i in ids], stop=("STOP",))
    assert det.stopped and flush == ""
    assert "".join(deltas) == det.text == "Hello world. "
    assert det.push(_encode(tok, " more")) == "" and det.text == "Hello world. "


@pytest.mark.parametrize("stop", ["STOP", "世界", "👋🏽"])
def test_stop_string_across_every_chunk_edge(tok: Any, stop: str) -> None:
    before = "Hi 日本 abc "
    ids = _encode(tok, before + stop + " tail 🎉")
    for k in range(1, len(ids)):
        det = IncrementalDetokenizer(tok, stop=(stop,))
        deltas = [det.push(ids[:k]), det.push(ids[k:]), det.finish()]
        assert det.stopped, k
        assert "".join(deltas) == det.text == before, k


def test_earliest_stop_wins_regardless_of_list_order(tok: Any) -> None:
    ids = _encode(tok, "Hello world, goodbye")
    for chunks in ([ids], [[i] for i in ids]):
        deltas, flush, det = _stream(tok, chunks, stop=("goodbye", "world", "lo w"))
        assert det.stopped and "".join(deltas) + flush == "Hel"


def test_emitted_text_never_reaches_into_the_stop_string(tok: Any) -> None:
    text, stop = "alpha beta <<END>> gamma", "<<END>>"
    ids = _encode(tok, text)
    expected = text[: text.index(stop)]
    for seed in range(5):
        det = IncrementalDetokenizer(tok, stop=("zzz", stop))
        for chunk in _random_chunks(ids, random.Random(seed)):
            det.push(chunk)
            # Every emitted prefix stays inside the text before the stop; no '<' of the stop leaks out.
            assert expected.startswith(det.text), (seed, det.text)
        assert det.finish() == "" and det.stopped and det.text == expected


def test_holdback_is_released_by_finish_without_stop(tok: Any) -> None:
    text, stop = "no stop in here, 世界", "never-appears"
    ids = _encode(tok, text)
    deltas, flush, det = _stream(tok, [[i] for i in ids], stop=(stop,))
    assert not det.stopped
    assert "".join(deltas) == text[: len(text) - (len(stop) - 1)]
    assert flush == text[len(text) - (len(stop) - 1) :]
    assert det.text == text


def test_partial_stop_prefix_at_the_end_is_released(tok: Any) -> None:
    ids = _encode(tok, "the end is ST")
    deltas, flush, det = _stream(tok, [[i] for i in ids], stop=("STOP",))
    assert "ST" not in "".join(deltas)
    assert "".join(deltas) + flush == "the end is ST" and not det.stopped


def test_empty_stop_string_is_rejected(tok: Any) -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, stop=("x", ""))


@pytest.mark.parametrize("skip", [True, False])
def test_random_regular_ids_match_full_decode(tok: Any, skip: bool) -> None:
    rng = random.Random(1234)
    for _ in range(30):
        ids = [rng.randrange(REGULAR_VOCAB) for _ in range(rng.randint(1, 60))]
        chunks = [[i] for i in ids] if rng.random() < 0.5 else _random_chunks(ids, rng, most=6)
        deltas, flush, det = _stream(tok, chunks, skip_special_tokens=skip)
        assert "".join(deltas) + flush == tok.decode(ids, skip_special_tokens=skip) == det.text


def test_random_ids_with_stop_match_cut_full_decode(tok: Any) -> None:
    rng = random.Random(99)
    for _ in range(30):
        ids = [rng.randrange(REGULAR_VOCAB) for _ in range(rng.randint(1, 60))]
        full = tok.decode(ids)
        stop = full[len(full) // 2 : len(full) // 2 + 2] or "x"
        deltas, flush, det = _stream(tok, _random_chunks(ids, rng), stop=(stop,))
        cut = full.find(stop)
        assert "".join(deltas) + flush == (full[:cut] if cut >= 0 else full)
        assert det.stopped is (cut >= 0)
