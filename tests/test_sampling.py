"""`warp_probs` / `sample_from_probs` against independent NumPy (and transformers) references.

The allowed set of a warped distribution is recomputed from its definition in float64 NumPy:
top-k keeps every token whose (temperature-scaled) logit is >= the k-th largest (ties kept);
top-p keeps the smallest set of most likely tokens whose mass reaches p (renormalised over the
top-k survivors when both are on); probabilities are the softmax restricted to that set.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from dspark_jax.sampling import (SamplingConfig, SamplingError, SamplingMode, SamplingParams, sample_from_probs,
                                 warp_probs)

# False-alarm rate of each chi-square goodness-of-fit check below (per check, under a correct sampler).
FALSE_ALARM = 1e-4
Z_FALSE_ALARM = 3.719016485455680  # standard normal upper quantile at 1e-4


def chi2_threshold(df: int) -> float:
    """Upper 1e-4 quantile of chi-square(df), Wilson-Hilferty approximation.

    For 3 <= df <= 15 this is slightly above the exact quantile (its exceedance probability is
    7e-5 .. 9e-5), so the real false-alarm rate is at most FALSE_ALARM.
    """
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + Z_FALSE_ALARM * math.sqrt(a)) ** 3


def np_softmax_on(z: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """softmax(z) restricted to `allowed` (zeros elsewhere), float64."""
    w = np.where(allowed, np.exp(z - z[allowed].max()), 0.0)
    return w / w.sum()


def np_reference(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                 margin: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(allowed mask, probabilities) for one row of logits, from the definitions (float64).

    Asserts that no cumulative top-p mass lies within `margin` of p, so that float32 rounding in
    the implementation cannot legitimately flip the decision.
    """
    z = logits.astype(np.float64) / temperature
    v = z.shape[-1]
    allowed = np.ones(v, bool)
    if top_k > 0:
        kth = np.sort(z)[::-1][min(top_k, v) - 1]
        allowed &= z >= kth
    if top_p < 1.0:
        p = np_softmax_on(z, allowed)
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        assert np.all(np.abs(cum - top_p) > margin), "test logits too close to the top-p boundary"
        n_keep = int(np.argmax(cum >= top_p)) + 1
        allowed &= p >= p[order][n_keep - 1]
    return allowed, np_softmax_on(z, allowed)


def warp(logits, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """warp_probs with a SamplingConfig (mode + traced values), as numpy."""
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    return np.asarray(warp_probs(jnp.asarray(logits, jnp.float32), cfg.params(), cfg.mode))


def check_rows(logits: np.ndarray, got: np.ndarray, **kw) -> None:
    for row, g in zip(logits.reshape(-1, logits.shape[-1]), got.reshape(-1, got.shape[-1])):
        allowed, expected = np_reference(row, **kw)
        np.testing.assert_array_equal(g > 0, allowed)
        np.testing.assert_allclose(g, expected, rtol=2e-5, atol=1e-7)
        assert abs(g.sum() - 1.0) < 1e-5


LOGITS = np.random.RandomState(0).normal(size=(2, 3, 40)).astype(np.float32) * 3.0


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_only_is_full_softmax(temperature):
    got = warp(LOGITS, temperature)
    assert got.shape == LOGITS.shape and got.dtype == np.float32
    check_rows(LOGITS, got, temperature=temperature)
    assert np.all(got > 0)


@pytest.mark.parametrize("k", [1, 3, 10, 40, 1000])
def test_top_k(k):
    check_rows(LOGITS, warp(LOGITS, 0.8, top_k=k), temperature=0.8, top_k=k)


@pytest.mark.parametrize("k, allowed", [
    (1, {0, 2, 4}),  # three-way tie for the largest value: all kept
    (2, {0, 2, 4}),
    (3, {0, 2, 4}),
    (4, {0, 2, 3, 4, 6}),  # 4th largest is 2.0, tied twice
    (6, {0, 1, 2, 3, 4, 6}),
])
def test_top_k_keeps_ties(k, allowed):
    logits = np.asarray([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0, 2.0]], np.float32)
    got = warp(logits, 1.0, top_k=k)
    assert set(np.flatnonzero(got[0] > 0)) == allowed
    check_rows(logits, got, temperature=1.0, top_k=k)


