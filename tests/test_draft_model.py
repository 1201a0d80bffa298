"""DSpark draft model: train/infer equivalence (spec §11), efficient vs dense training attention,
NaN safety with dummy blocks, draft KV-cache commits, and the sequential / confidence heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.config import TargetConfig
from dspark_jax.draft import (DraftCache, DraftConfig, DraftModel, heads, init_draft_params, make_block_tokens,
                              trainable_mask)

TOL = dict(rtol=2e-5, atol=2e-5)  # float32 throughout; only summation order differs

TARGET = TargetConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0)
MASK = 63
K = 3


def _spread(params, seed=0, std=0.3):
    """Re-draw params with a larger spread (non-uniform attention) and non-trivial norms/biases."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        noise = jax.random.normal(key, leaf.shape, jnp.float32)
        if "scale" in name:
            out.append(1.0 + 0.1 * noise)
        elif "bias" in name:
            out.append(0.1 * noise)
        else:
            out.append(std * noise)
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="module")
def setup():
    cfg = DraftConfig.from_target(TARGET, mask_token_id=MASK, num_hidden_layers=2, block_size=K,
                                  target_layer_ids=(-1, 2, 4), markov_rank=4, markov_head_type="vanilla")
    params = _spread(init_draft_params(cfg, jax.random.key(0)))
    return cfg, DraftModel(cfg), params


def _train_fn(model, dense=False):
    return jax.jit(lambda p, ctx, toks, anchors, keep: model.apply(
        {"params": p}, ctx, toks, anchors, keep, dense_reference=dense, method=DraftModel.train_forward))


def test_param_tree_and_init(setup):
    cfg, _, _ = setup
    p = init_draft_params(cfg, jax.random.key(1))
    assert p["fc"]["kernel"].shape == (3 * 16, 16)
    assert p["markov_head"]["markov_w1"]["embedding"].shape == (64, 4)
    assert p["markov_head"]["markov_w2"]["kernel"].shape == (4, 64)
    assert p["confidence_head"]["proj"]["kernel"].shape == (16 + 4, 1)
    assert set(p) == {"embed_tokens", "fc", "hidden_norm", "layers_0", "layers_1", "norm", "lm_head",
                      "markov_head", "confidence_head"}
    np.testing.assert_array_equal(p["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(p["hidden_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(p["confidence_head"]["proj"]["bias"], 0.0)
    assert 0.01 < float(jnp.std(p["fc"]["kernel"])) < 0.03  # N(0, initializer_range)
    mask = trainable_mask(p)
    assert mask["embed_tokens"]["embedding"] is False and mask["lm_head"]["kernel"] is False
    assert mask["fc"]["kernel"] is True


def test_train_infer_equivalence(setup):
    """One anchor per block: the packed training forward (mask j < p) == inference block_forward with the
    context fed in one go, and == the context fed over 3 rounds through the draft cache with a different
    number of committed rows per batch row (garbage in the non-committed rows)."""
    cfg, model, params = setup
    b, s = 2, 11
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(b, s, cfg.context_dim)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, MASK, size=(b, s + 1)), jnp.int32)
    # cumulative context lengths after each round (= anchor positions), different per row
    anchors = np.array([[3, 4, 9], [1, 6, 11]], np.int32)
    n = anchors.shape[1]
    toks = make_block_tokens(jnp.take_along_axis(ids, jnp.asarray(anchors), axis=1), K, MASK)
    keep = jnp.ones((b, n), bool)
    h_train = _train_fn(model)(params, feats, toks, jnp.asarray(anchors), keep)
    h_dense = _train_fn(model, dense=True)(params, feats, toks, jnp.asarray(anchors), keep)
    np.testing.assert_allclose(h_train, h_dense, **TOL)

    ctx_h = model.apply({"params": params}, feats, method=DraftModel.project_context)
    block_fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=DraftModel.block_forward))
    logits_fn = jax.jit(lambda p, h: model.apply({"params": p}, h, method=DraftModel.compute_logits))
    cache_len = 16

    # (a) whole context in one go, for the last anchor of each row
    last = anchors[:, -1]
    valid = jnp.arange(s)[None, :] < jnp.asarray(last)[:, None]
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    h1, u1, c1 = block_fn(params, toks[:, -1], jnp.asarray(last)[:, None] + jnp.arange(K), DraftCache.create(
        cfg, b, cache_len), ctx_h, pos, valid)
    np.testing.assert_allclose(h1, h_train[:, -1], **TOL)
    np.testing.assert_allclose(u1, logits_fn(params, h_train[:, -1]), **TOL)
    assert u1.dtype == jnp.float32 and u1.shape == (b, K, cfg.vocab_size)
    np.testing.assert_array_equal(c1.lengths, last)

    # (b) the same context over 3 rounds; new rows left-aligned in a fixed [B, 6] window
    width = 6
    cache = DraftCache.create(cfg, b, cache_len)
    prev = np.zeros(b, np.int32)
    garbage = jnp.asarray(rng.normal(size=(b, width, cfg.hidden_size)) * 50, jnp.float32)
    for r in range(n):
        cnt = anchors[:, r] - prev
        src = np.minimum(prev[:, None] + np.arange(width), s - 1)
        new_valid = np.arange(width)[None, :] < cnt[:, None]
        new_ctx = jnp.where(jnp.asarray(new_valid)[..., None], jnp.take_along_axis(ctx_h, jnp.asarray(src)[..., None],
                                                                                  axis=1), garbage)
        new_pos = jnp.asarray(prev[:, None] + np.arange(width), jnp.int32)
        blk_pos = jnp.asarray(anchors[:, r])[:, None] + jnp.arange(K)
        h_r, u_r, cache = block_fn(params, toks[:, r], blk_pos, cache, new_ctx, new_pos, jnp.asarray(new_valid))
        np.testing.assert_allclose(h_r, h_train[:, r], **TOL)
        np.testing.assert_array_equal(cache.lengths, anchors[:, r])
        prev = anchors[:, r]
    # committed keys of layer 0 equal the one-shot cache; rows past the length were never written
    for row in range(b):
        np.testing.assert_allclose(cache.k[0][row, :last[row]], c1.k[0][row, :last[row]], **TOL)
        np.testing.assert_array_equal(cache.k[0][row, last[row]:], 0.0)
    err = float(jnp.max(jnp.abs(h_r - h_train[:, -1])))
    print(f"train/infer max |dh| = {err:.2e}")


