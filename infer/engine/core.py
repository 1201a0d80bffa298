"""Device side of the continuous-batching engine: slot state, insert, plan (policy), packed round.

R fixed slots share per-slot target and draft caches ``[R, S, ...]`` (slot-contiguous: slot r's
row, index = position; not paged). A request enters its slot through `infer.engine.prefill`. The
jitted round programs:

* `plan_round`: the policy's per-slot draft counts ℓ [R] (on device: Algorithm 1, async top-K,
  thresholds, static) and whether the round ends with a draft pass (the cost gate of dspark and
  dspark-async).
* `engine_round`: pack ``[anchor, drafts[:ℓ]]`` of the active slots into the bucket, one packed
  target forward (`infer.ragged`), packed rejection sampling with per-slot keys and sampling
  values, commit, and the next draft block for every slot. Returns the committed tokens per slot;
  the host applies stop tokens and max-token limits (extra tokens after a stop are discarded).
* `engine_rounds`: one round at a static ℓ and bucket, or several in one device loop, ending at the
  first stop token or token limit of any slot: the engine's program for `ar` (no drafter), for the
  plain rounds while the cost gate declines drafting (no plan, no bucket switch, no draft pass, no
  draft-context commit: `keep_context=False`, the engine rebuilds the context when a slot drafts
  again), and the profiler's.
* `scheduled_rounds`: the same device loop for the drafting policies (static, mtp1, threshold,
  dspark, dspark-async; the policy is traced, so they share one program): each round plans ℓ,
  picks the token bucket on device and runs that bucket's packed verify through `lax.switch`
  (`scheduled_round`), so a round costs no host round trip and a call runs up to `max_rounds`.

Randomness: request r's round n uses ``fold_in(PRNGKey(seed_r), n)`` whatever slot or batch it
runs in, so a request's output depends only on its own seed and the tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from dspark_jax.config import TargetConfig
from dspark_jax.draft.cache import DraftCache
from dspark_jax.draft.config import DraftConfig
from dspark_jax.layers import dtype_of
from dspark_jax.sampling import SamplingMode, SamplingParams
from dspark_jax.scheduling import async_schedule, fill_to_bucket, prefix_schedule, survival_from_confidence
from dspark_jax.target.kv_cache import KVCache
from infer.cost_model import RoundCostModel
from infer.ragged import pack_chunks, packed_rejection_sample, packed_target_forward
from infer.speculative import Pending, draft_backbone, sample_block, truncate_proposal
from infer.state import RowParams, SpecLoop, SpecModels

__all__ = ["EngineSpec", "Policy", "EngineState", "plan_round", "engine_round", "fold_survival",
           "PolicyArgs", "PLAN_KINDS",
           "engine_rounds", "scheduled_round", "scheduled_rounds", "draft_pass_only", "parse_policy", "POLICIES"]

Array = jax.Array
POLICIES = ("ar", "static:K", "mtp1", "threshold[:c]", "dspark", "dspark-async")


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Static shape of an engine (hashable: part of every compiled program).

    slots R; cache_len S (per slot: prompt + max new tokens + γ + 1 must fit); gamma γ = draft slots
    per proposal (0 without a drafter); mode: the static sampling mode shared by sampled requests
    (`greedy=True`: every request is greedy); backend: the target's prefill and packed verify
    attention per `dspark_jax.kernels` ("xla" | "pallas", already resolved).
    """

    config: TargetConfig
    dcfg: DraftConfig | None
    slots: int
    cache_len: int
    gamma: int
    mode: SamplingMode
    share_lm_head: bool = False
    backend: str = "xla"


@dataclasses.dataclass(frozen=True)
class Policy:
    """How many drafts each slot verifies: kind in ar | static | threshold | dspark | dspark-async.

    k: drafts for `static` (mtp1 = static 1); threshold: reference confidence threshold;
    cost_gate: with dspark and dspark-async, verify no drafts when the whole-round cost model says drafting does
    not pay this round; gate_margin: drafting pays only when the best drafted round is predicted at
    least this fraction faster than plain decoding (`RoundCostModel.decide`'s margin: the profile's
    own run-to-run spread, so timing noise does not turn a tie into a loss).
    """

    kind: str
    k: int = 0
    threshold: float = 0.5
    cost_gate: bool = True
    gate_margin: float = 0.1

    @property
    def drafts(self) -> bool:
        """Whether this policy needs a drafter."""
        return self.kind != "ar"

    @property
    def gated(self) -> bool:
        """Whether the whole-round cost gate may skip drafting (dspark and dspark-async with cost_gate)."""
        return self.cost_gate and self.kind in ("dspark", "dspark-async")

    def device_args(self) -> "PolicyArgs":
        """This policy as traced values for `scheduled_rounds` (every drafting policy shares one program)."""
        return PolicyArgs(kind=jnp.int32(PLAN_KINDS.index(self.kind)), k=jnp.int32(self.k),
                          threshold=jnp.float32(self.threshold), cost_gate=jnp.asarray(self.cost_gate),
                          gate_margin=jnp.float32(self.gate_margin))


