"""Python API footguns (issue 10 #7): arguments are checked by name and type with messages that say what was
expected; a str prompt is one prompt; no float is truncated into a token id or size; the compile cache is
a bounded LRU. All checks run before any compilation except the one-prompt generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.sampling import SamplingConfig
from infer import compiled
from infer.api import generate, load_target_bundle
from infer.request_validation import RequestError, normalize_prompts
from infer.speculative_api import load_draft_bundle


@pytest.fixture(scope="module")
def target(tiny_qwen3_dir):
    return load_target_bundle(tiny_qwen3_dir)


def test_str_prompt_is_one_prompt(target, monkeypatch):
    """generate(target, "text") decodes ONE row (it used to decode one row per character)."""
    import infer.api

    seen = {}

    def fake_run(fn, args, static):  # stands in for the compiled loop: records the batch it was given
        seen["tokens"] = np.asarray(args[1])
        rows = seen["tokens"].shape[0]
        return (np.zeros((rows, static["max_new_tokens"]), np.int32), np.full(rows, 2, np.int32)), 0.0, 1e-3
    monkeypatch.setattr(infer.api, "run_compiled", fake_run)
    res = generate(target, "hello world", max_new_tokens=2, stop_token_ids=[])
    assert seen["tokens"].shape[0] == 1 and len(res.token_ids) == 1
    assert list(seen["tokens"][0, :len(target.tokenizer.encode("hello world"))]) == target.tokenizer.encode("hello world")
    assert normalize_prompts("abc") == ["abc"]
    assert normalize_prompts([5, 6, 7]) == [[5, 6, 7]]  # a flat id list is one prompt too
    assert normalize_prompts(np.array([[1, 2], [3, 4]], np.int32)) == [[1, 2], [3, 4]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=8.0), "max_new_tokens must be an integer, got 8.0 (float)"),
    (dict(max_new_tokens="8"), "max_new_tokens must be an integer, got '8' (str)"),
    (dict(sampling={"temperature": 0.7}), "sampling must be a SamplingConfig, got a dict; use "
                                          "sampling=SamplingConfig(**{'temperature': 0.7})"),
    (dict(temperature=0.7), "sampling settings go in sampling=SamplingConfig(temperature=0.7)"),
    (dict(max_new_token=4), "unexpected keyword argument 'max_new_token'; did you mean 'max_new_tokens'?"),
    (dict(blocksize=3), "unexpected keyword argument 'blocksize'; did you mean 'block_size'?"),
    (dict(block_size=3), "block_size only apply to speculative decoding: pass draft=load_draft_bundle"),
    (dict(seed=2**64), "seed must be an integer in [-2^63, 2^63), got 18446744073709551616 (int)"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(stop_token_ids="0"), "stop_token_ids must be a list of integer token ids or None"),
    (dict(draft="runs/draft"), "draft must be a loaded drafter (infer.load_draft_bundle(path, target))"),
])
def test_keyword_arguments_checked_by_name_and_type(target, kwargs, message):
    with pytest.raises(RequestError) as exc:
        generate(target, [[1, 2, 3]], **kwargs)
    assert message in str(exc.value), str(exc.value)


def test_text_in_a_sampling_config_is_named(target):
    bad = SamplingConfig()
    object.__setattr__(bad, "temperature", "0.7")  # e.g. built by code that bypassed the constructor's checks
    with pytest.raises(RequestError, match=r"sampling\.temperature must be a number, got '0\.7' \(str\)"):
        generate(target, [[1, 2]], sampling=bad)


@pytest.mark.parametrize("prompts, message", [
    ([[1, 2.0, 3]], "prompt 0, token 1: token ids must be integers, got 2.0 (float)"),
    ([[1, 2], [3.7]], "prompt 1, token 0: token ids must be integers, got 3.7 (float)"),
    (np.array([[1.0, 2.0]]), "token ids must be integers, got an array of dtype float64"),
    (b"hello", "got bytes; decode it first"),
    ([{"text": "hi"}], "prompt 0 must be a str or a list of token ids, got dict"),
])
def test_token_ids_are_never_truncated(target, prompts, message):
    with pytest.raises(RequestError) as exc:
        generate(target, prompts, max_new_tokens=2)
    assert message in str(exc.value)


def test_speculative_option_types(target, tmp_path):
    from dspark_jax.draft.config import DraftConfig
    from infer.speculative_api import Draft

    dcfg = DraftConfig.from_target(target.config, mask_token_id=1, num_hidden_layers=1, block_size=3,
                                   target_layer_ids=(0, 1), markov_rank=0, enable_confidence_head=False)
    draft = Draft(config=dcfg, params={})  # never reaches the model: the options are refused first
    for kwargs, message in ((dict(block_size=2.0), "block_size must be an integer >= 1"),
                            (dict(confidence_threshold="0.5"), "confidence_threshold must be a number in [0, 1)"),
                            (dict(record_rounds=1), "record_rounds must be True or False")):
        with pytest.raises(RequestError, match=message.replace("[", r"\[").replace(")", r"\)")):
            generate(target, [[1, 2]], draft=draft, **kwargs)
    with pytest.raises(RequestError, match="target must be a loaded target"):
        load_draft_bundle(tmp_path, "path/to/target")
    with pytest.raises(RequestError, match="model_dir must be a path"):
        load_target_bundle(123)


def test_compile_cache_is_a_bounded_lru():
    add = jax.jit(lambda x, k: x + k, static_argnames="k")
    compiled.clear_compiled()
    compiled.set_cache_size(2)
    try:
        x = jnp.ones(3)
        for k in (1, 2):
            compiled.run_compiled(add, (x,), {"k": k})
        assert compiled.cache_size() == (2, 2)
        _, again, _ = compiled.run_compiled(add, (x,), {"k": 1})  # hit: k=1 becomes most recent
        assert again < 0.05
        compiled.run_compiled(add, (x,), {"k": 3})  # evicts k=2, the least recently used
        keys = [dict(key[1])["k"] for key in compiled._COMPILED]
        assert keys == ["1", "3"]
        out, _, _ = compiled.run_compiled(add, (x,), {"k": 2})  # recompiled after eviction, still right
        np.testing.assert_array_equal(np.asarray(out), np.full(3, 3.0))
        assert compiled.cache_size()[0] == 2
        with pytest.raises(ValueError, match="integer >= 1"):
            compiled.set_cache_size(0)
    finally:
        compiled.set_cache_size(compiled.DEFAULT_CACHE_SIZE)
        compiled.clear_compiled()


def test_library_does_not_import_its_callers():
    """`dspark_jax` stands alone (no infer / dspark_cli / train import, no re-exported generate);
    generation is imported from `infer`."""
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import sys, dspark_jax, dspark_jax.checkpoint.hf, dspark_jax.checkpoint.deepspec\n"
             "assert not hasattr(dspark_jax, 'generate')\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('infer', 'train', 'dspark_cli')))\n"
             "from infer import generate, load_target_bundle, load_draft_bundle\n")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=repo, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_eval_config_refuses_float_sizes():
    from infer.evaluate import EvalConfig

    with pytest.raises(ValueError, match=r"block_sizes\[1\] must be an integer, got 7\.0"):
        EvalConfig(block_sizes=(3, 7.0))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        EvalConfig(max_new_tokens=64.5)
