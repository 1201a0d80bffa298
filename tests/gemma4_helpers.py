"""Tiny random Gemma 4 reference models built offline with transformers (float32), for parity tests.

`make_gemma4_model(out_dir, case)` builds one of `GEMMA4_CASES`: each exercises a set of Gemma 4
features (sliding/full layer mix with their own head dims and KV heads, `attention_k_eq_v`,
proportional partial RoPE with `factor`, soft-capped logits, KV sharing + double-wide MLP,
tied/untied output, multimodal-wrapper vs text-only checkpoint layout). Weights are re-drawn like
`tests.helpers.make_hf_model` (std 0.2, norms 1 +- 0.1) and the `layer_scalar` buffers too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers

from tests.helpers import EOS_ID, PAD_ID, _reinit_

__all__ = ["GEMMA4_BASE", "GEMMA4_CASES", "gemma4_text_config", "make_gemma4_model"]

SW, FA = "sliding_attention", "full_attention"

GEMMA4_BASE: dict[str, Any] = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, global_head_dim=16, sliding_window=4,
    layer_types=[SW, FA, SW, SW, FA], hidden_size_per_layer_input=0, max_position_embeddings=256,
    rms_norm_eps=1e-6, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
)

# name -> (text-config overrides, save as the multimodal wrapper?)
GEMMA4_CASES: dict[str, tuple[dict[str, Any], bool]] = {
    # the released-config feature set: k_eq_v on full layers with their own KV-head count,
    # proportional partial RoPE, soft-capped logits, tied output, wrapper checkpoint layout
    "wrapper_keqv_prop_softcap": (dict(
        attention_k_eq_v=True, num_global_key_value_heads=1, final_logit_softcapping=4.0, tie_word_embeddings=True,
        rope_parameters={SW: {"rope_type": "default", "rope_theta": 10000.0},
                         FA: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}), True),
    # KV sharing across layers (last 2 layers reuse layers 2 / 1) with double-wide MLPs, separate
    # v_proj on full layers, proportional RoPE with factor, untied lm_head, text-only layout
    "causal_kvshare_doublewide": (dict(
        attention_k_eq_v=False, num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=None,
        tie_word_embeddings=False,
        rope_parameters={SW: {"rope_type": "default", "rope_theta": 100.0},
                         FA: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4,
                              "factor": 2.0}}), False),
}


def gemma4_text_config(**overrides: Any) -> transformers.Gemma4TextConfig:
    """A tiny `Gemma4TextConfig` (no per-layer inputs, no MoE): `GEMMA4_BASE` plus `overrides`."""
    kw = dict(GEMMA4_BASE)
    kw.update(overrides)
    return transformers.Gemma4TextConfig(**kw)


def make_gemma4_model(out_dir: str | os.PathLike | None, case: str, *, seed: int = 0, std: float = 0.2,
                      **overrides: Any) -> tuple[torch.nn.Module, Path | None]:
    """Build `GEMMA4_CASES[case]` (plus overrides), save it to `out_dir` if given -> (HF model, dir)."""
    text_kw, wrapper = GEMMA4_CASES[case]
    text = gemma4_text_config(**{**text_kw, **overrides})
    torch.manual_seed(seed)
    if wrapper:
        config = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None,
                                           tie_word_embeddings=text.tie_word_embeddings)
        model = transformers.Gemma4ForConditionalGeneration(config)
    else:
        model = transformers.Gemma4ForCausalLM(text)
    model = model.to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    _reinit_(model, seed, std)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):
                buf.copy_(1.0 + 0.1 * torch.randn(buf.shape, generator=gen))
    if out_dir is None:
        return model, None
    out = Path(out_dir)
    model.save_pretrained(out)
    return model, out