PLAN_KINDS = ("static", "threshold", "dspark", "dspark-async")  # `PolicyArgs.kind` indexes this


@flax.struct.dataclass
class PolicyArgs:
    """A drafting `Policy` as traced scalars: kind (index into PLAN_KINDS) int32, k int32 (static drafts),
    threshold float32, cost_gate bool, gate_margin float32."""

    kind: Array
    k: Array
    threshold: Array
    cost_gate: Array
    gate_margin: Array


def parse_policy(text: str, gamma: int) -> Policy:
    """'ar' | 'static:K' | 'mtp1' | 'threshold' | 'threshold:C' | 'dspark' | 'dspark-async' -> Policy."""
    name, _, arg = text.strip().partition(":")
    try:
        if name == "ar" and not arg:
            return Policy("ar")
        if name == "mtp1" and not arg:
            return Policy("static", k=1)
        if name == "static":
            k = int(arg)
            if not 1 <= k <= max(gamma, 1):
                raise ValueError(f"static:K needs 1 <= K <= {gamma} (the drafter's block), got {k}")
            return Policy("static", k=k)
        if name == "threshold":
            c = float(arg) if arg else 0.5
            if not 0.0 < c < 1.0:
                raise ValueError(f"threshold needs 0 < C < 1, got {c}")
            return Policy("threshold", threshold=c)
        if name in ("dspark", "dspark-async") and not arg:
            return Policy(name)
    except ValueError as e:
        if "needs" in str(e):
            raise
        raise ValueError(f"policy {text!r}: bad number {arg!r}") from None
    raise ValueError(f"unknown policy {text!r}; choose from {', '.join(POLICIES)}")


@flax.struct.dataclass
class EngineState:
    """Per-slot device state (R slots, γ drafts, V vocabulary).

    tcache / dcache: per-slot target / draft caches; anchor [R] last committed token (not yet in
    the target cache) at position start [R]; prop_tokens [R, γ], prop_probs [R, γ, V] (None when
    every request is greedy), prop_conf [R, γ] the pending proposal; sampling: per-slot
    `SamplingParams` [R] (temperature 0 = greedy); keys [R, 2] per-request base keys, rnd [R]
    rounds done; surv_hist [2, R, γ] with
    hist_valid [2, R]: calibrated survivals of the proposals verified one and two rounds ago
    (for dspark-async); surv_mean [γ] the running mean (weight ≥ 0.1 per draft pass) of the calibrated
    survivals of every proposal the engine drafted, over its active slots (and of the probes: a joining
    request's first block while the gate declines, `fold_survival`), and surv_seen the draft
    passes and probes folded into it (the load-level survival the cost gate reads). The draft cache holds
    the context of every committed token after every round of `scheduled_rounds` (a round without a
    draft pass commits its rows without drafting); `engine_rounds(keep_context=False)` leaves it behind
    (the engine's declined rounds, see `engine_round`).
    """

    tcache: KVCache
    dcache: DraftCache | None
    anchor: Array
    start: Array
    prop_tokens: Array
    prop_probs: Array | None
    prop_conf: Array
    sampling: SamplingParams
    keys: Array
    rnd: Array
    surv_hist: Array
    hist_valid: Array
    surv_mean: Array
    surv_seen: Array

    @classmethod
    def create(cls, spec: EngineSpec) -> "EngineState":
        """Empty slots."""
        r, g = spec.slots, max(spec.gamma, 1)
        dcfg = spec.dcfg
        dcache = DraftCache.create(dcfg, r, spec.cache_len) if dcfg is not None else None
        probs = None if spec.mode.greedy or spec.dcfg is None else jnp.zeros((r, g, spec.config.vocab_size),
                                                                              jnp.float32)
        zi = lambda: jnp.zeros((r,), jnp.int32)  # noqa: E731 - distinct buffers (the state is donated)
        return cls(tcache=KVCache.create(spec.config, r, spec.cache_len), dcache=dcache, anchor=zi(), start=zi(),
                   prop_tokens=jnp.zeros((r, g), jnp.int32), prop_probs=probs, prop_conf=jnp.zeros((r, g)),
                   sampling=SamplingParams(temperature=jnp.zeros((r,), jnp.float32), top_k=zi(),
                                           top_p=jnp.ones((r,), jnp.float32)),
                   keys=jnp.zeros((r, 2), jnp.uint32), rnd=zi(), surv_hist=jnp.zeros((2, r, g)),
                   hist_valid=jnp.zeros((2, r), bool), surv_mean=jnp.zeros((g,), jnp.float32),
                   surv_seen=jnp.zeros((), jnp.int32))


