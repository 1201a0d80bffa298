"""End-to-end `infer.api.generate` tests against transformers' greedy `generate()`.

The reference runs each prompt on its own, unpadded; ours decodes all prompts in one right-padded
batch with different lengths, so equality also checks per-row positions, padding and the cache.
All greedy tests share one prompt batch / `max_new_tokens` so each family compiles once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dspark_jax.sampling import SamplingConfig, SamplingError
from infer.api import GenerationError, generate, load_target_bundle
from tests.helpers import EOS_ID, load_hf_model

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [9], [40, 3, 77, 64, 31]]
MAX_NEW = 16
FAMILIES = ("qwen3", "llama")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """(our Target, the transformers reference model) for one tiny fixture checkpoint."""
    model_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    return load_target_bundle(model_dir), load_hf_model(model_dir)


def hf_greedy(model, prompt: list[int], max_new_tokens: int, stop_ids) -> list[int]:
    """transformers greedy continuation of one unpadded prompt (prompt removed).

    `stop_ids=None` disables stopping (an explicit `eos_token_id=None` overrides the checkpoint's
    generation_config); otherwise generation ends after the first token in `stop_ids`.
    """
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None if stop_ids is None else list(stop_ids), pad_token_id=2)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_batched(pair):
    target, hf = pair
    res = generate(target, PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[])
    expected = [hf_greedy(hf, p, MAX_NEW, None) for p in PROMPTS]
    assert res.token_ids == expected
    assert [len(t) for t in res.token_ids] == [MAX_NEW] * len(PROMPTS)
    assert res.metrics["tokens"] == MAX_NEW * len(PROMPTS)
    assert res.metrics["compile_s"] >= 0 and res.metrics["wall_s"] > 0
    assert res.texts is not None and len(res.texts) == len(PROMPTS)  # fixture ships a tokenizer


def test_default_stop_ids_match_transformers(pair):
    """With the checkpoint's own stop ids (generation_config eos) both sides agree as well."""
    target, hf = pair
    assert target.stop_token_ids == (EOS_ID,)
    res = generate(target, PROMPTS, max_new_tokens=MAX_NEW)
    assert res.token_ids == [hf_greedy(hf, p, MAX_NEW, [EOS_ID]) for p in PROMPTS]


def test_stop_token_ends_only_its_row(pair):
    target, hf = pair
    free = generate(target, PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[]).token_ids
    # A token that row r produces at position j < MAX_NEW - 1 and that some other row never produces.
    choice = None
    for r, row in enumerate(free):
        for j, tok in enumerate(row[:-1]):
            others = [o for o in range(len(free)) if o != r and tok not in free[o]]
            if others:
                choice = (r, j, tok, others)
                break
        if choice:
            break
    assert choice is not None, "fixture produced no usable stop token (degenerate outputs)"
    r, j, tok, others = choice
    res = generate(target, PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[tok])
    assert res.token_ids[r] == free[r][:j + 1]  # ends right after the first occurrence, stop included
    assert res.token_ids[r][-1] == tok
    for o in others:
        assert res.token_ids[o] == free[o]  # rows that never emit it run to max_new_tokens
    for o, row in enumerate(res.token_ids):  # every row is a prefix of its free run, cut at the stop
        cut = free[o].index(tok) + 1 if tok in free[o] else MAX_NEW
        assert row == free[o][:cut]
        assert row == hf_greedy(hf, PROMPTS[o], MAX_NEW, [tok])


def test_sampling_same_key_same_output_different_key_different(pair):
    target, _ = pair
    s = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95)
    a = generate(target, PROMPTS, max_new_tokens=MAX_NEW, sampling=s, seed=0, stop_token_ids=[]).token_ids
    b = generate(target, PROMPTS, max_new_tokens=MAX_NEW, sampling=s, seed=0, stop_token_ids=[]).token_ids
    c = generate(target, PROMPTS, max_new_tokens=MAX_NEW, sampling=s, seed=1, stop_token_ids=[]).token_ids
    assert a == b
    assert a != c
    assert all(len(row) == MAX_NEW for row in a + c)
    vocab = target.config.vocab_size
    assert all(0 <= t < vocab for row in a + c for t in row)


@pytest.mark.parametrize("max_new", [1, 5])
def test_max_new_tokens_respected(pair, max_new):
    target, hf = pair
    res = generate(target, PROMPTS, max_new_tokens=max_new, stop_token_ids=[])
    assert [len(t) for t in res.token_ids] == [max_new] * len(PROMPTS)
    assert res.token_ids == [hf_greedy(hf, p, max_new, None) for p in PROMPTS]


def test_prompt_up_to_the_position_limit(pair):
    """prompt + max_new_tokens == max_position_embeddings is allowed and still exact."""
    target, hf = pair
    limit = target.config.max_position_embeddings
    prompt = list(np.random.RandomState(0).randint(3, target.config.vocab_size, limit - 4))
    res = generate(target, [prompt], max_new_tokens=4, stop_token_ids=[])
    assert res.token_ids == [hf_greedy(hf, [int(t) for t in prompt], 4, None)]


# ----------------------------------------------------------------------------------- bad inputs
def test_empty_prompt_is_an_error(pair):
    target, _ = pair
    with pytest.raises(GenerationError, match=r"prompt 1 is empty"):
        generate(target, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(GenerationError, match=r"prompt 0 is empty"):
        generate(target, [""], max_new_tokens=4)
    with pytest.raises(GenerationError, match=r"no prompts"):
        generate(target, [], max_new_tokens=4)


def test_too_long_is_an_error(pair):
    target, _ = pair
    limit = target.config.max_position_embeddings
    with pytest.raises(GenerationError, match=rf"exceeds max_position_embeddings {limit}"):
        generate(target, [[1] * 10, [2, 3]], max_new_tokens=limit - 9)
    with pytest.raises(GenerationError, match=r"max_new_tokens must be >= 1"):
        generate(target, [[1, 2]], max_new_tokens=0)
    with pytest.raises(GenerationError, match=r"token id 999 outside the vocabulary"):
        generate(target, [[1, 999]], max_new_tokens=2)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(temperature=-0.5), r"temperature must be >= 0"),
    (dict(temperature=float("nan")), r"temperature must be >= 0 and finite"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(temperature=1.0, top_k=-1), r"top_k must be a non-negative integer, got -1"),
])
def test_bad_sampling_values_are_errors(kwargs, pattern):
    with pytest.raises(SamplingError, match=pattern):
        SamplingConfig(**kwargs)
    assert issubclass(SamplingError, ValueError)


def test_greedy_argmax_is_first_maximum():
    """The greedy fast path picks the same token as argmax (first index among ties)."""
    import jax.numpy as jnp

    from dspark_jax.sampling import greedy_argmax

    rng = np.random.RandomState(0)
    logits = rng.normal(size=(5, 3, 97)).astype(np.float32)
    logits[0, 0, [4, 50, 96]] = 10.0  # three-way tie -> 4
    logits[1, 2, [96]] = 10.0  # max at the last index
    logits[2, 1, :] = -3.0  # all equal -> 0
    got = np.asarray(greedy_argmax(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, logits.argmax(-1))
    assert got.dtype == np.int32 and got[0, 0] == 4 and got[1, 2] == 96 and got[2, 1] == 0
