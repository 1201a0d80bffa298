"""Continuous-batching engine: losslessness under scheduling (every policy, requests joining and
leaving), chunked prefill, sampled-output distribution, streaming, bad input and faults. Tiny shapes,
shared compiles: one temperature-mode engine program set (greedy requests verify on token ids) serves
the greedy, chunked-prefill, sampled and streaming tests; every engine prefills in chunks of 4."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dspark_jax.sampling import SamplingConfig
from dspark_jax.target.model import TargetModel
from infer.api import Target, generate
from infer.cost_model import SPSProfile
from infer.engine import Engine, EngineError, Request
from infer.engine.prefill import prefill_buckets, prefill_chunk
from infer.speculative_api import Draft
from tests.spec_helpers import oracle_draft, random_target

# Default random_target shapes (as tests/test_speculative.py) so the eager setup compiles are shared.
SLOTS, MAX_LEN, BUCKETS, STOP, REF_NEW = 3, 48, (4, 15), 47, 16
CHUNK = 4  # prefill chunk of every engine here: prompts of 1-13 tokens take 1-4 chunks, two prefill programs
FLAT = SPSProfile(buckets=BUCKETS, verify_s=(1.0, 1.05), draft_s=0.1)  # accelerator-like: drafting pays
CPU = SPSProfile(buckets=BUCKETS, verify_s=(1.0, 2.8), draft_s=1.0)  # drafting never pays


@pytest.fixture(scope="module")
def pair():
    cfg, params = random_target(context_scale=0.03)
    dcfg, dp = oracle_draft(cfg, params, block_size=4)
    return Target(config=cfg, params=params, stop_token_ids=(STOP,)), Draft(config=dcfg, params=dp)


_SOLO: dict[tuple, list[int]] = {}


def solo(target: Target, prompt, max_new: int) -> list[int]:
    """Solo greedy autoregressive output (one compile: prompts padded to 16, REF_NEW tokens, cut)."""
    key = (id(target.params), tuple(prompt))
    if key not in _SOLO:  # prompts bucket to 16 and REF_NEW is fixed: one compiled program
        _SOLO[key] = generate(target, [list(prompt)], max_new_tokens=REF_NEW, stop_token_ids=[STOP]).token_ids[0]
    assert max_new <= REF_NEW
    return _SOLO[key][:max_new]


PROMPTS = [[3, 9, 4], [7, 1, 8, 2, 6, 5, 9], [12, 13], [20, 4, 44, 9, 10], [2, 30, 17, 5]]
MAX_NEW = [14, 9, 12, 6, 11]


@pytest.mark.parametrize("policy,profile", [("ar", FLAT), ("static:2", FLAT), ("mtp1", FLAT), ("threshold", FLAT),
                                            ("dspark", FLAT), ("dspark", CPU), ("dspark-async", FLAT),
                                            ("dspark-async", CPU)])
def test_greedy_equals_solo_autoregressive(pair, policy, profile):
    """Each request's greedy output == its solo greedy AR output, whatever else runs and when it joined."""
    target, draft = pair
    # Greedy requests in the serving default "temperature" engine (the programs the sampled test reuses);
    # `ar` (no drafter: its own programs anyway) runs the greedy-only engine.
    eng = Engine(target, draft, policy=policy, slots=SLOTS, max_len=MAX_LEN, buckets=BUCKETS, sps_profile=profile,
                 sampling="greedy" if policy == "ar" else "temperature", prefill_chunk=CHUNK)
    ids = [eng.submit(PROMPTS[0], max_new_tokens=MAX_NEW[0]), eng.submit(PROMPTS[1], max_new_tokens=MAX_NEW[1])]
    eng.step()
    eng.step()
    ids += [eng.submit(p, max_new_tokens=m) for p, m in zip(PROMPTS[2:], MAX_NEW[2:])]
    for _ in eng.run():
        pass
    for rid, p, m in zip(ids, PROMPTS, MAX_NEW):
        out = eng.result(rid)
        assert out.token_ids == solo(target, p, m), (policy, rid)
        assert out.finish_reason == ("stop" if out.token_ids[-1] == STOP else "length")
    met = eng.metrics()
    assert met["queue_length"] == 0 and met["active"] == 0
    if policy in ("static:2", "dspark") and profile is FLAT:
        assert met["mean_verify_budget"] > 1.5 and met["tau"] > 1.2, met  # drafts verified and accepted
    if profile is CPU:
        assert met["draft_passes"] < met["rounds"] / 2 and met["mean_verify_budget"] < 1.3, met
        assert met["plain_rounds"] > 0, met  # declined rounds ran through the plain (`engine_rounds`) program


