"""Jitted, batched Eagle-3 speculative decoding (spec §9.2), verified by the same lossless sampler.

Per row: the anchor (last committed token, not yet in the target cache) sits at position start;
the draft KV cache holds one row per committed position i < start, the pair (target hidden h_i,
token x_{i+1}). A proposal (`eagle3_propose`):
  1. extend: write the pending pairs (target taps of the last verify pass paired with the tokens
     that follow them, i.e. [d_1..d_a, next]) through `fc` + the layer into the draft cache;
  2. chain: from the last pending row's output hidden, draft up to K tokens one at a time, each
     step feeding the previous step's output hidden and the token it drafted at the next position
     (written into the cache past its committed length, so the next extension overwrites it: the
     crop-to-pre-proposal-length rule); the proposal stops at the first drafted stop token.
Verification (`infer.verify`) and the commit rule are those of the DSpark loop (`infer.speculative`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dspark_jax.config import TargetConfig
from dspark_jax.draft.eagle3 import Eagle3Config, Eagle3Model
from dspark_jax.sampling import SamplingMode, greedy_argmax, next_token, sample_from_probs, warp_probs
from dspark_jax.target.kv_cache import KVCache
from dspark_jax.target.model import TargetModel, output_kernel
from infer.autoregressive import is_stop, prefill
from infer.spec_metrics import RoundStats
from infer.speculative import Proposal, SpecOptions, _write_rows
from infer.verify import greedy_verify, rejection_sample

__all__ = ["eagle3_propose", "eagle3_generate", "first_stop_count"]

Array = jax.Array


def first_stop_count(tokens: Array, stop_ids: Array) -> Array:
    """Drafts to verify per row [B]: K, or (index of the first stop token + 1) — the chain's early stop."""
    stop = is_stop(tokens, stop_ids)  # [B, K]
    k = tokens.shape[1]
    return jnp.where(jnp.any(stop, axis=1), jnp.argmax(stop, axis=1) + 1, k).astype(jnp.int32)


