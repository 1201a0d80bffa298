"""Shared session-scoped fixtures: tiny random Qwen3 / Llama checkpoints saved by transformers.

Each directory holds `config.json`, `model.safetensors` (float32), `generation_config.json`
(`eos_token_id` = helpers.EOS_ID), and a tiny byte-level BPE `tokenizer.json` (96 tokens, model
vocab 128). The directories are shared by the whole session: treat them as read-only (copy with
`shutil.copytree` before modifying). Helpers to build more models live in `tests/helpers.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_hf_model


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied Qwen3: 3 layers, hidden 32, 4 query heads : 2 KV heads, head_dim 12 (!= 32 / 4), vocab 128."""
    _, out = make_hf_model("qwen3", tmp_path_factory.mktemp("tiny_qwen3"), seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied Llama: 3 layers, hidden 32, 4 : 1 GQA, llama3 rope scaling, attention_bias + mlp_bias."""
    _, out = make_hf_model("llama", tmp_path_factory.mktemp("tiny_llama"), seed=1)
    return out
