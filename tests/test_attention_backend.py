"""The target's cached and packed verify attention through `dspark_jax.kernels` (backend="pallas",
interpreted on CPU) against the XLA path, and the engine round with backend="pallas" lowering for TPU and CUDA."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.config import TargetConfig
from dspark_jax.draft.config import DraftConfig
from dspark_jax.draft.model import init_draft_params
from dspark_jax.sampling import SamplingMode
from dspark_jax.target.model import TargetModel
from infer.autoregressive import prefill
from infer.engine.core import EngineSpec, EngineState, engine_round
from infer.ragged import pack_chunks, packed_target_forward
from tests.spec_helpers import random_target


def test_cached_and_packed_attention_pallas_equals_xla():
    """Prefill, fixed-batch verify and packed verify give the XLA path's logits and caches with the kernel."""
    cfg, params = random_target(vocab=32, layers=1, hidden=32, seed=5)
    rng = np.random.default_rng(0)
    lens = jnp.asarray([5, 3, 6])
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 6)), jnp.int32)
    chunk = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 3)), jnp.int32)
    ell, active = jnp.asarray([2, 0, 1]), jnp.asarray([True, True, False])
    packed = pack_chunks(chunk[:, 0], chunk[:, 1:], ell, lens, active, bucket=8)
    out = {}
    for backend in ("xla", "pallas"):
        model = TargetModel(cfg, live_bucket_min=4, attention_backend=backend)
        logits0, cache, _ = prefill(model, params, prompts, lens, 16)
        dense = model.apply({"params": params}, chunk, lens[:, None] + jnp.arange(3)[None, :], cache)
        plog, pcache, _ = jax.jit(functools.partial(packed_target_forward, cfg, backend=backend, max_chunk=3))(
            params, packed, cache)
        out[backend] = (logits0, dense.logits, dense.cache.k[0], plog, pcache.k[0])
    for a, b in zip(out["xla"], out["pallas"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_engine_round_with_pallas_lowers(platform):
    """One packed engine round (ragged attention + sampler) lowers at Qwen3-4B widths (2 layers)."""
    cfg = TargetConfig(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=2,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                       dtype="bfloat16")
    tok = jnp.zeros((1, 1), jnp.int32)
    tparams = jax.eval_shape(lambda: nn.meta.unbox(TargetModel(cfg).init(jax.random.PRNGKey(0), tok, tok)["params"]))
    dcfg = DraftConfig.from_target(cfg, num_hidden_layers=1, block_size=3, mask_token_id=151935,
                                   target_layer_ids=(0,))
    dparams = jax.eval_shape(lambda: init_draft_params(dcfg, jax.random.PRNGKey(1)))
    spec = EngineSpec(config=cfg, dcfg=dcfg, slots=2, cache_len=64, gamma=3, mode=SamplingMode(greedy=True),
                      backend="pallas")
    state = jax.eval_shape(lambda: EngineState.create(spec))
    sds = jax.ShapeDtypeStruct
    lowered = engine_round.trace(tparams, dparams, sds((cfg.hidden_size, cfg.vocab_size), jnp.bfloat16), state,
                                 sds((2,), jnp.int32), sds((2,), jnp.bool_), sds((3,), jnp.float32),
                                 spec=spec, bucket=8).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text.lower())
