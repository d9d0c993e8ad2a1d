"""Grammar engines for structured output, measured on CPU: xgrammar, llguidance, outlines-core.

    python bench/grammar_engines.py [--vocab 512,131072] [--out bench/results/grammar.json]

For each tokenizer (the tiny checkpoints' 512-token BPE, and larger byte-level BPEs trained here on
generated text, no downloads) and each engine: the one-off tokenizer setup, the compile time of a
json_object grammar and of a moderate json_schema (cold: a fresh compiler each time), and the
per-step cost of filling the token bitmask of a batch of 1 and of 16 matchers that walk a valid
document token by token (the mean over the document's tokens), plus the cost of applying a batch
bitmask to float32 logits. One thread everywhere: the engine process steps on one core.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAYON_NUM_THREADS", "1")

import llguidance  # noqa: E402
import llguidance.hf  # noqa: E402
import outlines_core  # noqa: E402
import torch  # noqa: E402
import xgrammar  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.checkpoint.tokenizer import SPECIAL_TOKENS, build_tokenizer, write_tokenizer  # noqa: E402
from runtime.lm_service.sampling import apply_token_bitmask  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city"],
        },
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role"],
}
DOCUMENT = json.dumps({
    "name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "poetry", "engines"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
    "role": "admin", "score": 99.5, "active": True,
}, separators=(",", ":"))


# --- tokenizers ---------------------------------------------------------------------------------


def _corpus(words: int, seed: int = 0) -> list[str]:
    """Pseudo-text with a Zipf-like word distribution, numbers, JSON and code: enough distinct
    words that byte-level BPE keeps merging up to a realistic vocabulary size."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w",
              "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "sk", "st", "str", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "rk", "st", "ck", "x"]
    lexicon = ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(rng.choice([1, 1, 2, 2, 3, 4])))
               for _ in range(400_000)]
    cumulative = list(itertools.accumulate(1.0 / (i + 10) for i in range(len(lexicon))))
    lines = []
    for _ in range(words // 12):
        kind = rng.random()
        line = rng.choices(lexicon, cum_weights=cumulative, k=12)
        if kind < 0.1:
            line = [json.dumps({w: rng.randint(0, 10**rng.randint(1, 6)) for w in line[:4]})]
        elif kind < 0.2:
            line = [f"def {line[0]}_{line[1]}({line[2]}): return {line[3]}[{rng.randint(0, 99)}]"]
        elif kind < 0.5:
            line[0] = line[0].capitalize()
        lines.append(" ".join(line) + rng.choice([".", ",", "!", "?", ";", ":"]))
    return lines


def large_tokenizer(vocab_size: int, cache: Path) -> Path:
    out = cache / f"bpe-{vocab_size}"
    if (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(3_000_000), trainer=trainer)
    from tokenizers import AddedToken

    for text, special in SPECIAL_TOKENS:
        (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(text, special=special, normalized=False)])
    write_tokenizer(out, tok, 4096)
    return out


def tiny_tokenizer(cache: Path) -> Path:
    out = cache / "tiny-512"
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, build_tokenizer(512), 4096)
    return out


# --- engines ------------------------------------------------------------------------------------


class Xgrammar:
    name = "xgrammar 0.2.8"

    def __init__(self, tok: PreTrainedTokenizerFast, vocab: int):
        self.xgr = xgr = xgrammar
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.batch = xgr.BatchGrammarMatcher(max_threads=1)

    def compile(self, kind: str) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        if kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        return compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


class Llguidance:
    name = "llguidance 1.9.1"

    def __init__(self, tok: PreTrainedTokenizerFast, vocab: int):
        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(num_threads=1)

    def compile(self, kind: str) -> Any:
        schema = {"type": "object"} if kind == "json_object" else SCHEMA
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tok)
        assert not error, error
        return grammar

    def matcher(self, compiled: Any) -> Any:
        m = self.llg.LLMatcher(self.tok, compiled, log_level=0)  # builds the parser: part of compile cost
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:  # as runtime.lm_service.grammar does
        words = bitmask.shape[1]
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              words * 4, len(matchers))

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))


