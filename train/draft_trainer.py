"""DSpark / DFlash draft training against a frozen target (`dspark train-draft`).

Output directory (`out_dir`):

    train_config.json     the DraftTrainConfig of the run
    metrics.jsonl         {"step", "loss", "ce_loss", "l1_loss", "confidence_loss", "accept_rate@k", ...,
                          "tokens_per_s", "anchors_per_s"} and {"step", "eval": {domain: {...}}} records
    checkpoints/<step>/   orbax: draft params (float32 master) + AdamW state + step + RNG, JSON meta
                          (config, draft config, data position, target / corpus / tokenizer fingerprint)
    cache/                tokenized corpus streams
    draft/                the final draft in DeepSpec layout (`save_draft`) + train_summary.json

Layout: one (data, fsdp, model) mesh. The frozen target is sharded by the project's logical-axis
rules (tensor parallel over `model`), the draft and its optimizer state are replicated, batches are
split over data x fsdp. Only the draft's trainable parameters are optimised: `embed_tokens` and
`lm_head` are frozen copies of the target's (stop_gradient in the model, `optax.set_to_zero` here,
so they hold no AdamW moments). Target features come from the target run inside the step
(`draft_features.make_feature_fn`) or from an offline v2 cache; both give identical bf16 features.
Resume restores params, optimizer state, RNG (anchor sampling) and data position exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dspark_jax.checkpoint.deepspec import draft_params_from_target
from dspark_jax.config import TargetConfig, load_hf_config
from dspark_jax.data.tokenizer_training import MASK_TOKEN
from dspark_jax.draft import DraftConfig, DraftConfigError, DraftModel, default_target_layer_ids, trainable_mask
from dspark_jax.sharding import batch_sharding, target_param_shardings
from dspark_jax.target.model import TargetModel
from train import draft_features as feats
from train import draft_losses as dl
from train.data import (BatchIterator, DataState, PackedSequences, TokenizerInfo, check_corpus, load_tokenizer,
                        pack_stream, tokenize_split, validation_batches)
from train.draft_config import RESUME_COMPATIBLE_FIELDS, DraftTrainConfig
from train.distributed import is_primary, out_path
from train.loop import (config_mesh, export_draft, open_checkpoints, open_run_log, restore_or_init,
                        run_steps, target_fingerprint)
from train.metrics import read_jsonl
from train.optim import OptimizerConfig, cast_floating, make_optimizer
from train.parallel import TrainProgram, build_train_program, mesh_context

__all__ = ["DraftSetupError", "DraftTrainResult", "DraftProgram", "resolve_draft_config", "make_draft_loss",
           "build_draft_program", "training_rows", "open_draft_checkpoints", "train_draft"]


class DraftSetupError(ValueError):
    """Inputs that cannot be trained on (message says what and how to fix it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftTrainResult:
    """What `train_draft` did."""

    out_dir: str
    export_dir: str | None
    start_step: int
    final_step: int
    first_loss: float | None  # first logged training loss of the whole run (from metrics.jsonl)
    final_loss: float | None
    eval_metrics: dict[str, dict[str, float]]
    state: Any  # TrainState
    config: DraftTrainConfig
    draft_config: DraftConfig


def resolve_draft_config(config: DraftTrainConfig, target_config: TargetConfig, tok: TokenizerInfo) -> DraftConfig:
    """The draft architecture for this target and tokenizer; DraftSetupError with a one-line reason."""
    t = target_config
    if tok.vocab_size > t.vocab_size:
        raise DraftSetupError(f"tokenizer {tok.directory} has {tok.vocab_size} tokens but the target vocab_size is "
                              f"{t.vocab_size}: use the target's own tokenizer")
    if config.seq_len > t.max_position_embeddings:
        raise DraftSetupError(f"seq_len {config.seq_len} exceeds the target's max_position_embeddings "
                              f"{t.max_position_embeddings}")
    mask_id = config.mask_token_id
    if mask_id is None:
        mask_id = tok.tokenizer.token_to_id(MASK_TOKEN)
        if mask_id is None:
            raise DraftSetupError(f"tokenizer {tok.directory} has no {MASK_TOKEN!r} token; set mask_token_id")
    try:
        ids = config.target_layer_ids
        if ids is None:
            ids = default_target_layer_ids(t.num_hidden_layers, min(config.num_context_layers,
                                                                    max(t.num_hidden_layers - 1, 1)))
        return DraftConfig.from_target(t.replace(dtype="float32"), mask_token_id=int(mask_id),
                                       target_layer_ids=tuple(ids), **config.draft_fields())
    except DraftConfigError as e:
        raise DraftSetupError(str(e)) from None


def make_draft_loss(config: DraftTrainConfig, dcfg: DraftConfig, tcfg: TargetConfig) -> Callable:
    """loss_fn(draft_params, target_params, batch, rng) -> (loss, metrics dict of float32 scalars).

    batch: input_ids int32 [B, S], loss_mask [B, S], optional ctx_feats [B, S, n_ctx*d] and
    last_hidden [B, S, d] (offline features; otherwise the target runs on input_ids).
    Deviation: target logits (and so l1_loss / accept_rate / tau) are computed even when the L1
    and confidence terms are off (DFlash, CE only) — for the metrics; they never enter the loss then.
    """
    cdt = config.compute_dtype
    model = DraftModel(dcfg.replace(dtype=cdt))
    feature_fn = feats.make_feature_fn(tcfg.replace(dtype=cdt), dcfg.target_layer_ids, config.feature_dtype)
    weights = dl.position_weights(dcfg.block_size, config.loss_decay_gamma)
    conf_on = dcfg.enable_confidence_head

    def loss_fn(params, target_params, batch, rng):
        params = cast_floating(params, cdt)
        ids, lm = batch["input_ids"], batch["loss_mask"]
        if "ctx_feats" in batch:
            ctx, last = batch["ctx_feats"], batch["last_hidden"]  # [B, S, n_ctx*d], [B, S, d]
        else:
            ctx, last = feature_fn(cast_floating(target_params, cdt), ids)
        anchors, keep = dl.sample_anchors(rng, lm, dcfg.num_anchors)  # [B, N]
        blocks = dl.make_blocks(ids, lm, anchors, keep, dcfg.block_size, dcfg.mask_token_id)  # [B, N, K]
        apply = lambda *a, method: model.apply({"params": params}, *a, method=method)  # noqa: E731
        h = apply(ctx.astype(cdt), blocks.block_tokens, anchors, keep, method=DraftModel.train_forward)  # [B,N,K,d]
        teacher = feats.gather_positions(last, blocks.teacher_idx).astype(cdt)  # [B, N, K, d]

        def chunk_fn(x):  # one chunk of anchors: [B, c, K, ...]
            z = (apply(x["h"], method=DraftModel.compute_logits)  # Markov-corrected draft logits Z
                 + apply(x["prev"], x["h"], method=DraftModel.markov_bias))
            t = apply(x["teacher"], method=DraftModel.compute_logits)  # target logits via the frozen lm_head
            conf = apply(x["h"], x["prev"], method=DraftModel.confidence_logits) if conf_on else None
            return dl.slot_stats(z, x["target"], t, conf)

        stats = dl.chunked_map(chunk_fn, {"h": h, "prev": blocks.prev_ids, "teacher": teacher,
                                          "target": blocks.target_ids}, config.loss_chunk_anchors)
        loss, parts = dl.reduce_losses(stats, blocks.eval_mask, weights, config.alphas)
        metrics = {"loss": loss, **parts, **dl.training_metrics(stats, blocks, lm, keep, dcfg.num_anchors,
                                                                           weights)}
        return loss, metrics

    return loss_fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftProgram:
    """The shared `TrainProgram` of a draft run (`program`) and the target weights' shardings.

    program.init(seed, target_params) -> TrainState; program.step(state, batch, target_params or
    None with offline features) -> (state, metrics) (state donated); program.evaluate(params, batch,
    target_params, rng) -> (loss, 1, metrics) (no update). The draft and its optimizer state are
    replicated; batches are split over data x fsdp (`program.put_batch`, multi-process aware).
    """

    program: TrainProgram
    target_shardings: Any

    @property
    def mesh(self):
        """The (data, fsdp, model) mesh."""
        return self.program.mesh


_PROGRAMS: dict[tuple, DraftProgram] = {}


def build_draft_program(config: DraftTrainConfig, dcfg: DraftConfig, tcfg: TargetConfig, mesh) -> DraftProgram:
    """Build (or reuse: cached per config / draft / target / mesh) the jitted functions of a run.

    The step is `train.parallel.build_train_program` with the frozen target weights as its
    `frozen` input and a loss of weight 1 (the draft loss is already a mean, spec §4.3).
    """
    math = {k: v for k, v in config.to_dict().items() if k not in RESUME_COMPATIBLE_FIELDS - {"loss_chunk_anchors"}}
    key = (json.dumps(math, sort_keys=True), dcfg, tcfg, mesh)
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    inner, schedule = make_optimizer(OptimizerConfig.from_train_config(config))
    labels = lambda p: jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable_mask(p))  # noqa: E731
    tx = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
    draft_loss = make_draft_loss(config, dcfg, tcfg)

    def loss_fn(params, batch, rng, target_params):
        loss, metrics = draft_loss(params, target_params, batch, rng)
        return loss, (jnp.ones((), jnp.float32), {k: v for k, v in metrics.items() if k != "loss"})

    def init_params(rng, target_params):
        return cast_floating(draft_params_from_target(target_params, tcfg, dcfg, rng), jnp.float32)

    tokens = jnp.zeros((1, 1), jnp.int32)
    target_abstract = nn.unbox(jax.eval_shape(
        lambda: TargetModel(tcfg).init(jax.random.PRNGKey(0), tokens, tokens))["params"])
    program = build_train_program(mesh=mesh, init_params=init_params, loss_fn=loss_fn, optimizer=tx,
                                  schedule=schedule, compute_dtype="float32", frozen_abstract=target_abstract)
    prog = DraftProgram(program=program, target_shardings=target_param_shardings(tcfg, mesh))
    _PROGRAMS[key] = prog
    return prog


