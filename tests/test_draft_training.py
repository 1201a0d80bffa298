"""Draft training (`dspark train-draft`): anchors, blocks, losses vs hand-computed values, NaN safety,
loss decrease (DSpark + DFlash), exact resume, 8-device sharded step (subprocess), offline feature
cache (format v2) round trip + equivalence with online features, export -> speculative generate,
bad input.

Tiny shapes: random Qwen3 target (3 layers, hidden 32, vocab 128) with a 64-token BPE, draft 1 layer,
seq 32, K=4, 8 anchors (chunks of 4), batch 4. Runs with the same config share one compiled step.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dspark_jax.checkpoint.deepspec import draft_params_from_target, load_draft
from dspark_jax.config import TargetConfig
from dspark_jax.draft import DraftConfig
from dspark_jax.target.model import TargetModel
from tests.helpers import tiny_corpus_and_target, xla_flags
from train import draft_features as feats
from train import draft_losses as dl
from train.checkpointing import ConfigMismatchError
from train.cli_draft import train_draft_main
from train.draft_config import PRESETS, DraftTrainConfig
from train.draft_trainer import DraftSetupError, make_draft_loss, train_draft
from train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_draft_layers=1, block_size=4, markov_rank=8, num_anchors=8, loss_chunk_anchors=4, seq_len=32,
            batch_size=4, steps=6, learning_rate=1e-2, warmup_fraction=0.0, log_every=1, eval_every=3,
            eval_batches=1, ckpt_every=3, export_dtype="float32", seed=0)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """{corpus, target}: a built two-domain corpus and a random tiny Qwen3 target + its tokenizer."""
    return tiny_corpus_and_target(tmp_path_factory.mktemp("draft_data"))


def _run(env, out, **kw):
    cfg = DraftTrainConfig(**{**TINY, **kw.pop("cfg", {})})
    return train_draft(cfg, target_dir=env["target"], corpus_dir=env["corpus"], out_dir=str(out), progress=False, **kw)


def _losses(out) -> list[tuple]:
    keys = ("loss", "ce_loss", "l1_loss", "confidence_loss", "grad_norm", "tau_probabilistic")
    return [(r["step"],) + tuple(r.get(k) for k in keys)
            for r in read_jsonl(os.path.join(str(out), "metrics.jsonl")) if "loss" in r]


def _params_close(a, b, atol=0.0):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return all(np.allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def ref(env, tmp_path_factory):
    """An uninterrupted 6-step DSpark run (float32 export)."""
    return _run(env, tmp_path_factory.mktemp("ref"))


# ------------------------------------------------------------------------------------ unit tests
def test_position_weights():
    assert dl.position_weights(7, 4.0) == pytest.approx([1, 0.7788, 0.6065, 0.4724, 0.3679, 0.2865, 0.2231], abs=1e-4)
    assert dl.position_weights(3, 0.0).tolist() == [1, 1, 1]


def test_anchor_sampler_properties():
    lm = np.ones((1, 12), np.float32)
    lm[0, [4, 9]] = 0  # holes: candidates p with lm[p] = lm[p+1] = 1, p <= S-2
    cand = [p for p in range(11) if lm[0, p] and lm[0, p + 1]]  # [0,1,2,5,6,7,10]
    counts = np.zeros(12)
    sample = jax.jit(dl.sample_anchors, static_argnums=2)
    for i in range(400):
        a, keep = map(np.asarray, sample(jax.random.PRNGKey(i), jnp.asarray(lm), 4))
        kept = a[0][keep[0]]
        assert keep[0].tolist() == [True] * 4 and set(kept) <= set(cand) and len(set(kept)) == 4
        assert kept.tolist() == sorted(kept.tolist())
        counts[kept] += 1
    freq = counts[cand] / 400
    assert np.all(np.abs(freq - 4 / 7) < 0.1)  # uniform without replacement: each candidate w.p. N / #cand
    a, keep = map(np.asarray, sample(jax.random.PRNGKey(0), jnp.asarray(lm), 10))  # more slots than candidates
    assert keep[0].tolist() == [True] * 7 + [False] * 3 and a[0].tolist()[:7] == cand and a[0, 7:].tolist() == [0] * 3
    a, keep = map(np.asarray, sample(jax.random.PRNGKey(0), jnp.zeros((1, 5)), 8))  # no candidates, N > S
    assert not keep.any() and not a.any()


def test_make_blocks_eval_mask_contiguity():
    ids = jnp.arange(100, 110)[None]  # S = 10
    lm = jnp.asarray([[1, 1, 1, 1, 0, 1, 1, 1, 1, 1]])
    anchors, keep = jnp.asarray([[1, 6, 8, 0]]), jnp.asarray([[True, True, True, False]])
    b = dl.make_blocks(ids, lm, anchors, keep, 4, mask_token_id=7)
    assert b.block_tokens[0].tolist() == [[101, 7, 7, 7], [106, 7, 7, 7], [108, 7, 7, 7], [7, 7, 7, 7]]
    assert b.label_idx[0].tolist() == [[2, 3, 4, 5], [7, 8, 9, 9], [9, 9, 9, 9], [0, 0, 0, 0]]
    assert b.target_ids[0, 0].tolist() == [102, 103, 104, 105]
    assert b.prev_ids[0, 0].tolist() == [101, 102, 103, 104]
    assert b.teacher_idx[0, 1].tolist() == [6, 7, 8, 8]
    # hole at 4 cuts block 0 after 2 slots (5 is valid again but not contiguous); sequence end cuts 1 and 2
    assert b.eval_mask[0].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_losses_match_hand_computation():
    z = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]], np.float32)  # [N=1, K=2, V=3]
    t = np.array([[[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]], np.float32)
    tgt = np.array([[0, 2]])
    conf = np.array([[0.3, -1.2]], np.float32)
    stats = dl.slot_stats(jnp.asarray(z[None]), jnp.asarray(tgt[None]), jnp.asarray(t[None]), jnp.asarray(conf[None]))
    sm = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    pd, pt = sm(z), sm(t)
    ce = -np.log(np.take_along_axis(pd, tgt[..., None], -1)[..., 0])
    l1 = np.abs(pd - pt).sum(-1)  # full L1, no 1/2
    a = np.clip(1 - 0.5 * l1, 0, 1)
    sig = 1 / (1 + np.exp(-conf))
    bce = -(a * np.log(sig) + (1 - a) * np.log(1 - sig))
    for k, v in (("ce", ce), ("l1", l1), ("a", a), ("bce", bce)):
        np.testing.assert_allclose(np.asarray(stats[k])[0], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(stats["l1"][0, 0, 1]) == pytest.approx(0.0, abs=1e-6)  # identical distributions
    w = np.exp(-np.arange(2) / 4.0)
    for mask in ([[1.0, 1.0]], [[1.0, 0.0]]):
        m = np.asarray([mask], np.float32)
        loss, parts = dl.reduce_losses(stats, jnp.asarray(m), dl.position_weights(2, 4.0), (0.1, 0.9, 1.0))
        W = m[0] * w
        exp = {n: (W * v).sum() / (W.sum() + 1e-6) for n, v in (("ce_loss", ce), ("l1_loss", l1),
                                                               ("confidence_loss", bce))}
        for n, v in exp.items():
            assert float(parts[n]) == pytest.approx(float(v), rel=1e-5)
        assert float(loss) == pytest.approx(0.1 * exp["ce_loss"] + 0.9 * exp["l1_loss"] + exp["confidence_loss"],
                                            rel=1e-5)
    # the confidence target is detached: no gradient reaches z through `a`
    g = jax.grad(lambda zz: dl.slot_stats(zz, jnp.asarray(tgt[None]), jnp.asarray(t[None]),
                                          jnp.asarray(conf[None]))["bce"].sum())(jnp.asarray(z[None]))
    assert not np.any(np.asarray(g))


def test_chunked_map_matches_unchunked_with_gradients():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3))
    fn = lambda d: {"y": jnp.sin(d["x"]) * d["x"].sum(-1, keepdims=True)}  # noqa: E731
    assert dl.largest_divisor_at_most(6, 4) == 3 and dl.largest_divisor_at_most(7, 4) == 1
    full = fn({"x": x})["y"]
    for chunk in (1, 3, 4, 6):
        np.testing.assert_allclose(dl.chunked_map(fn, {"x": x}, chunk)["y"], full, rtol=1e-6)
        g1 = jax.grad(lambda v: dl.chunked_map(fn, {"x": v}, chunk)["y"].sum())(x)
        np.testing.assert_allclose(g1, jax.grad(lambda v: fn({"x": v})["y"].sum())(x), rtol=1e-5)


def test_training_metrics_normalised_as_reference():
    """Hand-checked tiny batch (B=2, S=6, N=2, K=2): per-sample anchor means, W-weighted confidence stats."""
    lm = jnp.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], jnp.float32)  # candidates per sample: 3, 1
    keep = jnp.array([[True, True], [True, False]])  # kept blocks per sample: 2, 1
    m = jnp.array([[[1, 1], [1, 0]], [[1, 0], [0, 0]]], jnp.float32)  # supervised slots per sample: 3, 1
    z = jnp.zeros((2, 2, 2), jnp.int32)
    blocks = dl.Blocks(z, z, z, z, z, m)
    stats = {"a": jnp.full((2, 2, 2), 0.5), "conf": jnp.broadcast_to(jnp.array([0.0, 100.0]), (2, 2, 2))}
    out = dl.as_host_floats(dl.training_metrics(stats, blocks, lm, keep, 2, np.array([1.0, 0.5], np.float32)))
    # W = m * [1, .5]: sum 3.5; sigma - a = [0, .5]; prefix products: sigma [.5, .5] vs a [.5, .25]
    expected = {"valid_anchors_abs": 2.0, "valid_anchors_ratio": 2.0 / 6,  # mean(3, 1) / S
                "sampled_anchors_abs": 1.5, "sampled_anchors_ratio": 0.75,
                "block_supervised_tokens_abs": 1.25,  # mean(3/2, 1/1)
                "block_supervised_tokens_ratio": 0.625,
                "accept_rate@0": 0.5, "accept_rate@1": 0.5, "tau_probabilistic": (1.75 + 1.5 + 1.5) / 3,
                "confidence_abs_error": 0.25 / 3.5, "confidence_bias": 0.25 / 3.5,
                "confidence_cumprod_bias": 0.125 / 3.5}
    assert out.keys() == expected.keys()
    for key, want in expected.items():
        assert out[key] == pytest.approx(want, rel=1e-6), key


def test_no_nan_with_dummy_blocks():
    tcfg = TargetConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
    cfg = DraftTrainConfig(**{**TINY, "num_anchors": 6, "loss_chunk_anchors": 3, "seq_len": 12})
    dcfg = DraftConfig.from_target(tcfg, mask_token_id=1, num_hidden_layers=1, block_size=4, markov_rank=4,
                                   num_anchors=6, target_layer_ids=(0, 1))
    tok = jnp.zeros((1, 1), jnp.int32)
    tparams = TargetModel(tcfg).init(jax.random.PRNGKey(0), tok, tok)["params"]
    import flax.linen as nn
    tparams = nn.meta.unbox(tparams)
    params = draft_params_from_target(tparams, tcfg, dcfg, jax.random.PRNGKey(1))
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, 48)
    lm = jnp.zeros((2, 12)).at[0, 3:6].set(1.0)  # row 0: 2 candidates (4 dummies); row 1: none (all dummies)
    loss_fn = make_draft_loss(cfg, dcfg, tcfg)
    (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, tparams, {"input_ids": ids,
                                                                                           "loss_mask": lm},
                                                                        jax.random.PRNGKey(3))
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in m.values())
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
    assert float(m["sampled_anchors_abs"]) == 1.0 and float(m["block_supervised_tokens_abs"]) == pytest.approx(0.75)
    assert not np.any(np.asarray(grads["embed_tokens"]["embedding"]))  # frozen
    assert not np.any(np.asarray(grads["lm_head"]["kernel"]))


# ------------------------------------------------------------------------------------ training runs
def test_training_reduces_loss_deterministically(env, ref, tmp_path):
    losses = [r[1] for r in _losses(ref.out_dir)]
    assert len(losses) == TINY["steps"] and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0] * 0.97, losses
    rec = read_jsonl(os.path.join(ref.out_dir, "metrics.jsonl"))
    train_rec = [r for r in rec if "loss" in r][-1]
    for key in ("accept_rate@0", "accept_rate@3", "tau_probabilistic", "confidence_abs_error", "confidence_bias",
                "confidence_cumprod_bias", "valid_anchors_ratio", "sampled_anchors_abs",
                "block_supervised_tokens_ratio",
                "tokens_per_s", "anchors_per_s"):
        assert np.isfinite(train_rec[key]), key
    assert 1.0 <= train_rec["tau_probabilistic"] <= 1 + TINY["block_size"]
    evals = [r for r in rec if "eval" in r]
    assert [r["step"] for r in evals] == [3, 6] and set(evals[-1]["eval"]) == {"code", "prose"}
    assert all(evals[1]["eval"][d]["loss"] < evals[0]["eval"][d]["loss"] for d in ("code", "prose"))
    again = _run(env, tmp_path / "again")
    assert _losses(again.out_dir) == _losses(ref.out_dir)  # same seed -> identical run
    assert _params_close(again.state.params, ref.state.params)


def test_dflash_preset_trains(env, tmp_path):
    res = _run(env, tmp_path / "dflash", cfg=PRESETS["dflash"],
               export=False)
    rec = [r for r in read_jsonl(os.path.join(res.out_dir, "metrics.jsonl")) if "loss" in r]
    assert res.draft_config.markov_rank == 0 and not res.draft_config.enable_confidence_head
    assert "markov_head" not in res.state.params and "confidence_head" not in res.state.params
    assert all(r["loss"] == pytest.approx(r["ce_loss"], rel=1e-6) for r in rec)  # CE only
    assert "confidence_loss" not in rec[0] and "tau_probabilistic" in rec[0]
    assert np.mean([r["loss"] for r in rec[-2:]]) < rec[0]["loss"] * 0.97


def test_resume_equals_uninterrupted(env, ref, tmp_path):
    out = tmp_path / "resumed"
    first = _run(env, out, stop_at_step=3)
    assert first.final_step == 3 and first.export_dir is None
    second = _run(env, out, resume=True)
    assert second.start_step == 3 and second.final_step == 6
    assert _losses(out) == _losses(ref.out_dir)
    assert _params_close(second.state.params, ref.state.params)
    assert _params_close(second.state.opt_state, ref.state.opt_state)


def test_export_loads_and_speculative_greedy_matches_target(env, ref):
    from infer.api import generate, load_target_bundle
    from infer.speculative_api import Draft

    summary = json.loads(Path(ref.export_dir, "train_summary.json").read_text())
    assert summary["steps"] == TINY["steps"] and summary["target_layer_ids"] == [0, 1]
    cfg, params = load_draft(ref.export_dir)
    assert cfg == ref.draft_config
    assert _params_close(params, ref.state.params)
    target = load_target_bundle(env["target"])
    prompts = [[3, 17, 5, 9], [12, 4, 30, 8, 21, 6]]
    plain = generate(target, prompts, max_new_tokens=8, stop_token_ids=[]).token_ids
    spec = generate(target, prompts, draft=Draft(config=cfg, params=params), max_new_tokens=8, stop_token_ids=[])
    assert spec.token_ids == plain


# ------------------------------------------------------------------------------------ feature cache
def test_feature_cache_v2_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    lens, n_ctx, d = (5, 3, 7), 2, 4
    samples = [(rng.integers(0, 100, s).astype(np.int32), (rng.random(s) > 0.3).astype(np.uint8),
                rng.normal(size=(s, n_ctx * d)).astype(np.float32), rng.normal(size=(s, d)).astype(np.float32))
               for s in lens]
    w = feats.FeatureCacheWriter(tmp_path / "c", target_layer_ids=(0, 1), hidden_size=d, max_shard_bytes=200,
                                 extras={"target_model_name_or_path": "t"})
    assert [w.add(*smp) for smp in samples] == [0, 1, 2]
    w.close()
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["version"] == 2 and man["index_record_size"] == 56 and man["num_samples"] == 3
    assert man["num_shards"] > 1 and man["shards"][0] == {"shard_id": 0, "file_name": "shard-00000.bin"}
    raw = (tmp_path / "c" / "samples.idx").read_bytes()
    assert len(raw) == 3 * 56
    for i, (ids, lm, hid, last) in enumerate(samples):
        sid, shard, s, o_ids, o_att, o_loss, o_hid, o_last = struct.unpack("<QIIQQQQQ", raw[56 * i:56 * (i + 1)])
        assert (sid, s) == (i, lens[i])
        assert (o_att, o_loss, o_hid) == (o_ids + 4 * s, o_ids + 5 * s, o_ids + 6 * s)
        assert o_last == o_hid + s * n_ctx * d * 2
        blob = (tmp_path / "c" / f"shard-{shard:05d}.bin").read_bytes()
        assert blob[o_ids:o_att] == ids.astype("<i4").tobytes()
        assert blob[o_hid:o_last] == hid.astype(ml_dtypes.bfloat16).tobytes()
    cache = feats.FeatureCache(tmp_path / "c")
    for i, (ids, lm, hid, last) in enumerate(samples):
        got = cache.sample(i)
        assert np.array_equal(got["input_ids"], ids) and np.array_equal(got["loss_mask"], lm)
        assert got["attention_mask"].tolist() == [1] * lens[i]
        bits = hid.astype(ml_dtypes.bfloat16).view(np.uint16)
        assert np.array_equal(got["target_hidden_states"].view(np.uint16), bits)
        assert np.array_equal(got["target_last_hidden_states"], last.astype(ml_dtypes.bfloat16))
    b = cache.batch([2, 1], seq_len=6, pad_id=9)
    assert b["input_ids"][1].tolist() == samples[1][0].tolist() + [9] * 3 and b["loss_mask"][1, 3:].sum() == 0
    assert b["ctx_feats"].shape == (2, 6, n_ctx * d) and not np.any(b["last_hidden"][1, 3:].astype(np.float32))
    with pytest.raises(feats.FeatureCacheError, match="hidden_size"):
        cache.validate(target_layer_ids=(0, 1), hidden_size=8)
    (tmp_path / "c" / "samples.idx").write_bytes(raw[:100])
    with pytest.raises(feats.FeatureCacheError, match="56-byte"):
        feats.FeatureCache(tmp_path / "c")


def test_offline_cache_training_equals_online(env, ref, tmp_path):
    from dspark_jax.checkpoint.hf import load_target

    cache_dir = tmp_path / "feats"
    off = _run(env, tmp_path / "off", feature_cache=str(cache_dir), write_feature_cache=True, export=False)
    cache = feats.FeatureCache(cache_dir)
    assert cache.target_layer_ids == (0, 1) and cache.manifest["target_model_name_or_path"] == env["target"]
    tcfg, tparams = load_target(env["target"])
    fn = jax.jit(feats.make_feature_fn(tcfg, (0, 1), "bfloat16"))
    smp = [cache.sample(i) for i in range(3)]
    ids = np.stack([s["input_ids"][:32] for s in smp])
    ctx, last = fn(tparams, jnp.asarray(ids))
    for i, s in enumerate(smp):  # same bf16 values up to a rare 1-ulp flip (float32 op order differs by shape)
        for got, want in ((ctx[i], s["target_hidden_states"]), (last[i], s["target_last_hidden_states"])):
            got, want = np.asarray(got).astype(np.float32), want.astype(np.float32)
            np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-6)
            assert np.mean(got != want) < 0.01
    np.testing.assert_allclose(np.asarray(_losses(off.out_dir), float), np.asarray(_losses(ref.out_dir), float),
                               rtol=2e-5, atol=1e-6)
    assert _params_close(off.state.params, ref.state.params, atol=1e-5)
    reuse = _run(env, tmp_path / "reuse", feature_cache=str(cache_dir), stop_at_step=2, export=False)
    assert _losses(reuse.out_dir) == _losses(off.out_dir)[:2]


# ------------------------------------------------------------------------------------ sharding
SHARDED_SCRIPT = """
import os, sys, json
os.environ["XLA_FLAGS"] = {flags!r}
import jax, numpy as np
sys.path.insert(0, {repo!r})
from train.draft_config import DraftTrainConfig
from train.draft_trainer import train_draft
assert len(jax.devices()) == 8
# lr 1e-3: Adam's first update is ~lr * sign(g), so float noise on near-zero grads moves params by <~lr
tiny = {{**json.loads({tiny!r}), "learning_rate": 1e-3}}
out = {{}}
for name, mesh in (("one", {{}}), ("eight", dict(mesh_data=4, mesh_model=2))):
    res = train_draft(DraftTrainConfig(**tiny, **mesh), target_dir={target!r}, corpus_dir={corpus!r},
                      out_dir=os.path.join({tmp!r}, name), stop_at_step=1, progress=False, export=False)
    rec = [r for r in open(os.path.join(res.out_dir, "metrics.jsonl"))]
    out[name] = (json.loads(rec[0]), jax.tree_util.tree_leaves(jax.device_get(res.state.params)))
