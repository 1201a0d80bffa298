"""Checkpoint I/O: round trips with transformers, config layouts, and clear errors on bad inputs."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from dspark_jax.checkpoint.hf import INDEX_FILE, SINGLE_FILE, load_target, save_target
from dspark_jax.checkpoint.hf_layout import CheckpointError
from dspark_jax.config import ConfigError, RopeScaling, TargetConfig
from dspark_jax.target.model import TargetModel
from dspark_jax.tokenizer import Tokenizer, TokenizerError
from tests.helpers import TOKENIZER_VOCAB, hf_forward, load_hf_model, make_hf_model

TOKENS = np.random.RandomState(0).randint(0, 128, (2, 9)).astype(np.int32)  # [B, T]


@functools.lru_cache(maxsize=None)
def _forward(config: TargetConfig) -> Callable:
    """One jitted full forward per config (configs are hashable)."""
    model = TargetModel(config)
    positions = jnp.broadcast_to(jnp.arange(TOKENS.shape[1], dtype=jnp.int32), TOKENS.shape)
    return jax.jit(lambda p, t: model.apply({"params": p}, t, positions).logits)


def _logits(config: TargetConfig, params: dict) -> np.ndarray:
    return np.asarray(_forward(config)(params, jnp.asarray(TOKENS)))


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    err, scale = float(np.max(np.abs(got - ref))), max(1.0, float(np.max(np.abs(ref))))
    assert err <= 1e-4 * scale, f"max abs error {err:.3e} (max|ref| {scale:.2f})"


def _tensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def qwen(tiny_qwen3_dir: Path) -> tuple[torch.nn.Module, TargetConfig, dict]:
    """(HF reference, our config, our params) for the shared tiny Qwen3 checkpoint."""
    config, params = load_target(tiny_qwen3_dir)
    return load_hf_model(tiny_qwen3_dir), config, params


# --------------------------------------------------------------------------- round trips
def test_transformers_single_file_to_ours(qwen) -> None:
    """transformers save_pretrained (single file) -> load_target -> same logits; float32 jax arrays."""
    hf, config, params = qwen
    assert config.family == "qwen3" and config.head_dim == 12 and not config.tie_word_embeddings
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
    assert params["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (32, 4 * 12)  # [in, out]
    _assert_close(_logits(config, params), hf_forward(hf, TOKENS)[0])


def test_transformers_sharded_to_ours(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """transformers save_pretrained(max_shard_size=...) -> index + shards -> load_target -> same logits."""
    hf = load_hf_model(tiny_llama_dir)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / INDEX_FILE).exists() and len(list(tmp_path.glob("model-*.safetensors"))) > 1
    config, params = load_target(tmp_path)
    assert config.attention_bias and config.mlp_bias and config.rope_scaling.rope_type == "llama3"
    _assert_close(_logits(config, params), hf_forward(hf, TOKENS)[0])


def test_ours_to_transformers_single_file(qwen, tmp_path: Path) -> None:
    """save_target (float32) -> transformers loads it -> identical tensors and same logits."""
    hf, config, params = qwen
    out = Path(save_target(params, config, tmp_path / "ckpt"))
    assert sorted(os.listdir(out)) == ["config.json", SINGLE_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    ours, ref = _tensors(out / SINGLE_FILE), _state(hf)
    assert set(ours) == set(ref)
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)
    reloaded = load_hf_model(out)
    _assert_close(hf_forward(reloaded, TOKENS)[0], _logits(config, params))


def test_ours_to_transformers_sharded_bf16(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """save_target(dtype=bfloat16, small shards) -> transformers loads; we reload in f32 and bf16."""
    config, params = load_target(tiny_llama_dir)
    out = Path(save_target(params, config, tmp_path / "ckpt", dtype="bfloat16", max_shard_bytes=20_000))
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)  # default: dtype from config.json
    assert next(hf.parameters()).dtype == torch.bfloat16
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in _state(load_hf_model(tiny_llama_dir)).items()}
    assert all(np.array_equal(v, rounded[k]) for k, v in _state(hf).items())

    cfg32, p32 = load_target(out, dtype="float32")
    assert cfg32.dtype == "float32" and p32["norm"]["scale"].dtype == jnp.float32
    _assert_close(_logits(cfg32, p32), hf_forward(load_hf_model(out), TOKENS)[0])
    cfg16, p16 = load_target(out)  # default: the checkpoint's dtype
    assert cfg16.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    assert np.array_equal(np.asarray(p16["lm_head"]["kernel"], np.float32), np.asarray(p32["lm_head"]["kernel"]))


def test_transformers_bf16_checkpoint_loads(tmp_path: Path) -> None:
    """A bf16 checkpoint written by transformers loads exactly (BF16 -> float32 is lossless)."""
    hf, _ = make_hf_model("qwen3", seed=5)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    assert {str(v.dtype) for v in _tensors(tmp_path / SINGLE_FILE).values()} == {"bfloat16"}
    config, params = load_target(tmp_path, dtype="float32")
    assert np.array_equal(np.asarray(params["embed_tokens"]["embedding"]), _state(hf)["model.embed_tokens.weight"])
    _assert_close(_logits(config, params), hf_forward(load_hf_model(tmp_path), TOKENS)[0])


def test_tied_checkpoint_without_lm_head(tmp_path: Path) -> None:
    """Tied checkpoints have no lm_head.weight: load, compare, save (still without it), reload in transformers."""
    hf, src = make_hf_model("qwen3", tmp_path / "src", seed=6, tie_word_embeddings=True, with_tokenizer=False)
    assert "lm_head.weight" not in _tensors(src / SINGLE_FILE)
    config, params = load_target(src)
    assert config.tie_word_embeddings and "lm_head" not in params
    ref = hf_forward(hf, TOKENS)[0]
    _assert_close(_logits(config, params), ref)
    out = Path(save_target(params, config, tmp_path / "ours"))
    assert "lm_head.weight" not in _tensors(out / SINGLE_FILE)
    _assert_close(hf_forward(load_hf_model(out), TOKENS)[0], ref)


def test_load_onto_shardings(tiny_qwen3_dir: Path) -> None:
    """Tensors are placed on the given sharding (single sharding, or a callable returning a tree)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, params = load_target(tiny_qwen3_dir, shardings=replicated)
    assert all(x.sharding == replicated for x in jax.tree.leaves(params))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    _, params = load_target(tiny_qwen3_dir, shardings=lambda cfg: {"lm_head": {"kernel": split}})
    assert params["lm_head"]["kernel"].sharding == split


