"""`dspark regenerate` (spec §4.1 step 2): seeded prompt windows, the regenerated corpus (layout, counts,
prompt prefixes, byte-identical reruns, tokenizable), bad input, and `dspark train-draft` on the output.

Tiny shapes: random Qwen3 target (vocab 128) with the 64-token BPE of `build_tiny_corpus`; 8 prompts per
domain, 8 prompt + 8 new tokens, batch 4 (short batches are padded, so one compiled program).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from dspark_cli.main import main
from dspark_jax.data.corpus import DOMAINS, SPLITS, iter_documents, load_manifest
from dspark_jax.tokenizer import Tokenizer
from tests.helpers import tiny_corpus_and_target
from train.data import load_tokenizer, tokenize_split
from train.regenerate import RegenerateConfig, RegenerateError, sample_prompt_windows

KNOBS = dict(prompts_per_domain=8, prompt_tokens=8, new_tokens=8, batch_size=4, seed=3)
FLAGS = [x for k, v in KNOBS.items() for x in ("--" + k.replace("_", "-"), str(v))] + ["--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """{corpus, target, root}: the tiny two-domain corpus and a random tiny Qwen3 target + its tokenizer."""
    return tiny_corpus_and_target(tmp_path_factory.mktemp("regen_data"))


def _regen(env, out, *extra) -> int:
    return main(["regenerate", "--target", env["target"], "--corpus", env["corpus"], "--out", str(out)]
                + FLAGS + list(extra))


@pytest.fixture(scope="module")
def regen(env) -> tuple[Path, Path, dict]:
    """Two CLI runs with the same flags (different --out) and the first run's JSON summary."""
    root = Path(env["root"])
    outs = []
    for name in ("regen_a", "regen_b"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert _regen(env, root / name) == 0
        outs.append(json.loads(buf.getvalue().strip().splitlines()[-1]))
    return root / "regen_a", root / "regen_b", outs[0]


# ------------------------------------------------------------------------------------ prompt windows
def test_sample_prompt_windows():
    lengths = [3, 20, 5, 12, 0, 9]
    calls = []

    def ids(i):
        calls.append(i)
        return list(range(lengths[i]))

    w = sample_prompt_windows(len(lengths), ids, 10, 8, seed=7)
    assert w == sample_prompt_windows(len(lengths), ids, 10, 8, seed=7)  # seeded
    assert w != sample_prompt_windows(len(lengths), ids, 10, 8, seed=8)
    assert len(w) == 10 and {i for i, _ in w} <= {1, 3, 5}  # short documents skipped
    assert {i for i, _ in w} == {1, 3, 5}  # cycling covers every long document
    assert all(0 <= o <= lengths[i] - 8 for i, o in w)  # windows inside their document
    with pytest.raises(RegenerateError, match=r"no document has >= 21 tokens \(6 documents"):
        sample_prompt_windows(len(lengths), ids, 2, 21, seed=0)
    with pytest.raises(RegenerateError, match="no document"):
        sample_prompt_windows(0, ids, 1, 1, seed=0)


def test_config_validation():
    with pytest.raises(RegenerateError, match="prompt_tokens must be >= 1, got 0"):
        RegenerateConfig(corpus_dir="c", out_dir="o", prompt_tokens=0)
    with pytest.raises(RegenerateError, match="top_p must be in"):
        RegenerateConfig(corpus_dir="c", out_dir="o", top_p=1.5)
    assert RegenerateConfig(corpus_dir="c", out_dir="o", prompts_per_domain=8).split_counts() == {
        "train": 8, "validation": 1, "test": 1}


# ------------------------------------------------------------------------------------ end to end
def test_regenerated_corpus(env, regen):
    out, _, summary = regen
    assert summary["out"] == str(out) and summary["generated_tokens"] > 0 and summary["wall_s"] >= 0
    manifest = load_manifest(str(out))
    assert manifest["content_hash"].startswith("sha256:") and len(manifest["content_hash"]) == 7 + 64
    assert manifest["sources"]["regenerated_from"]["content_hash"] == load_manifest(env["corpus"])["content_hash"]
    tok = Tokenizer.from_dir(env["target"])
    counts = RegenerateConfig(corpus_dir="", out_dir="", **KNOBS).split_counts()
    longer = total = 0
    for domain in DOMAINS:
        for split in SPLITS:
            source = {d.path: d.text for d in iter_documents(env["corpus"], domain, split)}
            docs = list(iter_documents(str(out), domain, split))
            assert len(docs) == counts[split] == manifest["domains"][domain]["splits"][split]["files"]
            for d in docs:
                path, _, offset = d.path.rpartition("@")
                prompt = tok.decode(tok.encode(source[path])[int(offset):int(offset) + KNOBS["prompt_tokens"]])
                assert prompt and d.text.startswith(prompt), (d.path, prompt, d.text)
                longer += len(d.text) > len(prompt)
                total += 1
    assert longer >= total * 3 // 4  # the target wrote something (a sampled EOS may end a row at once)


def test_rerun_is_byte_identical(regen):
    a, b, _ = regen
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 1 + len(DOMAINS) * len(SPLITS)
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_output_is_tokenizable(env, regen):
    tok = load_tokenizer(env["target"])
    for domain in DOMAINS:
        stream = tokenize_split(str(regen[0]), domain, "train", tok)
        assert (stream == tok.eos_id).sum() >= KNOBS["prompts_per_domain"]  # one EOS per document (+ sampled)


def test_bad_input_exits_2(env, tmp_path, capsys):
    cases = [(["--corpus", str(tmp_path / "nope")], "--corpus directory not found"),
             (["--prompt-tokens", "0"], "prompt_tokens must be >= 1, got 0"),
             (["--out", env["corpus"]], "output directory must differ from the source corpus")]
    for extra, message in cases:
        argv = ["regenerate", "--target", env["target"], "--corpus", env["corpus"], "--out", str(tmp_path / "o")]
        assert main(argv + FLAGS + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dspark regenerate: error:") and message in err and "\n" not in err, err


def test_train_draft_on_regenerated_corpus(env, regen, tmp_path, capsys):
    cfg = dict(num_draft_layers=1, block_size=4, markov_rank=8, num_anchors=4, loss_chunk_anchors=4, seq_len=16,
               batch_size=2, steps=2, warmup_fraction=0.0, log_every=1, eval_every=2, eval_batches=1, ckpt_every=2)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["train-draft", "--target", env["target"], "--corpus", str(regen[0]), "--out", str(tmp_path / "run"),
                 "--config", str(tmp_path / "c.json"), "--no-progress", "--no-export"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
