"""Optimizer factory shared by the target and draft trainers (project conventions, spec §4.5).

AdamW on float32 master weights, global-norm gradient clipping, and the DSpark schedule: linear
warmup for `W = int(warmup_fraction * T)` steps with `lr = (t + 1) / W * peak` at 0-based step t,
then cosine annealing from `peak` to 0 over the remaining `T - W` steps. Gradient accumulation
and bf16 compute are handled by the step builder in `train.parallel` (an accumulation loop inside
the jitted step), so the optimizer always sees one full-batch gradient per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["OptimizerConfig", "warmup_cosine_schedule", "make_optimizer", "cast_floating"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW + schedule + clipping settings. `grad_clip=0` disables clipping."""

    learning_rate: float
    total_steps: int
    warmup_fraction: float = 0.04
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    @classmethod
    def from_train_config(cls, config: Any) -> "OptimizerConfig":
        """The optimizer of a `TargetTrainConfig` / `DraftTrainConfig` (schedule spans `config.steps`)."""
        return cls(learning_rate=config.learning_rate, total_steps=config.steps,
                   warmup_fraction=config.warmup_fraction, b1=config.adam_b1, b2=config.adam_b2,
                   eps=config.adam_eps, weight_decay=config.weight_decay, grad_clip=config.grad_clip)

    @property
    def warmup_steps(self) -> int:
        """`int(warmup_fraction * total_steps)`."""
        return int(self.warmup_fraction * self.total_steps)


def warmup_cosine_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """lr(t) = (t+1)/W * peak for t < W, then peak * (1 + cos(pi * (t - W) / (T - W))) / 2 (0 at t >= T)."""
    peak, total, warm = float(peak), int(total_steps), int(warmup_steps)
    decay = max(total - warm, 1)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm_lr = peak * (t + 1.0) / max(warm, 1)
        progress = jnp.clip((t - warm) / decay, 0.0, 1.0)
        cos_lr = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(t < warm, warm_lr, cos_lr)

    return schedule


def make_optimizer(cfg: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, its learning-rate schedule): clip_by_global_norm -> AdamW."""
    schedule = warmup_cosine_schedule(cfg.learning_rate, cfg.total_steps, cfg.warmup_steps)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*parts), schedule


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating leaf of `tree` to `dtype` (integers untouched); identity for float32 -> float32."""
    dtype = jnp.dtype(dtype)

    def one(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map(one, tree)
