"""Target pretraining loop (`dspark train-target`): next-token cross-entropy on packed sequences.

Output directory layout (`out_dir`):

    train_config.json        the resolved TargetTrainConfig (vocab filled in from the tokenizer)
    metrics.jsonl            {"step", "loss", "lr", "grad_norm", "accuracy", "tokens_per_s", ...}
                             and {"step", "eval": {domain: loss}} records
    checkpoints/<step>/      orbax: params + AdamW state + step + RNG, and JSON meta (config,
                             data-iterator state, corpus/tokenizer fingerprint)
    cache/                   tokenized corpus streams (.npy)
    config.json, model.safetensors, generation_config.json, tokenizer*.json
                             the final model in Hugging Face layout (`dspark generate --target out_dir`)

The step runs on a (data, fsdp, model) mesh (`train.parallel`); a 1x1x1 mesh is the same code on
one device. Resuming restores params, optimizer state, RNG and the data position exactly, so N
steps + resume to 2N equals an uninterrupted 2N run.

Multi-process (`train.distributed`): every process tokenizes its share of the corpus, feeds the
rows of each batch its devices hold, and runs the same steps; process 0 alone writes the config,
metrics and the export (gathered from the sharded state first). `out_dir` may be a ``gs://`` URL.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import TargetConfig
from dspark_jax.target.model import TargetModel
from train.checkpointing import TrainCheckpointer
from train.data import (BatchIterator, DataState, TokenizerInfo, check_corpus, load_tokenizer,
                        pack_stream, tokenize_split, validation_batches)
from train.distributed import (barrier, gather_to_host, is_primary, local_staging, out_path, publish_files)
from train.loop import (check_finite, check_resume, config_mesh, open_run_log, report_quarantined, restore_or_init,
                        run_steps)
from train.metrics import ProgressBar, read_jsonl
from train.optim import OptimizerConfig, make_optimizer
from train.parallel import TrainProgram, build_train_program
from train.target_config import RESUME_COMPATIBLE_FIELDS, TargetTrainConfig

__all__ = ["TrainResult", "train_target", "make_target_loss", "build_target_program", "export_target",
           "evaluate_domains", "TrainSetupError"]


class TrainSetupError(ValueError):
    """Inputs that cannot be trained on (message says what and how to fix it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What `train_target` did: final step, last logged train loss, last eval losses, the state."""

    out_dir: str
    start_step: int
    final_step: int
    final_loss: float | None
    eval_losses: dict[str, float]
    state: Any  # train.parallel.TrainState (device arrays)
    config: TargetTrainConfig
    exported: bool


def make_target_loss(model: TargetModel) -> Callable:
    """Loss function (train.parallel contract): batch {tokens [B, L+1] int32, mask [B, L] float32}."""

    def loss_fn(params, batch, rng, frozen=None):
        del rng, frozen  # no dropout, no frozen inputs
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, L]
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
        logits = model.apply({"params": params}, inputs, positions).logits  # [B, L, V] float32
        logz = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        mask = batch["mask"].astype(jnp.float32)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return jnp.sum((logz - target_logit) * mask), (jnp.sum(mask), {"accuracy": jnp.sum(correct * mask)})

    return loss_fn


def build_target_program(config: TargetTrainConfig, model_config: TargetConfig, mesh) -> TrainProgram:
    """Jitted init/step/eval of `config` (resolved vocab) on `mesh`."""
    tx, schedule = make_optimizer(OptimizerConfig.from_train_config(config))
    init_model = TargetModel(model_config)
    compute_model = TargetModel(model_config.replace(dtype=config.compute_dtype))

    def init_params(rng, frozen=None):
        dummy = jnp.zeros((1, 1), jnp.int32)
        return init_model.init(rng, dummy, dummy)["params"]

    return build_train_program(mesh=mesh, init_params=init_params, loss_fn=make_target_loss(compute_model),
                               optimizer=tx, schedule=schedule, grad_accum_steps=config.grad_accum_steps,
                               compute_dtype=config.compute_dtype)


def evaluate_domains(program: TrainProgram, params, batches: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, float]:
    """Token-weighted mean validation loss per domain (domains without tokens are left out)."""
    out = {}
    for domain, items in batches.items():
        total, weight = 0.0, 0.0
        for b in items:
            l, w, _ = program.evaluate(params, program.put_batch(b))
            total, weight = total + float(l), weight + float(w)
        if weight > 0:
            out[domain] = total / weight
    return out


def export_target(params, model_config: TargetConfig, out_dir: str, tok: TokenizerInfo, dtype: str) -> None:
    """Write the model in HF layout + tokenizer files into `out_dir` (local or URL; config.json last).

    `params` are host (numpy) arrays. The new files replace the old ones one by one; stale weight
    shards of an earlier export are removed only afterwards, so the old weights survive a crash.
    """
    from dspark_jax.checkpoint.hf import save_target

    check_finite(params, out_dir)
    with local_staging(out_dir) as tmp:
        staging = os.path.join(tmp, "model")
        copy = [os.path.join(tok.directory, n) for n in tok.files]
        save_target(params, model_config, staging, dtype=dtype, overwrite=True, copy_files=copy)
        with open(os.path.join(staging, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": model_config.bos_token_id, "eos_token_id": tok.eos_id,
                       "pad_token_id": tok.pad_id}, f, indent=2)
        publish_files(staging, out_dir, stale=lambda n: n.startswith("model") and
                      n.endswith((".safetensors", ".safetensors.index.json")))


def train_target(config: TargetTrainConfig, *, corpus_dir: str, tokenizer_dir: str, out_dir: str,
                 resume: bool = False, stop_at_step: int | None = None, progress: bool = True,
                 export: bool = True) -> TrainResult:
    """Pretrain a target model on `corpus_dir` with the tokenizer in `tokenizer_dir`; see the module docstring.

    `resume=True` continues from the latest committed checkpoint in `out_dir` (refused if it was
    written with a different config); without it, an `out_dir` holding checkpoints is refused.
    `stop_at_step` ends this invocation early (with a checkpoint) as if interrupted; the
    schedule still spans `config.steps`. The HF export happens only when `config.steps` is reached.
    """
    out_dir = os.fspath(out_path(out_dir))
    manifest = check_corpus(corpus_dir)
    tok = load_tokenizer(tokenizer_dir)
    try:
        config = config.resolve_vocab(tok.vocab_size)
    except ValueError as e:
        raise TrainSetupError(f"{tok.directory}: {e}") from None
    model_config = config.model_config(eos_id=tok.eos_id, pad_id=tok.pad_id)
    mesh = config_mesh(config, TrainSetupError)
    primary = is_primary()
    fingerprint = {"corpus_content_hash": manifest.get("content_hash"), "tokenizer_sha256": tok.sha256}

    ckpt = TrainCheckpointer(os.path.join(out_dir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    bar = ProgressBar(total=config.steps, enabled=False)
    note = (lambda m: bar.write(f"train-target: {m}")) if primary else (lambda m: None)
    report_quarantined(ckpt, "train-target", bar)
    try:
        latest = check_resume(ckpt, resume=resume, out_dir=out_dir, config=config, fingerprint=fingerprint,
                              ignore=RESUME_COMPATIBLE_FIELDS, data_what="corpus / tokenizer", error=TrainSetupError,
                              note=note)
        if latest is None and resume:
            note(f"no committed checkpoint in {ckpt.directory}; starting from step 0")
        if primary:
            config.write_json(os.path.join(out_dir, "train_config.json"))

        cache = os.path.join(out_dir, "cache")
        stream = np.concatenate([tokenize_split(corpus_dir, d, "train", tok, cache_dir=cache) for d in config.domains])
        packed = pack_stream(stream, config.seq_len, tok.pad_id)
        data = BatchIterator(packed, config.batch_size, config.seed)
        micro = config.batch_size // config.grad_accum_steps
        val = validation_batches(corpus_dir, config.domains, tok, seq_len=config.seq_len, batch_size=micro,
                                 max_batches=config.eval_batches, cache_dir=cache)
        program = build_target_program(config, model_config, mesh)
        state, meta = restore_or_init(ckpt, latest, program, lambda: program.init(config.seed), note)
        if meta is not None:
            data.restore(DataState.from_dict(meta["data_state"]))
    except BaseException:
        ckpt.close()
        raise
    start, end, logger, bar = open_run_log(out_dir, state, meta, config=config, stop_at_step=stop_at_step,
                                           desc="train-target", progress=progress)
    if primary:
        bar.write(f"train-target: {len(packed)} sequences x {config.seq_len} tokens "
                  f"({packed.num_target_tokens} targets, {data.batches_per_epoch} steps/epoch), vocab "
                  f"{config.vocab_size}, mesh {dict(mesh.shape)} over {jax.process_count()} process(es), "
                  f"steps {start}->{end} of {config.steps}")

    def meta_now(step: int) -> dict:
        return {"step": step, "config": config.to_dict(), "data_state": data.state.to_dict(),
                "fingerprint": fingerprint}

    last_loss, eval_losses = None, {}

    def on_log(s: int, metrics, rate) -> None:
        nonlocal last_loss
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last_loss = m["loss"]
        tps = rate.rate()
        logger.log({"step": s, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                    "accuracy": m["accuracy"], "tokens": m["weight"], "tokens_per_s": tps, "epoch": data.state.epoch})
        bar.update(0, loss=m["loss"], lr=m["lr"], tok_s=round(tps))

    def on_eval(s: int, state) -> None:
        nonlocal eval_losses
        eval_losses = evaluate_domains(program, state.params, val)
        logger.log({"step": s, "eval": eval_losses})
        if primary:
            bar.write(f"step {s}: eval loss " + ", ".join(f"{d} {v:.4f}" for d, v in eval_losses.items()))

    state = run_steps(state, config=config, start=start, end=end,
                      step=lambda st: program.step(st, program.put_batch(next(data))), on_log=on_log,
                      on_eval=on_eval, meta=meta_now, ckpt=ckpt, bar=bar, logger=logger)
    exported = False
    if export and end == config.steps:
        host_params = gather_to_host(state.params)  # collective: FSDP shards may live on other hosts
        if primary:
            export_target(host_params, model_config, out_dir, tok, config.export_dtype)
            bar.write(f"train-target: exported {config.export_dtype} model to {out_dir}")
        exported = True
        barrier("train-target-export")
    if last_loss is None:
        last = [r for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "loss" in r]
        last_loss = last[-1]["loss"] if last else None
    return TrainResult(out_dir=out_dir, start_step=start, final_step=end, final_loss=last_loss,
                       eval_losses=eval_losses, state=state, config=config, exported=exported)
