"""Speculative decoding is lossless.

* Temperature 0 (float32, CPU): speculative output == target-only greedy output token for token,
  for DSpark with each head type and DFlash, block sizes 1 to 15, a batch of prompts of
  different lengths, with and without stop tokens, with confidence truncation on and off. The
  drafts are built to be right most of the time (tests/spec_helpers.py), so long accepted runs,
  the all-accepted bonus path and target-cache roll-back at every offset are exercised.
* Temperature > 0: on a tiny vocabulary the empirical distribution of 3-token continuations
  matches the target's exact (warped) distribution — chi-square test, false-alarm rate 1e-4 —
  also with top-k and top-p; a deliberately broken verifier is detected by the same test.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import infer.verify
from dspark_jax.sampling import SamplingConfig, warp_probs
from dspark_jax.target.model import TargetModel, output_kernel
from infer.api import GenerationError, Target, generate
from infer.speculative import speculative_generate
from infer.state import RowParams, SpecLoop, row_keys_from_seeds
from infer.speculative_api import Draft, lm_head_matches
from tests.spec_helpers import oracle_draft, random_target

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
MAX_NEW = 30


@pytest.fixture(scope="module")
def near_bigram():
    cfg, params = random_target(context_scale=0.03)
    target = Target(config=cfg, params=params)
    reference = generate(target, PROMPTS, max_new_tokens=MAX_NEW).token_ids
    return target, reference


# Every head at a small and (but gated) a large block; K=1 and the bundled K=7 (whose vanilla program the
# truncation tests reuse: thresholds are traced). K=15 covers every roll-back offset of the smaller blocks.
@pytest.mark.parametrize("head,block_size", [
    ("vanilla", 1), ("vanilla", 2), ("vanilla", 4), ("vanilla", 7), ("vanilla", 15),
    ("gated", 4), ("rnn", 2), ("rnn", 15), ("dflash", 1), ("dflash", 7),
])
def test_greedy_exact(near_bigram, head, block_size):
    target, reference = near_bigram
    dcfg, dp = oracle_draft(target.config, target.params, block_size=block_size, head=head)
    res = generate(target, PROMPTS, draft=Draft(config=dcfg, params=dp), max_new_tokens=MAX_NEW)
    assert res.token_ids == reference
    m = res.metrics
    assert m["rounds"] > 0 and 1.0 <= m["acceptance_length"] <= block_size + 1
    if head != "dflash" and block_size >= 4:
        # The oracle drafts must really produce long accepted runs (else the test proves little).
        assert m["accept_rate"][block_size - 1] > 0.3, m["accept_rate"]
    # Block sizes below the checkpoint's also work with the same draft (and stop tokens: traced, no recompile).
    stop = reference[0][MAX_NEW // 2]
    res_stop = generate(target, PROMPTS, draft=Draft(config=dcfg, params=dp), max_new_tokens=MAX_NEW,
                        stop_token_ids=[stop])
    ref_stop = generate(target, PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[stop]).token_ids
    assert res_stop.token_ids == ref_stop
    assert ref_stop[0][-1] == stop and len(ref_stop[0]) <= MAX_NEW // 2 + 1


@pytest.mark.parametrize("threshold_kind", ["confidence", "survival"])
def test_greedy_exact_with_confidence_truncation(near_bigram, threshold_kind):
    target, reference = near_bigram
    dcfg, dp = oracle_draft(target.config, target.params, block_size=7, head="vanilla")
    # Random confidence weights: sigmoid(conf) spreads around 0.5, so truncation varies per round.
    dp["confidence_head"]["proj"]["kernel"] = jax.random.normal(jax.random.PRNGKey(5),
                                                                dp["confidence_head"]["proj"]["kernel"].shape) * 0.5
    kw = {"confidence_threshold": 0.5} if threshold_kind == "confidence" else {"survival_threshold": 0.3}
    res = generate(target, PROMPTS, draft=Draft(config=dcfg, params=dp), max_new_tokens=MAX_NEW, **kw)
    assert res.token_ids == reference
    m = res.metrics
    assert 0 < m["draft_tokens_per_proposal"] < 7  # truncation really happened, and not always to 0


@pytest.mark.parametrize("tied", [False, True])
def test_output_kernel_gives_the_same_logits(tied):
    """The [d, V] kernel the decode loops lay out once equals the model's own output layer."""
    cfg, params = random_target(seed=4)
    if tied:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
        params = {k: v for k, v in params.items() if k != "lm_head"}
    model = TargetModel(cfg)
    toks = jnp.asarray([[3, 1, 4, 1, 5]], jnp.int32)
    pos = jnp.arange(5, dtype=jnp.int32)[None]
    ref = model.apply({"params": params}, toks, pos).logits
    got = model.apply({"params": params}, toks, pos, lm_head_kernel=output_kernel(cfg, params)).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_lm_head_changes_nothing(near_bigram, temperature):
    """A draft whose frozen LM head is the target's runs on the target's kernel: same tokens, same stats."""
    target, _ = near_bigram
    dcfg, dp = oracle_draft(target.config, target.params, block_size=4, head="vanilla")
    assert lm_head_matches(dp, target)
    other = {**dp, "lm_head": {"kernel": dp["lm_head"]["kernel"] * 1.5}}
    assert not lm_head_matches(other, target)
    kw = dict(max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=temperature), seed=3)
    own = generate(target, PROMPTS, draft=Draft(config=dcfg, params=dp), **kw)
    shared = generate(target, PROMPTS, draft=Draft(config=dcfg, params=dp, shares_target_lm_head=True), **kw)
    assert shared.token_ids == own.token_ids
    assert shared.metrics["acceptance_length"] == own.metrics["acceptance_length"]


