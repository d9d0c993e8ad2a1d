from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoTokenizer

from runtime.checkpoint.loader import load_language_model, load_vision
from runtime.checkpoint.maker import make_checkpoint
from runtime.checkpoint.tokenizer import SPECIAL_TOKENS
from runtime.models.config import load_model_config
from tests.latent_kv import ContiguousLatentKV, SequenceBatch


def test_tokenizer_loads_offline_with_kimi_special_tokens(checkpoints) -> None:
    tok = AutoTokenizer.from_pretrained(str(checkpoints("tiny")))
    for text, special in SPECIAL_TOKENS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, text
        shown = tok.decode(ids, skip_special_tokens=True)
        assert shown == ("" if special else text), text  # special ones vanish from decoded text
    assert tok.decode(tok("héllo wörld 42", add_special_tokens=False)["input_ids"]) == "héllo wörld 42"


def test_chat_template_renders_images_and_thinking_switch(checkpoints) -> None:
    tok = AutoTokenizer.from_pretrained(str(checkpoints("tiny")))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": "What is it?"}]}]
    on = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, thinking=False)
    assert "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\nWhat is it?" in on
    assert on.endswith("<|im_assistant|>assistant<|im_middle|><think>")
    assert off.endswith("<think></think>")


def test_generation_and_processor_configs(checkpoints) -> None:
    path = checkpoints("tiny", "original")
    tok = AutoTokenizer.from_pretrained(str(path))
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("[EOS]")]
    assert "media_proc_cfg" in json.loads((path / "preprocessor_config.json").read_text())
    assert load_model_config(path).image_token_id == tok.convert_tokens_to_ids("<|media_pad|>")


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path) -> None:
    def digest(seed: int, name: str) -> str:
        out = make_checkpoint(tmp_path / name, "tiny", seed)
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    assert digest(1, "a") == digest(1, "b")
    assert digest(1, "a") != digest(2, "c")


@pytest.mark.parametrize("preset", ["tiny", "odd", "mla576"])
def test_norms_and_biases_differ_from_defaults(checkpoints, preset: str) -> None:
    path = checkpoints(preset)
    for module in (load_vision(path), load_language_model(path)):
        for name, t in module.state_dict().items():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith(("norm1.weight", "norm2.weight")):
                assert not torch.allclose(t, torch.ones_like(t)), name
            if name.endswith(".bias"):
                assert t.abs().min() > 0, name


@pytest.mark.parametrize("preset", ["tiny", "odd", "mla576"])
def test_greedy_logits_are_not_near_ties(checkpoints, preset: str) -> None:
    lm = load_language_model(checkpoints(preset))
    ids = torch.randint(0, 500, (24,), generator=torch.Generator().manual_seed(0))
    kv = ContiguousLatentKV(lm.cfg, 64, torch.float32)
    gaps = []
    with torch.no_grad():
        hidden = lm(lm.embed(ids), SequenceBatch([24], [kv]))
        for _ in range(32):
            logits = lm.logits(hidden[-1:])[0]
            top = logits.topk(2)
            gaps.append(float(top.values[0] - top.values[1]))
            hidden = lm(lm.embed(top.indices[:1]), SequenceBatch([1], [kv]))
    assert min(gaps) > 1e-3, f"near-tie in greedy decoding: {min(gaps)}"


def test_tiktoken_format_has_the_release_files_and_the_same_weights(checkpoints) -> None:
    standard, release = checkpoints("tiny"), checkpoints("tiny", tokenizer="tiktoken")
    assert not (release / "tokenizer.json").exists()
    assert {"tiktoken.model", "tokenization_kimi.py", "chat_template.jinja"} <= {p.name for p in release.iterdir()}
    config = json.loads((release / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TikTokenTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}
    for name in ("model.safetensors", "config.json", "generation_config.json", "chat_template.jinja"):
        assert (release / name).read_bytes() == (standard / name).read_bytes(), name


def test_unknown_tokenizer_format_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="tokenizer format"):
        make_checkpoint(tmp_path / "x", tokenizer="sentencepiece")


@pytest.mark.parametrize("dialect", ["transformers", "original"])
def test_int4_checkpoint_is_the_release_layout(tmp_path, dialect: str) -> None:
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from runtime.checkpoint import names as N

    path = make_checkpoint(tmp_path / "ckpt", "mla576", dialect=dialect, dtype="bfloat16", quantize="int4")
    raw = json.loads((path / "config.json").read_text())
    quant = raw["quantization_config"]
    assert raw["text_config"]["quantization_config"] == quant
    QuantizationConfig.model_validate(quant)  # compressed-tensors' own model accepts it
    assert quant["ignore"] == ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                               r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]
    tensors = load_file(str(path / "model.safetensors"))
    text = load_model_config(path).text
    inter, hidden = text.moe_intermediate_size, text.hidden_size
    expected = {}
    for e in range(text.n_routed_experts):
        for proj, (out, inp) in {"gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                                 "down_proj": (hidden, inter)}.items():
            module = N.expert_module(1, e, proj, dialect)
            expected[f"{module}.weight_packed"] = (torch.int32, [out, inp // 8])
            expected[f"{module}.weight_scale"] = (torch.bfloat16, [out, inp // 32])
            expected[f"{module}.weight_shape"] = (torch.int32, [2])
            assert tensors[f"{module}.weight_shape"].tolist() == [out, inp]
    experts = {n: (t.dtype, list(t.shape)) for n, t in tensors.items() if ".mlp.experts." in n}
    assert experts == expected
    rest = {t.dtype for n, t in tensors.items() if n not in expected and "e_score_correction_bias" not in n}
    assert rest == {torch.bfloat16}


@pytest.mark.parametrize("dialect", ["transformers", "original"])
def test_transformers_reads_our_int4_experts_as_we_do(checkpoints, dialect: str) -> None:
    """transformers 5.18 + compressed-tensors dequantizes our packed experts (to bf16) into the same
    weights as our loader: names, nibble order, gate/up order and scales all agree."""
    from tests.reference import reference_model

    path = checkpoints("tiny", dialect, quantize="int4")
    theirs, ours = reference_model(str(path)).state_dict(), load_language_model(path)
    for layer in range(ours.cfg.first_k_dense_replace, ours.cfg.num_hidden_layers):
        for proj, w in ours.layers[layer].mlp.experts.dequantized().items():
            assert torch.equal(theirs[f"model.language_model.layers.{layer}.mlp.experts.{proj}"], w.bfloat16()), proj
