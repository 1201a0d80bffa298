"""Confidence-calibration metrics and Sequential Temperature Scaling (DSpark spec §5.7, §7.1).

Pure NumPy. The inputs are verification-round records (``metrics["round_records"]`` of a
speculative run with ``record_rounds=True``): raw confidence logits ``z [.., K]``, the rejection
test's prefix labels ``y [.., K]`` and the proposal length per round. For slot k (0-based) the
prediction is the survival probability ``P_k = prod_{j<=k} sigmoid(z_j / T_j)`` (float64, clamped to
[1e-8, 1 - 1e-8]) over the rounds that proposed at least k + 1 drafts; ``T = 1`` is the raw head.

    data = RoundData.from_records(result.metrics["round_records"])
    fit = fit_sts(data)                                   # per-slot temperatures, left to right
    position_metrics(data, fit.temperatures)["ece_mean"]
    save_temperatures(draft_dir, fit)                     # -> draft_dir/sts_temperatures.json

Note: scaling is monotone per slot, so each slot's own confidence keeps its ranking (and position 1's
AUC is unchanged up to histogram binning); the survival product at positions >= 2 mixes slots whose
temperatures differ, so its AUC can move (spec §7.1 states "unchanged" — true per slot only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dspark_jax.config import read_config_json

__all__ = ["CALIBRATION_FILE", "PRED_EPS", "RoundData", "STSConfig", "STSFit", "ece", "auc_from_histograms",
           "brier", "reliability_table", "survival_predictions", "position_metrics", "fit_sts",
           "threshold_sweep", "save_temperatures", "load_temperatures", "CalibrationFileError"]

CALIBRATION_FILE = "sts_temperatures.json"  # same name infer.speculative_api.load_draft_bundle reads
PRED_EPS = 1e-8
FORMAT = "dspark-sts/v1"


class CalibrationFileError(ValueError):
    """An unusable ``sts_temperatures.json`` (the message names the file and the problem)."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def _clamp(p: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(p, np.float64), PRED_EPS, 1.0 - PRED_EPS)


def _bin_index(pred: np.ndarray, bins: int) -> np.ndarray:
    return np.clip(np.floor(pred * bins).astype(np.int64), 0, bins - 1)


def ece(pred: Any, label: Any, bins: int = 20) -> float:
    """Expected calibration error with `bins` equal-width bins on [0, 1] (NaN for no samples).

    ``bin = min(floor(P * bins), bins - 1)``; ``ECE = sum_b n_b / n * |mean(P)_b - mean(Y)_b|``.
    """
    p, y = _clamp(pred).ravel(), np.asarray(label, np.float64).ravel()
    if p.size == 0:
        return math.nan
    idx = _bin_index(p, bins)
    gap = np.abs(np.bincount(idx, p, minlength=bins) - np.bincount(idx, y, minlength=bins))
    return float(gap.sum() / p.size)  # sum_b n_b/n |sum_p/n_b - sum_y/n_b| = sum_b |sum_p - sum_y| / n


def auc_from_histograms(pred: Any, label: Any, bins: int = 1000) -> float:
    """ROC AUC from `bins`-bin histograms of positives and negatives (spec §5.7).

    ``AUC = [sum_b pos_b * sum_{b'<b} neg_b' + 1/2 sum_b pos_b * neg_b] / (#pos * #neg)``; predictions in
    the same bin count as ties. NaN if either class is empty.
    """
    p, y = _clamp(pred).ravel(), np.asarray(label).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    idx = _bin_index(p, bins)
    pos = np.bincount(idx[y], minlength=bins).astype(np.float64)
    neg = np.bincount(idx[~y], minlength=bins).astype(np.float64)
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((np.sum(pos * below) + 0.5 * np.sum(pos * neg)) / (n_pos * n_neg))


def brier(pred: Any, label: Any) -> float:
    """Mean squared error ``mean((P - Y)^2)`` (NaN for no samples)."""
    p, y = _clamp(pred).ravel(), np.asarray(label, np.float64).ravel()
    return float(np.mean((p - y) ** 2)) if p.size else math.nan


