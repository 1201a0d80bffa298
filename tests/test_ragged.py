"""Packed ragged verification: layout, packed target forward vs the dense model, packed rejection
sampling vs per-row `infer.verify` on the same bits, chi-square losslessness on a tiny vocabulary."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from dspark_jax.sampling import SamplingMode, SamplingParams, warp_probs
from dspark_jax.target.kv_cache import KVCache
from dspark_jax.target.model import TargetModel
from infer.autoregressive import prefill
from infer.ragged import pack_chunks, packed_rejection_sample, packed_target_forward, pick_bucket
from infer.verify import greedy_verify, rejection_sample
from tests.spec_helpers import random_target

R, G, V_SMALL = 4, 3, 5
_rejection_sample = jax.jit(rejection_sample, static_argnames="mode")
_greedy_verify = jax.jit(greedy_verify)
_warp = jax.jit(warp_probs, static_argnames="mode")


def test_pack_chunks_layout():
    anchor = jnp.asarray([10, 20, 30, 40])
    drafts = jnp.asarray([[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]])
    ell = jnp.asarray([2, 0, 3, 1])
    start = jnp.asarray([5, 7, 0, 9])
    active = jnp.asarray([True, True, True, False])
    p = pack_chunks(anchor, drafts, ell, start, active, bucket=10)
    np.testing.assert_array_equal(p.tokens, [10, 11, 12, 20, 30, 31, 32, 33, 0, 0])
    np.testing.assert_array_equal(p.token_slot, [0, 0, 0, 1, 2, 2, 2, 2, 4, 4])
    np.testing.assert_array_equal(p.token_pos, [5, 6, 7, 7, 0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(p.token_offset, [0, 1, 2, 0, 0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(p.chunk_start, [0, 3, 4, 8])
    np.testing.assert_array_equal(p.chunk_len, [3, 1, 4, 0])
    assert pick_bucket(8, (4, 8, 16)) == 8 and pick_bucket(9, (16, 4, 8)) == 16
    try:
        pick_bucket(17, (4, 8, 16))
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "17" in str(e)


def test_packed_forward_matches_dense_verify():
    """Packed logits / taps / written cache == the dense [R, γ+1] verify rows 0..ℓ_r of each slot."""
    cfg, params = random_target(seed=3)  # default shapes: eager setup compiles shared with test_speculative
    model = TargetModel(cfg)
    s = 24
    rng = np.random.default_rng(0)
    lens = jnp.asarray([5, 9, 3, 7])
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (R, 9)), jnp.int32)
    _, cache, _ = jax.jit(functools.partial(prefill, model), static_argnums=3)(params, prompts, lens, s)
    chunk = jnp.asarray(rng.integers(0, cfg.vocab_size, (R, G + 1)), jnp.int32)
    ell = jnp.asarray([3, 0, 2, 1])
    active = jnp.asarray([True, True, True, False])
    packed = pack_chunks(chunk[:, 0], chunk[:, 1:], ell, lens, active, bucket=12)
    logits, new_cache, taps = jax.jit(functools.partial(packed_target_forward, cfg, tap_layers=(-1, 0)))(
        params, packed, cache)
    dense = jax.jit(functools.partial(model.apply, tap_layers=(-1, 0)))(
        {"params": params}, chunk, lens[:, None] + jnp.arange(G + 1)[None, :], cache)
    for r in range(3):
        n, c0 = int(ell[r]) + 1, int(packed.chunk_start[r])
        np.testing.assert_allclose(logits[c0:c0 + n], dense.logits[r, :n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(taps[1][c0:c0 + n], dense.taps[1][r, :n], rtol=1e-5, atol=1e-5)
        span = slice(int(lens[r]), int(lens[r]) + n)
        for layer in range(cfg.num_hidden_layers):
            np.testing.assert_allclose(new_cache.k[layer][r, span], dense.cache.k[layer][r, span], rtol=1e-5,
                                       atol=1e-6)
    np.testing.assert_array_equal(new_cache.k[0][3], cache.k[0][3])  # the idle slot is untouched


def _random_round(seed: int, vocab: int = V_SMALL):
    rng = np.random.default_rng(seed)
    tl = jnp.asarray(rng.normal(0, 1.5, (R, G + 1, vocab)), jnp.float32)  # target logits per slot
    dl = jnp.asarray(rng.normal(0, 1.5, (R, G, vocab)), jnp.float32)
    return tl, dl


def _row(params: SamplingParams, r) -> SamplingParams:
    return jax.tree_util.tree_map(lambda x: x[r], params)


def _packed_inputs(tl, dl, drafts, ell, params, mode):
    active = jnp.ones((R,), bool)
    packed = pack_chunks(jnp.zeros((R,), jnp.int32), drafts, ell, jnp.zeros((R,), jnp.int32), active, bucket=16)
    slot_c = jnp.minimum(packed.token_slot, R - 1)
    off = packed.token_offset
    target_logits = tl[slot_c, off]  # [T, V]
    dprobs = warp_probs(dl, params, mode)  # [R, γ, V]
    draft_probs = dprobs[slot_c, jnp.clip(off - 1, 0, G - 1)]
    return packed, target_logits, dprobs, draft_probs


def test_packed_rejection_matches_per_row_same_bits():
    mode = SamplingMode(greedy=False, use_top_k=True, use_top_p=True, top_k_bound=64)
    temps = jnp.asarray([1.0, 0.7, 1.3, 0.0])  # slot 3 greedy
    params = SamplingParams(temperature=temps, top_k=jnp.asarray([0, 3, 0, 0]), top_p=jnp.asarray([1.0, 1.0, 0.8, 1.0]))
    stop_ids = jnp.asarray([4, -1])
    run = jax.jit(functools.partial(packed_rejection_sample, mode=mode, num_draft_slots=G))
    for trial in range(6):
        tl, dl = _random_round(trial)
        keys = jax.random.split(jax.random.PRNGKey(trial), R)
        dprobs = _warp(dl, params, mode=mode)
        drafts = jax.vmap(jax.vmap(lambda k, p: jax.random.categorical(k, jnp.log(p))))(
            jax.random.split(jax.random.PRNGKey(100 + trial), (R, G)), dprobs).astype(jnp.int32)
        drafts = drafts.at[3].set(jnp.argmax(tl[3, :G], axis=-1).at[trial % G].set(trial % V_SMALL))
        ell = jnp.asarray([3, trial % 4, 2, 3])
        packed, target_logits, dprobs, draft_probs = _packed_inputs(tl, dl, drafts, ell, params, mode)
        got = run(keys, packed, target_logits, draft_probs, params, stop_ids)
        for r in range(R):
            if r == 3:
                want = _greedy_verify(drafts[r:r + 1], jnp.argmax(tl[r:r + 1], axis=-1), ell[r:r + 1], stop_ids)
            else:
                tprobs = _warp(tl[r:r + 1], _row(params, slice(r, r + 1)), mode=mode)
                want = _rejection_sample(keys[r:r + 1], drafts[r:r + 1], dprobs[r:r + 1], tprobs, ell[r:r + 1], stop_ids,
                                         mode=mode)
            for field in ("accepted", "next_token", "terminated", "prefix_accepted"):
                np.testing.assert_array_equal(getattr(got, field)[r], getattr(want, field)[0], err_msg=f"{field} {r}")


def test_packed_rejection_lossless_chi_square():
    """First committed token of every slot ~ the slot's warped target distribution."""
    n = 40_000
    mode = SamplingMode(greedy=False, use_top_k=True, top_k_bound=64)
    params = SamplingParams(temperature=jnp.asarray([1.0, 0.6, 1.5, 1.0]), top_k=jnp.asarray([0, 0, 3, 0]),
                            top_p=jnp.ones(R))
    tl, dl = _random_round(42)
    dprobs = warp_probs(dl, params, mode)
    ell = jnp.asarray([3, 1, 2, 0])

    def one(key):
        k_d, k_v = jax.random.split(key)
        drafts = jax.random.categorical(k_d, jnp.log(dprobs), axis=-1).astype(jnp.int32)  # [R, γ]
        packed, target_logits, _, draft_probs = _packed_inputs(tl, dl, drafts, ell, params, mode)
        res = packed_rejection_sample(jax.random.split(k_v, R), packed, target_logits, draft_probs, params,
                                      jnp.asarray([-1]), mode, G)
        return jnp.where(res.accepted >= 1, drafts[:, 0], res.next_token)  # [R]

    first = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(7), n)))
    for r in range(R):
        expected = np.asarray(warp_probs(tl[r:r + 1, 0], _row(params, slice(r, r + 1)), mode)[0], np.float64)
        counts = np.bincount(first[:, r], minlength=V_SMALL)
        support = expected > 0
        assert counts[~support].sum() == 0
        p = stats.chisquare(counts[support], expected[support] / expected[support].sum() * n).pvalue
        assert p > 1e-4, (r, counts, expected * n)
