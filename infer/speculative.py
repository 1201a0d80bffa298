"""Batched DSpark/DFlash speculative decoding as one reusable round (DSpark spec §5).

Per row b the state (`infer.state.SpecState`) keeps: the anchor (last committed token, not yet in
the target cache) at position start[b] == target cache length; the draft cache (context K/V
derived from target features of committed tokens); the current proposal; the per-row request
settings (`RowParams`: sampling values, PRNG key, stop ids, limit, thresholds); the output buffer
and metrics. Everything static is one hashable `SpecLoop`.

`speculative_step(loop, models, state)` is one round (rows progress independently):
  1. verify: one target forward over [anchor, x_0..x_{K-1}] appended at each row's own position,
     with taps; target distributions warped exactly like the draft's;
  2. rejection sampling (`infer.verify`) on the first n[b] drafts -> a[b] accepted + next token
     (greedy rows compare token ids);
  3. commit: anchor + accepted drafts become part of the target cache (lengths = start + a + 1;
     the rejected tail is rolled back by the length alone), the next token becomes the anchor;
     the verify taps of rows 0..a become the pending draft context;
  4. propose: draft backbone over [anchor, mask x (K_trained-1)] attending to cached + pending
     context, sequential head samples the first K drafts left to right from warped float32
     distributions, confidence head scores them; the per-row thresholds pick n[b].
`speculative_init` prefills and makes the first proposal (pending context = the prompt's
features); `speculative_generate` is a `lax.while_loop` of `speculative_step`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dspark_jax import kernels
from dspark_jax.draft import heads
from dspark_jax.draft.cache import DraftCache
from dspark_jax.draft.eagle3 import Eagle3Config
from dspark_jax.draft.model import DraftModel
from dspark_jax.sampling import greedy_argmax, next_token, sample_from_probs, warp_probs
from dspark_jax.target.model import TargetModel, output_kernel
from infer.autoregressive import prefill
from infer.eagle3 import chain_propose
from infer.spec_metrics import RoundRecords, RoundStats
from infer.state import (NONFINITE_DRAFT, NONFINITE_PREFILL, NONFINITE_TARGET, OutputBuffer, Pending, Proposal,
                         RowParams, SpecLoop, SpecModels, SpecState, all_finite, is_stop, split_keys, step_keys)
from infer.verify import VerifyResult, _truncate_at_stop, greedy_verify, rejection_sample

__all__ = ["Pending", "Proposal", "make_models", "speculative_init", "speculative_step", "speculative_generate",
           "propose", "draft_backbone", "sample_block", "truncate_proposal", "target_verify", "verify_proposal"]

Array = jax.Array


def make_models(loop: SpecLoop, target_params, draft_params, sts_temperatures: Array | None = None) -> SpecModels:
    """Bundle the weights for the step; lays the target's output kernel out once as [d, V]."""
    head = output_kernel(loop.target, target_params)
    if loop.share_lm_head:  # the draft's frozen LM head is this very kernel: keep one copy hot
        draft_params = {**draft_params, "lm_head": {"kernel": head}}
    temps = None if sts_temperatures is None else jnp.asarray(sts_temperatures, jnp.float32)
    return SpecModels(target=target_params, draft=draft_params, head=head, sts_temperatures=temps)


def truncate_proposal(conf_logits: Array, confidence_threshold: Array | float, survival_threshold: Array | float,
                      temperatures: Array | None = None) -> Array:
    """Number of drafts to verify per row [B] from raw confidence logits [B, K].

    confidence_threshold [B] (or scalar): the reference rule, cut at the first slot whose raw
    sigmoid(confidence) is below it (STS temperatures are NOT applied; 0 = off).
    survival_threshold [B] (or scalar): cut where the cumulative product of confidences, calibrated
    by the per-slot STS `temperatures` [>= K] when given, drops below it (0 = off).
    """
    b, k = conf_logits.shape
    conf_t = jnp.broadcast_to(jnp.asarray(confidence_threshold, jnp.float32), (b,))[:, None]
    surv_t = jnp.broadcast_to(jnp.asarray(survival_threshold, jnp.float32), (b,))
    raw = jax.nn.sigmoid(conf_logits)
    below = (raw < conf_t) & (conf_t > 0)
    num = jnp.where(jnp.any(below, axis=1), jnp.argmax(below, axis=1), k).astype(jnp.int32)
    calibrated = raw if temperatures is None else jax.nn.sigmoid(conf_logits / temperatures[None, :k])
    keep = jnp.cumprod(calibrated, axis=1) >= surv_t[:, None]
    surv_num = jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    return jnp.where(surv_t > 0, jnp.minimum(num, surv_num), num)