def test_efficient_vs_dense_with_dummies_and_grads(setup):
    cfg, model, params = setup
    b, s, n = 2, 8, 4
    rng = np.random.default_rng(1)
    feats = jnp.asarray(rng.normal(size=(b, s, cfg.context_dim)), jnp.float32)
    anchors = jnp.asarray([[0, 2, 5, 0], [3, 7, 0, 0]], jnp.int32)  # anchor 0: no visible context
    keep = jnp.asarray([[True, True, True, False], [True, True, False, False]])
    toks = jnp.asarray(rng.integers(0, 64, size=(b, n, K)), jnp.int32)
    h_eff = _train_fn(model)(params, feats, toks, anchors, keep)
    h_dense = _train_fn(model, dense=True)(params, feats, toks, anchors, keep)
    assert bool(jnp.all(jnp.isfinite(h_eff)))
    np.testing.assert_allclose(h_eff, h_dense, **TOL)
    print(f"efficient vs dense max |dh| = {float(jnp.max(jnp.abs(h_eff - h_dense))):.2e}")

    w = jnp.asarray(rng.normal(size=h_eff.shape), jnp.float32)

    def loss(p, dense):  # includes dummy rows on purpose
        h = model.apply({"params": p}, feats, toks, anchors, keep, dense_reference=dense,
                        method=DraftModel.train_forward)
        return jnp.sum(h * w)

    g_eff = jax.jit(jax.grad(lambda p: loss(p, False)))(params)
    g_dense = jax.jit(jax.grad(lambda p: loss(p, True)))(params)
    for (path, a), bb in zip(jax.tree_util.tree_leaves_with_path(g_eff), jax.tree_util.tree_leaves(g_dense)):
        assert bool(jnp.all(jnp.isfinite(a))), jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, bb, rtol=1e-4, atol=1e-4, err_msg=jax.tree_util.keystr(path))
    # frozen tables get no gradient
    np.testing.assert_array_equal(g_eff["embed_tokens"]["embedding"], 0.0)
    assert float(jnp.max(jnp.abs(g_eff["fc"]["kernel"]))) > 0


def test_full_call_and_model_head_methods(setup):
    """__call__ (U + bias, confidence) and the heads exposed as model methods agree with heads.py."""
    cfg, model, params = setup
    rng = np.random.default_rng(2)
    feats = jnp.asarray(rng.normal(size=(1, 5, cfg.context_dim)), jnp.float32)
    toks = jnp.asarray(rng.integers(0, 64, size=(1, 2, K)), jnp.int32)
    anchors = jnp.asarray([[2, 4]], jnp.int32)
    out = model.apply({"params": params}, feats, toks, anchors)
    mp, cp = params["markov_head"], params["confidence_head"]
    bias = heads.teacher_forced_bias(mp, "vanilla", toks)
    np.testing.assert_allclose(out["logits"], out["base_logits"] + bias, **TOL)
    np.testing.assert_allclose(out["confidence"], heads.confidence_logits(cp, out["hidden"], toks, mp), **TOL)
    h0 = out["hidden"][:, 0, 0]
    b_step, st = model.apply({"params": params}, toks[:, 0, 0], h0, heads.init_state((1,), 4),
                             method=DraftModel.markov_step)
    np.testing.assert_allclose(b_step, bias[:, 0, 0], **TOL)
    assert st.shape == (1, 4)


