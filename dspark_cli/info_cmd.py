"""``dspark info``: JAX backend, devices, mesh suggestion, package versions and active kernels."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from dspark_jax.info import collect_info

__all__ = ["info_main"]


def _print_text(info: dict[str, Any]) -> None:
    print(f"JAX backend   {info['jax_backend']} ({info['num_devices']} device(s), {info['num_processes']} process(es))")
    kinds = sorted({d['kind'] for d in info["devices"]})
    print(f"devices       {', '.join(kinds)}")
    m = info["mesh_suggestion"]
    print(f"mesh          --mesh {m['data']},{m['fsdp']},{m['model']}  (data, fsdp, model)")
    kb = info["kernel_backend"]
    print(f"kernels       backend {kb['requested']} -> {kb['resolved']}")
    for name, row in info["kernels"].items():
        low = row.get("lowers")
        low_txt = "" if low is None else "  lowers: " + " ".join(f"{p}={'yes' if ok else 'NO'}" for p, ok in low.items())
        mode = "pallas" + (" (interpret)" if row["interpret"] else "") if row["active"] else "xla"
        print(f"  {name:<24}{mode:<22}{low_txt}")
    print("packages      " + ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v))


def info_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dspark info``."""
    parser = argparse.ArgumentParser(prog="dspark info", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--check-kernels", action="store_true",
                        help="lower every kernel for TPU and CUDA at a Qwen3-4B-shaped config (adds 'lowers')")
    parser.add_argument("--backend", default="auto", choices=("auto", "xla", "pallas"),
                        help="kernel backend to report as active (default auto: Pallas on TPU/GPU)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    info = collect_info(check_kernels=args.check_kernels, backend=args.backend)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_text(info)
    if args.check_kernels and not all(all(r["lowers"].values()) for r in info["kernels"].values()):
        return 1
    return 0
