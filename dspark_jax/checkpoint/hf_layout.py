"""Name and orientation mapping between Hugging Face state dicts and our Flax parameter trees.

HF stores `nn.Linear` weights as [out, in]; our `Projection` kernels are [in, out]. Norm weights
map to `scale`, embeddings to `embedding`. Keys are flat dotted HF names (`model.layers.0.self_attn.q_proj.weight`).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from dspark_jax.config import TargetConfig

__all__ = ["CheckpointError", "target_key_map", "expected_hf_shapes", "hf_to_params", "params_to_hf", "set_path",
           "get_path", "ignored_extra_key"]


class CheckpointError(ValueError):
    """Missing, unexpected or mis-shaped checkpoint tensors, or an unreadable file; names the key."""


def _linear(hf: str, path: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    yield hf + ".weight", path + ("kernel",), True


def target_key_map(config: TargetConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """[(hf_key, flax_param_path, transpose)] for every tensor of a target checkpoint."""
    if hasattr(config, "hf_key_map"):  # a config with its own layout (Gemma 4)
        return config.hf_key_map()
    out: list[tuple[str, tuple[str, ...], bool]] = [
        ("model.embed_tokens.weight", ("embed_tokens", "embedding"), False),
        ("model.norm.weight", ("norm", "scale"), False),
    ]
    for i in range(config.num_hidden_layers):
        hp, fp = f"model.layers.{i}", (f"layers_{i}",)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.extend(_linear(f"{hp}.self_attn.{proj}", fp + ("self_attn", proj)))
            if config.attention_bias:
                out.append((f"{hp}.self_attn.{proj}.bias", fp + ("self_attn", proj, "bias"), False))
        if config.has_qk_norm:
            out.append((f"{hp}.self_attn.q_norm.weight", fp + ("self_attn", "q_norm", "scale"), False))
            out.append((f"{hp}.self_attn.k_norm.weight", fp + ("self_attn", "k_norm", "scale"), False))
        out.append((f"{hp}.input_layernorm.weight", fp + ("input_layernorm", "scale"), False))
        out.append((f"{hp}.post_attention_layernorm.weight", fp + ("post_attention_layernorm", "scale"), False))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out.extend(_linear(f"{hp}.mlp.{proj}", fp + ("mlp", proj)))
            if config.mlp_bias:
                out.append((f"{hp}.mlp.{proj}.bias", fp + ("mlp", proj, "bias"), False))
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), True))
    return out


def expected_hf_shapes(config: TargetConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> expected tensor shape (PyTorch orientation)."""
    if hasattr(config, "hf_shapes"):
        return config.hf_shapes()
    c = config
    qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,),
              "lm_head.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_hidden_layers):
        hp = f"model.layers.{i}"
        for name, shp in {
            "self_attn.q_proj": (qd, c.hidden_size), "self_attn.k_proj": (kvd, c.hidden_size),
            "self_attn.v_proj": (kvd, c.hidden_size), "self_attn.o_proj": (c.hidden_size, qd),
            "mlp.gate_proj": (c.intermediate_size, c.hidden_size), "mlp.up_proj": (c.intermediate_size, c.hidden_size),
            "mlp.down_proj": (c.hidden_size, c.intermediate_size),
        }.items():
            shapes[f"{hp}.{name}.weight"] = shp
            shapes[f"{hp}.{name}.bias"] = (shp[0],)
        shapes[f"{hp}.self_attn.q_norm.weight"] = (c.head_dim,)
        shapes[f"{hp}.self_attn.k_norm.weight"] = (c.head_dim,)
        shapes[f"{hp}.input_layernorm.weight"] = (c.hidden_size,)
        shapes[f"{hp}.post_attention_layernorm.weight"] = (c.hidden_size,)
    return shapes


def ignored_extra_key(config: TargetConfig, key: str) -> bool:
    """True for a stored tensor the config's model does not use but may legitimately be there (vision tower)."""
    return bool(getattr(config, "hf_ignored_key", lambda k: False)(key))


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            raise CheckpointError(f"params have no entry {'/'.join(path)!r}")
        tree = tree[p]
    return tree


def hf_to_params(tensors: dict[str, np.ndarray], config: TargetConfig, *, source: str = "checkpoint",
                 dtype: Any = None, allow_extra: tuple[str, ...] = ("rotary_emb",)) -> dict:
    """Convert a flat HF state dict (numpy arrays) into our nested param dict.

    Raises CheckpointError naming the key for missing, unexpected or mis-shaped tensors.
    A tied checkpoint may omit `lm_head.weight`; an untied config requires it.
    """
    key_map = target_key_map(config)
    shapes = expected_hf_shapes(config)
    wanted = {k for k, _, _ in key_map}
    present = set(tensors)
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints still store it; ignore
    unexpected = sorted(k for k in present - wanted
                        if not any(a in k for a in allow_extra) and not ignored_extra_key(config, k))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} not used by a {config.family} model "
                              f"with this config.json")
    missing = sorted(wanted - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    params: dict = {}
    for hf_key, path, transpose in key_map:
        arr = tensors[hf_key]
        if tuple(arr.shape) != shapes[hf_key]:
            raise CheckpointError(f"{source}: tensor {hf_key!r} has shape {tuple(arr.shape)}, "
                                  f"expected {shapes[hf_key]} from config.json")
        if transpose:
            arr = np.ascontiguousarray(arr.T)
        if dtype is not None:
            arr = arr.astype(dtype)
        set_path(params, path, arr)
    return params


def params_to_hf(params: dict, config: TargetConfig) -> dict[str, np.ndarray]:
    """Our nested params -> flat HF state dict (PyTorch orientation, numpy arrays)."""
    out = {}
    for hf_key, path, transpose in target_key_map(config):
        arr = np.asarray(get_path(params, path))
        out[hf_key] = np.ascontiguousarray(arr.T) if transpose else arr
    return out
