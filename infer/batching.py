"""Host-side batching pieces shared by autoregressive and speculative generation.

Result and error types, prompt validation, padding to shape buckets, stop-id arrays, and the
per-request normalisation of sampling configs, seeds and thresholds into `RowParams`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import numpy as np

from dspark_jax.sampling import SamplingConfig
from infer.state import RowParams, describe_nonfinite, row_keys_from_seeds

__all__ = ["GenerationError", "GenerationResult", "bucket_length", "cache_length", "pad_batch", "stop_array",
           "per_row", "row_params", "check_nonfinite", "validate_prompts"]

SEED_LIMIT = 2 ** 63


class GenerationError(ValueError):
    """Invalid generation request (empty prompt, too long for the cache / model, ...) or a run that
    produced non-finite values."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """Generated continuations (prompt excluded) and run metrics."""

    token_ids: list[list[int]]
    texts: list[str] | None
    metrics: dict[str, Any]


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def cache_length(bucket: int, need: int) -> int:
    """KV cache capacity: >= the prompt bucket and `need`, rounded up to a multiple of 64."""
    return -(-max(bucket, need) // 64) * 64


def pad_batch(prompts: list[list[int]], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id prompts to [B, bucket] int32; also returns lengths [B]."""
    tokens = np.zeros((len(prompts), bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.asarray([len(p) for p in prompts], np.int32)


def stop_array(stop_ids: Sequence[int], width: int = 8) -> np.ndarray:
    """Stop ids padded with -1 to a fixed width (so the compiled program does not depend on them)."""
    ids = list(dict.fromkeys(int(s) for s in stop_ids))
    width = max(width, len(ids))
    return np.asarray(ids + [-1] * (width - len(ids)), np.int32)


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """Id prompts as lists of ints: non-empty, integer ids inside the vocabulary."""
    out = []
    for i, p in enumerate(prompts):
        ids = []
        for t in p:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise GenerationError(f"prompt {i} has a non-integer token id {t!r}")
            ids.append(int(t))
        if not ids:
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        out.append(ids)
    return out


def per_row(name: str, value: Any, n: int, check=None) -> list:
    """One value per prompt from a scalar or a sequence of length n (checked by `check(v) -> msg|None`)."""
    seq = isinstance(value, (list, tuple, np.ndarray))
    values = list(value) if seq else [value] * n
    if len(values) != n:
        raise GenerationError(f"{name} has {len(values)} entries for {n} prompts")
    if check is not None:
        for i, v in enumerate(values):
            msg = check(v)
            if msg:
                raise GenerationError(f"{name}[{i}] {msg}" if seq else f"{name} {msg}")
    return values


def _check_sampling(v) -> str | None:
    return None if isinstance(v, SamplingConfig) else f"must be a SamplingConfig, got {type(v).__name__}"


def _check_seed(v) -> str | None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        return f"must be an integer, got {type(v).__name__} {v!r}"
    return None if -SEED_LIMIT <= int(v) < SEED_LIMIT else f"must be in [-2**63, 2**63), got {v}"


def _check_threshold(v) -> str | None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return f"must be a number, got {type(v).__name__} {v!r}"
    return None if 0.0 <= float(v) < 1.0 else f"must be in [0, 1), got {v}"


def row_params(n: int, *, sampling, seed, stop_ids: np.ndarray, max_new_tokens: int, confidence_threshold=0.0,
               survival_threshold=0.0) -> tuple[RowParams, list[SamplingConfig]]:
    """Per-row settings from per-request or shared values; (RowParams, the per-row SamplingConfigs)."""
    configs = per_row("sampling", SamplingConfig() if sampling is None else sampling, n, _check_sampling)
    if isinstance(seed, (list, tuple, np.ndarray)):
        seeds = per_row("seed", seed, n, _check_seed)
        keys = row_keys_from_seeds([int(s) for s in seeds], n)
    else:
        per_row("seed", seed, 1, _check_seed)
        keys = row_keys_from_seeds(int(seed), n)
    conf = per_row("confidence_threshold", confidence_threshold, n, _check_threshold)
    surv = per_row("survival_threshold", survival_threshold, n, _check_threshold)
    params = RowParams.build(configs, keys, stop_ids, max_new_tokens, [float(c) for c in conf],
                             [float(s) for s in surv])
    return params, configs


def check_nonfinite(flags: np.ndarray) -> None:
    """Raise GenerationError naming what went non-finite (and in which rows), if anything did."""
    msg = describe_nonfinite(flags)
    if msg:
        raise GenerationError(msg + "; the weights or inputs are broken (no output returned)")
