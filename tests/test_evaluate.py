"""`infer.evaluate`, `dspark eval` and `dspark calibrate` on a tiny random target + oracle drafter on disk."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from dspark_jax.calibration import CALIBRATION_FILE, RoundData, threshold_sweep
from dspark_jax.checkpoint.deepspec import save_draft
from dspark_jax.checkpoint.hf import save_target
from dspark_cli.calibrate_cmd import calibrate_main, make_disjoint
from dspark_cli.eval_cmd import eval_main
from dspark_jax.sampling import SamplingConfig
from infer.evaluate import (EvalConfig, PromptFileError, PromptSet, corpus_prompts, load_dataset,
                            parse_dataset_spec, read_prompt_file, run_speculative)
from tests.helpers import train_tiny_tokenizer, write_tokenizer_files
from tests.spec_helpers import oracle_draft, random_target

# The first lines of the reference eval set (eval_prompts/mbpp.jsonl), verbatim.
MBPP_LINES = [
    '{"turns": ["Write a python function to remove first and last occurrence of a given character from the string."]}',
    '{"turns": ["Write a function to sort a given matrix in ascending order according to the sum of its rows."]}',
    '{"turns": ["Write a python function to find the volume of a triangular prism."]}',
]
SHARED_MBPP = Path("/work/shared/data/eval_prompts/mbpp.jsonl")
BLOCK = 3
MAX_NEW = 12


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Target (with the tiny tokenizer, no stop ids) and a DSpark oracle drafter with a confidence head, on disk."""
    root = tmp_path_factory.mktemp("eval_models")
    cfg, params = random_target(vocab=128, context_scale=0.03, max_pos=256)
    target_dir = Path(save_target(params, cfg, root / "target"))
    write_tokenizer_files(target_dir, train_tiny_tokenizer(), eos_token_id=None)
    (target_dir / "tokenizer_config.json").unlink()  # no eos anywhere -> no stop ids: fixed-length outputs
    dcfg, dp = oracle_draft(cfg, params, block_size=BLOCK, head="vanilla", strength=3.0)
    save_draft(dp, dcfg, root / "draft", dtype="float32")
    return target_dir, root / "draft"


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    return _write(d / "mbpp.jsonl", MBPP_LINES + ['{"turns": ["def fib(n):\\n    return n", "second turn"]}'])


def test_mbpp_lines_are_the_reference_format():
    if SHARED_MBPP.exists():  # the verbatim copy matches the shared eval set
        assert SHARED_MBPP.read_text().splitlines()[:3] == MBPP_LINES


def test_read_prompt_file_reference_format(prompt_file, tmp_path):
    prompts = read_prompt_file(prompt_file)
    assert prompts[0] == json.loads(MBPP_LINES[0])["turns"][0]
    assert prompts[3] == "def fib(n):\n    return n"  # first turn only
    ids = _write(tmp_path / "ids.jsonl", ['{"token_ids": [5, 6, 7]}', "", '{"token_ids": [8]}'])
    assert read_prompt_file(ids) == [[5, 6, 7], [8]]