def test_drafts_capped_by_the_tokens_a_request_may_still_commit(pair):
    """ℓ <= remaining − 1: a round commits at most ℓ + 1 tokens and those past max_new_tokens are discarded,
    so verifying more drafts is waste (static:2 used to verify 2 drafts for a request with one token left)."""
    target, draft = pair
    eng = Engine(target, draft, policy="static:2", slots=SLOTS, max_len=MAX_LEN, buckets=BUCKETS, sps_profile=FLAT,
                 prefill_chunk=CHUNK)
    one_left, two_left, many = (eng.submit(PROMPTS[0], max_new_tokens=2), eng.submit(PROMPTS[1], max_new_tokens=3),
                                eng.submit(PROMPTS[2], max_new_tokens=12))
    for _ in eng.run():
        pass
    outs = {rid: eng.result(rid) for rid in (one_left, two_left, many)}
    for rid, p, m in ((one_left, PROMPTS[0], 2), (two_left, PROMPTS[1], 3), (many, PROMPTS[2], 12)):
        assert outs[rid].token_ids == solo(target, p, m)
    assert outs[one_left].metrics["drafts_verified"] == 0, outs[one_left].metrics  # 1 token left after prefill
    assert outs[two_left].metrics["drafts_verified"] <= 1, outs[two_left].metrics
    assert outs[many].metrics["drafts_verified"] >= 2, outs[many].metrics  # the cap leaves other requests alone


def test_gate_margin_declines_a_marginal_gain(pair):
    """The cost gate drafts only when the drafted round is predicted (1 + gate_margin)x as fast as plain
    decoding: on the accelerator-like FLAT profile drafting pays (see above) but not 6x, so a margin of
    5 declines it; outputs stay the solo greedy ones. A negative margin is refused."""
    target, draft = pair
    eng = Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, buckets=BUCKETS, sps_profile=FLAT,
                 prefill_chunk=CHUNK, gate_margin=5.0)
    ids = [eng.submit(p, max_new_tokens=m) for p, m in zip(PROMPTS[:3], MAX_NEW[:3])]
    for _ in eng.run():
        pass
    for rid, p, m in zip(ids, PROMPTS, MAX_NEW):
        assert eng.result(rid).token_ids == solo(target, p, m)
    met = eng.metrics()
    assert met["mean_verify_budget"] < 1.3 and met["plain_rounds"] > 0, met
    with pytest.raises(EngineError, match="gate_margin must be in"):
        Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, gate_margin=-0.5)


def test_declined_gate_reconsiders_when_a_request_joins(pair, monkeypatch):
    """After dspark's gate declines, plain rounds skip the plan until something changes; a request that
    starts decoding is a change even when it takes a finished request's slot (same number of slots in
    use). Counted: one plan per request that joins, under a profile where the gate always declines."""
    import infer.engine.engine as engine_module

    target, draft = pair
    plans = []
    real = engine_module.plan_round
    monkeypatch.setattr(engine_module, "plan_round", lambda *a, **k: plans.append(1) or real(*a, **k))
    eng = Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, buckets=BUCKETS, sps_profile=CPU,
                 prefill_chunk=CHUNK)
    ids = [eng.submit(p, max_new_tokens=m)  # the short ones free their slots for the queued ones
           for p, m in zip(PROMPTS[2:] + [[5, 6], [8, 9, 10], [11, 3]], [2, 12, 3, 2, 12])]
    windows, planned = [], []
    while eng.has_work():
        t0, n0 = time.perf_counter(), len(plans)
        eng.step()
        windows.append((t0, time.perf_counter()))
        planned.append(len(plans) > n0)
    starts = [eng.result(i).metrics["ttft_s"] + eng._done[i].submitted for i in ids]
    join_steps = [k for k, (a, b) in enumerate(windows) if any(a <= t <= b for t in starts)]
    assert eng.metrics()["plain_rounds"] > 0 and len(join_steps) >= 3
    assert all(planned[k] for k in join_steps), (join_steps, planned)


