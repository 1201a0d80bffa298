"""Jitted autoregressive decoding: the baseline every speculative speed-up is measured against.

One compiled program per (batch, prompt bucket, cache length, max_new_tokens, sampling mode):
prefill of right-padded prompts, then a `lax.while_loop` of one-token decode steps that stops
when every row has emitted a stop token or `max_new_tokens` tokens. No host round trip per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dspark_jax.config import TargetConfig
from dspark_jax.sampling import SamplingMode, next_token
from dspark_jax.target.kv_cache import KVCache
from dspark_jax.target.model import TargetModel, output_kernel

__all__ = ["autoregressive_generate", "prefill", "is_stop"]

Array = jax.Array


def is_stop(tokens: Array, stop_ids: Array) -> Array:
    """tokens [...] int32, stop_ids [n] int32 (-1 = unused slot) -> bool [...]."""
    return jnp.any(tokens[..., None] == stop_ids, axis=-1) & (tokens >= 0)


def prefill(model: TargetModel, params, prompt_tokens: Array, prompt_lengths: Array, cache_len: int,
            tap_layers: tuple[int, ...] = ()):
    """Run right-padded prompts [B, P] through the target into a fresh cache of `cache_len`.

    Returns (last-position logits [B, V] float32, cache with lengths = prompt_lengths, taps).
    """
    b, p = prompt_tokens.shape
    cache = KVCache.create(model.config, b, cache_len)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out = model.apply({"params": params}, prompt_tokens, positions, cache,
                      logits_indices=(prompt_lengths - 1)[:, None].astype(jnp.int32), tap_layers=tap_layers)
    return out.logits[:, 0], out.cache.with_lengths(prompt_lengths), out.taps


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "cache_len", "mode"))
def autoregressive_generate(params, prompt_tokens: Array, prompt_lengths: Array, key: Array,
                            sampling_values: Array, stop_ids: Array, *, config: TargetConfig,
                            max_new_tokens: int, cache_len: int, mode: SamplingMode):
    """Generate up to `max_new_tokens` per row.

    prompt_tokens: [B, P] int32, right-padded; prompt_lengths: [B] int32 (>= 1);
    sampling_values: [3] from `SamplingConfig.values()`; stop_ids: [n] int32 (-1 pads).
    Requires P + max_new_tokens <= cache_len (checked by the caller).
    Returns (tokens [B, max_new_tokens] int32 with -1 after a row ends, num_generated [B] int32).
    A row's stop token is included in its output and counted.
    """
    model = TargetModel(config)
    b = prompt_tokens.shape[0]
    head = output_kernel(config, params)  # [d, V], laid out once for the whole loop
    logits, cache, _ = prefill(model, params, prompt_tokens, prompt_lengths, cache_len)
    first = next_token(jax.random.fold_in(key, 0), logits, sampling_values, mode)
    out = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
    done = is_stop(first, stop_ids)
    num = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, last, done, out, num = state
        positions = cache.lengths[:, None]
        res = model.apply({"params": params}, last[:, None], positions, cache, lm_head_kernel=head)
        cache = res.cache.with_lengths(cache.lengths + 1)
        nxt = next_token(jax.random.fold_in(key, step), res.logits[:, 0], sampling_values, mode)
        nxt = jnp.where(done, -1, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        num = num + (~done).astype(jnp.int32)
        done = done | is_stop(nxt, stop_ids)
        return step + 1, cache, jnp.maximum(nxt, 0), done, out, num

    state = (jnp.int32(1), cache, first, done, out, num)
    _, _, _, _, out, num = jax.lax.while_loop(cond, body, state)
    return out, num