def _spec_loop(spec: EngineSpec) -> SpecLoop:
    """The speculative step's static description for the engine's draft pass."""
    return SpecLoop(target=spec.config, draft=spec.dcfg, block_size=spec.gamma, mode=spec.mode, max_new_tokens=1,
                    cache_len=spec.cache_len, share_lm_head=spec.share_lm_head)


def _draft_models(spec: EngineSpec, draft_params, head: Array) -> SpecModels:
    """The drafter's parameters as `SpecModels` (with the target's output kernel as its LM head when shared)."""
    if spec.share_lm_head:  # the draft's frozen LM head is the target's output kernel
        draft_params = {**draft_params, "lm_head": {"kernel": head}}
    return SpecModels(target=None, draft=draft_params, head=head)


def commit_context(spec: EngineSpec, draft_params, head: Array, dcache: DraftCache, pending: Pending,
                    start: Array) -> DraftCache:
    """Commit context rows (target features of committed tokens) to the draft cache without drafting.

    The draft backbone's block outputs are unused, so XLA drops them: what runs is the context
    projection and each draft layer's key/value projection of the new rows.
    """
    n = start.shape[0]
    _, _, dcache = draft_backbone(_spec_loop(spec), _draft_models(spec, draft_params, head), dcache, pending,
                                  jnp.zeros((n,), jnp.int32), start)
    return dcache


def propose_block(spec: EngineSpec, draft_params, head: Array, dcache: DraftCache, pending: Pending, anchor: Array,
             start: Array, keys: Array, sampling: SamplingParams):
    """Draft one block per row with per-row keys [N, 2] and sampling params [N] -> (tokens, probs|None, conf, dcache).

    Uses `infer.speculative.draft_backbone` / `sample_block` (no threshold truncation: the policy picks ℓ).
    """
    loop, models = _spec_loop(spec), _draft_models(spec, draft_params, head)
    n = anchor.shape[0]
    zeros = jnp.zeros((n,), jnp.float32)
    rows = RowParams(sampling=sampling, keys=keys, stop_ids=jnp.full((n, 1), -1, jnp.int32),
                     max_new=jnp.ones((n,), jnp.int32), confidence_threshold=zeros, survival_threshold=zeros)
    h, base, dcache = draft_backbone(loop, models, dcache, pending, anchor, start)
    prop = sample_block(loop, models, h, base, anchor, keys, rows)
    return prop.tokens, prop.probs, prop.conf_logits, dcache


def _row_keys(state: EngineState) -> tuple[Array, Array, Array]:
    """Per-slot (sample/verify key, propose key, spare) for this round of each request."""
    k = jax.vmap(lambda base, n: jax.random.split(jax.random.fold_in(base, n), 3))(state.keys, state.rnd)
    return k[:, 0], k[:, 1], k[:, 2]


def set_slot_row(buf: Array, slot: Array, row: Array) -> Array:
    return buf.at[slot].set(row.astype(buf.dtype))