def draft_backbone(loop: SpecLoop, models: SpecModels, cache: DraftCache, pending: Pending, anchor: Array,
                   start: Array) -> tuple[Array, Array, DraftCache]:
    """The parallel draft pass over the full trained block per row.

    anchor [B] at position start [B]. Returns (h [B, K_trained, d], base logits U [B, K_trained, V]
    float32, draft cache with the pending rows committed).
    """
    dcfg = loop.draft
    model = DraftModel(dcfg)
    b, kt = anchor.shape[0], dcfg.block_size
    p = {"params": models.draft}
    new_ctx = model.apply(p, pending.features, method=DraftModel.project_context)
    block_tokens = jnp.concatenate([anchor[:, None], jnp.full((b, kt - 1), dcfg.mask_token_id, jnp.int32)], axis=1)
    block_positions = start[:, None] + jnp.arange(kt, dtype=jnp.int32)[None, :]
    return model.apply(p, block_tokens, block_positions, cache, new_ctx, pending.positions, pending.valid,
                       method=DraftModel.block_forward)


def sample_block(loop: SpecLoop, models: SpecModels, h: Array, base_logits: Array, anchor: Array, keys: Array,
                 params: RowParams) -> Proposal:
    """Sequential head: sample the first K drafts left to right (spec §2.5) and score their confidences.

    h [B, >=K, d], base_logits [B, >=K, V]; keys [B, 2] per row. Slot k's logits are
    Z_k = U_k + B(prev, h_k[, state]); the draft token is sampled from warp_probs(Z_k) — the same
    float32 distribution handed to the verifier (greedy rows: its argmax).
    """
    dcfg, mode, k = loop.draft, loop.mode, loop.block_size
    b = anchor.shape[0]
    markov = models.draft.get("markov_head")
    conf_params = models.draft.get("confidence_head")
    if loop.backend != "xla" and markov is not None and kernels.sampler_supports(
            dcfg.markov_head_type, mode.use_top_k, mode.use_top_p):  # the fused K-step sampler kernel
        tokens, probs, conf = kernels.propose_fused(
            models.draft, dcfg.markov_head_type, dcfg.confidence_head_with_markov, h[:, :k], base_logits[:, :k],
            anchor, keys, params.sampling.temperature, greedy=mode.greedy, backend=loop.backend)
        num = truncate_proposal(conf, params.confidence_threshold, params.survival_threshold, models.sts_temperatures)
        return Proposal(tokens=tokens, probs=probs, conf_logits=conf, num=num)

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
            probs = warp_probs(z, params.sampling, mode)
            tok = sample_from_probs(key_k, probs, mode)
        if conf_params is not None:
            conf = heads.confidence_logits(conf_params, h_k, prev if dcfg.confidence_head_with_markov else None,
                                           markov)
        else:
            conf = jnp.zeros((b,), jnp.float32)
        return (tok, state), (tok, probs, conf)

    state0 = heads.init_state((b,), max(dcfg.markov_rank, 1))
    xs = (jnp.moveaxis(h[:, :k], 1, 0), jnp.moveaxis(base_logits[:, :k], 1, 0), split_keys(keys, k))
    # K is small and static: unrolled, the slots run without while-loop overhead.
    _, (toks, probs, conf) = jax.lax.scan(slot, (anchor, state0), xs, unroll=True)
    tokens, conf = jnp.moveaxis(toks, 0, 1), jnp.moveaxis(conf, 0, 1)
    probs = None if probs is None else jnp.moveaxis(probs, 0, 1)
    num = truncate_proposal(conf, params.confidence_threshold, params.survival_threshold, models.sts_temperatures)
    return Proposal(tokens=tokens, probs=probs, conf_logits=conf, num=num)


def propose(loop: SpecLoop, models: SpecModels, cache: DraftCache, pending: Pending, anchor: Array, start: Array,
            keys: Array, params: RowParams) -> tuple[Proposal, DraftCache, Array]:
    """Draft one proposal per row; the drafter's kind (its config's type) picks how.

    DSpark/DFlash: `draft_backbone` (one parallel pass over the block) then `sample_block`;
    Eagle-3: `infer.eagle3.chain_propose` (K sequential one-token steps through its draft cache).
    Returns (proposal, draft cache, bool [B] whether the row's draft logits were all finite).
    """
    if isinstance(loop.draft, Eagle3Config):
        return chain_propose(loop, models, cache, pending, keys, params)
    h, base_logits, cache = draft_backbone(loop, models, cache, pending, anchor, start)
    proposal = sample_block(loop, models, h, base_logits, anchor, keys, params)
    finite = all_finite(base_logits[:, :loop.block_size]) & all_finite(proposal.conf_logits)
    return proposal, cache, finite