def test_gate_weighs_drafting_against_plain_decoding_at_the_waiting_load(pair, monkeypatch):
    """With requests waiting for a slot or in prefill, dspark's gate compares a drafted round at today's load
    with plain decoding at the load once they are admitted (min(R, active + waiting)): a drafted round's
    time delays their admission. Profile: every verify 1 s, draft pass 0.5 s; one active slot whose mean
    survivals sum to 3 gives a drafted round (1 + 3) / 1.5 = 2.67 tokens/s, against plain 1, 2, 3 tokens/s
    for 1, 2, 3 requests (margin 0.1): pays with 0 or 1 waiting, not with 2 (nor 5, capped at R = 3).
    The engine passes the prefilling and queued requests."""
    import infer.engine.engine as engine_module
    from infer.engine.core import plan_round

    target, draft = pair
    prof = SPSProfile(buckets=BUCKETS, verify_s=(1.0, 1.0), draft_s=0.5)
    eng = Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, buckets=BUCKETS, sps_profile=prof,
                 prefill_chunk=CHUNK)
    st = eng.state.replace(surv_mean=jnp.asarray([0.9, 0.8, 0.7, 0.6]), surv_seen=jnp.int32(1))
    args = (jnp.asarray([True, False, False]), jnp.zeros((SLOTS,), bool), *eng._tables[False], eng._temps,
            jnp.full((SLOTS,), 10, jnp.int32))
    kw = dict(spec=eng.spec, policy=eng.policy, buckets=eng.buckets)
    assert [bool(plan_round(st, *args, jnp.int32(w), **kw)[2]) for w in (0, 1, 2, 5)] == [True, True, False, False]

    seen = []
    real = engine_module.plan_round
    monkeypatch.setattr(engine_module, "plan_round", lambda *a, **k: seen.append(int(a[7])) or real(*a, **k))
    eng = Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, buckets=BUCKETS, sps_profile=CPU,
                 prefill_chunk=CHUNK)
    long = [1 + i % 40 for i in range(13)]  # four chunks of 4: prefilled over four steps
    ids = [eng.submit(PROMPTS[2], max_new_tokens=12), eng.submit(long, max_new_tokens=4),
           eng.submit(long[::-1], max_new_tokens=4), eng.submit(PROMPTS[0], max_new_tokens=3)]
    for _ in eng.run():
        pass
    assert seen[0] == 3 and 0 in seen, seen  # 2 prefilling + 1 queued while the first request decodes
    # the engine's device copies of small host values are keyed by shape too (a [1] budget is not a scalar)
    assert eng._on_device(np.int32(1)).shape == () and eng._on_device(np.ones(1, np.int32)).shape == (1,)
    assert eng.result(ids[0]).token_ids == solo(target, PROMPTS[2], 12)


@pytest.mark.parametrize("probe_every", [1, 0])
def test_declined_gate_probes_joining_requests(pair, probe_every):
    """A decline under an unchanged load would last for good: nothing drafts, so the running mean survival
    the gate reads never moves. Every `probe_every`-th request that starts decoding while the gate declines
    drafts its first block and folds its survivals into the mean. Here a hard stretch is forced (every
    survival hopeless) under the FLAT profile, where drafting pays: with probes, later requests draft
    again; with probe_every=0 the engine stays plain. Outputs equal solo greedy decoding either way."""
    target, draft = pair
    eng = Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, buckets=BUCKETS, sps_profile=FLAT,
                 prefill_chunk=CHUNK, probe_every=probe_every)
    first = eng.submit(PROMPTS[1], max_new_tokens=REF_NEW)
    eng.step()
    st = eng.state
    eng.state = st.replace(surv_mean=jnp.zeros_like(st.surv_mean), surv_seen=jnp.int32(1),
                           prop_conf=jnp.full_like(st.prop_conf, -30.0))
    eng.step()  # the gate declines: nothing verified, no draft pass
    assert eng._declined is not None, eng.metrics()
    passes = eng.metrics()["draft_passes"]
    ids = []
    for p in PROMPTS[2:]:  # one at a time, each joining a declined engine
        ids.append(eng.submit(p, max_new_tokens=6))
        for _ in eng.run():
            pass
    met = eng.metrics()
    if probe_every:
        assert met["probes"] >= 1 and met["draft_passes"] > passes, met
    else:
        assert met["probes"] == 0 and met["draft_passes"] == passes, met
    assert eng.result(first).token_ids == solo(target, PROMPTS[1], REF_NEW)
    assert [eng.result(i).token_ids for i in ids] == [solo(target, p, 6) for p in PROMPTS[2:]]
    with pytest.raises(EngineError, match="probe_every must be"):
        Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, probe_every=-1)


