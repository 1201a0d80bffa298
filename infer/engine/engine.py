"""Host side of the continuous-batching speculative engine: requests, queue, slots, streaming, metrics.

    engine = Engine(target, draft, policy="dspark", slots=8)
    rid = engine.submit("def fib(n):", max_new_tokens=64, sampling=SamplingConfig(temperature=0.7), seed=1)
    for delta in engine.stream(rid):          # committed tokens as they arrive
        ...
    outs = engine.generate([Request(prompt=[1, 2, 3], max_new_tokens=16), ...])   # offline

Each `step()` admits queued requests into free slots (prefill + first draft, while the others keep
their state), runs one packed verify round over the active slots (`infer.engine.core`) and hands
every request its committed tokens; a request finishes at its first stop token or at its
max_new_tokens, and its slot is free for the next one in the same step. Per request: TTFT, time per
output token, rounds, verified drafts, τ (tokens per round). Per engine: rounds, mean verify
budget (1 + ℓ per request per round), queue length, throughput.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import itertools
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import kernels
from dspark_jax.sampling import SamplingConfig, SamplingMode
from infer.cost_model import RoundCostModel, SPSProfile, profile_sps
from infer.engine import core
from infer.engine.core import (EngineSpec, EngineState, Policy, draft_pass_only, engine_rounds, parse_policy,
                               plan_round, scheduled_rounds)
from infer.engine.prefill import prefill_buckets, prefill_chunk
from infer.ragged import pick_bucket

__all__ = ["Engine", "EngineError", "Request", "RequestOutput", "default_token_buckets"]


class EngineError(ValueError):
    """A request or engine setting the engine cannot serve (names the problem)."""


@dataclasses.dataclass
class Request:
    """One generation request: prompt (text or token ids), limits, sampling, seed, stop tokens."""

    prompt: str | Sequence[int]
    max_new_tokens: int = 64
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    seed: int = 0
    stop_token_ids: Sequence[int] | None = None  # None: the target's stop tokens
    request_id: str | None = None


@dataclasses.dataclass
class RequestOutput:
    """Tokens committed so far (`new_token_ids`: those of the latest step) and, once finished, why."""

    request_id: str
    token_ids: list[int]
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Live:
    request_id: str
    ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    seed: int
    stops: frozenset[int]
    submitted: float
    tokens: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the slot's cache (chunked prefill)
    first_token_at: float | None = None
    finished_at: float | None = None
    rounds: int = 0
    drafts_verified: int = 0
    accepted: int = 0
    finish_reason: str | None = None
    error: str | None = None

    def metrics(self) -> dict[str, Any]:
        n = len(self.tokens)
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted
        tpot = None
        if self.finished_at is not None and self.first_token_at is not None and n > 1:
            tpot = (self.finished_at - self.first_token_at) / (n - 1)
        return {"ttft_s": ttft, "tpot_s": tpot, "rounds": self.rounds, "drafts_verified": self.drafts_verified,
                "accepted": self.accepted, "tau": (self.accepted + self.rounds) / self.rounds if self.rounds else None,
                "mean_verify_budget": 1 + self.drafts_verified / self.rounds if self.rounds else None}


# Fingerprint of the device programs the profile times (`infer/engine/core.py`), part of the profile's cache key.
_ENGINE_PROGRAM = hashlib.sha256(inspect.getsource(core).encode()).hexdigest()[:12]


def default_token_buckets(slots: int, gamma: int) -> tuple[int, ...]:
    """Powers of two up to slots·(γ + 1), plus slots·(γ + 1) itself (one compiled round each)."""
    top = slots * (gamma + 1)
    out, b = [], 1
    while b < top:
        out.append(b)
        b *= 2
    return tuple(sorted(set(out + [top])))


class Engine:
    """Continuous-batching speculative engine over `slots` fixed slots (see the module docstring).

    target: `infer.api.Target`; draft: `infer.speculative_api.Draft` (None only with policy "ar");
    policy: ar | static:K | mtp1 | threshold[:C] | dspark | dspark-async; max_len: tokens per slot
    (prompt + max_new_tokens + γ + 1 must fit; default the target's max positions); sampling:
    "greedy" (greedy requests only), "temperature" (default: greedy or temperature sampling) or
    "full" (also per-request top-k <= 256 / top-p); buckets: verify token buckets; sps_profile: an
    `SPSProfile` for the scheduler (measured by `profile()` when None and the policy needs it; a
    flat table until then); max_queue: queued requests beyond which `submit` refuses; backend:
    target attention kernels per `dspark_jax.kernels` ("xla" default | "pallas" | "auto");
    prefill_chunk: prompts are prefilled in chunks of this many tokens, at most this many prompt
    tokens per `step()` (a long prompt spreads over several steps while the other slots decode;
    prefill compiles one program per `prefill_buckets(prefill_chunk)` size, whatever the prompts);
    multi_round: with no request waiting for a slot, one `step()` runs up to this many rounds in one
    device loop (`core.scheduled_rounds`, which plans ℓ and picks the token bucket on device every
    round; `core.engine_rounds` for ar and for the gate's declined calls; it stops at the first stop
    token / token limit of any slot), cutting the per-round dispatch and copy; 1 = one round per step.
    cost_gate / gate_margin (dspark, dspark-async): decline drafting unless the whole-round cost model
    predicts the best drafted round at least (1 + gate_margin)× as fast as plain decoding — at the load
    once the requests waiting for a slot or in prefill are admitted — (default 0.1: on this CPU the
    profile's run-to-run spread is about ±10 %; 0 on a quiet accelerator if you trust it). Declined
    rounds are `ar`'s rounds (no draft-context upkeep); the skipped context is rebuilt before a slot
    drafts again. probe_every: while the gate declines, every probe_every-th request that starts decoding
    drafts its first block anyway and folds its survivals into the gate's running mean (0: never), so
    a decline can end without a change of load.
    """

    def __init__(self, target, draft=None, *, policy: str = "dspark", slots: int = 4, max_len: int | None = None,
                 sampling: str = "temperature", buckets: Sequence[int] | None = None,
                 sps_profile: SPSProfile | None = None, max_queue: int = 256, cost_gate: bool = True,
                 gate_margin: float = Policy.gate_margin,
                 backend: str = "xla", prefill_chunk: int = 256, multi_round: int = 8, probe_every: int = 8):
        if slots < 1:
            raise EngineError(f"slots must be >= 1, got {slots}")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise EngineError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        if not isinstance(multi_round, int) or multi_round < 1:
            raise EngineError(f"multi_round must be a positive integer, got {multi_round!r}")
        if not isinstance(probe_every, int) or probe_every < 0:
            raise EngineError(f"probe_every must be a non-negative integer, got {probe_every!r}")
        self.prefill_chunk, self.multi_round, self.probe_every = prefill_chunk, multi_round, probe_every
        self._prefill_sizes = prefill_buckets(prefill_chunk)
        gamma = 0 if draft is None else draft.config.block_size
        if not 0.0 <= float(gate_margin) < 10.0:
            raise EngineError(f"gate_margin must be in [0, 10), got {gate_margin!r}")
        self.policy = dataclasses.replace(parse_policy(policy, gamma), cost_gate=cost_gate,
                                          gate_margin=float(gate_margin))
        if self.policy.drafts and draft is None:
            raise EngineError(f"policy {policy!r} needs a draft model")
        if not self.policy.drafts:
            draft, gamma = None, 0
        if draft is not None and getattr(draft.config, "chain_drafter", False):
            raise EngineError("the engine serves block drafters (DSpark/DFlash); Eagle-3 chain drafters run "
                              "through generate() for now")
        if self.policy.kind == "threshold" and draft is not None and not draft.config.enable_confidence_head:
            raise EngineError(f"policy {policy!r} needs a drafter with a confidence head")
        modes = {"greedy": SamplingMode(greedy=True), "temperature": SamplingMode(greedy=False),
                 "full": SamplingMode(greedy=False, use_top_k=True, use_top_p=True, top_k_bound=256)}
        if sampling not in modes:
            raise EngineError(f"sampling must be one of {sorted(modes)}, got {sampling!r}")
        self.sampling_kind = sampling
        cfg = target.config
        max_len = int(max_len or cfg.max_position_embeddings)
        cache_len = -(-max_len // 16) * 16
        self.spec = EngineSpec(config=cfg, dcfg=None if draft is None else draft.config, slots=int(slots),
                               cache_len=cache_len, gamma=gamma, mode=modes[sampling],
                               share_lm_head=bool(draft is not None and draft.shares_target_lm_head),
                               backend=kernels.resolve_backend(backend))
        self.target, self.draft = target, draft
        from dspark_jax.target.model import output_kernel

        self._head = output_kernel(cfg, target.params)
        self._dparams = None if draft is None else draft.params
        self.buckets = tuple(sorted(set(int(b) for b in (buckets or default_token_buckets(slots, gamma)))))
        if self.buckets[-1] < slots * (gamma + 1):
            raise EngineError(f"largest token bucket {self.buckets[-1]} < slots x (gamma + 1) = {slots * (gamma + 1)}")
        temps = None if draft is None else draft.temperatures
        self._temps = jnp.asarray(temps[:gamma] if temps else np.ones(max(gamma, 1)), jnp.float32)
        self.max_queue = int(max_queue)
        self._policy_args = self.policy.device_args() if self.policy.drafts else None
        self.state = EngineState.create(self.spec)
        self._active = np.zeros(slots, bool)  # slots decoding (prefill done)
        self._has_prop = np.zeros(slots, bool)  # proposal drafted after the slot's last commit
        # Position from which the slot's draft context is missing (-1: complete): the gate's declined rounds
        # skip the context commit, and `_rebuild_context` fills it in before the slot drafts again.
        self._ctx_from = np.full(slots, -1, np.int64)
        self._slot_req: list[_Live | None] = [None] * slots  # the request holding each slot (prefilling or active)
        self._queue: collections.deque[_Live] = collections.deque()
        self._live: dict[str, _Live] = {}
        self._done: dict[str, _Live] = {}
        self._ids = itertools.count()
        self._device_arrays: dict[tuple, jax.Array] = {}  # see `_on_device`
        self.set_profile(sps_profile or SPSProfile(buckets=self.buckets, verify_s=tuple(1.0 for _ in self.buckets),
                                                   draft_s=0.0))
        self.stats = {"rounds": 0, "verify_tokens": 0, "request_rounds": 0, "committed": 0, "round_s": 0.0,
                      "plan_s": 0.0, "draft_passes": 0, "plain_rounds": 0, "prefill_chunks": 0, "prefill_s": 0.0,
                      "context_rebuilt": 0, "rebuild_s": 0.0, "probes": 0}

    # ------------------------------------------------------------------ scheduling tables
    def set_profile(self, profile: SPSProfile) -> None:
        """Use `profile` (SPS(B) and the draft pass) in the scheduler and the cost model."""
        self.sps_profile = profile
        # (drafted, plain) round SPS tables for one round per call and for `multi_round` rounds per call
        # (the per-call overhead `call_s` shared by the rounds of a device loop), keyed by "several".
        model = RoundCostModel(profile)
        self._tables = {False: model.tables(1), True: model.tables(self.multi_round)}
        self._declined = None  # (slots in use, several, plain-decoding load) of the gate's last decline (`step`)
        self._declined_joins = 0  # requests that started decoding while the gate declined (`_prefill_next_chunk`)
        self._joined = False  # a request started decoding since the last round (see `step`)

    def profile(self, *, cache_dir: str | None = None, repeats: int = 5, refresh: bool = False) -> SPSProfile:
        """Time the engine's verify round (its `engine_rounds` program, no draft pass) at every bucket, the
        per-call overhead (one vs `multi_round` rounds in one call) and the draft pass (the same
        `multi_round`-round program with a draft pass in every round, minus the one without, or one drafted
        round with every slot active minus the plain one, whichever is smaller); use it.

        Cached on disk (`infer.cost_model.profile_sps`). Runs on scratch states: live requests are kept.
        """
        r, g = self.spec.slots, self.spec.gamma
        holder = [EngineState.create(self.spec)]  # one scratch state for every bucket (donated and carried)
        budget, no_stops = jnp.full((r,), 1 << 30, jnp.int32), jnp.full((r, 1), -1, jnp.int32)

        def verify_at(bucket, rounds=1, draft_pass=False):
            act = jnp.arange(r) < min(bucket, r)
            extra = max(bucket - r, 0)  # drafts spread over the slots to fill the bucket exactly
            ell = jnp.clip(extra // r + (jnp.arange(r) < extra % r), 0, g).astype(jnp.int32)

            def run():  # the state is donated: carry it, with positions reset so every call is alike
                st, toks, _, _, _ = engine_rounds(self.target.params, self._dparams, self._head, holder[0], ell, act,
                                                  self._temps, budget, no_stops, jnp.int32(rounds), spec=self.spec,
                                                  bucket=bucket, draft_pass=draft_pass, anchors_only=extra == 0,
                                                  max_rounds=self.multi_round, keep_context=draft_pass)
                holder[0] = st.replace(start=jnp.zeros_like(st.start))
                return toks

            return run

        # The same program running multi_round rounds in one call: measures the per-call overhead (call_s);
        # and with the draft pass in every round: the draft pass's cost inside the round program.
        rounds = (verify_at(self.buckets[0], self.multi_round), self.multi_round) if self.multi_round >= 2 else None
        draft = draft_rounds = draft_at = None
        if g > 0 and rounds is not None:
            draft_rounds = verify_at(self.buckets[0], self.multi_round, draft_pass=True)
            full = pick_bucket(r, self.buckets)  # every slot active: one drafted round vs the plain one
            draft_at = (verify_at(full, 1, draft_pass=True), full)
        elif g > 0:  # one round per call: the draft-only program
            scratch = EngineState.create(self.spec)
            draft = lambda: draft_pass_only(self._dparams, self._head, scratch, spec=self.spec)  # noqa: E731
        fields = {"model": self.target.path or repr(self.spec.config), "draft": getattr(self.draft, "path", None),
                  "slots": r, "cache_len": self.spec.cache_len, "gamma": g, "mode": repr(self.spec.mode),
                  "dtype": self.spec.config.dtype, "multi_round": self.multi_round,
                  "engine_program": _ENGINE_PROGRAM}  # a changed round program re-measures the cache
        prof = profile_sps(verify_at, self.buckets, fields=fields, draft=draft, rounds=rounds,
                           draft_rounds=draft_rounds, draft_at=draft_at, repeats=repeats, cache_dir=cache_dir,
                           refresh=refresh)
        self.set_profile(prof)
        return prof

    # ------------------------------------------------------------------ requests
    def _validate(self, req: Request) -> _Live:
        cfg = self.spec.config
        if isinstance(req.prompt, str):
            if self.target.tokenizer is None:
                raise EngineError("string prompts need a tokenizer.json in the target directory; pass token ids")
            ids = list(self.target.tokenizer.encode(req.prompt))
        else:
            ids = [int(t) for t in req.prompt]
        if not ids:
            raise EngineError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise EngineError(f"prompt token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        if not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be a positive integer, got {req.max_new_tokens!r}")
        need = len(ids) + req.max_new_tokens + self.spec.gamma + 1
        if need > self.spec.cache_len:
            raise EngineError(f"request too long: prompt {len(ids)} + max_new_tokens {req.max_new_tokens} + "
                              f"{self.spec.gamma + 1} verify tokens = {need} > slot capacity {self.spec.cache_len}")
        s = req.sampling
        if not isinstance(s, SamplingConfig):
            raise EngineError(f"sampling must be a SamplingConfig, got {type(s).__name__}")
        if self.spec.mode.greedy and s.temperature > 0:
            raise EngineError("this engine was built with sampling='greedy'; temperature > 0 needs 'temperature'")
        if not self.spec.mode.covers(s.mode):
            raise EngineError(f"top_k {s.top_k} / top_p {s.top_p} need an engine built with sampling='full' "
                              f"(top_k <= {self.spec.mode.top_k_bound or 256})")
        if not isinstance(req.seed, int) or not 0 <= req.seed < 2 ** 32:
            raise EngineError(f"seed must be an integer in [0, 2^32), got {req.seed!r}")
        stops = self.target.stop_token_ids if req.stop_token_ids is None else req.stop_token_ids
        rid = req.request_id or f"req-{next(self._ids)}"
        if rid in self._live:
            raise EngineError(f"request id {rid!r} is already in the engine")
        return _Live(request_id=rid, ids=ids, max_new_tokens=req.max_new_tokens, sampling=s, seed=req.seed,
                     stops=frozenset(int(t) for t in stops), submitted=time.perf_counter())

    def submit(self, prompt: str | Sequence[int] | Request, **kwargs) -> str:
        """Queue a request (a `Request`, or a prompt plus `Request` fields); returns its id.

        Raises EngineError (naming the problem) for invalid requests or when the queue is full; the
        engine keeps serving the others.
        """
        req = prompt if isinstance(prompt, Request) else Request(prompt=prompt, **kwargs)
        if len(self._queue) >= self.max_queue:
            raise EngineError(f"queue full ({self.max_queue} requests waiting)")
        live = self._validate(req)
        self._queue.append(live)
        self._live[live.request_id] = live
        return live.request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request now; its slot is free for the next step."""
        live = self._live.get(request_id)
        if live is None:
            return
        if live.slot is None:
            self._queue.remove(live)
        self._finish(live, "cancelled")

    @property
    def queue_length(self) -> int:
        """Requests waiting for a slot."""
        return len(self._queue)

    @property
    def num_active(self) -> int:
        """Requests holding a slot (decoding or still prefilling)."""
        return sum(r is not None for r in self._slot_req)

    @property
    def num_prefilling(self) -> int:
        """Requests whose prompt is still being prefilled."""
        return sum(r is not None for r in self._slot_req) - int(self._active.sum())

    def _finish(self, live: _Live, reason: str, error: str | None = None) -> None:
        live.finish_reason, live.error, live.finished_at = reason, error, time.perf_counter()
        if live.slot is not None:
            self._active[live.slot] = False
            self._slot_req[live.slot] = None
            live.slot = None
        self._live.pop(live.request_id, None)
        self._done[live.request_id] = live

    def _output(self, live: _Live, new: list[int]) -> RequestOutput:
        return RequestOutput(request_id=live.request_id, token_ids=list(live.tokens), new_token_ids=new,
                             finished=live.finish_reason is not None, finish_reason=live.finish_reason,
                             error=live.error, metrics=live.metrics())

    def _accept_tokens(self, live: _Live, toks: Sequence[int]) -> list[int]:
        """Append committed tokens up to the first stop token / the token limit; finish if reached."""
        new = []
        for t in toks:
            new.append(int(t))
            live.tokens.append(int(t))
            if int(t) in live.stops:
                self._finish(live, "stop")
                break
            if len(live.tokens) >= live.max_new_tokens:
                self._finish(live, "length")
                break
        return new

    def _admit(self, outputs: list[RequestOutput]) -> None:
        """Give free slots to queued requests, then prefill up to `prefill_chunk` prompt tokens.

        Chunks go to the oldest prefilling request first; at least one chunk runs per step. A request
        starts decoding (and streams its first token) after its last chunk.
        """
        for slot in range(self.spec.slots):
            if self._slot_req[slot] is None and self._queue:
                live = self._queue.popleft()
                live.slot, live.prefilled = slot, 0
                self._slot_req[slot] = live
        budget = self.prefill_chunk
        prefilling = sorted((r for r in self._slot_req if r is not None and not self._active[r.slot]),
                            key=lambda r: r.submitted)
        for live in prefilling:
            while budget > 0 and live.prefilled < len(live.ids):
                budget -= self._prefill_next_chunk(live, outputs)
            if budget <= 0:
                break

    def _prefill_next_chunk(self, live: _Live, outputs: list[RequestOutput]) -> int:
        """Run `live`'s next prefill chunk; returns its padded size (tokens of prefill work)."""
        slot, c0 = live.slot, live.prefilled
        n = min(self.prefill_chunk, len(live.ids) - c0)
        last = c0 + n == len(live.ids)
        size = next(b for b in self._prefill_sizes if b >= n) if last else self.prefill_chunk
        # While the cost gate declines drafting, a joining request drafts no first block (the plan would not
        # verify it, and the first round that drafts proposes for every slot), except every `probe_every`-th:
        # its first block is a probe of the workload, folded into the running mean survival the gate reads.
        # Nothing else drafts while the gate declines, so without probes a decline under an unchanged load
        # (say, one hard stretch at concurrency 1) would last for good.
        propose = self.spec.gamma > 0 and self._declined is None
        probe = False
        if last and self.spec.gamma > 0 and self._declined is not None and self.probe_every:
            self._declined_joins += 1
            probe = propose = self._declined_joins % self.probe_every == 0
        first = self._run_prefill_chunk(live, live.ids, c0, n, size, self._on_device(np.bool_(probe)), last=last,
                                        propose=propose)
        self.stats["probes"] += int(probe)
        live.prefilled = c0 + n
        self.stats["prefill_chunks"] += 1
        if not last:
            return size
        self._active[slot] = True
        self._has_prop[slot] = propose
        self._ctx_from[slot] = -1  # the prompt's context is committed
        self._joined = True
        first = int(first)
        live.first_token_at = time.perf_counter()
        try:
            new = self._accept_tokens(live, [first])
        except Exception as e:  # noqa: BLE001 - one request's failure must not lose the others
            self._finish(live, "error", f"{type(e).__name__}: {e}")
            new = []
        outputs.append(self._output(live, new))
        return size

    def step(self) -> list[RequestOutput]:
        """Admit waiting requests, run one round (or several: `multi_round`); one output per request that changed."""
        outputs: list[RequestOutput] = []
        t_admit = time.perf_counter()
        self._admit(outputs)
        self.stats["prefill_s"] += time.perf_counter() - t_admit
        if not self._active.any():
            return outputs
        g = self.spec.gamma
        active = self._on_device(self._active)
        t0 = time.perf_counter()
        several = self.num_prefilling == 0 and not self._queue  # nobody waits: several rounds per dispatch
        n_rounds = jnp.int32(self.multi_round if several else 1)
        # The cost gate declined drafting in the last round, and nothing it decides from has changed
        # since (no slot holds a proposal, as many slots in use, no request started decoding, same SPS
        # tables): it would decline again, so run plain rounds through the cheaper `engine_rounds`
        # program (no plan, no bucket switch). A request that started decoding re-opens the question
        # even when it took a finished request's slot: otherwise one decline (say, on a hard stretch of
        # one request at concurrency 1) held every later request in that slot to plain decoding.
        round_sps, plain_sps = self._tables[several]
        limits = self._limits()  # (token budget left [R], stop ids [R, n]) for the plan and the round
        n_active = int(self._active.sum())
        # Requests waiting for a slot or in prefill: the gate weighs a drafted round against plain
        # decoding at the load they bring (`core._plan`), so the decline is keyed by it too.
        waiting = min(self.num_prefilling + len(self._queue), self.spec.slots)
        load = (n_active, several, min(n_active + waiting, self.spec.slots))
        plain = (g == 0 or (self._declined == load and not self._has_prop.any() and not self._joined))
        self._joined = False
        if not plain and self.policy.gated:
            # The load changed, a request started decoding or a slot holds a proposal: ask the plan first
            # (a small program and a read of ℓ [R]). When it verifies no drafts and declines drafting, every round
            # of the call would be plain, so it runs through `engine_rounds` as above: the scheduled
            # program's `lax.switch` over the token buckets costs more than the plan's round trip.
            ell, _, draft_next = jax.device_get(plan_round(
                self.state, active, self._on_device(self._has_prop), round_sps, plain_sps, self._temps,
                limits[0], self._on_device(np.int32(waiting)), spec=self.spec, policy=self.policy,
                buckets=self.buckets))
            # Declined with drafts to verify (held proposals, e.g. a probe's): verify them only when no slot's
            # draft context needs rebuilding first (that costs a target pass over every gap); else drop them.
            if not draft_next and (not ell.any() or (self._ctx_from[self._active] >= 0).any()):
                plain, self._declined = True, load
        if plain:  # ar, or the gate's plain rounds: one verify token per slot, no draft pass
            ell_host = np.zeros(self.spec.slots, np.int32)
            total = int(self._active.sum())
            # The gate's declined rounds are ar's rounds: not even the draft context is committed (on this CPU that
            # upkeep cost 5 % of a plain round at 64 slots). The slots' context is rebuilt when they draft again.
            for slot in np.flatnonzero(self._active & (self._ctx_from < 0)) if g else ():
                live = self._slot_req[slot]
                self._ctx_from[slot] = len(live.ids) + len(live.tokens) - 1  # the anchor's position
            t1 = time.perf_counter()
            self.state, toks, n_new, acc, n_done = engine_rounds(
                self.target.params, self._dparams, self._head, self.state, self._on_device(ell_host), active,
                self._temps, *limits, n_rounds, spec=self.spec, bucket=pick_bucket(total, self.buckets),
                draft_pass=False, anchors_only=True, max_rounds=self.multi_round, keep_context=False)
            toks, n_new, acc, n_done = jax.device_get((toks, n_new, acc, n_done))
            n_done = int(n_done)
            ells, totals, drafted = [ell_host] * n_done, [total] * n_done, [False] * n_done
            self.stats["plain_rounds"] += n_done if g else 0
        else:  # plan, bucket and draft decision on device, inside the round: one dispatch, one read
            t_rebuild = time.perf_counter()
            self._rebuild_context()  # timed in stats["rebuild_s"], not in the scheduler's plan_s
            t0 += time.perf_counter() - t_rebuild
            t1 = time.perf_counter()
            self.state, toks, n_new, (acc, ells, totals, drafted), n_done = scheduled_rounds(
                self.target.params, self._dparams, self._head, self.state, self._on_device(self._has_prop), active,
                round_sps, plain_sps, self._temps, self._policy_args, *limits, n_rounds,
                self._on_device(np.int32(waiting)), spec=self.spec, buckets=self.buckets, max_rounds=self.multi_round)
            toks, n_new, acc, n_done, ells, totals, drafted = jax.device_get((toks, n_new, acc, n_done, ells, totals,
                                                                              drafted))
            n_done = int(n_done)
            drafted = [bool(d) and g > 0 for d in drafted[:n_done]]
            declined = self.policy.gated and n_done > 0 and not drafted[-1]
            self._declined = load if declined else None
        t2 = time.perf_counter()
        if n_done:  # a slot holds a proposal iff the last round drafted (held-back context is tracked on device)
            self._has_prop[:] = drafted[n_done - 1] & self._active
        self.stats["plan_s"] += t1 - t0
        self.stats["round_s"] += t2 - t1
        rounds = [(toks[j], n_new[j], acc[j], ells[j], totals[j], drafted[j]) for j in range(n_done)]
        fresh: dict[int, tuple[_Live, list[int]]] = {}  # slot -> (request, tokens committed this step)
        for new_tokens, n_new, acc, ell_host, total, draft_pass in rounds:
            self.stats["draft_passes"] += int(draft_pass)
            self.stats["rounds"] += 1
            self.stats["verify_tokens"] += int(total)
            self.stats["request_rounds"] += int(self._active.sum())
            for slot in np.flatnonzero(self._active):
                live = self._slot_req[slot]
                try:
                    live.rounds += 1
                    live.drafts_verified += int(ell_host[slot])
                    live.accepted += int(acc[slot])
                    new = self._accept_tokens(live, new_tokens[slot, :n_new[slot]].tolist())
                    self.stats["committed"] += len(new)
                except Exception as e:  # noqa: BLE001 - isolate one request's post-processing failure
                    self._finish(live, "error", f"{type(e).__name__}: {e}")
                    new = []
                fresh.setdefault(int(slot), (live, []))[1].extend(new)
        outputs += [self._output(live, new) for live, new in fresh.values()]
        return outputs

    def _run_prefill_chunk(self, live: _Live, seq: Sequence[int], c0: int, n: int, size: int, probe, *,
                           last: bool, propose: bool = True, context_only: bool = False) -> jax.Array:
        """`prefill_chunk` over seq[c0 : c0 + n] (padded to `size`) in `live`'s slot; returns its first token."""
        chunk = np.zeros((1, size), np.int32)
        chunk[0, :n] = seq[c0:c0 + n]
        self.state, first = prefill_chunk(
            self.target.params, self._dparams, self._head, self.state, jnp.int32(live.slot), jnp.asarray(chunk),
            jnp.int32(c0), jnp.int32(n), live.sampling.params(), jax.random.PRNGKey(live.seed),
            self._temps if self.spec.gamma > 0 else None, probe, spec=self.spec, last=last, propose=propose,
            context_only=context_only)
        return first

    def _rebuild_context(self) -> None:
        """Commit the draft context that the gate's declined rounds skipped, for every active slot missing some.

        The tokens from `_ctx_from[slot]` to the anchor are in the target cache; their target features are
        recomputed in prefill-sized chunks (`prefill_chunk(context_only=True)`) and committed to the slot's
        draft cache, so the draft pass sees every committed token (as if the context had been committed
        round by round; equal up to float rounding).
        """
        t0 = time.perf_counter()
        for slot in np.flatnonzero(self._active & (self._ctx_from >= 0)):
            live = self._slot_req[slot]
            seq = list(live.ids) + live.tokens
            c0, end = int(self._ctx_from[slot]), len(seq) - 1  # the anchor (seq[-1]) is not in the cache yet
            while c0 < end:
                n = min(self.prefill_chunk, end - c0)
                size = next(b for b in self._prefill_sizes if b >= n)
                self._run_prefill_chunk(live, seq, c0, n, size, self._on_device(np.bool_(False)), last=False,
                                        context_only=True)
                self.stats["context_rebuilt"] += n
                c0 += n
            self._ctx_from[slot] = -1
        self.stats["rebuild_s"] += time.perf_counter() - t0

    def _limits(self) -> tuple[jax.Array, jax.Array]:
        """(token budget [R] left per slot, stop ids [R, n] with -1 pads) of the decoding requests."""
        r = self.spec.slots
        stops = [sorted(self._slot_req[s].stops) if self._active[s] else [] for s in range(r)]
        width = 1
        while width < max(len(x) for x in stops):
            width *= 2  # power-of-two widths: few compiled variants
        stop_ids = np.full((r, width), -1, np.int32)
        budget = np.full((r,), 1 << 30, np.int32)
        for s in np.flatnonzero(self._active):
            stop_ids[s, :len(stops[s])] = stops[s]
            budget[s] = self._slot_req[s].max_new_tokens - len(self._slot_req[s].tokens)
        return self._on_device(budget), self._on_device(stop_ids)

    def _on_device(self, host: np.ndarray) -> jax.Array:
        """A device copy of a small per-slot mask / count array, reused while its value repeats (no transfer)."""
        key = (host.dtype.str, host.shape, host.tobytes())
        arr = self._device_arrays.get(key)
        if arr is None:
            if len(self._device_arrays) > 256:
                self._device_arrays.clear()
            arr = self._device_arrays[key] = jnp.asarray(host.copy())  # a private copy: `host` is mutated later
        return arr

    # ------------------------------------------------------------------ driving
    def has_work(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self._queue) or any(r is not None for r in self._slot_req)

    def run(self) -> Iterator[RequestOutput]:
        """Step until idle, yielding every request update."""
        while self.has_work():
            yield from self.step()

    def stream(self, request_id: str) -> Iterator[list[int]]:
        """Yield `request_id`'s newly committed tokens until it finishes (drives the whole engine)."""
        done = self._done.get(request_id)
        if done is not None:
            yield list(done.tokens)
            return
        if request_id not in self._live:
            raise EngineError(f"unknown request id {request_id!r}")
        while request_id in self._live:
            for out in self.step():
                if out.request_id == request_id and out.new_token_ids:
                    yield out.new_token_ids

    def result(self, request_id: str) -> RequestOutput:
        """The finished request's output (EngineError while it is still running)."""
        live = self._done.get(request_id)
        if live is None:
            raise EngineError(f"request {request_id!r} has not finished")
        return self._output(live, [])

    def generate(self, requests: Sequence[Request | dict]) -> list[RequestOutput]:
        """Offline: submit every request (as slots free up), run to completion, outputs in order."""
        reqs = [r if isinstance(r, Request) else Request(**r) for r in requests]
        ids = []
        pending = collections.deque(reqs)
        while pending or self.has_work():
            while pending and len(self._queue) < self.max_queue:
                ids.append(self.submit(pending.popleft()))
            self.step()
        return [self.result(i) for i in ids]

    def metrics(self) -> dict[str, Any]:
        """Engine counters: rounds, verify tokens, mean verify budget per request-round, τ, timings."""
        s = self.stats
        rr = max(s["request_rounds"], 1)
        return {**s, "mean_verify_budget": s["verify_tokens"] / rr, "tau": s["committed"] / rr,
                "queue_length": self.queue_length, "active": self.num_active,
                "scheduler_share": s["plan_s"] / max(s["plan_s"] + s["round_s"], 1e-12)}