# ------------------------------------------------------------------------------------------ heads


def _head_params(head_type, v=11, d=5, r=3, seed=0):
    rng = np.random.default_rng(seed)
    p = {"markov_w1": {"embedding": rng.normal(size=(v, r))}, "markov_w2": {"kernel": rng.normal(size=(r, v))}}
    if head_type == "gated":
        p["gate_proj"] = {"kernel": rng.normal(size=(d + r, r)), "bias": rng.normal(size=(r,))}
    if head_type == "rnn":
        p["joint_proj"] = {"kernel": rng.normal(size=(2 * r + d, 3 * r)), "bias": rng.normal(size=(3 * r,))}
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p), p


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_vanilla_head_by_hand():
    p, raw = _head_params("vanilla")
    prev = np.array([[3, 0, 7, 10], [1, 1, 2, 9]])
    got = heads.teacher_forced_bias(p, "vanilla", jnp.asarray(prev))
    want = raw["markov_w1"]["embedding"][prev] @ raw["markov_w2"]["kernel"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got.dtype == jnp.float32
    b1, st = heads.markov_step(p, "vanilla", jnp.asarray(prev[:, 2]), jnp.zeros((2, 5)), heads.init_state((2,), 3))
    np.testing.assert_allclose(b1, want[:, 2], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(st, 0.0)


def test_gated_head_by_hand():
    p, raw = _head_params("gated")
    rng = np.random.default_rng(3)
    prev = rng.integers(0, 11, size=(2, 4))
    h = rng.normal(size=(2, 4, 5))
    e = raw["markov_w1"]["embedding"][prev]
    g = _sig(np.concatenate([h, e], -1) @ raw["gate_proj"]["kernel"] + raw["gate_proj"]["bias"])
    want = (g * e) @ raw["markov_w2"]["kernel"]
    got = heads.teacher_forced_bias(p, "gated", jnp.asarray(prev), jnp.asarray(h, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    b2, _ = heads.markov_step(p, "gated", jnp.asarray(prev[:, 1]), jnp.asarray(h[:, 1], jnp.float32),
                              heads.init_state((2,), 3))
    np.testing.assert_allclose(b2, want[:, 1], rtol=1e-5, atol=1e-5)


def test_rnn_head_scan_equals_steps_and_hand():
    p, raw = _head_params("rnn")
    rng = np.random.default_rng(4)
    prev = rng.integers(0, 11, size=(2, 4))
    h = rng.normal(size=(2, 4, 5))
    # by hand: bias at slot k uses the OLD state
    s = np.zeros((2, 3))
    want = []
    for k in range(4):
        e = raw["markov_w1"]["embedding"][prev[:, k]]
        z = np.concatenate([s, e, h[:, k]], -1) @ raw["joint_proj"]["kernel"] + raw["joint_proj"]["bias"]
        g, c, o = z[:, :3], z[:, 3:6], z[:, 6:]
        want.append(np.tanh(o) @ raw["markov_w2"]["kernel"])
        s = _sig(g) * s + (1 - _sig(g)) * np.tanh(c)
    want = np.stack(want, 1)
    got = heads.teacher_forced_bias(p, "rnn", jnp.asarray(prev), jnp.asarray(h, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    state = heads.init_state((2,), 3)
    step = jax.jit(lambda pp, x, hh, st: heads.markov_step(pp, "rnn", x, hh, st))
    for k in range(4):
        bk, state = step(p, jnp.asarray(prev[:, k]), jnp.asarray(h[:, k], jnp.float32), state)
        np.testing.assert_allclose(bk, got[:, k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, s, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown head type"):
        heads.markov_step(p, "lstm", jnp.asarray(prev[:, 0]), jnp.asarray(h[:, 0]), state)


def test_confidence_feature_order():
    p, raw = _head_params("vanilla")
    rng = np.random.default_rng(5)
    w = rng.normal(size=(5 + 3, 1))
    bias = rng.normal(size=(1,))
    cp = {"proj": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
    prev = rng.integers(0, 11, size=(2, 4))
    h = rng.normal(size=(2, 4, 5))
    want = h @ w[:5, 0] + raw["markov_w1"]["embedding"][prev] @ w[5:, 0] + bias[0]  # [h ; W1[prev]]
    got = heads.confidence_logits(cp, jnp.asarray(h, jnp.float32), jnp.asarray(prev), p)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cp_h = {"proj": {"kernel": jnp.asarray(w[:5], jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
    np.testing.assert_allclose(heads.confidence_logits(cp_h, jnp.asarray(h, jnp.float32)),
                               h @ w[:5, 0] + bias[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects 5 input features"):
        heads.confidence_logits(cp_h, jnp.asarray(h, jnp.float32), jnp.asarray(prev), p)
