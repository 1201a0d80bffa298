"""Worker of tests/test_multihost.py: one JAX process of a real multi-process (or reference) training job.

    python multihost_train.py --spec SPEC.json --process-id I --result OUT.json

SPEC: {"corpus", "target", "root", "coordinator" (HOST:PORT or null = single process),
"num_processes", "layouts": {"target": [[data, fsdp, model], ...], "draft": [...]}, "resume_layout": [d, f, m] or null,
"target_flags": [...], "draft_flags": [...], "tag"}. For every layout it runs `dspark train-target`
and `dspark train-draft` through their CLI entry points (with --coordinator-address /
--num-processes / --process-id when a coordinator is given) into <root>/<tag>-<trainer>-<layout>.
At `resume_layout` the run also checkpoints step 2; afterwards its step-3 checkpoint is deleted
(as if the job had died after step 2) and the run is resumed with --resume: "<trainer>-resumed"
holds the losses and the export's bytes after the resume, "<trainer>-<layout>" those before.
The result file holds, per run, the exit status, the logged losses, the wall and CPU time and stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import hashlib
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    started = time.perf_counter()
    spec = json.load(open(a.spec))

    from train.cli_draft import train_draft_main
    from train.cli_target import train_target_main
    from train.metrics import read_jsonl

    dist = []
    if spec["coordinator"]:
        dist = ["--coordinator-address", spec["coordinator"], "--num-processes", str(spec["num_processes"]),
                "--process-id", str(a.process_id)]
    results: dict[str, dict] = {}

    import resource

    def cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def run(name: str, main, argv: list[str]) -> None:
        err = io.StringIO()
        t0, c0 = time.perf_counter(), cpu_s()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv + dist + ["--no-progress"])
        out = argv[argv.index("--out") + 1]
        losses = [[r["step"], r["loss"], r["grad_norm"]] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
                  if "loss" in r]
        export = out if main is train_target_main else os.path.join(out, "draft")
        digests = {n: hashlib.sha256(open(os.path.join(export, n), "rb").read()).hexdigest()
                   for n in sorted(os.listdir(export)) if n.endswith(".safetensors")} if os.path.isdir(export) else {}
        results[name] = {"rc": rc, "losses": losses, "wall_s": time.perf_counter() - t0,
                         "cpu_s": cpu_s() - c0, "out": out,
                         "export_sha256": digests, "stderr": err.getvalue()[-3000:]}

    for trainer, main_fn, base in (("target", train_target_main, ["--corpus", spec["corpus"], "--tokenizer",
                                                                  spec["target"]] + spec["target_flags"]),
                                   ("draft", train_draft_main, ["--target", spec["target"], "--corpus",
                                                                spec["corpus"]] + spec["draft_flags"])):
        if trainer not in spec.get("trainers", ("target", "draft")):
            continue
        for layout in spec["layouts"][trainer]:
            key = "x".join(map(str, layout))
            argv = base + ["--mesh", ",".join(map(str, layout)),
                           "--out", os.path.join(spec["root"], f"{spec['tag']}-{trainer}-{key}")]
            if layout != spec.get("resume_layout"):
                run(f"{trainer}-{key}", main_fn, argv)
                continue
            run(f"{trainer}-{key}", main_fn, argv + ["--ckpt-every", "2"])
            # every process removes the last checkpoint itself (rmtree of a gone tree is a no-op), so no
            # process can open the checkpoints before it is gone
            shutil.rmtree(os.path.join(argv[-1], "checkpoints", "3"), ignore_errors=True)
            run(f"{trainer}-resumed", main_fn, argv + ["--ckpt-every", "2", "--resume"])
    results["_process"] = {"cpu_s": cpu_s(), "wall_s": time.perf_counter() - started}
    with open(a.result, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
