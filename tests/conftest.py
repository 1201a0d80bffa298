"""Shared session-scoped fixtures: tiny random Qwen3 / Llama checkpoints saved by transformers.

Each directory holds `config.json`, `model.safetensors` (float32), `generation_config.json`
(`eos_token_id` = helpers.EOS_ID), and a tiny byte-level BPE `tokenizer.json` (96 tokens, model
vocab 128). The directories are shared by the whole session: treat them as read-only (copy with
`shutil.copytree` before modifying). Helpers to build more models live in `tests/helpers.py`.

Also: every JAX process of the session compiles with `tests.helpers.FAST_COMPILE_FLAGS` (set in
XLA_FLAGS here, before any JAX backend starts; subprocesses and notebook kernels inherit it), and
the longest files are collected first (`LONGEST_FIRST`) so that `-n 2 --dist loadfile` does not end
with one worker running a long file alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import FAST_COMPILE_FLAGS, make_hf_model

_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in _given] + [_given]).strip()

# By CPU seconds (measured one file at a time), longest first. Files not listed follow in
# the usual order.
LONGEST_FIRST = ("test_speculative.py", "test_multihost.py", "test_sharding.py", "test_train_target.py", "test_cli.py",
                 "test_notebooks.py", "test_draft_training.py", "test_kernels.py", "test_step.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Stable sort of the collected tests: files of LONGEST_FIRST first (each file's order kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
