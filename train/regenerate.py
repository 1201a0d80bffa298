"""Regenerate a corpus with the target (spec §4.1 step 2): the drafter learns the target's own text.

DeepSpec keeps only the prompts of its chat data and lets the target write every response
(temperature 0.7, top-p 0.8, top-k 20 for Qwen3). Our corpus has no chat turns, so a "prompt" is
a window of `prompt_tokens` tokens cut from a corpus document at a seeded offset, and the
"response" is the target's continuation of `new_tokens` tokens. Each output document is the
prompt text followed by the continuation, written in the corpus layout
(`<out>/<domain>/<split>.jsonl` + `manifest.json`, written last), so `dspark train-draft
--corpus <out>` trains on it unchanged.

    dspark regenerate --target models/pystd-qwen3-target --corpus runs/bundle/corpus \
        --out runs/bundle/regen --prompts-per-domain 4096

With several JAX processes (`train.distributed`), each one decodes a contiguous share of every
split's batches on its own devices; the lines are gathered in batch order and process 0 writes
the files, so the output is byte-identical to a single-process run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from typing import Callable

import numpy as np

from dspark_jax.data.corpus import DOMAINS, FORMAT, MANIFEST_NAME, atomic_write_bytes, iter_documents, load_manifest
from dspark_jax.sampling import SamplingConfig, SamplingError

__all__ = ["RegenerateConfig", "RegenerateError", "sample_prompt_windows", "regenerate_corpus"]

class RegenerateError(ValueError):
    """Bad regeneration input (the message names the corpus, domain or setting)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegenerateConfig:
    """What to regenerate and how (DeepSpec's Qwen3 sampling defaults).

    prompts_per_domain: training prompts per domain; validation and test get
    max(1, prompts_per_domain // 32) each (drawn from those splits of the source corpus).
    """

    corpus_dir: str
    out_dir: str
    prompts_per_domain: int = 4096
    prompt_tokens: int = 64
    new_tokens: int = 192
    batch_size: int = 32
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    seed: int = 0

    def __post_init__(self):
        for name in ("prompts_per_domain", "prompt_tokens", "new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise RegenerateError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)  # validates
        except SamplingError as e:
            raise RegenerateError(str(e)) from None

    @property
    def sampling(self) -> SamplingConfig:
        """The sampling configuration of the target's continuations."""
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def split_counts(self) -> dict[str, int]:
        """Prompts per split of each domain."""
        held_out = max(1, self.prompts_per_domain // 32)
        return {"train": self.prompts_per_domain, "validation": held_out, "test": held_out}


def sample_prompt_windows(num_docs: int, token_ids: Callable[[int], list[int]], count: int, length: int,
                          seed: int) -> list[tuple[int, int]]:
    """`count` (document index, offset) pairs of `length`-token windows, seeded, spread over documents.

    Documents are visited in a seeded order (cycling when count exceeds their number; only the
    visited ones are tokenized, via `token_ids(i)`), each visit picks a uniform offset, so long
    files do not dominate. Documents shorter than `length` are skipped; a RegenerateError if
    none is long enough (or there is none).
    """
    rng = np.random.default_rng(seed)
    windows: list[tuple[int, int]] = []
    eligible = list(range(num_docs))
    while len(windows) < count:
        kept = []
        for i in rng.permutation(eligible):
            if len(windows) == count:
                break
            n = len(token_ids(int(i)))
            if n >= length:
                kept.append(int(i))
                windows.append((int(i), int(rng.integers(0, n - length + 1))))
        if not kept and len(windows) < count:
            raise RegenerateError(f"no document has >= {length} tokens ({num_docs} documents; "
                                  f"prompt_tokens too large for this split)")
        eligible = kept if len(windows) < count else eligible
    return windows


def regenerate_corpus(config: RegenerateConfig, target, *, progress: Callable[[str], None] | None = None) -> dict:
    """Write the regenerated corpus for `target` (an `infer.api.Target` with a tokenizer); returns its manifest.

    Deterministic: the same config and target give byte-identical files (the manifest holds no
    timings or output path). Every `generate` call has `batch_size` rows (a short last batch is
    padded with copies of its last prompt, whose outputs are dropped), so one program is compiled.
    """
    from infer.api import generate  # late import: JAX only when regenerating
    import jax

    from train.distributed import allgather_concat, barrier, is_primary

    if target.tokenizer is None:
        raise RegenerateError("the target has no tokenizer (tokenizer.json next to its config.json)")
    try:
        source = load_manifest(config.corpus_dir)
    except (FileNotFoundError, ValueError) as e:
        raise RegenerateError(str(e)) from e
    if os.path.realpath(config.out_dir) == os.path.realpath(config.corpus_dir):
        raise RegenerateError(f"the output directory must differ from the source corpus: {config.out_dir}")
    if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
        raise RegenerateError(f"output path exists and is not a directory: {config.out_dir}")
    limit = target.config.max_position_embeddings
    if config.prompt_tokens + config.new_tokens > limit:
        raise RegenerateError(f"prompt_tokens {config.prompt_tokens} + new_tokens {config.new_tokens} exceeds the "
                              f"target's max_position_embeddings {limit}")
    primary = is_primary()
    manifest_path = os.path.join(config.out_dir, MANIFEST_NAME)
    if primary:
        os.makedirs(config.out_dir, exist_ok=True)
        if os.path.exists(manifest_path):  # an interrupted rebuild must not look complete
            os.unlink(manifest_path)
    content = hashlib.sha256()
    domains: dict[str, dict] = {}
    t0 = time.perf_counter()
    generated = 0
    for d_index, domain in enumerate(DOMAINS):
        stats = {}
        if primary:
            os.makedirs(os.path.join(config.out_dir, domain), exist_ok=True)
        for s_index, (split, count) in enumerate(config.split_counts().items()):
            try:
                src = list(iter_documents(config.corpus_dir, domain, split))
            except (FileNotFoundError, ValueError) as e:
                raise RegenerateError(str(e)) from e
            cache: dict[int, list[int]] = {}

            def token_ids(i: int) -> list[int]:
                if i not in cache:
                    cache[i] = target.tokenizer.encode(src[i].text)
                return cache[i]

            try:
                windows = sample_prompt_windows(len(src), token_ids, count, config.prompt_tokens,
                                                config.seed * 1009 + d_index * 31 + s_index)
            except RegenerateError as e:
                raise RegenerateError(f"{domain}/{split} of {config.corpus_dir}: {e}") from None
            lines = []
            starts = list(range(0, count, config.batch_size))
            share = starts[len(starts) * jax.process_index() // jax.process_count():
                           len(starts) * (jax.process_index() + 1) // jax.process_count()]
            for b0 in share:
                batch = windows[b0:b0 + config.batch_size]
                prompts = [token_ids(i)[o:o + config.prompt_tokens] for i, o in batch]
                padded = prompts + [prompts[-1]] * (config.batch_size - len(prompts))  # one compiled shape
                res = generate(target, padded, max_new_tokens=config.new_tokens, sampling=config.sampling,
                               seed=config.seed * 100003 + zlib.crc32(f"{domain}/{split}/{b0}".encode()) % 100003)
                for (i, o), prompt, cont in zip(batch, prompts, res.token_ids):
                    generated += len(cont)
                    text = target.tokenizer.decode(prompt + cont)
                    lines.append(json.dumps({"path": f"{src[i].path}@{o}", "text": text}, ensure_ascii=False) + "\n")
                if progress is not None and primary:
                    rate = generated / max(time.perf_counter() - t0, 1e-9)
                    progress(f"{domain}/{split}: {min(b0 + config.batch_size, count)}/{count} prompts, "
                             f"{generated} tokens generated ({rate:.0f} tok/s)")
            payload = allgather_concat(np.frombuffer("".join(lines).encode("utf-8"), np.uint8)).tobytes()
            texts = [json.loads(line)["text"] for line in payload.split(b"\n") if line]
            if primary:
                atomic_write_bytes(os.path.join(config.out_dir, domain, f"{split}.jsonl"), payload)
            content.update(f"{domain}/{split}.jsonl\0{len(payload)}\0".encode())
            content.update(payload)
            stats[split] = {"files": count, "chars": sum(len(t) for t in texts),
                            "bytes": sum(len(t.encode("utf-8")) for t in texts), "jsonl_bytes": len(payload)}
        domains[domain] = {"splits": stats}
    manifest = {
        "format": FORMAT,
        "sources": {"regenerated_from": {"corpus_dir": os.path.abspath(config.corpus_dir),
                                         "content_hash": source.get("content_hash")},
                    "target": None if getattr(target, "path", None) is None else os.path.abspath(target.path)},
        "regeneration": {**{k: v for k, v in dataclasses.asdict(config).items() if k not in ("corpus_dir", "out_dir")},
                         "generated_tokens": int(allgather_concat(np.asarray([generated], np.int64)).sum())},
        "domains": domains,
        "content_hash": "sha256:" + content.hexdigest(),
    }
    if primary:
        atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    barrier("regenerate-done")
    return manifest
