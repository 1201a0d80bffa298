"""``dspark calibrate``: fit Sequential Temperature Scaling for a drafter's confidence head.

    dspark calibrate --target TARGET_DIR --draft DRAFT_DIR \\
        --fit-data corpus:code:validation corpus:prose:validation --report-data corpus:code corpus:prose \\
        --corpus CORPUS_DIR --max-prompts 128 --max-new-tokens 256 --out OUT

1. Records fixed-length verification rounds (confidence threshold 0) on the fitting prompts and on the
   reporting prompts (``corpus:DOMAIN`` defaults to the ``validation`` split for ``--fit-data`` and to
   ``test`` for ``--report-data``). The two are made disjoint: a prompt file given for both is split
   into interleaved halves (even prompts fit, odd prompts report) and any remaining fitting prompt that
   also occurs in the reporting set is dropped.
2. Fits one temperature per slot, left to right (`dspark_jax.calibration.fit_sts`, DSpark spec §7.1).
3. Reports ECE / AUC / Brier per position before and after on the reporting rounds, writes
   ``sts_temperatures.json`` into the draft directory (or ``--write-to``; atomically), reliability
   diagrams (``OUT/reliability.png``), and a static-threshold sweep with raw and calibrated confidences
   (``OUT/threshold_sweep.png``; replayed on the recorded rounds, or re-generated with ``--live-sweep``:
   raw = the per-slot ``confidence_threshold`` rule, calibrated = the ``survival_threshold`` rule with
   the fitted temperatures),
   plus ``OUT/calibration.json`` and ``OUT/calibration.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

from dspark_cli.errors import CliError, check_dir, check_output_dir, check_output_file, log, run_command
from dspark_cli.eval_cmd import (add_common_options, eval_config_from_args, fmt_num, parse_int_list, precheck_datasets,
                                 to_jsonable)

__all__ = ["build_parser", "calibrate_main", "parse_thresholds", "make_disjoint"]

PROG = "dspark calibrate"
DEFAULT_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(10))


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``"0,0.5,0.9"`` -> (0.0, 0.5, 0.9); CliError unless all lie in [0, 1)."""
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        values = ()
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise CliError(f"--thresholds expects comma-separated numbers in [0, 1), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark calibrate``."""
    p = argparse.ArgumentParser(prog=PROG, description="Fit per-slot confidence temperatures (STS) of a "
                                "DSpark drafter and report calibration before/after on disjoint data.")
    p.add_argument("--draft", metavar="DIR", required=True, help="draft checkpoint (with a confidence head)")
    p.add_argument("--fit-data", nargs="+", required=True, metavar="FILE|corpus:DOMAIN[:SPLIT]",
                   help="prompt sets whose rounds the temperatures are fitted on (corpus split: validation)")
    p.add_argument("--report-data", nargs="+", required=True, metavar="FILE|corpus:DOMAIN[:SPLIT]",
                   help="disjoint prompt sets for the before/after report (corpus split: test)")
    p.add_argument("--block-size", type=int, default=None, metavar="K",
                   help="drafts per round (default: the checkpoint's block size)")
    p.add_argument("--write-to", metavar="PATH", default=None,
                   help="where to write sts_temperatures.json (a directory or file; default: the draft dir)")
    p.add_argument("--thresholds", default=",".join(str(t) for t in DEFAULT_THRESHOLDS), metavar="T[,T...]",
                   help="static confidence thresholds of the sweep (default 0.0,0.1,...,0.9)")
    p.add_argument("--live-sweep", action="store_true",
                   help="re-generate at every threshold instead of replaying the recorded rounds "
                        "(calibrated column: the survival rule with the fitted temperatures)")
    p.add_argument("--grid", default="0.25,4.0,401", metavar="TMIN,TMAX,POINTS",
                   help="STS temperature grid (log-spaced; extended if the optimum hits an edge)")
    add_common_options(p)
    return p


def make_disjoint(fit_sets: list, report_sets: list) -> tuple[list, list, list[str]]:
    """Split prompt sets shared by fit and report into interleaved halves; drop fit prompts seen in reports.

    Returns (fit sets, report sets, notes) with non-empty sets; CliError if a fit set ends up empty.
    """
    notes: list[str] = []
    shared = {f.source for f in fit_sets} & {r.source for r in report_sets}
    fit_sets = [dataclasses.replace(f, prompts=f.prompts[0::2]) if f.source in shared else f for f in fit_sets]
    report_sets = [dataclasses.replace(r, prompts=r.prompts[1::2]) if r.source in shared else r for r in report_sets]
    for src in sorted(shared):
        notes.append(f"{src}: used for both; even prompts fit, odd prompts report")
    seen = {p for r in report_sets for p in r.prompts}
    out_fit = []
    for f in fit_sets:
        kept = tuple(p for p in f.prompts if p not in seen)
        if len(kept) < len(f.prompts):
            notes.append(f"{f.name}: dropped {len(f.prompts) - len(kept)} fitting prompts that are also reported on")
        if not kept:
            raise CliError(f"fitting set {f.name!r} has no prompts left that are disjoint from the reporting data")
        out_fit.append(dataclasses.replace(f, prompts=kept))
    for r in report_sets:
        if not r.prompts:
            raise CliError(f"reporting set {r.name!r} is empty after splitting (give more prompts)")
    return out_fit, report_sets, notes


def _live_sweep(target, draft, sets, config, k: int, thresholds, temperatures) -> list[dict[str, float]]:
    """Run the loop per threshold. Without temperatures: the reference per-slot rule on raw
    confidences (`confidence_threshold`); with them: the survival rule on STS-calibrated
    confidences (`survival_threshold`, the only rule that applies the temperatures)."""
    from infer.evaluate import run_speculative

    rows = []
    d = dataclasses.replace(draft, temperatures=tuple(temperatures) if temperatures else None)
    rule = "survival_threshold" if temperatures else "confidence_threshold"
    for t in thresholds:
        cfg = dataclasses.replace(config, **{rule: float(t)})
        ms = [run_speculative(target, d, s, cfg, k)[0] for s in sets]
        rounds = sum(m["rounds"] for m in ms)
        tau = sum(m["acceptance_length"] * m["rounds"] for m in ms if m["rounds"])
        drafted = sum(m["draft_tokens_per_proposal"] * m["rounds"] for m in ms if m["rounds"])
        verified = (drafted + rounds) / rounds
        rows.append({"threshold": float(t), "verified_per_step": verified, "accepted_per_step": tau / rounds,
                     "rejected_per_step": verified - tau / rounds, "draft_tokens_per_proposal": drafted / rounds,
                     "acceptance_length": tau / rounds, "acceptance_rate": tau / (drafted + rounds)})
    return rows


def _markdown(report: dict[str, Any]) -> str:
    before, after, fit = report["report_before"], report["report_after"], report["fit"]
    out = [f"# dspark calibrate\n\ndraft `{report['draft']}`, block size {report['block_size']}, "
           f"temperature {report['temperature']}; fitted on {fit['num_rounds']} rounds, "
           f"reported on {before['num_rounds']} disjoint rounds.\n",
           "| position | T | count | ECE before | ECE after | AUC before | AUC after | Brier before | Brier after |",
           "|---|---|---|---|---|---|---|---|---|"]
    def cells(m: dict[str, Any]) -> tuple[str, str, str]:
        return fmt_num(m["ece"], 4), fmt_num(m["auc"], 3), fmt_num(m["brier"], 4)

    for b, a, t in zip(before["positions"], after["positions"], fit["temperatures"]):
        (eb, ab, bb), (ea, aa, ba) = cells(b), cells(a)
        out.append(f"| {b['position']} | {t:.3f} | {b['count']} | {eb} | {ea} | {ab} | {aa} | {bb} | {ba} |")
    (eb, ab, bb), (ea, aa, ba) = (cells({"ece": m["ece_mean"], "auc": m["auc_mean"], "brier": m["brier_mean"]})
                                  for m in (before, after))
    out.append(f"| mean | | | {eb} | {ea} | {ab} | {aa} | {bb} | {ba} |")
    out += ["", f"Threshold sweep ({report['sweep_kind']}): verified tokens per step (accepted + rejected) "
            "and acceptance rate.", "",
            "| threshold | raw: verified | raw: accepted | raw: acc. rate | STS: verified | STS: accepted | "
            "STS: acc. rate |", "|---|---|---|---|---|---|---|"]
    for r, c in zip(report["sweep"]["raw"], report["sweep"]["calibrated"]):
        row = [fmt_num(x[key], d) for x in (r, c) for key, d in
               (("verified_per_step", 2), ("accepted_per_step", 2), ("acceptance_rate", 3))]
        out.append(f"| {r['threshold']:.2f} | " + " | ".join(row) + " |")
    if report["notes"]:
        out += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


def _run(args: argparse.Namespace) -> int:
    from dspark_jax.calibration import STSConfig

    check_dir(args.target, "--target")
    check_dir(args.draft, "--draft")
    check_output_dir(args.out, "--out")
    if args.write_to is not None and not os.path.isdir(args.write_to):
        check_output_file(args.write_to, "--write-to")
    thresholds = parse_thresholds(args.thresholds)
    grid_parts = args.grid.split(",")
    try:
        sts_cfg = STSConfig(t_min=float(grid_parts[0]), t_max=float(grid_parts[1]), num=int(grid_parts[2]))
    except (ValueError, IndexError) as e:
        raise CliError(f"--grid expects TMIN,TMAX,POINTS with 0 < TMIN < 1 < TMAX: {e}") from None
    config = dataclasses.replace(eval_config_from_args(args), autoregressive=False)
    precheck_datasets(args.fit_data, "--fit-data", args.corpus)
    precheck_datasets(args.report_data, "--report-data", args.corpus)

    from dspark_jax.calibration import RoundData, fit_sts, position_metrics, save_temperatures, threshold_sweep
    from infer.api import load_target_bundle
    from infer.evaluate import load_dataset, run_speculative
    from infer.plots import reliability_diagrams, threshold_sweep_plot
    from infer.speculative_api import load_draft_bundle

    target = load_target_bundle(args.target, dtype=args.dtype)
    draft = load_draft_bundle(args.draft, target, dtype=args.dtype)
    if not draft.config.enable_confidence_head:
        raise CliError(f"draft {args.draft!r} has no confidence head: nothing to calibrate")
    k = draft.config.block_size if args.block_size is None else parse_int_list(str(args.block_size), "--block-size")[0]
    if k > draft.config.block_size:
        raise CliError(f"--block-size {k} exceeds the checkpoint's block size {draft.config.block_size}")
    fit_sets = [load_dataset(s, target, config, default_split="validation") for s in args.fit_data]
    report_sets = [load_dataset(s, target, config, default_split="test") for s in args.report_data]
    fit_sets, report_sets, notes = make_disjoint(fit_sets, report_sets)
    for n in notes:
        log(n)

    t0 = time.perf_counter()
    fit_parts, report_parts, per_dataset = [], [], {}
    for s in fit_sets:
        log(f"recording rounds (fit): {s.name}, {len(s.prompts)} prompts")
        fit_parts.append(run_speculative(target, draft, s, config, k)[1])
    for s in report_sets:
        log(f"recording rounds (report): {s.name}, {len(s.prompts)} prompts")
        report_parts.append(run_speculative(target, draft, s, config, k)[1])
    fit_data, report_data = RoundData.concat(fit_parts), RoundData.concat(report_parts)
    if fit_data.num_rounds == 0 or report_data.num_rounds == 0:
        raise CliError("no verification rounds were recorded (prompts end immediately?)")
    fit = fit_sts(fit_data, sts_cfg)
    temps = fit.temperatures
    log("temperatures: " + ", ".join(f"{t:.3f}" for t in temps))
    if any(fit.at_edge):
        notes.append(f"positions {[i + 1 for i, e in enumerate(fit.at_edge) if e]}: optimum at the edge of the "
                     "extended grid (confidences carry little information there)")
        log(notes[-1])
    before, after = position_metrics(report_data, None), position_metrics(report_data, temps)
    for s, part in zip(report_sets, report_parts):
        per_dataset[s.name] = {"before": position_metrics(part, None), "after": position_metrics(part, temps)}
    if args.live_sweep:
        sweep = {"raw": _live_sweep(target, draft, report_sets, config, k, thresholds, None),
                 "calibrated": _live_sweep(target, draft, report_sets, config, k, thresholds, temps)}
    else:
        sweep = {"raw": threshold_sweep(report_data, thresholds),
                 "calibrated": threshold_sweep(report_data, thresholds, temps)}

    def brief(m: dict) -> dict:
        return {key: m[key] for key in ("ece_mean", "auc_mean", "brier_mean")} | {
            "ece": [p["ece"] for p in m["positions"]], "auc": [p["auc"] for p in m["positions"]],
            "brier": [p["brier"] for p in m["positions"]]}

    meta = {"target": args.target, "draft": args.draft, "block_size": k,
            "temperature": config.temperature, "max_new_tokens": config.max_new_tokens,
            "fit_data": {s.name: s.source for s in fit_sets}, "report_data": {s.name: s.source for s in report_sets},
            "report_before": brief(before), "report_after": brief(after), "notes": notes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    written = save_temperatures(args.write_to or args.draft, fit, pad_to=draft.config.block_size,
                                metadata=to_jsonable(meta))
    log(f"wrote {written}")

    os.makedirs(args.out, exist_ok=True)
    reliability_diagrams(before, after, os.path.join(args.out, "reliability.png"),
                         title=f"{os.path.basename(os.path.normpath(args.draft))}: raw vs STS (report data)")
    threshold_sweep_plot({"raw confidence": sweep["raw"], "calibrated (STS)": sweep["calibrated"]},
                         os.path.join(args.out, "threshold_sweep.png"))
    report = {"draft": args.draft, "target": args.target, "block_size": k,
              "temperature": config.temperature, "sts_file": written, "notes": notes,
              "fit": {"temperatures": list(temps), "num_rounds": fit.num_rounds, "counts": list(fit.counts),
                      "ece_raw": list(fit.ece_raw), "ece_after": list(fit.ece_after),
                      "grid_ranges": [list(r) for r in fit.grid_ranges], "at_edge": list(fit.at_edge)},
              "report_before": before, "report_after": after, "per_dataset": per_dataset,
              "sweep_kind": "live" if args.live_sweep else "replayed on recorded rounds", "sweep": sweep,
              "elapsed_s": time.perf_counter() - t0}
    with open(os.path.join(args.out, "calibration.json"), "w", encoding="utf-8") as f:
        json.dump(to_jsonable(report), f, indent=2)
        f.write("\n")
    md = _markdown(report)
    with open(os.path.join(args.out, "calibration.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(md, end="")
    return 0


def calibrate_main(argv: Sequence[str] | None = None) -> int:
    """Run ``dspark calibrate`` with `argv` (arguments after ``calibrate``); return the exit status."""
    return run_command(PROG, build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(calibrate_main())
