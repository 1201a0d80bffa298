"""The target's cached and packed verify attention through `dspark_jax.kernels` (backend="pallas",
interpreted on CPU) against the XLA path, and the engine round with backend="pallas" lowering for TPU and CUDA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.sampling import SamplingMode
from dspark_jax.target.model import TargetModel
from infer.autoregressive import prefill
from infer.engine.core import EngineSpec, EngineState, engine_round
from infer.ragged import pack_chunks, packed_target_forward
from tests.spec_helpers import qwen3_4b_shaped_abstract, random_target


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
    """One packed greedy engine round (the ragged attention kernel in prefill-free verify) lowers at Qwen3-4B widths."""
    cfg, tparams, dcfg, dparams = qwen3_4b_shaped_abstract(block_size=3)
    spec = EngineSpec(config=cfg, dcfg=dcfg, slots=2, cache_len=64, gamma=3, mode=SamplingMode(greedy=True),
                      backend="pallas")
    state = jax.eval_shape(lambda: EngineState.create(spec))
    sds = jax.ShapeDtypeStruct
    lowered = engine_round.trace(tparams, dparams, sds((cfg.hidden_size, cfg.vocab_size), jnp.bfloat16), state,
                                 sds((2,), jnp.int32), sds((2,), jnp.bool_), sds((3,), jnp.float32),
                                 spec=spec, bucket=8).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text.lower())