def eagle3_propose(model: Eagle3Model, draft_params, cache: KVCache, pending_feats: Array, pending_tokens: Array,
                   pending_start: Array, last_idx: Array, key: Array, sampling_values: Array, mode: SamplingMode,
                   block_size: int, stop_ids: Array) -> tuple[Proposal, KVCache]:
    """Extend the draft cache with the pending pairs, then chain-draft `block_size` tokens.

    pending_feats [B, C, n_ctx*d] target taps at positions pending_start + 0..C-1; pending_tokens
    [B, C] the token following each; last_idx [B] index of each row's last valid pending row (rows
    after it are written but never visible: the chain overwrites them in order). Returns the
    proposal (tokens [B, K], warped draft probs [B, K, V] or None when greedy, num [B]) and the
    cache with lengths = committed pairs (chain rows lie past it).
    """
    p = {"params": draft_params}
    b, c = pending_tokens.shape
    kv = (cache.k[0], cache.v[0])
    positions = pending_start[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    hidden = model.apply(p, pending_feats, method=Eagle3Model.project_context)
    out, kv = model.apply(p, hidden, pending_tokens, positions, None, cache_kv=kv, method=Eagle3Model.step)
    g = jnp.take_along_axis(out, last_idx[:, None, None], axis=1)  # [B, 1, d]
    pos = pending_start + last_idx  # position of the row g came from
    toks, probs = [], []
    for j, key_j in enumerate(jax.random.split(key, block_size)):
        logits = model.apply(p, g[:, 0], method=Eagle3Model.compute_logits)  # [B, V] float32
        if mode.greedy:
            tok = greedy_argmax(logits)
        else:
            pr = warp_probs(logits, sampling_values, mode)
            tok = sample_from_probs(key_j, pr, mode)
            probs.append(pr)
        toks.append(tok)
        if j + 1 < block_size:
            g, kv = model.apply(p, g, tok[:, None], (pos + j + 1)[:, None], None, cache_kv=kv,
                                method=Eagle3Model.step)
    tokens = jnp.stack(toks, axis=1)
    proposal = Proposal(tokens=tokens, probs=jnp.stack(probs, axis=1) if probs else None,
                        conf_logits=jnp.zeros(tokens.shape, jnp.float32), num=first_stop_count(tokens, stop_ids))
    return proposal, KVCache(k=(kv[0],), v=(kv[1],), lengths=pos + 1)


@functools.partial(jax.jit, static_argnames=("config", "dcfg", "max_new_tokens", "cache_len", "mode", "options"))
def eagle3_generate(params, draft_params, prompt_tokens: Array, prompt_lengths: Array, key: Array,
                    sampling_values: Array, stop_ids: Array, temperatures: Array | None = None, *,
                    config: TargetConfig, dcfg: Eagle3Config, max_new_tokens: int, cache_len: int,
                    mode: SamplingMode, options: SpecOptions):
    """Eagle-3 speculative generation for right-padded prompts; same contract as `speculative_generate`.

    Returns (tokens [B, max_new_tokens] (-1 after the end), num_generated [B], RoundStats, None).
    `temperatures` is accepted for signature parity and unused (no confidence head).
    """
    del temperatures
    k = options.block_size
    target, draft = TargetModel(config), Eagle3Model(dcfg)
    taps_ids = tuple(dcfg.target_layer_ids)
    b, p_len = prompt_tokens.shape
    key_first, key_prop, key_loop = jax.random.split(key, 3)
    head = output_kernel(config, params)  # [d, V]
    if options.share_lm_head:
        draft_params = {**draft_params, "lm_head": {"kernel": head}}

    logits, tcache, taps = prefill(target, params, prompt_tokens, prompt_lengths, cache_len, taps_ids)
    first = next_token(key_first, logits, sampling_values, mode)
    out = jnp.full((b, max_new_tokens + k + 1), -1, jnp.int32).at[:, 0].set(first)
    num_out = jnp.ones((b,), jnp.int32)
    done = is_stop(first, stop_ids) | (max_new_tokens <= 1)
    start = prompt_lengths.astype(jnp.int32)

    # Prefill pairs: (h_i, x_{i+1}) for i < P-1 and (h_{P-1}, first generated token).
    idx = jnp.arange(p_len, dtype=jnp.int32)[None, :]
    shifted = jnp.concatenate([prompt_tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    shifted = jnp.where(idx == start[:, None] - 1, first[:, None], shifted)
    dcache = KVCache.create(dcfg, b, cache_len)
    proposal, dcache = eagle3_propose(draft, draft_params, dcache, jnp.concatenate(taps, axis=-1), shifted,
                                      jnp.zeros((b,), jnp.int32), start - 1, key_prop, sampling_values, mode, k,
                                      stop_ids)

    def body(state):
        rnd = state["round"]
        key_v, key_p = jax.random.split(jax.random.fold_in(key_loop, rnd))
        prop: Proposal = state["proposal"]
        active = ~state["done"]
        anchor, start, tcache = state["anchor"], state["start"], state["tcache"]
        verify_tokens = jnp.concatenate([anchor[:, None], prop.tokens], axis=1)  # [B, K+1]
        positions = start[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
        res = target.apply({"params": params}, verify_tokens, positions, tcache.with_lengths(start),
                           tap_layers=taps_ids, lm_head_kernel=head)
        num = jnp.where(active, prop.num, 0)
        if mode.greedy:
            ver = greedy_verify(prop.tokens, greedy_argmax(res.logits), num, stop_ids)
        else:
            ver = rejection_sample(key_v, prop.tokens, prop.probs, warp_probs(res.logits, sampling_values, mode),
                                   num, stop_ids, mode)
        a = jnp.where(active, ver.accepted, 0)

        slot = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
        drafts_ext = jnp.concatenate([prop.tokens, jnp.zeros((b, 1), jnp.int32)], axis=1)
        new_tokens = jnp.where(slot < a[:, None], drafts_ext,
                               jnp.where((slot == a[:, None]) & ~ver.terminated[:, None], ver.next_token[:, None], -1))
        n_new = jnp.where(active, jnp.minimum(a + jnp.where(ver.terminated, 0, 1), max_new_tokens - state["num_out"]), 0)
        new_tokens = jnp.where(slot < n_new[:, None], new_tokens, -1)
        out = _write_rows(state["out"], new_tokens, state["num_out"])
        num_out = state["num_out"] + n_new
        hit_stop = jnp.any(is_stop(new_tokens, stop_ids) & (slot < n_new[:, None]), axis=1)
        done = state["done"] | (active & (hit_stop | (num_out >= max_new_tokens)))
        stats = state["stats"].update(active, num, a, ver.terminated)

        new_start = jnp.where(active, start + a + 1, start)
        anchor = jnp.where(active, ver.next_token, anchor)
        # Extend the draft cache with (h_{start+r}, token at start+r+1) for r = 0..a, then chain.
        pair_tokens = jnp.where(slot == a[:, None], ver.next_token[:, None], drafts_ext)
        proposal, dcache = eagle3_propose(draft, draft_params, state["dcache"], jnp.concatenate(res.taps, axis=-1),
                                          pair_tokens, start, a, key_p, sampling_values, mode, k, stop_ids)
        return dict(round=rnd + 1, proposal=proposal, anchor=anchor, start=new_start,
                    tcache=res.cache.with_lengths(new_start), dcache=dcache, out=out, num_out=num_out, done=done,
                    stats=stats)

    state = dict(round=jnp.int32(0), proposal=proposal, anchor=first, start=start, tcache=tcache, dcache=dcache,
                 out=out, num_out=num_out, done=done, stats=RoundStats.zeros(b, k))
    state = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), body, state)
    return state["out"][:, :max_new_tokens], state["num_out"], state["stats"], None