@pytest.mark.parametrize("k, p, allowed", [
    (4, 0.999, {0, 2, 3, 4, 6}),  # the cut lands in the ties at the k-th value: all kept
    (2, 0.5, {0, 2, 4}),
    (5, 0.3, {0, 2, 4}),  # top-p inside the three-way tie for the maximum
])
def test_top_k_then_top_p_keeps_ties(k, p, allowed):
    logits = np.asarray([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0, 2.0]], np.float32)
    got = warp(logits, 1.0, top_k=k, top_p=p)
    assert set(np.flatnonzero(got[0] > 0)) == allowed
    check_rows(logits, got, temperature=1.0, top_k=k, top_p=p)


def test_top_k_bound_is_static_and_large_k_still_exact():
    """k <= 64 shares one compiled mode; larger k gets a larger power-of-two bound, same semantics."""
    assert SamplingConfig(temperature=1.0, top_k=3).mode == SamplingConfig(temperature=1.0, top_k=64).mode
    assert SamplingConfig(temperature=1.0, top_k=100).mode.top_k_bound == 128
    logits = np.random.RandomState(1).normal(size=(3, 300)).astype(np.float32)
    check_rows(logits, warp(logits, 1.1, top_k=100), temperature=1.1, top_k=100)
    check_rows(logits, warp(logits, 1.1, top_k=100, top_p=0.62), temperature=1.1, top_k=100, top_p=0.62)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.97])
def test_top_p(p):
    check_rows(LOGITS, warp(LOGITS, 1.3, top_p=p), temperature=1.3, top_p=p)


@pytest.mark.parametrize("k, p", [(5, 0.5), (5, 0.95), (20, 0.7), (2, 0.99)])
def test_top_k_then_top_p(k, p):
    check_rows(LOGITS, warp(LOGITS, 0.9, top_k=k, top_p=p), temperature=0.9, top_k=k, top_p=p)


def test_top_p_always_keeps_the_argmax():
    got = warp(LOGITS, 1.0, top_p=1e-6)
    flat = LOGITS.reshape(-1, LOGITS.shape[-1])
    np.testing.assert_array_equal(got.reshape(flat.shape), np.eye(flat.shape[-1])[flat.argmax(-1)])


