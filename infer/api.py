"""Notebook-level API: load a target (and optionally a draft), then `generate(...)` or `stream(...)`.

    target = load_target_bundle("path/to/qwen3")
    result = generate(target, ["def fib(n):"], max_new_tokens=64)
    print(result.texts[0], result.metrics)

Prompts may be strings (needs the checkpoint's tokenizer) or lists of token ids; a single string
is one prompt. Sampling settings, seeds and confidence thresholds may be given per prompt (one
compiled program serves any mix: only the sampling *class* is compiled in). Shapes are bucketed
(prompt length to a power of two, cache length to a multiple of 64), so calls with similar
prompts reuse one compiled program; compile time is reported separately from run time.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import TargetConfig
from dspark_jax.sampling import SamplingConfig, SamplingMode
from dspark_jax.sharding import place_rows
from dspark_jax.target.model import output_kernel
from infer import speculative_api
from infer.autoregressive import autoregressive_generate
from infer.batching import (GenerationError, GenerationResult, bucket_length, cache_length, check_nonfinite,
                            pad_batch, row_params, stop_array, validate_prompts)
from infer.compiled import run_compiled
from infer.request_validation import check_generate_request, check_load_request
from infer.state import ARLoop
from infer.step import ar_init, ar_step, spec_init, spec_models, spec_step, stream_steps

__all__ = ["Target", "GenerationResult", "GenerationError", "load_target_bundle", "generate", "stream",
           "prepare_prompts", "bucket_length", "stop_array"]

@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    """A loaded target model: config, parameters, and (optionally) its tokenizer and stop ids."""

    config: TargetConfig
    params: Any
    tokenizer: Any = None  # dspark_jax.tokenizer.Tokenizer or None
    stop_token_ids: tuple[int, ...] = ()
    path: str | None = None


def load_target_bundle(model_dir: str | os.PathLike, *, dtype: str | None = None, shardings=None) -> Target:
    """Load config, safetensors weights and tokenizer (if present) from an HF-layout directory."""
    check_load_request(model_dir, dtype=dtype)
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


def prepare_prompts(target: Target, prompts: str | Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Tokenize string prompts (a single string is one prompt); validate id prompts."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise GenerationError("no prompts given")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if target.tokenizer is None:
                raise GenerationError("string prompts need a tokenizer.json in the target directory; "
                                      "pass token ids instead")
            ids.append(target.tokenizer.encode(p))
        else:
            ids.append(p)
    return validate_prompts(ids, target.config.vocab_size)


@dataclasses.dataclass(frozen=True)
class _Request:
    """A validated batch: padded prompts, per-row params, the static loop, and the draft (or None)."""

    ids: list[list[int]]
    tokens: np.ndarray
    lengths: np.ndarray
    params: Any
    loop: Any
    draft: Any


def _prepare(target: Target, prompts, draft, max_new_tokens, sampling, seed, stop_token_ids,
             speculative_options: dict) -> _Request:
    prompts = check_generate_request(target, prompts, draft=draft, max_new_tokens=max_new_tokens, sampling=sampling,
                                     seed=seed, stop_token_ids=stop_token_ids, options=speculative_options)
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = prepare_prompts(target, prompts)
    longest = max(len(p) for p in ids)
    limit = target.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise GenerationError(f"prompt length {longest} + max_new_tokens {max_new_tokens} = "
                              f"{longest + max_new_tokens} exceeds max_position_embeddings {limit}")
    stops = stop_array(target.stop_token_ids if stop_token_ids is None else stop_token_ids)
    thresholds = {k: speculative_options.get(k, 0.0) for k in ("confidence_threshold", "survival_threshold")}
    params, configs = row_params(len(ids), sampling=sampling, seed=seed, stop_ids=stops,
                                 max_new_tokens=max_new_tokens, **thresholds)
    mode = SamplingMode.covering(configs)
    bucket = bucket_length(longest)
    tokens, lengths = pad_batch(ids, bucket)
    if draft is None:
        loop = ARLoop(target=target.config, mode=mode, max_new_tokens=max_new_tokens,
                      cache_len=cache_length(bucket, longest + max_new_tokens))
    else:
        loop = speculative_api.speculative_loop(
            target, draft, longest=longest, bucket=bucket, max_new_tokens=max_new_tokens, mode=mode,
            block_size=speculative_options.get("block_size"),
            record_rounds=speculative_options.get("record_rounds", False),
            backend=speculative_options.get("backend", "xla"),
            thresholds_used=any(np.any(np.asarray(v) > 0) for v in thresholds.values()))
    return _Request(ids=ids, tokens=tokens, lengths=lengths, params=params, loop=loop, draft=draft)


def generate(target: Target, prompts: str | Sequence[str] | Sequence[Sequence[int]], *, draft=None,
             max_new_tokens: int = 128, sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
             seed: int | Sequence[int] = 0, stop_token_ids: Sequence[int] | None = None, mesh=None,
             **speculative_options) -> GenerationResult:
    """Generate continuations for a batch of prompts.

    With `draft=None` this is plain autoregressive decoding; with a loaded draft it runs the
    lossless speculative loop (`infer.speculative`; options `block_size`, `confidence_threshold`,
    `survival_threshold` (scalars or one per prompt), `record_rounds`, `backend` = 'xla' (default) |
    'pallas' | 'auto': the fused sequential-head and verification kernels, see `dspark_jax.kernels`).
    `sampling` and `seed` may be one value for all prompts or one per prompt; a row's output depends
    only on its own settings and seed (with one int seed, row r uses fold_in(PRNGKey(seed), r)). Output excludes
    the prompt and includes a row's stop token when one ends it. Raises GenerationError for bad
    requests and when the run produced NaN/Inf logits.

    `mesh` (`dspark_jax.sharding.make_mesh`): the batch goes on `data`, the target on
    `fsdp`/`model` by the rules table, the draft is replicated, and sampling runs on the vocabulary
    shards (docs/sharding.md); the tokens equal a 1-device run. Calling inside `jax.set_mesh`
    with params already placed does the same.
    """
    if mesh is not None:
        from dspark_jax.sharding import shard_params, target_param_shardings

        target = dataclasses.replace(target, params=shard_params(target.params,
                                                                 target_param_shardings(target.config, mesh)))
        with jax.set_mesh(mesh):
            return generate(target, prompts, draft=draft, max_new_tokens=max_new_tokens, sampling=sampling,
                            seed=seed, stop_token_ids=stop_token_ids, **speculative_options)
    req = _prepare(target, prompts, draft, max_new_tokens, sampling, seed, stop_token_ids, speculative_options)
    if draft is not None:
        return speculative_api.run_speculative_batch(target, draft, req.loop, req.ids, req.tokens, req.lengths,
                                                     req.params)
    args = (target.params, *place_rows((jnp.asarray(req.tokens), jnp.asarray(req.lengths), req.params)))
    (out, num, nonfinite), compile_s, wall = run_compiled(autoregressive_generate, args, {"loop": req.loop})
    check_nonfinite(np.asarray(nonfinite))
    out, num = np.asarray(out), np.asarray(num)
    token_ids = [out[i, :num[i]].tolist() for i in range(len(req.ids))]
    n_tokens = int(num.sum())
    texts = [target.tokenizer.decode(t) for t in token_ids] if target.tokenizer is not None else None
    metrics = {"mode": "autoregressive", "tokens": n_tokens, "wall_s": wall,
               "tokens_per_s": n_tokens / wall if wall > 0 else float("inf"), "compile_s": compile_s,
               "batch_size": len(req.ids)}
    return GenerationResult(token_ids=token_ids, texts=texts, metrics=metrics)


def stream(target: Target, prompts: str | Sequence[str] | Sequence[Sequence[int]], *, draft=None,
           max_new_tokens: int = 128, sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
           seed: int | Sequence[int] = 0, stop_token_ids: Sequence[int] | None = None,
           **speculative_options) -> Iterator[list[list[int]]]:
    """Like `generate`, one step at a time: yields, per round (per token without a draft), the
    newly committed token ids of every prompt (empty lists for rows with nothing new).

    Runs the same jitted init and step functions that `generate`'s while-loop runs, so the
    concatenated stream equals `generate(...).token_ids`.
    """
    req = _prepare(target, prompts, draft, max_new_tokens, sampling, seed, stop_token_ids, speculative_options)
    tokens, lengths = jnp.asarray(req.tokens), jnp.asarray(req.lengths)
    if draft is None:
        head = jax.jit(output_kernel, static_argnums=0)(target.config, target.params)
        state = ar_init(req.loop, target.params, tokens, lengths, req.params)
        step = lambda s: ar_step(req.loop, target.params, head, s)  # noqa: E731
    else:
        models = spec_models(req.loop, target.params, draft.params, speculative_api.sts_temperatures(draft))
        state = spec_init(req.loop, models, tokens, lengths, req.params)
        step = lambda s: spec_step(req.loop, models, s)  # noqa: E731
    for state, new in stream_steps(step, state, max_new_tokens):
        check_nonfinite(np.asarray(state.nonfinite))
        yield new
