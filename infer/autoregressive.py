"""Jitted autoregressive decoding: the baseline every speculative speed-up is measured against.

`autoregressive_init` prefills right-padded prompts and samples the first token;
`autoregressive_step(loop, params, head, state)` decodes one token per unfinished row (usable one
step at a time from Python); `autoregressive_generate` is a `lax.while_loop` over that step that
ends when every row has emitted a stop token or its `max_new` tokens. One compiled program per
`ARLoop` (config, sampling class, buffer, cache length) and batch/prompt shape; per-row sampling
values, seeds, stop ids and limits are traced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dspark_jax.sampling import next_token
from dspark_jax.target.kv_cache import KVCache
from dspark_jax.target.model import TargetModel, output_kernel
from infer.state import (NONFINITE_PREFILL, NONFINITE_TARGET, ARLoop, ARState, OutputBuffer, RowParams, all_finite,
                         is_stop, step_keys)

__all__ = ["autoregressive_generate", "autoregressive_init", "autoregressive_step", "prefill", "is_stop"]

Array = jax.Array


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


def autoregressive_init(loop: ARLoop, params, prompt_tokens: Array, prompt_lengths: Array,
                        row_params: RowParams) -> ARState:
    """Prefill and the first token: the state before the first decode step."""
    logits, cache, _ = prefill(TargetModel(loop.target), params, prompt_tokens, prompt_lengths, loop.cache_len)
    first = next_token(step_keys(row_params.keys, 0, 1)[0], logits, row_params.sampling, loop.mode)
    bad = jnp.where(all_finite(logits), 0, NONFINITE_PREFILL).astype(jnp.int32)
    done = is_stop(first, row_params.stop_ids) | (row_params.max_new <= 1) | (bad != 0)
    return ARState(step=jnp.int32(1), cache=cache, last=first, params=row_params,
                   out=OutputBuffer.start(first, loop.max_new_tokens, done), nonfinite=bad)


def autoregressive_step(loop: ARLoop, params, head: Array, state: ARState) -> ARState:
    """Decode one token for every unfinished row. head: the [d, V] output kernel (`output_kernel`)."""
    model = TargetModel(loop.target)
    active = ~state.out.done
    cache = state.cache
    res = model.apply({"params": params}, state.last[:, None], cache.lengths[:, None], cache, lm_head_kernel=head)
    logits = res.logits[:, 0]  # [B, V]
    cache = res.cache.with_lengths(cache.lengths + active.astype(jnp.int32))
    nxt = next_token(step_keys(state.params.keys, state.step, 1)[0], logits, state.params.sampling, loop.mode)
    bad = jnp.where(active & ~all_finite(logits), NONFINITE_TARGET, 0).astype(jnp.int32)
    n_new = (active & (bad == 0)).astype(jnp.int32)
    out = state.out.append(nxt[:, None], n_new)
    done = state.out.done | (bad != 0) | (out.count >= state.params.max_new) | (
        (n_new > 0) & is_stop(nxt, state.params.stop_ids))
    return state.replace(step=state.step + 1, cache=cache, last=jnp.where(n_new > 0, nxt, state.last),
                         out=out.replace(done=done), nonfinite=state.nonfinite | bad)


@functools.partial(jax.jit, static_argnames=("loop",))
def autoregressive_generate(params, prompt_tokens: Array, prompt_lengths: Array, row_params: RowParams, *,
                            loop: ARLoop):
    """Generate up to `row_params.max_new[b]` (<= loop.max_new_tokens) tokens per row.

    prompt_tokens: [B, P] int32, right-padded; prompt_lengths: [B] int32 (>= 1).
    Requires P + max_new_tokens <= cache_len (checked by the caller).
    Returns (tokens [B, max_new_tokens] int32 with -1 after a row ends, num_generated [B] int32,
    nonfinite [B] int32 flags). A row's stop token is included in its output and counted.
    """
    head = output_kernel(loop.target, params)  # [d, V], laid out once for the whole loop
    state = autoregressive_init(loop, params, prompt_tokens, prompt_lengths, row_params)
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.out.done),
                               lambda s: autoregressive_step(loop, params, head, s), state)
    return state.out.tokens, state.out.count, state.nonfinite
