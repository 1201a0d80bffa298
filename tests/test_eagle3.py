"""Eagle-3 drafter (spec §9.2): TTT mask / positions against hand-built cases and against inference
chain drafting through the KV cache (the crop/extend rule), DeepSpec's loss position weights, checkpoint
round trip through DeepSpec's exact key names (and the SpecForge `midlayer.*` alias), sampled output
distribution, and `train-draft --preset eagle3` whose trained draft gives greedy speculative == greedy target."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import tests.test_speculative as spec_tests
from dspark_jax.checkpoint.eagle3 import load_eagle3, save_eagle3
from dspark_jax.checkpoint.hf_layout import CheckpointError
from dspark_jax.draft.eagle3 import (Eagle3Config, Eagle3Model, eagle3_trainable_mask, init_eagle3_params, ttt_forward,
                                     ttt_loss, ttt_mask, ttt_position_weights)
from dspark_jax.sampling import SamplingConfig
from dspark_jax.draft.cache import DraftCache
from infer.api import Target, generate
from infer.eagle3 import chain_propose
from infer.speculative_api import load_draft_bundle
from infer.state import Pending, RowParams, SpecLoop, SpecModels
from tests.spec_helpers import random_target
from tests.test_draft_model import _spread

TOL = dict(rtol=2e-5, atol=2e-5)


def eagle_for(cfg, params, *, block_size=4, seed=1, spread=False):
    """A random Eagle-3 draft for target (cfg, params) with the target's embedding / LM head copied in."""
    dcfg = Eagle3Config.from_target(cfg, target_layer_ids=(-1, 0), block_size=block_size)
    dp = init_eagle3_params(dcfg, jax.random.PRNGKey(seed))
    if spread:
        dp = _spread(dp, seed=seed)
    dp["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"]
    dp["lm_head"]["kernel"] = params["lm_head"]["kernel"]
    return dcfg, dp


def test_ttt_mask_hand_built():
    """T = 3, step 2: step-0 keys causal, steps 1 and 2 only the diagonal; invalid keys masked."""
    got = np.asarray(ttt_mask(3, 2))
    want = np.array([[1, 0, 0, 1, 0, 0, 1, 0, 0],
                     [1, 1, 0, 0, 1, 0, 0, 1, 0],
                     [1, 1, 1, 0, 0, 1, 0, 0, 1]], bool)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(ttt_mask(3, 1, jnp.asarray([True, False, True]))),
                                  np.array([[1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 1]], bool))


