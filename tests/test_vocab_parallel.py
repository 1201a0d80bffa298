"""Vocab-parallel sampling on one device equals `dspark_jax.sampling` (the sharded run is in test_sharding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import vocab_parallel as vp
from dspark_jax.sampling import SamplingConfig, greedy_argmax, sample_from_probs, warp_probs
from infer.verify import residual_distribution

LOGITS = jnp.asarray(np.round(np.random.RandomState(0).randn(6, 64) * 2, 1), jnp.float32)  # many ties


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 10, 0.6), (1.0, 3, 0.5), (0.5, 0, 0.3),
                                   (1.0, 0, 1.0), (0.0, 0, 1.0)])
def test_warp_probs_equals_single_device_rule(t, k, p):
    sc = SamplingConfig(temperature=t, top_k=k, top_p=p)
    ref = warp_probs(LOGITS, sc.params(), sc.mode)
    got = vp.warp_probs(LOGITS, jnp.full((6,), t), jnp.full((6,), k), jnp.full((6,), p),
                        top_k_bound=sc.mode.top_k_bound, use_top_p=sc.mode.use_top_p, all_greedy=sc.mode.greedy)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-7)
    assert np.array_equal(np.asarray(got) > 0, np.asarray(ref) > 0)


def test_per_row_parameters_equal_rows_alone():
    temps, ks, ps = [0.0, 0.8, 1.2, 1.0, 0.6, 1.0], [0, 7, 0, 0, 3, 2], [1.0, 1.0, 0.7, 1.0, 0.4, 1.0]
    mixed = vp.warp_probs(LOGITS, jnp.asarray(temps), jnp.asarray(ks), jnp.asarray(ps), top_k_bound=64,
                          use_top_p=True)
    for r, (t, k, p) in enumerate(zip(temps, ks, ps)):
        sc = SamplingConfig(temperature=t, top_k=k, top_p=p)
        np.testing.assert_allclose(np.asarray(mixed[r]), np.asarray(warp_probs(LOGITS[r], sc.params(), sc.mode)),
                                   atol=1e-7)


def test_argmax_sample_and_rejection_pieces():
    assert np.array_equal(np.asarray(vp.argmax(LOGITS)), np.asarray(greedy_argmax(LOGITS)))
    np.testing.assert_allclose(np.asarray(vp.logsumexp(LOGITS)), np.asarray(jax.nn.logsumexp(LOGITS, -1)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(vp.max_logit(LOGITS)), np.asarray(jnp.max(LOGITS, -1)))
    p_t, p_d = jax.nn.softmax(LOGITS, -1), jax.nn.softmax(LOGITS[::-1], -1)
    for seed in range(5):
        key = jax.random.PRNGKey(seed)
        mode = SamplingConfig(temperature=1.0).mode
        assert np.array_equal(np.asarray(vp.inverse_cdf(p_t, jax.random.uniform(key, p_t.shape[:-1]))), np.asarray(sample_from_probs(key, p_t, mode)))
    toks = jnp.asarray([0, 5, 63, 17, 2, 40], jnp.int32)
    np.testing.assert_array_equal(np.asarray(vp.token_probs(p_t, toks)), np.asarray(p_t[jnp.arange(6), toks]))
    np.testing.assert_allclose(np.asarray(vp.residual(p_t, p_d)), np.asarray(residual_distribution(p_t, p_d)),
                               atol=1e-7)
