"""`TargetTrainConfig`: every knob of target pretraining in one frozen dataclass.

Loaded from a JSON file and/or command-line flags (flags win); the *resolved* config (vocabulary
size filled in from the tokenizer) is written next to the checkpoints as `train_config.json`
and stored in every checkpoint, so a resume with different settings is refused with the names of
the differing fields (see `train.checkpointing.config_differences`). Defaults are sized for a 2-core CPU.
Loading, serialisation and the checks shared with `DraftTrainConfig` live in `train.config_io`.
"""

from __future__ import annotations

import dataclasses

from dspark_jax.config import TargetConfig
from train.config_io import BOOKKEEPING_FIELDS, IntervalFields, MeshFields, OptimizerFields, TrainConfigBase

__all__ = ["TargetTrainConfig", "ConfigFileError", "RESUME_COMPATIBLE_FIELDS"]

# Fields that may change between a run and its resume: they do not affect the math of a step
# (bookkeeping, or the device layout, which orbax reshards on restore).
RESUME_COMPATIBLE_FIELDS: frozenset[str] = BOOKKEEPING_FIELDS


class ConfigFileError(ValueError):
    """An unreadable config file, an unknown key, or a value of the wrong type (message names it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetTrainConfig(TrainConfigBase, OptimizerFields, MeshFields, IntervalFields):
    """Target pretraining settings (model shape, optimisation, mesh, intervals).

    `vocab_size=None` means "exactly the tokenizer's vocabulary"; `resolve_vocab` fills it in.
    `batch_size` is the global number of sequences per optimizer step; with
    `grad_accum_steps=k` each step runs k micro-batches of `batch_size // k` sequences.
    `compute_dtype='bfloat16'` runs the forward/backward in bf16 on float32 master weights.
    Learning rate: linear warmup over `int(warmup_fraction * steps)` steps, then cosine to 0.
    """

    # ---- model shape (Qwen3 family)
    family: str = "qwen3"
    vocab_size: int | None = None
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # ---- data
    seq_len: int = 256
    domains: tuple[str, ...] = ("code", "prose")
    # ---- optimisation: OptimizerFields (defaults kept), plus gradient accumulation
    grad_accum_steps: int = 1
    # ---- device mesh: MeshFields; intervals / output: IntervalFields (defaults kept)

    config_error = ConfigFileError  # not a field (no annotation)

    def __post_init__(self):
        if isinstance(self.domains, list):
            object.__setattr__(self, "domains", tuple(self.domains))
        self._check_positive(("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "max_position_embeddings", "seq_len",
                              "grad_accum_steps"))
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive integer or null, got {self.vocab_size!r}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len {self.seq_len} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum_steps "
                             f"{self.grad_accum_steps}")
        micro = self.batch_size // self.grad_accum_steps
        if micro % (self.mesh_data * self.mesh_fsdp):
            raise ValueError(f"micro-batch size {micro} (batch_size / grad_accum_steps) is not divisible by "
                             f"mesh_data x mesh_fsdp = {self.mesh_data * self.mesh_fsdp}")
        self._check_common(("compute_dtype", "export_dtype"))
        self.model_config()  # family / head / GQA checks live in TargetConfig

    # ------------------------------------------------------------------ derived
    def model_config(self, *, eos_id: int | None = None, pad_id: int | None = None) -> TargetConfig:
        """The float32 `TargetConfig` of the model being trained (needs a resolved vocab for real use)."""
        return TargetConfig(
            family=self.family, vocab_size=self.vocab_size or 1, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, initializer_range=self.initializer_range,
            bos_token_id=eos_id, eos_token_ids=(eos_id,) if eos_id is not None else (),
            pad_token_id=pad_id, dtype="float32")

    def resolve_vocab(self, tokenizer_vocab: int) -> "TargetTrainConfig":
        """Fill in `vocab_size` from the tokenizer; error if an explicit one is too small."""
        if self.vocab_size is None:
            return dataclasses.replace(self, vocab_size=int(tokenizer_vocab))
        if self.vocab_size < tokenizer_vocab:
            raise ValueError(f"tokenizer has {tokenizer_vocab} tokens but the model vocab_size is "
                             f"{self.vocab_size}; raise vocab_size (or leave it unset to use the tokenizer's)")
        return self