class OutlinesCore:
    name = "outlines-core 0.2.14"

    def __init__(self, tok: PreTrainedTokenizerFast, vocab: int):
        self.oc = oc = outlines_core
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        specials = set(tok.all_special_ids)
        for text, token_id in tok.get_vocab().items():
            if token_id == tok.eos_token_id or token_id in specials:
                continue
            raw = bytes(byte_decoder[c] for c in text) if all(c in byte_decoder for c in text) else text.encode()
            tokens.setdefault(raw, []).append(token_id)
        self.vocab = oc.Vocabulary(tok.eos_token_id, tokens)

    def compile(self, kind: str) -> Any:
        if kind == "json_object":
            raise NotImplementedError("regex-only: no recursive JSON grammar")
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        row_bytes = bitmask.shape[1]
        for i, guide in enumerate(matchers):
            row = bitmask[i]
            guide.write_mask_into(row.data_ptr(), row_bytes, 4)

    def accept(self, matcher: Any, token: int) -> bool:
        if token == self.vocab.get_eos_token_id():
            return bool(matcher.is_finished())  # the final state allows EOS but has no transition on it
        matcher.advance(token)
        return True


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


ENGINES: dict[str, Callable[[PreTrainedTokenizerFast, int], Any]] = {
    "xgrammar": Xgrammar, "llguidance": Llguidance, "outlines-core": OutlinesCore}


# --- measurements -------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1e3, result


def measure_engine(make: Callable[..., Any], tok: PreTrainedTokenizerFast, vocab: int, doc_ids: list[int],
                   repeats: int) -> dict[str, Any]:
    setup_ms, engine = _timed(lambda: make(tok, vocab))
    result: dict[str, Any] = {"engine": engine.name, "tokenizer_setup_ms": round(setup_ms, 2)}
    for kind in ("json_object", "json_schema"):
        try:
            times = [_timed(lambda k=kind: engine.matcher(engine.compile(k)))[0] for _ in range(repeats)]
            result[f"compile_{kind}_ms"] = round(statistics.median(times), 2)
        except NotImplementedError as e:
            result[f"compile_{kind}_ms"] = None
            result[f"note_{kind}"] = str(e)
    compiled = engine.compile("json_schema")
    for batch in (1, 16):
        result[f"fill_b{batch}_ms"] = round(_walk(engine, compiled, batch, vocab, doc_ids), 4)
    return result