def test_gate_reads_the_running_mean_survival_not_the_latest_proposals(pair):
    """dspark's gate decides from the engine's running mean survival (`EngineState.surv_mean`): the latest
    proposals may be stale (no slot drafts while the gate declines, so a gate reading them never changed
    its mind) or one request's hard stretch. Here every slot's latest proposal is made hopeless (survival
    ~0): the gate still says drafting pays on the FLAT profile, and declines when the mean is hopeless."""
    from infer.engine.core import plan_round

    target, draft = pair
    eng = Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, buckets=BUCKETS, sps_profile=FLAT,
                 prefill_chunk=CHUNK)
    ids = [eng.submit(p, max_new_tokens=m) for p, m in zip(PROMPTS[:3], MAX_NEW[:3])]
    for _ in range(3):
        eng.step()
    st = eng.state
    assert int(st.surv_seen) > 0 and float(st.surv_mean[0]) > 0.2, st.surv_mean
    hopeless = st.replace(prop_conf=jnp.full_like(st.prop_conf, -30.0))
    args = (jnp.ones((SLOTS,), bool), jnp.zeros((SLOTS,), bool), *eng._tables[False], eng._temps,
            jnp.full((SLOTS,), 10, jnp.int32))
    kw = dict(spec=eng.spec, policy=eng.policy, buckets=eng.buckets)
    assert bool(plan_round(hopeless, *args, **kw)[2])  # draft_next: the mean says drafting pays
    assert not bool(plan_round(hopeless.replace(surv_mean=jnp.zeros_like(st.surv_mean)), *args, **kw)[2])
    for _ in eng.run():
        pass
    assert [eng.result(i).token_ids for i in ids] == [solo(target, p, m) for p, m in zip(PROMPTS, MAX_NEW[:3])]


def test_drafting_resumes_with_the_draft_context_rebuilt(pair):
    """While dspark's cost gate declines drafting, plain rounds are ar's rounds (no draft-context commit);
    when drafting resumes, the skipped context is rebuilt from the target cache first: the draft context
    then equals that of an engine that drafted every round (to float rounding), and the output still
    equals solo greedy decoding."""
    target, draft = pair
    prompt = next(p for p in PROMPTS if len(solo(target, p, REF_NEW)) == REF_NEW)  # no stop within 16
    engines = {}
    for name, profile in (("drafting", FLAT), ("gated", CPU)):
        eng = engines[name] = Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, buckets=BUCKETS,
                                     sps_profile=profile, sampling="temperature", prefill_chunk=CHUNK, multi_round=2)
        rid = eng.submit(prompt, max_new_tokens=REF_NEW)
        if name == "gated":
            for _ in range(4):  # prefill, then declined rounds: the first scheduled, the rest plain
                eng.step()
            met = eng.metrics()
            assert met["plain_rounds"] >= 2 and met["draft_passes"] == 0, met
            eng.set_profile(FLAT)  # drafting pays from now on: the next round drafts from the kept context
        for _ in eng.run():
            pass
        assert eng.result(rid).token_ids == solo(target, prompt, REF_NEW), name
    gated = engines["gated"].metrics()
    assert gated["draft_passes"] > 0 and gated["mean_verify_budget"] > 1.0, gated
    assert gated["context_rebuilt"] >= 2, gated  # at least the tokens of the plain rounds
    caches = [engines[n].state.dcache for n in ("drafting", "gated")]
    n = int(min(c.lengths[0] for c in caches))
    assert n >= len(prompt) + REF_NEW - 2 * (draft.config.block_size + 1), n
    for kd, kg in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        np.testing.assert_allclose(np.asarray(kd[0, :n], np.float32), np.asarray(kg[0, :n], np.float32),
                                   rtol=1e-5, atol=1e-5)