def speculative_init(loop: SpecLoop, models: SpecModels, prompt_tokens: Array, prompt_lengths: Array,
                     params: RowParams) -> SpecState:
    """Prefill right-padded prompts [B, P], sample the first token, make the first proposal.

    Requires cache_len >= P_max + max_new_tokens + K + 1 (checked by the caller).
    """
    k = loop.block_size
    b, p_len = prompt_tokens.shape
    key_first, key_prop = step_keys(params.keys, 0, 2)
    logits, tcache, taps = prefill(TargetModel(loop.target, attention_backend=loop.backend), models.target, prompt_tokens, prompt_lengths,
                                   loop.cache_len, tuple(loop.draft.target_layer_ids))
    first = next_token(key_first, logits, params.sampling, loop.mode)
    start = prompt_lengths.astype(jnp.int32)  # position of the anchor
    prompt_pos = jnp.broadcast_to(jnp.arange(p_len, dtype=jnp.int32), (b, p_len))
    # The token after each prompt position: the next prompt token, the first sampled one after the last.
    after = jnp.concatenate([prompt_tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    after = jnp.where(prompt_pos == start[:, None] - 1, first[:, None], after)
    pending = Pending(features=jnp.concatenate(taps, axis=-1), positions=prompt_pos,
                      valid=prompt_pos < prompt_lengths[:, None], next_tokens=after)
    proposal, dcache, draft_ok = propose(loop, models, DraftCache.create(loop.draft, b, loop.cache_len), pending,
                                         first, start, key_prop, params)
    bad = jnp.where(all_finite(logits), 0, NONFINITE_PREFILL) | jnp.where(draft_ok, 0, NONFINITE_DRAFT)
    bad = bad.astype(jnp.int32)
    # The reference stops once start - P >= max_new: a limit of 1 still runs one verify round.
    limit_reached = params.max_new <= (0 if loop.reference_length_rule else 1)
    done = is_stop(first, params.stop_ids) | limit_reached | (bad != 0)
    return SpecState(round=jnp.int32(0), anchor=first, start=start, prompt_len=start, tcache=tcache, dcache=dcache,
                     proposal=proposal, params=params, out=OutputBuffer.start(first, loop.buffer_width, done),
                     stats=RoundStats.zeros(b, k),
                     records=RoundRecords.empty(b, loop.max_new_tokens, k) if loop.record_rounds else None,
                     nonfinite=bad)


def _select_rows(flag: Array, a: VerifyResult, b: VerifyResult) -> VerifyResult:
    """Per row: a where flag [B] else b."""
    return jax.tree_util.tree_map(lambda x, y: jnp.where(flag.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


def target_verify(loop: SpecLoop, models: SpecModels, state: SpecState):
    """Step 1: one target forward over [anchor, drafts] [B, K+1] at each row's own position, with taps.

    Returns the TargetOutput (logits [B, K+1, V] float32, cache with the K+1 rows written, taps).
    """
    k = loop.block_size
    verify_tokens = jnp.concatenate([state.anchor[:, None], state.proposal.tokens], axis=1)  # [B, K+1]
    positions = state.start[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    return TargetModel(loop.target, attention_backend=loop.backend).apply({"params": models.target}, verify_tokens, positions,
                                          state.tcache.with_lengths(state.start),
                                          tap_layers=tuple(loop.draft.target_layer_ids), lm_head_kernel=models.head)


def verify_proposal(loop: SpecLoop, proposal: Proposal, logits: Array, num: Array, keys: Array,
                    params: RowParams) -> VerifyResult:
    """Step 2: rejection sampling of the first num [B] drafts against target logits [B, K+1, V].

    Greedy rows (every row when loop.mode.greedy) compare token ids with the target's argmax;
    sampled rows warp the target logits exactly like the draft's and run `rejection_sample`.
    """
    ver = greedy_verify(proposal.tokens, greedy_argmax(logits), num, params.stop_ids)
    if loop.mode.greedy:
        return ver
    if loop.backend != "xla":  # the fused verification kernel (greedy rows: token-id path inside)
        mode = loop.mode
        accepted, next_tok = kernels.verify_fused(
            logits, proposal.tokens, proposal.probs, num, keys, params.sampling.temperature, params.sampling.top_k,
            params.sampling.top_p, top_k_bound=mode.top_k_bound if mode.use_top_k else 0, use_top_p=mode.use_top_p,
            backend=loop.backend)
        prefix = jnp.arange(proposal.tokens.shape[1])[None, :] < accepted[:, None]
        accepted, terminated = _truncate_at_stop(proposal.tokens, prefix, accepted, params.stop_ids)
        return VerifyResult(accepted=accepted, next_token=next_tok, terminated=terminated, prefix_accepted=prefix)
    target_probs = warp_probs(logits, params.sampling, loop.mode)  # [B, K+1, V]
    sampled = rejection_sample(keys, proposal.tokens, proposal.probs, target_probs, num, params.stop_ids, loop.mode)
    return _select_rows(params.sampling.greedy, ver, sampled)


def speculative_step(loop: SpecLoop, models: SpecModels, state: SpecState) -> SpecState:
    """One verify + commit + propose round for every unfinished row (finished rows are untouched)."""
    k = loop.block_size
    params, prop = state.params, state.proposal
    b = state.anchor.shape[0]
    key_v, key_p = step_keys(params.keys, state.round + 1, 2)
    active = ~state.out.done
    anchor, start = state.anchor, state.start

    # 1. verify [anchor, drafts] at each row's own position; 2. rejection sampling.
    res = target_verify(loop, models, state)
    positions = start[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    bad = jnp.where(active & ~all_finite(res.logits), NONFINITE_TARGET, 0).astype(jnp.int32)
    live = active & (bad == 0)
    num = jnp.where(live, prop.num, 0)
    ver = verify_proposal(loop, prop, res.logits, num, key_v, params)
    a = jnp.where(live, ver.accepted, 0)
    # A round ended by a stop token counts its drafts only up to the stop (as the reference).
    proposed = jnp.where(ver.terminated, a, num)

    # 3. commit: accepted drafts + next token, capped at the row's limit.
    slot = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    drafts_ext = jnp.concatenate([prop.tokens, jnp.zeros((b, 1), jnp.int32)], axis=1)
    new_tokens = jnp.where(slot < a[:, None], drafts_ext,
                           jnp.where((slot == a[:, None]) & ~ver.terminated[:, None], ver.next_token[:, None], -1))
    n_new = a + jnp.where(ver.terminated, 0, 1)
    n_new = jnp.where(live, jnp.minimum(n_new, params.max_new - state.out.count), 0)
    out = state.out.append(new_tokens, n_new)
    hit_stop = jnp.any(is_stop(new_tokens, params.stop_ids) & (slot < n_new[:, None]), axis=1)
    new_start = jnp.where(live, start + a + 1, start)
    if loop.reference_length_rule:
        limit_reached = new_start - state.prompt_len >= params.max_new
    else:
        limit_reached = out.count >= params.max_new
    done = state.out.done | (bad != 0) | (live & (hit_stop | limit_reached))

    stats = state.stats.update(live, proposed, a, ver.terminated)
    records = state.records
    if records is not None:
        records = records.write(stats.rounds - 1, live, prop.conf_logits, ver.prefix_accepted, proposed, a)

    anchor = jnp.where(live, ver.next_token, anchor)
    # 4. propose the next block from the pending context = verify taps of anchor + accepted drafts.
    pending = Pending(features=jnp.concatenate(res.taps, axis=-1), positions=positions,
                      valid=(slot <= a[:, None]) & live[:, None],
                      next_tokens=jnp.where(slot == a[:, None], anchor[:, None], drafts_ext))
    proposal, dcache, draft_ok = propose(loop, models, state.dcache, pending, anchor, new_start, key_p, params)
    bad = bad | jnp.where(~done & ~draft_ok, NONFINITE_DRAFT, 0).astype(jnp.int32)
    done = done | (bad != 0)
    return state.replace(round=state.round + 1, anchor=anchor, start=new_start,
                         tcache=res.cache.with_lengths(new_start), dcache=dcache, proposal=proposal, out=out.replace(done=done), stats=stats, records=records,
                         nonfinite=state.nonfinite | bad)


@functools.partial(jax.jit, static_argnames=("loop",))
def speculative_generate(target_params, draft_params, sts_temperatures: Array | None, prompt_tokens: Array,
                         prompt_lengths: Array, params: RowParams, *, loop: SpecLoop):
    """Speculative generation for a batch of right-padded prompts: init + `lax.while_loop` of steps.

    prompt_tokens [B, P] int32; prompt_lengths [B]; sts_temperatures: optional [K_trained] per-slot
    STS temperatures for the survival rule. Returns (tokens [B, max_new_tokens] (-1 after the end),
    num_generated [B], RoundStats, RoundRecords or None, nonfinite [B] int32 flags).
    """
    models = make_models(loop, target_params, draft_params, sts_temperatures)
    state = speculative_init(loop, models, prompt_tokens, prompt_lengths, params)
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.out.done), lambda s: speculative_step(loop, models, s), state)
    return state.out.tokens[:, :loop.max_new_tokens], state.out.count, state.stats, state.records, state.nonfinite
