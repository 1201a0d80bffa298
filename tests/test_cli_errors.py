"""Realistic CLI mistakes (issue 10 #3): one ``<prog>: error:`` line naming the file / field / line, exit
status 2, and nothing computed or written first. Entry functions run in-process with argv lists (no
compilation: every case fails before the first program); two real subprocess checks at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli.calibrate_cmd import calibrate_main
from dspark_cli.corpus_cmd import train_tokenizer_main
from dspark_cli.eval_cmd import eval_main
from dspark_cli.generate_cmd import main as generate_main
from dspark_jax.data.corpus import CorpusFormatError, iter_documents
from dspark_jax.data.tokenizer_training import read_tokenizer_meta

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "models" / "pystd-qwen3-target"
DRAFT = REPO / "models" / "pystd-dspark-k7"


def _run(main, argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.err


def _one_line(err: str, prog: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"{prog}: error:"), err
    for f in fragments:
        assert f in lines[-1], (f, err)


# ------------------------------------------------------------------------------------------- generate
def test_speculative_flags_without_draft_are_errors(tiny_qwen3_dir, capsys):
    for flags, name in ((["--block-size", "3"], "--block-size"),
                        (["--confidence-threshold", "0.5"], "--confidence-threshold"),
                        (["--survival-threshold", "0.3", "--block-size", "2"], "--block-size, --survival-threshold")):
        code, err = _run(generate_main, ["--target", tiny_qwen3_dir, "--prompt", "hi", *flags], capsys)
        assert code == 2
        _one_line(err, "dspark generate", name, "only apply to speculative decoding: add --draft DIR")


def test_non_utf8_prompts(tiny_qwen3_dir, tmp_path, capsys):
    bad_arg = os.fsdecode(b"def f(\xff):")  # what Python makes of a non-UTF-8 argv byte
    code, err = _run(generate_main, ["--target", tiny_qwen3_dir, "--prompt", bad_arg], capsys)
    assert code == 2
    _one_line(err, "dspark generate", "prompt 0: not valid UTF-8 text (byte 0xff at character 6)")

    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("first\ncaf\xe9 au lait\n".encode("latin-1"))
    code, err = _run(generate_main, ["--target", tiny_qwen3_dir, "--prompts-file", latin1], capsys)
    assert code == 2
    _one_line(err, "dspark generate", f"{latin1}:2: not valid UTF-8 text")

    surrogate = tmp_path / "prompts.jsonl"
    surrogate.write_text('{"turns": ["ok"]}\n{"turns": ["bad \\ud800 half"]}\n')
    code, err = _run(generate_main, ["--target", tiny_qwen3_dir, "--prompts-file", surrogate], capsys)
    assert code == 2
    _one_line(err, "dspark generate", f"{surrogate}:2: not valid UTF-8 text (lone surrogate '\\ud800'")


def test_seed_above_2_63(tiny_qwen3_dir, capsys):
    code, err = _run(generate_main, ["--target", tiny_qwen3_dir, "--prompt", "hi", "--seed", str(2**63)], capsys)
    assert code == 2 and "seed must be in [0, 2^63 - 1], got 9223372036854775808" in err


# ------------------------------------------------------------------------------------------- eval
def test_eval_checks_out_before_any_work(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["hello"]}\n')
    out_file = tmp_path / "results"
    out_file.write_text("keep me")
    code, err = _run(eval_main, ["--target", TARGET, "--draft", DRAFT, "--datasets", prompts, "--out", out_file],
                     capsys)
    assert code == 2
    _one_line(err, "dspark eval", f"--out {str(out_file)!r} exists and is not a directory")
    assert out_file.read_text() == "keep me"
    assert "[dspark]" not in err  # nothing was loaded or run


def test_eval_block_sizes_beyond_the_checkpoint(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["hello"]}\n')
    code, err = _run(eval_main, ["--target", TARGET, "--draft", f"dspark={DRAFT}", "--datasets", prompts,
                                 "--block-sizes", "3,9", "--out", tmp_path / "out"], capsys)
    assert code == 2
    _one_line(err, "dspark eval", "--block-sizes: block size 9 exceeds draft 'dspark''s checkpoint block size 7")
    assert not (tmp_path / "out").exists()


def test_eval_non_utf8_and_surrogate_prompt_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"turns": ["ok"]}\n{"turns": ["caf\xe9"]}\n')
    code, err = _run(eval_main, ["--target", TARGET, "--draft", DRAFT, "--datasets", bad, "--out", tmp_path / "o"],
                     capsys)
    assert code == 2
    _one_line(err, "dspark eval", f"{bad}, line 2: not valid UTF-8 text")
    bad.write_text('{"turns": ["\\udc80 x"]}\n')
    code, err = _run(eval_main, ["--target", TARGET, "--draft", DRAFT, "--datasets", bad, "--out", tmp_path / "o"],
                     capsys)
    assert code == 2
    _one_line(err, "dspark eval", f"{bad}, line 1: the first turn holds a lone surrogate")


def _corpus(root: Path, line: str) -> Path:
    c = root / "corpus"
    for domain in ("code", "prose"):
        (c / domain).mkdir(parents=True)
        for split in ("train", "validation", "test"):
            (c / domain / f"{split}.jsonl").write_text('{"path": "a.py", "text": "x = 1"}\n' + line + "\n")
    splits = {s: {"files": 2, "bytes": 10} for s in ("train", "validation", "test")}
    (c / "manifest.json").write_text(json.dumps({"format": "dspark-corpus/v1", "content_hash": "sha256:0",
                                                 "domains": {d: {"splits": splits} for d in ("code", "prose")}}))
    return c


@pytest.mark.parametrize("line, message", [
    ('{"path": "b.py", "text": ', "invalid JSON"),
    ('{"path": "b.py"}', "expected an object with string fields 'path' and 'text'"),
    ('{"path": "b.py", "text": "\\ud800"}', "'text' holds a lone surrogate"),
])
def test_malformed_corpus_line(tmp_path, capsys, line: str, message: str) -> None:
    corpus = _corpus(tmp_path, line)
    with pytest.raises(CorpusFormatError, match=f"code/test.jsonl:2: {message}"):
        list(iter_documents(str(corpus), "code", "test"))
    code, err = _run(train_tokenizer_main, ["--corpus", corpus, "--out", tmp_path / "tok"], capsys)
    assert code == 2
    _one_line(err, "dspark train-tokenizer", "train.jsonl:2:", message)


def test_malformed_tokenizer_meta(tmp_path):
    meta = tmp_path / "tokenizer_meta.json"
    meta.write_text('{"eos_id": 0, "pad_id": "2"}')
    with pytest.raises(CorpusFormatError, match=r"tokenizer_meta\.json: field 'pad_id' must be an integer >= 0"):
        read_tokenizer_meta(str(meta))
    meta.write_text('{"eos_id": 0,')
    with pytest.raises(CorpusFormatError, match=r"tokenizer_meta\.json: invalid JSON .* line 1"):
        read_tokenizer_meta(str(meta))


# ------------------------------------------------------------------------------------------- calibrate
def test_calibrate_checks_write_to_before_any_work(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["hello"]}\n{"turns": ["world"]}\n')
    missing = tmp_path / "no" / "such" / "dir" / "sts.json"
    code, err = _run(calibrate_main, ["--target", TARGET, "--draft", DRAFT, "--fit-data", prompts,
                                      "--report-data", prompts, "--write-to", missing, "--out", tmp_path / "out"],
                     capsys)
    assert code == 2
    _one_line(err, "dspark calibrate", f"--write-to {str(missing)!r}: directory", "does not exist")
    assert not (tmp_path / "out").exists() and "[dspark]" not in err


# ------------------------------------------------------------------------------------------- subprocess
def test_real_process_non_utf8_argv_and_bad_seed(tiny_qwen3_dir):
    """The console entry point as a process: raw non-UTF-8 bytes in argv, and a seed above 2^63."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, "-m", "dspark_cli.main", "generate", "--target", str(tiny_qwen3_dir)]
    proc = subprocess.run(base + ["--prompt", b"caf\xe9"], capture_output=True, env=env, cwd=REPO, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("dspark generate: error: prompt 0: not valid UTF-8 text (byte 0xe9"), err
    proc = subprocess.run(base + ["--prompt", "hi", "--seed", "99999999999999999999"], capture_output=True,
                          env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and b"seed must be in [0, 2^63 - 1]" in proc.stderr and b"Traceback" not in proc.stderr