def reliability_table(pred: Any, label: Any, bins: int = 20) -> list[dict[str, float]]:
    """Per-bin rows ``{lo, hi, count, pred_mean, label_mean}`` (means NaN for empty bins)."""
    p, y = _clamp(pred).ravel(), np.asarray(label, np.float64).ravel()
    idx = _bin_index(p, bins)
    n = np.bincount(idx, minlength=bins)
    sp, sy = np.bincount(idx, p, minlength=bins), np.bincount(idx, y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        pm, ym = sp / n, sy / n
    return [{"lo": b / bins, "hi": (b + 1) / bins, "count": int(n[b]), "pred_mean": float(pm[b]),
             "label_mean": float(ym[b])} for b in range(bins)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundData:
    """Flattened verification rounds that proposed >= 1 draft.

    conf_logits [N, K] float64 raw confidence logits; labels [N, K] bool prefix-survival labels
    (rejection test before stop truncation); proposed [N] drafts verified; accepted [N] committed drafts.
    """

    conf_logits: np.ndarray
    labels: np.ndarray
    proposed: np.ndarray
    accepted: np.ndarray

    @property
    def block_size(self) -> int:
        """K, the number of slots recorded per round."""
        return int(self.conf_logits.shape[1])

    @property
    def num_rounds(self) -> int:
        """N, the number of rounds."""
        return int(self.conf_logits.shape[0])

    @classmethod
    def from_records(cls, records: Any, rows: Sequence[int] | None = None) -> "RoundData":
        """From `RoundRecords` (or a mapping) with arrays [B, R, K] / [B, R]; only rows `rows` if given.

        Rounds with ``proposed < 1`` (no round, or zero drafts verified) are dropped.
        """
        get = records.__getitem__ if isinstance(records, Mapping) else lambda n: getattr(records, n)
        z, y = np.asarray(get("conf_logits"), np.float64), np.asarray(get("prefix_accepted"), bool)
        n, a = np.asarray(get("proposed"), np.int64), np.asarray(get("accepted"), np.int64)
        if rows is not None:
            z, y, n, a = z[list(rows)], y[list(rows)], n[list(rows)], a[list(rows)]
        k = z.shape[-1]
        z, y, n, a = z.reshape(-1, k), y.reshape(-1, k), n.reshape(-1), a.reshape(-1)
        keep = n >= 1
        return cls(conf_logits=z[keep], labels=y[keep], proposed=n[keep], accepted=a[keep])

    @classmethod
    def concat(cls, parts: Sequence["RoundData"]) -> "RoundData":
        """Concatenate rounds of runs with the same block size."""
        if not parts:
            raise ValueError("no round data to concatenate")
        ks = {p.block_size for p in parts}
        if len(ks) != 1:
            raise ValueError(f"cannot concatenate round data with different block sizes {sorted(ks)}")
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                      for f in dataclasses.fields(cls)})

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` with the four arrays."""
        np.savez_compressed(path, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoundData":
        """Read an ``.npz`` written by `save`."""
        with np.load(path) as f:
            return cls(**{fld.name: f[fld.name] for fld in dataclasses.fields(cls)})


def _temps(temperatures: Sequence[float] | None, k: int) -> np.ndarray:
    if temperatures is None:
        return np.ones(k)
    t = np.asarray(temperatures, np.float64)
    if t.size < k or np.any(t <= 0):
        raise ValueError(f"need {k} positive temperatures, got {t.tolist()}")
    return t[:k]


def survival_predictions(data: RoundData, temperatures: Sequence[float] | None = None) -> np.ndarray:
    """[N, K] clamped ``prod_{j<=k} sigmoid(z_j / T_j)`` (float64)."""
    return _clamp(np.cumprod(_sigmoid(data.conf_logits / _temps(temperatures, data.block_size)), axis=1))


def position_metrics(data: RoundData, temperatures: Sequence[float] | None = None, *, bins: int = 20,
                     auc_bins: int = 1000) -> dict[str, Any]:
    """Per-slot ECE / AUC / Brier / means / reliability table, plus count-weighted summaries.

    Slot k uses the rounds with ``proposed >= k + 1``. Summaries (``ece_mean``, ``brier_mean``,
    ``pred_mean``, ``target_mean``) weight slots by their counts; ``auc_mean`` only slots with finite AUC.
    """
    pred = survival_predictions(data, temperatures)
    slots = []
    for k in range(data.block_size):
        m = data.proposed >= k + 1
        p, y = pred[m, k], data.labels[m, k]
        slots.append({"position": k + 1, "count": int(m.sum()), "ece": ece(p, y, bins),
                      "auc": auc_from_histograms(p, y, auc_bins), "brier": brier(p, y),
                      "pred_mean": float(p.mean()) if p.size else math.nan,
                      "target_mean": float(y.mean()) if y.size else math.nan,
                      "reliability": reliability_table(p, y, bins)})
    w = np.asarray([s["count"] for s in slots], np.float64)

    def wmean(key: str, finite_only: bool = False) -> float:
        v = np.asarray([s[key] for s in slots], np.float64)
        ok = (w > 0) & (np.isfinite(v) if finite_only else True)
        return float(np.sum(w[ok] * v[ok]) / np.sum(w[ok])) if np.any(ok) else math.nan

    return {"num_rounds": data.num_rounds, "temperatures": None if temperatures is None
            else [float(t) for t in _temps(temperatures, data.block_size)],
            "ece_mean": wmean("ece"), "auc_mean": wmean("auc", True), "brier_mean": wmean("brier"),
            "pred_mean": wmean("pred_mean"), "target_mean": wmean("target_mean"), "positions": slots}


@dataclasses.dataclass(frozen=True, kw_only=True)
class STSConfig:
    """Search grid of Sequential Temperature Scaling (spec §7.1 [OURS] choices).

    A log-spaced grid of `num` points on [t_min, t_max] (T = 1 is always added); if a slot's optimum
    lies on an edge, the grid is extended in that direction by another block of the same log-width and
    spacing (x t_max / t_min), at most `max_extensions` times. `bins`: ECE bins of the objective (same as the recorder).
    """

    t_min: float = 0.25
    t_max: float = 4.0
    num: int = 401
    bins: int = 20
    max_extensions: int = 4

    def __post_init__(self):
        if not 0 < self.t_min < 1 < self.t_max or self.num < 2 or self.bins < 1 or self.max_extensions < 0:
            raise ValueError(f"invalid STS grid {self}: need 0 < t_min < 1 < t_max, num >= 2, bins >= 1")

    def grid(self) -> np.ndarray:
        """The base grid (sorted, includes 1.0)."""
        return np.unique(np.concatenate([np.geomspace(self.t_min, self.t_max, self.num), [1.0]]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class STSFit:
    """Fitted per-slot temperatures and the fit's diagnostics (on the fitting data).

    ece_raw: per-slot ECE of the raw confidences; ece_at_unit: the objective at T_k = 1 with the
    earlier slots already calibrated; ece_after: the minimum reached (<= ece_at_unit). counts: rounds
    per slot; grid_ranges: the (t_min, t_max) searched per slot after any extension; at_edge: the optimum
    still lies on the searched grid's edge after `max_extensions` (uninformative or degenerate confidences).
    """

    temperatures: tuple[float, ...]
    ece_raw: tuple[float, ...]
    ece_at_unit: tuple[float, ...]
    ece_after: tuple[float, ...]
    counts: tuple[int, ...]
    num_rounds: int
    config: STSConfig
    grid_ranges: tuple[tuple[float, float], ...]
    at_edge: tuple[bool, ...]


def _ece_grid(prefix: np.ndarray, z: np.ndarray, y: np.ndarray, temps: np.ndarray, bins: int) -> np.ndarray:
    """ECE of ``prefix * sigmoid(z / T)`` for every T in `temps` -> [G] (chunked, vectorised)."""
    out = np.empty(temps.size)
    n = z.size
    chunk = max(1, 2_000_000 // max(n, 1))
    for s in range(0, temps.size, chunk):
        t = temps[s:s + chunk, None]
        p = _clamp(prefix[None, :] * _sigmoid(z[None, :] / t))
        idx = _bin_index(p, bins) + bins * np.arange(t.shape[0])[:, None]
        size = bins * t.shape[0]
        gap = np.abs(np.bincount(idx.ravel(), p.ravel(), minlength=size)
                     - np.bincount(idx.ravel(), np.broadcast_to(y, p.shape).ravel(), minlength=size))
        out[s:s + chunk] = gap.reshape(t.shape[0], bins).sum(1) / n
    return out


def fit_sts(data: RoundData, config: STSConfig = STSConfig()) -> STSFit:
    """Sequential Temperature Scaling: per slot, left to right, T_k = argmin_T ECE(prefix * sigmoid(z_k / T)).

    The prefix uses the already fitted T_1..T_{k-1}; slot k uses the rounds that proposed >= k + 1
    drafts. Ties go to the temperature closest to 1; slots without rounds get T = 1.
    """
    base = config.grid()
    step = math.log(base[1] / base[0])
    factor = math.log(config.t_max / config.t_min)
    temps: list[float] = []
    raw, unit, after, counts, ranges, at_edge = [], [], [], [], [], []
    sig_fitted = np.ones(data.num_rounds)
    for k in range(data.block_size):
        m = data.proposed >= k + 1
        z, y, prefix = data.conf_logits[m, k], data.labels[m, k].astype(np.float64), sig_fitted[m]
        counts.append(int(m.sum()))
        raw_pred = np.cumprod(_sigmoid(data.conf_logits[m, :k + 1]), axis=1)[:, -1] if m.any() else z
        raw.append(ece(raw_pred, y, config.bins))
        if not m.any():
            temps.append(1.0)
            unit.append(math.nan)
            after.append(math.nan)
            ranges.append((float(base[0]), float(base[-1])))
            at_edge.append(False)
            continue
        grid = base
        scores = _ece_grid(prefix, z, y, grid, config.bins)
        for _ in range(config.max_extensions):
            best = int(np.argmin(scores))
            if 0 < best < grid.size - 1:
                break
            sign = -1.0 if best == 0 else 1.0
            edge = grid[0] if best == 0 else grid[-1]
            ext = edge * np.exp(sign * step * np.arange(1, int(round(factor / step)) + 1))
            ext_scores = _ece_grid(prefix, z, y, ext, config.bins)
            grid = np.concatenate([ext[::-1], grid]) if best == 0 else np.concatenate([grid, ext])
            scores = np.concatenate([ext_scores[::-1], scores]) if best == 0 else np.concatenate([scores, ext_scores])
        ties = np.flatnonzero(scores <= scores.min() + 1e-15)
        best_t = float(grid[ties[np.argmin(np.abs(np.log(grid[ties])))]])
        temps.append(best_t)
        unit.append(float(scores[np.argmin(np.abs(np.log(grid)))]))
        after.append(float(scores.min()))
        ranges.append((float(grid[0]), float(grid[-1])))
        at_edge.append(best_t in (float(grid[0]), float(grid[-1])))
        sig_fitted = sig_fitted * _sigmoid(data.conf_logits[:, k] / best_t)
    return STSFit(temperatures=tuple(temps), ece_raw=tuple(raw), ece_at_unit=tuple(unit), ece_after=tuple(after),
                  counts=tuple(counts), num_rounds=data.num_rounds, config=config, grid_ranges=tuple(ranges),
                  at_edge=tuple(at_edge))


def threshold_sweep(data: RoundData, thresholds: Sequence[float], temperatures: Sequence[float] | None = None,
                    ) -> list[dict[str, float]]:
    """Replay the static confidence-threshold rule (spec §3) on fixed-length rounds.

    For threshold c a round verifies ``n' = first slot with sigmoid(z_k / T_k) < c`` drafts (all when none)
    and commits ``min(accepted, n')`` drafts + 1 token. Per threshold: verified tokens per step
    (``n' + 1``), accepted / rejected per step, acceptance length and acceptance rate (= verify_rate,
    ``sum tau / sum (n' + 1)``). Counterfactual: contexts are those of the recorded (untruncated) run, and
    stop-token rounds are treated like any other.
    """
    if data.num_rounds == 0:
        raise ValueError("no rounds to replay")
    conf = _sigmoid(data.conf_logits / _temps(temperatures, data.block_size))
    out = []
    for c in thresholds:
        below = conf < c
        n = np.where(below.any(1), np.argmax(below, 1), data.block_size)
        n = np.minimum(n, data.proposed)
        acc = np.minimum(data.accepted, n)
        verified = n + 1
        tau = acc + 1
        out.append({"threshold": float(c), "verified_per_step": float(verified.mean()),
                    "accepted_per_step": float(tau.mean()), "rejected_per_step": float((verified - tau).mean()),
                    "draft_tokens_per_proposal": float(n.mean()), "acceptance_length": float(tau.mean()),
                    "acceptance_rate": float(tau.sum() / verified.sum())})
    return out


def _atomic_write_text(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def save_temperatures(path: str | os.PathLike, fit: STSFit, *, pad_to: int | None = None,
                      metadata: Mapping[str, Any] | None = None) -> str:
    """Write ``sts_temperatures.json`` atomically; `path` is a draft directory or a file path.

    `pad_to` (e.g. the checkpoint's block size) pads the temperatures with 1.0 (uncalibrated) for slots
    beyond those fitted. Returns the file path written.
    """
    path = os.fspath(path)
    file = os.path.join(path, CALIBRATION_FILE) if os.path.isdir(path) else path
    temps = list(fit.temperatures) + [1.0] * max(0, (pad_to or 0) - len(fit.temperatures))
    cfg = fit.config
    doc = {"format": FORMAT, "temperatures": temps, "fitted_slots": len(fit.temperatures),
           "num_rounds": fit.num_rounds, "counts": list(fit.counts),
           "ece_before": [_finite(v) for v in fit.ece_raw], "ece_at_unit": [_finite(v) for v in fit.ece_at_unit],
           "ece_after": [_finite(v) for v in fit.ece_after],
           "grid": {"scale": "log", "t_min": cfg.t_min, "t_max": cfg.t_max, "num": cfg.num, "bins": cfg.bins,
                    "max_extensions": cfg.max_extensions, "searched": [list(r) for r in fit.grid_ranges],
                    "at_edge": list(fit.at_edge)},
           "metadata": dict(metadata or {})}
    _atomic_write_text(file, json.dumps(doc, indent=2, default=str) + "\n")
    return file


def load_temperatures(path: str | os.PathLike, *, num_slots: int | None = None) -> tuple[float, ...]:
    """Per-slot temperatures from a ``sts_temperatures.json`` file or a directory containing one.

    Every temperature must be a finite number > 0 (zero, negative, NaN or infinite temperatures would
    silently switch confidence scheduling off or on); with `num_slots` (the drafter's block size) there
    must be exactly one per slot. CalibrationFileError names the file and the problem, also for
    unreadable or malformed JSON.
    """
    path = os.fspath(path)
    file = os.path.join(path, CALIBRATION_FILE) if os.path.isdir(path) else path
    try:
        doc = read_config_json(file, CalibrationFileError)
    except OSError as e:
        raise CalibrationFileError(f"{file}: cannot read ({e.strerror or e})") from None
    temps = doc.get("temperatures")
    if not isinstance(temps, list) or not temps:
        raise CalibrationFileError(f"{file}: 'temperatures' must be a non-empty list of positive numbers")
    for i, t in enumerate(temps):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise CalibrationFileError(f"{file}: temperatures[{i}] = {t!r}; every temperature must be a finite "
                                       f"number > 0")
    if num_slots is not None and len(temps) != num_slots:
        raise CalibrationFileError(f"{file}: {len(temps)} temperatures for a drafter with {num_slots} slots "
                                   f"(block_size); need exactly one per slot")
    return tuple(float(t) for t in temps)
