"""Speculative-decoding metrics (DSpark spec §5.6), accumulated on device inside the loop.

Per round r of a row: proposal length n_r, accepted a_r, tau_r = a_r + 1 (bonus counted) except
a stop-terminated round, which records tau_r = a_r. Aggregates are round-weighted over all rows:
  acceptance_length (tau) = sum tau_r / rounds
  verify_rate             = sum tau_r / (sum n_r + rounds)
  accept_rate@k           = #rounds with a_r >= k+1 / #rounds with n_r >= k+1   (unconditional)
  conditional_accept@k    = #rounds with a_r >= k+1 / #rounds with a_r >= k and n_r >= k+1
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["RoundStats", "RoundRecords", "summarize_stats"]

Array = jax.Array


@flax.struct.dataclass
class RoundStats:
    """Per-row running counters. All int32 except where noted."""

    rounds: Array  # [B]
    tau_sum: Array  # [B]
    proposed_sum: Array  # [B]
    accepted_sum: Array  # [B]
    proposed_ge: Array  # [B, K] rounds with n_r >= k+1
    accepted_ge: Array  # [B, K] rounds with a_r >= k+1
    cond_den: Array  # [B, K] rounds with a_r >= k and n_r >= k+1

    @classmethod
    def zeros(cls, batch: int, block: int) -> "RoundStats":
        """Empty counters for `batch` rows and block size `block`."""
        z = jnp.zeros((batch,), jnp.int32)
        zk = jnp.zeros((batch, block), jnp.int32)
        return cls(rounds=z, tau_sum=z, proposed_sum=z, accepted_sum=z, proposed_ge=zk, accepted_ge=zk, cond_den=zk)

    def update(self, active: Array, proposed: Array, accepted: Array, terminated: Array) -> "RoundStats":
        """Add one round for rows where `active` [B] is true."""
        k = self.proposed_ge.shape[1]
        slot = jnp.arange(k)[None, :]
        act = active.astype(jnp.int32)
        tau = accepted + jnp.where(terminated, 0, 1)
        prop_ge = (proposed[:, None] >= slot + 1).astype(jnp.int32)
        return RoundStats(
            rounds=self.rounds + act,
            tau_sum=self.tau_sum + act * tau,
            proposed_sum=self.proposed_sum + act * proposed,
            accepted_sum=self.accepted_sum + act * accepted,
            proposed_ge=self.proposed_ge + act[:, None] * prop_ge,
            accepted_ge=self.accepted_ge + act[:, None] * (accepted[:, None] >= slot + 1).astype(jnp.int32),
            cond_den=self.cond_den + act[:, None] * prop_ge * (accepted[:, None] >= slot).astype(jnp.int32),
        )


@flax.struct.dataclass
class RoundRecords:
    """Optional per-round records (for calibration): [B, R, ...] with R = max rounds per row."""

    conf_logits: Array  # [B, R, K] float32 raw confidence logits
    prefix_accepted: Array  # [B, R, K] bool rejection-test prefix labels
    proposed: Array  # [B, R] int32 (-1 = no round)
    accepted: Array  # [B, R] int32

    @classmethod
    def empty(cls, batch: int, max_rounds: int, block: int) -> "RoundRecords":
        """Buffers for `max_rounds` rounds per row."""
        return cls(conf_logits=jnp.zeros((batch, max_rounds, block), jnp.float32),
                   prefix_accepted=jnp.zeros((batch, max_rounds, block), bool),
                   proposed=jnp.full((batch, max_rounds), -1, jnp.int32),
                   accepted=jnp.zeros((batch, max_rounds), jnp.int32))

    def write(self, round_idx: Array, active: Array, conf_logits: Array, prefix: Array, proposed: Array,
              accepted: Array) -> "RoundRecords":
        """Store round `round_idx` [B] of each active row."""
        rows = jnp.arange(active.shape[0])
        r = jnp.minimum(round_idx, self.proposed.shape[1] - 1)

        def put(buf, val):
            return buf.at[rows, r].set(jnp.where(active.reshape((-1,) + (1,) * (val.ndim - 1)), val, buf[rows, r]))

        return RoundRecords(conf_logits=put(self.conf_logits, conf_logits),
                            prefix_accepted=put(self.prefix_accepted, prefix),
                            proposed=put(self.proposed, proposed), accepted=put(self.accepted, accepted))


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [float(n / d) if d > 0 else None for n, d in zip(num, den)]


def summarize_stats(stats: RoundStats) -> dict[str, Any]:
    """Host-side aggregate metrics (round-weighted over all rows) plus per-row counts."""
    s = jax.tree_util.tree_map(np.asarray, stats)
    rounds = int(s.rounds.sum())
    tau = int(s.tau_sum.sum())
    proposed = int(s.proposed_sum.sum())
    return {
        "rounds": rounds,
        "acceptance_length": tau / rounds if rounds else None,
        "draft_tokens_per_proposal": proposed / rounds if rounds else None,
        "verify_rate": tau / (proposed + rounds) if rounds else None,
        "accept_rate": _ratio(s.accepted_ge.sum(0), s.proposed_ge.sum(0)),
        "conditional_accept_rate": _ratio(s.accepted_ge.sum(0), s.cond_den.sum(0)),
        "drafted_per_row": s.proposed_sum.tolist(),
        "accepted_per_row": s.accepted_sum.tolist(),
        "rounds_per_row": s.rounds.tolist(),
    }
