"""Eagle-3 draft training (`dspark train-draft --preset eagle3`, spec §9.2): TTT soft cross-entropy.

Per step: the frozen target runs on a batch of packed sequences (taps of `target_layer_ids` and
full-vocabulary logits, computed online), then `ttt_loss` unrolls `block_size` (= TTT length, 7)
steps with the step-causal-plus-diagonal mask and step-offset RoPE, soft CE against the target
distribution weighted 0.8^s. Embedding and LM head are frozen copies of the target's
(`optax.set_to_zero`). The step is `train.parallel.build_train_program` (the DSpark trainer's:
same optimiser, (data, fsdp, model) mesh from `--mesh`, frozen target weights as the `frozen`
input sharded by the target's rules). The run is driven by the DSpark trainer's scaffolding
(`train.loop`): resume checks, checkpoints, finite checks, logging, periodic evaluation, export.

Output directory (`out_dir`), as the DSpark trainer's:

    train_config.json     the DraftTrainConfig of the run
    metrics.jsonl         {"step", "loss", "acc0", "lr", "grad_norm", "weight", "tokens_per_s", "epoch"} and
                          {"step", "eval": {domain: {"loss", "acc0"}}} records (acc0: step-0 top-1 agreement)
    checkpoints/<step>/   orbax: draft params (float32 master) + AdamW state + step + RNG, JSON meta
                          (config, Eagle-3 config, data position, target / corpus / tokenizer fingerprint)
    token_cache/          tokenized corpus streams
    draft/                the Eagle-3 draft in DeepSpec layout (`load_draft_bundle` / `dspark generate
                          --draft` / `dspark eval` read it) + train_summary.json

`--resume` restores params, optimizer state and data position exactly (the same batches follow);
a non-finite loss or gradient stops the run (`NonFiniteError`) keeping the last good checkpoint;
non-finite weights are never exported. Not supported here: feature caches (taps + logits are online).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dspark_jax.checkpoint.hf import load_target
from dspark_jax.config import load_hf_config
from dspark_jax.draft.config import default_target_layer_ids
from dspark_jax.draft.eagle3 import Eagle3Config, Eagle3Model, eagle3_trainable_mask, ttt_loss
from dspark_jax.sharding import target_param_shardings
from dspark_jax.target.model import TargetModel, output_kernel
from train.data import (BatchIterator, DataState, check_corpus, load_tokenizer, pack_stream, tokenize_split,
                        validation_batches)
from train.distributed import is_primary, out_path
from train.draft_config import RESUME_COMPATIBLE_FIELDS, DraftTrainConfig
from train.draft_trainer import DraftSetupError, open_draft_checkpoints
from train.loop import config_mesh, export_draft, open_run_log, restore_or_init, run_steps
from train.metrics import read_jsonl
from train.optim import OptimizerConfig, make_optimizer
from train.parallel import TrainProgram, build_train_program

__all__ = ["Eagle3TrainResult", "train_eagle3", "eagle3_draft_config", "build_eagle3_program"]


@dataclasses.dataclass(frozen=True)
class Eagle3TrainResult:
    """Outcome of `train_eagle3` (the DSpark trainer's `DraftTrainResult` fields).

    first_loss / final_loss: first and last logged training loss of the whole run (metrics.jsonl,
    None if nothing was logged); start_step: where this invocation began (> 0 after `--resume`).
    """

    config: DraftTrainConfig
    out_dir: str
    export_dir: str | None
    final_step: int
    first_loss: float | None
    final_loss: float | None
    eval_metrics: dict[str, dict[str, float]]
    start_step: int = 0
    state: Any = None  # TrainState
    draft_config: Eagle3Config | None = None


def eagle3_draft_config(config: DraftTrainConfig, target_config) -> Eagle3Config:
    """The Eagle-3 draft for `target_config`: TTT length = chain length = `config.block_size`."""
    lt = target_config.num_hidden_layers
    ids = config.target_layer_ids or default_target_layer_ids(lt, min(config.num_context_layers, lt - 1))
    return Eagle3Config.from_target(target_config, target_layer_ids=ids, ttt_length=config.block_size,
                                    block_size=config.block_size, dtype="float32")


def _batch_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed batch -> {input_ids [B, L] int32, loss_mask [B, L] float32}: DeepSpec's per-token loss mask
    (1 on real tokens: token 0 iff the window is real, token j > 0 iff target j-1 is; padding 0), which
    `ttt_loss` also uses as the attention / valid-length mask."""
    tokens, mask = batch["tokens"][:, :-1], batch["mask"]
    token_mask = np.concatenate([mask[:, :1], mask[:, :-1]], axis=1)
    return {"input_ids": np.asarray(tokens, np.int32), "loss_mask": np.asarray(token_mask, np.float32)}


_PROGRAMS: dict[tuple, TrainProgram] = {}


def build_eagle3_program(config: DraftTrainConfig, dcfg: Eagle3Config, tcfg, mesh) -> TrainProgram:
    """The jitted init / step / evaluate of an Eagle-3 run (`train.parallel.build_train_program`).

    frozen = the target's params. The TTT loss is already a mean (weight 1 per batch); aux: acc0
    (step-0 top-1 agreement with the target). Cached per step-math config / draft / target / mesh,
    so a resumed run in the same process reuses the compiled step.
    """
    math = {k: v for k, v in config.to_dict().items() if k not in RESUME_COMPATIBLE_FIELDS}
    key = (json.dumps(math, sort_keys=True, default=str), dcfg, tcfg, mesh)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _build_program(config, dcfg, tcfg, mesh)
    return _PROGRAMS[key]


def _build_program(config: DraftTrainConfig, dcfg: Eagle3Config, tcfg, mesh) -> TrainProgram:
    inner, schedule = make_optimizer(OptimizerConfig.from_train_config(config))
    labels = lambda p: jax.tree_util.tree_map(lambda t: "train" if t else "frozen",  # noqa: E731
                                              eagle3_trainable_mask(p))
    tx = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
    target, model = TargetModel(tcfg), Eagle3Model(dcfg)
    taps_ids = tuple(dcfg.target_layer_ids)

    def loss_fn(params, batch, rng, target_params):
        ids = batch["input_ids"]  # [B, L]
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        res = target.apply({"params": target_params}, ids, pos, tap_layers=taps_ids)  # frozen target
        taps = jax.lax.stop_gradient(jnp.concatenate(res.taps, axis=-1).astype(jnp.float32))  # [B, L, n_ctx*d]
        loss, aux = ttt_loss(model, params, taps, ids, jax.lax.stop_gradient(res.logits), batch["loss_mask"],
                             dcfg.ttt_length, dcfg.step_decay, attention_mask=batch["loss_mask"])
        return loss, (jnp.ones((), jnp.float32), {"acc0": aux["step_acc"][0]})

    def init_params(rng, target_params):  # unboxed (replicated), as the DSpark trainer's draft
        taps = jnp.zeros((1, 2, dcfg.context_dim), jnp.float32)
        params = nn.unbox(model.init(rng, taps, jnp.zeros((1, 2), jnp.int32))["params"])
        params["embed_tokens"]["embedding"] = jnp.asarray(target_params["embed_tokens"]["embedding"], jnp.float32)
        params["lm_head"]["kernel"] = jnp.asarray(output_kernel(tcfg, target_params), jnp.float32)
        return params

    tokens = jnp.zeros((1, 1), jnp.int32)
    target_abstract = nn.unbox(jax.eval_shape(lambda: target.init(jax.random.PRNGKey(0), tokens, tokens))["params"])
    return build_train_program(mesh=mesh, init_params=init_params, loss_fn=loss_fn, optimizer=tx, schedule=schedule,
                               compute_dtype="float32", frozen_abstract=target_abstract)


def _evaluate(program: TrainProgram, params, target_params, batches: dict) -> dict[str, dict[str, float]]:
    """Per domain: mean over its fixed validation batches of the TTT loss and acc0."""
    out = {}
    for domain, items in batches.items():
        if items:
            outs = [program.evaluate(params, program.put_batch(_batch_arrays(b)), target_params) for b in items]
            out[domain] = {"loss": float(np.mean([float(o[0] / o[1]) for o in outs])),
                           "acc0": float(np.mean([float(o[2]["acc0"] / o[1]) for o in outs]))}
    return out


def train_eagle3(config: DraftTrainConfig, *, target_dir: str, corpus_dir: str, out_dir: str,
                 tokenizer_dir: str | None = None, resume: bool = False, stop_at_step: int | None = None,
                 progress: bool = True, export: bool = True, feature_cache: str | None = None,
                 write_feature_cache: bool = False) -> Eagle3TrainResult:
    """Train an Eagle-3 draft for the target in `target_dir` on `corpus_dir` (see the module docstring).

    Same contract as `train.draft_trainer.train_draft`: `resume=True` continues from the latest
    committed checkpoint (refused if written with another config / target / corpus / tokenizer);
    without it an `out_dir` holding checkpoints is refused; `stop_at_step` ends early with a
    checkpoint, as if interrupted; the draft is exported only when the run reaches `config.steps`.
    """
    if feature_cache or write_feature_cache:
        raise DraftSetupError("--preset eagle3 does not support --feature-cache (target taps and logits are "
                              "computed online)")
    out_dir, target_dir = os.fspath(out_path(out_dir)), os.path.abspath(target_dir)
    manifest = check_corpus(corpus_dir)
    tcfg = load_hf_config(target_dir, dtype=config.compute_dtype)
    tok = load_tokenizer(tokenizer_dir or target_dir)
    dcfg = eagle3_draft_config(config, tcfg)
    mesh = config_mesh(config, DraftSetupError)
    primary = is_primary()
    ckpt, latest, note, fingerprint = open_draft_checkpoints(config, out_dir=out_dir, target_dir=target_dir,
                                                             manifest=manifest, tok=tok, resume=resume)
    try:
        cache_dir = os.path.join(out_dir, "token_cache")
        stream = np.concatenate([tokenize_split(corpus_dir, d, "train", tok, cache_dir=cache_dir)
                                 for d in config.domains])
        batches = BatchIterator(pack_stream(stream, config.seq_len, tok.pad_id), config.batch_size, config.seed)
        val = validation_batches(corpus_dir, config.domains, tok, seq_len=config.seq_len,
                                 batch_size=config.batch_size, max_batches=config.eval_batches, cache_dir=cache_dir)
        program = build_eagle3_program(config, dcfg, tcfg, mesh)
        _, tparams = load_target(target_dir, dtype=config.compute_dtype,
                                 shardings=target_param_shardings(tcfg, mesh))
        state, meta = restore_or_init(ckpt, latest, program, lambda: program.init(config.seed, tparams), note)
        if meta is not None:
            batches.restore(DataState.from_dict(meta["data_state"]))
    except BaseException:
        ckpt.close()
        raise

    start, end, logger, bar = open_run_log(out_dir, state, meta, config=config, stop_at_step=stop_at_step,
                                           desc="train-draft eagle3", progress=progress)
    if primary:
        bar.write(f"train-draft: Eagle-3, {len(batches.data)} sequences x {config.seq_len} tokens, TTT "
                  f"{dcfg.ttt_length}, taps {list(dcfg.target_layer_ids)}, mesh {dict(mesh.shape)}, "
                  f"{jax.process_count()} process(es), steps {start}->{end} of {config.steps}")
    meta_now = lambda s: {"step": s, "config": config.to_dict(), "data_state": batches.state.to_dict(),  # noqa: E731
                          "fingerprint": fingerprint, "draft_config": dcfg.to_eagle3_config()}
    eval_metrics: dict[str, dict[str, float]] = {}

    def on_log(s: int, metrics, rate) -> None:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        logger.log({"step": s, **last, "tokens_per_s": rate.rate(), "epoch": batches.state.epoch})
        bar.update(0, loss=last["loss"], acc0=last["acc0"], lr=last["lr"])

    def on_eval(s: int, state) -> None:
        nonlocal eval_metrics
        eval_metrics = _evaluate(program, state.params, tparams, val)
        logger.log({"step": s, "eval": eval_metrics})
        if primary:
            bar.write(f"step {s}: eval " + ", ".join(f"{d} loss {m['loss']:.4f} acc0 {m['acc0']:.3f}"
                                                     for d, m in eval_metrics.items()))

    state = run_steps(state, config=config, start=start, end=end,
                      step=lambda st: program.step(st, program.put_batch(_batch_arrays(next(batches))), tparams),
                      on_log=on_log, on_eval=on_eval, meta=meta_now, ckpt=ckpt, bar=bar, logger=logger)
    logged = [r for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "loss" in r]
    export_dir = None
    if export and end == config.steps:
        export_dir = os.path.join(out_dir, "draft")
        model = (f"Eagle-3 draft: {dcfg.num_hidden_layers} layer(s), TTT length {dcfg.ttt_length}, "
                 f"step decay {dcfg.step_decay}, chain length {dcfg.block_size}")
        export_draft(state.params, dcfg, config, export_dir, model=model, say=lambda m: bar.write(f"train-draft: {m}"),
                     info={"target": target_dir, "corpus": os.path.abspath(corpus_dir), "fingerprint": fingerprint,
                           "final_train_metrics": logged[-1] if logged else None, "eval_metrics": eval_metrics})
    return Eagle3TrainResult(config=config, out_dir=out_dir, export_dir=export_dir, final_step=end,
                             first_loss=logged[0]["loss"] if logged else None,
                             final_loss=logged[-1]["loss"] if logged else None, eval_metrics=eval_metrics,
                             start_step=start, state=state, draft_config=dcfg)
