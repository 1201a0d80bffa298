"""Pallas kernels (pallas_kernels/) vs their jnp references, in interpret mode on CPU, and their
lowering for TPU (Mosaic) and CUDA (Triton) from this host at a Qwen3-4B-shaped config.

Interpret mode compiles slowly, so every kernel is checked at one or two odd, tiny shapes (one
compile each) with random contents; both platform variants (TPU grid/scratch, GPU in-program
loops) run where their bodies differ. The references are tied to the library's own code paths
(model attention, sampling.warp_probs, verify.greedy_verify, heads.markov_step, block_attention).
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import kernels
from dspark_jax.draft import heads
from dspark_jax.draft.model import block_attention
from dspark_jax.layers import gqa_attention
from dspark_jax.sampling import SamplingConfig, warp_probs
from infer.verify import greedy_verify
from pallas_kernels import draft_train_attention as dta
from pallas_kernels import fused_verify as fv
from pallas_kernels import markov_sampler as ms
from pallas_kernels import ragged_attention as ra
from tests.test_speculative import chi_square_pvalue

ALPHA = 1e-4  # chi-square false-alarm rate (as tests/test_speculative.py)


def _warp(logits, cfg: SamplingConfig):
    """dspark_jax.sampling.warp_probs for one config (its traced values: `params()`, or `values()` before
    per-row sampling parameters existed)."""
    values = cfg.params() if hasattr(cfg, "params") else cfg.values()
    return warp_probs(logits, values, cfg.mode)


# ----------------------------------------------------------------------------- ragged attention

def _packed_case(rng, dtype):
    """3 slots (one idle), chunks of 3 and 2 tokens, 2 padding tokens; S=37, KVH=2, G=3, D=12."""
    r, s, kvh, g, d = 3, 37, 2, 3, 12
    cached, chunk = np.array([5, 0, 20]), np.array([3, 0, 2])
    slot, pos = [], []
    for i in range(r):
        slot += [i] * chunk[i]
        pos += list(cached[i] + np.arange(chunk[i]))
    slot, pos = np.array(slot + [r, r]), np.array(pos + [0, 0])
    t = len(slot)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    return (f(t, kvh * g, d), f(r, s, kvh, d), f(r, s, kvh, d), jnp.asarray(slot, jnp.int32),
            jnp.asarray(pos, jnp.int32), jnp.asarray(cached + chunk, jnp.int32))


def test_cached_attention_equals_model_attention():
    """Fixed batch = packed layout with equal chunks: reference and kernel equal layers.gqa_attention."""
    rng = np.random.default_rng(0)
    b, k1, s, kvh, g, d = 2, 3, 16, 2, 2, 8
    q = jnp.asarray(rng.normal(size=(b, k1, kvh * g, d)), jnp.float32)
    kc = jnp.asarray(rng.normal(size=(b, s, kvh, d)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(b, s, kvh, d)), jnp.float32)
    start = np.array([4, 9])
    pos = start[:, None] + np.arange(k1)
    mask = jnp.arange(s)[None, None, :] <= jnp.asarray(pos)[:, :, None]
    want = gqa_attention(q, kc, vc, mask, d ** -0.5)
    got = jax.jit(ra.reference_ragged_attention, static_argnames="max_chunk")(q.reshape(b * k1, kvh * g, d), kc, vc, jnp.repeat(jnp.arange(b), k1),
                                        jnp.asarray(pos.reshape(-1), jnp.int32), jnp.asarray(start + k1, jnp.int32),
                                        max_chunk=k1)
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), np.asarray(want), atol=2e-6)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_ragged_attention_kernel_equals_reference(platform):
    args = _packed_case(np.random.default_rng(1), jnp.bfloat16)
    want = jax.jit(ra.reference_ragged_attention, static_argnames="max_chunk")(*args, max_chunk=4).astype(jnp.float32)
    got = ra.ragged_attention(*args, max_chunk=4, platform=platform, interpret=True).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2)
    assert float(jnp.abs(got[-2:]).max()) == 0.0  # padding tokens
    assert float(jnp.abs(want).max()) > 0.1


# ----------------------------------------------------------------------------- fused verify

def _verify_case(rng, r=6, k=3, v=300):
    logits = jnp.asarray(rng.normal(size=(r, k + 1, v)) * 2, jnp.float32)
    pd = jax.nn.softmax(logits[:, :k] + jnp.asarray(rng.normal(size=(r, k, v)) * 0.7, jnp.float32), -1)
    pd64 = np.asarray(pd, np.float64)
    x = np.array([[rng.choice(v, p=pd64[i, j] / pd64[i, j].sum()) for j in range(k)] for i in range(r)])
    x[0] = np.argmax(np.asarray(logits[0, :k]), -1)  # a greedy row that accepts everything
    temp = jnp.asarray([0.0, 1.0, 0.7, 1.0, 1.3, 0.0], jnp.float32)
    top_k = jnp.asarray([0, 5, 0, 20, 0, 0])
    top_p = jnp.asarray([1.0, 1.0, 0.8, 0.9, 1.0, 1.0])
    cuts = jax.jit(fv.warp_cuts, static_argnames=("top_k_bound", "use_top_p"))(
        logits, temp[:, None], top_k[:, None], top_p[:, None], top_k_bound=64, use_top_p=True)
    num = jnp.asarray([3, 3, 2, 3, 1, 0], jnp.int32)
    return logits, jnp.asarray(x, jnp.int32), pd, num, temp, cuts


def test_warp_cuts_keep_the_sampling_allowed_set():
    """The cut reproduces dspark_jax.sampling.warp_probs' kept set and probabilities."""
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, 50)) * 3, jnp.float32)
    for cfg in (SamplingConfig(temperature=0.8, top_k=7), SamplingConfig(temperature=1.0, top_p=0.7),
                SamplingConfig(temperature=1.2, top_k=10, top_p=0.6)):
        want = _warp(logits, cfg)
        cut = fv.warp_cuts(logits, jnp.full((4,), cfg.temperature), jnp.full((4,), cfg.top_k),
                           jnp.full((4,), cfg.top_p), top_k_bound=64 if cfg.top_k else 0, use_top_p=cfg.top_p < 1)
        z = logits / cfg.temperature
        got = jax.nn.softmax(jnp.where(z >= cut[:, None], z, -jnp.inf), -1)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_fused_verify_kernel_equals_reference_exactly():
    rng = np.random.default_rng(3)
    logits, x, pd, num, temp, cuts = _verify_case(rng)
    for seed in (0, 12345):
        seeds = jnp.arange(6, dtype=jnp.uint32) * 7919 + seed
        want = jax.jit(fv.reference_fused_verify)(logits, x, pd, num, temp, cuts, seeds)
        got = fv.fused_verify(logits, x, pd, num, temp, cuts, seeds, platform="tpu", interpret=True, tile=128)
        assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
    # greedy rows (0 and 5) follow the token-id path of infer.verify.greedy_verify
    g = greedy_verify(x, jnp.argmax(logits, -1).astype(jnp.int32), num, jnp.asarray([-1], jnp.int32))
    assert [int(got[0][i]) for i in (0, 5)] == [int(g.accepted[i]) for i in (0, 5)]
    assert [int(got[1][i]) for i in (0, 5)] == [int(g.next_token[i]) for i in (0, 5)]
    assert int(got[0][0]) == 3  # the all-accepted greedy row takes the bonus


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.75)])
def test_fused_verify_keeps_the_target_distribution(top_k, top_p):
    """First two emitted tokens ~ p_t[0] x p_t[1] (target rows independent of the prefix here), T = 1."""
    rng = np.random.default_rng(4)
    n, k, v = 20000, 2, 6
    lt = jnp.asarray(rng.normal(size=(k + 1, v)) * 1.5, jnp.float32)
    pd = jax.nn.softmax(jnp.asarray(rng.normal(size=(k, v)) * 1.5, jnp.float32), -1)
    pd64 = np.asarray(pd, np.float64)
    x = np.stack([rng.choice(v, size=n, p=pd64[i] / pd64[i].sum()) for i in range(k)], 1)
    logits = jnp.broadcast_to(lt, (n, k + 1, v))
    ones = jnp.ones((n,), jnp.float32)
    cuts = fv.warp_cuts(logits, ones[:, None], jnp.full((n, 1), top_k), jnp.full((n, 1), top_p),
                        top_k_bound=64 if top_k else 0, use_top_p=top_p < 1)
    acc, nxt = jax.jit(fv.reference_fused_verify)(logits, jnp.asarray(x, jnp.int32), jnp.broadcast_to(pd, (n, k, v)),
                                                   jnp.full((n,), k, jnp.int32), ones, cuts,
                                                   jnp.asarray(np.arange(n, dtype=np.uint64) * 2654435761 % 2 ** 32, jnp.uint32))
    acc, nxt = np.asarray(acc), np.asarray(nxt)
    first = np.where(acc >= 1, x[:, 0], nxt)
    second = np.where(acc >= 2, x[:, 1], np.where(acc == 1, nxt, -1))
    rows = second >= 0  # the first token was a draft: the second emitted token exists in this round
    cfg = SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p)
    pt = np.asarray(_warp(lt, cfg), np.float64)
    assert chi_square_pvalue(np.bincount(first, minlength=v), pt[0]) > ALPHA
    counts = np.bincount(first[rows] * v + second[rows], minlength=v * v).reshape(v, v)
    for t0 in range(v):  # given the first token, the second ~ p_t[1]
        if counts[t0].sum() >= 200:
            assert chi_square_pvalue(counts[t0], pt[1]) > ALPHA


