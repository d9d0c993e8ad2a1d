from __future__ import annotations

import pytest
import torch

from runtime.lm_service.sampling import choose, new_generator, suppress, token_logprobs
from runtime.requests import SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.9, -1.0, 0.5])


def _draws(params: SamplingParams, n: int = 400) -> list[int]:
    g = new_generator(params)
    return [choose(LOGITS, params, g) for _ in range(n)]


def test_greedy_and_top_k_one_are_argmax() -> None:
    assert choose(LOGITS, SamplingParams(temperature=0.0), torch.Generator()) == 1
    assert set(_draws(SamplingParams(temperature=1.0, top_k=1, seed=0))) == {1}


def test_seed_reproduces_and_differs() -> None:
    assert _draws(SamplingParams(seed=7)) == _draws(SamplingParams(seed=7))
    assert _draws(SamplingParams(seed=7)) != _draws(SamplingParams(seed=8))


def test_top_k_top_p_min_p_restrict_support() -> None:
    assert set(_draws(SamplingParams(top_k=2, seed=1))) == {1, 2}
    assert set(_draws(SamplingParams(top_p=0.01, seed=1))) == {1}
    assert set(_draws(SamplingParams(min_p=0.5, seed=1))) == {1, 2}
    assert set(_draws(SamplingParams(seed=1))) == {0, 1, 2, 3, 4}


def test_suppress_and_logprobs() -> None:
    assert choose(suppress(LOGITS, [1]), SamplingParams(temperature=0.0), torch.Generator()) == 2
    lp = token_logprobs(LOGITS, 2, top_n=2)
    assert [t for t, _ in lp["top"]] == [1, 2]
    assert lp["logprob"] == pytest.approx(float(torch.log_softmax(LOGITS, -1)[2]))
    assert lp["top"][0][1] == pytest.approx(float(torch.log_softmax(LOGITS, -1)[1]))


def test_rows_sampled_together_follow_each_rows_temperature() -> None:
    from runtime.lm_service.sampling import choose_rows

    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS])
    g = torch.Generator().manual_seed(3)
    draws = [choose_rows(logits, [0.0, 0.0, 1.0], g) for _ in range(300)]
    assert {d[0] for d in draws} == {1} and {d[1] for d in draws} == {3}  # greedy rows: argmax
    third = [d[2] for d in draws]
    assert set(third) == {0, 1, 2, 3, 4}
    expected = torch.softmax(LOGITS, -1)  # temperature 1: the row's own distribution
    assert abs(third.count(1) / 300 - float(expected[1])) < 0.1


def test_token_bitmask_bans_exactly_the_zero_bits_of_the_chosen_rows() -> None:
    from runtime.lm_service.sampling import apply_token_bitmask

    g = torch.Generator().manual_seed(0)
    vocab, rows = 100, [3, 0]  # 100 tokens: the mask's 4 words cover 128, the last 28 bits unused
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 4), dtype=torch.int32, generator=g)
    logits = torch.randn(5, vocab, generator=g)
    before = logits.clone()
    apply_token_bitmask(logits, bitmask, rows)
    for k, row in enumerate(rows):
        for token in range(vocab):
            bit = (int(bitmask[k, token // 32]) >> (token % 32)) & 1
            assert logits[row, token] == (before[row, token] if bit else float("-inf"))
    assert torch.equal(logits[[1, 2, 4]], before[[1, 2, 4]])
    narrow = torch.full((1, 2), -1, dtype=torch.int32)  # covers 64 tokens: the rest is banned
    apply_token_bitmask(logits, narrow, [1])
    assert torch.isfinite(logits[1, :64]).all() and torch.isinf(logits[1, 64:]).all()


def test_rows_all_hot_follow_their_distribution_and_never_draw_banned_tokens() -> None:
    from runtime.lm_service.sampling import choose_rows

    logits = torch.stack([LOGITS, LOGITS.masked_fill(torch.tensor([True, True, False, False, True]), float("-inf"))])
    g = torch.Generator().manual_seed(5)
    draws = torch.tensor([choose_rows(logits, [1.0, 2.0], g) for _ in range(600)])
    assert set(draws[:, 1].tolist()) == {2, 3}  # the banned tokens (probability 0) never come
    expected = torch.softmax(LOGITS, -1)
    assert (torch.bincount(draws[:, 0], minlength=5) / 600 - expected).abs().max() < 0.07


def test_draw_rows_caps_a_uniform_at_the_total_to_the_last_possible_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.lm_service.sampling import draw_rows

    monkeypatch.setattr(torch, "rand", lambda shape, **kwargs: torch.ones(shape))  # u = the CDF's total
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    assert draw_rows(probs, torch.Generator()).tolist() == [2, 0]


def test_draw_rows_refuses_a_nan_row() -> None:
    from runtime.lm_service.sampling import draw_rows

    with pytest.raises(ValueError, match="nan"):
        draw_rows(torch.tensor([[0.5, 0.5], [float("nan"), float("nan")]]), torch.Generator())
