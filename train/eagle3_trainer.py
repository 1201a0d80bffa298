"""Eagle-3 draft training (`dspark train-draft --preset eagle3`, spec §9.2): TTT soft cross-entropy.

Per step: the frozen target runs on a batch of packed sequences (taps of `target_layer_ids` and
full-vocabulary logits, computed online), then `ttt_loss` unrolls `block_size` (= TTT length, 7)
steps with the step-causal-plus-diagonal mask and step-offset RoPE, soft CE against the target
distribution weighted 0.8^s. Embedding and LM head are frozen copies of the target's
(`optax.set_to_zero`). The step is `train.parallel.build_train_program` (the DSpark trainer's:
same optimiser, (data, fsdp, model) mesh from `--mesh`, frozen target weights as the `frozen`
input sharded by the target's rules). Output: `out/draft` (Eagle-3 checkpoint; `load_draft_bundle`
/ `dspark generate --draft` / `dspark eval` read it) and `out/metrics.json`. Not supported here:
resume and feature caches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dspark_jax.checkpoint.eagle3 import save_eagle3
from dspark_jax.checkpoint.hf import load_target
from dspark_jax.config import load_hf_config
from dspark_jax.draft.config import default_target_layer_ids
from dspark_jax.draft.eagle3 import Eagle3Config, Eagle3Model, eagle3_trainable_mask, ttt_loss
from dspark_jax.sharding import target_param_shardings
from dspark_jax.target.model import TargetModel, output_kernel
from train.data import BatchIterator, check_corpus, load_tokenizer, pack_stream, tokenize_split, validation_batches
from train.draft_config import DraftTrainConfig
from train.loop import config_mesh
from train.optim import OptimizerConfig, make_optimizer
from train.parallel import TrainProgram, build_train_program

__all__ = ["Eagle3TrainResult", "train_eagle3", "eagle3_draft_config", "build_eagle3_program"]


@dataclasses.dataclass(frozen=True)
class Eagle3TrainResult:
    """Outcome of `train_eagle3` (same summary fields as the DSpark trainer's result)."""

    config: DraftTrainConfig
    out_dir: str
    export_dir: str | None
    final_step: int
    first_loss: float
    final_loss: float
    eval_metrics: dict[str, dict[str, float]]


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


def build_eagle3_program(config: DraftTrainConfig, dcfg: Eagle3Config, tcfg, mesh) -> TrainProgram:
    """The jitted init / step / evaluate of an Eagle-3 run (`train.parallel.build_train_program`).

    frozen = the target's params. The TTT loss is already a mean (weight 1 per batch); aux: acc0
    (step-0 top-1 agreement with the target).
    """
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


def train_eagle3(config: DraftTrainConfig, *, target_dir: str, corpus_dir: str, out_dir: str,
                 tokenizer_dir: str | None = None, resume: bool = False, stop_at_step: int | None = None,
                 progress: bool = True, export: bool = True, feature_cache: str | None = None,
                 write_feature_cache: bool = False) -> Eagle3TrainResult:
    """Train an Eagle-3 draft for the target in `target_dir` on `corpus_dir` (see the module docstring)."""
    from train.draft_trainer import DraftSetupError

    if resume or feature_cache or write_feature_cache:
        raise DraftSetupError("--preset eagle3 does not support --resume or --feature-cache")
    mesh = config_mesh(config, DraftSetupError)
    out_dir = os.path.abspath(out_dir)
    check_corpus(corpus_dir)
    tcfg = load_hf_config(target_dir, dtype=config.compute_dtype)
    _, tparams = load_target(target_dir, dtype=config.compute_dtype, shardings=target_param_shardings(tcfg, mesh))
    tok = load_tokenizer(tokenizer_dir or target_dir)
    dcfg = eagle3_draft_config(config, tcfg)
    cache_dir = os.path.join(out_dir, "token_cache")
    stream = np.concatenate([tokenize_split(corpus_dir, d, "train", tok, cache_dir=cache_dir) for d in config.domains])
    batches = BatchIterator(pack_stream(stream, config.seq_len, tok.pad_id), config.batch_size, config.seed)
    val = validation_batches(corpus_dir, config.domains, tok, seq_len=config.seq_len, batch_size=config.batch_size,
                             max_batches=config.eval_batches, cache_dir=cache_dir)

    program = build_eagle3_program(config, dcfg, tcfg, mesh)
    state = program.init(config.seed, tparams)
    end = config.steps if stop_at_step is None else min(config.steps, stop_at_step)
    first = last = float("nan")
    log: list[dict[str, Any]] = []
    t0 = time.time()
    for step in range(end):
        state, metrics = program.step(state, program.put_batch(_batch_arrays(next(batches))), tparams)
        last = float(metrics["loss"])
        first = last if step == 0 else first
        if (step + 1) % config.log_every == 0 or step + 1 == end:
            row = {"step": step + 1, "loss": last, "acc0": float(metrics["acc0"]), "s": round(time.time() - t0, 1)}
            log.append(row)
            if progress:
                print(json.dumps(row), flush=True)
    eval_metrics: dict[str, dict[str, float]] = {}
    for domain, vbatches in val.items():
        if vbatches:
            outs = [program.evaluate(state.params, program.put_batch(_batch_arrays(b)), tparams) for b in vbatches]
            eval_metrics[domain] = {"loss": float(np.mean([float(o[0] / o[1]) for o in outs])),
                                    "acc0": float(np.mean([float(o[2]["acc0"] / o[1]) for o in outs]))}
    os.makedirs(out_dir, exist_ok=True)
    export_dir = (save_eagle3(state.params, dcfg, os.path.join(out_dir, "draft"), dtype=config.export_dtype)
                  if export else None)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(config), "log": log, "eval": eval_metrics}, f, indent=2, default=str)
    return Eagle3TrainResult(config=config, out_dir=out_dir, export_dir=export_dir, final_step=end,
                             first_loss=first, final_loss=last, eval_metrics=eval_metrics)
