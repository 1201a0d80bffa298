"""DSpark / DFlash drafter: config, model, sequential + confidence heads, draft KV cache.

API summary (B batch, K block_size, C new context rows, S cache / context length, N anchor blocks,
d hidden, V vocab, r markov_rank; all logits/head math float32):

Config (`config.py`)
    DraftConfig(...)                          frozen kw_only dataclass; raises DraftConfigError
    DraftConfig.from_target(target_cfg, mask_token_id=..., **fields)
    DraftConfig.from_deepspec_config(dict) / .to_deepspec_config() -> dict      (spec §6)
    cfg.validate_against_target(target_cfg);  cfg.rope_inv_freq();  cfg.layer_config() -> TargetConfig

Model (`model.py`) — call as `DraftModel(cfg).apply({'params': p}, ..., method=DraftModel.<name>)`
    project_context(taps_concat [B,C,n_ctx*d]) -> H_ctx [B,C,d]        (hidden_norm(fc(.)))
    block_forward(block_tokens [B,K], block_positions [B,K], cache: DraftCache,
                  new_ctx [B,C,d], new_ctx_positions [B,C], new_ctx_valid [B,C] bool)
        -> (h [B,K,d], U [B,K,V] f32, new_cache)     valid context rows committed; block never cached
    train_forward(ctx_feats [B,S,n_ctx*d], block_tokens [B,N,K], anchor_positions [B,N],
                  block_keep [B,N]=None, ctx_positions [B,S]=None, *, ctx_projected=False,
                  dense_reference=False) -> h [B,N,K,d]
    compute_logits(h [...,d]) -> U [...,V] f32
    markov_bias(prev_ids [...,K], h [...,K,d]) -> [...,K,V] f32        (teacher forced)
    markov_step(prev_ids [B], h_k [B,d], state [B,r]) -> (bias [B,V] f32, new_state [B,r])
    confidence_logits(h [...,d], prev_ids [...]) -> [...] f32 logits   (features [h ; W1[prev]])
    init_draft_params(cfg, rng) -> params;  trainable_mask(params);  make_block_tokens(anchor, K, M)

Heads as pure functions (`heads.py`), params = params['markov_head'] / params['confidence_head']
    init_state(batch_shape, r) -> zeros [*batch_shape, r]
    markov_step(markov_params, head_type, prev_ids, h_k, state) -> (bias, new_state)
    teacher_forced_bias(markov_params, head_type, prev_ids [...,K], h [...,K,d]) -> [...,K,V]
    confidence_logits(conf_params, h, prev_ids=None, markov_params=None) -> [...]

Cache (`cache.py`)
    DraftCache.create(cfg, batch_size, max_length) ; .lengths [B] ; .with_lengths(lengths)

Checkpoints: `dspark_jax.checkpoint.deepspec` (load_draft, save_draft, draft_params_from_target).

Sampling loop sketch (per round): H = project_context(taps of pending rows); h, U, cache =
block_forward(...); state = init_state((B,), r); prev = anchor; for k in range(K):
bias, state = markov_step(prev, h[:, k], state); Z_k = U[:, k] + bias; x_k ~ softmax(Z_k / T);
conf_k = confidence_logits(h[:, k], prev); prev = x_k.
"""

from dspark_jax.draft import heads
from dspark_jax.draft.cache import DraftCache, commit_indices
from dspark_jax.draft.config import HEAD_TYPES, DraftConfig, DraftConfigError, default_target_layer_ids
from dspark_jax.draft.model import (DraftModel, block_attention, dense_training_mask, init_draft_params,
                                    make_block_tokens, trainable_mask)

__all__ = [
    "HEAD_TYPES", "DraftCache", "DraftConfig", "DraftConfigError", "DraftModel", "block_attention",
    "commit_indices", "default_target_layer_ids", "dense_training_mask", "heads", "init_draft_params",
    "make_block_tokens", "trainable_mask",
]