def test_save_refuses_existing_dir_and_overwrites_on_request(qwen, tmp_path: Path) -> None:
    """An existing out_dir is an error unless overwrite=True; extra files are copied in."""
    _, config, params = qwen
    out = tmp_path / "ckpt"
    out.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        save_target(params, config, out)
    extra = tmp_path / "tokenizer.json"
    extra.write_text("{}")
    save_target(params, config, out, overwrite=True, copy_files=[extra])
    assert sorted(os.listdir(out)) == ["config.json", SINGLE_FILE, "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tokenizer.json"]


# --------------------------------------------------------------------------- config layouts
CONFIGS = [
    TargetConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=12, eos_token_ids=(1, 2), bos_token_id=0),
    TargetConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=8, attention_bias=True, mlp_bias=True,
                 tie_word_embeddings=True, rope_theta=5e5, eos_token_ids=(3,), dtype="bfloat16",
                 rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=64)),
    TargetConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                 rope_scaling=RopeScaling(rope_type="linear", factor=2.0)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["qwen3", "llama_llama3", "llama_linear"])
def test_config_round_trip(config: TargetConfig, tmp_path: Path) -> None:
    """to_hf_config -> from_hf_config is the identity, also through transformers' AutoConfig."""
    hf = config.to_hf_config()
    assert TargetConfig.from_hf_config(hf, dtype=config.dtype) == config
    (tmp_path / "config.json").write_text(json.dumps(hf))
    auto = transformers.AutoConfig.from_pretrained(tmp_path)
    assert TargetConfig.from_hf_config(auto.to_dict(), dtype=config.dtype) == config


