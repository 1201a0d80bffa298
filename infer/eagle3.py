"""Eagle-3 chain drafting (spec §9.2) as the proposal step of the shared speculative round.

`infer.speculative.propose` calls `chain_propose` when the loop's draft is an `Eagle3Config`;
verification, commit, per-row sampling, stop/limit handling and metrics are those of
`infer.speculative.speculative_step`, so `speculative_generate`, `infer.step.spec_step`,
`generate(..., draft=eagle3)` and `dspark eval` run Eagle-3 drafters unchanged.

Per row the Eagle-3 draft cache (a one-layer `DraftCache`, cache index == position) holds one row
per committed position i < start: the pair (target hidden h_i, token x_{i+1}). A proposal:
  1. extend: write the pending pairs (`Pending.features` [B, C, n_ctx*d] with `next_tokens`) through
     `fc` + the layer at their positions;
  2. chain: from the last valid pending row's output hidden, draft K tokens one at a time, each
     step feeding the previous step's output hidden and the token it drafted at the next position.
     Chain rows lie past the committed length, so the next extension overwrites them (the crop to
     the pre-proposal length); the drafts to verify stop at the first drafted stop token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.draft.cache import DraftCache
from dspark_jax.draft.eagle3 import Eagle3Model
from dspark_jax.sampling import greedy_argmax, sample_from_probs, warp_probs
from infer.state import Pending, Proposal, RowParams, SpecLoop, SpecModels, all_finite, is_stop, split_keys

__all__ = ["chain_propose", "first_stop_count"]

Array = jax.Array


def first_stop_count(tokens: Array, stop_ids: Array) -> Array:
    """Drafts to verify per row [B]: K, or (index of the first stop token + 1) — the chain's early stop."""
    stop = is_stop(tokens, stop_ids)  # [B, K]
    k = tokens.shape[1]
    return jnp.where(jnp.any(stop, axis=1), jnp.argmax(stop, axis=1) + 1, k).astype(jnp.int32)


def chain_propose(loop: SpecLoop, models: SpecModels, cache: DraftCache, pending: Pending, keys: Array,
                  params: RowParams) -> tuple[Proposal, DraftCache, Array]:
    """Extend the Eagle-3 draft cache with the pending pairs, then chain-draft loop.block_size tokens.

    keys [B, 2] per row; each row samples from its own warped float32 distribution (per-row
    temperature / top-k / top-p; greedy rows take the argmax). Returns (proposal: tokens [B, K],
    probs [B, K, V] or None when the batch is greedy, zero confidences, num [B]; the cache with
    lengths = committed pairs; bool [B] whether the row's draft logits were all finite).
    """
    model, mode, k = Eagle3Model(loop.draft), loop.mode, loop.block_size
    p = {"params": models.draft}
    kv = (cache.k[0], cache.v[0])
    hidden = model.apply(p, pending.features, method=Eagle3Model.project_context)  # [B, C, d]
    out, kv = model.apply(p, hidden, pending.next_tokens, pending.positions, None, cache_kv=kv,
                          method=Eagle3Model.step)
    last = jnp.maximum(jnp.sum(pending.valid, axis=1) - 1, 0).astype(jnp.int32)  # last valid pending row [B]
    g = jnp.take_along_axis(out, last[:, None, None], axis=1)  # [B, 1, d]
    pos = pending.positions[:, 0] + last  # position of the row g came from
    toks, probs, logits_all = [], [], []
    for j, key_j in enumerate(split_keys(keys, k)):
        logits = model.apply(p, g[:, 0], method=Eagle3Model.compute_logits)  # [B, V] float32
        logits_all.append(logits)
        if mode.greedy:
            tok = greedy_argmax(logits)
        else:
            pr = warp_probs(logits, params.sampling, mode)
            tok = sample_from_probs(key_j, pr, mode)
            probs.append(pr)
        toks.append(tok)
        if j + 1 < k:
            g, kv = model.apply(p, g, tok[:, None], (pos + j + 1)[:, None], None, cache_kv=kv,
                                method=Eagle3Model.step)
    tokens = jnp.stack(toks, axis=1)  # [B, K]
    proposal = Proposal(tokens=tokens, probs=jnp.stack(probs, axis=1) if probs else None,
                        conf_logits=jnp.zeros(tokens.shape, jnp.float32), num=first_stop_count(tokens, params.stop_ids))
    finite = all_finite(jnp.stack(logits_all, axis=1))
    return proposal, DraftCache(k=(kv[0],), v=(kv[1],), lengths=pos + 1), finite
