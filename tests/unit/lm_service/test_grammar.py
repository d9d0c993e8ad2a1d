from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from runtime.checkpoint.tokenizer import build_tokenizer
from runtime.errors import RequestError
from runtime.lm_service.grammar import GrammarBook
from runtime.protocol import SamplingParams, StructuredOutput

VOCAB = 576  # the model's rows: past the tokenizer's 533, as the checkpoint maker rounds up
CHOICE = StructuredOutput("choice", '["yes", "no"]')
DIGITS = StructuredOutput("regex", "[0-9]+")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), eos_token="[EOS]")


def _state(request_id: str, logprobs: bool = False) -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, params=SamplingParams(logprobs=logprobs))


def _allowed(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


def test_one_batched_mask_bans_only_constrained_rows(tokenizer: PreTrainedTokenizerFast) -> None:
    book = GrammarBook(tokenizer, VOCAB, (tokenizer.eos_token_id,))
    book.open("choice", CHOICE)
    book.open("digits", DIGITS)
    states = [_state("choice"), _state("free"), _state("digits", logprobs=True), _state("free2")]
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    raw = book.mask(states, logits)
    assert torch.equal(logits[1], before[1]) and torch.equal(logits[3], before[3])  # untouched
    choice = {tokenizer.decode([t]) for t in _allowed(logits[0])}
    assert choice and all("yes".startswith(t) or "no".startswith(t) for t in choice)
    digits = _allowed(logits[2])
    assert digits and all(tokenizer.decode([t]).isdigit() for t in digits)
    assert tokenizer.eos_token_id not in digits  # the grammar cannot end before its first digit
    assert max(_allowed(logits[0]) | digits) < len(tokenizer)  # rows past the tokenizer are banned
    assert list(raw) == [2] and torch.equal(raw[2], before[2])  # logprobs see the model's own row


def test_eos_only_when_the_grammar_can_end_and_stop_when_it_must(tokenizer: PreTrainedTokenizerFast) -> None:
    book = GrammarBook(tokenizer, VOCAB, (tokenizer.eos_token_id,))
    digits, choice = book.open("d", DIGITS), book.open("c", CHOICE)
    assert digits.consume_token(tokenizer.convert_tokens_to_ids("7"))
    logits = torch.zeros(1, VOCAB)
    book.mask([_state("d")], logits)
    assert tokenizer.eos_token_id in _allowed(logits[0])
    for token in tokenizer.encode("yes", add_special_tokens=False):
        assert choice.consume_token(token)
    assert choice.is_stopped()


def test_close_releases_and_unconstrained_steps_do_nothing(tokenizer: PreTrainedTokenizerFast) -> None:
    book = GrammarBook(tokenizer, VOCAB, (tokenizer.eos_token_id,))
    book.open("a", CHOICE)
    book.close("a")
    book.close("never-opened")
    assert not book.live
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    assert book.mask([_state("a"), _state("b")], logits) == {} and torch.equal(logits, before)


def test_grammars_compile_once_per_spec_and_the_cache_is_bounded(tokenizer: PreTrainedTokenizerFast) -> None:
    book = GrammarBook(tokenizer, VOCAB, (tokenizer.eos_token_id,), cache_size=2)
    first, second = book.open("a", CHOICE), book.open("b", CHOICE)
    assert first is not second  # each request walks its own copy
    assert list(book._templates) == [CHOICE]
    book.open("c", DIGITS)
    book.open("d", StructuredOutput("regex", "x+"))
    assert list(book._templates) == [DIGITS, StructuredOutput("regex", "x+")]


def test_bad_specs_and_missing_tokenizer_are_request_errors(tokenizer: PreTrainedTokenizerFast) -> None:
    book = GrammarBook(tokenizer, VOCAB, (tokenizer.eos_token_id,))
    with pytest.raises(RequestError):
        book.open("a", StructuredOutput("regex", "[a-"))
    with pytest.raises(RequestError):
        book.open("b", StructuredOutput("grammar", "garbage ::="))
    assert not book.live
    with pytest.raises(RequestError):
        GrammarBook(None, VOCAB, (1,)).open("c", CHOICE)


def test_a_broken_matcher_leaves_its_row_unmasked(tokenizer: PreTrainedTokenizerFast) -> None:
    book = GrammarBook(tokenizer, VOCAB, (tokenizer.eos_token_id,))
    matcher = book.open("a", DIGITS)
    assert not matcher.consume_token(tokenizer.convert_tokens_to_ids("x"))  # what the mask prevents
    logits = torch.randn(1, VOCAB)
    before = logits.clone()
    book.mask([_state("a")], logits)
    assert torch.equal(logits, before)  # no all-banned row for the sampler; the request fails on accept