def test_chunked_prefill_long_prompt_while_others_decode(pair):
    """A prompt of several chunks is prefilled over several steps while another request decodes; both equal
    their solo greedy output; prefill compiles one program per chunk size (not per prompt length)."""
    target, draft = pair
    eng = Engine(target, draft, policy="mtp1", slots=SLOTS, max_len=MAX_LEN, sampling="temperature", buckets=BUCKETS,
                 sps_profile=FLAT, prefill_chunk=CHUNK)  # mtp1: <= 2 tokens a round, so `short` outlives the prefill
    compiled_before = prefill_chunk._cache_size()
    short_prompt = next(p for p in PROMPTS if len(solo(target, p, REF_NEW)) == REF_NEW)  # no stop within 16
    short = eng.submit(short_prompt, max_new_tokens=REF_NEW)
    long_prompt = [5, 17, 3, 28, 9, 11, 40, 2, 6, 33, 21, 8, 14]  # 13 tokens: chunks 4 + 4 + 4 + 1
    long = eng.submit(long_prompt, max_new_tokens=12)
    eng.step()  # both get a slot; the step's prefill budget (4 tokens) goes to the older `short`, which decodes
    assert eng.num_prefilling == 1 and eng._live[long].prefilled == 0
    seen = len(eng._live[short].tokens)
    assert seen >= 2  # first token + one round (one round per step while `long` waits: multi_round)
    for _ in range(3):  # three full chunks, one per step; the short request decodes in each of them
        eng.step()
        assert eng.num_prefilling == 1 and len(eng._live[long].tokens) == 0
        assert len(eng._live[short].tokens) > seen
        seen = len(eng._live[short].tokens)
    eng.step()  # the last chunk: the long request streams its first token and decodes from now on
    assert eng.num_prefilling == 0 and len(eng._live[long].tokens) >= 1
    # Another length, still the same two prefill programs (full chunk, padded last chunk).
    other = eng.submit(PROMPTS[1], max_new_tokens=MAX_NEW[1])
    for _ in eng.run():
        pass
    assert eng.result(short).token_ids == solo(target, short_prompt, REF_NEW)
    assert eng.result(long).token_ids == solo(target, long_prompt, 12)
    assert eng.result(other).token_ids == solo(target, PROMPTS[1], MAX_NEW[1])
    assert eng.metrics()["prefill_chunks"] == -(-len(short_prompt) // CHUNK) + 4 + 2
    assert prefill_chunk._cache_size() - compiled_before <= len(prefill_buckets(CHUNK)) + 1 == 2
    with pytest.raises(EngineError, match="prefill_chunk"):
        Engine(target, draft, prefill_chunk=0)


def test_sampled_distribution_with_requests_joining_and_leaving(pair):
    """First two tokens of sampled requests ~ the target's exact joint distribution (chi-square)."""
    target, draft = pair
    cfg, params, temp, v = target.config, target.params, 1.0, target.config.vocab_size
    prompt = [1, 4, 2]
    # Exact joint P(t1, t2) = softmax(z1 / T)[t1] * softmax(z2(t1) / T)[t2].
    seqs = jnp.asarray([prompt + [t] for t in range(v)], jnp.int32)
    logits = jax.jit(TargetModel(cfg).apply)({"params": params}, seqs, jnp.broadcast_to(jnp.arange(4), (v, 4))).logits
    p1 = np.asarray(jax.nn.softmax(logits[0, 2] / temp), np.float64)
    joint = p1[:, None] * np.asarray(jax.nn.softmax(logits[:, 3] / temp, axis=-1), np.float64)

    eng = Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, sampling="temperature",
                 buckets=BUCKETS, sps_profile=FLAT, prefill_chunk=CHUNK)
    rng = np.random.default_rng(0)
    reqs, measured = [], []
    for i in range(360):
        if i % 3 == 2:  # fillers of random length (some greedy) make slots churn
            reqs.append(Request(prompt=rng.integers(0, v, int(rng.integers(1, 6))).tolist(),
                                max_new_tokens=int(rng.integers(1, 7)),
                                sampling=SamplingConfig(temperature=float(rng.choice([0.0, 0.7, 1.0]))), seed=i))
        else:
            measured.append(len(reqs))
            reqs.append(Request(prompt=prompt, max_new_tokens=2, sampling=SamplingConfig(temperature=temp), seed=i,
                                stop_token_ids=()))
    outs = eng.generate(reqs)
    counts = np.zeros((v, v))
    for j in measured:
        t1, t2 = outs[j].token_ids
        counts[t1, t2] += 1
    # Marginals of t1 (prefill) and t2 (a packed verify round with drafts), cells < 5 expected merged.
    for obs_full, p in ((counts.sum(1), joint.sum(1)), (counts.sum(0), joint.sum(0))):
        exp = p / p.sum() * obs_full.sum()
        big = exp >= 5
        assert big.sum() >= 3  # enough cells for a meaningful test
        obs = np.append(obs_full[big], obs_full[~big].sum())
        exp = np.append(exp[big], exp[~big].sum())
        exp *= obs.sum() / exp.sum()  # exact float sums for scipy
        assert stats.chisquare(obs, exp).pvalue > 1e-3, (obs, exp)
    assert eng.metrics()["tau"] > 1.0  # drafts were accepted on the way


