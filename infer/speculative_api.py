"""Host-side wrapper around the jitted speculative loop: loading drafts, bucketing, metrics.

    target = load_target_bundle("target_dir")
    draft = load_draft_bundle("draft_dir", target)
    result = generate(target, ["def fib(n):"], draft=draft, max_new_tokens=64)
    result.metrics["acceptance_length"]
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.draft.config import DraftConfig
from dspark_jax.draft.eagle3 import Eagle3Config
from dspark_jax.sampling import SamplingConfig
from infer.compiled import run_compiled
from infer.spec_metrics import summarize_stats

__all__ = ["Draft", "load_draft_bundle", "lm_head_matches", "speculative_generate_batch", "CALIBRATION_FILE"]

CALIBRATION_FILE = "sts_temperatures.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Draft:
    """A loaded drafter: config, params, optional per-slot STS temperatures [K] for its confidences."""

    config: DraftConfig
    params: Any
    temperatures: tuple[float, ...] | None = None
    path: str | None = None
    shares_target_lm_head: bool = False  # its frozen LM head equals the target's output layer (checked at load)


def load_draft_bundle(draft_dir: str | os.PathLike, target=None, *, dtype: str | None = None) -> Draft:
    """Load a DeepSpec-layout draft; validate it against `target` (an `infer.api.Target`) if given.

    If `sts_temperatures.json` lies beside the checkpoint, its per-slot temperatures are applied to
    confidence logits wherever survival probabilities are used.
    """
    from dspark_jax.checkpoint.deepspec import load_draft
    from dspark_jax.checkpoint.eagle3 import is_eagle3_dir, load_eagle3

    config, params = (load_eagle3 if is_eagle3_dir(draft_dir) else load_draft)(draft_dir, dtype=dtype)
    shares = False
    if target is not None:
        config.validate_against_target(target.config)
        shares = lm_head_matches(params, target)
    temps = None
    cal = os.path.join(os.fspath(draft_dir), CALIBRATION_FILE)
    if os.path.isfile(cal):
        with open(cal) as f:
            temps = tuple(float(t) for t in json.load(f)["temperatures"])
    return Draft(config=config, params=params, temperatures=temps, path=os.fspath(draft_dir),
                 shares_target_lm_head=shares)


def lm_head_matches(draft_params, target) -> bool:
    """Whether the draft's frozen LM head [d, V] equals the target's output layer exactly."""
    from dspark_jax.target.model import output_kernel

    mine = np.asarray(draft_params["lm_head"]["kernel"])
    theirs = np.asarray(output_kernel(target.config, target.params))
    return mine.shape == theirs.shape and mine.dtype == theirs.dtype and bool(np.array_equal(mine, theirs))


def speculative_generate_batch(target, draft: Draft, prompts: list[list[int]], *, max_new_tokens: int,
                               sampling: SamplingConfig, seed: int, stop_ids: np.ndarray,
                               block_size: int | None = None, confidence_threshold: float = 0.0,
                               survival_threshold: float = 0.0, record_rounds: bool = False):
    """Run `infer.speculative.speculative_generate` on token-id prompts; returns a GenerationResult."""
    from infer.api import GenerationError, GenerationResult, _pad_batch, bucket_length
    from infer.eagle3 import eagle3_generate
    from infer.speculative import SpecOptions, speculative_generate

    dcfg = draft.config
    k = dcfg.block_size if block_size is None else int(block_size)
    if not 1 <= k <= dcfg.block_size:
        raise GenerationError(f"block size {k} must be in [1, {dcfg.block_size}] (the checkpoint's block_size)")
    if not 0.0 <= confidence_threshold < 1.0 or not 0.0 <= survival_threshold < 1.0:
        raise GenerationError("confidence/survival thresholds must be in [0, 1)")
    if (confidence_threshold or survival_threshold) and not dcfg.enable_confidence_head:
        raise GenerationError("confidence thresholds need a draft with a confidence head")
    dcfg.validate_against_target(target.config)
    longest = max(len(p) for p in prompts)
    bucket = bucket_length(longest)
    # Verification writes up to K+1 positions past the last committed token (rolled back later).
    need = longest + max_new_tokens + k + 1
    cache_len = -(-max(bucket, need) // 64) * 64
    tokens, lengths = _pad_batch(prompts, bucket)
    options = SpecOptions(block_size=k, confidence_threshold=float(confidence_threshold),
                          survival_threshold=float(survival_threshold), record_rounds=record_rounds,
                          share_lm_head=draft.shares_target_lm_head)
    temps = None if draft.temperatures is None else jnp.asarray(draft.temperatures[:k], jnp.float32)
    static = dict(config=target.config, dcfg=dcfg, max_new_tokens=max_new_tokens, cache_len=cache_len,
                  mode=sampling.mode, options=options)
    args = (target.params, draft.params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(seed),
            sampling.values(), jnp.asarray(stop_ids), temps)
    loop = eagle3_generate if isinstance(dcfg, Eagle3Config) else speculative_generate  # chain vs block drafter
    (out, num, stats, records), compile_s, wall = run_compiled(loop, args, static)
    out, num = np.asarray(out), np.asarray(num)
    token_ids = [out[i, :num[i]].tolist() for i in range(len(prompts))]
    n_tokens = int(num.sum())
    metrics = {"mode": "speculative", "tokens": n_tokens, "wall_s": wall,
               "tokens_per_s": n_tokens / wall if wall > 0 else float("inf"), "compile_s": compile_s,
               "batch_size": len(prompts), "block_size": k, **summarize_stats(stats)}
    if records is not None:
        metrics["round_records"] = jax.tree_util.tree_map(np.asarray, records)
    texts = [target.tokenizer.decode(t) for t in token_ids] if target.tokenizer is not None else None
    return GenerationResult(token_ids=token_ids, texts=texts, metrics=metrics)
