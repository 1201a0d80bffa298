"""Argument checks for the Python entry points (`generate`, `load_target_bundle`, `load_draft_bundle`).

Python callers get the same courtesy as the CLI: a wrong argument is named, with what was expected,
before any work — instead of a confusing error deep inside (or, worse, a silently wrong run):

* a `str` prompt is one prompt (not one prompt per character); a flat list of token ids is one prompt;
* token ids, `max_new_tokens`, `block_size` and `seed` must be integers (a float is never truncated);
* `sampling` must be a `SamplingConfig` (a dict or a bare `temperature=` keyword is named as such);
* keyword arguments are checked by name: a misspelt one gets a "did you mean" instead of "needs a
  draft model"; speculative options without a draft say so.

`RequestError` is both a `TypeError` and a `ValueError` (whichever a caller expects to catch).
"""

from __future__ import annotations

import difflib
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["RequestError", "SPECULATIVE_OPTIONS", "GENERATE_KEYWORDS", "normalize_prompts", "check_generate_request",
           "check_load_request"]

# Keyword options of `generate` that only the speculative path takes (name -> what it must be).
SPECULATIVE_OPTIONS: dict[str, str] = {
    "block_size": "an integer >= 1 (drafts per round, at most the checkpoint's block size)",
    "confidence_threshold": "a number in [0, 1)",
    "survival_threshold": "a number in [0, 1)",
    "record_rounds": "True or False",
}
# Every keyword `generate` accepts (for "did you mean" suggestions).
GENERATE_KEYWORDS = ("draft", "max_new_tokens", "sampling", "seed", "stop_token_ids", *SPECULATIVE_OPTIONS)
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p")
_INT64 = 2**63


class RequestError(TypeError, ValueError):
    """An invalid argument to a Python entry point; the message names it and what was expected."""


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _kind(x: Any) -> str:
    return f"{x!r} ({type(x).__name__})"


def normalize_prompts(prompts: Any) -> list:
    """`prompts` as a list of prompts: a `str` or a flat sequence of token ids is ONE prompt.

    RequestError for anything that is not text or token ids, and for non-integer token ids (a float
    id such as 3.0 or 3.7 is refused rather than truncated).
    """
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):
        raise RequestError("prompts must be text (str) or token ids, got bytes; decode it first")
    if hasattr(prompts, "ndim") and hasattr(prompts, "tolist"):  # numpy / jax arrays
        if prompts.ndim not in (1, 2):
            raise RequestError(f"a token-id array prompt must be 1-D (one prompt) or 2-D (a batch), "
                               f"got shape {tuple(prompts.shape)}")
        if not str(getattr(prompts, "dtype", "")).startswith(("int", "uint")):
            raise RequestError(f"token ids must be integers, got an array of dtype {prompts.dtype}")
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence):
        raise RequestError(f"prompts must be a str, a list of str, or a list of token-id lists, got "
                           f"{type(prompts).__name__}")
    items = list(prompts)
    if items and all(_is_int(t) for t in items):
        items = [items]  # one token-id prompt
    out = []
    for i, p in enumerate(items):
        if isinstance(p, str):
            out.append(p)
            continue
        if hasattr(p, "tolist") and not isinstance(p, (list, tuple)):
            p = p.tolist()
        if not isinstance(p, Sequence) or isinstance(p, (bytes, bytearray)):
            raise RequestError(f"prompt {i} must be a str or a list of token ids, got {type(p).__name__}")
        for j, t in enumerate(p):
            if not _is_int(t):
                raise RequestError(f"prompt {i}, token {j}: token ids must be integers, got {_kind(t)}")
        out.append([int(t) for t in p])
    return out


