"""Thin wrapper around a Hugging Face `tokenizers` `tokenizer.json` plus the model's stop tokens.

`Tokenizer.from_dir(model_dir)` reads `<model_dir>/tokenizer.json`. Stop (end-of-sequence) ids
come from, in order of preference: `generation_config.json` `eos_token_id`, `config.json`
`eos_token_id`, then the tokenizer's own EOS token as named in `tokenizer_config.json` /
`special_tokens_map.json`. `eos_token_id` may be an int, a list of ints, or absent.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import tokenizers

from dspark_jax.config import TargetConfig

__all__ = ["Tokenizer", "TokenizerError", "read_stop_token_ids"]


class TokenizerError(ValueError):
    """A missing or unreadable tokenizer file, or a tokenizer that does not fit the model."""


def _read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at `path`, None if the file is absent; TokenizerError if it is invalid."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _as_ids(value: Any, source: str) -> tuple[int, ...] | None:
    """`eos_token_id` (int | list[int] | None) -> tuple of ids (None when unset)."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        return tuple(dict.fromkeys(int(v) for v in items))  # de-duplicated, order kept
    except (TypeError, ValueError) as e:
        raise TokenizerError(f"{source}: eos_token_id must be an int or a list of ints, got {value!r}") from e


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: either a string or {'content': str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_stop_token_ids(model_dir: str | os.PathLike, tokenizer: tokenizers.Tokenizer | None = None) -> tuple[int, ...]:
    """Stop ids of the model in `model_dir` (see module docstring for the lookup order); may be ()."""
    d = os.fspath(model_dir)
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(d, name)
        data = _read_json(path)
        if data is not None:
            ids = _as_ids(data.get("eos_token_id"), path)
            if ids is not None:
                return ids
    if tokenizer is not None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            data = _read_json(os.path.join(d, name))
            content = _token_content(data.get("eos_token")) if data else None
            if content is not None and tokenizer.token_to_id(content) is not None:
                return (int(tokenizer.token_to_id(content)),)
    return ()


class Tokenizer:
    """Text <-> token ids with the stop ids of a model directory.

    Attributes:
        stop_token_ids: ids that end generation (possibly empty).
        path: the `tokenizer.json` this was loaded from (None when built from an object).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, stop_token_ids: Iterable[int] = (), *,
                 path: str | None = None):
        """Wrap an already-loaded `tokenizers.Tokenizer`."""
        self._tok = tokenizer
        self.stop_token_ids: tuple[int, ...] = tuple(int(i) for i in stop_token_ids)
        self.path = path

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "Tokenizer":
        """Load `<model_dir>/tokenizer.json` and the stop ids of `model_dir`."""
        d = os.fspath(model_dir)
        path = os.path.join(d, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file not found: {path!r} (expected a Hugging Face tokenizer.json)")
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust library raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from e
        return cls(tok, read_stop_token_ids(d, tok), path=path)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can emit (including added special tokens)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_token_id(self) -> int | None:
        """The first stop id, or None when there is none."""
        return self.stop_token_ids[0] if self.stop_token_ids else None

    def token_to_id(self, token: str) -> int | None:
        """Id of the literal `token` (e.g. '<|endoftext|>'), None if unknown."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; the tokenizer's post-processor (BOS etc.) only runs when asked."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` for several texts (unpadded, one list per text)."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (ints or a 1-D integer array)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def check_compatible(self, config: TargetConfig) -> None:
        """Raise TokenizerError if some token or stop id could not be embedded by the model.

        A tokenizer smaller than the model's `vocab_size` is fine (checkpoints pad the vocabulary).
        """
        where = f" ({self.path})" if self.path else ""
        if self.vocab_size > config.vocab_size:
            raise TokenizerError(
                f"tokenizer{where} has {self.vocab_size} tokens but the model's vocab_size is "
                f"{config.vocab_size}: ids >= {config.vocab_size} cannot be embedded")
        bad = [i for i in self.stop_token_ids if not 0 <= i < config.vocab_size]
        if bad:
            raise TokenizerError(f"stop token id(s) {bad}{where} outside the model's vocab_size {config.vocab_size}")

    def __repr__(self) -> str:
        """Short description: vocab size and stop ids."""
        return f"Tokenizer(vocab_size={self.vocab_size}, stop_token_ids={self.stop_token_ids}, path={self.path!r})"
