"""The paged latent cache gives the model the same attention as contiguous buffers."""

from __future__ import annotations

import torch

from runtime.checkpoint.presets import PRESETS
from runtime.lm_service import kv_cache
from runtime.lm_service.kv_cache import PagedBatch, PagedLatentCache, SequenceChunk
from runtime.models.deepseek_v3 import DeepseekV3LM
from tests.latent_kv import ContiguousLatentKV, SequenceBatch


def _lm(preset: str = "tiny") -> DeepseekV3LM:
    torch.manual_seed(0)
    lm = DeepseekV3LM(PRESETS[preset].text_config(vocab_size=64))
    for p in lm.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return lm.eval()


def test_slots_follow_the_block_table() -> None:
    cache = PagedLatentCache(_lm().cfg, num_blocks=8, block_size=4, dtype=torch.float32)
    assert cache.slots([5, 2, 7], 2, 9).tolist() == [22, 23, 8, 9, 10, 11, 28]


@torch.inference_mode()
def test_scattered_blocks_and_batched_decodes_match_contiguous_buffers() -> None:
    lm = _lm()
    prompts = [torch.randint(0, 64, (n,)) for n in (9, 3, 14)]
    tables = [[6, 1, 11], [4], [0, 9, 3, 7]]  # deliberately out of order
    cache = PagedLatentCache(lm.cfg, num_blocks=12, block_size=4, dtype=torch.float32)
    contiguous = [ContiguousLatentKV(lm.cfg, 16, torch.float32) for _ in prompts]

    paged = lm(lm.embed(torch.cat(prompts)), PagedBatch(cache, [SequenceChunk(t, 0, len(p))
                                                               for t, p in zip(tables, prompts, strict=True)]))
    alone = [lm(lm.embed(p), SequenceBatch([len(p)], [kv])) for p, kv in zip(prompts, contiguous, strict=True)]
    torch.testing.assert_close(paged, torch.cat(alone), rtol=1e-5, atol=1e-5)

    nxt = torch.randint(0, 64, (3,))  # one decode token each: attended together over padded latents
    chunks = [SequenceChunk(t, len(p), 1) for t, p in zip(tables, prompts, strict=True)]
    batch = PagedBatch(cache, chunks)
    assert batch.decode_rows() is not None and batch.per_sequence() == []
    decoded = lm(lm.embed(nxt), batch)
    one_by_one = [lm(lm.embed(nxt[i : i + 1]), SequenceBatch([1], [contiguous[i]])) for i in range(3)]
    torch.testing.assert_close(decoded, torch.cat(one_by_one), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_decodes_attended_in_small_groups_match_one_big_group(monkeypatch) -> None:
    lm = _lm()
    lengths = [13, 2, 9, 5, 11]
    tables = [[3, 8, 1, 12], [6], [0, 10, 4], [7, 2], [14, 5, 9]]
    cache = PagedLatentCache(lm.cfg, num_blocks=16, block_size=4, dtype=torch.float32)
    prompts = [torch.randint(0, 64, (n,)) for n in lengths]
    lm(lm.embed(torch.cat(prompts)), PagedBatch(cache, [SequenceChunk(t, 0, n) for t, n in zip(tables, lengths,
                                                                                                strict=True)]))
    chunks = [SequenceChunk(t, n, 1) for t, n in zip(tables, lengths, strict=True)]
    nxt = lm.embed(torch.randint(0, 64, (5,)))
    whole = PagedBatch(cache, chunks)
    assert len(whole.decode_groups()) == 1
    expected = lm(nxt, whole)

    # four blocks of padded context per group at most; padded widths in blocks, by length: 1 2 | 3 | 3 | 4
    monkeypatch.setattr(kv_cache, "DECODE_GROUP_BYTES", 4 * cache.block_bytes)
    grouped = PagedBatch(cache, chunks)
    assert [(g.start, g.stop) for g in grouped.decode_groups()] == [(0, 2), (2, 3), (3, 4), (4, 5)]
    # rows in decode order are sorted by length: sequences 1 (2 tokens), 3 (5), 2 (9), 4 (11), 0 (13)
    assert grouped.decode_rows().tolist() == [1, 3, 2, 4, 0]
    torch.testing.assert_close(lm(nxt, grouped), expected, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_fp8_storage_is_one_byte_per_value_and_close() -> None:
    lm = _lm()
    exact = PagedLatentCache(lm.cfg, num_blocks=4, block_size=4, dtype=torch.float32)
    fp8 = PagedLatentCache(lm.cfg, num_blocks=4, block_size=4, dtype=torch.float32, fp8=True)
    assert fp8.bytes_per_token * 4 == exact.bytes_per_token == lm.cfg.num_hidden_layers * lm.cfg.latent_dim * 4
    latent = torch.randn(5, lm.cfg.latent_dim)
    slots = exact.slots([2, 0], 0, 5)
    exact.store(0, slots, latent)
    fp8.store(0, slots, latent)
    assert torch.equal(exact.load(0, slots), latent)
    torch.testing.assert_close(fp8.load(0, slots), latent, rtol=0.07, atol=0.02)