def test_bad_speculative_options(near_bigram):
    target, _ = near_bigram
    dcfg, dp = oracle_draft(target.config, target.params, block_size=4, head="vanilla")
    draft = Draft(config=dcfg, params=dp)
    with pytest.raises(GenerationError, match="block size 5 must be in"):
        generate(target, PROMPTS, draft=draft, max_new_tokens=4, block_size=5)
    with pytest.raises(GenerationError, match="block_size must be an integer >= 1"):
        generate(target, PROMPTS, draft=draft, max_new_tokens=4, block_size=0)
    # A prompt that leaves no room for a round within the model's positions.
    with pytest.raises(GenerationError, match="exceeds max_position_embeddings 512"):
        generate(target, [[1] * 512], draft=draft, max_new_tokens=1)


# ---------------------------------------------------------------------------------------------
# Distributional losslessness at temperature > 0.

VOCAB = 8
N_NEW = 3
PROMPT = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny_vocab():
    cfg, params = random_target(vocab=VOCAB, layers=2, hidden=16, weight_scale=3.0, seed=3, max_pos=64)
    return cfg, params


def exact_distribution(cfg, params, sampling: SamplingConfig) -> np.ndarray:
    """P(x1 x2 x3 | prompt) under the warped target, by enumerating all VOCAB**3 continuations."""
    seqs = np.asarray(list(itertools.product(range(VOCAB), repeat=N_NEW)), np.int32)  # [V^3, 3]
    toks = np.concatenate([np.tile(PROMPT, (len(seqs), 1)), seqs], axis=1)
    pos = np.broadcast_to(np.arange(toks.shape[1]), toks.shape)
    logits = TargetModel(cfg).apply({"params": params}, jnp.asarray(toks), jnp.asarray(pos)).logits
    probs = np.asarray(warp_probs(logits, sampling.params(), sampling.mode), np.float64)
    p = np.ones(len(seqs))
    for i in range(N_NEW):
        p *= probs[np.arange(len(seqs)), len(PROMPT) - 1 + i, seqs[:, i]]
    return p


def sample_continuations(cfg, params, dcfg, dp, sampling: SamplingConfig, n_rows: int, seeds) -> np.ndarray:
    tokens = jnp.asarray(np.tile(np.asarray(PROMPT + [0] * 12, np.int32), (n_rows, 1)))
    lengths = jnp.full((n_rows,), len(PROMPT), jnp.int32)
    counts = np.zeros(VOCAB ** N_NEW)
    loop = SpecLoop(target=cfg, draft=dcfg, block_size=dcfg.block_size, mode=sampling.mode, max_new_tokens=N_NEW,
                    cache_len=64)
    for seed in seeds:
        rows = RowParams.build([sampling] * n_rows, row_keys_from_seeds(seed, n_rows), [-1], N_NEW)
        out, num, stats, _, nonfinite = speculative_generate(params, dp, None, tokens, lengths, rows, loop=loop)
        out = np.asarray(out)
        assert not np.asarray(nonfinite).any()
        assert (np.asarray(num) == N_NEW).all()
        idx = (out[:, 0] * VOCAB + out[:, 1]) * VOCAB + out[:, 2]
        counts += np.bincount(idx, minlength=VOCAB ** N_NEW)
        accepted = int(np.asarray(stats.accepted_sum).sum())
        assert accepted > n_rows // 10, "drafts must sometimes be accepted to exercise that path"
    return counts


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    return float(scipy.stats.chi2.sf(stat, keep.sum() - 1))


SAMPLINGS = {
    "temperature": SamplingConfig(temperature=1.0),
    "top_k": SamplingConfig(temperature=0.8, top_k=3),
    "top_p": SamplingConfig(temperature=1.2, top_p=0.8),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_sampled_output_has_target_distribution(tiny_vocab, name):
    cfg, params = tiny_vocab
    sampling = SAMPLINGS[name]
    dcfg, dp = oracle_draft(cfg, params, block_size=2, head="vanilla", strength=2.0)
    counts = sample_continuations(cfg, params, dcfg, dp, sampling, n_rows=6000, seeds=(0, 1, 2))
    probs = exact_distribution(cfg, params, sampling)
    assert counts[probs == 0].sum() == 0, "emitted a continuation the warped target forbids"
    p = chi_square_pvalue(counts, probs)
    assert p > 1e-4, f"sampled distribution differs from the target's (p={p:.2e})"


def test_broken_verifier_is_detected(tiny_vocab, monkeypatch):
    """Sampling the correction from p_t instead of the residual biases the output: the test must see it."""
    cfg, params = tiny_vocab
    sampling = SAMPLINGS["temperature"]
    dcfg, dp = oracle_draft(cfg, params, block_size=2, head="vanilla", strength=2.0)
    monkeypatch.setattr(infer.verify, "residual_distribution", lambda p_t, p_d: p_t)
    speculative_generate.clear_cache()
    try:
        counts = sample_continuations(cfg, params, dcfg, dp, sampling, n_rows=6000, seeds=(0, 1, 2))
    finally:
        monkeypatch.undo()
        speculative_generate.clear_cache()
    p = chi_square_pvalue(counts, exact_distribution(cfg, params, sampling))
    assert p < 1e-4, f"broken verifier not detected (p={p:.2e})"
