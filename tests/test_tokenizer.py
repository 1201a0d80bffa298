"""`dspark_jax.tokenizer.Tokenizer`: loading, encode / decode, stop ids from the model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from tokenizers import processors

from dspark_jax.checkpoint.hf import load_target
from dspark_jax.tokenizer import Tokenizer, TokenizerError
from tests.helpers import EOS_ID, EOS_TOKEN, PAD_ID, TOKENIZER_VOCAB

TEXT = "hello world, the quick brown fox"


def _model_dir(tmp_path: Path, src: Path, **json_files: dict[str, Any] | None) -> Path:
    """A dir with `src`'s tokenizer.json plus the given JSON files (name without .json -> content)."""
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    for name, content in json_files.items():
        if content is not None:
            (d / f"{name}.json").write_text(json.dumps(content))
    return d


def test_load_encode_decode(tiny_qwen3_dir: Path) -> None:
    """Round trip of plain text; no special tokens are added by default; ids fit the model."""
    tok = Tokenizer.from_dir(tiny_qwen3_dir)
    assert tok.vocab_size == TOKENIZER_VOCAB
    assert tok.path == str(tiny_qwen3_dir / "tokenizer.json")
    ids = tok.encode(TEXT)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert 0 < len(ids) < len(TEXT)  # BPE merged something
    assert all(0 <= i < tok.vocab_size for i in ids) and EOS_ID not in ids
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, "fox"]) == [ids, tok.encode("fox")]
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID
    assert tok.stop_token_ids == (EOS_ID,) and tok.eos_token_id == EOS_ID
    config, _ = load_target(tiny_qwen3_dir)
    tok.check_compatible(config)  # 96 <= 128: fine


def test_special_tokens_only_when_asked(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """A post-processor (e.g. appending EOS) only runs with add_special_tokens=True; decode can skip specials."""
    raw = tokenizers.Tokenizer.from_file(str(tiny_qwen3_dir / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, EOS_ID)])
    tok = Tokenizer(raw, (EOS_ID,))
    plain, with_eos = tok.encode(TEXT), tok.encode(TEXT, add_special_tokens=True)
    assert with_eos == plain + [EOS_ID]
    assert tok.decode(with_eos) == TEXT
    assert tok.decode(with_eos, skip_special_tokens=False) == TEXT + EOS_TOKEN
    assert tok.decode(iter([i for i in plain])) == TEXT


@pytest.mark.parametrize("gen, cfg, expected", [
    ({"eos_token_id": 5}, {"eos_token_id": 7}, (5,)),  # generation_config wins, int
    ({"eos_token_id": [5, 6, 5]}, None, (5, 6)),  # list, de-duplicated
    ({"do_sample": False}, {"eos_token_id": [7, 8]}, (7, 8)),  # absent in generation_config -> config.json
    (None, {"eos_token_id": 9}, (9,)),  # no generation_config.json at all
    ({"eos_token_id": None}, {"eos_token_id": None}, (EOS_ID,)),  # both null -> tokenizer_config eos_token
])
def test_stop_ids(tiny_qwen3_dir: Path, tmp_path: Path, gen: Any, cfg: Any, expected: tuple[int, ...]) -> None:
    """eos_token_id as int / list / absent, with the documented fallback order."""
    d = _model_dir(tmp_path, tiny_qwen3_dir, generation_config=gen, config=cfg,
                   tokenizer_config={"eos_token": {"content": EOS_TOKEN, "special": True}})
    assert Tokenizer.from_dir(d).stop_token_ids == expected


def test_stop_ids_absent_everywhere(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """No eos anywhere (and no tokenizer_config) -> empty tuple, eos_token_id None."""
    d = _model_dir(tmp_path, tiny_qwen3_dir, generation_config={"do_sample": True}, config={"vocab_size": 128})
    tok = Tokenizer.from_dir(d)
    assert tok.stop_token_ids == () and tok.eos_token_id is None


def test_stop_ids_special_tokens_map_fallback(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """special_tokens_map.json names the eos token when nothing else does."""
    d = _model_dir(tmp_path, tiny_qwen3_dir, special_tokens_map={"eos_token": "<|pad|>"})
    assert Tokenizer.from_dir(d).stop_token_ids == (PAD_ID,)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    """A directory without tokenizer.json -> TokenizerError naming the path."""
    with pytest.raises(TokenizerError, match=r"tokenizer file not found: .*tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    """An unparsable tokenizer.json -> TokenizerError naming the file."""
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)


def test_bad_eos_value(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """A non-integer eos_token_id -> TokenizerError naming the file and the value."""
    d = _model_dir(tmp_path, tiny_qwen3_dir, generation_config={"eos_token_id": "</s>"})
    with pytest.raises(TokenizerError, match=r"generation_config\.json: eos_token_id .*'</s>'"):
        Tokenizer.from_dir(d)
