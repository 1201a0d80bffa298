"""Host-side wrapper around the jitted speculative loop: loading drafts, the static loop, metrics.

    target = load_target_bundle("target_dir")
    draft = load_draft_bundle("draft_dir", target)
    result = generate(target, ["def fib(n):"], draft=draft, max_new_tokens=64)
    result.metrics["acceptance_length"]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import kernels
from dspark_jax.draft.config import DraftConfig
from dspark_jax.sampling import SamplingMode
from dspark_jax.sharding import current_mesh, place_rows, replicated_shardings, shard_params
from infer.batching import GenerationError, GenerationResult, cache_length, check_nonfinite
from infer.compiled import run_compiled
from infer.spec_metrics import summarize_stats
from infer.speculative import speculative_generate
from infer.state import RowParams, SpecLoop

__all__ = ["Draft", "load_draft_bundle", "lm_head_matches", "speculative_loop", "sts_temperatures",
           "run_speculative_batch", "CALIBRATION_FILE"]

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

    If `sts_temperatures.json` lies beside the checkpoint, its per-slot temperatures (validated:
    positive, one per slot) calibrate the confidences of the survival rule (`survival_threshold`);
    the reference `confidence_threshold` rule always uses the raw confidences.
    """
    from dspark_jax.calibration import load_temperatures
    from dspark_jax.checkpoint.deepspec import load_draft
    from infer.request_validation import check_load_request

    check_load_request(draft_dir, dtype=dtype, target=target, what="draft_dir")

    config, params = load_draft(draft_dir, dtype=dtype)
    # On the device once, here: host (numpy) parameters would be copied to the device by every jitted
    # call that takes them (the engine calls its round program every step: 12 MB per call for the
    # bundled drafter, ~1.5 ms a round on this CPU, a PCIe transfer on a GPU).
    params = jax.device_put(params)
    shares = False
    if target is not None:
        config.validate_against_target(target.config)
        shares = lm_head_matches(params, target)
    cal = os.path.join(os.fspath(draft_dir), CALIBRATION_FILE)
    temps = load_temperatures(cal, num_slots=config.block_size) if os.path.isfile(cal) else None
    return Draft(config=config, params=params, temperatures=temps, path=os.fspath(draft_dir),
                 shares_target_lm_head=shares)


def lm_head_matches(draft_params, target) -> bool:
    """Whether the draft's frozen LM head [d, V] equals the target's output layer exactly."""
    from dspark_jax.target.model import output_kernel

    mine = np.asarray(draft_params["lm_head"]["kernel"])
    theirs = np.asarray(output_kernel(target.config, target.params))
    return mine.shape == theirs.shape and mine.dtype == theirs.dtype and bool(np.array_equal(mine, theirs))


def sts_temperatures(draft: Draft):
    """The draft's STS temperatures as a float32 array [K_trained], or None."""
    return None if draft.temperatures is None else jnp.asarray(draft.temperatures, jnp.float32)


def speculative_loop(target, draft: Draft, *, longest: int, bucket: int, max_new_tokens: int, mode: SamplingMode,
                     block_size: int | None = None, record_rounds: bool = False,
                     thresholds_used: bool = False, backend: str = "xla") -> SpecLoop:
    """Validate the speculative options and build the static loop description."""
    dcfg = draft.config
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))):
        raise GenerationError(f"block_size must be an integer, got {type(block_size).__name__} {block_size!r}")
    k = dcfg.block_size if block_size is None else int(block_size)
    if not 1 <= k <= dcfg.block_size:
        raise GenerationError(f"block size {k} must be in [1, {dcfg.block_size}] (the checkpoint's block_size)")
    if thresholds_used and not dcfg.enable_confidence_head:
        raise GenerationError("confidence thresholds need a draft with a confidence head")
    dcfg.validate_against_target(target.config)
    if backend not in kernels.BACKENDS:
        raise GenerationError(f"backend must be one of {list(kernels.BACKENDS)}, got {backend!r}")
    # Verification writes up to K+1 positions past the last committed token (rolled back later).
    cache_len = cache_length(bucket, longest + max_new_tokens + k + 1)
    return SpecLoop(target=target.config, draft=dcfg, block_size=k, mode=mode, max_new_tokens=max_new_tokens,
                    cache_len=cache_len, share_lm_head=draft.shares_target_lm_head, record_rounds=bool(record_rounds),
                    backend=kernels.resolve_backend(backend))


def run_speculative_batch(target, draft: Draft, loop: SpecLoop, prompts: list[list[int]], tokens: np.ndarray,
                          lengths: np.ndarray, params: RowParams) -> GenerationResult:
    """Run `infer.speculative.speculative_generate` on padded prompts; returns a GenerationResult."""
    draft_params = draft.params
    if current_mesh() is not None:  # under a mesh (generate(..., mesh=...)): drafts run replicated
        draft_params = shard_params(draft_params, replicated_shardings(draft_params, jax.sharding.get_mesh()))
    args = (target.params, draft_params, sts_temperatures(draft),
            *place_rows((jnp.asarray(tokens), jnp.asarray(lengths), params)))
    (out, num, stats, records, nonfinite), compile_s, wall = run_compiled(speculative_generate, args, {"loop": loop})
    check_nonfinite(np.asarray(nonfinite))
    out, num = np.asarray(out), np.asarray(num)
    token_ids = [out[i, :num[i]].tolist() for i in range(len(prompts))]
    n_tokens = int(num.sum())
    metrics = {"mode": "speculative", "tokens": n_tokens, "wall_s": wall,
               "tokens_per_s": n_tokens / wall if wall > 0 else float("inf"), "compile_s": compile_s,
               "batch_size": len(prompts), "block_size": loop.block_size, **summarize_stats(stats)}
    if records is not None:
        metrics["round_records"] = jax.tree_util.tree_map(np.asarray, records)
    texts = [target.tokenizer.decode(t) for t in token_ids] if target.tokenizer is not None else None
    return GenerationResult(token_ids=token_ids, texts=texts, metrics=metrics)
