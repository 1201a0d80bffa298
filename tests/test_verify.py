"""Rejection sampling on hand-computed distributions (spec §5.5) and metric bookkeeping (§5.6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.sampling import SamplingMode
from infer.spec_metrics import RoundStats, summarize_stats
from infer.speculative import truncate_proposal
from infer.verify import acceptance_probabilities, greedy_verify, rejection_sample, residual_distribution

SAMPLE = SamplingMode(greedy=False)
GREEDY = SamplingMode(greedy=True)
NO_STOP = jnp.asarray([-1], jnp.int32)


def test_acceptance_probabilities_by_hand():
    p_d = jnp.asarray([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    p_t = jnp.asarray([[[0.7, 0.3, 0.0], [0.6, 0.3, 0.1], [1.0, 0.0, 0.0]]])
    x = jnp.asarray([[1, 2]])
    got = np.asarray(acceptance_probabilities(x, p_d, p_t))
    np.testing.assert_allclose(got, [[0.3 / 0.5, 0.1 / 0.5]], rtol=1e-6)
    # Draft prob 0 for the token: ratio uses max(p_d, 1e-8) and caps at 1.
    got = acceptance_probabilities(jnp.asarray([[2]]), jnp.asarray([[[1.0, 0.0, 0.0]]]), p_t[:, :1] * 0 + 0.5)
    assert float(got[0, 0]) == 1.0


def test_residual_distribution_and_empty_fallback():
    p_t = jnp.asarray([0.7, 0.3, 0.0])
    p_d = jnp.asarray([0.5, 0.5, 0.0])
    np.testing.assert_allclose(residual_distribution(p_t, p_d), [1.0, 0.0, 0.0], atol=1e-7)
    # Identical distributions leave no residual mass: fall back to p_t.
    np.testing.assert_allclose(residual_distribution(p_t, p_t), p_t, atol=1e-7)


def _one_hot(i, v=4):
    return np.eye(v, dtype=np.float32)[i]


def test_greedy_accepts_matching_prefix_then_corrects():
    # target argmax chain: row0 -> 1, row1 -> 2, row2 -> 3 ; drafts [1, 2, 0]: third mismatches.
    p_t = jnp.asarray([[_one_hot(1), _one_hot(2), _one_hot(3), _one_hot(0)]])
    p_d = jnp.asarray([[_one_hot(1), _one_hot(2), _one_hot(0)]])
    res = rejection_sample(jax.random.PRNGKey(0), jnp.asarray([[1, 2, 0]]), p_d, p_t, jnp.asarray([3]),
                           NO_STOP, GREEDY)
    assert int(res.accepted[0]) == 2 and int(res.next_token[0]) == 3
    assert res.prefix_accepted.tolist() == [[True, True, False]]


def test_all_accepted_takes_bonus_from_last_row():
    p_t = jnp.asarray([[_one_hot(1), _one_hot(2), _one_hot(3)]])
    p_d = jnp.asarray([[_one_hot(1), _one_hot(2)]])
    res = rejection_sample(jax.random.PRNGKey(0), jnp.asarray([[1, 2]]), p_d, p_t, jnp.asarray([2]), NO_STOP, GREEDY)
    assert int(res.accepted[0]) == 2 and int(res.next_token[0]) == 3


def test_truncated_proposal_uses_row_n_for_bonus():
    # Only 1 of 2 drafts proposed: bonus comes from target row 1, draft slot 1 is ignored.
    p_t = jnp.asarray([[_one_hot(1), _one_hot(2), _one_hot(3)]])
    p_d = jnp.asarray([[_one_hot(1), _one_hot(0)]])
    res = rejection_sample(jax.random.PRNGKey(0), jnp.asarray([[1, 0]]), p_d, p_t, jnp.asarray([1]), NO_STOP, GREEDY)
    assert int(res.accepted[0]) == 1 and int(res.next_token[0]) == 2
    res = rejection_sample(jax.random.PRNGKey(0), jnp.asarray([[1, 0]]), p_d, p_t, jnp.asarray([0]), NO_STOP, GREEDY)
    assert int(res.accepted[0]) == 0 and int(res.next_token[0]) == 1


def test_stop_token_among_accepted_truncates_and_terminates():
    p_t = jnp.asarray([[_one_hot(1), _one_hot(2), _one_hot(3), _one_hot(0)]])
    p_d = jnp.asarray([[_one_hot(1), _one_hot(2), _one_hot(3)]])
    res = rejection_sample(jax.random.PRNGKey(0), jnp.asarray([[1, 2, 3]]), p_d, p_t, jnp.asarray([3]),
                           jnp.asarray([2, -1], jnp.int32), GREEDY)
    assert int(res.accepted[0]) == 2 and bool(res.terminated[0])
    assert res.prefix_accepted.tolist() == [[True, True, True]]


def test_greedy_verify_equals_one_hot_rejection_sampling():
    """Token-id greedy verification == rejection sampling on one-hot distributions, case by case."""
    rng = np.random.default_rng(0)
    b, k, v = 64, 5, 4  # small vocab: plenty of matching prefixes of every length
    target_tokens = rng.integers(0, v, (b, k + 1)).astype(np.int32)
    drafts = np.where(rng.random((b, k)) < 0.7, target_tokens[:, :k], rng.integers(0, v, (b, k))).astype(np.int32)
    num = rng.integers(0, k + 1, b).astype(np.int32)
    stops = jnp.asarray([3, -1], jnp.int32)
    eye = np.eye(v, dtype=np.float32)
    ref = rejection_sample(jax.random.PRNGKey(0), jnp.asarray(drafts), jnp.asarray(eye[drafts]),
                           jnp.asarray(eye[target_tokens]), jnp.asarray(num), stops, GREEDY)
    got = greedy_verify(jnp.asarray(drafts), jnp.asarray(target_tokens), jnp.asarray(num), stops)
    for field in ("accepted", "terminated", "prefix_accepted"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(ref, field)), err_msg=field)
    live = ~np.asarray(ref.terminated)  # next_token is meaningless where a stop token ended the row
    np.testing.assert_array_equal(np.asarray(got.next_token)[live], np.asarray(ref.next_token)[live])
    assert len(set(np.asarray(ref.accepted).tolist())) >= 4 and np.asarray(ref.terminated).any()


def test_single_slot_sampling_matches_target_distribution():
    """Spec §7.3's numbers: p_t = (0.7, 0.3), p_d = (0.5, 0.5): output ~ p_t; acceptance rate 0.8."""
    n = 200_000
    key_d, key_v = jax.random.split(jax.random.PRNGKey(1))
    p_d = jnp.broadcast_to(jnp.asarray([0.5, 0.5]), (n, 1, 2))
    p_t_row = jnp.asarray([0.7, 0.3])
    p_t = jnp.broadcast_to(jnp.stack([p_t_row, p_t_row]), (n, 2, 2))
    x = jax.random.categorical(key_d, jnp.log(p_d[:, 0]), axis=-1)[:, None].astype(jnp.int32)
    res = rejection_sample(key_v, x, p_d, p_t, jnp.full((n,), 1, jnp.int32), NO_STOP, SAMPLE)
    first = np.where(np.asarray(res.accepted) == 1, np.asarray(x[:, 0]), np.asarray(res.next_token))
    freq_a = float(np.mean(first == 0))
    # 5-sigma band for a binomial proportion (false alarm ~ 6e-7).
    sigma = np.sqrt(0.7 * 0.3 / n)
    assert abs(freq_a - 0.7) < 5 * sigma, freq_a
    assert abs(float(np.mean(np.asarray(res.accepted))) - 0.8) < 5 * np.sqrt(0.16 / n)