def _plan(state: EngineState, active: Array, has_proposal: Array, round_sps: Array, plain_sps: Array,
          temperatures: Array, spec: EngineSpec, policy: PolicyArgs, buckets: tuple[int, ...],
          remaining: Array, waiting: Array) -> tuple[Array, Array, Array]:
    """Traced body of `plan_round` (inlined into `scheduled_round`): one `lax.switch` branch per policy kind;
    the scheduled policies (dspark, dspark-async) then fill their token bucket's padding (`fill_to_bucket`).

    remaining [R]: tokens each slot may still commit (its max_new_tokens budget). A round commits at most
    ℓ + 1 tokens, and those past the budget are discarded, so ℓ <= remaining − 1 for every policy, and the
    survivals of the draft positions beyond it count as 0 in the scheduler (a request near its end is
    not worth a big verify); the cost gate reads the running mean survival instead (whether drafting
    pays at this load, see below).
    The budget depends only on tokens already committed, so this stays non-anticipating (lossless).

    waiting (int scalar): requests waiting for a slot or still in prefill. dspark's cost gate compares
    a drafted round at the current load with plain decoding at the load the engine reaches once they
    are admitted, min(R, active + waiting): each step prefills a bounded chunk, so a drafted round's
    extra time delays their admission. (Compared at today's load, the gate drafted during the ramp-up
    of a full queue at concurrency 64, at 9–42 of 64 slots, 85–90 ms rounds against 25–40 ms plain
    ones; those rounds cost 10 % of the load's throughput.)
    """
    r, g = spec.slots, spec.gamma
    yes = jnp.asarray(True)
    cap = jnp.clip(remaining - 1, 0, g).astype(jnp.int32)  # [R] useful drafts per slot

    def static(_):
        return jnp.full((r,), jnp.minimum(policy.k, g), jnp.int32), yes

    def threshold(_):  # the reference rule: stop at the first raw confidence below c
        return truncate_proposal(state.prop_conf, policy.threshold, 0.0).astype(jnp.int32), yes

    def gate(surv):
        """The cost gate of dspark and dspark-async: would a drafted round pay at this load (`surv`: the running
        mean survival) against plain decoding at the load once the waiting requests are admitted?"""
        load = jnp.minimum(jnp.sum(active.astype(jnp.int32)) + waiting, r)  # plain decoding's requests
        _, pays = RoundCostModel.decide(surv, round_sps, plain_sps, active=active, margin=policy.gate_margin,
                                        plain_requests=load)
        return pays | ~policy.cost_gate

    def dspark(surv):
        return prefix_schedule(surv_now, round_sps, active=active).astype(jnp.int32), gate(surv)

    def dspark_async(surv):  # capacity from the survivals verified two rounds ago, today's ranking
        ell, _ = async_schedule(surv_now, state.surv_hist[1], round_sps, active=active,
                                stale_active=state.hist_valid[1])
        return ell.astype(jnp.int32), gate(surv)

    if g == 0:
        ell, draft_next = jnp.zeros((r,), jnp.int32), jnp.asarray(False)
    else:
        # The gate asks whether drafting pays at this load: as if every active slot's proposal had the
        # running mean survival of the engine's proposals so far (`EngineState.surv_mean`; the slots'
        # latest survivals before the first draft pass), uncapped. ℓ uses this round's survivals capped
        # to the drafts a slot could still commit. (A gate reading the latest proposals froze: once it
        # declined, no slot drafted again, so its input never changed, and one hard stretch of one
        # request at concurrency 1 kept every later request plain; reading them capped, it declined
        # whenever the requests neared their ends.)
        surv_all = survival_from_confidence(state.prop_conf, temperatures)
        gate_surv = jnp.where(state.surv_seen > 0, jnp.broadcast_to(state.surv_mean, (r, g)), surv_all)
        useful = jnp.arange(g)[None, :] < cap[:, None]  # [R, γ] drafts that could still be committed
        surv_now = jnp.where(has_proposal[:, None] & useful, surv_all, 0.0)  # [R, γ] candidates of this round
        ell, draft_next = jax.lax.switch(policy.kind, [static, threshold, dspark, dspark_async], gate_surv)
        scheduled = policy.kind >= PLAN_KINDS.index("dspark")  # dspark, dspark-async
        ell = jnp.where(scheduled, fill_to_bucket(surv_now, ell, buckets, active=active), ell)
    ell = jnp.where(active & has_proposal, jnp.minimum(ell, cap), 0).astype(jnp.int32)
    return ell, jnp.sum(jnp.where(active, 1 + ell, 0)), draft_next


