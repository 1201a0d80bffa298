"""Gemma 4 target parity with transformers (float32) on tiny random configs, plus config errors.

Reuses the three forward checks of `test_target_vs_reference` (full forward; prefill + cached
decode; right-padded prefill + per-row multi-token append) with Gemma 4 cases from
`tests/gemma4_helpers.py`, loaded through `load_target` from the saved HF directories (wrapper and
text-only layouts). Taps include a KV-shared layer. Max abs errors are printed with -s.
"""

from __future__ import annotations

import json

import jax
import pytest

from dspark_jax.checkpoint.hf import load_target, save_target
from dspark_jax.checkpoint.hf_layout import CheckpointError
from dspark_jax.config import ConfigError, load_hf_config
from dspark_jax.gemma4_config import Gemma4Config, RopeSpec, proportional_inv_freq
from dspark_jax.target.model import TargetModel
from tests.gemma4_helpers import GEMMA4_CASES, make_gemma4_model
from tests.test_target_vs_reference import (  # noqa: F401  (pytest collects the imported tests)
    Case, _print_error_table, test_full_forward, test_per_row_append, test_prefill_then_decode)


@pytest.fixture(scope="module", params=list(GEMMA4_CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A saved tiny Gemma 4 checkpoint loaded with `load_target`, and our jitted forwards."""
    hf, out = make_gemma4_model(tmp_path_factory.mktemp(request.param) / "m", request.param)
    config, params = load_target(out)
    assert isinstance(config, Gemma4Config)
    taps = (-1, 0, 2, 3)
    model = TargetModel(config)

    def full(p, tokens, positions):
        return model.apply({"params": p}, tokens, positions, tap_layers=taps, return_final_hidden=True)

    def cached(p, tokens, positions, cache):
        return model.apply({"params": p}, tokens, positions, cache, tap_layers=taps, return_final_hidden=True)

    return Case(request.param, hf, config, params, taps, jax.jit(full), jax.jit(cached))


def test_config_features(case: Case) -> None:
    """The loaded config carries each feature the case was built to exercise."""
    c = case.config
    assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                             "full_attention") and c.sliding_window == 4
    assert [c.layer_head_dim(i) for i in range(5)] == [8, 16, 8, 8, 16]
    if case.name == "wrapper_keqv_prop_softcap":
        assert c.weight_prefix == "model.language_model." and c.attention_k_eq_v and c.tie_word_embeddings
        assert [c.layer_kv_heads(i) for i in range(5)] == [2, 1, 2, 2, 1] and c.final_logit_softcapping == 4.0
        assert not c.layer_has_v_proj(1) and c.layer_has_v_proj(0)
    else:
        assert c.weight_prefix == "model." and not c.tie_word_embeddings
        assert [c.layer_kv_source(i) for i in range(5)] == [None, None, None, 2, 1]
        assert [c.layer_intermediate_size(i) for i in range(5)] == [48, 48, 48, 96, 96]
        assert c.rope_full.factor == 2.0


def test_proportional_rope_hand_case() -> None:
    """head_dim 16, partial 0.25 -> 2 rotated frequencies theta^(-0/16), theta^(-2/16), 6 zeros; / factor."""
    inv = proportional_inv_freq(RopeSpec(rope_type="proportional", rope_theta=1e4, partial_rotary_factor=0.25,
                                         factor=2.0), 16)
    assert inv.shape == (8,)
    assert inv[0] == pytest.approx(0.5) and inv[1] == pytest.approx(1e4 ** (-2 / 16) / 2) and not inv[2:].any()


def test_save_load_round_trip(case: Case, tmp_path) -> None:
    """save_target writes the same layout (wrapper or text-only) that load_target reads back."""
    out = save_target(case.params, case.config, tmp_path / "rt")
    config, params = load_target(out)
    assert config == case.config
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, case.params))


@pytest.mark.parametrize("field,value,needle", [
    ("enable_moe_block", True, "enable_moe_block"),
    ("hidden_size_per_layer_input", 256, "per-layer inputs"),
    ("hidden_activation", "relu", "hidden_activation"),
])
def test_unsupported_features_are_clear_errors(tmp_path, field, value, needle) -> None:
    """MoE blocks, per-layer inputs and other activations: ConfigError naming the field."""
    text = Gemma4Config.from_hf_config(
        {"model_type": "gemma4_text", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 4,
         "global_head_dim": 4, "hidden_size_per_layer_input": 0}).text_config_dict()
    text[field] = value
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma4ForConditionalGeneration"],
                                                      "model_type": "gemma4", "text_config": text}))
    with pytest.raises(ConfigError, match=needle):
        load_hf_config(tmp_path)


def test_unexpected_text_key_is_named(case: Case, tmp_path) -> None:
    """A stray tensor inside the text decoder's prefix is reported by name."""
    import numpy as np
    from safetensors.numpy import save_file

    out = save_target(case.params, case.config, tmp_path / "x")
    save_file({f"{case.config.weight_prefix}layers.0.self_attn.bogus.weight": np.zeros(2, np.float32)},
              f"{out}/model-extra.safetensors")
    index = {"weight_map": {k: "model.safetensors" for k in case.config.hf_shapes() if k in
                            {k2 for k2, _, _ in case.config.hf_key_map()}}}
    index["weight_map"][f"{case.config.weight_prefix}layers.0.self_attn.bogus.weight"] = "model-extra.safetensors"
    (tmp_path / "x" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="bogus"):
        load_target(out)