# ----------------------------------------------------------------------------- Markov sampler

def _sampler_case(rng, head_type):
    b, k, v, d, r = 5, 3, 200, 12, 6
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    head = dict(head_type=head_type, gate_w=f(d + r, r), gate_b=f(r), conf_w=f(d + r, 1), conf_b=f(1))
    args = (f(b, k, v) * 2, f(b, k, d), jnp.asarray(rng.integers(0, v, b), jnp.int32),
            jnp.asarray([0.0, 1.0, 0.7, 1.5, 0.0], jnp.float32), jnp.arange(b, dtype=jnp.uint32) * 1000003,
            f(v, r), f(r, v))
    return args, head


@pytest.mark.parametrize("head_type,platform", [("vanilla", "gpu"), ("gated", "tpu")])
def test_markov_sampler_kernel_equals_reference(head_type, platform):
    args, head = _sampler_case(np.random.default_rng(5), head_type)
    want = jax.jit(ms.reference_markov_sampler, static_argnames="head_type")(*args, **head)
    got = ms.markov_sampler(*args, platform=platform, interpret=True, tile=128 if platform == "tpu" else 64, **head)
    assert got[0].tolist() == want[0].tolist()
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), atol=1e-5)


def test_markov_reference_uses_the_heads_math():
    """Bias, confidence and greedy tokens of the reference == heads.markov_step / confidence_logits."""
    (u, h, anchor, temp, seeds, w1, w2), head = _sampler_case(np.random.default_rng(6), "gated")
    greedy = jnp.zeros_like(temp)
    toks, probs, conf = jax.jit(ms.reference_markov_sampler, static_argnames="head_type")(
        u, h, anchor, greedy, seeds, w1, w2, **head)
    mp = {"markov_w1": {"embedding": w1}, "markov_w2": {"kernel": w2},
          "gate_proj": {"kernel": head["gate_w"], "bias": head["gate_b"]}}
    cp = {"proj": {"kernel": head["conf_w"], "bias": head["conf_b"]}}
    prev = anchor
    for i in range(u.shape[1]):
        bias, _ = heads.markov_step(mp, "gated", prev, h[:, i], heads.init_state((5,), 6))
        np.testing.assert_array_equal(np.asarray(toks[:, i]), np.asarray(jnp.argmax(u[:, i] + bias, -1)))
        np.testing.assert_allclose(np.asarray(conf[:, i]), np.asarray(heads.confidence_logits(cp, h[:, i], prev, mp)),
                                   atol=1e-5)
        prev = toks[:, i]


