"""Prompt encode time of the release's tokenizer format: PreTrainedTokenizer's path vs tiktoken's own.

    .venv/bin/python bench/tokenizer_encode.py [--repeat 40]

Builds the tiny checkpoint in both tokenizer formats (a temporary directory), renders one chat prompt
with an image placeholder and mixed text (English, CJK, emoji, code), and times, per encode:
- class: `tokenizer(text, add_special_tokens=False)`, what PromptBuilder did before the fast path
  (PreTrainedTokenizer splits the text at added tokens in Python, then calls tiktoken per piece);
- fast path: runtime.checkpoint.tokenizer_loader.text_encoder, the class's own `encode(text)` (tiktoken);
- tiktoken: the class's tiktoken.Encoding called directly, the floor;
- standard: the tokenizer.json checkpoint through transformers' fast (Rust) tokenizer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from runtime.checkpoint.maker import make_checkpoint
from runtime.checkpoint.tokenizer_loader import load_tokenizer, text_encoder

LINE = "Describe the image in one sentence. 这是一张图片。 emoji 👋🏽 code: def f(x): return x * 2\n"


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--lines", type=int, default=40, help="copies of the mixed line in the user message")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        release = load_tokenizer(make_checkpoint(Path(tmp) / "release", tokenizer="tiktoken"), True)
        standard = load_tokenizer(make_checkpoint(Path(tmp) / "standard"), False)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": LINE * args.lines}]}]
    text = release.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fast = text_encoder(release)
    ids = release(text, add_special_tokens=False)["input_ids"]
    assert fast(text) == ids == release.model.encode(text, allowed_special="all")
    rows = {
        "class": lambda: release(text, add_special_tokens=False)["input_ids"],
        "fast path": lambda: fast(text),
        "tiktoken": lambda: release.model.encode(text, allowed_special="all"),
        "standard": lambda: standard(text, add_special_tokens=False)["input_ids"],
    }
    print(f"{len(text)} characters, {len(ids)} tokens; best of {args.repeat}")
    for name, fn in rows.items():
        print(f"{name:>10}: {best_ms(fn, args.repeat):7.3f} ms")


if __name__ == "__main__":
    main()
