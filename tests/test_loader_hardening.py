"""Hostile-but-realistic checkpoints (issue 10 #1, #2, #4, #6): every one is refused with a message naming
the file and the field / tensor, and a save interrupted at any step leaves a complete model behind.

Uses copies of the session's tiny Qwen3 checkpoint and of the bundled drafter (no compilation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dspark_jax.calibration import CalibrationFileError, load_temperatures
from dspark_jax.checkpoint import atomic
from dspark_jax.checkpoint.deepspec import load_draft, save_draft
from dspark_jax.checkpoint.hf import INDEX_FILE, SINGLE_FILE, load_target, save_target
from dspark_jax.checkpoint.hf_layout import CheckpointError
from dspark_jax.config import ConfigError
from dspark_jax.draft.config import DraftConfigError
from tests.helpers import load_hf_model

REPO = Path(__file__).resolve().parents[1]
BUNDLED_DRAFT = REPO / "models" / "pystd-dspark-k7"


@pytest.fixture
def ckpt(tiny_qwen3_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_qwen3_dir, tmp_path / "target"))


@pytest.fixture
def draft_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(BUNDLED_DRAFT, tmp_path / "draft"))


def _edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"


def _edit_tensors(file: Path, edit) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------- config fields
@pytest.mark.parametrize("changes, message", [
    (dict(vocab_size="128"), "field 'vocab_size' must be an integer, got '128'"),
    (dict(num_hidden_layers=2.5), "field 'num_hidden_layers' must be an integer, got 2.5"),
    (dict(rms_norm_eps="tiny"), "field 'rms_norm_eps' must be a finite number, got 'tiny'"),
    (dict(rope_theta=-10000.0, rope_parameters=...), "field 'rope_theta' must be > 0, got -10000.0"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -5.0}), "rope_parameters: field 'rope_theta' must be > 0"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling: unsupported rope_type 'yarn'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_parameters (default) and rope_scaling (linear) disagree"),
    (dict(tie_word_embeddings="no"), "field 'tie_word_embeddings' must be true or false, got 'no'"),
    (dict(max_position_embeddings=0), "field 'max_position_embeddings' must be >= 1, got 0"),
    (dict(architectures=["Qwen3DSparkModel"]), "this is a DSpark/DFlash drafter"),
    (dict(architectures=["GPT2LMHeadModel"], model_type="qwen3"), "unknown architecture ['GPT2LMHeadModel']"),
])
def test_bad_config_fields_name_field_and_file(ckpt: Path, changes: dict, message: str) -> None:
    path = _edit_config(ckpt, **changes)
    with pytest.raises(ConfigError) as exc:
        load_target(ckpt)
    assert str(exc.value).startswith(str(path)) and message in str(exc.value), str(exc.value)


def test_config_json_not_an_object(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=re.escape(f"{ckpt / 'config.json'}: expected a JSON object at the top "
                                                    f"level, got list")):
        load_target(ckpt)
    (ckpt / "config.json").write_bytes(b'{"vocab_size": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_target(ckpt)


def test_gpt2_tensors_under_a_qwen3_config(ckpt: Path) -> None:
    """A GPT-2 state dict beside a config.json that claims qwen3 is recognised by its tensor names."""
    gpt2 = {"transformer.wte.weight": np.zeros((128, 32), np.float32),
            "transformer.h.0.attn.c_attn.weight": np.zeros((32, 96), np.float32)}
    save_file(gpt2, str(ckpt / SINGLE_FILE))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*look like a GPT-2 checkpoint"):
        load_target(ckpt)


def test_drafter_as_target_and_target_as_drafter(ckpt: Path, draft_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"this is a DSpark/DFlash drafter .*pass it as the draft \(--draft\)"):
        load_target(draft_dir)
    with pytest.raises(DraftConfigError, match=r"this is a target model .*pass it as the target \(--target\)"):
        load_draft(ckpt)


# ------------------------------------------------------------------------------------- tensors
def test_non_finite_weights_are_refused(ckpt: Path, draft_dir: Path) -> None:
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    _edit_tensors(ckpt / SINGLE_FILE, poison)
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt / SINGLE_FILE}: tensor "
                                                        f"'model.layers.1.mlp.up_proj.weight' holds 1 non-finite")):
        load_target(ckpt)

    def poison_draft(t):
        t["fc.weight"] = np.full(t["fc.weight"].shape, np.inf, t["fc.weight"].dtype)
    _edit_tensors(draft_dir / SINGLE_FILE, poison_draft)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'fc\.weight' holds \d+ non-finite"):
        load_draft(draft_dir)


@pytest.mark.parametrize("np_dtype, tag", [(np.int32, "I32"), (np.bool_, "BOOL")])
def test_draft_refuses_integer_and_bool_tensors(draft_dir: Path, np_dtype, tag: str) -> None:
    """Today's loader cast these to float without a word; now the dtype is an error like the target's."""
    def cast(t):
        t["hidden_norm.weight"] = np.ones(t["hidden_norm.weight"].shape, np_dtype)
    _edit_tensors(draft_dir / SINGLE_FILE, cast)
    with pytest.raises(CheckpointError, match=rf"tensor 'hidden_norm\.weight' has dtype {tag}; only F32/F16/BF16"):
        load_draft(draft_dir)


@pytest.mark.parametrize("changes, message", [
    (dict(block_size="7"), "field 'block_size' must be an integer, got '7'"),
    (dict(markov_rank=-3), "field 'markov_rank' must be >= 0, got -3"),
    (dict(rope_theta=-1.0, rope_parameters=...), "field 'rope_theta' must be > 0"),
    (dict(enable_confidence_head="yes"), "field 'enable_confidence_head' must be true or false"),
    (dict(architectures="Qwen3DSparkModel"), "architectures='Qwen3DSparkModel'; expected ['Qwen3DSparkModel']"),
])
def test_draft_config_fields_validated(draft_dir: Path, changes: dict, message: str) -> None:
    path = _edit_config(draft_dir, **changes)
    with pytest.raises(DraftConfigError) as exc:
        load_draft(draft_dir)
    assert str(exc.value).startswith(str(path)) and message in str(exc.value), str(exc.value)


@pytest.mark.parametrize("content, message", [
    ('{"temperatures": [1.0, 0.0, 1, 1, 1, 1, 1]}', "temperatures[1] = 0.0; every temperature must be a finite"),
    ('{"temperatures": [1.0, -2.0, 1, 1, 1, 1, 1]}', "temperatures[1] = -2.0"),
    ('{"temperatures": [NaN, 1, 1, 1, 1, 1, 1]}', "temperatures[0] = nan"),
    ('{"temperatures": [1.0, 1.0]}', "2 temperatures for a drafter with 7 slots"),
    ('{"temperatures": [1.0, ', "invalid JSON (Expecting value at line 1"),
    ('[1.0]', "expected a JSON object at the top level, got list"),
    ('{"temperatures": []}', "'temperatures' must be a non-empty list"),
])
def test_sts_temperatures_validated_at_draft_load(draft_dir: Path, content: str, message: str) -> None:
    from infer.speculative_api import load_draft_bundle

    file = draft_dir / "sts_temperatures.json"
    file.write_text(content)
    with pytest.raises(CalibrationFileError) as exc:
        load_draft_bundle(draft_dir)
    assert str(exc.value).startswith(str(file)) and message in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)


def test_loaded_draft_parameters_live_on_the_device() -> None:
    """Host (numpy) parameters would be copied to the device by every jitted call taking them: the engine's
    round program each step (12 MB, ~1.5 ms of a 10 ms round at 16 slots on this CPU, before this was fixed)."""
    import jax

    from infer.speculative_api import load_draft_bundle

    leaves = jax.tree_util.tree_leaves(load_draft_bundle(BUNDLED_DRAFT).params)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves), {type(x).__name__ for x in leaves}


def test_load_temperatures_accepts_the_bundled_file() -> None:
    assert len(load_temperatures(BUNDLED_DRAFT, num_slots=7)) == 7


# ------------------------------------------------------------------------------------- shard paths
@pytest.fixture
def sharded(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "sharded"
    load_hf_model(tiny_llama_dir).save_pretrained(out, max_shard_size="20KB")
    return out


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_shard_paths_stay_inside_the_model_dir(sharded: Path, bad: str) -> None:
    (sharded.parent / "outside.safetensors").write_bytes((sharded / sorted(os.listdir(sharded))[-2]).read_bytes())
    index = json.loads((sharded / INDEX_FILE).read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = bad
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"shard path {bad!r} points outside the model directory")):
        load_target(sharded)


# ------------------------------------------------------------------------------------- crash safety
@pytest.fixture
def saved(tiny_qwen3_dir: Path, tmp_path: Path):
    config, params = load_target(tiny_qwen3_dir, dtype="float32")
    out = Path(save_target(params, config, tmp_path / "model"))
    new = {**params, "norm": {"scale": params["norm"]["scale"] * 2}}
    return out, config, params, new


def _norm(out: Path) -> np.ndarray:
    return np.asarray(load_target(out)[1]["norm"]["scale"])


def test_crash_while_writing_keeps_the_old_model(saved, monkeypatch) -> None:
    out, config, params, new = saved
    import dspark_jax.checkpoint.hf as hf

    def boom(*a, **k):
        raise OSError("disk full (injected)")
    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError, match="injected"):
        save_target(new, config, out, overwrite=True)
    np.testing.assert_array_equal(_norm(out), np.asarray(params["norm"]["scale"]))
    assert sorted(os.listdir(out.parent)) == ["model"]  # no temporary directory left


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_crash_during_the_swap_keeps_a_complete_model(saved, monkeypatch, exchange: bool) -> None:
    """Fail the rename that puts the new model in place: the old model stays loadable (restored by the
    loader where the swap had already moved it aside); an uninterrupted save then swaps in the new one."""
    out, config, params, new = saved
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename, calls = atomic._rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if dst == str(out) and os.path.basename(src).startswith(".model.tmp-"):
            raise OSError("power cut (injected)")
        real_rename(src, dst)
    monkeypatch.setattr(atomic, "_rename", rename)
    if exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError("power cut (injected)")))
    with pytest.raises(OSError, match="injected"):
        save_target(new, config, out, overwrite=True)
    np.testing.assert_array_equal(_norm(out), np.asarray(params["norm"]["scale"]))
    monkeypatch.undo()
    save_target(new, config, out, overwrite=True)
    np.testing.assert_array_equal(_norm(out), np.asarray(new["norm"]["scale"]))
    assert sorted(os.listdir(out.parent)) == ["model"]


@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_publish_files_into_a_run_dir_survives_a_crash(saved, tmp_path: Path, monkeypatch, fail_at: int) -> None:
    """An export into a directory holding other files (a training run): crash before the marker is
    committed -> old model intact; crash while moving files in -> the loader finishes the move."""
    out, config, params, new = saved
    run = Path(shutil.copytree(out, tmp_path / "run"))
    (run / "metrics.jsonl").write_text("{}\n")
    staging = run / atomic.STAGING_DIR
    save_target(new, config, staging, max_shard_bytes=8_000)  # sharded: several files to move
    real_replace, done = os.replace, []

    def replace(src, dst):  # call 0 commits the marker, calls 1.. move the model's files in
        if len(done) == fail_at:
            raise OSError("killed (injected)")
        done.append(dst)
        real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        atomic.publish_files(str(staging), str(run))
    monkeypatch.undo()
    want = params if fail_at == 0 else new
    np.testing.assert_array_equal(_norm(run), np.asarray(want["norm"]["scale"]))
    assert (run / "metrics.jsonl").exists()
    if fail_at:
        assert not staging.exists() and not (run / SINGLE_FILE).exists()  # superseded single file removed


def test_remote_paths_through_epath(saved, tmp_path: Path, monkeypatch, draft_dir: Path) -> None:
    """gs://-style destinations go through etils.epath (here a scheme mapped onto a local bucket dir)."""
    from etils import epath

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    monkeypatch.setattr(atomic, "_epath", lambda p: epath.Path(os.fspath(p).replace("mem://", f"{bucket}/")))
    out, config, params, new = saved
    save_target(params, config, "mem://runs/target")
    with pytest.raises(CheckpointError, match="already exists"):
        save_target(params, config, "mem://runs/target")
    save_target(new, config, "mem://runs/target", overwrite=True)
    got = load_target("mem://runs/target")[1]
    np.testing.assert_array_equal(np.asarray(got["norm"]["scale"]), np.asarray(new["norm"]["scale"]))
    assert sorted(os.listdir(bucket / "runs")) == ["target"]
    dcfg, dparams = load_draft(draft_dir)
    save_draft(dparams, dcfg, "mem://runs/draft")
    assert load_draft("mem://runs/draft")[0] == dcfg
