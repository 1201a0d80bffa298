"""Target pretraining (`dspark train-target`): data packing, schedule, determinism, exact resume,
sharded-step equivalence (8 simulated devices, in a subprocess), HF export parity, bad input.

Everything runs on a tiny Qwen3 (2 layers, hidden 32, seq 32) with a ~64-token BPE trained on a
tiny synthetic corpus built with `dspark_jax.data.build_corpus` in a module fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers import build_tiny_corpus, write_tokenizer_files, xla_flags
from train.checkpointing import COMMIT_MARKER, TrainCheckpointer
from train.cli_target import train_target_main
from train.data import BatchIterator, DataState, pack_stream
from train.metrics import read_jsonl
from train.optim import warmup_cosine_schedule
from train.target_config import ConfigFileError, TargetTrainConfig
from train.target_trainer import train_target

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, seq_len=32, batch_size=4,
            steps=8, learning_rate=1e-2, warmup_fraction=0.25, log_every=1, eval_every=4, eval_batches=2,
            ckpt_every=4, export_dtype="float32", seed=0)


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory) -> tuple[str, str]:
    """(corpus dir, tokenizer dir): 14 code + 12 prose docs, tokenizer vocab <= 64."""
    root = tmp_path_factory.mktemp("train_target_data")
    corpus, tokenizer = build_tiny_corpus(root)
    tok_dir = root / "tokenizer"
    write_tokenizer_files(tok_dir, tokenizer)
    return corpus, str(tok_dir)


@pytest.fixture(scope="module")
def reference_run(corpus_and_tokenizer, tmp_path_factory):
    """An uninterrupted 8-step run (fp32 export)."""
    corpus, tok = corpus_and_tokenizer
    out = str(tmp_path_factory.mktemp("ref_run"))
    result = train_target(TargetTrainConfig(**TINY), corpus_dir=corpus, tokenizer_dir=tok, out_dir=out,
                          progress=False)
    return result


def _losses(out_dir: str) -> list[tuple[int, float, float, float]]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
            if "loss" in r]


def _evals(out_dir: str) -> list[tuple[int, dict]]:
    return [(r["step"], r["eval"]) for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "eval" in r]


# ---------------------------------------------------------------------------------------- unit tests
def test_pack_stream_windows_and_mask():
    packed = pack_stream(np.arange(10, dtype=np.int32), seq_len=4, pad_id=-1)
    assert packed.tokens.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, -1, -1, -1]]
    assert packed.mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert packed.num_target_tokens == 9  # every token but the first is a target exactly once


def test_batch_iterator_restores_exactly():
    packed = pack_stream(np.arange(101, dtype=np.int32), seq_len=4, pad_id=0)  # 25 windows
    it = BatchIterator(packed, batch_size=4, seed=3)
    ref = [next(it)["tokens"] for _ in range(15)]  # crosses two epoch boundaries (6 batches/epoch)
    it2 = BatchIterator(packed, batch_size=4, seed=3)
    for _ in range(7):
        next(it2)
    state = DataState.from_dict(json.loads(json.dumps(it2.state.to_dict())))
    it3 = BatchIterator(packed, batch_size=4, seed=3, state=state)
    assert all(np.array_equal(next(it3)["tokens"], r) for r in ref[7:])
    epoch0 = np.concatenate(ref[:6])[:, 0]
    assert len(set(epoch0.tolist())) == 24  # no repeats within an epoch
    assert not np.array_equal(ref[0], next(BatchIterator(packed, 4, seed=4))["tokens"])


def test_warmup_cosine_schedule_matches_spec():
    sched = warmup_cosine_schedule(1.0, total_steps=100, warmup_steps=4)
    assert [float(sched(t)) for t in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert float(sched(4)) == pytest.approx(1.0)
    assert float(sched(52)) == pytest.approx(0.5)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-7)


def test_config_json_roundtrip_and_errors(tmp_path):
    cfg = TargetTrainConfig(**TINY)
    path = tmp_path / "c.json"
    cfg.write_json(path)
    assert TargetTrainConfig.from_json_file(path) == cfg
    assert TargetTrainConfig.from_json_file(path, steps=3).steps == 3
    path.write_text(json.dumps({"hiden_size": 3}))
    with pytest.raises(ConfigFileError, match="hiden_size"):
        TargetTrainConfig.from_json_file(path)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TargetTrainConfig(**{**TINY, "seq_len": 128})


# ---------------------------------------------------------------------------------------- training
def test_loss_decreases_and_is_deterministic(reference_run, corpus_and_tokenizer, tmp_path):
    ref = _losses(reference_run.out_dir)
    assert [s for s, *_ in ref] == list(range(1, 9))
    assert ref[-1][1] < ref[0][1] - 0.3, ref
    evals = _evals(reference_run.out_dir)
    assert [s for s, _ in evals] == [4, 8] and set(evals[-1][1]) == {"code", "prose"}
    assert evals[1][1]["code"] < evals[0][1]["code"]
    corpus, tok = corpus_and_tokenizer
    again = train_target(TargetTrainConfig(**TINY), corpus_dir=corpus, tokenizer_dir=tok,
                         out_dir=str(tmp_path / "again"), progress=False, export=False)
    assert _losses(again.out_dir) == ref
    assert _evals(again.out_dir) == evals


def test_resume_equals_uninterrupted(reference_run, corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    out = str(tmp_path / "resumed")
    cfg = TargetTrainConfig(**{**TINY, "ckpt_every": 100})  # ckpt interval may differ on resume
    first = train_target(cfg, corpus_dir=corpus, tokenizer_dir=tok, out_dir=out, stop_at_step=3, progress=False)
    assert first.final_step == 3 and not first.exported
    assert TrainCheckpointer(os.path.join(out, "checkpoints")).valid_steps() == [3]
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # records of an interrupted tail are dropped
        f.write(json.dumps({"step": 4, "loss": 123.0, "lr": 0, "grad_norm": 0}) + "\n")
    second = train_target(cfg, corpus_dir=corpus, tokenizer_dir=tok, out_dir=out, resume=True, progress=False)
    assert second.start_step == 3 and second.final_step == 8 and second.exported
    assert _losses(out) == _losses(reference_run.out_dir)
    assert _evals(out) == _evals(reference_run.out_dir)
    a, b = jax.device_get(second.state), jax.device_get(reference_run.state)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)  # params, AdamW moments, step, rng: bitwise


SHARDED_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    from dspark_jax.sharding import make_mesh
    from train.target_config import TargetTrainConfig
    from train.target_trainer import build_target_program
    assert len(jax.devices()) == 8
    # lr 1e-3: Adam's first update is ~lr * sign(g), so float noise on near-zero grads moves params by <~lr
    tiny = {**json.loads(TINY_JSON), "vocab_size": 64, "learning_rate": 1e-3}
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 64, (4, 33)).astype(np.int32), "mask": np.ones((4, 32), np.float32)}
    batch["mask"][1, 20:] = 0

    def program(data, fsdp, model, accum):
        cfg = TargetTrainConfig(**tiny, grad_accum_steps=accum, mesh_data=data, mesh_fsdp=fsdp, mesh_model=model)
        mesh = make_mesh(data=data, fsdp=fsdp, model=model, devices=jax.devices()[:data * fsdp * model])
        return build_target_program(cfg, cfg.model_config(eos_id=0, pad_id=2), mesh)

    def step(prog, host_state):
        state, m = prog.step(jax.device_put(host_state, prog.state_shardings), prog.put_batch(batch))
        specs = sorted({str(s.spec) for s in jax.tree_util.tree_leaves(prog.state_shardings)})
        return jax.device_get(state), {k: float(v) for k, v in m.items()}, specs

    one = program(1, 1, 1, 1)
    init = jax.device_get(one.init(0))
    ref_state, ref_m, _ = step(one, init)
    out = {}
    for sizes in [(2, 2, 2, 1), (2, 1, 4, 2)]:
        state, m, specs = step(program(*sizes), init)
        diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                   for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state)))
        out[str(sizes)] = {"state_diff": diff, "loss_diff": abs(m["loss"] - ref_m["loss"]),
                           "grad_norm_diff": abs(m["grad_norm"] - ref_m["grad_norm"]), "specs": specs}
    print("RESULT " + json.dumps(out))
""")