def test_truncate_proposal_rules():
    logits = jnp.log(jnp.asarray([[0.9, 0.8, 0.3, 0.9], [0.2, 0.9, 0.9, 0.9]]) /
                     (1 - jnp.asarray([[0.9, 0.8, 0.3, 0.9], [0.2, 0.9, 0.9, 0.9]])))
    assert truncate_proposal(logits, 0.0, 0.0).tolist() == [4, 4]
    assert truncate_proposal(logits, 0.5, 0.0).tolist() == [2, 0]
    # cumulative: 0.9, 0.72, 0.216 -> >= 0.5 keeps 2; row1: 0.2 -> 0
    assert truncate_proposal(logits, 0.0, 0.5).tolist() == [2, 0]
    # Per-row thresholds (traced arrays): row 0 off, row 1 confidence 0.5 / survival 0.3.
    assert truncate_proposal(logits, jnp.asarray([0.0, 0.5]), 0.0).tolist() == [4, 0]
    assert truncate_proposal(logits, 0.0, jnp.asarray([0.0, 0.3])).tolist() == [4, 0]
    # M3: STS temperatures calibrate only the survival rule; the confidence rule stays raw.
    temps = jnp.asarray([100.0, 100.0, 100.0, 100.0])  # sigmoid(logit / 100) ~ 0.5 everywhere
    assert truncate_proposal(logits, 0.5, 0.0, temps).tolist() == [2, 0]
    assert truncate_proposal(logits, 0.0, 0.2, temps).tolist() == [2, 2]


def test_round_stats_formulas():
    stats = RoundStats.zeros(2, 3)
    act = jnp.asarray([True, True])
    stats = stats.update(act, jnp.asarray([3, 3]), jnp.asarray([3, 1]), jnp.asarray([False, False]))
    stats = stats.update(act, jnp.asarray([3, 2]), jnp.asarray([0, 2]), jnp.asarray([False, True]))
    stats = stats.update(jnp.asarray([False, True]), jnp.asarray([3, 3]), jnp.asarray([3, 3]),
                         jnp.asarray([False, False]))
    m = summarize_stats(stats)
    # taus: 4, 2, 1, 2 (terminated: no bonus), 4 -> 13 over 5 rounds; proposals 3+3+3+2+3 = 14
    assert m["rounds"] == 5
    assert m["acceptance_length"] == pytest.approx(13 / 5)
    assert m["verify_rate"] == pytest.approx(13 / (14 + 5))
    # accept_rate@k: accepted >= k+1 / proposed >= k+1
    assert m["accept_rate"] == pytest.approx([4 / 5, 3 / 5, 2 / 4])
    # conditional: accepted>=k+1 / (accepted>=k & proposed>=k+1)
    assert m["conditional_accept_rate"] == pytest.approx([4 / 5, 3 / 4, 2 / 2])
