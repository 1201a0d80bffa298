"""Copy a finished bundle build (scripts/build_bundled_models.sh) into models/ with model cards.

    python3 scripts/export_bundle.py runs/bundle                     # target + every drafter
    python3 scripts/export_bundle.py runs/bundle --only eagle3_k7    # one drafter; models/ target kept

Copies the HF-layout target (bf16 safetensors + tokenizer) and the DeepSpec-layout drafts
(+ sts_temperatures.json when calibrated), and writes MODEL_CARD.md for each from the runs'
own records (train_config.json, metrics.jsonl, train_summary.json).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
TARGET_NAME = "pystd-qwen3-target"
DRAFTS = {"dspark_k7": "pystd-dspark-k7", "dflash_k7": "pystd-dflash-k7", "eagle3_k7": "pystd-eagle3-k7"}
KIND = {"dspark": "DSpark", "dflash": "DFlash", "eagle3": "Eagle-3"}
WHAT = {
    "block": "DeepSpec-layout drafter (1 layer, block size 7) trained with online target features by `dspark "
             "train-draft` on the corpus named under Final metrics (`regen`: the source corpus rewritten by the "
             "target with `dspark regenerate`, spec §4.1 step 2); frozen embedding / LM head copied from the target.",
    "eagle3": "DeepSpec eagle3-layout drafter (1 layer, TTT length 7, chain drafting of up to 7 tokens per round; "
              "spec §9.2) trained with online target features by `dspark train-draft --preset eagle3` with the "
              "bundled DSpark/DFlash drafters' recipe (1500 steps, batch 8 x 256, on the regenerated corpus named "
              "under Final metrics); frozen embedding / LM head copied from the target.",
}
TARGET_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer_meta.json", "train_config.json")


def _last_metrics(path: str) -> dict:
    last, evals = {}, {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                last = rec
            for k, v in rec.items():
                if k.startswith("val") or k.startswith("eval"):
                    evals[k] = v
    return {"last_train": last, "last_eval": evals}


def _card(title: str, body: dict) -> str:
    lines = [f"# {title}", ""]
    for heading, text in body.items():
        lines += [f"## {heading}", "", text, ""]
    return "\n".join(lines)


def main(work: str, only: list[str] | None = None) -> int:
    """Export the target (unless `only` names drafts) and the drafts of `work` into models/."""
    os.makedirs(MODELS, exist_ok=True)
    cmds = open(os.path.join(ROOT, "scripts", "build_bundled_models.sh")).read()
    unknown = sorted(set(only or ()) - set(DRAFTS))
    if unknown:
        print(f"error: --only {unknown[0]!r} is not one of {sorted(DRAFTS)}", file=sys.stderr)
        return 2
    if only:
        return _export_drafts(work, only, cmds)
    tdir = os.path.join(work, "target")
    out = os.path.join(MODELS, TARGET_NAME)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name in TARGET_FILES:
        if os.path.exists(os.path.join(tdir, name)):
            shutil.copy2(os.path.join(tdir, name), out)
    tm = _last_metrics(os.path.join(tdir, "metrics.jsonl"))
    manifest = json.load(open(os.path.join(work, "corpus", "manifest.json")))
    with open(os.path.join(out, "MODEL_CARD.md"), "w") as f:
        f.write(_card(f"{TARGET_NAME}: small Qwen3-architecture target", {
            "What": "A Qwen3-architecture causal LM pretrained from scratch on Python standard-library sources "
                    "(code) and the CPython documentation (prose), to demonstrate DSpark at a scale a 2-core CPU "
                    "can train and serve. HF layout, bf16 weights, byte-level BPE tokenizer (8192).",
            "Data": "```json\n" + json.dumps({k: manifest.get(k) for k in ("sources", "seed", "fractions", "domains",
                                                                           "content_hash") if k in manifest},
                                              indent=1, default=str)[:3000] + "\n```",
            "Config": "```json\n" + open(os.path.join(tdir, "train_config.json")).read() + "\n```",
            "Final metrics": "```json\n" + json.dumps(tm, indent=1) + "\n```",
            "Reproduce": "```bash\n" + cmds + "\n```",
        }))
    return _export_drafts(work, list(DRAFTS), cmds)


def _export_drafts(work: str, runs: list[str], cmds: str) -> int:
    for run in runs:
        name = DRAFTS[run]
        kind = run.split("_")[0]
        ddir = os.path.join(work, run, "draft")
        if not os.path.isdir(ddir):
            print(f"skip {run}: {ddir} missing")
            continue
        out = os.path.join(MODELS, name)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ddir, out)
        summary = {}
        summary_path = os.path.join(out, "train_summary.json")
        if os.path.exists(summary_path):
            # Machine-local absolute paths (some trainers record them) become repository-relative, and the
            # run's draft directory the bundled one.
            text = open(summary_path).read().replace(ROOT.rstrip("/") + "/", "")
            text = re.sub(r"runs/[^\s\"]*/draft\b", f"models/{name}", text)
            with open(summary_path, "w") as f:
                f.write(text)
            summary = json.loads(text)
        with open(os.path.join(out, "MODEL_CARD.md"), "w") as f:
            f.write(_card(f"{name}: {KIND[kind]} drafter for {TARGET_NAME}", {
                "What": WHAT["eagle3" if kind == "eagle3" else "block"],
                "Config": "```json\n" + open(os.path.join(work, run, "train_config.json")).read() + "\n```",
                "Final metrics": "```json\n" + json.dumps(summary, indent=1, default=str)[:6000] + "\n```",
                "Reproduce": "```bash\n" + cmds + "\n```",
            }))
    print("exported to", MODELS)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    only = args[args.index("--only") + 1:] if "--only" in args else None
    work_dirs = args[:args.index("--only")] if "--only" in args else args
    sys.exit(main(work_dirs[0] if work_dirs else os.path.join(ROOT, "runs", "bundle"), only))