def test_sharded_step_matches_single_device():
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), PYTHONPATH=str(REPO),
               JAX_PLATFORMS="cpu")
    script = SHARDED_SCRIPT.replace("TINY_JSON", repr(json.dumps(TINY)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(REPO), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for sizes, r in result.items():
        assert r["state_diff"] <= 1e-5 and r["loss_diff"] <= 1e-5 and r["grad_norm_diff"] <= 1e-5, (sizes, r)
        assert any("'model'" in s for s in r["specs"]), r  # really sharded, not replicated
    assert any("'fsdp'" in s for s in result["(2, 2, 2, 1)"]["specs"])


def test_export_loads_in_transformers(reference_run):
    import torch

    from dspark_jax.target.model import TargetModel
    from infer.api import load_target_bundle
    from tests.helpers import hf_forward, load_hf_model

    out = reference_run.out_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    tokens = np.random.default_rng(1).integers(0, 64, (2, 20)).astype(np.int32)
    hf_logits, _ = hf_forward(load_hf_model(out), tokens)
    params = jax.device_get(reference_run.state.params)
    cfg = reference_run.config.model_config(eos_id=0, pad_id=2)
    ours = TargetModel(cfg).apply({"params": params}, tokens, np.broadcast_to(np.arange(20), tokens.shape)).logits
    np.testing.assert_allclose(np.asarray(ours), hf_logits, atol=1e-4, rtol=0)
    bundle = load_target_bundle(out)  # what `dspark generate --target OUT` loads
    assert bundle.tokenizer is not None and 0 in bundle.stop_token_ids
    del torch


# ---------------------------------------------------------------------------------------- bad input
def _cli(capsys, *argv) -> tuple[int, str]:
    code = train_target_main([*map(str, argv), "--no-progress"])
    return code, capsys.readouterr().err


def test_cli_bad_inputs(corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    base = ["--corpus", corpus, "--tokenizer", tok, "--out", tmp_path / "o", *flags]
    code, err = _cli(capsys, "--corpus", tmp_path / "nope", "--tokenizer", tok, "--out", tmp_path / "o")
    assert code == 2 and "--corpus directory not found" in err
    code, err = _cli(capsys, *base, "--vocab-size", "10")
    assert code == 2 and "tokenizer has" in err and "vocab_size is 10" in err
    code, err = _cli(capsys, *base, "--seq-len", "128")
    assert code == 2 and "seq_len 128 exceeds max_position_embeddings 64" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rat": 1}')
    code, err = _cli(capsys, *base, "--config", bad)
    assert code == 2 and "learning_rat" in err
    empty_tok = tmp_path / "empty_tok"
    empty_tok.mkdir()
    code, err = _cli(capsys, "--corpus", corpus, "--tokenizer", empty_tok, "--out", tmp_path / "o")
    assert code == 2 and "no tokenizer.json" in err
    code, err = _cli(capsys, "--corpus", tok, "--tokenizer", tok, "--out", tmp_path / "o")
    assert code == 2 and "not a corpus directory" in err


def test_resume_refuses_other_config(reference_run, corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    run = tmp_path / "run"
    shutil.copytree(os.path.join(reference_run.out_dir, "checkpoints"), run / "checkpoints")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    base = ["--corpus", corpus, "--tokenizer", tok, "--out", run, *flags]
    code, err = _cli(capsys, *base, "--lr", "0.02", "--hidden-size", "64", "--resume")
    assert code == 2 and "different config" in err and "learning_rate: 0.01 -> 0.02" in err \
        and "hidden_size: 32 -> 64" in err
    code, err = _cli(capsys, *base)  # no --resume over existing checkpoints
    assert code == 2 and "--resume" in err and "latest step 8" in err


def test_uncommitted_checkpoint_is_never_restored(reference_run, corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    shutil.copytree(os.path.join(reference_run.out_dir, "checkpoints"), ckpts)
    shutil.copytree(ckpts / "8", ckpts / "12")  # a later step whose write never committed
    os.remove(ckpts / "12" / COMMIT_MARKER)
    shutil.copytree(ckpts / "8", ckpts / "16.orbax-checkpoint-tmp-1234")  # orbax's in-flight tmp dir
    with TrainCheckpointer(ckpts) as ck:
        assert ck.latest_step() == 8 and ck.valid_steps() == [4, 8]
        assert len(ck.quarantined) == 1 and "12.uncommitted-" in ck.quarantined[0]
    assert not (ckpts / "12").exists()
    result = train_target(TargetTrainConfig(**TINY), corpus_dir=corpus, tokenizer_dir=tok, out_dir=str(out),
                          resume=True, progress=False, export=False)
    assert result.start_step == 8 and result.final_step == 8


def test_bf16_compute_keeps_float32_master_weights():
    from dspark_jax.sharding import make_mesh
    from train.target_trainer import build_target_program

    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 64, (4, 33)).astype(np.int32), "mask": np.ones((4, 32), np.float32)}
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = TargetTrainConfig(**{**TINY, "vocab_size": 64, "compute_dtype": dtype})
        prog = build_target_program(cfg, cfg.model_config(eos_id=0, pad_id=2), make_mesh(devices=jax.devices()[:1]))
        state = prog.init(0)
        for _ in range(3):
            state, m = prog.step(state, prog.put_batch(batch))
            losses.setdefault(dtype, []).append(float(m["loss"]))
        assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {np.dtype(np.float32)}
        assert {x.dtype for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim} == {np.dtype(np.float32)}
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], atol=0.05)


# ---------------------------------------------------------------------------------------- hardening (issue 10)
def test_non_finite_training_stops_without_export(corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    out = tmp_path / "diverged"
    code, err = _cli(capsys, "--corpus", corpus, "--tokenizer", tok, "--out", out, *flags, "--lr", "1e9",
                     "--ckpt-every", "1")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("dspark train-target: error: non-finite training at step "), err
    bad_step = int(lines[-1].split("at step ")[1].split()[0])
    assert "Traceback" not in err
    kept = TrainCheckpointer(out / "checkpoints").valid_steps()
    assert kept and max(kept) == bad_step - 1  # the last good step is kept, the bad one never saved
    assert f"last good checkpoint is step {bad_step - 1}" in lines[-1]
    assert not any(p.name.endswith(".safetensors") for p in out.iterdir())  # nothing exported


def test_resume_skips_a_corrupted_latest_checkpoint(reference_run, corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    out = tmp_path / "run"
    shutil.copytree(os.path.join(reference_run.out_dir, "checkpoints"), out / "checkpoints")
    for f in (out / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")  # a torn write: every array file of the latest step truncated
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    code, err = _cli(capsys, "--corpus", corpus, "--tokenizer", tok, "--out", out, *flags, "--resume")
    assert code == 0, err
    assert "Traceback" not in err and "checkpoint step 8" in err and "unreadable" in err
    note = next(line for line in err.splitlines() if "unreadable" in line)
    assert "8.corrupt-" in note and len(note) < 600
    assert [p.name.split(".")[0] for p in (out / "checkpoints").iterdir() if "corrupt" in p.name] == ["8"]
    # resumed from step 4: steps 5..8 equal the uninterrupted run
    assert _losses(str(out)) == [r for r in _losses(reference_run.out_dir) if r[0] > 4]


def test_token_cache_keys_on_corpus_content(corpus_and_tokenizer, tmp_path):
    from train.data import load_tokenizer, tokenize_split

    corpus, tok_dir = corpus_and_tokenizer
    edited = tmp_path / "corpus"
    shutil.copytree(corpus, edited)
    tok = load_tokenizer(tok_dir)
    cache = str(tmp_path / "cache")
    before = tokenize_split(str(edited), "prose", "train", tok, cache_dir=cache)
    path = edited / "prose" / "train.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["text"] = "model model model " + record["text"]
    path.write_text(json.dumps(record) + "\n" + "".join(lines[1:]))  # hand edit; manifest untouched
    after = tokenize_split(str(edited), "prose", "train", tok, cache_dir=cache)
    fresh = tokenize_split(str(edited), "prose", "train", tok)  # no cache
    np.testing.assert_array_equal(after, fresh)
    assert len(after) > len(before)


def test_malformed_corpus_line_and_tokenizer_meta(corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    bad_corpus = tmp_path / "corpus"
    shutil.copytree(corpus, bad_corpus)
    path = bad_corpus / "code" / "train.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + '{"path": "x", "text": "unterminated\n' + "".join(lines[2:]))
    code, err = _cli(capsys, "--corpus", bad_corpus, "--tokenizer", tok, "--out", tmp_path / "o1", *flags)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"{path}:3: malformed JSON" in err, err
    bad_tok = tmp_path / "tok"
    shutil.copytree(tok, bad_tok)
    (bad_tok / "tokenizer_meta.json").write_text('{\n  "eos_id": 0,\n  "pad_id": oops\n}\n')
    code, err = _cli(capsys, "--corpus", corpus, "--tokenizer", bad_tok, "--out", tmp_path / "o2", *flags)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"{bad_tok / 'tokenizer_meta.json'}: invalid JSON (Expecting value at line 3" in err, err


def test_flag_errors_name_the_flag_not_the_config_file(corpus_and_tokenizer, tmp_path, capsys):
    corpus, tok = corpus_and_tokenizer
    good = tmp_path / "good.json"
    good.write_text(json.dumps(TINY))
    base = ["--corpus", corpus, "--tokenizer", tok, "--out", tmp_path / "o", "--config", good]
    code, err = _cli(capsys, *base, "--hidden-size", "0")
    assert code == 2 and "--hidden-size 0: hidden_size must be a positive integer" in err, err
    assert str(good) not in err
    code, err = _cli(capsys, *base, "--mesh", "3,1,1")
    assert code == 2 and "--mesh 3,1,1:" in err and str(good) not in err, err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY, "hidden_size": -1}))
    code, err = _cli(capsys, "--corpus", corpus, "--tokenizer", tok, "--out", tmp_path / "o", "--config", bad)
    assert code == 2 and f"{bad}: hidden_size must be a positive integer" in err, err
    code, err = _cli(capsys, *base, "--num-processes", "2")
    assert code == 2 and "must be given together" in err, err