@functools.partial(jax.jit, static_argnames=("spec", "policy", "buckets"))
def plan_round(state: EngineState, active: Array, has_proposal: Array, round_sps: Array, plain_sps: Array,
               temperatures: Array, remaining: Array, waiting: Array | int = 0, *, spec: EngineSpec, policy: Policy,
               buckets: tuple[int, ...]) -> tuple[Array, Array, Array]:
    """(ℓ [R] int32 drafts to verify per slot, total packed tokens Σ(1 + ℓ), draft_next bool).

    has_proposal [R]: the slot's proposal was drafted after its last commit (else ℓ = 0).
    round_sps / plain_sps: whole-round and verify-only SPS tables [B_max + 1] (`infer.cost_model`);
    temperatures [γ] STS temperatures of the drafter (ones when uncalibrated). draft_next: whether
    this round should end with a draft pass — False only for dspark / dspark-async with the cost gate
    when, at the engine's running mean survival, the best drafted round is not predicted (1 + margin)×
    as fast as plain decoding.
    buckets: the engine's token buckets (dspark and dspark-async fill the padding of theirs).
    remaining [R]: tokens each slot may still commit (ℓ <= remaining − 1; see `_plan`). waiting: requests
    waiting for a slot or in prefill (dspark's gate compares with plain decoding at their load; `_plan`).
    The engine runs this decision inside `scheduled_rounds`, and this standalone program after a slot
    joins or leaves under `dspark` (a declined plan sends the call to `engine_rounds`).
    """
    if not policy.drafts or spec.gamma == 0:
        r = spec.slots
        return jnp.zeros((r,), jnp.int32), jnp.sum(active.astype(jnp.int32)), jnp.asarray(False)
    return _plan(state, active, has_proposal, round_sps, plain_sps, temperatures, spec, policy.device_args(),
                 buckets, remaining, jnp.asarray(waiting, jnp.int32))


def _verify_commit(params, head, state: EngineState, ell: Array, active: Array, k_ver: Array, *, spec: EngineSpec,
                   bucket: int):
    """The verify half of a round at a static token bucket: pack, packed target forward, packed rejection
    sampling, commit to the target cache.

    Returns (state, new_tokens [R, γ + 1] (-1 past each slot's count), n_new [R], accepted [R],
    (ctx [R, γ + 1, n_ctx·E], ctx_pos [R, γ + 1], ctx_valid [R, γ + 1]) the round's draft-context rows
    (None without a drafter)). Every output's shape is independent of `bucket` (`lax.switch` branches).
    """
    cfg, dcfg, g = spec.config, spec.dcfg, max(spec.gamma, 1)
    taps_ids = tuple(dcfg.target_layer_ids) if dcfg is not None else ()
    packed = pack_chunks(state.anchor, state.prop_tokens, ell, state.start, active, bucket)
    logits, tcache, taps = packed_target_forward(cfg, params, packed, state.tcache, tap_layers=taps_ids,
                                                 lm_head_kernel=head, backend=spec.backend, max_chunk=g + 1)
    r = spec.slots
    slot_c = jnp.minimum(packed.token_slot, r - 1)
    draft_probs = None
    if state.prop_probs is not None:
        draft_probs = state.prop_probs[slot_c, jnp.clip(packed.token_offset - 1, 0, g - 1)]  # [T, V]
    ver = packed_rejection_sample(k_ver, packed, logits, draft_probs, state.sampling, jnp.asarray([-1], jnp.int32),
                                  spec.mode, g)
    a = jnp.where(active, ver.accepted, 0)
    col = jnp.arange(g + 1, dtype=jnp.int32)[None, :]
    drafts_ext = jnp.concatenate([state.prop_tokens, jnp.zeros((r, 1), jnp.int32)], axis=1)
    new_tokens = jnp.where(col < a[:, None], drafts_ext, jnp.where(col == a[:, None], ver.next_token[:, None], -1))
    n_new = jnp.where(active, a + 1, 0).astype(jnp.int32)
    new_tokens = jnp.where(col < n_new[:, None], new_tokens, -1)
    new_start = jnp.where(active, state.start + n_new, state.start)
    anchor = jnp.where(active, ver.next_token, state.anchor)
    state = state.replace(tcache=tcache.with_lengths(new_start), anchor=anchor, start=new_start,
                          rnd=state.rnd + active.astype(jnp.int32))
    ctx = None
    if dcfg is not None:
        # Draft context of this round: target features of the anchor and accepted drafts of each slot.
        rows = jnp.clip(packed.chunk_start[:, None] + col, 0, bucket - 1)  # [R, γ+1]
        ctx = (jnp.concatenate(taps, axis=-1)[rows],  # [R, γ+1, n_ctx*E]
               (new_start - n_new)[:, None] + col,
               (col < n_new[:, None]) & active[:, None])
    return state, new_tokens, n_new, a, ctx