@pytest.mark.parametrize("bad,msg", [
    ('{"turns": ["ok"', "invalid JSON"),
    ('{"turns": []}', "non-empty list of strings"),
    ('{"turns": [3]}', "non-empty list of strings"),
    ('{"prompt": "x"}', "expected an object with 'turns'"),
    ('["x"]', "expected an object with 'turns'"),
    ('{"token_ids": [1, -2]}', "token_ids"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, msg):
    path = _write(tmp_path / "bad.jsonl", MBPP_LINES[:1] + [""] + [bad] + MBPP_LINES[1:])
    with pytest.raises(PromptFileError, match=f"bad.jsonl, line 3: .*{msg}"):
        read_prompt_file(path)
    with pytest.raises(PromptFileError, match="contains no prompts"):
        read_prompt_file(_write(tmp_path / "empty.jsonl", [""]))


def test_cli_rejects_malformed_line_before_loading_models(tmp_path, capsys):
    path = _write(tmp_path / "bad.jsonl", MBPP_LINES[:2] + ['{"turns": "not a list"}'])
    rc = eval_main(["--target", str(tmp_path), "--draft", f"d={tmp_path}", "--datasets", str(path),
                    "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "dspark eval: error:" in err and "bad.jsonl, line 3" in err
    assert not (tmp_path / "out").exists()


def test_dataset_specs_and_corpus_prompts(tmp_path):
    assert parse_dataset_spec("a/b/gsm8k.jsonl") == {"kind": "file", "path": "a/b/gsm8k.jsonl", "name": "gsm8k"}
    assert parse_dataset_spec("corpus:code")["split"] == "test"
    assert parse_dataset_spec("corpus:prose:validation", "test")["split"] == "validation"
    with pytest.raises(PromptFileError):
        parse_dataset_spec("corpus:")
    corpus = _fake_corpus(tmp_path)
    tok = _Tok()
    out = corpus_prompts(str(corpus), "code", "test", tok, 4, shuffle_seed=None)
    assert out == [[1, 2, 3, 4], [9, 9, 9, 9]]  # the 3-token document is skipped
    assert corpus_prompts(str(corpus), "code", "test", tok, 4, max_prompts=1, shuffle_seed=None) == [[1, 2, 3, 4]]


class _Tok:
    def encode(self, text):
        return [int(t) for t in text.split()]


def _fake_corpus(root: Path) -> Path:
    c = root / "corpus"
    (c / "code").mkdir(parents=True)
    (c / "manifest.json").write_text(json.dumps({"format": "dspark-corpus/v1"}))
    docs = [{"path": "a.py", "text": "1 2 3 4 5 6"}, {"path": "b.py", "text": "7 8 9"},
            {"path": "c.py", "text": "9 9 9 9 9"}]
    _write(c / "code" / "test.jsonl", [json.dumps(d) for d in docs])
    return c


def test_make_disjoint_splits_shared_sources():
    a = PromptSet(name="a", prompts=((1,), (2,), (3,), (4,)), source="A")
    b = PromptSet(name="b", prompts=((4,), (5,)), source="B")
    fit, rep, notes = make_disjoint([a, b], [a])
    assert fit[0].prompts == ((1,), (3,)) and rep[0].prompts == ((2,), (4,))
    assert fit[1].prompts == ((5,),) and len(notes) == 2  # (4,) dropped from b: it is reported on


def test_eval_end_to_end(models, prompt_file, tmp_path):
    target_dir, draft_dir = models
    ids = _write(tmp_path / "ids.jsonl", ['{"token_ids": [3, 4, 5, 6]}', '{"token_ids": [7, 8]}'])
    corpus = _fake_corpus(tmp_path)
    out = tmp_path / "out"
    rc = eval_main(["--target", str(target_dir), "--draft", f"oracle={draft_dir}",
                    "--datasets", str(prompt_file), str(ids), "corpus:code", "--corpus", str(corpus),
                    "--corpus-prompt-tokens", "3", "--block-sizes", str(BLOCK), "--max-new-tokens", str(MAX_NEW),
                    "--max-prompts", "2", "--batch-size", "2", "--save-rounds", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["dataset"] for r in doc["rows"]] == ["mbpp", "ids", "corpus-code-test"]
    assert doc["datasets"]["mbpp"]["num_prompts"] == 2 and doc["config"]["temperature"] == 1.0
    for row in doc["rows"]:
        assert row["drafter"] == "oracle" and row["block_size"] == BLOCK and row["num_prompts"] == 2
        assert 1.0 <= row["acceptance_length"] <= BLOCK + 1
        assert 0 < row["verify_rate"] <= 1 and row["draft_tokens_per_proposal"] == BLOCK
        assert len(row["accept_rate"]) == len(row["conditional_accept_rate"]) == BLOCK
        assert row["speculative"]["tokens"] == row["autoregressive"]["tokens"] == 2 * MAX_NEW  # no stop ids
        assert row["speculative"]["tokens_per_s"] > 0 and row["autoregressive"]["tokens_per_s"] > 0
        spec_tps, ar_tps = row["speculative"]["tokens_per_s"], row["autoregressive"]["tokens_per_s"]
        assert row["speedup"] == pytest.approx(spec_tps / ar_tps)
        cal = row["calibration"]["raw"]
        assert {"ece_mean", "auc_mean", "brier_mean", "pred_mean", "target_mean"} <= set(cal)
        assert len(cal["positions"]) == BLOCK and row["calibration"]["calibrated"] is None
        data = RoundData.load(out / "rounds" / f"{row['dataset']}__oracle__K{BLOCK}.npz")
        assert data.num_rounds == row["rounds"]
        # Replaying threshold 0 on the recorded rounds reproduces the measured verify rate (no stop ids).
        assert threshold_sweep(data, [0.0])[0]["acceptance_rate"] == pytest.approx(row["verify_rate"])
    md = (out / "results.md").read_text()
    assert "| dataset | drafter | K | τ |" in md and "| mbpp | oracle | 3 |" in md and "ECE raw" in md


def test_run_speculative_matches_device_stats(models, tmp_path):
    """Per-position rates derived from round records equal the loop's own counters (one batch)."""
    from infer.api import generate, load_target_bundle
    from infer.speculative_api import load_draft_bundle

    target_dir, draft_dir = models
    target = load_target_bundle(target_dir)
    draft = load_draft_bundle(draft_dir, target)
    assert target.stop_token_ids == ()
    config = EvalConfig(block_sizes=(BLOCK,), max_new_tokens=MAX_NEW, max_prompts=2, batch_size=2, seed=7)
    ids = _write(tmp_path / "ids.jsonl", ['{"token_ids": [9, 4, 5, 6]}', '{"token_ids": [17, 8]}'])
    ds = load_dataset(str(ids), target, config)
    metrics, data = run_speculative(target, draft, ds, config, BLOCK)
    ref = generate(target, [list(p) for p in ds.prompts], draft=draft, max_new_tokens=MAX_NEW, seed=7,
                   sampling=SamplingConfig(temperature=1.0),
                   block_size=BLOCK, record_rounds=True).metrics
    for key in ("rounds", "acceptance_length", "verify_rate", "draft_tokens_per_proposal"):
        assert metrics[key] == pytest.approx(ref[key])
    for key in ("accept_rate", "conditional_accept_rate"):
        assert [x if x is not None else math.nan for x in metrics[key]] == pytest.approx(
            [x if x is not None else math.nan for x in ref[key]], nan_ok=True)
    assert data.num_rounds == ref["rounds"]


def test_calibrate_end_to_end(models, tmp_path):
    target_dir, draft_dir = models
    draft_copy = tmp_path / "draft"
    shutil.copytree(draft_dir, draft_copy)
    ids = _write(tmp_path / "ids.jsonl", [json.dumps({"token_ids": [i, i + 1, i + 2]}) for i in range(3, 11)])
    out = tmp_path / "cal"
    rc = calibrate_main(["--target", str(target_dir), "--draft", str(draft_copy), "--fit-data", str(ids),
                         "--report-data", str(ids), "--max-new-tokens", str(MAX_NEW), "--max-prompts", "4",
                         "--batch-size", "2", "--thresholds", "0,0.3,0.6,0.9", "--out", str(out)])
    assert rc == 0
    doc = json.loads((draft_copy / CALIBRATION_FILE).read_text())
    assert len(doc["temperatures"]) == BLOCK and all(t > 0 for t in doc["temperatures"])
    assert doc["metadata"]["notes"] and doc["num_rounds"] > 0
    from infer.api import load_target_bundle
    from infer.speculative_api import load_draft_bundle

    loaded = load_draft_bundle(draft_copy, load_target_bundle(target_dir))
    assert loaded.temperatures == tuple(doc["temperatures"])
    report = json.loads((out / "calibration.json").read_text())
    assert report["fit"]["temperatures"] == doc["temperatures"]
    assert len(report["report_before"]["positions"]) == len(report["report_after"]["positions"]) == BLOCK
    assert [r["threshold"] for r in report["sweep"]["raw"]] == [0.0, 0.3, 0.6, 0.9]
    assert report["sweep"]["raw"][0]["verified_per_step"] == BLOCK + 1
    for name in ("reliability.png", "threshold_sweep.png", "calibration.md"):
        assert (out / name).stat().st_size > 0
    # --write-to puts the file elsewhere and leaves the draft directory alone.
    other = tmp_path / "elsewhere.json"
    assert calibrate_main(["--target", str(target_dir), "--draft", str(draft_dir), "--fit-data", str(ids),
                           "--report-data", str(ids), "--max-new-tokens", str(MAX_NEW), "--max-prompts", "4",
                           "--batch-size", "2", "--write-to", str(other), "--out", str(tmp_path / "cal2")]) == 0
    assert other.exists() and not (draft_dir / CALIBRATION_FILE).exists()


def test_calibrate_rejects_overlapping_only_data(models, tmp_path, capsys):
    target_dir, draft_dir = models
    one = _write(tmp_path / "one.jsonl", ['{"token_ids": [3, 4]}'])
    rc = calibrate_main(["--target", str(target_dir), "--draft", str(draft_dir), "--fit-data", str(one),
                         "--report-data", str(one), "--out", str(tmp_path / "o")])
    assert rc == 2 and "empty after splitting" in capsys.readouterr().err
