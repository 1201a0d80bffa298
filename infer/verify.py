"""Rejection sampling for speculative verification (DSpark spec §5.5), vectorised over a batch.

Rows verify independently: row b proposed `n[b] <= K` drafts; the target scored the anchor and
all K drafts in one pass (rows past n[b] are ignored — causal attention means target rows
0..n[b] never saw them). With p_t the warped target distributions and p_d the warped draft
distributions (the very float32 probabilities the drafts were sampled from):

  accept_i  = u_i < min(1, p_t[i][x_i] / max(p_d[i][x_i], 1e-8))   (independent uniforms)
  a         = length of the accepted prefix (cumulative product), capped at n
  next      = sample(norm(max(p_t[a] - p_d[a], 0)))   if a < n   (p_t[a] if that mass <= 1e-8)
            = sample(p_t[n])                          if a == n  (bonus)
  a stop token among the accepted drafts truncates a to (its index + 1) and suppresses `next`.

The output is distributed exactly as the (warped) target. Greedy is the special case of one-hot
distributions, where this reduces to "accept while draft == target argmax": `greedy_verify`
does exactly that on token ids, without building [B, K+1, V] one-hot distributions.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dspark_jax import vocab_parallel
from dspark_jax.sampling import SamplingMode, sample_from_probs
from infer.state import is_stop, split_keys

__all__ = ["VerifyResult", "rejection_sample", "greedy_verify", "acceptance_probabilities", "residual_distribution"]

Array = jax.Array


@flax.struct.dataclass
class VerifyResult:
    """Outcome of one verification round for every row.

    accepted: [B] int32 drafts committed (after stop-token truncation).
    next_token: [B] int32 correction/bonus token (meaningless where `terminated`).
    terminated: [B] bool, a stop token was among the accepted drafts.
    prefix_accepted: [B, K] bool, the rejection-test prefix mask before stop truncation
      (the calibration label of spec §5.7).
    """

    accepted: Array
    next_token: Array
    terminated: Array
    prefix_accepted: Array


def acceptance_probabilities(draft_tokens: Array, draft_probs: Array, target_probs: Array) -> Array:
    """min(1, p_t[x] / max(p_d[x], 1e-8)) per slot.

    draft_tokens [B, K]; draft_probs [B, K, V]; target_probs [B, K(+1), V] -> [B, K] float32.
    """
    k = draft_tokens.shape[1]
    p_t = vocab_parallel.token_probs(target_probs[:, :k], draft_tokens)  # vocab-parallel under a mesh
    p_d = vocab_parallel.token_probs(draft_probs, draft_tokens)
    return jnp.minimum(1.0, p_t / jnp.maximum(p_d, 1e-8))


def residual_distribution(p_target: Array, p_draft: Array) -> Array:
    """norm(max(p_t - p_d, 0)) over the last axis; falls back to p_t where that mass is <= 1e-8."""
    return vocab_parallel.residual(p_target, p_draft)  # vocab-parallel under a mesh


def _truncate_at_stop(draft_tokens: Array, prefix: Array, accepted: Array, stop_ids: Array) -> tuple[Array, Array]:
    """(accepted count after cutting at the first accepted stop token [B], terminated [B] bool)."""
    stop = is_stop(draft_tokens, stop_ids) & prefix
    terminated = jnp.any(stop, axis=1)
    first_stop = jnp.argmax(stop, axis=1).astype(jnp.int32)
    return jnp.where(terminated, first_stop + 1, accepted), terminated


def greedy_verify(draft_tokens: Array, target_tokens: Array, num_proposed: Array, stop_ids: Array) -> VerifyResult:
    """Greedy verification on token ids: accept while draft == target argmax; next = the target's token.

    draft_tokens [B, K]; target_tokens [B, K+1] (argmax of target row i = the token after verify
    input i); num_proposed [B]. Identical to `rejection_sample` with one-hot distributions.
    """
    k = draft_tokens.shape[1]
    slot = jnp.arange(k)[None, :]
    passed = (draft_tokens == target_tokens[:, :k]) & (slot < num_proposed[:, None])
    prefix = jnp.cumprod(passed.astype(jnp.int32), axis=1).astype(bool)  # [B, K]
    accepted = jnp.sum(prefix, axis=1).astype(jnp.int32)
    accepted_after_stop, terminated = _truncate_at_stop(draft_tokens, prefix, accepted, stop_ids)
    next_token = jnp.take_along_axis(target_tokens, accepted[:, None], axis=1)[:, 0]
    return VerifyResult(accepted=accepted_after_stop, next_token=next_token, terminated=terminated,
                        prefix_accepted=prefix)


def rejection_sample(keys: Array, draft_tokens: Array, draft_probs: Array, target_probs: Array,
                     num_proposed: Array, stop_ids: Array, mode: SamplingMode) -> VerifyResult:
    """Verify proposals of a batch.

    keys: one PRNG key [2] or one per row [B, 2] (row b's randomness then depends on keys[b] only).
    draft_tokens [B, K] int32; draft_probs [B, K, V]; target_probs [B, K+1, V] (row i predicts the
    token after verify input i); num_proposed [B] int32 in [0, K]; stop_ids [n] or per row [B, n]
    int32 (-1 pads).
    """
    b, k = draft_tokens.shape
    key_u, key_next = split_keys(keys, 2)
    accept_p = acceptance_probabilities(draft_tokens, draft_probs, target_probs)
    if key_u.ndim == 1:
        u = jax.random.uniform(key_u, (b, k), jnp.float32)
    else:
        u = jax.vmap(lambda kk: jax.random.uniform(kk, (k,), jnp.float32))(key_u)
    slot = jnp.arange(k)[None, :]
    passed = (u < accept_p) & (slot < num_proposed[:, None])
    prefix = jnp.cumprod(passed.astype(jnp.int32), axis=1).astype(bool)  # [B, K]
    accepted = jnp.sum(prefix, axis=1).astype(jnp.int32)

    accepted_after_stop, terminated = _truncate_at_stop(draft_tokens, prefix, accepted, stop_ids)

    # Distribution of the next token: residual at the first rejection, or the bonus row.
    row = jnp.minimum(accepted, k)
    p_t_row = jnp.take_along_axis(target_probs, row[:, None, None], axis=1)[:, 0]  # [B, V]
    p_d_row = jnp.take_along_axis(draft_probs, jnp.minimum(row, k - 1)[:, None, None], axis=1)[:, 0]
    rejected = accepted < num_proposed
    dist = jnp.where(rejected[:, None], residual_distribution(p_t_row, p_d_row), p_t_row)
    next_token = sample_from_probs(key_next, dist, mode)
    return VerifyResult(accepted=accepted_after_stop, next_token=next_token, terminated=terminated,
                        prefix_accepted=prefix)
