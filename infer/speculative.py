"""Jitted, batched DSpark/DFlash speculative decoding loop (DSpark spec §5).

Per row b the loop keeps: the anchor (last committed token, not yet in the target cache) at
position start[b] == target cache length; the draft cache (context K/V derived from target
features of committed tokens); the *pending* context rows (target features of tokens committed
in the last round, not yet in the draft cache); and the current proposal.

Round (one `lax.while_loop` iteration, rows progress independently):
  1. verify: one target forward over [anchor, x_0..x_{K-1}] appended at each row's own position,
     with taps; target distributions warped exactly like the draft's;
  2. rejection sampling (`infer.verify`) on the first n[b] drafts -> a[b] accepted + next token;
  3. commit: anchor + accepted drafts become part of the target cache (lengths = start + a + 1;
     the rejected tail is rolled back by the length alone), the next token becomes the anchor;
     the verify taps of rows 0..a become the pending draft context;
  4. propose: draft backbone over [anchor, mask x (K-1)] attending to cached + pending context,
     sequential head samples the K drafts left to right from warped float32 distributions,
     confidence head scores them; optional truncation picks n[b].
The very first proposal is made after the prefill (pending context = the prompt's features).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from dspark_jax.config import TargetConfig
from dspark_jax.draft import heads
from dspark_jax.draft.cache import DraftCache
from dspark_jax.draft.config import DraftConfig
from dspark_jax.draft.model import DraftModel
from dspark_jax.sampling import SamplingMode, greedy_argmax, next_token, sample_from_probs, warp_probs
from dspark_jax.target.model import TargetModel, output_kernel
from infer.autoregressive import is_stop, prefill
from infer.spec_metrics import RoundRecords, RoundStats
from infer.verify import greedy_verify, rejection_sample

__all__ = ["Proposal", "SpecOptions", "speculative_generate", "propose", "draft_backbone", "sample_block",
           "truncate_proposal"]

Array = jax.Array


@flax.struct.dataclass
class Proposal:
    """K drafts per row with the distributions they were sampled from.

    tokens [B, K] int32; probs [B, K, V] float32 (warped, Markov-corrected; None in greedy mode,
    where verification compares token ids); conf_logits [B, K]
    float32 raw confidence logits (zeros without a confidence head); num [B] int32 drafts to verify.
    """

    tokens: Array
    probs: Array
    conf_logits: Array
    num: Array


@flax.struct.dataclass(frozen=True)
class SpecOptions:
    """Static options of the speculative loop.

    block_size: drafts per round (<= the checkpoint's). confidence_threshold: truncate at the
    first slot whose sigmoid(confidence) is below it (reference rule; 0 = off).
    survival_threshold: truncate where the cumulative product of confidences drops below it
    (0 = off). record_rounds: keep per-round confidence logits and prefix labels.
    share_lm_head: the draft's frozen LM head equals the target's output layer (checked when the
    draft is loaded); the loop then uses the target's kernel for both.
    """

    block_size: int = flax.struct.field(pytree_node=False, default=7)
    confidence_threshold: float = flax.struct.field(pytree_node=False, default=0.0)
    survival_threshold: float = flax.struct.field(pytree_node=False, default=0.0)
    record_rounds: bool = flax.struct.field(pytree_node=False, default=False)
    share_lm_head: bool = flax.struct.field(pytree_node=False, default=False)


def truncate_proposal(conf_logits: Array, block_size: int, confidence_threshold: float,
                      survival_threshold: float, temperatures: Array | None = None) -> Array:
    """Number of drafts to verify per row [B] from confidence logits [B, K]."""
    b, k = conf_logits.shape
    num = jnp.full((b,), k, jnp.int32)
    scaled = conf_logits if temperatures is None else conf_logits / temperatures[None, :k]
    conf = jax.nn.sigmoid(scaled)
    if confidence_threshold > 0:
        below = conf < confidence_threshold
        num = jnp.where(jnp.any(below, axis=1), jnp.argmax(below, axis=1), num).astype(jnp.int32)
    if survival_threshold > 0:
        keep = jnp.cumprod(conf, axis=1) >= survival_threshold
        num = jnp.minimum(num, jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)).astype(jnp.int32)
    return num


def draft_backbone(draft_model: DraftModel, draft_params, dcfg: DraftConfig, cache: DraftCache, pending: Array,
                   pending_positions: Array, pending_valid: Array, anchor: Array, start: Array,
                   block_size: int) -> tuple[Array, Array, DraftCache]:
    """The parallel draft pass for one block per row.

    pending [B, C, n_ctx*d] target features not yet in the draft cache (rows where pending_valid),
    at pending_positions [B, C]; anchor [B] at position start [B]. Returns (h [B, K, d],
    base logits U [B, K, V] float32, draft cache with the pending rows committed).
    """
    b = anchor.shape[0]
    p = {"params": draft_params}
    new_ctx = draft_model.apply(p, pending, method=DraftModel.project_context)
    block_tokens = jnp.concatenate(
        [anchor[:, None], jnp.full((b, block_size - 1), dcfg.mask_token_id, jnp.int32)], axis=1)
    block_positions = start[:, None] + jnp.arange(block_size, dtype=jnp.int32)[None, :]
    return draft_model.apply(p, block_tokens, block_positions, cache, new_ctx, pending_positions, pending_valid,
                             method=DraftModel.block_forward)


def sample_block(draft_params, dcfg: DraftConfig, h: Array, base_logits: Array, anchor: Array, key: Array,
                 sampling_values: Array, mode: SamplingMode, options: SpecOptions,
                 temperatures: Array | None = None) -> Proposal:
    """Sequential head: sample the K drafts left to right (spec §2.5) and score their confidences.

    Slot k's logits are Z_k = U_k + B(prev, h_k[, state]); the draft token is sampled from
    warp_probs(Z_k) — the same float32 distribution handed to the verifier.
    """
    b = anchor.shape[0]
    markov = draft_params.get("markov_head")
    conf_params = draft_params.get("confidence_head")

    def slot(carry, inp):
        prev, state = carry
        h_k, u_k, key_k = inp
        if markov is not None:
            bias, state = heads.markov_step(markov, dcfg.markov_head_type, prev, h_k, state)
            z = u_k + bias
        else:
            z = u_k
        if mode.greedy:  # the argmax of the one-hot warp, without materialising it
            probs, tok = None, greedy_argmax(z)
        else:
            probs = warp_probs(z, sampling_values, mode)
            tok = sample_from_probs(key_k, probs, mode)
        if conf_params is not None:
            conf = heads.confidence_logits(conf_params, h_k, prev if dcfg.confidence_head_with_markov else None,
                                           markov)
        else:
            conf = jnp.zeros((b,), jnp.float32)
        return (tok, state), (tok, probs, conf)

    k = options.block_size
    state0 = heads.init_state((b,), max(dcfg.markov_rank, 1))
    xs = (jnp.moveaxis(h[:, :k], 1, 0), jnp.moveaxis(base_logits[:, :k], 1, 0), jax.random.split(key, k))
    # K is small and static: unrolled, the slots run without while-loop overhead.
    _, (toks, probs, conf) = jax.lax.scan(slot, (anchor, state0), xs, unroll=True)
    tokens, conf = jnp.moveaxis(toks, 0, 1), jnp.moveaxis(conf, 0, 1)
    probs = None if probs is None else jnp.moveaxis(probs, 0, 1)
    num = truncate_proposal(conf, k, options.confidence_threshold, options.survival_threshold, temperatures)
    return Proposal(tokens=tokens, probs=probs, conf_logits=conf, num=num)


def propose(draft_model: DraftModel, draft_params, dcfg: DraftConfig, cache: DraftCache, pending: Array,
            pending_positions: Array, pending_valid: Array, anchor: Array, start: Array, key: Array,
            sampling_values: Array, mode: SamplingMode, options: SpecOptions,
            temperatures: Array | None = None) -> tuple[Proposal, DraftCache]:
    """Draft one block per row: `draft_backbone` then `sample_block`."""
    h, base_logits, cache = draft_backbone(draft_model, draft_params, dcfg, cache, pending, pending_positions,
                                           pending_valid, anchor, start, options.block_size)
    proposal = sample_block(draft_params, dcfg, h, base_logits, anchor, key, sampling_values, mode, options,
                            temperatures)
    return proposal, cache


def _write_rows(buf: Array, rows: Array, starts: Array) -> Array:
    """buf [B, N], rows [B, W] written at per-row offsets starts [B] (entries < 0 keep buf)."""

    def one(bf, r, s):
        cur = jax.lax.dynamic_slice(bf, (s,), (r.shape[0],))
        return jax.lax.dynamic_update_slice(bf, jnp.where(r >= 0, r, cur), (s,))

    return jax.vmap(one)(buf, rows, starts)


@functools.partial(jax.jit, static_argnames=("config", "dcfg", "max_new_tokens", "cache_len", "mode", "options"))
def speculative_generate(params, draft_params, prompt_tokens: Array, prompt_lengths: Array, key: Array,
                         sampling_values: Array, stop_ids: Array, temperatures: Array | None = None, *,
                         config: TargetConfig, dcfg: DraftConfig, max_new_tokens: int, cache_len: int,
                         mode: SamplingMode, options: SpecOptions):
    """Speculative generation for a batch of right-padded prompts.

    prompt_tokens [B, P] int32; prompt_lengths [B]; cache_len >= P_max + max_new_tokens + K + 1.
    temperatures: optional [K] per-slot STS temperatures applied to confidences before truncation.
    Returns (tokens [B, max_new_tokens] (-1 after the end), num_generated [B], RoundStats,
    RoundRecords or None).
    """
    k = options.block_size
    target = TargetModel(config)
    draft = DraftModel(dcfg)
    taps_ids = tuple(dcfg.target_layer_ids)
    b, p_len = prompt_tokens.shape
    key_first, key_prop, key_loop = jax.random.split(key, 3)
    head = output_kernel(config, params)  # [d, V], laid out once for the whole loop
    if options.share_lm_head:  # the draft's frozen LM head is this very kernel: keep one copy hot
        draft_params = {**draft_params, "lm_head": {"kernel": head}}

    # Prefill: the target's prompt pass gives the first token and the prompt's context features.
    logits, tcache, taps = prefill(target, params, prompt_tokens, prompt_lengths, cache_len, taps_ids)
    first = next_token(key_first, logits, sampling_values, mode)
    out = jnp.full((b, max_new_tokens + k + 1), -1, jnp.int32).at[:, 0].set(first)
    num_out = jnp.ones((b,), jnp.int32)
    done = is_stop(first, stop_ids) | (max_new_tokens <= 1)
    start = prompt_lengths.astype(jnp.int32)  # position of the anchor

    dcache = DraftCache.create(dcfg, b, cache_len)
    prompt_pos = jnp.broadcast_to(jnp.arange(p_len, dtype=jnp.int32), (b, p_len))
    proposal, dcache = propose(draft, draft_params, dcfg, dcache, jnp.concatenate(taps, axis=-1), prompt_pos,
                               prompt_pos < prompt_lengths[:, None], first, start, key_prop, sampling_values,
                               mode, options, temperatures)
    stats = RoundStats.zeros(b, k)
    records = RoundRecords.empty(b, max_new_tokens, k) if options.record_rounds else None

    def cond(state):
        return ~jnp.all(state["done"])

    def body(state):
        rnd = state["round"]
        key_v, key_p = jax.random.split(jax.random.fold_in(key_loop, rnd))
        prop: Proposal = state["proposal"]
        active = ~state["done"]
        anchor, start, tcache = state["anchor"], state["start"], state["tcache"]

        # 1. verify [anchor, drafts] at each row's own position.
        verify_tokens = jnp.concatenate([anchor[:, None], prop.tokens], axis=1)  # [B, K+1]
        positions = start[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
        res = target.apply({"params": params}, verify_tokens, positions, tcache.with_lengths(start),
                           tap_layers=taps_ids, lm_head_kernel=head)
        # 2. rejection sampling (greedy: compare with the target's argmax tokens).
        num = jnp.where(active, prop.num, 0)
        if mode.greedy:
            ver = greedy_verify(prop.tokens, greedy_argmax(res.logits), num, stop_ids)
        else:
            target_probs = warp_probs(res.logits, sampling_values, mode)  # [B, K+1, V]
            ver = rejection_sample(key_v, prop.tokens, prop.probs, target_probs, num, stop_ids, mode)
        a = jnp.where(active, ver.accepted, 0)

        # 3. commit: accepted drafts + next token, capped at max_new_tokens.
        slot = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
        drafts_ext = jnp.concatenate([prop.tokens, jnp.zeros((b, 1), jnp.int32)], axis=1)
        new_tokens = jnp.where(slot < a[:, None], drafts_ext,
                               jnp.where((slot == a[:, None]) & ~ver.terminated[:, None], ver.next_token[:, None], -1))
        n_new = a + jnp.where(ver.terminated, 0, 1)
        room = max_new_tokens - state["num_out"]
        n_new = jnp.where(active, jnp.minimum(n_new, room), 0)
        new_tokens = jnp.where(slot < n_new[:, None], new_tokens, -1)
        out = _write_rows(state["out"], new_tokens, state["num_out"])
        num_out = state["num_out"] + n_new
        hit_stop = jnp.any(is_stop(new_tokens, stop_ids) & (slot < n_new[:, None]), axis=1)
        done = state["done"] | (active & (hit_stop | (num_out >= max_new_tokens)))

        stats = state["stats"].update(active, num, a, ver.terminated)
        records = state["records"]
        if records is not None:
            records = records.write(stats.rounds - 1, active, prop.conf_logits, ver.prefix_accepted, num, a)

        new_start = jnp.where(active, start + a + 1, start)
        anchor = jnp.where(active, ver.next_token, anchor)
        tcache = res.cache.with_lengths(new_start)

        # 4. propose the next block from the pending context = verify taps of anchor + accepted drafts.
        pending = jnp.concatenate(res.taps, axis=-1)  # [B, K+1, n_ctx*d]
        pending_valid = (slot <= a[:, None]) & active[:, None]
        proposal, dcache = propose(draft, draft_params, dcfg, state["dcache"], pending, positions, pending_valid,
                                   anchor, new_start, key_p, sampling_values, mode, options, temperatures)
        return dict(round=rnd + 1, proposal=proposal, anchor=anchor, start=new_start, tcache=tcache,
                    dcache=dcache, out=out, num_out=num_out, done=done, stats=stats, records=records)

    state = dict(round=jnp.int32(0), proposal=proposal, anchor=first, start=start, tcache=tcache, dcache=dcache,
                 out=out, num_out=num_out, done=done, stats=stats, records=records)
    state = jax.lax.while_loop(cond, body, state)
    return state["out"][:, :max_new_tokens], state["num_out"], state["stats"], state["records"]