def _draft_or_commit(draft_params, head, state: EngineState, ctx, active: Array, k_prop: Array,
                     temperatures: Array, *, spec: EngineSpec, draft_pass: bool) -> EngineState:
    """The draft half of a round: commit the round's draft-context rows `ctx` and draft every slot's next
    proposal (draft_pass), or only commit the rows (a plain round: the proposal is left as it was)."""
    features, positions, valid = ctx
    pending = Pending(features=features, positions=positions, valid=valid)
    if not draft_pass:
        return state.replace(dcache=commit_context(spec, draft_params, head, state.dcache, pending, state.start))
    surv = survival_from_confidence(state.prop_conf, temperatures)
    state = state.replace(surv_hist=jnp.stack([surv, state.surv_hist[0]]),
                          hist_valid=jnp.stack([active, state.hist_valid[0]]))
    tokens, probs, conf, dcache = propose_block(spec, draft_params, head, state.dcache, pending, state.anchor,
                                                state.start, k_prop, state.sampling)
    state = state.replace(dcache=dcache, prop_tokens=tokens, prop_probs=probs, prop_conf=conf)
    return fold_survival(state, conf, active, temperatures)


def fold_survival(state: EngineState, conf: Array, rows: Array, temperatures: Array,
                  weight_scale: float = 1.0) -> EngineState:
    """Fold new proposals' calibrated survivals into the running mean the cost gate reads.

    conf [N, γ] confidence logits of the new proposals, rows [N] which of them count (the active slots
    of a draft pass; the one row of a joining request's probe). Their mean survival [γ] enters
    `EngineState.surv_mean` with weight max(1 / (surv_seen + 1), 0.1) · weight_scale; surv_seen counts
    the folds. A probe (one request of R slots) folds with weight_scale 1 / R: one lucky first block
    must not reopen drafting for a full engine (at 64 slots it did, and the resumed round first
    rebuilt 725 tokens of draft context: 0.74x ar).
    """
    n = jnp.sum(rows.astype(jnp.float32))
    new = jnp.sum(jnp.where(rows[:, None], survival_from_confidence(conf, temperatures), 0.0), 0) / jnp.maximum(
        n, 1.0)  # [γ]
    w = jnp.where(n > 0, jnp.maximum(1.0 / (state.surv_seen + 1.0), 0.1) * weight_scale, 0.0)
    return state.replace(surv_mean=(1.0 - w) * state.surv_mean + w * new,
                         surv_seen=state.surv_seen + (n > 0).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("spec", "bucket", "draft_pass", "anchors_only", "keep_context"),
                   donate_argnames=("state",))
def engine_round(params, draft_params, head, state: EngineState, ell: Array, active: Array, temperatures: Array, *,
                 spec: EngineSpec, bucket: int, draft_pass: bool = True, anchors_only: bool = False,
                 keep_context: bool = True):
    """One packed verify round, then the next proposal.

    draft_pass=False: a plain round: no draft pass; the round's draft-context rows are committed to
    the draft cache all the same (keep_context), so a later draft pass sees every committed token.
    keep_context=False (with draft_pass=False): not even that: the round is `ar`'s, and the draft
    cache falls behind the committed tokens (the engine rebuilds the missing rows with
    `infer.engine.prefill.prefill_chunk(context_only=True)` before the slot drafts again).
    anchors_only=True: the caller passes ℓ ≡ 0, so each slot commits one context row (not γ + 1).

    ell [R] drafts to verify per slot; active [R] slots holding a request. Returns (state,
    new_tokens [R, γ + 1] (-1 past each slot's count), n_new [R], accepted [R]).
    """
    k_ver, k_prop, _ = _row_keys(state)
    state, new_tokens, n_new, a, ctx = _verify_commit(params, head, state, ell, active, k_ver, spec=spec,
                                                      bucket=bucket)
    if ctx is not None and anchors_only:
        ctx = tuple(x[:, :1] for x in ctx)
    if ctx is not None and (draft_pass or keep_context):
        state = _draft_or_commit(draft_params, head, state, ctx, active, k_prop, temperatures, spec=spec,
                                 draft_pass=draft_pass)
    return state, new_tokens, n_new, a


