"""Prefill of the continuous-batching engine: a request's prompt enters its slot chunk by chunk.

`prefill_chunk` prefills one fixed-size chunk of a prompt into slot `slot` of the target cache
(chunked prefill: a long prompt takes several engine steps, each also running a decode round of
the other slots) and commits the chunk's tapped target features to the slot's draft context. The
prompt's last chunk (padded to a `prefill_buckets` size) also samples the first token and drafts
the first block. Other slots are untouched, so a request joins while the others keep decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dspark_jax.draft.cache import DraftCache
from dspark_jax.sampling import SamplingParams, next_token
from dspark_jax.target.kv_cache import KVCache
from dspark_jax.target.model import TargetModel
from infer.engine.core import EngineSpec, EngineState, commit_context, fold_survival, propose_block, set_slot_row
from infer.state import Pending

__all__ = ["prefill_buckets", "prefill_chunk"]

Array = jax.Array


def prefill_buckets(chunk: int, minimum: int = 16) -> tuple[int, ...]:
    """Padded sizes of a prompt's last prefill chunk: powers of two from `minimum` below `chunk`, then `chunk`.

    Every other chunk is exactly `chunk` tokens, so prefill compiles at most
    ``len(prefill_buckets(chunk)) + 1`` programs whatever the prompt lengths.
    """
    out, b = [], minimum
    while b < chunk:
        out.append(b)
        b *= 2
    return tuple(out) + (chunk,)


def _slot_row(buf: Array, slot: Array, pad: int) -> Array:
    """Row `slot` of a per-slot buffer [R, S, ...] as [1, S + pad, ...] (zeros appended)."""
    row = jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=True)
    return jnp.concatenate([row, jnp.zeros((1, pad) + row.shape[2:], row.dtype)], axis=1)


def _put_row(buf: Array, slot: Array, row: Array) -> Array:
    """Write row [1, >= S, ...] (cut to S) into slot `slot` of buf [R, S, ...]."""
    row = row[:, :buf.shape[1]].astype(buf.dtype)
    return jax.lax.dynamic_update_slice(buf, row, (slot,) + (0,) * (buf.ndim - 1))


@functools.partial(jax.jit, static_argnames=("spec", "last", "propose", "context_only"), donate_argnames=("state",))
def prefill_chunk(params, draft_params, head, state: EngineState, slot: Array, tokens: Array, chunk_start: Array,
                  chunk_valid: Array, sampling: SamplingParams, seed_key: Array, temperatures: Array | None = None,
                  probe: Array | bool = False, *, spec: EngineSpec, last: bool, propose: bool = True,
                  context_only: bool = False) -> tuple[EngineState, Array]:
    """Prefill one chunk of a prompt into slot `slot`; on the prompt's last chunk, start the request.

    tokens [1, C] (right-padded; C = the engine's chunk or, for the last chunk, a `prefill_buckets`
    size) at positions chunk_start + 0..C-1, the first chunk_valid of them real. The chunk's keys and
    values go into the slot's target cache row (the cache is slot-contiguous: row `slot`, index =
    position), the target's tapped hidden states of the valid tokens into the slot's draft context
    cache. Other slots are untouched, so decode rounds of the other slots run between chunks.
    The first chunk (chunk_start 0) resets the slot's draft context.
    last=True (static): also sample the first token from the last valid position, set the slot's
    sampling values / keys / counters and draft its first block. sampling: the request's
    `SamplingParams` (scalars); seed_key [2] = PRNGKey(seed). Returns (state, first token scalar
    int32; -1 when not last). propose=False (static): the last chunk drafts no first block (the engine's
    choice while dspark's cost gate declines drafting); the slot then holds no proposal.
    probe (bool, traced; with last, propose and the drafter's STS temperatures [γ]): the first block's
    calibrated survivals are folded into the running mean the cost gate reads (`core.fold_survival`):
    the engine's probe of the workload while its gate declines drafting (nobody else drafts then).
    context_only=True (static, with last=False): rebuild draft context only. The tokens are already
    in the target cache (decoded in rounds that did not commit their draft context, `engine_round`'s
    keep_context=False), the draft cache holds the rows before chunk_start; the chunk's target
    features are recomputed and committed, and the target cache is left as it is.
    """
    if context_only and (last or spec.dcfg is None):
        raise ValueError("prefill_chunk(context_only=True) needs last=False and a drafter")
    cfg, dcfg = spec.config, spec.dcfg
    c = tokens.shape[1]
    taps_ids = tuple(dcfg.target_layer_ids) if dcfg is not None else ()
    tc = state.tcache
    # The slot's cache row with C spare rows, so a padded last chunk never writes past the capacity.
    row_cache = KVCache(k=tuple(_slot_row(a, slot, c) for a in tc.k), v=tuple(_slot_row(a, slot, c) for a in tc.v),
                        lengths=chunk_start[None])
    pos = chunk_start + jnp.arange(c, dtype=jnp.int32)[None, :]  # [1, C]
    out = TargetModel(cfg, attention_backend=spec.backend).apply(
        {"params": params}, tokens, pos, row_cache, logits_indices=(chunk_valid - 1)[None, None],
        compute_logits=last, lm_head_kernel=head, tap_layers=taps_ids)
    end = chunk_start + chunk_valid  # [] tokens of the prompt in the cache after this chunk
    if not context_only:
        state = state.replace(tcache=tc.replace(k=tuple(_put_row(a, slot, b) for a, b in zip(tc.k, out.cache.k)),
                                                v=tuple(_put_row(a, slot, b) for a, b in zip(tc.v, out.cache.v)),
                                                lengths=set_slot_row(tc.lengths, slot, end)))
    first = jnp.int32(-1)
    k0 = jax.random.split(jax.random.fold_in(seed_key, 0), 2)
    one = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], sampling)  # [1] rows
    if last:
        first = next_token(k0[:1], out.logits[:, 0], one, spec.mode)[0]
        state = state.replace(anchor=set_slot_row(state.anchor, slot, first), start=set_slot_row(state.start, slot, end),
                              sampling=jax.tree_util.tree_map(lambda a, b: set_slot_row(a, slot, b), state.sampling,
                                                              sampling),
                              keys=set_slot_row(state.keys, slot, seed_key), rnd=set_slot_row(state.rnd, slot, jnp.int32(1)),
                              hist_valid=state.hist_valid.at[:, slot].set(False))
    if dcfg is None:
        return state, first
    # Draft context: commit the chunk's target features to the slot's draft cache row (reset on the first chunk).
    dc = state.dcache
    fresh = chunk_start == 0
    d_row = DraftCache(k=tuple(_slot_row(a, slot, 0) for a in dc.k), v=tuple(_slot_row(a, slot, 0) for a in dc.v),
                       lengths=jnp.where(fresh, 0, dc.lengths[slot])[None])
    pending = Pending(features=jnp.concatenate(out.taps, axis=-1), positions=pos,
                      valid=jnp.arange(c)[None, :] < chunk_valid)
    if last and propose:
        prop_tokens, probs, conf, d_row = propose_block(spec, draft_params, head, d_row, pending, first[None],
                                                        end[None], k0[1:], one)
        state = state.replace(prop_tokens=set_slot_row(state.prop_tokens, slot, prop_tokens[0]),
                              prop_conf=set_slot_row(state.prop_conf, slot, conf[0]),
                              prop_probs=None if probs is None else set_slot_row(state.prop_probs, slot, probs[0]))
        if temperatures is not None:
            state = fold_survival(state, conf, jnp.asarray(probe, bool).reshape(1), temperatures,
                                  weight_scale=1.0 / spec.slots)  # one request of R slots
    else:
        d_row = commit_context(spec, draft_params, head, d_row, pending, end[None])
    dcache = dc.replace(k=tuple(_put_row(a, slot, b) for a, b in zip(dc.k, d_row.k)),
                        v=tuple(_put_row(a, slot, b) for a, b in zip(dc.v, d_row.v)),
                        lengths=set_slot_row(dc.lengths, slot, d_row.lengths[0]))
    return state.replace(dcache=dcache), first