def _check_sampling(sampling: Any) -> None:
    if sampling is None:
        return
    from dspark_jax.sampling import SamplingConfig

    if isinstance(sampling, Mapping):
        raise RequestError(f"sampling must be a SamplingConfig, got a dict; use "
                           f"sampling=SamplingConfig(**{dict(sampling)!r})")
    if not isinstance(sampling, SamplingConfig):
        raise RequestError(f"sampling must be a SamplingConfig (e.g. SamplingConfig(temperature=0.7, top_p=0.9)), "
                           f"got {type(sampling).__name__}")
    for name in _SAMPLING_FIELDS:
        value = getattr(sampling, name)
        ok = _is_int(value) if name == "top_k" else _is_number(value)
        if not ok:
            raise RequestError(f"sampling.{name} must be {'an integer' if name == 'top_k' else 'a number'}, "
                               f"got {_kind(value)}")


def _check_options(options: Mapping[str, Any], has_draft: bool) -> None:
    for name, value in options.items():
        if name not in SPECULATIVE_OPTIONS:
            if name in _SAMPLING_FIELDS:
                raise RequestError(f"generate() got {name}=...: sampling settings go in "
                                   f"sampling=SamplingConfig({name}={value!r})")
            close = difflib.get_close_matches(name, GENERATE_KEYWORDS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; accepted: {', '.join(GENERATE_KEYWORDS)}"
            raise RequestError(f"generate() got an unexpected keyword argument {name!r}{hint}")
        if name == "block_size":
            ok = value is None or (_is_int(value) and value >= 1)
        elif name == "record_rounds":
            ok = isinstance(value, bool)
        else:
            ok = _is_number(value) and 0 <= value < 1
        if not ok:
            raise RequestError(f"{name} must be {SPECULATIVE_OPTIONS[name]}, got {_kind(value)}")
    if options and not has_draft:
        raise RequestError(f"{', '.join(sorted(options))} only apply to speculative decoding: pass "
                           f"draft=load_draft_bundle(...) or drop {'them' if len(options) > 1 else 'it'}")


def check_generate_request(target: Any, prompts: Any, *, draft: Any, max_new_tokens: Any, sampling: Any, seed: Any,
                           stop_token_ids: Any, options: Mapping[str, Any]) -> list:
    """Check every argument of `generate()`; return the prompts as a list (see `normalize_prompts`)."""
    if isinstance(target, (str, os.PathLike)) or not (hasattr(target, "config") and hasattr(target, "params")):
        raise RequestError(f"target must be a loaded target (infer.load_target_bundle(path)), got "
                           f"{type(target).__name__}")
    if draft is not None and (isinstance(draft, (str, os.PathLike))
                              or not (hasattr(draft, "config") and hasattr(draft, "params"))):
        raise RequestError(f"draft must be a loaded drafter (infer.load_draft_bundle(path, target)) or None, got "
                           f"{type(draft).__name__}")
    if not _is_int(max_new_tokens):
        raise RequestError(f"max_new_tokens must be an integer, got {_kind(max_new_tokens)}")
    if not _is_int(seed) or not -_INT64 <= seed < _INT64:
        raise RequestError(f"seed must be an integer in [-2^63, 2^63), got {_kind(seed)}")
    if stop_token_ids is not None:
        if isinstance(stop_token_ids, (str, bytes)) or not isinstance(stop_token_ids, Sequence) \
                or not all(_is_int(t) for t in stop_token_ids):
            raise RequestError(f"stop_token_ids must be a list of integer token ids or None, got {stop_token_ids!r}")
    _check_sampling(sampling)
    _check_options(options, draft is not None)
    return normalize_prompts(prompts)


def check_load_request(path: Any, *, dtype: Any = None, target: Any = None, what: str = "model_dir") -> None:
    """Check the arguments of a loader: a path (str / os.PathLike), a dtype name or None, and for a
    drafter a loaded target or None (a path given as the target is named as such)."""
    if not isinstance(path, (str, os.PathLike)):
        raise RequestError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    if dtype is not None and not isinstance(dtype, str) and not hasattr(dtype, "itemsize") \
            and not isinstance(dtype, type):
        raise RequestError(f"dtype must be 'float32', 'bfloat16', 'float16' or None, got {_kind(dtype)}")
    if target is not None and (isinstance(target, (str, os.PathLike)) or not hasattr(target, "config")):
        raise RequestError(f"target must be a loaded target (infer.load_target_bundle(path)) or None, got "
                           f"{type(target).__name__}")
