"""A checkpoint's tokenizer: the class AutoTokenizer would pick (without importing it), no untrusted code.

A checkpoint may name its own tokenizer class in tokenizer_config.json's auto_map (the official Kimi-K2.5
release does: tokenization_kimi.TikTokenTokenizer). That class is Python code from the checkpoint directory;
it is loaded only with trust_remote_code, and without it the load is refused here, with the setting to
change, before transformers would ask on stdin, raise its own error, or quietly load some other tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.errors import CheckpointError, RemoteCodeRefusedError


def custom_tokenizer_class(model_dir: str | Path) -> str | None:
    """The `module.Class` that tokenizer_config.json's auto_map names for AutoTokenizer, or None."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        auto_map = json.loads(path.read_text()).get("auto_map")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a JSON object: {e}") from e
    refs = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map  # a list: the old form
    if isinstance(refs, str):
        return refs
    return next((r for r in refs or () if r), None)


def check_tokenizer_code(model_dir: str | Path, trust_remote_code: bool) -> None:
    """Raise RemoteCodeRefusedError if the tokenizer is checkpoint code and trust_remote_code is off, and
    CheckpointError if the trusted code's file is missing."""
    ref = custom_tokenizer_class(model_dir)
    if ref is None:
        return
    if not trust_remote_code:
        raise RemoteCodeRefusedError(str(model_dir), ref)
    module = ref.split("--")[-1].rsplit(".", 1)[0]
    if "--" not in ref and not (Path(model_dir) / f"{module}.py").is_file():
        raise CheckpointError(f"tokenizer_config.json names {ref!r} but {model_dir} has no {module}.py")


def text_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """text -> the ids `tokenizer(text, add_special_tokens=False)` gives (special tokens inside the text
    included). A tiktoken-backed tokenizer (the release's TikTokenTokenizer: its `model` is a tiktoken.Encoding)
    encodes with its own `encode(text)`, tiktoken itself without PreTrainedTokenizer's Python pre-split of the
    text at added tokens: the same ids, 6.5x faster on a 2k-token prompt (bench/tokenizer_encode.py)."""
    import tiktoken

    if isinstance(getattr(tokenizer, "model", None), tiktoken.Encoding):
        return tokenizer.encode
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool) -> Any:
    """The class tokenizer_config.json names, as AutoTokenizer would pick it, but without importing
    AutoTokenizer: that pulls in transformers' model configuration, and with it torch (about 380 MiB
    and 2 s in the router, which holds no tensors)."""
    check_tokenizer_code(model_dir, trust_remote_code)
    return _tokenizer_class(Path(model_dir)).from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)


def _tokenizer_class(model_dir: Path) -> Any:
    import transformers

    ref = custom_tokenizer_class(model_dir)
    if ref is not None:  # checked by check_tokenizer_code: the user trusts this checkpoint's code
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls: Any = get_class_from_dynamic_module(ref, str(model_dir))
        # What AutoTokenizer's register_for_auto_class() sets (save_pretrained then copies the code
        # too), without its check that imports AutoTokenizer; test_tokenization_kimi's round trip guards it.
        cls._auto_class = "AutoTokenizer"
        return cls
    config = model_dir / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    named = getattr(transformers, name, None) if isinstance(name, str) else None
    if named is not None and hasattr(named, "from_pretrained"):
        return named
    return transformers.AutoTokenizer  # no class named, or one transformers does not export by that name
