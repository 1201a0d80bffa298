"""The default experience: the bundled model pair and a side-by-side speed report.

`bundled_paths()` locates the committed target + DSpark drafter under `models/`;
`side_by_side(...)` decodes the same prompts autoregressively and speculatively with the same
target parameters, each from an already compiled program (compile time excluded and reported
separately), checks that greedy outputs agree, and returns one report dict.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from dspark_jax.sampling import SamplingConfig
from infer.api import Target, generate

__all__ = ["MODELS_DIR", "BUNDLED_TARGET", "BUNDLED_DRAFT", "DEFAULT_PROMPT", "bundled_paths", "side_by_side"]

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
BUNDLED_TARGET = "pystd-qwen3-target"
BUNDLED_DRAFT = "pystd-dspark-k7"
DEFAULT_PROMPT = 'import os\nimport sys\n\n\ndef main(argv):\n    """Entry point."""\n'


def bundled_paths() -> tuple[str, str]:
    """(target_dir, draft_dir) of the bundled pair; a clear error if they are missing."""
    target, draft = os.path.join(MODELS_DIR, BUNDLED_TARGET), os.path.join(MODELS_DIR, BUNDLED_DRAFT)
    for path in (target, draft):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"bundled model not found at {path!r}; pass --target/--draft, or rebuild it with "
                                    f"scripts/build_bundled_models.sh")
    return target, draft


def side_by_side(target: Target, draft: Any, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                 max_new_tokens: int, sampling: SamplingConfig, seed: int = 0, repeats: int = 1,
                 stop_token_ids: Sequence[int] | None = None, **speculative_options) -> dict[str, Any]:
    """Autoregressive vs speculative on the same prompts; returns texts, both rates and the speed-up.

    Each mode is run once to compile, then `repeats` more times; the best run time of each is
    compared (the machine is shared and noisy; compile time is reported separately).
    """
    runs: dict[str, list] = {"autoregressive": [], "speculative": []}
    for _ in range(repeats + 1):
        common = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_token_ids=stop_token_ids)
        runs["autoregressive"].append(generate(target, prompts, **common))
        runs["speculative"].append(generate(target, prompts, draft=draft, **common, **speculative_options))
    ar = min(runs["autoregressive"][1:], key=lambda r: r.metrics["wall_s"])
    sp = min(runs["speculative"][1:], key=lambda r: r.metrics["wall_s"])
    m = sp.metrics
    # Cost of one round in autoregressive steps (loop iterations = the slowest row's rounds /
    # tokens): speculative decoding wins exactly when tau exceeds it.
    ar_step_s = ar.metrics["wall_s"] / max(len(t) for t in ar.token_ids)
    round_s = sp.metrics["wall_s"] / max(m["rounds_per_row"])
    return {
        "texts": sp.texts,
        "token_ids": sp.token_ids,
        "greedy_outputs_equal": (ar.token_ids == sp.token_ids) if sampling.mode.greedy else None,
        "autoregressive_tokens_per_s": ar.metrics["tokens_per_s"],
        "speculative_tokens_per_s": m["tokens_per_s"],
        "speedup": m["tokens_per_s"] / ar.metrics["tokens_per_s"],
        "acceptance_length": m["acceptance_length"],
        "verify_rate": m["verify_rate"],
        "accept_rate": m["accept_rate"],
        "conditional_accept_rate": m["conditional_accept_rate"],
        "tokens": m["tokens"],
        "block_size": m["block_size"],
        "round_over_ar_step": round_s / ar_step_s,
        "compile_s": {"autoregressive": runs["autoregressive"][0].metrics["compile_s"],
                      "speculative": runs["speculative"][0].metrics["compile_s"]},
    }