def test_streaming_cancel_and_bad_input(pair):
    target, draft = pair
    eng = Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, sampling="temperature", buckets=BUCKETS,
                 sps_profile=FLAT, max_queue=2, prefill_chunk=CHUNK)
    with pytest.raises(EngineError, match="too long"):
        eng.submit(list(range(1, 40)), max_new_tokens=20)
    greedy_only = Engine(target, draft, policy="dspark", slots=SLOTS, max_len=MAX_LEN, sampling="greedy",
                         buckets=BUCKETS, sps_profile=FLAT)  # refuses at submit: nothing compiled
    with pytest.raises(EngineError, match="temperature"):
        greedy_only.submit([1, 2], max_new_tokens=4, sampling=SamplingConfig(temperature=0.5))
    with pytest.raises(EngineError, match="top_k"):
        eng.submit([1, 2], max_new_tokens=4, sampling=SamplingConfig(temperature=0.5, top_k=5))
    with pytest.raises(EngineError, match="outside the vocabulary"):
        eng.submit([1, 99], max_new_tokens=4)
    with pytest.raises(EngineError, match="max_new_tokens"):
        eng.submit([1, 2], max_new_tokens=0)
    with pytest.raises(EngineError, match="SamplingConfig"):
        eng.submit([1, 2], max_new_tokens=4, sampling={"temperature": 0.0})
    with pytest.raises(ValueError, match="unknown policy"):
        Engine(target, draft, policy="fastest")
    with pytest.raises(EngineError, match="needs a draft"):
        Engine(target, None, policy="dspark")

    a = eng.submit(PROMPTS[0], max_new_tokens=MAX_NEW[0])
    b = eng.submit(PROMPTS[1], max_new_tokens=MAX_NEW[1])
    with pytest.raises(EngineError, match="queue full"):
        eng.submit(PROMPTS[2], max_new_tokens=4)
    streamed = [t for chunk in eng.stream(a) for t in chunk]
    assert streamed == eng.result(a).token_ids == solo(target, PROMPTS[0], MAX_NEW[0])

    long = [p for p in PROMPTS if len(solo(target, p, REF_NEW)) == REF_NEW][:2]  # no stop within 16 tokens
    c = eng.submit(long[0], max_new_tokens=REF_NEW)
    d = eng.submit(long[-1], max_new_tokens=REF_NEW)
    eng.step()  # both admitted; one round commits at most 1 + γ tokens each: both still running
    assert eng.num_active == 2
    eng.cancel(c)  # frees its slot at once
    assert eng.num_active == 1 and eng.result(c).finish_reason == "cancelled"
    # One request's post-processing fails: it ends with an error, the others keep their tokens.
    e = eng.submit(PROMPTS[2], max_new_tokens=MAX_NEW[2])
    eng._live[d].stops = _Exploding()
    for _ in eng.run():
        pass
    assert eng.result(d).finish_reason == "error" and "boom" in eng.result(d).error
    assert eng.result(b).token_ids == solo(target, PROMPTS[1], MAX_NEW[1])
    assert eng.result(e).token_ids == solo(target, PROMPTS[2], MAX_NEW[2])


class _Exploding(frozenset):
    def __contains__(self, item):
        raise RuntimeError("boom")