@pytest.mark.parametrize("classic, modern", [
    ({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},
     {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}),
    ({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64, "rope_theta": 5e5}}),
    ({"rope_theta": 5e5, "rope_scaling": None}, {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
])
def test_rope_layouts_agree(classic: dict, modern: dict) -> None:
    """Classic rope_theta + rope_scaling and transformers-5 rope_parameters give the same config (and HF's)."""
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
                intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    a = TargetConfig.from_hf_config({**base, **classic})
    b = TargetConfig.from_hf_config({**base, **modern})
    assert a == b and a.rope_theta == 5e5
    c = TargetConfig.from_hf_config(transformers.LlamaConfig(**{**base, **classic}).to_dict())
    assert c == a


# --------------------------------------------------------------------------- bad inputs
@pytest.fixture
def ckpt(tiny_qwen3_dir: Path, tmp_path: Path) -> Path:
    """A private, modifiable copy of the tiny Qwen3 checkpoint."""
    return Path(shutil.copytree(tiny_qwen3_dir, tmp_path / "ckpt"))


def _rewrite(ckpt: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    tensors = _tensors(ckpt / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, str(ckpt / SINGLE_FILE), metadata={"format": "pt"})


def test_missing_dir_and_config(tmp_path: Path, ckpt: Path) -> None:
    """A missing directory or config.json -> CheckpointError naming the path."""
    with pytest.raises(CheckpointError, match=re.escape(f"model directory '{tmp_path / 'nope'}' does not exist")):
        load_target(tmp_path / "nope")
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"no config.json in model directory '{ckpt}'")):
        load_target(ckpt)


def test_unknown_architecture(ckpt: Path) -> None:
    """config.json of an unsupported architecture -> ConfigError naming it and the file."""
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unknown architecture \['MistralForCausalLM'\]"):
        load_target(ckpt)


def test_missing_safetensors(ckpt: Path) -> None:
    """No weights file -> CheckpointError naming the expected files and the directory."""
    (ckpt / SINGLE_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json in"):
        load_target(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(ckpt: Path, damage: str) -> None:
    """A truncated file or a garbage header -> CheckpointError naming the file."""
    path = ckpt / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + data[16:])
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a readable safetensors file (corrupt or truncated?)")):
        load_target(ckpt)


def test_missing_key(ckpt: Path) -> None:
    """A checkpoint lacking a tensor -> CheckpointError naming the key."""
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        load_target(ckpt)


def test_unexpected_key(ckpt: Path) -> None:
    """An extra tensor -> CheckpointError naming the key (and the file it is in)."""
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.zeros(48, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['model\.layers\.0\.self_attn\.q_proj\.bias'\] "
                                              r"\(in model\.safetensors\)"):
        load_target(ckpt)


def test_shape_mismatch(ckpt: Path) -> None:
    """A mis-shaped tensor -> CheckpointError naming the key, its shape and the expected shape."""
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((25, 32), np.float32)))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(25, 32\), "
                                              r"expected \(24, 32\)"):
        load_target(ckpt)


def test_unsupported_tensor_dtype(ckpt: Path) -> None:
    """An integer (e.g. quantised) tensor -> CheckpointError naming the key and dtype."""
    _rewrite(ckpt, lambda t: t.__setitem__("model.norm.weight", np.ones(32, np.int8)))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype I8"):
        load_target(ckpt)


def test_index_with_missing_shard(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """An index that references a shard that is not there -> CheckpointError naming index and shard."""
    load_hf_model(tiny_llama_dir).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(INDEX_FILE)} references shard '{re.escape(shard.name)}'.* does not exist"):
        load_target(tmp_path)


def test_index_key_not_in_shard(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """An index entry whose shard lacks the tensor -> CheckpointError naming the key and shard."""
    load_hf_model(tiny_llama_dir).save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    key = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][key] = second
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"maps '{key}' to '{second}', but that shard has no such tensor")):
        load_target(tmp_path)


def test_tokenizer_larger_than_model(qwen, tiny_qwen3_dir: Path) -> None:
    """A tokenizer with more tokens than the model's vocab_size -> TokenizerError naming both numbers."""
    _, config, _ = qwen
    tok = Tokenizer.from_dir(tiny_qwen3_dir)
    with pytest.raises(TokenizerError, match=rf"has {TOKENIZER_VOCAB} tokens but the model's vocab_size is 64"):
        tok.check_compatible(config.replace(vocab_size=64))


def test_save_with_missing_param_writes_nothing(qwen, tmp_path: Path) -> None:
    """save_target validates params first: a missing param -> CheckpointError, no directory created."""
    _, config, params = qwen
    broken = {k: v for k, v in params.items() if k != "norm"}
    with pytest.raises(CheckpointError, match=r"params have no entry norm/scale \(for 'model\.norm\.weight'\)"):
        save_target(broken, config, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
