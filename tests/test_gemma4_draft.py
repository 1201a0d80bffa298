"""Gemma 4 DSpark / DFlash drafter (spec §1.5): train/infer equivalence, DeepSpec layout both ways,
the double-wide MLP rule, softcapped logits, and greedy speculative == greedy target on a tiny
Gemma 4 pair (sliding + full layers, k_eq_v, proportional RoPE, softcapping)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from dspark_jax.checkpoint.deepspec import load_draft, save_draft
from dspark_jax.draft import DraftConfig, DraftModel, init_draft_params
from dspark_jax.draft.gemma4_config import Gemma4DraftConfig
from dspark_jax.gemma4_config import FULL, SLIDING, Gemma4Config, RopeSpec
from dspark_jax.target.model import TargetModel
from infer.api import Target, generate
from infer.speculative_api import Draft
from tests.spec_helpers import oracle_draft
from tests.test_draft_model import _spread
from tests.test_draft_model import test_train_infer_equivalence  # noqa: F401

K = 3  # test_draft_model's block size; its MASK is 63 (vocab 64)


def gemma_target(vocab=64, hidden=16, layers=6, softcap=5.0, **kw) -> Gemma4Config:
    """A tiny Gemma 4 target config: sliding/full mix, k_eq_v with 1 global KV head, proportional RoPE."""
    types = tuple(FULL if i % 3 == 2 else SLIDING for i in range(layers - 1)) + (FULL,)
    fields = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4, global_head_dim=8,
                  num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=types, sliding_window=4,
                  final_logit_softcapping=softcap, max_position_embeddings=512,
                  rope_full=RopeSpec(rope_type="proportional", rope_theta=1e4, partial_rotary_factor=0.5))
    fields.update(kw)
    return Gemma4Config(**fields)


@pytest.fixture(scope="module")
def setup():
    """(draft config, model, spread params) for the imported train/infer equivalence tests."""
    cfg = DraftConfig.from_target(gemma_target(), mask_token_id=63, num_hidden_layers=2, block_size=K,
                                  target_layer_ids=(-1, 2, 4), markov_rank=4)
    assert isinstance(cfg, Gemma4DraftConfig) and cfg.head_dim == 8 and cfg.num_key_value_heads == 1
    return cfg, DraftModel(cfg), _spread(init_draft_params(cfg, jax.random.key(0)))


def test_param_tree_and_softcap(setup):
    """k_eq_v: no v_proj; sandwich norms + layer_scalar; logits are s*tanh(U/s); embedding scaled by sqrt(d)."""
    cfg, model, params = setup
    layer = params["layers_0"]
    assert "v_proj" not in layer["self_attn"] and "v_norm" not in layer["self_attn"]
    assert {"pre_feedforward_layernorm", "post_feedforward_layernorm", "layer_scalar"} <= set(layer)
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, cfg.hidden_size)) * 10, jnp.float32)
    u = model.apply({"params": params}, h, method=DraftModel.compute_logits)
    raw = h @ params["lm_head"]["kernel"]
    np.testing.assert_allclose(u, 5.0 * np.tanh(raw / 5.0), rtol=1e-5, atol=1e-5)
    e = model.apply({"params": params}, jnp.asarray([3]), method=DraftModel.embed)
    np.testing.assert_allclose(e[0], params["embed_tokens"]["embedding"][3] * 4.0, rtol=1e-6)


def test_double_wide_mlp_rule():
    """Doubled iff use_double_wide_mlp and i >= (draft layers - num_kv_shared_layers) > 0."""
    t = gemma_target(use_double_wide_mlp=True, num_kv_shared_layers=2)
    widths = lambda c: [c.layer_config().layer_intermediate_size(i) for i in range(c.num_hidden_layers)]  # noqa: E731
    five = DraftConfig.from_target(t, mask_token_id=63, num_hidden_layers=5, target_layer_ids=(0, 1))
    assert widths(five) == [32, 32, 32, 64, 64]
    two = DraftConfig.from_target(t, mask_token_id=63, num_hidden_layers=2, target_layer_ids=(0, 1))
    assert widths(two) == [32, 32]  # 2 - 2 = 0: the "> 0" guard
    p = jax.eval_shape(lambda key: init_draft_params(five, key), jax.random.key(0))
    assert p["layers_4"]["mlp"]["up_proj"]["kernel"].shape == (16, 64)


def test_deepspec_layout_round_trip(setup, tmp_path):
    """save_draft -> Gemma4DSparkModel config.json + DeepSpec key names; load_draft gives the same draft."""
    cfg, _, params = setup
    out = tmp_path / "d"
    save_draft(params, cfg, out, dtype="float32")
    hf = json.loads((tmp_path / "d" / "config.json").read_text())
    assert hf["architectures"] == ["Gemma4DSparkModel"] and hf["model_type"] == "gemma4_text"
    assert hf["num_hidden_layers"] == 2 and hf["num_target_layers"] == 6 and hf["layer_types"] == [FULL] * 2
    assert hf["global_head_dim"] == 8 and hf["head_dim"] == 4 and hf["final_logit_softcapping"] == 5.0
    with safe_open(str(tmp_path / "d" / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
    assert {"layers.1.layer_scalar", "layers.0.pre_feedforward_layernorm.weight", "layers.0.self_attn.k_norm.weight",
            "fc.weight", "hidden_norm.weight", "lm_head.weight", "markov_head.markov_w1.weight"} <= keys
    assert not any("v_proj" in k for k in keys)
    cfg2, params2 = load_draft(out)
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params2), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def gemma_pair_target():
    """A random near-bigram Gemma 4 target (untied, soft-capped) and its greedy reference continuations."""
    cfg = gemma_target(vocab=48, hidden=32, layers=2, softcap=8.0, tie_word_embeddings=False)  # sliding + full
    tok = jnp.zeros((1, 1), jnp.int32)
    params = nn.meta.unbox(TargetModel(cfg).init(jax.random.PRNGKey(0), tok, tok)["params"])
    params = jax.tree_util.tree_map(lambda x: x * 8.0 if x.ndim > 1 else x, params)
    for i in range(cfg.num_hidden_layers):  # the sandwich post-norms set the size of each layer's update
        for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
            params[f"layers_{i}"][norm]["scale"] = params[f"layers_{i}"][norm]["scale"] * 0.03
    target = Target(config=cfg, params=params)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    return target, prompts, generate(target, prompts, max_new_tokens=24).token_ids


@pytest.mark.parametrize("head", ["vanilla"])
def test_greedy_speculative_equals_target(gemma_pair_target, head):
    """Temperature 0: DSpark / DFlash Gemma 4 drafts reproduce the Gemma 4 target's greedy output."""
    target, prompts, reference = gemma_pair_target
    dcfg, dp = oracle_draft(target.config, target.params, block_size=4, head=head)
    assert isinstance(dcfg, Gemma4DraftConfig)
    res = generate(target, prompts, draft=Draft(config=dcfg, params=dp), max_new_tokens=24)
    assert res.token_ids == reference
    if head == "vanilla":
        assert res.metrics["acceptance_length"] > 1.5, res.metrics