@pytest.mark.parametrize("k, p", [(0, 0.8), (7, 1.0), (7, 0.8)])
def test_matches_transformers_warpers(k, p):
    """Same order and semantics as HF: temperature, top-k, top-p (on continuous logits: no ties)."""
    t = 0.7
    got = warp(LOGITS, t, top_k=k, top_p=p)
    scores = torch.from_numpy(LOGITS.reshape(-1, LOGITS.shape[-1]).copy())
    scores = TemperatureLogitsWarper(t)(None, scores)
    if k:
        scores = TopKLogitsWarper(k)(None, scores)
    if p < 1:
        scores = TopPLogitsWarper(p)(None, scores)
    ref = torch.softmax(scores, dim=-1).numpy().reshape(LOGITS.shape)
    np.testing.assert_array_equal(got > 0, ref > 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_greedy_is_one_hot_argmax():
    logits = LOGITS.copy()
    logits[0, 0, [3, 17]] = 100.0  # tie: the first index wins, like np.argmax
    cfg = SamplingConfig(temperature=0.0, top_k=5, top_p=0.5)  # top-k/p ignored when greedy
    assert cfg.mode == SamplingMode(greedy=True)
    got = np.asarray(warp_probs(jnp.asarray(logits), cfg.params(), cfg.mode))
    np.testing.assert_array_equal(got, np.eye(logits.shape[-1], dtype=np.float32)[logits.argmax(-1)])
    tokens = np.asarray(sample_from_probs(jax.random.PRNGKey(0), jnp.asarray(got), cfg.mode))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    assert tokens.dtype == np.int32


@pytest.mark.parametrize("temperature, k, p", [(1.0, 0, 1.0), (0.8, 6, 0.9)])
def test_sampler_emits_allowed_tokens_with_the_right_frequencies(temperature, k, p):
    """Many draws from one warped row: support exact, frequencies pass a chi-square test.

    Each parametrisation is one chi-square test at false-alarm rate <= FALSE_ALARM (1e-4): the
    statistic over the allowed tokens is compared with the chi-square(df = |allowed| - 1) upper
    1e-4 quantile. Fixed seed, so the outcome is deterministic.
    """
    logits = np.asarray([2.0, 1.5, 1.4, 1.0, 0.5, 0.2, -0.3, -1.0, -2.0, 3.0, 0.8, -0.1], np.float32)
    allowed, expected = np_reference(logits, temperature, k, p)
    cfg = SamplingConfig(temperature=temperature, top_k=k, top_p=p)
    n = 40_000
    probs = warp_probs(jnp.asarray(logits), cfg.params(), cfg.mode)
    draws = np.asarray(sample_from_probs(jax.random.PRNGKey(1234), jnp.broadcast_to(probs, (n, logits.size)),
                                         cfg.mode))
    assert draws.shape == (n,)
    assert set(np.unique(draws)) <= set(np.flatnonzero(allowed))  # never a disallowed token
    counts = np.bincount(draws, minlength=logits.size)[allowed]
    exp = n * expected[allowed]
    assert exp.min() >= 5  # chi-square approximation valid
    df = int(allowed.sum()) - 1
    assert df >= 3
    stat = float(np.sum((counts - exp) ** 2 / exp))
    assert stat < chi2_threshold(df), (stat, chi2_threshold(df), counts, exp)


def test_sampling_values_are_traced_not_compiled_in():
    """Changing temperature / k / p reuses the compiled program; only the mode is static."""
    traces = []

    @jax.jit
    def step(key, logits, values):
        traces.append(1)  # runs at trace time only
        probs = warp_probs(logits, values, MODE)
        return probs, sample_from_probs(key, probs, MODE)

    MODE = SamplingConfig(temperature=1.0, top_k=3, top_p=0.9).mode
    logits = jnp.asarray(LOGITS)
    for t, k, p in [(0.5, 3, 0.9), (1.7, 8, 0.5), (0.05, 40, 0.99), (3.0, 1, 0.2)]:
        cfg = SamplingConfig(temperature=t, top_k=k, top_p=p)
        assert cfg.mode == MODE
        probs, tokens = step(jax.random.PRNGKey(0), logits, cfg.params())
        check_rows(LOGITS, np.asarray(probs), temperature=t, top_k=k, top_p=p)  # the values took effect
        assert np.asarray(tokens).shape == LOGITS.shape[:-1]
    assert len(traces) == 1
    assert step._cache_size() == 1

    warp_jit = jax.jit(warp_probs, static_argnames="mode")
    for t in (0.3, 0.9, 2.0):
        cfg = SamplingConfig(temperature=t, top_k=4)
        warp_jit(logits, cfg.params(), mode=cfg.mode)
    assert warp_jit._cache_size() == 1
    warp_jit(logits, SamplingConfig().params(), mode=SamplingConfig().mode)  # greedy: a new program
    assert warp_jit._cache_size() == 2


# ------------------------------------------------------------------ per-row params, sort-free top-p
def test_top_p_keeps_ties_without_top_k():
    """Top-p alone: the cut inside a tie group keeps the whole group (same rule as with top-k)."""
    logits = np.asarray([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0, 2.0]], np.float32)
    for p, allowed in [(0.3, {0, 2, 4}), (0.6, {0, 2, 4}), (0.9, {0, 2, 3, 4, 6})]:
        got = warp(logits, 1.0, top_p=p)
        assert set(np.flatnonzero(got[0] > 0)) == allowed, p
        check_rows(logits, got, temperature=1.0, top_p=p)


