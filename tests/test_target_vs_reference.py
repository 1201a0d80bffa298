"""Parity of `TargetModel` with transformers (PyTorch CPU, float32) on tiny random models.

Configs cover Qwen3 tied / untied, GQA ratios 1 / 2 / 4, head_dim != hidden / heads, RoPE
scaling (llama3, linear) and Llama with attention + MLP biases. For each config we compare
logits, tapped hidden states (layer ids -1, 0, mid vs HF `hidden_states[l + 1]`) and the final
normed hidden state (vs HF `hidden_states[-1]`) for:
  (a) a full no-cache forward,
  (b) prefill into a cache, then two cached one-token decode steps,
  (c) right-padded prefill of rows with different prompt lengths, then a 3-token append per
      row starting at that row's own length, vs HF on the unpadded sequences.
Tolerance: max |ours - ref| <= 1e-4 * max(1, max |ref|). Errors are printed (run with -s).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.checkpoint.hf_layout import hf_to_params
from dspark_jax.config import TargetConfig
from dspark_jax.target.kv_cache import KVCache
from dspark_jax.target.model import TargetModel
from tests.helpers import hf_forward, load_hf_model, make_hf_model

B, T_FULL, T_PREFILL, MAX_LEN, N_APPEND = 3, 11, 8, 16, 3
ROW_LENGTHS = np.array([8, 5, 3], np.int32)  # (c): per-row prompt lengths (<= T_PREFILL)

# name -> fixture dir name, or make_hf_model kwargs for an in-memory model.
CASES: dict[str, str | dict[str, Any]] = {
    "qwen3_untied_gqa2_hd12": "tiny_qwen3_dir",
    "qwen3_tied_mha_hd16_linear": dict(family="qwen3", seed=2, tie_word_embeddings=True, num_key_value_heads=4,
                                       head_dim=16, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama_bias_gqa4_llama3": "tiny_llama_dir",
    "llama_tied_gqa2_hd12_linear": dict(family="llama", seed=3, tie_word_embeddings=True, num_key_value_heads=2,
                                        head_dim=12, attention_bias=False, mlp_bias=False,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0}),
}
MAX_ERRORS: dict[str, dict[str, float]] = {}  # case -> {mode/quantity: max abs error}


@dataclasses.dataclass
class Case:
    """One config: the HF reference, our params and the jitted forwards shared by all tests."""

    name: str
    hf: Any  # transformers model
    config: TargetConfig
    params: dict
    taps: tuple[int, ...]
    full: Callable  # (params, tokens [B,T], positions [B,T]) -> TargetOutput
    cached: Callable  # (params, tokens [B,T], positions [B,T], cache) -> TargetOutput


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    """Build (or load) the reference model, convert its weights, and jit our forwards once."""
    spec = CASES[request.param]
    if isinstance(spec, str):
        hf = load_hf_model(request.getfixturevalue(spec))
    else:
        spec = dict(spec)
        hf, _ = make_hf_model(spec.pop("family"), **spec)
    config = TargetConfig.from_hf_config(hf.config.to_dict())
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = jax.tree.map(jnp.asarray, hf_to_params(state, config))
    taps = (-1, 0, config.num_hidden_layers // 2)
    model = TargetModel(config)

    def full(p, tokens, positions):
        return model.apply({"params": p}, tokens, positions, tap_layers=taps, return_final_hidden=True)

    def cached(p, tokens, positions, cache):
        return model.apply({"params": p}, tokens, positions, cache, tap_layers=taps, return_final_hidden=True)

    return Case(request.param, hf, config, params, taps, jax.jit(full), jax.jit(cached))


def _check(case: Case, mode: str, what: str, got: Any, ref: np.ndarray) -> None:
    """Assert the parity tolerance; record the max abs error under (case, mode, logits|hidden)."""
    got = np.asarray(got, np.float32)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = float(np.max(np.abs(got - ref)))
    scale = max(1.0, float(np.max(np.abs(ref))))
    table = MAX_ERRORS.setdefault(case.name, {})
    key = f"{mode}/{'logits' if what == 'logits' else 'hidden'}"
    table[key] = max(table.get(key, 0.0), err)
    assert err <= 1e-4 * scale, f"{case.name} {mode}/{what}: max abs error {err:.3e} > {1e-4 * scale:.3e}"


def _check_all(case: Case, mode: str, out: Any, ref_logits: np.ndarray, ref_hidden: tuple[np.ndarray, ...],
               rows: Any = slice(None), cols: Any = slice(None)) -> None:
    """Compare logits, taps and final hidden of `out` (selected [rows, cols]) with the HF outputs."""
    _check(case, mode, "logits", np.asarray(out.logits)[rows, cols], ref_logits)
    for lid, tap in zip(case.taps, out.taps):
        _check(case, mode, f"tap[{lid}]", np.asarray(tap)[rows, cols], ref_hidden[lid + 1])
    _check(case, mode, "final_hidden", np.asarray(out.final_hidden)[rows, cols], ref_hidden[-1])


@pytest.fixture(scope="module", autouse=True)
def _print_error_table():
    """After the module: print the max abs errors per config and mode (visible with -s)."""
    yield
    for name, table in MAX_ERRORS.items():
        print(f"\n[parity] {name}: " + ", ".join(f"{k}={v:.1e}" for k, v in table.items()), end="")
    print()


def _tokens(case: Case, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, case.config.vocab_size, shape).astype(np.int32)


def _positions(starts: np.ndarray, t: int) -> jax.Array:
    return jnp.asarray(starts[:, None] + np.arange(t, dtype=np.int32)[None, :], jnp.int32)  # [B, t]


def test_full_forward(case: Case) -> None:
    """(a) No-cache forward of B full rows."""
    toks = _tokens(case, (B, T_FULL), seed=10)
    ref_logits, ref_hidden = hf_forward(case.hf, toks)
    out = case.full(case.params, jnp.asarray(toks), _positions(np.zeros(B, np.int32), T_FULL))
    _check_all(case, "full", out, ref_logits, ref_hidden)
    assert len(set(np.argmax(ref_logits, -1).ravel().tolist())) > 3, "reference greedy decoding is degenerate"


def test_prefill_then_decode(case: Case) -> None:
    """(b) Prefill T_PREFILL tokens into the cache, then decode two tokens one at a time."""
    toks = _tokens(case, (B, T_PREFILL + 2), seed=11)
    ref_logits, ref_hidden = hf_forward(case.hf, toks)
    cache = KVCache.create(case.config, B, MAX_LEN)
    out = case.cached(case.params, jnp.asarray(toks[:, :T_PREFILL]), _positions(np.zeros(B, np.int32), T_PREFILL), cache)
    sl = slice(0, T_PREFILL)
    _check_all(case, "prefill", out, ref_logits[:, sl], tuple(h[:, sl] for h in ref_hidden))
    cache = out.cache
    for step in range(2):
        pos = T_PREFILL + step
        cache = cache.with_lengths(jnp.full((B,), pos, jnp.int32))
        out = case.cached(case.params, jnp.asarray(toks[:, pos:pos + 1]), _positions(np.full(B, pos, np.int32), 1), cache)
        sl = slice(pos, pos + 1)
        _check_all(case, "decode", out, ref_logits[:, sl], tuple(h[:, sl] for h in ref_hidden))
        cache = out.cache


def test_per_row_append(case: Case) -> None:
    """(c) Right-padded prefill of rows with different lengths, then N_APPEND tokens per row at its own length."""
    seqs = [_tokens(case, (int(n) + N_APPEND,), seed=20 + r) for r, n in enumerate(ROW_LENGTHS)]
    refs = [hf_forward(case.hf, s[None]) for s in seqs]
    garbage = _tokens(case, (B, T_PREFILL), seed=30)  # padding content must not matter
    prefill = garbage.copy()
    for r, n in enumerate(ROW_LENGTHS):
        prefill[r, :n] = seqs[r][:n]
    cache = KVCache.create(case.config, B, MAX_LEN)
    out = case.cached(case.params, jnp.asarray(prefill), _positions(np.zeros(B, np.int32), T_PREFILL), cache)
    for r, n in enumerate(ROW_LENGTHS):
        ref_logits, ref_hidden = refs[r]
        sl = slice(0, n)
        _check_all(case, "padded_prefill", out, ref_logits[0, sl], tuple(h[0, sl] for h in ref_hidden), r, sl)

    cache = out.cache.with_lengths(jnp.asarray(ROW_LENGTHS))
    append = np.stack([s[n:n + N_APPEND] for s, n in zip(seqs, ROW_LENGTHS)])  # [B, N_APPEND]
    out = case.cached(case.params, jnp.asarray(append), _positions(ROW_LENGTHS, N_APPEND), cache)
    for r, n in enumerate(ROW_LENGTHS):
        ref_logits, ref_hidden = refs[r]
        sl = slice(n, n + N_APPEND)
        _check_all(case, "append", out, ref_logits[0, sl], tuple(h[0, sl] for h in ref_hidden), r)
