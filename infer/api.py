"""Notebook-level API: load a target (and optionally a draft), then `generate(...)`.

    target = load_target_bundle("path/to/qwen3")
    result = generate(target, ["def fib(n):"], max_new_tokens=64)
    print(result.texts[0], result.metrics)

Prompts may be strings (needs the checkpoint's tokenizer) or lists of token ids. Shapes are
bucketed (prompt length to a power of two, cache length to a multiple of 64), so calls with
similar prompts reuse one compiled program; compile time is reported separately from run time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import TargetConfig
from dspark_jax.sampling import SamplingConfig
from infer.autoregressive import autoregressive_generate
from infer.compiled import run_compiled

__all__ = ["Target", "GenerationResult", "GenerationError", "load_target_bundle", "generate",
           "prepare_prompts", "bucket_length"]


class GenerationError(ValueError):
    """Invalid generation request (empty prompt, too long for the cache / model, ...)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    """A loaded target model: config, parameters, and (optionally) its tokenizer and stop ids."""

    config: TargetConfig
    params: Any
    tokenizer: Any = None  # dspark_jax.tokenizer.Tokenizer or None
    stop_token_ids: tuple[int, ...] = ()
    path: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """Generated continuations (prompt excluded) and run metrics."""

    token_ids: list[list[int]]
    texts: list[str] | None
    metrics: dict[str, Any]


def load_target_bundle(model_dir: str | os.PathLike, *, dtype: str | None = None, shardings=None) -> Target:
    """Load config, safetensors weights and tokenizer (if present) from an HF-layout directory."""
    from dspark_jax.checkpoint.hf import load_target
    from dspark_jax.tokenizer import Tokenizer

    config, params = load_target(model_dir, dtype=dtype, shardings=shardings)
    tokenizer = None
    stop_ids: tuple[int, ...] = tuple(config.eos_token_ids)
    if os.path.isfile(os.path.join(os.fspath(model_dir), "tokenizer.json")):
        tokenizer = Tokenizer.from_dir(model_dir)
        tokenizer.check_compatible(config)
        stop_ids = tuple(tokenizer.stop_token_ids) or stop_ids
    return Target(config=config, params=params, tokenizer=tokenizer, stop_token_ids=stop_ids,
                  path=os.fspath(model_dir))


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def prepare_prompts(target: Target, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Tokenize string prompts; validate id prompts (non-empty, ids inside the vocabulary)."""
    if len(prompts) == 0:
        raise GenerationError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if target.tokenizer is None:
                raise GenerationError("string prompts need a tokenizer.json in the target directory; "
                                      "pass token ids instead")
            ids = target.tokenizer.encode(p)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < target.config.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                                  f"[0, {target.config.vocab_size})")
        out.append(ids)
    return out


def _pad_batch(prompts: list[list[int]], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(prompts), bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.asarray([len(p) for p in prompts], np.int32)


def place_prompts(tokens: np.ndarray, lengths: np.ndarray) -> tuple:
    """Prompt arrays on the batch axis of the mesh set by `jax.set_mesh` (plain arrays without one)."""
    from dspark_jax.sharding import current_mesh, place_batch

    mesh = jax.sharding.get_mesh() if current_mesh() is not None else None
    return place_batch(mesh, tokens, lengths) if mesh is not None else (jnp.asarray(tokens), jnp.asarray(lengths))


def stop_array(stop_ids: Sequence[int], width: int = 8) -> np.ndarray:
    """Stop ids padded with -1 to a fixed width (so the compiled program does not depend on them)."""
    ids = list(dict.fromkeys(int(s) for s in stop_ids))
    width = max(width, len(ids))
    return np.asarray(ids + [-1] * (width - len(ids)), np.int32)




def generate(target: Target, prompts: Sequence[str] | Sequence[Sequence[int]], *, draft=None,
             max_new_tokens: int = 128, sampling: SamplingConfig | None = None, seed: int = 0,
             stop_token_ids: Sequence[int] | None = None, mesh=None, **speculative_options) -> GenerationResult:
    """Generate continuations for a batch of prompts.

    With `draft=None` this is plain autoregressive decoding; with a loaded draft it runs the
    lossless speculative loop (`infer.speculative`). Output excludes the prompt and includes a
    row's stop token when one ends it. `mesh` (`dspark_jax.sharding.make_mesh`): place the batch
    on `data`, the target by the rules table, the draft replicated, and sample over the
    vocabulary shards (docs/sharding.md); the same tokens as on one device.
    """
    if mesh is not None:
        from dspark_jax.sharding import shard_params, target_param_shardings

        target = dataclasses.replace(target, params=shard_params(target.params,
                                                                 target_param_shardings(target.config, mesh)))
        with jax.set_mesh(mesh):
            return generate(target, prompts, draft=draft, max_new_tokens=max_new_tokens, sampling=sampling,
                            seed=seed, stop_token_ids=stop_token_ids, **speculative_options)
    sampling = sampling or SamplingConfig()
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = prepare_prompts(target, prompts)
    longest = max(len(p) for p in ids)
    limit = target.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise GenerationError(f"prompt length {longest} + max_new_tokens {max_new_tokens} = "
                              f"{longest + max_new_tokens} exceeds max_position_embeddings {limit}")
    stops = stop_array(target.stop_token_ids if stop_token_ids is None else stop_token_ids)
    if draft is not None:
        from infer.speculative_api import speculative_generate_batch  # late import: optional path

        return speculative_generate_batch(target, draft, ids, max_new_tokens=max_new_tokens,
                                          sampling=sampling, seed=seed, stop_ids=stops, **speculative_options)
    if speculative_options:
        raise GenerationError(f"options {sorted(speculative_options)} need a draft model")
    bucket = bucket_length(longest)
    cache_len = -(-max(bucket, longest + max_new_tokens) // 64) * 64
    tokens, lengths = _pad_batch(ids, bucket)
    static = dict(config=target.config, max_new_tokens=max_new_tokens, cache_len=cache_len, mode=sampling.mode)
    args = (target.params, *place_prompts(tokens, lengths), jax.random.PRNGKey(seed),
            sampling.values(), jnp.asarray(stops))
    (out, num), compile_s, wall = run_compiled(autoregressive_generate, args, static)
    out, num = np.asarray(out), np.asarray(num)
    token_ids = [out[i, :num[i]].tolist() for i in range(len(ids))]
    n_tokens = int(num.sum())
    texts = [target.tokenizer.decode(t) for t in token_ids] if target.tokenizer is not None else None
    metrics = {"mode": "autoregressive", "tokens": n_tokens, "wall_s": wall,
               "tokens_per_s": n_tokens / wall if wall > 0 else float("inf"), "compile_s": compile_s,
               "batch_size": len(ids)}
    return GenerationResult(token_ids=token_ids, texts=texts, metrics=metrics)
