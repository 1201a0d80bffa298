"""`DraftTrainConfig`: every knob of DSpark / DFlash draft training (`dspark train-draft`) in one place.

Presets (`PRESETS`, `DraftTrainConfig.preset(name, **overrides)`):
  * `dspark` (defaults): vanilla Markov head, confidence head with the Markov embedding, loss
    alphas CE 0.1 / L1 0.9 / confidence 1.0 (spec §1.7);
  * `dflash`: `markov_rank=0`, no confidence head, CE only (1.0 / 0 / 0) (spec §9.1).
Both use `loss_decay_gamma=4.0` (code convention, spec §4.3) and K = `block_size` = 7.

Optimisation follows spec §4.5 (AdamW β=(0.9, 0.999), ε=1e-8, no weight decay, linear warmup over
`int(0.04·T)` steps then cosine to 0, global-norm clip 1.0, float32 master weights, seed 42) with
scaled-down sizes for a 2-core CPU: `num_draft_layers=2` (released: 5), `markov_rank=64` (256),
`num_anchors=32` for `seq_len=256` (512 for 4096: the same 1/8 density), `batch_size=8` (512),
`learning_rate=2e-3` (6e-4), `steps=500`. The resolved config is stored in every checkpoint; a resume
with different values of any field outside `RESUME_COMPATIBLE_FIELDS` is refused. Loading,
serialisation and the checks shared with `TargetTrainConfig` live in `train.config_io`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dspark_jax.draft.config import HEAD_TYPES
from train.config_io import BOOKKEEPING_FIELDS, IntervalFields, MeshFields, OptimizerFields, TrainConfigBase

__all__ = ["DraftTrainConfig", "DraftConfigFileError", "PRESETS", "RESUME_COMPATIBLE_FIELDS"]

# Bookkeeping / layout fields that may change on resume (they do not change the math of a step).
RESUME_COMPATIBLE_FIELDS: frozenset[str] = BOOKKEEPING_FIELDS | {"loss_chunk_anchors"}

PRESETS: dict[str, dict[str, Any]] = {
    "dspark": dict(markov_rank=64, enable_confidence_head=True, confidence_head_with_markov=True,
                   ce_loss_alpha=0.1, l1_loss_alpha=0.9, confidence_head_alpha=1.0),
    "dflash": dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False,
                   ce_loss_alpha=1.0, l1_loss_alpha=0.0, confidence_head_alpha=0.0),
    # Eagle-3 (spec §9.2; trained by train/eagle3_trainer.py): 1 layer, TTT length = block_size, seed 0
    "eagle3": dict(num_draft_layers=1, markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False,
                   ce_loss_alpha=1.0, l1_loss_alpha=0.0, confidence_head_alpha=0.0, seed=0),
}


class DraftConfigFileError(ValueError):
    """An unreadable config file, an unknown key, or an invalid value (message names it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftTrainConfig(TrainConfigBase, OptimizerFields, MeshFields, IntervalFields):
    """Draft-training settings: draft shape, losses, data, optimisation, mesh, intervals.

    `target_layer_ids=None` -> `default_target_layer_ids(L_t, min(num_context_layers, L_t - 1))`
    (evenly spaced, never the last target layer); `mask_token_id=None` -> the tokenizer's
    `<|mask|>` id. `batch_size` is the global number of sequences per optimizer step (sharded
    over mesh_data x mesh_fsdp). `compute_dtype` is the draft/target forward dtype (master weights
    float32, loss math float32); target features are rounded to `feature_dtype` (bf16 = the
    reference cache's precision). `loss_chunk_anchors` bounds the [B, c, K, V] logits held at once.
    """

    # ---- draft shape
    num_draft_layers: int = 2
    block_size: int = 7
    markov_rank: int = 64
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    target_layer_ids: tuple[int, ...] | None = None
    num_context_layers: int = 5
    mask_token_id: int | None = None
    # ---- losses (spec §4.3)
    ce_loss_alpha: float = 0.1
    l1_loss_alpha: float = 0.9
    confidence_head_alpha: float = 1.0
    loss_decay_gamma: float = 4.0
    num_anchors: int = 32
    loss_chunk_anchors: int = 16
    # ---- data
    seq_len: int = 256
    domains: tuple[str, ...] = ("code", "prose")
    feature_dtype: str = "bfloat16"
    # ---- optimisation: OptimizerFields (spec §4.5 conventions), draft-sized defaults
    steps: int = 500
    batch_size: int = 8
    learning_rate: float = 2e-3
    seed: int = 42
    # ---- device mesh: MeshFields (target over `model`, batch over data x fsdp)
    # ---- intervals / output: IntervalFields, draft-sized defaults
    eval_every: int = 100
    ckpt_every: int = 250

    config_error = DraftConfigFileError  # not a field (no annotation)

    def __post_init__(self):
        for name in ("domains", "target_layer_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._check_positive(("num_draft_layers", "block_size", "num_context_layers", "num_anchors",
                              "loss_chunk_anchors", "seq_len"))
        if isinstance(self.markov_rank, bool) or not isinstance(self.markov_rank, int) or self.markov_rank < 0:
            raise ValueError(f"markov_rank must be a non-negative integer, got {self.markov_rank!r}")
        if self.markov_head_type not in HEAD_TYPES:
            raise ValueError(f"markov_head_type must be one of {list(HEAD_TYPES)}, got {self.markov_head_type!r}")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            raise ValueError("confidence_head_with_markov needs a Markov head (markov_rank > 0)")
        if self.confidence_head_alpha > 0 and not self.enable_confidence_head:
            raise ValueError(f"confidence_head_alpha={self.confidence_head_alpha} needs enable_confidence_head")
        for name in ("ce_loss_alpha", "l1_loss_alpha", "confidence_head_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ce_loss_alpha + self.l1_loss_alpha + self.confidence_head_alpha <= 0:
            raise ValueError("at least one of ce_loss_alpha / l1_loss_alpha / confidence_head_alpha must be > 0")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (an anchor needs a next token), got {self.seq_len}")
        if self.batch_size % (self.mesh_data * self.mesh_fsdp):
            raise ValueError(f"batch_size {self.batch_size} is not divisible by mesh_data x mesh_fsdp = "
                             f"{self.mesh_data * self.mesh_fsdp}")
        self._check_common(("compute_dtype", "export_dtype", "feature_dtype"))

    # ------------------------------------------------------------------ derived
    @property
    def alphas(self) -> tuple[float, float, float]:
        """(ce, l1, confidence) loss weights."""
        return (self.ce_loss_alpha, self.l1_loss_alpha, self.confidence_head_alpha)

    def draft_fields(self) -> dict[str, Any]:
        """Keyword arguments for `DraftConfig.from_target` (target_layer_ids / mask id resolved by the trainer)."""
        return dict(num_hidden_layers=self.num_draft_layers, block_size=self.block_size,
                    markov_rank=self.markov_rank, markov_head_type=self.markov_head_type,
                    enable_confidence_head=self.enable_confidence_head,
                    confidence_head_with_markov=self.confidence_head_with_markov and self.enable_confidence_head,
                    num_anchors=self.num_anchors, dtype="float32")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DraftTrainConfig":
        """Defaults <- PRESETS[name] <- overrides."""
        if name not in PRESETS:
            raise DraftConfigFileError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")