def _device_loop(round_fn, state: EngineState, carry, active: Array, budget: Array, stop_ids: Array,
                 num_rounds: Array, max_rounds: int):
    """Run ``round_fn(state, carry, left) -> (state, carry, new_tokens [R, γ+1], n_new [R], record)`` (left [R]:
    tokens each slot may still commit) up to
    num_rounds (<= max_rounds) times in a while-loop, ending after the round in which an active slot
    commits a stop token (stop_ids [R, n], -1 pads) or reaches its token budget [R].

    Returns (state, new_tokens [max_rounds, R, γ + 1], n_new [max_rounds, R], records stacked
    [max_rounds, ...], rounds run).
    """
    _, _, t_shape, n_shape, rec_shape = jax.eval_shape(round_fn, state, carry, budget.astype(jnp.int32))
    toks = jnp.full((max_rounds,) + t_shape.shape, -1, jnp.int32)
    n_all = jnp.zeros((max_rounds,) + n_shape.shape, jnp.int32)
    recs = jax.tree_util.tree_map(lambda s: jnp.zeros((max_rounds,) + s.shape, s.dtype), rec_shape)

    def body(c):
        i, st, cr, toks, n_all, recs, left, _ = c
        st, cr, t, n, rec = round_fn(st, cr, left)
        left = left - n
        hit = jnp.any((t[:, :, None] == stop_ids[:, None, :]) & (t[:, :, None] >= 0), axis=(1, 2))  # [R]
        done = jnp.any(active & (hit | (left <= 0)))
        recs = jax.tree_util.tree_map(lambda buf, x: buf.at[i].set(x), recs, rec)
        return i + 1, st, cr, toks.at[i].set(t), n_all.at[i].set(n), recs, left, done

    c0 = (jnp.int32(0), state, carry, toks, n_all, recs, budget.astype(jnp.int32), jnp.asarray(False))
    limit = jnp.minimum(num_rounds, max_rounds)
    i, state, _, toks, n_all, recs, _, _ = jax.lax.while_loop(lambda c: (c[0] < limit) & ~c[7], body, c0)
    return state, toks, n_all, recs, i


@functools.partial(jax.jit, static_argnames=("spec", "bucket", "draft_pass", "anchors_only", "max_rounds",
                                             "keep_context"), donate_argnames=("state",))
def engine_rounds(params, draft_params, head, state: EngineState, ell: Array, active: Array, temperatures: Array,
                  budget: Array, stop_ids: Array, num_rounds: Array, *, spec: EngineSpec, bucket: int,
                  draft_pass: bool, max_rounds: int, anchors_only: bool = False, keep_context: bool = True):
    """Up to num_rounds (<= max_rounds) `engine_round`s with the same ℓ [R] in one program (a device while-loop).

    The program of `ar` and of `dspark`'s plain rounds (draft_pass=False): several rounds per dispatch and
    device-to-host copy while no request waits for a slot, else num_rounds is 1 (the same compiled
    program either way). The loop ends after the round in which an active slot commits one of its
    stop tokens (stop_ids [R, n], -1 pads) or reaches its token budget [R] (tokens it may still
    commit), so the host sees every finish at once and no slot decodes past its end. Round n of a
    request uses the same keys as with one round per call.
    keep_context: see `engine_round` (dspark's declined rounds run with False).
    Returns (state, new_tokens [max_rounds, R, γ + 1], n_new [max_rounds, R], accepted
    [max_rounds, R], rounds run).
    """
    def one(st, carry, _left):
        st, t, n, a = engine_round(params, draft_params, head, st, ell, active, temperatures, spec=spec,
                                   bucket=bucket, draft_pass=draft_pass, anchors_only=anchors_only,
                                   keep_context=keep_context)
        return st, carry, t, n, a

    return _device_loop(one, state, (), active, budget, stop_ids, num_rounds, max_rounds)