def test_markov_sampler_draws_from_the_warped_distribution():
    """Slot-0 draws over many seeds ~ softmax(Z_0 / T) (chi-square)."""
    rng = np.random.default_rng(7)
    n, v, d, r = 20000, 8, 4, 3
    u = jnp.broadcast_to(jnp.asarray(rng.normal(size=(1, 1, v)), jnp.float32), (n, 1, v))
    w1, w2 = jnp.asarray(rng.normal(size=(v, r)), jnp.float32), jnp.asarray(rng.normal(size=(r, v)), jnp.float32)
    anchor = jnp.full((n,), 2, jnp.int32)
    temp = jnp.full((n,), 0.8, jnp.float32)
    toks, probs, _ = jax.jit(ms.reference_markov_sampler)(u, jnp.zeros((n, 1, d)), anchor, temp,
                                                           jnp.arange(n, dtype=jnp.uint32), w1, w2)
    expected = np.asarray(probs[0, 0], np.float64)
    assert chi_square_pvalue(np.bincount(np.asarray(toks[:, 0]), minlength=v), expected) > ALPHA


# ----------------------------------------------------------------------------- training attention

def test_draft_train_attention_forward_and_gradient():
    rng = np.random.default_rng(8)
    b, n, k, h, kvh, d, s = 2, 3, 3, 4, 2, 8, 11
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    xs = (f(b, n, k, h, d), f(b, s, kvh, d), f(b, s, kvh, d), f(b, n, k, kvh, d), f(b, n, k, kvh, d))
    pos = jnp.asarray(np.stack([np.arange(s), rng.permutation(s)]), jnp.int32)
    anchor = jnp.asarray(rng.integers(0, s + 2, (b, n)), jnp.int32)
    keep = jnp.asarray([[True, False, True], [True, True, True]])  # one dummy block
    scale = d ** -0.5
    w = f(b, n, k, h, d)

    def model_path(q, ck, cv, bk, bv):  # the current jnp path of the draft model
        return block_attention(q, ck, cv, pos[:, None, :] < anchor[:, :, None], bk, bv, keep, scale)

    def kernel_path(*a):
        return dta.draft_train_attention(*a, pos, anchor, keep, scale, platform="gpu", interpret=True)

    np.testing.assert_allclose(np.asarray(kernel_path(*xs)), np.asarray(model_path(*xs)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(dta.reference_draft_train_attention(*xs, pos, anchor, keep, scale)),
                               np.asarray(model_path(*xs)), atol=1e-6)
    grad = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2, 3, 4))(*xs)
    for got, want in zip(grad(kernel_path), grad(model_path)):
        assert bool(jnp.all(jnp.isfinite(got)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


# ----------------------------------------------------------------------------- lowering, dispatch, info

@pytest.mark.parametrize("name", sorted(kernels.REGISTRY))
def test_kernel_lowers_for_tpu_and_cuda(name):
    """Each kernel lowers (Mosaic TPU / Triton CUDA) at its Qwen3-4B-shaped case from this CPU host."""
    for platform in ("tpu", "cuda"):
        ok, err = kernels.lowers(name, platform)
        assert ok, f"{name} does not lower for {platform}: {err}"


def test_kernels_lower_at_odd_real_shapes():
    """GQA 8:1, vocab 128,256 (Llama 3), K = 15, cache and context lengths that are not powers of two."""
    sd, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    r, s, t = 5, 3000, 40
    attn = (sd((t, 32, 128), bf), sd((r, s, 4, 128), bf), sd((r, s, 4, 128), bf), sd((t,), jnp.int32),
            sd((t,), jnp.int32), sd((r,), jnp.int32))
    k, v = 15, 128256
    ver = (sd((r, k + 1, v), jnp.float32), sd((r, k), jnp.int32), sd((r, k, v), jnp.float32), sd((r,), jnp.int32),
           sd((r,), jnp.float32), sd((r, k + 1), jnp.float32), sd((r,), jnp.uint32))
    for platform, target in (("tpu", "tpu"), ("gpu", "cuda")):
        jax.jit(lambda *a: ra.ragged_attention(*a, max_chunk=16, platform=platform)).trace(*attn).lower(
            lowering_platforms=(target,))
        jax.jit(lambda *a: fv.fused_verify(*a, platform=platform)).trace(*ver).lower(lowering_platforms=(target,))


def test_backend_switch_on_cpu():
    assert kernels.resolve_backend("auto") == "xla"  # CPU host
    assert kernels.resolve_backend("pallas") == "pallas"
    with pytest.raises(kernels.KernelBackendError, match="backend must be one of"):
        kernels.resolve_backend("cuda")
    args = _packed_case(np.random.default_rng(1), jnp.float32)
    xla = kernels.attention(*args, max_chunk=4, backend="xla")
    pallas = jax.jit(lambda *a: kernels.attention(*a, max_chunk=4, backend="pallas"))(*args)  # interpret on CPU
    np.testing.assert_allclose(np.asarray(pallas), np.asarray(xla), atol=1e-5)


def test_dspark_info_json_lists_kernels():
    from dspark_cli.info_cmd import info_main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert info_main(["--json"]) == 0
    info = json.loads(buf.getvalue())
    assert info["jax_backend"] == "cpu" and info["num_devices"] >= 1
    assert set(info["kernels"]) == set(kernels.REGISTRY)
    assert all(row["active"] is False and "lowers" not in row for row in info["kernels"].values())
    assert info["mesh_suggestion"]["data"] * info["mesh_suggestion"]["model"] == info["num_devices"]


def test_verify_packed_equals_per_slot_verify():
    """The packed layout (chunks of different lengths, an idle slot, padding) gives the per-slot result."""
    rng = np.random.default_rng(9)
    logits, x, pd, num, temp, cuts = _verify_case(rng)
    r, k1, v = logits.shape
    seeds = jnp.arange(r, dtype=jnp.uint32) + 5
    rows, slot = [], []
    for i in range(r):  # slot i's chunk = anchor + its num[i] drafts (slot 5 proposes nothing: idle)
        n = int(num[i]) + 1 if int(num[i]) > 0 else 0
        rows += [logits[i, j] for j in range(n)]
        slot += [i] * n
    packed = jnp.stack(rows + [jnp.zeros((v,))] * 3)  # 3 padding tokens
    slot = jnp.asarray(slot + [r] * 3, jnp.int32)
    got = kernels.verify_packed(packed, slot, x, pd, num, temp, cuts, seeds, block_size=k1 - 1, backend="xla")
    want = jax.jit(fv.reference_fused_verify)(logits, x, pd, num, temp, cuts, seeds)
    live = [i for i in range(r) if int(num[i]) > 0]  # an idle slot's outputs are meaningless
    assert [int(got[0][i]) for i in live] == [int(want[0][i]) for i in live]
    assert [int(got[1][i]) for i in live] == [int(want[1][i]) for i in live]
