"""Tests of the byte-level BPE tokenizer trainer (dspark_jax.data.tokenizer_training + CLI)."""

from __future__ import annotations

import json
import os

import pytest
import tokenizers

from dspark_jax.data import (
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    CorpusConfig,
    TokenizerTrainingConfig,
    build_corpus,
    load_manifest,
    train_tokenizer,
)
from dspark_cli.corpus_cmd import train_tokenizer_main

FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer_meta.json",
)
SAMPLES = (
    "",
    "def f(x):\n    return x ** 2  # square\n",
    "  leading spaces, trailing spaces  \n\n\n\ttabs\tand\r\nCRLF\r\n",
    "Unicode: café naïve 世界 日本語 Ελληνικά русский 🎉🚀 \u200b zw, \U0001f9ea",
    "class Foo(Bar):\n\tdef __init__(self, *args, **kw) -> None: ...\n",
    "weird bytes-ish text: \x00\x01\x7f ÿ € ½",
)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _make_corpus(root: str) -> str:
    """A tiny corpus from fake sources: enough repeated text for a few hundred merges."""
    lib, docs = os.path.join(root, "lib"), os.path.join(root, "html")
    for i in range(12):
        body = "".join(
            f"def function_{i}_{j}(value, other=None):\n    \"\"\"Return value plus {j}.\"\"\"\n"
            f"    if other is None:\n        return value + {j}\n    return other\n\n"
            for j in range(20)
        )
        _write(os.path.join(lib, f"mod_{i}.py"), body)
    for i in range(8):
        paras = "".join(
            f"<p>The module number {i} provides functions for processing text; "
            f"paragraph {j} explains how the café serves 世界 users.</p>\n"
            for j in range(20)
        )
        _write(os.path.join(docs, f"page_{i}.html"), f"<html><body>{paras}</body></html>")
    out = os.path.join(root, "corpus")
    config = CorpusConfig(out_dir=out, stdlib_dir=lib, docs_dir=docs, fractions=(0.8, 0.1, 0.1))
    build_corpus(config)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tok"))
    corpus = _make_corpus(root)
    out = os.path.join(root, "tokenizer")
    meta = train_tokenizer(TokenizerTrainingConfig(corpus_dir=corpus, out_dir=out, vocab_size=600))
    return corpus, out, meta


def test_outputs_and_special_token_ids(trained):
    corpus, out, meta = trained
    for name in FILES:
        assert os.path.isfile(os.path.join(out, name)), name
    assert (meta["eos_id"], meta["mask_id"], meta["pad_id"]) == (0, 1, 2)
    names = (meta["eos_token"], meta["mask_token"], meta["pad_token"])
    assert names == (EOS_TOKEN, MASK_TOKEN, PAD_TOKEN)
    assert 259 < meta["vocab_size"] <= 600 and meta["requested_vocab_size"] == 600
    assert meta["corpus_content_hash"] == load_manifest(corpus)["content_hash"]
    with open(os.path.join(out, "tokenizer_meta.json"), encoding="utf-8") as fh:
        assert json.load(fh) == meta
    tok = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert [tok.token_to_id(t) for t in (EOS_TOKEN, MASK_TOKEN, PAD_TOKEN)] == [0, 1, 2]
    assert tok.get_vocab_size() == meta["vocab_size"]
    ids = tok.encode(f"a{MASK_TOKEN}b{EOS_TOKEN}").ids
    assert ids[1] == 1 and ids[-1] == 0 and len(ids) == 4  # special tokens are atomic
    # Merges were learned from the corpus: a frequent word is a single token.
    assert len(tok.encode("return").ids) == 1


def test_round_trip_exact(trained):
    _, out, _ = trained
    tok = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    for text in SAMPLES:
        enc = tok.encode(text)
        assert EOS_TOKEN not in enc.tokens and len(enc.ids) == len(enc.tokens)
        assert tok.decode(enc.ids, skip_special_tokens=False) == text, repr(text)


def test_transformers_loads_it(trained):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, out, _ = trained
    for hf in (
        AutoTokenizer.from_pretrained(out),
        PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json")),
    ):
        for text in SAMPLES[1:]:
            ids = hf(text)["input_ids"]  # add_special_tokens=True adds nothing (no BOS/EOS)
            assert 0 not in ids
            assert hf.decode(ids) == text, repr(text)
    hf = AutoTokenizer.from_pretrained(out)
    assert (hf.eos_token_id, hf.mask_token_id, hf.pad_token_id) == (0, 1, 2)
    assert (hf.eos_token, hf.mask_token, hf.pad_token) == (EOS_TOKEN, MASK_TOKEN, PAD_TOKEN)
    batch = hf(["def f", "x"], padding=True)["input_ids"]
    assert batch[1][-1] == 2  # right padding with <|pad|>


def test_training_is_deterministic(trained, tmp_path):
    corpus, out, _ = trained
    again = str(tmp_path / "again")
    train_tokenizer(TokenizerTrainingConfig(corpus_dir=corpus, out_dir=again, vocab_size=600))
    for name in FILES:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


def test_cli_and_errors(trained, tmp_path, capsys):
    corpus, out, _ = trained
    cli_out = str(tmp_path / "cli")
    assert train_tokenizer_main(["--corpus", corpus, "--out", cli_out, "--vocab-size", "600"]) == 0
    assert json.loads(capsys.readouterr().out)["mask_id"] == 1
    with open(os.path.join(out, "tokenizer.json"), "rb") as a:
        with open(os.path.join(cli_out, "tokenizer.json"), "rb") as b:
            assert a.read() == b.read()
    rc = train_tokenizer_main(["--corpus", str(tmp_path / "missing"), "--out", cli_out])
    err = capsys.readouterr().err
    assert rc == 2 and "manifest.json" in err and "Traceback" not in err and err.count("\n") == 1
    assert train_tokenizer_main(["--corpus", corpus, "--out", cli_out, "--vocab-size", "100"]) == 2
    assert train_tokenizer_main(["--corpus", corpus, "--out", cli_out, "--domains", "poetry"]) == 2
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerTrainingConfig(corpus_dir=corpus, out_dir=cli_out, vocab_size=258)
