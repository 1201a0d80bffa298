"""Cached attention costs the live length: bucketed key slices give the full-capacity results."""

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.layers import cached_attention, gqa_attention, live_buckets
from dspark_jax.target.kv_cache import KVCache
from dspark_jax.target.model import TargetModel
from tests.spec_helpers import random_target


def test_live_buckets_are_powers_of_two_then_capacity():
    assert live_buckets(16384, 256) == (256, 512, 1024, 2048, 4096, 8192, 16384)
    assert live_buckets(960, 256) == (256, 512, 960)
    assert live_buckets(64, 256) == (64,)
    assert live_buckets(1024, 0) == (1024,)
    assert live_buckets(1 << 20, 16, max_buckets=3) == (1 << 18, 1 << 19, 1 << 20)


def test_cached_attention_matches_full_mask_in_every_bucket():
    rng = np.random.RandomState(0)
    b, t, h, kvh, d, s = 2, 3, 4, 2, 8, 64
    q = jnp.asarray(rng.randn(b, t, h, d), jnp.float32)
    k = jnp.asarray(rng.randn(b, s, kvh, d), jnp.float32)
    v = jnp.asarray(rng.randn(b, s, kvh, d), jnp.float32)
    fn = jax.jit(lambda q, k, v, pos: cached_attention(q, k, v, pos, 0.3, live_buckets(s, 8)))
    for start in (0, 5, 7, 13, 30, 61):  # lands in buckets 8, 16, 32, 64
        pos = jnp.asarray([[start, start + 1, start + 2], [max(start - 4, 0)] * 3], jnp.int32)
        mask = jnp.arange(s)[None, None, :] <= pos[:, :, None]
        ref = gqa_attention(q, k, v, mask, 0.3)
        np.testing.assert_allclose(np.asarray(fn(q, k, v, pos)), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_target_decode_and_verify_equal_full_capacity_path():
    cfg, params = random_target(vocab=64, hidden=32, layers=1, max_pos=512)
    capacity = 256
    rng = np.random.RandomState(1)
    prompt = jnp.asarray(rng.randint(0, 64, (2, 100)), jnp.int32)
    outs = {}
    for bucket_min in (0, 32):
        model = TargetModel(cfg, live_bucket_min=bucket_min)

        @jax.jit
        def run(params, prompt):
            cache = KVCache.create(cfg, 2, capacity)
            pos = jnp.broadcast_to(jnp.arange(100, dtype=jnp.int32), (2, 100))
            res = model.apply({"params": params}, prompt, pos, cache)
            cache = res.cache.with_lengths(jnp.asarray([100, 40], jnp.int32))
            logits = [res.logits]
            for start in (jnp.asarray([100, 40]), jnp.asarray([130, 20])):  # verify 8 tokens, then decode 1
                toks = prompt[:, :8]
                vpos = start[:, None].astype(jnp.int32) + jnp.arange(8, dtype=jnp.int32)
                res = model.apply({"params": params}, toks, vpos, cache)
                logits.append(res.logits)
                dec = model.apply({"params": params}, toks[:, :1], start[:, None].astype(jnp.int32) + 8, res.cache)
                logits.append(dec.logits)
            return logits

        outs[bucket_min] = run(params, prompt)
    for full, live in zip(outs[0], outs[32]):
        np.testing.assert_allclose(np.asarray(live), np.asarray(full), rtol=1e-5, atol=1e-5)
