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
with different values of any field outside `RESUME_COMPATIBLE_FIELDS` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from dspark_jax.draft.config import HEAD_TYPES

__all__ = ["DraftTrainConfig", "DraftConfigFileError", "PRESETS", "RESUME_COMPATIBLE_FIELDS"]

# Bookkeeping / layout fields that may change on resume (they do not change the math of a step).
RESUME_COMPATIBLE_FIELDS: frozenset[str] = frozenset({
    "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "export_dtype",
    "mesh_data", "mesh_fsdp", "mesh_model", "loss_chunk_anchors",
})

PRESETS: dict[str, dict[str, Any]] = {
    "dspark": dict(markov_rank=64, enable_confidence_head=True, confidence_head_with_markov=True,
                   ce_loss_alpha=0.1, l1_loss_alpha=0.9, confidence_head_alpha=1.0),
    "dflash": dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False,
                   ce_loss_alpha=1.0, l1_loss_alpha=0.0, confidence_head_alpha=0.0),
}

_DTYPES = ("float32", "bfloat16")


class DraftConfigFileError(ValueError):
    """An unreadable config file, an unknown key, or an invalid value (message names it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftTrainConfig:
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
    # ---- optimisation (spec §4.5 conventions)
    steps: int = 500
    batch_size: int = 8
    learning_rate: float = 2e-3
    warmup_fraction: float = 0.04
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    compute_dtype: str = "float32"
    seed: int = 42
    # ---- device mesh (product = number of devices): target over `model`, batch over data x fsdp
    mesh_data: int = 1
    mesh_fsdp: int = 1
    mesh_model: int = 1
    # ---- intervals / output
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    ckpt_every: int = 250
    keep_checkpoints: int = 3
    export_dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("domains", "target_layer_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        positive = ("num_draft_layers", "block_size", "num_context_layers", "num_anchors", "loss_chunk_anchors",
                    "seq_len", "steps", "batch_size", "mesh_data", "mesh_fsdp", "mesh_model", "log_every",
                    "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
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
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        for name in ("compute_dtype", "export_dtype", "feature_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be a non-empty list without repeats, got {list(self.domains)}")

    # ------------------------------------------------------------------ derived
    @property
    def num_devices(self) -> int:
        """Devices the mesh needs."""
        return self.mesh_data * self.mesh_fsdp * self.mesh_model

    @property
    def alphas(self) -> tuple[float, float, float]:
        """(ce, l1, confidence) loss weights."""
        return (self.ce_loss_alpha, self.l1_loss_alpha, self.confidence_head_alpha)

    @property
    def tokens_per_step(self) -> int:
        """Sequence tokens per optimizer step (batch_size x seq_len)."""
        return self.batch_size * self.seq_len

    def draft_fields(self) -> dict[str, Any]:
        """Keyword arguments for `DraftConfig.from_target` (target_layer_ids / mask id resolved by the trainer)."""
        return dict(num_hidden_layers=self.num_draft_layers, block_size=self.block_size,
                    markov_rank=self.markov_rank, markov_head_type=self.markov_head_type,
                    enable_confidence_head=self.enable_confidence_head,
                    confidence_head_with_markov=self.confidence_head_with_markov and self.enable_confidence_head,
                    num_anchors=self.num_anchors, dtype="float32")

    def replace(self, **changes: Any) -> "DraftTrainConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DraftTrainConfig":
        """Defaults <- PRESETS[name] <- overrides."""
        if name not in PRESETS:
            raise DraftConfigFileError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["domains"] = list(self.domains)
        d["target_layer_ids"] = None if self.target_layer_ids is None else list(self.target_layer_ids)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "DraftTrainConfig":
        """Build from a dict; unknown keys / invalid values raise DraftConfigFileError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DraftConfigFileError(f"{source}: unknown field(s) {unknown}; known: {sorted(names)}")
        kw = dict(data)
        for f in dataclasses.fields(cls):
            v = kw.get(f.name)
            if isinstance(f.default, float) and isinstance(v, int) and not isinstance(v, bool):
                kw[f.name] = float(v)  # JSON `1` for a float field
            if isinstance(v, list):
                kw[f.name] = tuple(v)
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise DraftConfigFileError(f"{source}: {e}") from e

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, *, base: Mapping[str, Any] | None = None,
                       **overrides: Any) -> "DraftTrainConfig":
        """`base` (e.g. a preset) <- JSON object at `path` <- `overrides` (command-line flags)."""
        p = os.fspath(path)
        try:
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DraftConfigFileError(f"config file not found: {p}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise DraftConfigFileError(f"{p}: cannot read JSON config ({e})") from e
        if not isinstance(data, dict):
            raise DraftConfigFileError(f"{p}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict({**dict(base or {}), **data, **overrides}, source=p)

    def write_json(self, path: str | os.PathLike) -> None:
        """Write the config as pretty JSON (temp file then rename)."""
        p = os.fspath(path)
        tmp = f"{p}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, p)
