"""Calibration metrics (spec §5.7) and Sequential Temperature Scaling (spec §7.1) on synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dspark_jax.calibration import (CALIBRATION_FILE, RoundData, STSConfig, auc_from_histograms, brier, ece,
                                    fit_sts, load_temperatures, position_metrics, reliability_table,
                                    save_temperatures, survival_predictions, threshold_sweep)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def pairwise_auc(pred, label):
    """Brute-force Mann-Whitney AUC (ties count 1/2)."""
    pred, label = np.asarray(pred, np.float64), np.asarray(label, bool)
    pos, neg = pred[label], pred[~label]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def synthetic_rounds(t_star, n=20000, seed=0, loc=1.0, scale=2.0):
    """Rounds whose per-slot conditional acceptance is Bernoulli(sigmoid(z_k / T*_k)); labels = prefix mask."""
    rng = np.random.default_rng(seed)
    k = len(t_star)
    z = rng.normal(loc, scale, (n, k))
    passed = rng.random((n, k)) < _sig(z / np.asarray(t_star))
    labels = np.cumprod(passed, axis=1).astype(bool)
    return RoundData(conf_logits=z, labels=labels, proposed=np.full(n, k), accepted=labels.sum(1))


# --------------------------------------------------------------------------------------------- metrics

def test_ece_hand_computed():
    # 2 bins: bin0 = {0.1, 0.2} mean p 0.15 vs y 0.5; bin1 = {0.7, 0.9} mean p 0.8 vs y 0.5.
    assert ece([0.1, 0.2, 0.7, 0.9], [0, 1, 1, 0], bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.3)
    # 20 bins, one sample per bin: mean |p - y|.
    assert ece([0.1, 0.15, 0.8, 0.9], [0, 1, 1, 1]) == pytest.approx((0.1 + 0.85 + 0.2 + 0.1) / 4)
    # Both in bin [0.50, 0.55): |0.525 - 0.5|; p = 1 is clamped to 1 - 1e-8 (last bin).
    assert ece([0.51, 0.54], [1, 0]) == pytest.approx(0.025)
    assert ece([1.0, 1.0], [1, 1]) == pytest.approx(1e-8)
    assert math.isnan(ece([], []))


def test_auc_hand_computed():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered.
    assert auc_from_histograms([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc_from_histograms([0.9, 0.1], [1, 0]) == 1.0
    assert auc_from_histograms([0.1, 0.9], [1, 0]) == 0.0
    # Same histogram bin (1000 bins) counts as a tie even if the values differ.
    assert auc_from_histograms([0.5004, 0.5001], [1, 0]) == 0.5
    assert auc_from_histograms([0.5004, 0.5001], [1, 0], bins=10_000) == 1.0
    assert math.isnan(auc_from_histograms([0.2, 0.3], [1, 1]))
    assert math.isnan(auc_from_histograms([0.2, 0.3], [0, 0]))


def test_brier_and_reliability_table_hand_computed():
    assert brier([0.2, 0.7], [0, 1]) == pytest.approx((0.04 + 0.09) / 2)
    table = reliability_table([0.1, 0.2, 0.7, 0.9], [0, 1, 1, 0], bins=2)
    assert [r["count"] for r in table] == [2, 2]
    assert table[0]["pred_mean"] == pytest.approx(0.15) and table[0]["label_mean"] == 0.5
    assert table[1]["pred_mean"] == pytest.approx(0.8) and (table[1]["lo"], table[1]["hi"]) == (0.5, 1.0)
    assert math.isnan(reliability_table([0.1], [1], bins=4)[3]["pred_mean"])


def test_auc_matches_pairwise_up_to_binning():
    rng = np.random.default_rng(1)
    for _ in range(3):
        pred = rng.beta(2, 2, 3000)
        label = rng.random(3000) < pred
        assert auc_from_histograms(pred, label) == pytest.approx(pairwise_auc(pred, label), abs=3e-3)


def test_position_metrics_from_records_by_hand():
    z = np.array([[[0.0, 1.0], [2.0, -1.0], [5.0, 5.0]]])  # [B=1, R=3, K=2]
    records = {"conf_logits": z, "prefix_accepted": np.array([[[1, 0], [1, 1], [0, 0]]], bool),
               "proposed": np.array([[2, 1, -1]]), "accepted": np.array([[1, 1, 0]])}
    data = RoundData.from_records(records)
    assert data.num_rounds == 2 and data.block_size == 2  # the -1 (no round) entry is dropped
    temps = (2.0, 0.5)
    m = position_metrics(data, temps)
    p1 = _sig(np.array([0.0, 2.0]) / 2.0)
    p2 = p1[0] * _sig(1.0 / 0.5)  # only round 0 proposed >= 2
    np.testing.assert_allclose(survival_predictions(data, temps)[:, 0], p1)
    assert [s["count"] for s in m["positions"]] == [2, 1]
    assert m["positions"][0]["brier"] == pytest.approx(np.mean((p1 - 1.0) ** 2))
    assert m["positions"][1]["brier"] == pytest.approx(p2 ** 2)
    assert m["positions"][1]["pred_mean"] == pytest.approx(p2) and m["positions"][1]["target_mean"] == 0.0
    assert math.isnan(m["positions"][0]["auc"])  # no negatives at slot 1
    w_ece = (2 * m["positions"][0]["ece"] + 1 * m["positions"][1]["ece"]) / 3
    assert m["ece_mean"] == pytest.approx(w_ece)
    assert math.isnan(m["auc_mean"])  # each slot has a single class here
    assert m["temperatures"] == [2.0, 0.5]


# --------------------------------------------------------------------------------------------- STS

def test_sts_never_increases_validation_ece_and_keeps_ranking():
    data = synthetic_rounds((2.0, 0.6, 1.5, 0.8), n=6000, seed=2)
    fit = fit_sts(data)
    after = position_metrics(data, fit.temperatures)
    before = position_metrics(data)
    for k in range(data.block_size):
        # The objective at slot k never exceeds its value at T_k = 1 (1 is on the grid) ...
        assert fit.ece_after[k] <= fit.ece_at_unit[k] + 1e-12
        # ... and it is exactly the survival ECE of the calibrated predictions.
        assert after["positions"][k]["ece"] == pytest.approx(fit.ece_after[k], abs=1e-12)
        # On this (mis-calibrated) data every position improves.
        assert after["positions"][k]["ece"] < before["positions"][k]["ece"]
        # Per-slot temperature scaling is monotone: ranking of the slot's confidence is unchanged.
        z = data.conf_logits[:, k]
        np.testing.assert_array_equal(np.argsort(_sig(z / fit.temperatures[k]), kind="stable"),
                                      np.argsort(_sig(z), kind="stable"))
        y = data.labels[:, k]
        assert pairwise_auc(_sig(z / fit.temperatures[k]), y) == pytest.approx(pairwise_auc(z, y), abs=1e-12)
    assert fit.ece_after[0] <= fit.ece_raw[0]
    assert after["ece_mean"] < before["ece_mean"]
    # Position 1's survival prediction is the slot confidence itself: AUC equal up to histogram binning.
    assert after["positions"][0]["auc"] == pytest.approx(before["positions"][0]["auc"], abs=3e-3)


def test_sts_keeps_well_calibrated_head_near_one_and_ece_not_worse():
    data = synthetic_rounds((1.0, 1.0), n=8000, seed=3)
    fit = fit_sts(data)
    assert fit.ece_after[0] <= fit.ece_raw[0]
    np.testing.assert_allclose(fit.temperatures, 1.0, rtol=0.2)


def test_sts_recovers_known_temperatures():
    t_star = (2.0, 0.5, 1.5)
    fit = fit_sts(synthetic_rounds(t_star, n=20000, seed=0))
    np.testing.assert_allclose(fit.temperatures, t_star, rtol=0.2)
    assert fit.num_rounds == 20000 and fit.counts == (20000,) * 3


def test_sts_extends_grid_at_edge():
    # Very under-confident logits need T far below the default grid's 0.25.
    data = synthetic_rounds((0.05,), n=5000, seed=4, loc=0.05, scale=0.1)
    fit = fit_sts(data, STSConfig())
    assert fit.grid_ranges[0][0] < 0.25
    assert fit.temperatures[0] < 0.25
    assert fit.temperatures[0] == pytest.approx(0.05, rel=0.3)
    with pytest.raises(ValueError):
        STSConfig(t_min=2.0, t_max=4.0)


def test_sts_uses_only_rounds_that_proposed_the_slot():
    data = synthetic_rounds((2.0, 0.5), n=4000, seed=5)
    proposed = np.where(np.arange(4000) % 2 == 0, 2, 1)
    labels = data.labels & (np.arange(2)[None, :] < proposed[:, None])
    short = RoundData(conf_logits=data.conf_logits, labels=labels, proposed=proposed, accepted=labels.sum(1))
    fit = fit_sts(short)
    assert fit.counts == (4000, 2000)
    m = position_metrics(short, fit.temperatures)
    assert m["positions"][1]["count"] == 2000
    assert m["positions"][1]["ece"] == pytest.approx(fit.ece_after[1], abs=1e-12)


def test_save_and_load_temperatures(tmp_path):
    fit = fit_sts(synthetic_rounds((2.0, 0.5), n=2000, seed=6))
    path = save_temperatures(tmp_path, fit, pad_to=4, metadata={"note": "x"})
    assert path == str(tmp_path / CALIBRATION_FILE)
    doc = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert doc["temperatures"][2:] == [1.0, 1.0] and doc["fitted_slots"] == 2
    assert doc["num_rounds"] == 2000 and len(doc["ece_before"]) == len(doc["ece_after"]) == 2
    assert doc["grid"]["t_min"] == 0.25 and doc["metadata"] == {"note": "x"}
    assert load_temperatures(tmp_path) == tuple(doc["temperatures"])
    assert [p.name for p in tmp_path.iterdir()] == [CALIBRATION_FILE]  # no temp files left behind
    other = tmp_path / "custom.json"
    save_temperatures(other, fit)
    assert load_temperatures(other) == fit.temperatures


def test_threshold_sweep_replay_by_hand():
    z = np.array([[2.0, -2.0, 2.0], [2.0, 2.0, 2.0]])  # sigmoid: .88/.12/.88 and all .88
    labels = np.array([[1, 1, 0], [1, 0, 0]], bool)
    data = RoundData(conf_logits=z, labels=labels, proposed=np.array([3, 3]), accepted=labels.sum(1))
    s0, s5, s9 = threshold_sweep(data, [0.0, 0.5, 0.9])
    assert s0["verified_per_step"] == 4 and s0["accepted_per_step"] == pytest.approx((3 + 2) / 2)
    assert s0["acceptance_rate"] == pytest.approx(5 / 8)
    # threshold .5: round 0 verifies 1 draft (slot 1 below), accepts 1 -> tau 2; round 1 unchanged (tau 2).
    assert s5["verified_per_step"] == pytest.approx((2 + 4) / 2) and s5["acceptance_rate"] == pytest.approx(4 / 6)
    assert s5["rejected_per_step"] == pytest.approx(1.0)
    # threshold .9: nothing verified, tau = 1 each.
    assert s9["verified_per_step"] == 1 and s9["acceptance_rate"] == 1.0
    # Temperatures change the per-slot confidences used by the rule.
    assert threshold_sweep(data, [0.5], temperatures=(1.0, 1.0, 1.0))[0] == s5
    assert threshold_sweep(data, [0.3], temperatures=(1.0, 10.0, 1.0))[0]["verified_per_step"] == 4  # .45 > .3
    assert threshold_sweep(data, [0.3])[0]["verified_per_step"] == 3  # raw .12 < .3 truncates round 0


def test_live_sweep_calibrated_column_uses_the_survival_rule(monkeypatch):
    """--live-sweep: raw = per-slot confidence_threshold; calibrated = survival_threshold with the STS temperatures."""
    import dataclasses

    import infer.evaluate
    from dspark_cli.calibrate_cmd import _live_sweep
    from infer.evaluate import EvalConfig

    seen = []

    def fake_run(target, draft, prompts, config, k):
        seen.append((draft.temperatures, config.confidence_threshold, config.survival_threshold))
        return {"rounds": 2, "acceptance_length": 2.0, "draft_tokens_per_proposal": 3.0}, None

    @dataclasses.dataclass(frozen=True)
    class FakeDraft:
        temperatures: tuple | None = None

    monkeypatch.setattr(infer.evaluate, "run_speculative", fake_run)
    _live_sweep(None, FakeDraft(), [None], EvalConfig(), 3, [0.4], None)
    _live_sweep(None, FakeDraft(), [None], EvalConfig(), 3, [0.4], [1.5, 2.0, 0.5])
    assert seen == [(None, 0.4, 0.0), ((1.5, 2.0, 0.5), 0.0, 0.4)]
