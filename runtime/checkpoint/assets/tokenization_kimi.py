"""The tokenizer class a Kimi-K2.5-style checkpoint ships as code: `tokenization_kimi.TikTokenTokenizer`.

Our own implementation of the interface of the official release's class, copied into the tiny checkpoints
that `make-checkpoint --tokenizer tiktoken` writes. tokenizer_config.json's auto_map names it, so
transformers' AutoTokenizer loads it only with trust_remote_code=True.

- `tiktoken.model` holds the byte-level BPE: one `base64(token bytes) rank` line per token, and a token's
  rank is its id.
- The special tokens take the `num_reserved_special_tokens` ids right after the ranks; those that
  tokenizer_config.json's added_tokens_decoder names have that name, the others are `<|reserved_token_{id}|>`.
- Token strings (get_vocab, convert_ids_to_tokens) are the bytes in GPT-2's printable byte alphabet.
- `encode(text)` with no other argument is tiktoken itself (special tokens inside the text are encoded as
  special tokens); with arguments it is PreTrainedTokenizer's encode. `decode(ids)` joins the bytes of the
  tokens kept (skip_special_tokens drops the named and additional special tokens) and decodes them as UTF-8
  once, an incomplete character becoming U+FFFD.

Self-contained on purpose (the standard library, tiktoken and transformers): the file travels with the checkpoint.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tiktoken.model"}

# Kimi's pre-tokenizer: runs of Han characters alone, words with their case and English contractions,
# numbers of at most three digits, punctuation runs, newlines, other whitespace.
_LETTERS_NOT_HAN_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_NOT_HAN_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
PAT_STR = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_NOT_HAN_UPPER}*{_LETTERS_NOT_HAN_LOWER}+{_CONTRACTION}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_NOT_HAN_UPPER}+{_LETTERS_NOT_HAN_LOWER}*{_CONTRACTION}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# tiktoken's regex engine recurses over long runs of one character class; feed it bounded pieces.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_NON_SPACE = re.compile(r"\S+")


def load_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """tiktoken.model -> {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f.read().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes are themselves, the other bytes
    take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def split_long_runs(text: str) -> Iterator[str]:
    """Pieces of text, none longer than MAX_ENCODE_CHARS, none with a whitespace or non-whitespace run
    longer than MAX_RUN_CHARS."""
    if len(text) <= MAX_ENCODE_CHARS and _longest_run(text) <= MAX_RUN_CHARS:  # no Python loop over the text
        yield text
        return
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        begin, run, space = 0, 0, chunk[:1].isspace()
        for i, ch in enumerate(chunk):
            if ch.isspace() != space:
                run, space = 1, ch.isspace()
            elif run == MAX_RUN_CHARS:
                yield chunk[begin:i]
                begin, run = i, 1
            else:
                run += 1
        yield chunk[begin:]


def _longest_run(text: str) -> int:
    """Length of the longest run of whitespace or of non-whitespace, in two linear passes in C."""
    return max(0, *map(len, text.split()), *map(len, _NON_SPACE.split(text)))


class TikTokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    pat_str = PAT_STR
    num_reserved_special_tokens = 256

    def __init__(
        self,
        vocab_file: str,
        bos_token: str | AddedToken = "[BOS]",
        eos_token: str | AddedToken = "[EOS]",
        unk_token: str | AddedToken | None = None,
        pad_token: str | AddedToken | None = None,
        additional_special_tokens: list[str] | None = None,
        added_tokens_decoder: dict[int, AddedToken] | None = None,
        num_reserved_special_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"no tiktoken ranks file at {vocab_file}")
        self.vocab_file = vocab_file
        ranks = load_ranks(vocab_file)
        # An instance attribute: save_pretrained writes it back to tokenizer_config.json.
        self.num_reserved_special_tokens = reserved = num_reserved_special_tokens or self.num_reserved_special_tokens
        names = {int(i): str(t) for i, t in (added_tokens_decoder or {}).items()}
        first = len(ranks)
        self.special_tokens = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(first, first + reserved)}
        self.model = tiktoken.Encoding(name=os.path.basename(vocab_file), pat_str=self.pat_str,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_words: int = self.model.n_vocab
        alphabet = byte_alphabet()
        self.byte_decoder = {c: b for b, c in alphabet.items()}
        self.decoder = {i: "".join(alphabet[b] for b in self.model.decode_single_token_bytes(i))
                        for i in range(self.n_words)}
        self.encoder = {token: i for i, token in self.decoder.items()}
        self.unk_id = self.special_tokens.get(str(unk_token)) if unk_token is not None else None
        if additional_special_tokens:  # transformers 5 calls them extra_special_tokens
            kwargs["additional_special_tokens"] = additional_special_tokens
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         added_tokens_decoder=added_tokens_decoder or {}, num_reserved_special_tokens=reserved,
                         **kwargs)

    # --- encoding and decoding -------------------------------------------------------------------

    def encode(self, text: Any, allow_special_tokens: bool = True, **kwargs: Any) -> Any:
        """tiktoken's ids of text; any other argument goes to PreTrainedTokenizer.encode."""
        if kwargs or not isinstance(text, str):
            return super().encode(text, **kwargs)
        allowed: Any = "all" if allow_special_tokens else set()
        ids: list[int] = []
        for piece in split_long_runs(text):
            ids += self.model.encode(piece, allowed_special=allowed, disallowed_special=())
        return ids

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        """Bytes of the kept tokens, decoded once (so a character split across tokens survives)."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            skip = set(self.all_special_ids)
            ids = [i for i in ids if i not in skip]
        return self.model.decode_bytes(ids).decode("utf-8", "replace")

    # --- what PreTrainedTokenizer needs ------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self.decoder[i] for i in self.encode(text)]

    def _convert_token_to_id(self, token: str) -> int | None:
        return self.encoder.get(token, self.unk_id)

    def _convert_id_to_token(self, index: int) -> str:
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytes(self.byte_decoder[c] for c in "".join(tokens))
        return data.decode("utf-8", "replace")

    @staticmethod
    def clean_up_tokenization(out_string: str) -> str:
        return out_string

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory} is not a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        out = os.path.join(save_directory, name)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
