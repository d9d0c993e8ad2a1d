"""A tokenizer that ships as checkpoint code loads only when trusted, and is refused by our own error otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import transformers

from runtime.checkpoint.tokenizer_loader import custom_tokenizer_class, load_tokenizer
from runtime.errors import CheckpointError, RemoteCodeRefusedError


@pytest.fixture(scope="module")
def tiktoken_dir(checkpoints: Any) -> Path:
    return checkpoints("tiny", tokenizer="tiktoken")


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "tokenizer_config.json", "tiktoken.model", "tokenization_kimi.py",
                 "chat_template.jinja"):
        shutil.copy(src / name, dst / name)
    return dst


def test_the_release_format_names_its_class(tiktoken_dir: Path, checkpoints: Any) -> None:
    assert custom_tokenizer_class(tiktoken_dir) == "tokenization_kimi.TikTokenTokenizer"
    assert custom_tokenizer_class(checkpoints("tiny")) is None


def test_untrusted_code_is_refused_before_transformers_sees_it(tiktoken_dir: Path, monkeypatch) -> None:
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("transformers was asked to load the tokenizer")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)
    with pytest.raises(RemoteCodeRefusedError) as e:
        load_tokenizer(tiktoken_dir, trust_remote_code=False)
    message = str(e.value)
    assert "trust_remote_code: true" in message and "--trust-remote-code" in message
    assert "tokenization_kimi.TikTokenTokenizer" in message and str(tiktoken_dir) in message


@pytest.mark.parametrize("trusted", [True, False])
def test_the_tokenizer_is_the_one_auto_tokenizer_picks(tiktoken_dir: Path, checkpoints: Any, trusted: bool) -> None:
    """load_tokenizer picks the class itself (AutoTokenizer would import torch): the checkpoint's own
    class when trusted, else the one tokenizer_config.json names; the same class and ids either way."""
    path = tiktoken_dir if trusted else checkpoints("tiny")
    ours = load_tokenizer(path, trust_remote_code=trusted)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=trusted)
    text = "Hello <|im_end|> world, 你好 12345 !!"
    assert type(ours).__name__ == type(theirs).__name__ == ("TikTokenTokenizer" if trusted else "TokenizersBackend")
    assert ours(text)["input_ids"] == theirs(text)["input_ids"] and ours.all_special_ids == theirs.all_special_ids


def test_standard_checkpoint_needs_no_trust(checkpoints: Any) -> None:
    assert load_tokenizer(checkpoints("tiny"), trust_remote_code=False).is_fast


def test_old_list_form_of_auto_map_is_refused_too(tiktoken_dir: Path, tmp_path: Path) -> None:
    path = _copy_tokenizer(tiktoken_dir, tmp_path / "old")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["auto_map"] = ["tokenization_kimi.TikTokenTokenizer", None]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RemoteCodeRefusedError):
        load_tokenizer(path, trust_remote_code=False)


def test_trusted_but_missing_code_names_the_file(tiktoken_dir: Path, tmp_path: Path) -> None:
    path = _copy_tokenizer(tiktoken_dir, tmp_path / "missing")
    (path / "tokenization_kimi.py").unlink()
    with pytest.raises(CheckpointError, match="no tokenization_kimi.py"):
        load_tokenizer(path, trust_remote_code=True)