def test_ttt_position_weights_hand_built():
    """DeepSpec loss.py: step 0 weights base i by loss_mask[i] with the last valid token zeroed; step s by
    that mask shifted left by s."""
    lm = jnp.asarray([[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]], jnp.float32)
    am = jnp.asarray([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], jnp.float32)  # valid lengths 5, 6
    want = np.array([[[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0]],
                     [[1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]],
                     [[0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]], np.float32)
    np.testing.assert_array_equal(np.asarray(ttt_position_weights(lm, 3, am)), want)
    np.testing.assert_array_equal(np.asarray(ttt_position_weights(lm[1:], 3)), want[:, 1:])


@pytest.fixture(scope="module")
def small():
    cfg, params = random_target(vocab=32, layers=2, hidden=16, seed=2)
    dcfg, dp = eagle_for(cfg, params, spread=True)
    return cfg, params, dcfg, dp


def test_ttt_equals_chain_drafting_through_the_cache(small):
    """TTT step s at base i (RoPE position i+s, step-0 keys <= i + diagonal keys) == inference: the
    draft cache holds step-0 rows <= i, chain step s is written at position i+s over the stale rows."""
    _, _, dcfg, dp = small
    model = Eagle3Model(dcfg)
    b, t, steps = 2, 7, 4
    rng = np.random.default_rng(0)
    taps = jnp.asarray(rng.normal(size=(b, t, dcfg.context_dim)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 32, size=(b, t)), jnp.int32)
    hs = jax.jit(lambda p: ttt_forward(model, p, taps, ids, steps))(dp)  # [S, B, T, d]
    p = {"params": dp}
    step = jax.jit(lambda h, tok, pos, kv: model.apply(p, h, tok, pos, None, cache_kv=kv, method=Eagle3Model.step))
    cache = DraftCache.create(dcfg, b, 16)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden = model.apply(p, taps, method=Eagle3Model.project_context)
    tokens0 = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    out0, kv0 = step(hidden, tokens0, pos, (cache.k[0], cache.v[0]))
    np.testing.assert_allclose(out0, hs[0], **TOL)
    for i in (1, 3):
        g, kv = out0[:, i:i + 1], kv0
        for s in range(1, min(steps, t - 1 - i)):
            tok = ids[:, i + 1 + s:i + 2 + s]
            g, kv = step(g, tok, jnp.full((b, 1), i + s, jnp.int32), kv)
            np.testing.assert_allclose(g[:, 0], hs[s][:, i], **TOL)


def test_incremental_extension_equals_one_shot(small):
    """Cache extended over two rounds (with garbage rows past each round's valid pairs) == one-shot prefill,
    and the chained proposals agree."""
    _, _, dcfg, dp = small
    model = Eagle3Model(dcfg)
    b, t = 2, 9
    rng = np.random.default_rng(1)
    taps = jnp.asarray(rng.normal(size=(b, t, dcfg.context_dim)), jnp.float32)
    toks = jnp.asarray(rng.integers(0, 32, size=(b, t)), jnp.int32)
    greedy = SamplingConfig(temperature=0.0)
    loop = SpecLoop(target=small[0], draft=dcfg, block_size=3, mode=greedy.mode, max_new_tokens=1, cache_len=24)
    models = SpecModels(target=None, draft=dp, head=dp["lm_head"]["kernel"])
    rows = RowParams.build([greedy] * b, jnp.zeros((b, 2), jnp.uint32), [-1], 1)

    def prop(c, f, tk, st, last):  # pending pairs at positions st + 0..C-1, valid up to index last
        c_len = tk.shape[1]
        pending = Pending(features=f, positions=st[:, None] + jnp.arange(c_len, dtype=jnp.int32)[None, :],
                          valid=jnp.arange(c_len)[None, :] <= jnp.asarray(last)[:, None], next_tokens=tk)
        proposal, cache, finite = jax.jit(chain_propose, static_argnums=0)(loop, models, c, pending, rows.keys, rows)
        assert bool(jnp.all(finite))
        return proposal, cache

    one, c_one = prop(DraftCache.create(dcfg, b, 24), taps, toks, jnp.zeros(b, jnp.int32), jnp.full(b, t - 1))
    cut = np.array([4, 6])  # first round: pairs 0..cut-1; second round: the rest, padded with garbage
    garbage = jnp.asarray(rng.normal(size=taps.shape) * 9, jnp.float32)
    first_feats = jnp.where(jnp.arange(t)[None, :, None] < cut[:, None, None], taps, garbage)
    _, c = prop(DraftCache.create(dcfg, b, 24), first_feats, toks, jnp.zeros(b, jnp.int32), jnp.asarray(cut - 1))
    w = 5
    src = np.minimum(cut[:, None] + np.arange(w), t - 1)
    feats2 = jnp.take_along_axis(taps, jnp.asarray(src)[..., None], axis=1)
    toks2 = jnp.take_along_axis(toks, jnp.asarray(src), axis=1)
    two, c_two = prop(c, feats2, toks2, jnp.asarray(cut, jnp.int32), jnp.asarray(t - 1 - cut))
    np.testing.assert_array_equal(np.asarray(c_two.lengths), [t, t])
    np.testing.assert_allclose(c_two.k[0][:, :t], c_one.k[0][:, :t], **TOL)
    np.testing.assert_array_equal(np.asarray(two.tokens), np.asarray(one.tokens))


def test_ttt_loss_trains_only_unfrozen(small):
    """The TTT loss is finite, weights steps by 0.8^s, and gives the frozen embedding / LM head no gradient."""
    cfg, params, dcfg, dp = small
    model = Eagle3Model(dcfg)
    rng = np.random.default_rng(2)
    b, t = 2, 6
    taps = jnp.asarray(rng.normal(size=(b, t, dcfg.context_dim)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 32, size=(b, t)), jnp.int32)
    tl = jnp.asarray(rng.normal(size=(b, t, 32)) * 3, jnp.float32)
    mask = jnp.asarray([[1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], jnp.float32)
    valid = jnp.asarray([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], jnp.float32)
    loss_grad = jax.jit(jax.value_and_grad(lambda p: ttt_loss(model, p, taps, ids, tl, mask, 2, attention_mask=valid),
                                           has_aux=True))
    (loss, aux), grads = loss_grad(dp)
    np.testing.assert_allclose(loss, aux["step_loss"][0] + 0.8 * aux["step_loss"][1], rtol=1e-5)
    w = np.array([[[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], [[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]])  # by hand
    np.testing.assert_allclose(aux["step_loss"], (np.asarray(aux["step_ce"]) * w).sum((1, 2)) / (b * t), rtol=1e-5)
    assert np.isfinite(float(loss)) and float(jnp.max(jnp.abs(grads["fc"]["kernel"]))) > 0
    np.testing.assert_array_equal(grads["embed_tokens"]["embedding"], 0.0)
    np.testing.assert_array_equal(grads["lm_head"]["kernel"], 0.0)
    assert eagle3_trainable_mask(dp)["lm_head"]["kernel"] is False
    assert float(aux["step_loss"][1]) > 0
    p, losses = dp, [float(loss)]  # a few plain gradient steps on the trainable weights lower the loss
    for _ in range(3):
        p = jax.tree_util.tree_map(lambda w, g: w - 0.5 * g, p, loss_grad(p)[1])
        losses.append(float(loss_grad(p)[0][0]))
    assert losses[-1] < losses[0], losses


# DeepSpec `Qwen3Eagle3Model` state dict for the `small` draft (d=16, 4 heads x hd 4, 2 KV heads, mlp 32,
# V=32, 2 taps): written out by hand from deepspec/modeling/eagle3/qwen3/modeling.py.
DEEPSPEC_EAGLE3_KEYS = {
    "embed_tokens.weight": [32, 16], "fc.weight": [16, 32], "norm.weight": [16], "lm_head.weight": [32, 16],
    "layers.0.hidden_norm.weight": [16], "layers.0.input_layernorm.weight": [16],
    "layers.0.post_attention_layernorm.weight": [16],
    "layers.0.self_attn.q_proj.weight": [16, 32], "layers.0.self_attn.k_proj.weight": [8, 32],
    "layers.0.self_attn.v_proj.weight": [8, 32], "layers.0.self_attn.o_proj.weight": [16, 16],
    "layers.0.self_attn.q_norm.weight": [4], "layers.0.self_attn.k_norm.weight": [4],
    "layers.0.mlp.gate_proj.weight": [32, 16], "layers.0.mlp.up_proj.weight": [32, 16],
    "layers.0.mlp.down_proj.weight": [16, 32],
}


def test_checkpoint_round_trip(small, tmp_path):
    """save_eagle3 -> exactly DeepSpec's key names / shapes and config.json fields; load_eagle3 and
    load_draft_bundle read it back; the SpecForge `midlayer.*` alias loads to the same params; a missing or
    stray key is a one-line error naming it and the file."""
    cfg, params, dcfg, dp = small
    save_eagle3(dp, dcfg, tmp_path / "e3", dtype="float32")
    hf = json.loads((tmp_path / "e3" / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3Eagle3Model"] and hf["model_type"] == "qwen3"
    assert (hf["num_hidden_layers"], hf["draft_num_hidden_layers"], hf["layer_types"]) == (1, 1, ["full_attention"])
    assert (hf["target_layer_ids"], hf["num_target_layers"], hf["ttt_length"], hf["step_loss_decay"]) == \
        ([-1, 0], 2, 7, 0.8)
    assert hf["tie_word_embeddings"] is False and "eagle_config" not in hf
    weights = tmp_path / "e3" / "model.safetensors"
    with safe_open(str(weights), framework="numpy") as f:
        assert {k: f.get_slice(k).get_shape() for k in f.keys()} == DEEPSPEC_EAGLE3_KEYS
    cfg2, p2 = load_eagle3(tmp_path / "e3")
    assert cfg2 == dcfg
    for a, b in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(dp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bundle = load_draft_bundle(tmp_path / "e3", Target(config=cfg, params=params))
    assert isinstance(bundle.config, Eagle3Config) and bundle.shares_target_lm_head

    tensors = load_file(str(weights))  # the legacy SpecForge-style export of the same weights
    legacy = {k.replace("layers.0.", "midlayer."): v for k, v in tensors.items()}
    legacy.update(d2t=np.zeros(32, np.int64), t2d=np.ones(32, bool))
    old = tmp_path / "old"
    old.mkdir()
    save_file(legacy, str(old / "model.safetensors"))
    dropped = ("target_layer_ids", "step_loss_decay", "draft_num_hidden_layers")
    old_hf = {k: v for k, v in hf.items() if k not in dropped}
    old_hf.update(architectures=["Qwen3ForCausalLMEagle3"], eagle_config={"eagle_aux_hidden_state_layer_ids": [-1, 0]},
                  draft_vocab_size=32)
    (old / "config.json").write_text(json.dumps(old_hf))
    cfg3, p3 = load_eagle3(old)
    assert cfg3 == dcfg
    for a, b in zip(jax.tree_util.tree_leaves(p3), jax.tree_util.tree_leaves(dp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    del tensors["layers.0.hidden_norm.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor\(s\) \['layers\.0\.hidden_norm\."):
        load_eagle3(tmp_path / "e3")
    tensors["layers.0.hiden_norm.weight"] = np.ones(16, np.float32)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor\(s\) \['layers\.0\.hiden_"):
        load_eagle3(tmp_path / "e3")


def test_sampled_output_has_target_distribution():
    """Temperature 1 on an 8-token vocabulary: 3-token continuations follow the exact target distribution."""
    cfg, params = random_target(vocab=spec_tests.VOCAB, layers=2, hidden=16, weight_scale=3.0, seed=3, max_pos=64)
    dcfg, dp = eagle_for(cfg, params, block_size=2)
    sampling = SamplingConfig(temperature=1.0)
    # The shared loop (`speculative_generate`) runs Eagle-3's chain proposal for an Eagle3Config.
    counts = spec_tests.sample_continuations(cfg, params, dcfg, dp, sampling, n_rows=6000, seeds=(0, 1))
    probs = spec_tests.exact_distribution(cfg, params, sampling)
    assert counts[probs == 0].sum() == 0
    p = spec_tests.chi_square_pvalue(counts, probs)
    assert p > 1e-4, f"Eagle-3 sampled distribution differs from the target's (p={p:.2e})"


def test_train_draft_cli_eagle3_preset(tmp_path, monkeypatch, capsys):
    """`dspark train-draft --preset eagle3` (2 steps through the shared train program and `train.loop`):
    metrics.jsonl rows (finite loss / acc0 / lr / grad_norm, eval every step), train_config.json and
    train_summary.json; `--stop-at 1` then a non-finite step 2 (NaN loss mask) exits non-zero keeping checkpoint
    1 and exporting nothing, then `--resume` reproduces the straight run bit for bit (same batches, same
    weights). The exported draft loads and its greedy speculative output equals the target's greedy output
    (a batch of prompts, with a stop token); per-row sampling: greedy rows of a mixed batch stay exact."""
    from tests.helpers import tiny_corpus_and_target
    from train import eagle3_trainer
    from train.cli_draft import train_draft_main
    from train.metrics import read_jsonl

    env = tiny_corpus_and_target(tmp_path / "data")
    out, out2 = tmp_path / "run", tmp_path / "run2"
    flags = ["--target", env["target"], "--corpus", env["corpus"], "--no-progress", "--preset", "eagle3",
             "--block-size", "2", "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--learning-rate", "1e-2",
             "--eval-batches", "1", "--eval-every", "1", "--export-dtype", "float32", "--log-every", "1"]
    assert train_draft_main(flags + ["--out", str(out)]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows, eval_rows = [r for r in rows if "loss" in r], [r for r in rows if "eval" in r]
    assert [r["step"] for r in train_rows] == [1, 2] and [r["step"] for r in eval_rows] == [1, 2]
    for r in train_rows:
        assert r["loss"] > 0 and all(np.isfinite(r[k]) for k in ("loss", "acc0", "lr", "grad_norm", "tokens_per_s"))
    assert all(np.isfinite(m["loss"]) for r in eval_rows for m in r["eval"].values()) and eval_rows[-1]["eval"]
    summary = json.loads((out / "draft" / "train_summary.json").read_text())
    assert summary["model"].startswith("Eagle-3") and summary["steps"] == 2 and summary["eval_metrics"]
    assert json.loads((out / "train_config.json").read_text())["steps"] == 2

    assert train_draft_main(flags + ["--out", str(out2), "--stop-at", "1"]) == 0
    assert not (out2 / "draft").exists()
    clean = eagle3_trainer._batch_arrays
    monkeypatch.setattr(eagle3_trainer, "_batch_arrays",
                        lambda b: {**clean(b), "loss_mask": np.full(b["mask"].shape, np.nan, np.float32)})
    capsys.readouterr()
    assert train_draft_main(flags + ["--out", str(out2), "--resume"]) != 0
    assert "non-finite training at step 2" in capsys.readouterr().err
    assert not (out2 / "draft").exists() and sorted(os.listdir(out2 / "checkpoints")) == ["1"]
    monkeypatch.undo()
    assert train_draft_main(flags + ["--out", str(out2), "--resume"]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(read_jsonl(out2 / "metrics.jsonl")) == strip(rows)
    a, b = load_file(str(out / "draft" / "model.safetensors")), load_file(str(out2 / "draft" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    from infer.api import load_target_bundle

    target = load_target_bundle(env["target"])
    draft = load_draft_bundle(out / "draft", target)
    assert isinstance(draft.config, Eagle3Config) and draft.config.ttt_length == 2
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    ref = generate(target, prompts, max_new_tokens=16).token_ids
    assert generate(target, prompts, draft=draft, max_new_tokens=16).token_ids == ref
    stop = ref[0][8]  # a stop token drafted / committed mid-way (traced: no recompile)
    ref_stop = generate(target, prompts, max_new_tokens=16, stop_token_ids=[stop]).token_ids
    assert generate(target, prompts, draft=draft, max_new_tokens=16, stop_token_ids=[stop]).token_ids == ref_stop
    mixed = [SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0, top_k=5), SamplingConfig(temperature=0.0)]
    got = generate(target, prompts, draft=draft, max_new_tokens=16, sampling=mixed, seed=[3, 4, 5]).token_ids
    assert got[0] == ref[0] and got[2] == ref[2] and len(got[1]) == 16
    # `dspark eval` takes the Eagle-3 drafter beside block drafters: chain proposals of up to K tokens.
    from dspark_cli.eval_cmd import eval_main

    rc = eval_main(["--target", env["target"], "--draft", f"e3={out / 'draft'}", "--corpus", env["corpus"],
                    "--datasets", "corpus:code", "--corpus-prompt-tokens", "4", "--max-new-tokens", "16",
                    "--max-prompts", "3", "--batch-size", "3", "--temperature", "0", "--out", str(tmp_path / "eval")])
    assert rc == 0
    (row,) = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert row["drafter"] == "e3" and row["block_size"] == 2 and 1.0 <= row["acceptance_length"] <= 3.0
    assert row["speculative"]["tokens"] == row["autoregressive"]["tokens"] and "calibration" not in row


def test_bundled_eagle3_drafter_is_lossless():
    """The bundled Eagle-3 drafter (models/pystd-eagle3-k7, DeepSpec layout) loads against the bundled
    target and, in float32, greedy speculative decoding equals greedy target decoding token for token,
    with drafts accepted (τ > 1)."""
    from infer.api import load_target_bundle

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = load_target_bundle(os.path.join(repo, "models", "pystd-qwen3-target"), dtype="float32")
    draft = load_draft_bundle(os.path.join(repo, "models", "pystd-eagle3-k7"), target, dtype="float32")
    assert isinstance(draft.config, Eagle3Config) and draft.config.block_size == 7
    prompt = target.tokenizer.encode("def parse_args(argv):\n    parser = argparse.")
    ref = generate(target, [prompt], max_new_tokens=32, stop_token_ids=[])
    spec = generate(target, [prompt], draft=draft, max_new_tokens=32, stop_token_ids=[])
    assert spec.token_ids == ref.token_ids
    assert spec.metrics["acceptance_length"] > 1.0, spec.metrics
