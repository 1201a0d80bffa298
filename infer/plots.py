"""Matplotlib (Agg) figures for calibration and threshold sweeps (paper Fig. 5 and Fig. 6 style).

    reliability_diagrams(before, after, "reliability.png", positions=(1, 3, 5, 7))
    threshold_sweep_plot({"raw": sweep_raw, "calibrated": sweep_sts}, "threshold_sweep.png")

`before` / `after` are `dspark_jax.calibration.position_metrics` outputs (with reliability tables);
sweeps are `dspark_jax.calibration.threshold_sweep` outputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["default_positions", "reliability_diagrams", "threshold_sweep_plot"]


def default_positions(block_size: int) -> tuple[int, ...]:
    """1-based positions to plot: 1, 3, 5, 7 (paper Fig. 6) when K >= 7, else all (at most 8)."""
    if block_size >= 7:
        return (1, 3, 5, 7)
    return tuple(range(1, min(block_size, 8) + 1))


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def reliability_diagrams(before: Mapping[str, Any], after: Mapping[str, Any] | None, path: str | os.PathLike, *,
                         positions: Sequence[int] | None = None, title: str = "") -> str:
    """One panel per position: observed survival rate vs mean predicted survival per bin, raw and STS.

    Bars show the label mean per non-empty bin; the diagonal is perfect calibration; the legend
    carries ECE (and the position's AUC). Returns the path written.
    """
    slots = {p["position"]: p for p in before["positions"]}
    slots_after = {p["position"]: p for p in after["positions"]} if after else {}
    positions = tuple(positions or default_positions(len(slots)))
    positions = tuple(p for p in positions if p in slots)
    n = max(len(positions), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.4), squeeze=False)
    for ax, pos in zip(axes[0], positions):
        ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--")
        series = [("raw", slots[pos], "tab:red")]
        if pos in slots_after:
            series.append(("STS", slots_after[pos], "tab:blue"))
        width = 1.0 / len(slots[pos]["reliability"]) / len(series)
        for j, (label, s, color) in enumerate(series):
            rows = [r for r in s["reliability"] if r["count"] > 0]
            xs = [r["lo"] + j * width for r in rows]
            ax.bar(xs, [r["label_mean"] for r in rows], width=width, align="edge", color=color, alpha=0.55,
                   label=f"{label}: ECE {_fmt(s['ece'])}")
            ax.plot([r["pred_mean"] for r in rows], [r["label_mean"] for r in rows], "o", ms=2.5, color=color)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"Position {pos} (AUC {_fmt(slots[pos]['auc'], pct=False)}, n={slots[pos]['count']})",
                     fontsize=9)
        ax.set_xlabel("predicted survival")
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("observed acceptance")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


def threshold_sweep_plot(sweeps: Mapping[str, Sequence[Mapping[str, float]]], path: str | os.PathLike, *,
                         title: str = "") -> str:
    """Per sweep (e.g. raw / calibrated confidences) one panel: stacked bars of verified tokens per step
    (accepted incl. bonus / rejected) and the acceptance rate (right axis) vs the static threshold."""
    names = list(sweeps)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5.0 * max(len(names), 1), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = list(sweeps[name])
        th = [r["threshold"] for r in rows]
        acc = [r["accepted_per_step"] for r in rows]
        rej = [r["rejected_per_step"] for r in rows]
        width = 0.8 * (min(b - a for a, b in zip(th, th[1:])) if len(th) > 1 else 0.1)
        ax.bar(th, acc, width=width, color="tab:green", label="accepted")
        ax.bar(th, rej, width=width, bottom=acc, color="tab:gray", alpha=0.6, label="rejected")
        ax.set_xlabel("confidence threshold")
        ax.set_ylabel("verified tokens / step")
        ax.set_title(name, fontsize=10)
        ax2 = ax.twinx()
        ax2.plot(th, [100 * r["acceptance_rate"] for r in rows], "o-", color="tab:orange", label="acceptance rate")
        ax2.set_ylabel("acceptance rate (%)")
        ax2.set_ylim(0, 100)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
