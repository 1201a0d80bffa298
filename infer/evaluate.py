"""Speculative-decoding evaluation: prompt sets, side-by-side speculative vs autoregressive runs.

    target = load_target_bundle("target_dir")
    drafts = {"dspark": load_draft_bundle("draft_dir", target)}
    sets = [load_dataset("eval_prompts/mbpp.jsonl", target, cfg), load_dataset("corpus:code", target, cfg)]
    result = evaluate(target, drafts, sets, EvalConfig(block_sizes=(3, 7), max_prompts=32))
    result.rows[0]["acceptance_length"], result.rounds[("mbpp", "dspark", 7)]

Protocol (DSpark spec §5.1, §5.6): prompt sets are JSONL reference files (``{"turns": [...]}``, first
turn only, used as raw text: this library has no chat template) or prefixes of a fixed token length of
the held-out documents of the offline corpus (``corpus:DOMAIN[:SPLIT]``). Prompts are shuffled with
``random.Random(980406)`` before truncation to ``max_prompts``. Batch i of ``batch_size`` prompts uses
seed ``seed + (index of its first prompt)`` — with batch size 1, prompt i uses ``seed + i`` as in the
reference. For every dataset x drafter x block size the speculative loop and plain autoregressive
decoding run on the same prompts with the same loaded target; compile time is excluded from tokens/s.
Metrics are round-weighted over all rounds of all prompts; per-position rates come from round records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dspark_jax.calibration import RoundData, position_metrics

__all__ = ["REFERENCE_SHUFFLE_SEED", "PromptFileError", "PromptSet", "EvalConfig", "EvalResult",
           "read_prompt_file", "corpus_prompts", "parse_dataset_spec", "load_dataset", "run_autoregressive",
           "run_speculative", "check_block_sizes", "evaluate"]

REFERENCE_SHUFFLE_SEED = 980406


class PromptFileError(ValueError):
    """A malformed prompt file or dataset spec (message names the file and line)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptSet:
    """A named prompt set as token ids; `source` says where it came from."""

    name: str
    prompts: tuple[tuple[int, ...], ...]
    source: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation settings.

    block_sizes: drafts per round to evaluate (None: each draft's checkpoint block size).
    temperature: sampling temperature of target and draft (0 = greedy, 1.0 = the paper's setting).
    max_prompts: truncate every prompt set (after shuffling) to this many prompts (None: all).
    corpus_dir / corpus_prompt_tokens: the offline corpus for ``corpus:`` datasets and the prompt length.
    shuffle_seed: shuffle prompts with ``random.Random(shuffle_seed)`` (None: keep file order).
    confidence_threshold: static truncation threshold (spec §3; 0 = fixed-length proposals).
    survival_threshold: cut where the cumulative product of STS-calibrated confidences (the draft's
      temperatures) falls below it (0 = off).
    autoregressive: also run plain decoding for the speed-up.
    """

    block_sizes: tuple[int, ...] | None = None
    temperature: float = 1.0
    max_new_tokens: int = 256
    max_prompts: int | None = None
    batch_size: int = 1
    seed: int = 0
    shuffle_seed: int | None = REFERENCE_SHUFFLE_SEED
    corpus_dir: str | None = None
    corpus_prompt_tokens: int = 64
    confidence_threshold: float = 0.0
    survival_threshold: float = 0.0
    autoregressive: bool = True

    def __post_init__(self):
        ints = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size, "seed": self.seed,
                "corpus_prompt_tokens": self.corpus_prompt_tokens, "max_prompts": self.max_prompts,
                "shuffle_seed": self.shuffle_seed, **{f"block_sizes[{i}]": k for i, k in enumerate(self.block_sizes or ())}}
        for name, value in ints.items():  # no float silently truncated into a size or seed
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.corpus_prompt_tokens < 1:
            raise ValueError("max_new_tokens, batch_size and corpus_prompt_tokens must be >= 1")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")
        if self.block_sizes is not None and (not self.block_sizes or min(self.block_sizes) < 1):
            raise ValueError(f"block sizes must be >= 1, got {self.block_sizes}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalResult:
    """One row (a JSON-ready dict) per dataset x drafter x block size, plus the recorded rounds."""

    rows: list[dict[str, Any]]
    rounds: dict[tuple[str, str, int], RoundData]
    autoregressive: dict[str, dict[str, Any]]


def read_prompt_file(path: str | os.PathLike) -> list[str | list[int]]:
    """Prompts of a JSONL file: ``{"turns": [str, ...]}`` (first turn) or ``{"token_ids": [int, ...]}``.

    Blank lines are skipped. Raises PromptFileError naming the file and 1-based line number of the
    first malformed line (bad UTF-8, bad JSON, wrong fields, a lone surrogate); FileNotFoundError for a
    missing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path!r}")
    prompts: list[str | list[int]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{path}, line {lineno}: not valid UTF-8 text ({e.reason} at byte "
                                      f"{e.start} of the line)") from None
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
            if isinstance(rec, dict) and "turns" in rec:
                turns = rec["turns"]
                if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                    raise PromptFileError(f"{path}, line {lineno}: 'turns' must be a non-empty list of strings")
                if not turns[0].strip():
                    raise PromptFileError(f"{path}, line {lineno}: the first turn is empty")
                try:
                    turns[0].encode("utf-8")
                except UnicodeEncodeError as e:
                    raise PromptFileError(f"{path}, line {lineno}: the first turn holds a lone surrogate "
                                          f"({turns[0][e.start]!r} at character {e.start}); not valid text") from None
                prompts.append(turns[0])
            elif isinstance(rec, dict) and "token_ids" in rec:
                ids = rec["token_ids"]
                if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                    raise PromptFileError(f"{path}, line {lineno}: 'token_ids' must be a non-empty list of ids >= 0")
                prompts.append(ids)
            else:
                raise PromptFileError(f"{path}, line {lineno}: expected an object with 'turns' (list of strings) "
                                      "or 'token_ids' (list of ints)")
    if not prompts:
        raise PromptFileError(f"{path}: contains no prompts")
    return prompts


def corpus_prompts(corpus_dir: str, domain: str, split: str, tokenizer: Any, prompt_tokens: int, *,
                   max_prompts: int | None = None,
                   shuffle_seed: int | None = REFERENCE_SHUFFLE_SEED) -> list[list[int]]:
    """The first `prompt_tokens` ids of documents of a corpus split (documents at least one token longer).

    Documents are shuffled with `shuffle_seed` (None: path order) and taken until `max_prompts`.
    """
    from dspark_jax.data.corpus import iter_documents

    docs = list(iter_documents(corpus_dir, domain, split))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(docs)
    out: list[list[int]] = []
    for doc in docs:
        ids = tokenizer.encode(doc.text[: 64 * (prompt_tokens + 1)])
        if len(ids) > prompt_tokens:
            out.append(ids[:prompt_tokens])
            if max_prompts is not None and len(out) >= max_prompts:
                break
    if not out:
        raise PromptFileError(f"corpus {corpus_dir!r} {domain}/{split}: no document has more than "
                              f"{prompt_tokens} tokens")
    return out


def parse_dataset_spec(spec: str, default_split: str = "test") -> dict[str, str]:
    """``FILE.jsonl`` -> {kind: file, path, name}; ``corpus:DOMAIN[:SPLIT]`` -> {kind: corpus, domain, split, name}."""
    if spec.startswith("corpus:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise PromptFileError(f"bad dataset {spec!r}: expected corpus:DOMAIN or corpus:DOMAIN:SPLIT")
        split = parts[2] if len(parts) == 3 else default_split
        return {"kind": "corpus", "domain": parts[1], "split": split, "name": f"corpus-{parts[1]}-{split}"}
    name = os.path.splitext(os.path.basename(spec.rstrip("/\\")))[0] or spec
    return {"kind": "file", "path": spec, "name": name}


def load_dataset(spec: str, target: Any, config: EvalConfig, *, default_split: str = "test",
                 name: str | None = None) -> PromptSet:
    """Load, shuffle, truncate and tokenize the prompt set named by `spec` (see `parse_dataset_spec`)."""
    from infer.api import prepare_prompts

    info = parse_dataset_spec(spec, default_split)
    if info["kind"] == "corpus":
        if config.corpus_dir is None:
            raise PromptFileError(f"dataset {spec!r} needs a corpus directory (--corpus DIR)")
        if target.tokenizer is None:
            raise PromptFileError(f"dataset {spec!r} needs a tokenizer.json in the target directory")
        prompts: list = corpus_prompts(config.corpus_dir, info["domain"], info["split"], target.tokenizer,
                                       config.corpus_prompt_tokens, max_prompts=config.max_prompts,
                                       shuffle_seed=config.shuffle_seed)
        source = f"{config.corpus_dir}:{info['domain']}/{info['split']}"
    else:
        prompts = read_prompt_file(info["path"])
        if config.shuffle_seed is not None:
            random.Random(config.shuffle_seed).shuffle(prompts)
        prompts = prompts[: config.max_prompts]
        source = info["path"]  # as given: records carry no machine-specific prefix
    if any(isinstance(p, str) for p in prompts) and target.tokenizer is None:
        raise PromptFileError(f"{spec}: text prompts need a tokenizer.json in the target directory "
                              "(or use 'token_ids' records)")
    ids = prepare_prompts(target, prompts)
    return PromptSet(name=name or info["name"], prompts=tuple(tuple(p) for p in ids), source=source)


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _sampling(config: EvalConfig):
    from dspark_jax.sampling import SamplingConfig

    return SamplingConfig(temperature=config.temperature)


def run_autoregressive(target: Any, prompts: PromptSet, config: EvalConfig) -> dict[str, Any]:
    """Plain decoding of `prompts` in batches; tokens, wall time (compile excluded), tokens/s."""
    from infer.api import generate

    tokens, wall, compile_s = 0, 0.0, 0.0
    for idx in _batches(len(prompts.prompts), config.batch_size):
        res = generate(target, [list(prompts.prompts[i]) for i in idx], max_new_tokens=config.max_new_tokens,
                       sampling=_sampling(config), seed=config.seed + idx.start)
        tokens += res.metrics["tokens"]
        wall += res.metrics["wall_s"]
        compile_s += res.metrics["compile_s"]
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else math.inf,
            "compile_s": compile_s}


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [float(a / b) if b > 0 else None for a, b in zip(num, den)]


def run_speculative(target: Any, draft: Any, prompts: PromptSet, config: EvalConfig, block_size: int,
                    ) -> tuple[dict[str, Any], RoundData]:
    """Speculative decoding of `prompts` with round records; (round-weighted metrics, recorded rounds)."""
    from infer.api import generate

    tokens, wall, compile_s, rounds, tau_sum, proposed_sum = 0, 0.0, 0.0, 0, 0, 0
    parts = []
    for idx in _batches(len(prompts.prompts), config.batch_size):
        res = generate(target, [list(prompts.prompts[i]) for i in idx], draft=draft,
                       max_new_tokens=config.max_new_tokens, sampling=_sampling(config), seed=config.seed + idx.start,
                       block_size=block_size, confidence_threshold=config.confidence_threshold,
                       survival_threshold=config.survival_threshold, record_rounds=True)
        m = res.metrics
        tokens, wall, compile_s = tokens + m["tokens"], wall + m["wall_s"], compile_s + m["compile_s"]
        if m["rounds"]:
            rounds += m["rounds"]
            tau_sum += int(round(m["acceptance_length"] * m["rounds"]))
            proposed_sum += int(round(m["draft_tokens_per_proposal"] * m["rounds"]))
        parts.append(RoundData.from_records(m["round_records"]))
    data = RoundData.concat(parts)
    slots = np.arange(block_size)[None, :]
    prop_ge = (data.proposed[:, None] >= slots + 1).sum(0)
    acc_ge = (data.accepted[:, None] >= slots + 1).sum(0)
    cond_den = ((data.proposed[:, None] >= slots + 1) & (data.accepted[:, None] >= slots)).sum(0)
    metrics = {
        "rounds": rounds,
        "acceptance_length": tau_sum / rounds if rounds else None,
        "verify_rate": tau_sum / (proposed_sum + rounds) if rounds else None,
        "draft_tokens_per_proposal": proposed_sum / rounds if rounds else None,
        "accept_rate": _ratio(acc_ge, prop_ge),
        "conditional_accept_rate": _ratio(acc_ge, cond_den),
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else math.inf,
        "compile_s": compile_s,
    }
    return metrics, data


def _calibration_summary(data: RoundData, temperatures: Sequence[float] | None) -> dict[str, Any]:
    m = position_metrics(data, temperatures)
    keep = ("position", "count", "ece", "auc", "brier", "pred_mean", "target_mean")
    m["positions"] = [{k: p[k] for k in keep} for p in m["positions"]]
    return m


def _on_device(draft: Any) -> Any:
    """The draft with its params on the default device (so timed runs do not include host transfers)."""
    import jax

    return dataclasses.replace(draft, params=jax.device_put(draft.params))


def check_block_sizes(block_sizes: Sequence[int] | None, drafts: Mapping[str, Any]) -> None:
    """ValueError naming the drafter unless every block size fits every drafter's trained block size
    (checked before any work)."""
    for dname, draft in drafts.items():
        for k in block_sizes or ():
            if k > draft.config.block_size:
                raise ValueError(f"block size {k} exceeds draft {dname!r}'s checkpoint block size "
                                 f"{draft.config.block_size}")


def evaluate(target: Any, drafts: Mapping[str, Any], datasets: Sequence[PromptSet], config: EvalConfig, *,
             log: Callable[[str], None] | None = None) -> EvalResult:
    """Run every dataset x drafter x block size speculatively (and each dataset autoregressively).

    Rows carry tau (``acceptance_length``), ``verify_rate``, ``draft_tokens_per_proposal``, unconditional
    ``accept_rate`` and ``conditional_accept_rate`` per position, speculative / autoregressive tokens/s,
    ``speedup`` and, for drafts with a confidence head and fixed-length proposals, confidence
    calibration metrics (raw and with the draft's STS temperatures when it has them).
    """
    log = log or (lambda msg: None)
    check_block_sizes(config.block_sizes, drafts)
    drafts = {name: _on_device(d) for name, d in drafts.items()}
    rows: list[dict[str, Any]] = []
    rounds: dict[tuple[str, str, int], RoundData] = {}
    ar: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        if config.autoregressive:
            log(f"{ds.name}: autoregressive, {len(ds.prompts)} prompts")
            ar[ds.name] = run_autoregressive(target, ds, config)
        for dname, draft in drafts.items():
            sizes = config.block_sizes or (draft.config.block_size,)
            for k in sizes:
                log(f"{ds.name}: {dname} K={k}")
                spec, data = run_speculative(target, draft, ds, config, k)
                rounds[(ds.name, dname, k)] = data
                row: dict[str, Any] = {"dataset": ds.name, "drafter": dname, "draft_path": draft.path,
                                       "block_size": k, "num_prompts": len(ds.prompts),
                                       "temperature": config.temperature}
                row.update({key: spec.pop(key) for key in ("acceptance_length", "verify_rate",
                                                           "draft_tokens_per_proposal", "accept_rate",
                                                           "conditional_accept_rate", "rounds")})
                row["speculative"] = spec
                row["autoregressive"] = ar.get(ds.name)
                base = ar.get(ds.name, {}).get("tokens_per_s")
                row["speedup"] = spec["tokens_per_s"] / base if base and math.isfinite(base) else None
                if draft.config.enable_confidence_head and config.confidence_threshold == 0 and data.num_rounds:
                    temps = draft.temperatures[:k] if draft.temperatures and len(draft.temperatures) >= k else None
                    row["calibration"] = {"raw": _calibration_summary(data, None),
                                          "calibrated": _calibration_summary(data, temps) if temps else None}
                rows.append(row)
    return EvalResult(rows=rows, rounds=rounds, autoregressive=ar)