def scheduled_round(params, draft_params, head, state: EngineState, has_proposal: Array, active: Array,
                    round_sps: Array, plain_sps: Array, temperatures: Array, policy: PolicyArgs, remaining: Array,
                    waiting: Array, *, spec: EngineSpec, buckets: tuple[int, ...]):
    """One round of a device-planned policy, with no host round trip between the decision and the verify.

    The plan (`plan_round`: ℓ [R], Σ(1 + ℓ), draft_next) runs first; the smallest of the static
    `buckets` >= Σ(1 + ℓ) is chosen on device and the packed verify of that bucket runs through
    `lax.switch` (one branch per bucket, all compiled in this program); then the draft pass, or —
    `dspark` with the cost gate when drafting does not pay — only the commit of the round's context
    rows (`lax.cond`).
    The policy is traced (`PolicyArgs`), so static, mtp1, threshold, dspark and dspark-async engines
    of one shape share the compiled program. Same ℓ, keys and tokens as `plan_round` followed by
    `engine_round` at the host-picked bucket.
    Returns (state, new_tokens [R, γ + 1], n_new [R], (accepted [R], ℓ [R], Σ(1 + ℓ), drafted bool)).
    """
    k_ver, k_prop, _ = _row_keys(state)
    ell, total, draft_next = _plan(state, active, has_proposal, round_sps, plain_sps, temperatures, spec, policy,
                                   buckets, remaining, waiting)
    sizes = jnp.asarray(buckets, jnp.int32)
    which = jnp.clip(jnp.searchsorted(sizes, total), 0, len(buckets) - 1)  # smallest bucket >= total
    branches = [functools.partial(_verify_commit, spec=spec, bucket=b) for b in buckets]
    state, new_tokens, n_new, a, ctx = jax.lax.switch(which, branches, params, head, state, ell, active, k_ver)
    state = jax.lax.cond(draft_next, functools.partial(_draft_or_commit, spec=spec, draft_pass=True),
                         functools.partial(_draft_or_commit, spec=spec, draft_pass=False),
                         draft_params, head, state, ctx, active, k_prop, temperatures)
    return state, new_tokens, n_new, (a, ell, total.astype(jnp.int32), draft_next)


@functools.partial(jax.jit, static_argnames=("spec", "buckets", "max_rounds"), donate_argnames=("state",))
def scheduled_rounds(params, draft_params, head, state: EngineState, has_proposal: Array, active: Array,
                     round_sps: Array, plain_sps: Array, temperatures: Array, policy: PolicyArgs, budget: Array,
                     stop_ids: Array, num_rounds: Array, waiting: Array | int = 0, *, spec: EngineSpec,
                     buckets: tuple[int, ...], max_rounds: int):
    """Up to num_rounds (<= max_rounds) `scheduled_round`s in one program: the engine's dispatch per step
    for every drafting policy (one device-to-host copy per call), except the calls the cost gate
    declines, which go through `engine_rounds`.

    has_proposal [R] is carried on device (after a round: drafted & active); the loop ends as
    `engine_rounds`' does. Returns (state, new_tokens [max_rounds, R, γ + 1], n_new [max_rounds, R],
    (accepted [max_rounds, R], ℓ [max_rounds, R], Σ(1 + ℓ) [max_rounds], drafted [max_rounds]),
    rounds run). waiting: requests waiting for a slot or in prefill (see `_plan`).
    """
    waiting = jnp.asarray(waiting, jnp.int32)

    def one(st, has_prop, left):
        st, t, n, rec = scheduled_round(params, draft_params, head, st, has_prop, active, round_sps, plain_sps,
                                        temperatures, policy, left, waiting, spec=spec, buckets=buckets)
        return st, rec[3] & active, t, n, rec

    return _device_loop(one, state, has_proposal, active, budget, stop_ids, num_rounds, max_rounds)


@functools.partial(jax.jit, static_argnames=("spec",))
def draft_pass_only(draft_params, head, state: EngineState, *, spec: EngineSpec) -> Array:
    """The draft pass of a round over every slot with a full pending context (profiling) -> tokens [R, γ]."""
    r, g = spec.slots, spec.gamma
    k_ver, k_prop, _ = _row_keys(state)
    width = spec.dcfg.num_context_layers * spec.config.hidden_size
    pending = jnp.zeros((r, g + 1, width), dtype_of(spec.config.dtype))
    pos = state.start[:, None] + jnp.arange(g + 1, dtype=jnp.int32)[None, :]
    tokens, _, _, _ = propose_block(spec, draft_params, head, state.dcache,
                               Pending(features=pending, positions=pos, valid=jnp.ones((r, g + 1), bool)),
                               state.anchor, state.start, k_prop, state.sampling)
    return tokens