@pytest.mark.parametrize("p", [0.2, 0.76, 0.8])
def test_flat_rows_take_the_exact_bisection_path(p):
    """Rows whose top-p set is larger than the 64 top_k candidates: bisection, same set as the sort
    (p = 0.2 lands near the candidate boundary: rows on both sides in one batch)."""
    rng = np.random.RandomState(3)
    logits = (rng.normal(size=(4, 500)) * 0.3).astype(np.float32)
    logits[1, 100:140] = logits[1, 7]  # a 41-way tie, one of the values the cut may land in
    cfg = SamplingConfig(temperature=1.0, top_p=p)
    got = np.asarray(warp_probs(jnp.asarray(logits), cfg.params(), cfg.mode))
    sort_mode = dataclasses.replace(cfg.mode, top_p_by_sort=True)
    by_sort = np.asarray(warp_probs(jnp.asarray(logits), cfg.params(), sort_mode))
    np.testing.assert_array_equal(got > 0, by_sort > 0)
    np.testing.assert_allclose(got, by_sort, rtol=1e-6, atol=1e-9)
    check_rows(logits, got, temperature=1.0, top_p=p)
    if p > 0.5:
        assert (got > 0).sum(-1).min() > 64  # really beyond the candidates


def test_top_p_cut_inside_a_large_tie_group():
    """The cut lands inside a tie group that straddles the 64 candidates: all of the group is kept."""
    logits = np.zeros((1, 300), np.float32)
    logits[0, :10] = 2.0
    logits[0, 10:110] = 1.0  # 100-way tie, crossing candidate index 64
    for p, n_keep in [(0.5, 110), (0.2, 110), (0.1, 10), (0.999, 300)]:
        got = warp(logits, 1.0, top_p=p)
        assert (got[0] > 0).sum() == n_keep, p
        check_rows(logits, got, temperature=1.0, top_p=p)


def test_per_row_params_equal_solo_rows():
    """One call with per-row settings (greedy, temperature, top-k, top-p, both) == each row alone."""
    rng = np.random.RandomState(4)
    logits = (rng.normal(size=(5, 2, 200)) * 2.0).astype(np.float32)
    configs = [SamplingConfig(), SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.2, top_k=9),
               SamplingConfig(temperature=0.9, top_p=0.8), SamplingConfig(temperature=1.5, top_k=100, top_p=0.6)]
    mode = SamplingMode.covering(configs)
    assert mode == SamplingMode(greedy=False, use_top_k=True, use_top_p=True, top_k_bound=128)
    assert all(mode.covers(c.mode) for c in configs)
    got = np.asarray(warp_probs(jnp.asarray(logits), SamplingParams.from_configs(configs), mode))
    for r, cfg in enumerate(configs):
        solo = np.asarray(warp_probs(jnp.asarray(logits[r]), cfg.params(), cfg.mode))
        np.testing.assert_array_equal(got[r] > 0, solo > 0)
        np.testing.assert_allclose(got[r], solo, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(got[0], np.eye(200, dtype=np.float32)[logits[0].argmax(-1)])
    # Per-row keys: a row's draws depend only on its own key.
    keys = jnp.stack([jax.random.PRNGKey(s) for s in range(5)])
    toks = np.asarray(sample_from_probs(keys, jnp.asarray(got), mode))
    for r in range(5):
        alone = np.asarray(sample_from_probs(keys[r:r + 1], jnp.asarray(got[r:r + 1]), mode))
        np.testing.assert_array_equal(toks[r], alone[0])
    np.testing.assert_array_equal(toks[0], logits[0].argmax(-1))


def test_bad_parameter_types_are_named():
    with pytest.raises(SamplingError, match=r"temperature must be a number, got str '0.5'"):
        SamplingConfig(temperature="0.5")
    with pytest.raises(SamplingError, match=r"top_k must be a non-negative integer, got 2.5"):
        SamplingConfig(temperature=1.0, top_k=2.5)