(m1, p1), (m8, p8) = out["one"], out["eight"]
dp = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p8))
dm = max(abs(m1[k] - m8[k]) / max(abs(m1[k]), 1e-3) for k in m1 if k not in ("tokens_per_s", "anchors_per_s"))
print("RESULT", json.dumps({{"param_diff": dp, "metric_rel_diff": dm}}))
"""


def test_sharded_step_matches_single_device(env, tmp_path):
    script = SHARDED_SCRIPT.format(repo=str(REPO), flags=xla_flags("--xla_force_host_platform_device_count=8"),
                                   tiny=json.dumps(TINY), target=env["target"], corpus=env["corpus"],
                                   tmp=str(tmp_path))
    envvars = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=envvars, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res["param_diff"] < 1e-5 and res["metric_rel_diff"] < 1e-4, res


# ------------------------------------------------------------------------------------ bad input / CLI
def test_bad_inputs_give_clear_errors(env, ref, tmp_path):
    with pytest.raises(DraftSetupError, match=r"target layer id 5 outside"):
        _run(env, tmp_path / "a", cfg={"target_layer_ids": (0, 5)})
    with pytest.raises(DraftSetupError, match="last target layer 2"):
        _run(env, tmp_path / "b", cfg={"target_layer_ids": (0, 2)})
    with pytest.raises(DraftSetupError, match="seq_len 300 exceeds .* max_position_embeddings 256"):
        _run(env, tmp_path / "c", cfg={"seq_len": 300})
    small = tmp_path / "small_target"
    shutil.copytree(env["target"], small)
    conf = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(conf, vocab_size=40)))
    with pytest.raises(DraftSetupError, match="tokenizer .* 64 tokens but the target vocab_size is 40"):
        train_draft(DraftTrainConfig(**TINY), target_dir=str(small), corpus_dir=env["corpus"],
                    out_dir=str(tmp_path / "d"), progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(ref.out_dir, copy)
    with pytest.raises(ConfigMismatchError, match=r"learning_rate: 0.01 -> 0.005"):
        _run(env, copy, cfg={"learning_rate": 5e-3}, resume=True)
    with pytest.raises(DraftSetupError, match="--resume"):
        _run(env, copy)


def test_cli(env, ref, tmp_path, capsys):
    base = ["--target", env["target"], "--corpus", env["corpus"], "--no-progress"]
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps(TINY))
    assert train_draft_main(base + ["--out", str(tmp_path / "o"), "--config", str(cfg_file),
                                    "--target-layer-ids", "0,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dspark train-draft: error:") and "last target layer" in err and "\n" not in err
    assert train_draft_main(["--target", str(tmp_path / "nope"), "--corpus", env["corpus"], "--out", "x"]) == 2
    assert "--target directory not found" in capsys.readouterr().err
    assert train_draft_main(base + ["--out", "x", "--write-feature-cache"]) == 2
    capsys.readouterr()
    assert train_draft_main(base + ["--out", "x", "--preset", "dflash", "--block-size", "5", "--head", "gated",
                                    "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["markov_rank"], printed["block_size"], printed["markov_head_type"]) == (0, 5, "gated")
    assert printed["ce_loss_alpha"] == 1.0 and printed["l1_loss_alpha"] == 0.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_anchorz": 3}))
    assert train_draft_main(base + ["--out", "x", "--config", str(bad)]) == 2
    assert "unknown field(s) ['num_anchorz']" in capsys.readouterr().err
    out = tmp_path / "cli_run"
    assert train_draft_main(base + ["--out", str(out), "--config", str(cfg_file), "--stop-at", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["draft"] is None
    assert _losses(out) == _losses(ref.out_dir)[:2]