def training_rows(packed: PackedSequences, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Packed windows -> input_ids int32 [N, S], loss_mask float32 [N, S] (1 = real token), lengths [N].

    A plain-text corpus supervises every real token (the reference's assistant-only loss mask has
    no counterpart); padding (only at the end of the last window) has mask 0.
    """
    ids = np.ascontiguousarray(packed.tokens[:, :seq_len])
    mask = (ids != pad_id).astype(np.float32)
    return {"input_ids": ids, "loss_mask": mask, "lengths": mask.sum(1).astype(np.int64)}


def open_draft_checkpoints(config: Any, *, out_dir: str, target_dir: str, manifest: dict, tok: TokenizerInfo,
                           resume: bool) -> tuple[Any, int | None, Callable[[str], None], dict[str, Any]]:
    """(checkpointer, newest resumable step or None, note, fingerprint) of a draft run in `out_dir`
    (`train.loop.open_checkpoints`; resume needs the same config outside RESUME_COMPATIBLE_FIELDS and
    the same target / corpus / tokenizer). Shared by the DSpark and Eagle-3 trainers."""
    fingerprint = target_fingerprint(target_dir, manifest, tok.sha256)
    ckpt, latest, note = open_checkpoints(out_dir, config, resume=resume, fingerprint=fingerprint,
                                          ignore=RESUME_COMPATIBLE_FIELDS, data_what="target / corpus / tokenizer",
                                          error=DraftSetupError, name="train-draft")
    return ckpt, latest, note, fingerprint


def _evaluate(prog: DraftProgram, params, target_params, batches: dict, pad_id: int,
              seed: int) -> dict[str, dict[str, float]]:
    """Per domain: weight_sum-weighted mean of the batch metrics (fixed anchors: rng fold_in(seed, i))."""
    out = {}
    for domain, items in batches.items():
        acc, total = {}, 0.0
        for i, b in enumerate(items):
            ids = np.ascontiguousarray(b["tokens"][:, :-1])  # [B, S]
            rows = {"input_ids": ids, "loss_mask": (ids != pad_id).astype(np.float32)}
            loss, weight, aux = prog.program.evaluate(params, prog.program.put_batch(rows), target_params,
                                                      jax.random.fold_in(jax.random.PRNGKey(seed), i))
            m = dl.as_host_floats({"loss": loss / weight, **{k: v / weight for k, v in aux.items()}})
            w = m["weight_sum"]
            total += w
            for k, v in m.items():
                acc[k] = acc.get(k, 0.0) + w * v
        if total > 0:
            out[domain] = {k: v / total for k, v in acc.items()}
    return out


def _load_rows(config: DraftTrainConfig, corpus_dir: str, tok: TokenizerInfo, cache_dir: str) -> dict[str, np.ndarray]:
    stream = np.concatenate([tokenize_split(corpus_dir, d, "train", tok, cache_dir=cache_dir) for d in config.domains])
    rows = training_rows(pack_stream(stream, config.seq_len, tok.pad_id), config.seq_len, tok.pad_id)
    if rows["input_ids"].shape[0] < config.batch_size:
        raise DraftSetupError(f"training data has {rows['input_ids'].shape[0]} sequences of {config.seq_len} tokens, "
                              f"fewer than batch_size {config.batch_size}; use a larger corpus or smaller sizes")
    return rows


def _draft_description(dcfg: DraftConfig) -> str:
    """One line for train_summary.json: DSpark / DFlash, layers, K, heads."""
    kind = "DSpark" if dcfg.markov_rank > 0 else "DFlash"
    head = f"markov {dcfg.markov_head_type} r={dcfg.markov_rank}" if dcfg.markov_rank else "no markov head"
    return (f"{kind} draft: {dcfg.num_hidden_layers} layer(s), block_size {dcfg.block_size}, {head}, "
            f"confidence head {'on' if dcfg.enable_confidence_head else 'off'}")


def train_draft(config: DraftTrainConfig, *, target_dir: str, corpus_dir: str, out_dir: str,
                tokenizer_dir: str | None = None, resume: bool = False, stop_at_step: int | None = None,
                progress: bool = True, export: bool = True, feature_cache: str | None = None,
                write_feature_cache: bool = False) -> DraftTrainResult:
    """Train a draft for the HF target in `target_dir` on `corpus_dir`; see the module docstring.

    The tokenizer is read from `tokenizer_dir` (default: the target directory). `resume=True`
    continues from the latest committed checkpoint (refused if written with another config);
    without it an `out_dir` holding checkpoints is refused. `stop_at_step` ends early with a
    checkpoint, as if interrupted. `feature_cache`: read target features from this v2 cache, or
    with `write_feature_cache` compute them once, write the cache, then train from it.
    """
    out_dir, target_dir = os.fspath(out_path(out_dir)), os.path.abspath(target_dir)
    manifest = check_corpus(corpus_dir)
    tcfg = load_hf_config(target_dir, dtype=config.compute_dtype)
    tok = load_tokenizer(tokenizer_dir or target_dir)
    dcfg = resolve_draft_config(config, tcfg, tok)
    mesh = config_mesh(config, DraftSetupError)
    if write_feature_cache and jax.process_count() > 1:
        raise DraftSetupError("--write-feature-cache runs in one process; write the cache first, then train "
                              "with --feature-cache on every host")
    primary = is_primary()
    ckpt, latest, note, fingerprint = open_draft_checkpoints(config, out_dir=out_dir, target_dir=target_dir,
                                                             manifest=manifest, tok=tok, resume=resume)
    try:
        cache_dir = os.path.join(out_dir, "cache")
        rows = _load_rows(config, corpus_dir, tok, cache_dir)
        n_rows = rows["input_ids"].shape[0]
        index = BatchIterator(PackedSequences(tokens=np.arange(n_rows, dtype=np.int32)[:, None],
                                              mask=np.zeros((n_rows, 1), np.float32)), config.batch_size, config.seed)
        val = validation_batches(corpus_dir, config.domains, tok, seq_len=config.seq_len,
                                 batch_size=config.batch_size, max_batches=config.eval_batches, cache_dir=cache_dir)
        prog = build_draft_program(config, dcfg, tcfg, mesh)
        program = prog.program
        from dspark_jax.checkpoint.hf import load_target
        _, target_params = load_target(target_dir, dtype=config.compute_dtype, shardings=prog.target_shardings)
        cache = None
        if feature_cache:
            expected = {"target_model_name_or_path": target_dir, "max_length": config.seq_len,
                        "num_samples": n_rows, "corpus_content_hash": manifest.get("content_hash"),
                        "tokenizer_sha256": tok.sha256, "domains": list(config.domains),
                        "feature_dtype": config.feature_dtype}
            if write_feature_cache:
                fn = feats.make_feature_fn(tcfg, dcfg.target_layer_ids, config.feature_dtype)
                jit_fn = jax.jit(lambda p, ids: fn(cast_floating(p, config.compute_dtype), ids))
                put = lambda ids: jax.device_put(ids, batch_sharding(mesh, 2, ids.shape[0]))  # noqa: E731
                with mesh_context(mesh):
                    cache = feats.write_feature_cache(
                        feature_cache, lambda ids: jit_fn(target_params, put(ids)), input_ids=rows["input_ids"],
                        loss_mask=rows["loss_mask"], lengths=rows["lengths"], batch_size=config.batch_size,
                        target_layer_ids=dcfg.target_layer_ids, hidden_size=dcfg.hidden_size,
                        extras={**expected, "project_name": "dspark-jax", "exp_name": os.path.basename(out_dir),
                                "chat_template": None, "min_loss_tokens": None, "source_jsonl_paths": []})
                note(f"wrote {len(cache)} samples of target features to {cache.directory}")
            else:
                cache = feats.FeatureCache(feature_cache)
            cache.validate(target_layer_ids=dcfg.target_layer_ids, hidden_size=dcfg.hidden_size, expected=expected)
        state, meta = restore_or_init(ckpt, latest, program, lambda: program.init(config.seed, target_params), note)
        if meta is not None:
            index.restore(DataState.from_dict(meta["data_state"]))
    except BaseException:
        ckpt.close()
        raise

    def next_batch() -> dict[str, np.ndarray]:
        idx = next(index)["tokens"][:, 0]
        if cache is not None:
            return cache.batch(idx, config.seq_len, tok.pad_id)
        return {"input_ids": rows["input_ids"][idx], "loss_mask": rows["loss_mask"][idx]}

    start, end, logger, bar = open_run_log(out_dir, state, meta, config=config, stop_at_step=stop_at_step,
                                           desc="train-draft", progress=progress)
    if primary:
        bar.write(f"train-draft: {n_rows} sequences x {config.seq_len} tokens, draft {dcfg.num_hidden_layers} "
                  f"layer(s) K={dcfg.block_size} r={dcfg.markov_rank} taps {list(dcfg.target_layer_ids)}, features "
                  f"{'cache ' + cache.directory if cache is not None else 'online'}, mesh {dict(mesh.shape)}, "
                  f"{jax.process_count()} process(es), steps {start}->{end} of {config.steps}")
    meta_now = lambda s: {"step": s, "config": config.to_dict(), "data_state": index.state.to_dict(),  # noqa: E731
                          "fingerprint": fingerprint, "draft_config": dcfg.to_deepspec_config()}
    eval_metrics: dict[str, dict[str, float]] = {}

    def on_log(s: int, metrics, rate) -> None:
        last = dl.as_host_floats({k: v for k, v in metrics.items() if k != "weight"})
        tps = rate.rate()
        aps = tps / config.seq_len * last["sampled_anchors_abs"]
        logger.log({"step": s, **last, "tokens_per_s": tps, "anchors_per_s": aps, "epoch": index.state.epoch})
        bar.update(0, loss=last["loss"], tau=last.get("tau_probabilistic", 0.0), lr=last["lr"])

    def on_eval(s: int, state) -> None:
        nonlocal eval_metrics
        eval_metrics = _evaluate(prog, state.params, target_params, val, tok.pad_id, config.seed)
        logger.log({"step": s, "eval": eval_metrics})
        if primary:
            bar.write(f"step {s}: eval " + ", ".join(
                f"{d} loss {m['loss']:.4f} tau {m.get('tau_probabilistic', float('nan')):.3f}"
                for d, m in eval_metrics.items()))

    step_target = None if cache is not None else target_params
    state = run_steps(state, config=config, start=start, end=end,
                      step=lambda st: program.step(st, program.put_batch(next_batch()), step_target), on_log=on_log,
                      on_eval=on_eval, meta=meta_now, ckpt=ckpt, bar=bar, logger=logger)
    logged = [r for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "loss" in r]
    export_dir = None
    if export and end == config.steps:
        export_dir = os.path.join(out_dir, "draft")
        export_draft(state.params, dcfg, config, export_dir, model=_draft_description(dcfg),
                     say=lambda m: bar.write(f"train-draft: {m}"), info={
                         "target": target_dir, "corpus": os.path.abspath(corpus_dir), "fingerprint": fingerprint,
                         "final_train_metrics": logged[-1] if logged else None, "eval_metrics": eval_metrics})
    return DraftTrainResult(out_dir=out_dir, export_dir=export_dir, start_step=start, final_step=end,
                            first_loss=logged[0]["loss"] if logged else None,
                            final_loss=logged[-1]["loss"] if logged else None, eval_metrics=eval_metrics,
                            state=state, config=config, draft_config=dcfg)
