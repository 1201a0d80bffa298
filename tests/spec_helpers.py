"""Tiny targets and drafts for speculative-decoding tests.

`near_bigram_target` makes a target whose next token depends mostly on the current token (the
attention and MLP outputs are scaled down), so its greedy map f(x) is known. `oracle_draft` then
builds a DSpark drafter whose sequential head encodes f: slot k predicts f(previous token), so
long runs of drafts are accepted — exercising the all-accepted bonus path and cache roll-back at
every offset — while the residual context dependence still causes rejections. With
`markov_rank=0` (DFlash) the zeroed draft layers make slot 0 predict f(anchor) only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import TargetConfig
from dspark_jax.draft.config import DraftConfig
from dspark_jax.draft.model import init_draft_params
from dspark_jax.target.model import TargetModel


def random_target(*, vocab: int = 48, layers: int = 2, hidden: int = 32, seed: int = 0, weight_scale: float = 8.0,
                  context_scale: float = 1.0, max_pos: int = 512) -> tuple[TargetConfig, dict]:
    """Random float32 Qwen3 target; `context_scale` < 1 shrinks attention/MLP outputs (more bigram-like)."""
    cfg = TargetConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                       max_position_embeddings=max_pos)
    tok = jnp.zeros((1, 1), jnp.int32)
    params = nn.meta.unbox(TargetModel(cfg).init(jax.random.PRNGKey(seed), tok, tok)["params"])
    params = jax.tree_util.tree_map(lambda x: x * weight_scale if x.ndim > 1 else x, params)
    for i in range(layers):
        layer = params[f"layers_{i}"]
        layer["self_attn"]["o_proj"]["kernel"] = layer["self_attn"]["o_proj"]["kernel"] * context_scale
        layer["mlp"]["down_proj"]["kernel"] = layer["mlp"]["down_proj"]["kernel"] * context_scale
    return cfg, params


def bigram_map(cfg: TargetConfig, params: dict) -> np.ndarray:
    """f(x) = argmax of the target logits when only the embedding path is kept: [V] int."""
    zeroed = jax.tree_util.tree_map(lambda x: x, params)
    for i in range(cfg.num_hidden_layers):
        zeroed[f"layers_{i}"]["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(
            params[f"layers_{i}"]["self_attn"]["o_proj"]["kernel"])
        zeroed[f"layers_{i}"]["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(
            params[f"layers_{i}"]["mlp"]["down_proj"]["kernel"])
    toks = jnp.arange(cfg.vocab_size, dtype=jnp.int32)[:, None]
    out = TargetModel(cfg).apply({"params": zeroed}, toks, jnp.zeros_like(toks))
    return np.asarray(jnp.argmax(out.logits[:, 0], axis=-1))


def oracle_draft(cfg: TargetConfig, params: dict, *, block_size: int, head: str = "vanilla", markov_rank: int | None = None,
                 confidence: bool = True, strength: float = 30.0, seed: int = 1) -> tuple[DraftConfig, dict]:
    """A DSpark (head='vanilla'|'gated'|'rnn') or DFlash (head='dflash') draft that knows f."""
    vocab = cfg.vocab_size
    dflash = head == "dflash"
    rank = 0 if dflash else (markov_rank or vocab)
    kw = dict(num_hidden_layers=1, block_size=block_size, mask_token_id=vocab - 1,
              target_layer_ids=(-1, 0), markov_rank=rank)
    if not dflash:
        kw.update(markov_head_type=head)
    kw.update(enable_confidence_head=confidence and not dflash)
    dcfg = DraftConfig.from_target(cfg, **kw)
    dp = init_draft_params(dcfg, jax.random.PRNGKey(seed))
    dp["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"]
    dp["lm_head"]["kernel"] = params["lm_head"]["kernel"]
    layer = dp["layers_0"]
    layer["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(layer["self_attn"]["o_proj"]["kernel"])
    layer["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(layer["mlp"]["down_proj"]["kernel"])
    if dflash:
        return dcfg, dp
    f = bigram_map(cfg, params)
    mh = dp["markov_head"]
    mh["markov_w1"]["embedding"] = jnp.eye(vocab, rank, dtype=jnp.float32)
    w2 = np.zeros((rank, vocab), np.float32)
    w2[np.arange(min(rank, vocab)), f[:rank]] = strength
    mh["markov_w2"]["kernel"] = jnp.asarray(w2)
    if head == "gated":  # gate ~ 1: behaves like the vanilla head
        mh["gate_proj"]["kernel"] = jnp.zeros_like(mh["gate_proj"]["kernel"])
        mh["gate_proj"]["bias"] = jnp.full_like(mh["gate_proj"]["bias"], 20.0)
    if head == "rnn":  # o-chunk = 20 * e  => tanh(o) ~ one-hot(prev)
        kern = np.zeros(mh["joint_proj"]["kernel"].shape, np.float32)
        kern[rank:2 * rank, 2 * rank:3 * rank] = 20.0 * np.eye(rank)
        mh["joint_proj"]["kernel"] = jnp.asarray(kern)
        mh["joint_proj"]["bias"] = jnp.zeros_like(mh["joint_proj"]["bias"])
    return dcfg, dp


def qwen3_4b_shaped_abstract(*, layers: int = 2, **draft_kw):
    """Abstract (ShapeDtypeStruct) target and draft params at Qwen3-4B widths, for lowering tests.

    Returns (target config, target params, draft config, draft params); draft_kw go to
    `DraftConfig.from_target` (one draft layer tapping target layer 0 unless overridden).
    """
    cfg = TargetConfig(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                       dtype="bfloat16")
    tok = jnp.zeros((1, 1), jnp.int32)
    tparams = jax.eval_shape(lambda: nn.meta.unbox(TargetModel(cfg).init(jax.random.PRNGKey(0), tok, tok)["params"]))
    dcfg = DraftConfig.from_target(cfg, **{"num_hidden_layers": 1, "mask_token_id": 151935,
                                           "target_layer_ids": (0,), **draft_kw})
    dparams = jax.eval_shape(lambda: init_draft_params(dcfg, jax.random.PRNGKey(1)))
    return cfg, tparams, dcfg, dparams