def _walk(engine: Any, compiled: Any, batch: int, vocab: int, doc_ids: list[int]) -> float:
    """Mean ms per step to fill the masks of `batch` matchers walking the document together."""
    matchers = [engine.matcher(compiled) for _ in range(batch)]
    bitmask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32)
    total = 0.0
    for token in doc_ids:
        ms, _ = _timed(lambda: engine.fill(matchers, bitmask))
        total += ms
        allowed = bool((bitmask[0, token // 32] >> (token % 32)) & 1)
        assert allowed, f"{engine.name}: token {token} of the document was masked out"
        assert all(engine.accept(m, token) for m in matchers), f"{engine.name} rejected token {token}"
    return total / len(doc_ids)


def measure_apply(vocab: int, batch: int, repeats: int = 30) -> dict[str, float]:
    """Applying a [batch, V] mask to float32 logits: ours (runtime.lm_service.sampling) and
    xgrammar's C++ CPU kernel, for random bits (the worst case) and for a string state's mask (all
    tokens but every 97th word allowed)."""
    words = (vocab + 31) // 32
    masks = {"random": torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32),
             "string": torch.full((batch, words), -1, dtype=torch.int32).index_fill_(1, torch.arange(0, words, 97), 0)}
    logits, rows, out = torch.randn(batch, vocab), list(range(batch)), {}
    for name, bitmask in masks.items():
        def ours(m: torch.Tensor = bitmask) -> None:
            apply_token_bitmask(logits, m, rows)

        def xgr(m: torch.Tensor = bitmask) -> None:
            xgrammar.apply_token_bitmask_inplace(logits, m, vocab_size=vocab, backend="cpu")

        out[f"apply_{name}_ours_ms"] = round(statistics.median(_timed(ours)[0] for _ in range(repeats)), 4)
        out[f"apply_{name}_xgrammar_cpu_ms"] = round(statistics.median(_timed(xgr)[0] for _ in range(repeats)), 4)
    return out


def measure_engine_overhead(cache: Path, batch: int = 16, tokens: int = 32) -> dict[str, Any]:
    """The tiny checkpoint's engine, `batch` greedy requests of exactly `tokens` tokens: mean decode
    step with no constrained request, with half and with all constrained (a regex that cannot end
    sooner), and the cost of the grammar hook itself when nothing is constrained."""
    from runtime.checkpoint.maker import make_checkpoint
    from runtime.lm_service.offline import OfflineLLM
    from runtime.protocol import SamplingParams, StructuredOutput
    from runtime.settings import EngineConfig

    path = cache / "tiny-checkpoint"
    if not (path / "config.json").exists():
        make_checkpoint(path, "tiny", 0, "transformers")
    llm = OfflineLLM(path, EngineConfig(prefix_caching=False))
    plain = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    regex = SamplingParams(temperature=0.0, max_tokens=tokens, structured=StructuredOutput("regex", "[a-z]{400}"))
    ids = llm.tokenizer.encode("Write a long word:", add_special_tokens=False)
    out: dict[str, Any] = {"batch": batch, "vocab": llm.engine.model_config.text.vocab_size}
    for name, constrained in (("none", 0), ("half", batch // 2), ("all", batch)):
        for i in range(batch):
            llm.submit_ids(f"{name}-{i}", ids, regex if i < constrained else plain)
        llm.step()  # the prefill
        times = [_timed(llm.step)[0] for _ in range(tokens - 2)]
        llm.run()
        out[f"step_ms_{name}_constrained"] = round(statistics.median(times), 3)
    engine, logits = llm.engine, torch.randn(batch, out["vocab"])
    states: list[Any] = [None] * batch

    def hook() -> None:  # what Engine._sample adds for rows when no request is constrained
        raw = engine.grammars.mask(states, logits) if engine.grammars.live else {}
        for i in range(batch):
            raw.get(i, None)

    out["hook_us_none_constrained"] = round(statistics.median(_timed(hook)[0] for _ in range(2000)) * 1e3, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default="512,32768,131072", help="tokenizer sizes (512 = the tiny checkpoints')")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "kimi-grammar-bench"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/grammar.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache)
    rows = []
    for size in (int(v) for v in args.vocab.split(",")):
        train_ms, path = _timed(lambda s=size: tiny_tokenizer(cache) if s == 512 else large_tokenizer(s, cache))
        tok = AutoTokenizer.from_pretrained(str(path))
        vocab = len(tok)
        model_vocab = (vocab + 63) // 64 * 64  # logits are wider than the tokenizer (the maker rounds up)
        doc_ids = tok.encode(DOCUMENT, add_special_tokens=False) + [tok.eos_token_id]
        print(f"tokenizer {path.name}: {vocab} tokens, document {len(doc_ids)} tokens", flush=True)
        for name in args.engines.split(","):
            row = {"tokenizer": path.name, "vocab": vocab, "doc_tokens": len(doc_ids),
                   **measure_engine(ENGINES[name], tok, model_vocab, doc_ids, args.repeats)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        for batch in (1, 16):
            row = {"tokenizer": path.name, "vocab": vocab, "batch": batch, **measure_apply(model_vocab, batch)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    overhead = measure_engine_overhead(cache)
    print(json.dumps(overhead), flush=True)
    result = {"machine": platform.processor() or platform.machine(), "torch_threads": 1,
              "schema": SCHEMA, "document": DOCUMENT, "rows": rows, "engine_overhead": overhead}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
