"""DeepSpec draft checkpoints: hand-written PyTorch-layout state dicts (spec §6) -> load_draft -> our
forward vs an independent NumPy reference; save/load round trips (single file and sharded); DFlash
checkpoints; gated/rnn key mapping; clear errors for bad inputs; draft init from a target."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_jax.checkpoint.deepspec import draft_params_from_target, load_draft, save_draft
from dspark_jax.checkpoint.hf_layout import CheckpointError
from dspark_jax.config import TargetConfig
from dspark_jax.draft import DraftCache, DraftConfig, DraftConfigError, DraftModel, heads

V, D, I, H, KVH, HD, R, LD, LT = 64, 16, 32, 4, 2, 8, 4, 2, 6
IDS = [1, 3, 4]
MASK = 63
K = 3


def deepspec_config(**over):
    """A DeepSpec draft config.json (spec §6) for a tiny Qwen3 target."""
    cfg = {
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "vocab_size": V, "hidden_size": D,
        "intermediate_size": I, "num_hidden_layers": LD, "num_attention_heads": H, "num_key_value_heads": KVH,
        "head_dim": HD, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 256, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "num_target_layers": LT, "block_size": K, "mask_token_id": MASK,
        "target_layer_ids": IDS, "num_anchors": 16, "layer_types": ["full_attention"] * LD,
        "enable_confidence_head": True, "confidence_head_with_markov": True, "markov_rank": R,
        "markov_head_type": "vanilla", "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32",
    }
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not ...}


def hand_state_dict(head_type="vanilla", markov=True, conf=True, conf_markov=True, seed=0, dtype=torch.float32):
    """Torch tensors in [out, in] orientation, keys exactly as listed in spec §1.1 / §6."""
    n = len(IDS)
    shapes = {"embed_tokens.weight": (V, D), "fc.weight": (D, n * D), "hidden_norm.weight": (D,),
              "norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(LD):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (H * HD, D), p + "self_attn.k_proj.weight": (KVH * HD, D),
            p + "self_attn.v_proj.weight": (KVH * HD, D), p + "self_attn.o_proj.weight": (D, H * HD),
            p + "self_attn.q_norm.weight": (HD,), p + "self_attn.k_norm.weight": (HD,),
            p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D), p + "mlp.down_proj.weight": (D, I)})
    if markov:
        shapes.update({"markov_head.markov_w1.weight": (V, R), "markov_head.markov_w2.weight": (V, R)})
        if head_type == "gated":
            shapes.update({"markov_head.gate_proj.weight": (R, D + R), "markov_head.gate_proj.bias": (R,)})
        if head_type == "rnn":
            shapes.update({"markov_head.joint_proj.weight": (3 * R, 2 * R + D),
                           "markov_head.joint_proj.bias": (3 * R,)})
    if conf:
        shapes.update({"confidence_head.proj.weight": (1, D + (R if conf_markov else 0)),
                       "confidence_head.proj.bias": (1,)})
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shp in shapes.items():
        noise = torch.randn(shp, generator=gen)
        sd[k] = ((1.0 + 0.1 * noise) if "norm" in k else 0.3 * noise).to(dtype)
    return sd


def write_checkpoint(path, sd, cfg):
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


# ------------------------------------------------------------------------------------- NumPy reference


def _rms(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta=10000.0):  # x [T, N, D], HF rotate-half
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([pos[:, None] * inv, pos[:, None] * inv], -1)[:, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * np.cos(ang) + rot * np.sin(ang)


def np_draft(sd, feats, ctx_pos, block, block_pos):
    """Inference-mode draft forward for one sequence, straight from the [out, in] tensors (float64)."""
    w = {k: v.float().numpy().astype(np.float64) for k, v in sd.items()}
    hc = _rms(feats @ w["fc.weight"].T, w["hidden_norm.weight"])
    x = w["embed_tokens.weight"][block]
    c, kk, g = hc.shape[0], x.shape[0], H // KVH
    for i in range(LD):
        p = f"layers.{i}."
        u = _rms(x, w[p + "input_layernorm.weight"])
        q = _rope(_rms((u @ w[p + "self_attn.q_proj.weight"].T).reshape(kk, H, HD), w[p + "self_attn.q_norm.weight"]),
                  block_pos)
        kn = w[p + "self_attn.k_norm.weight"]
        kc = _rope(_rms((hc @ w[p + "self_attn.k_proj.weight"].T).reshape(c, KVH, HD), kn), ctx_pos)
        kb = _rope(_rms((u @ w[p + "self_attn.k_proj.weight"].T).reshape(kk, KVH, HD), kn), block_pos)
        keys = np.concatenate([kc, kb])
        vals = np.concatenate([hc @ w[p + "self_attn.v_proj.weight"].T, u @ w[p + "self_attn.v_proj.weight"].T])
        vals = vals.reshape(c + kk, KVH, HD)
        out = np.zeros((kk, H, HD))
        for hh in range(H):
            s = q[:, hh] @ keys[:, hh // g].T / np.sqrt(HD)
            a = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (a / a.sum(-1, keepdims=True)) @ vals[:, hh // g]
        x = x + out.reshape(kk, H * HD) @ w[p + "self_attn.o_proj.weight"].T
        u = _rms(x, w[p + "post_attention_layernorm.weight"])
        gate = u @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (u @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    h = _rms(x, w["norm.weight"])
    return hc, h, h @ w["lm_head.weight"].T, w


_FNS: dict = {}


def _fns(cfg):
    if cfg not in _FNS:
        m = DraftModel(cfg)
        _FNS[cfg] = (
            jax.jit(lambda p, x: m.apply({"params": p}, x, method=DraftModel.project_context)),
            jax.jit(lambda p, *a: m.apply({"params": p}, *a, method=DraftModel.block_forward)),
            jax.jit(lambda p, h, prev: m.apply({"params": p}, h, prev, method=DraftModel.confidence_logits)),
        )
    return _FNS[cfg]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_matches_numpy_reference(tmp_path, dtype):
    sd = hand_state_dict(dtype=dtype)
    cfg, params = load_draft(write_checkpoint(tmp_path / "ck", sd, deepspec_config()), dtype="float32")
    assert cfg.markov_rank == R and cfg.target_layer_ids == tuple(IDS) and cfg.block_size == K
    assert params["fc"]["kernel"].shape == (len(IDS) * D, D)
    assert params["markov_head"]["markov_w2"]["kernel"].shape == (R, V)
    np.testing.assert_array_equal(params["markov_head"]["markov_w1"]["embedding"],
                                  sd["markov_head.markov_w1.weight"].float().numpy())

    rng = np.random.default_rng(0)
    c = 5
    feats = rng.normal(size=(c, len(IDS) * D))
    ctx_pos = np.arange(c)
    anchor = 17
    block = np.array([anchor, MASK, MASK])
    block_pos = c + np.arange(K)
    hc_ref, h_ref, u_ref, w = np_draft(sd, feats, ctx_pos, block, block_pos)

    project, block_fn, conf_fn = _fns(cfg)
    hc = project(params, jnp.asarray(feats[None], jnp.float32))
    np.testing.assert_allclose(hc[0], hc_ref, rtol=1e-5, atol=1e-5)
    h, u, cache = block_fn(params, jnp.asarray(block[None]), jnp.asarray(block_pos[None]), DraftCache.create(cfg, 1, 8),
                           hc, jnp.asarray(ctx_pos[None]), jnp.ones((1, c), bool))
    np.testing.assert_allclose(h[0], h_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(u[0], u_ref, rtol=1e-4, atol=1e-4)
    assert int(cache.lengths[0]) == c

    # Markov head: bias(prev) = W1[prev] @ W2^T with W2 stored [V, r]; confidence on [h ; W1[prev]]
    prev = np.array([anchor, 5, 9])
    w1, w2 = w["markov_head.markov_w1.weight"], w["markov_head.markov_w2.weight"]
    mp = params["markov_head"]
    state = heads.init_state((1,), R)
    for k in range(K):
        bias, state = heads.markov_step(mp, "vanilla", jnp.asarray(prev[k:k + 1]), h[:, k], state)
        np.testing.assert_allclose(bias[0], w1[prev[k]] @ w2.T, rtol=1e-5, atol=1e-5)
    conf = conf_fn(params, h, jnp.asarray(prev[None]))
    feat = np.concatenate([h_ref, w1[prev]], -1)
    want = feat @ w["confidence_head.proj.weight"][0] + w["confidence_head.proj.bias"][0]
    np.testing.assert_allclose(conf[0], want, rtol=1e-4, atol=1e-4)
    print(f"{dtype}: max |dh| = {float(np.max(np.abs(np.asarray(h[0]) - h_ref))):.2e}, "
          f"max |dU| = {float(np.max(np.abs(np.asarray(u[0]) - u_ref))):.2e}")


def test_bfloat16_model_close_to_reference(tmp_path):
    """bf16 parameters and activations (the released setting) stay within bf16 noise of the f64 reference."""
    sd = hand_state_dict(dtype=torch.bfloat16, seed=4)
    cfg, params = load_draft(write_checkpoint(tmp_path / "ck", sd, deepspec_config()), dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    rng = np.random.default_rng(1)
    c = 6
    feats = rng.normal(size=(c, len(IDS) * D))
    block, block_pos = np.array([7, MASK, MASK]), c + np.arange(K)
    _, h_ref, u_ref, _ = np_draft(sd, feats, np.arange(c), block, block_pos)
    project, block_fn, _ = _fns(cfg)
    hc = project(params, jnp.asarray(feats[None], jnp.bfloat16))
    cache = DraftCache.create(cfg, 1, 8)
    assert cache.k[0].dtype == jnp.bfloat16
    h, u, cache = block_fn(params, jnp.asarray(block[None]), jnp.asarray(block_pos[None]), cache, hc,
                           jnp.arange(c)[None], jnp.ones((1, c), bool))
    assert h.dtype == jnp.bfloat16 and u.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h[0], np.float32), h_ref, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(u[0], u_ref, rtol=5e-2, atol=5e-2)
    print(f"bf16: max |dh| = {float(np.max(np.abs(np.asarray(h[0], np.float32) - h_ref))):.2e}, "
          f"max |dU| = {float(np.max(np.abs(np.asarray(u[0]) - u_ref))):.2e} (|U| max {np.abs(u_ref).max():.1f})")


def test_round_trip_single_and_sharded(tmp_path):
    sd = hand_state_dict(dtype=torch.bfloat16, seed=1)
    src = write_checkpoint(tmp_path / "src", sd, deepspec_config())
    cfg, params = load_draft(src, dtype="bfloat16")
    assert params["fc"]["kernel"].dtype == jnp.bfloat16

    save_draft(params, cfg, tmp_path / "out")  # bf16, single file
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(back) == set(sd)
    for k in sd:  # bit-exact, PyTorch orientation
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], sd[k]), k
    with open(tmp_path / "out" / "config.json") as f:
        written = json.load(f)
    assert written["architectures"] == ["Qwen3DSparkModel"]
    assert written["layer_types"] == ["full_attention"] * LD and written["tie_word_embeddings"] is False
    assert written["markov_head_type"] == "vanilla" and written["confidence_head_with_markov"] is True
    assert written["bos_token_id"] == 0 and written["num_target_layers"] == LT  # inherited field kept
    cfg2, params2 = load_draft(tmp_path / "out", dtype="bfloat16")
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)

    save_draft(params, cfg, tmp_path / "sharded", dtype="float32", max_shard_bytes=4096)
    files = sorted(os.listdir(tmp_path / "sharded"))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    cfg3, params3 = load_draft(tmp_path / "sharded")
    assert cfg3 == cfg.replace(dtype="float32")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), params, params3)

    # atomic replace: overwrite an existing checkpoint, no temp dirs left behind
    save_draft(params3, cfg3, tmp_path / "out", dtype="float32")
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["fc.weight"].dtype == torch.float32
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    # a failing save leaves the old checkpoint intact
    broken = dict(params3)
    del broken["hidden_norm"]
    with pytest.raises(CheckpointError, match="hidden_norm"):
        save_draft(broken, cfg3, tmp_path / "out")
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["fc.weight"].dtype == torch.float32
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_dflash_checkpoint_loads(tmp_path):
    cfg_json = deepspec_config(markov_rank=0, markov_head_type=..., enable_confidence_head=False,
                               confidence_head_with_markov=...)
    sd = hand_state_dict(markov=False, conf=False)
    cfg, params = load_draft(write_checkpoint(tmp_path / "dflash", sd, cfg_json))
    assert cfg.markov_rank == 0 and not cfg.enable_confidence_head
    assert "markov_head" not in params and "confidence_head" not in params
    out = cfg.to_deepspec_config()
    assert "markov_head_type" not in out and "confidence_head_with_markov" not in out
    assert out["markov_rank"] == 0 and out["enable_confidence_head"] is False
    save_draft(params, cfg, tmp_path / "dflash2", dtype="float32")
    assert set(load_file(str(tmp_path / "dflash2" / "model.safetensors"))) == set(sd)


@pytest.mark.parametrize("head_type", ["gated", "rnn"])
def test_gated_and_rnn_key_mapping(tmp_path, head_type):
    sd = hand_state_dict(head_type=head_type, conf_markov=False)
    cfg_json = deepspec_config(markov_head_type=head_type, confidence_head_with_markov=False)
    cfg, params = load_draft(write_checkpoint(tmp_path / head_type, sd, cfg_json))
    assert cfg.markov_head_type == head_type and not cfg.confidence_head_with_markov
    w = {k: v.numpy().astype(np.float64) for k, v in sd.items()}
    name = {"gated": "gate_proj", "rnn": "joint_proj"}[head_type]
    np.testing.assert_array_equal(params["markov_head"][name]["kernel"], sd[f"markov_head.{name}.weight"].numpy().T)
    rng = np.random.default_rng(2)
    h = rng.normal(size=(2, D))
    prev = np.array([4, 60])
    s = rng.normal(size=(2, R))
    e = w["markov_head.markov_w1.weight"][prev]
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    if head_type == "gated":
        g = sig(np.concatenate([h, e], -1) @ w["markov_head.gate_proj.weight"].T + w["markov_head.gate_proj.bias"])
        want, want_s = (g * e) @ w["markov_head.markov_w2.weight"].T, s
    else:
        z = np.concatenate([s, e, h], -1) @ w["markov_head.joint_proj.weight"].T + w["markov_head.joint_proj.bias"]
        gg, cc, oo = np.split(z, 3, -1)
        want = np.tanh(oo) @ w["markov_head.markov_w2.weight"].T
        want_s = sig(gg) * s + (1 - sig(gg)) * np.tanh(cc)
    bias, new_s = heads.markov_step(params["markov_head"], head_type, jnp.asarray(prev), jnp.asarray(h, jnp.float32),
                                    jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(bias, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_s, want_s, rtol=1e-5, atol=1e-5)
    conf = heads.confidence_logits(params["confidence_head"], jnp.asarray(h, jnp.float32))
    np.testing.assert_allclose(conf, h @ w["confidence_head.proj.weight"][0] + w["confidence_head.proj.bias"][0],
                               rtol=1e-5, atol=1e-5)
    save_draft(params, cfg, tmp_path / "rt", dtype="float32")
    back = load_file(str(tmp_path / "rt" / "model.safetensors"))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# ------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("over, match", [
    (dict(markov_head_type="lstm"), "unknown head type.*'lstm'"),
    (dict(target_layer_ids=[1, 3, 6]), r"target layer id 6 outside .*\[0, 5\]"),
    (dict(target_layer_ids=[-2, 3, 4]), r"target layer id -2 outside"),
    (dict(target_layer_ids=[1, 3, 5]), "last target layer 5"),
    (dict(target_layer_ids=[3, 1, 4]), "strictly increasing.*3 then 1"),
    (dict(mask_token_id=64), r"mask_token_id=64 outside .*vocab_size=64"),
    (dict(block_size=0), "block_size must be >= 1, got 0"),
    (dict(markov_rank=0, markov_head_type=...), "confidence_head_with_markov=True needs a Markov head.*markov_rank=0"),
    (dict(architectures=["Gemma4DSparkModel"]), "Gemma4DSparkModel"),
    (dict(confidence_head_with_markov=...), "confidence_head_with_markov is missing"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
])
def test_bad_config_json(tmp_path, over, match):
    path = write_checkpoint(tmp_path / "bad", hand_state_dict(), deepspec_config(**over))
    with pytest.raises(DraftConfigError, match=match):
        load_draft(path)


def test_bad_tensors(tmp_path):
    good = hand_state_dict()
    sd = dict(good)
    del sd["layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.mlp\.up_proj\.weight"):
        load_draft(write_checkpoint(tmp_path / "a", sd, deepspec_config()))
    sd = dict(good, **{"fc.weight": torch.zeros(D, 2 * D)})
    with pytest.raises(CheckpointError, match=r"'fc\.weight' has shape \(16, 32\), expected \(16, 48\)"):
        load_draft(write_checkpoint(tmp_path / "b", sd, deepspec_config()))
    sd = dict(good, **{"markov_head.markov_w2.weight": torch.zeros(R, V)})  # not transposed by the exporter
    with pytest.raises(CheckpointError, match=r"markov_w2\.weight' has shape \(4, 64\), expected \(64, 4\)"):
        load_draft(write_checkpoint(tmp_path / "c", sd, deepspec_config()))
    sd = dict(good, **{"extra_head.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*extra_head\.weight"):
        load_draft(write_checkpoint(tmp_path / "d", sd, deepspec_config()))
    # markov tensors present but config says DFlash
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*markov_head"):
        load_draft(write_checkpoint(tmp_path / "e", good, deepspec_config(
            markov_rank=0, markov_head_type=..., confidence_head_with_markov=False)))
    # torch.compile prefix is stripped, rotary buffers ignored
    sd = {"_orig_mod." + k: v for k, v in good.items()}
    sd["rotary_emb.inv_freq"] = torch.ones(HD // 2)
    load_draft(write_checkpoint(tmp_path / "f", sd, deepspec_config()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        os.makedirs(tmp_path / "g")
        with open(tmp_path / "g" / "config.json", "w") as f:
            json.dump(deepspec_config(), f)
        load_draft(tmp_path / "g")


def _target(**over):
    kw = dict(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=LT, num_attention_heads=H,
              num_key_value_heads=KVH, head_dim=HD, rope_theta=10000.0)
    kw.update(over)
    return TargetConfig(**kw)


def test_validate_against_target():
    cfg = DraftConfig.from_deepspec_config(deepspec_config())
    cfg.validate_against_target(_target())
    with pytest.raises(DraftConfigError, match="vocab_size=64 != target vocab_size=128"):
        cfg.validate_against_target(_target(vocab_size=128))
    with pytest.raises(DraftConfigError, match="hidden_size=16 != target hidden_size=32"):
        cfg.validate_against_target(_target(hidden_size=32, num_attention_heads=4, head_dim=8))
    with pytest.raises(DraftConfigError, match="num_target_layers=6 != target num_hidden_layers=5"):
        cfg.validate_against_target(_target(num_hidden_layers=5))
    with pytest.raises(DraftConfigError, match="unknown head type"):
        cfg.replace(markov_head_type="mlp")
    with pytest.raises(DraftConfigError, match="mask_token_id"):
        DraftConfig.from_target(_target(), target_layer_ids=(1, 2))
    with pytest.raises(DraftConfigError, match="mask_token_id=70 outside"):
        DraftConfig.from_target(_target(), mask_token_id=70)
    with pytest.raises(DraftConfigError, match="last target layer 5"):
        DraftConfig.from_target(_target(), mask_token_id=MASK, target_layer_ids=(1, 5))
    big = DraftConfig.from_target(_target(num_hidden_layers=36, vocab_size=152000, hidden_size=32),
                                  mask_token_id=151669)
    assert big.target_layer_ids == (1, 9, 17, 25, 33)  # Qwen3-4B/8B
    cfg40 = DraftConfig.from_target(_target(num_hidden_layers=40), mask_token_id=1)
    assert cfg40.target_layer_ids == (1, 10, 19, 28, 37)  # Qwen3-14B
    # config round trip through the DeepSpec dict
    assert DraftConfig.from_deepspec_config(big.to_deepspec_config()) == big


@pytest.mark.parametrize("tied", [False, True])
def test_draft_params_from_target(tied):
    tc = _target(tie_word_embeddings=tied)
    cfg = DraftConfig.from_target(tc, mask_token_id=MASK, num_hidden_layers=LD, block_size=K,
                                  target_layer_ids=IDS, markov_rank=R)
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(V, D)).astype(np.float32)
    tp = {"embed_tokens": {"embedding": emb}}
    if not tied:
        tp["lm_head"] = {"kernel": rng.normal(size=(D, V)).astype(np.float32)}
    p = draft_params_from_target({"params": tp}, tc, cfg, jax.random.key(0))
    np.testing.assert_array_equal(p["embed_tokens"]["embedding"], emb)
    np.testing.assert_array_equal(p["lm_head"]["kernel"], emb.T if tied else tp["lm_head"]["kernel"])
    np.testing.assert_array_equal(p["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(p["layers_0"]["self_attn"]["k_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(p["confidence_head"]["proj"]["bias"], 0.0)
    assert 0.015 < float(jnp.std(p["markov_head"]["markov_w1"]["embedding"])) < 0.025
    with pytest.raises(DraftConfigError, match="vocab_size=64 != target vocab_size=128"):
        draft_params_from_target(tp, _target(vocab_size=128), cfg, jax.random.key(0))
