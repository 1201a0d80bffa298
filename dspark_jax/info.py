"""What `dspark info` reports: JAX backend, devices, a mesh suggestion, package versions and the kernel table.

``dspark info [--json] [--check-kernels] [--backend auto|xla|pallas]``. ``--check-kernels`` lowers
every Pallas kernel for TPU and CUDA at a Qwen3-4B-shaped config from this host (no accelerator
needed) and adds ``"lowers": {"tpu": bool, "cuda": bool}`` per kernel.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

__all__ = ["collect_info", "suggest_mesh", "PACKAGES"]

PACKAGES = ("dspark-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "safetensors", "tokenizers",
            "jax-cuda12-plugin", "libtpu")


def suggest_mesh(num_devices: int, num_hosts: int = 1) -> dict[str, int]:
    """A (data, fsdp, model) mesh for inference/training on `num_devices` devices.

    Model parallelism inside a host (up to 8 devices: KV heads of Qwen3/Llama targets divide 8),
    data parallelism across hosts, FSDP never needed for <= 14B inference on one host.
    """
    per_host = max(1, num_devices // max(1, num_hosts))
    model = 1
    while model * 2 <= min(per_host, 8) and per_host % (model * 2) == 0:
        model *= 2
    return {"data": num_devices // model, "fsdp": 1, "model": model}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect_info(check_kernels: bool = False, backend: str = "auto") -> dict[str, Any]:
    """Everything ``dspark info`` prints, as a JSON-ready dict."""
    import jax

    from dspark_jax.kernels import kernel_status, resolve_backend

    devices = jax.devices()
    return {
        "jax_backend": jax.default_backend(),
        "devices": [{"id": d.id, "kind": d.device_kind, "platform": d.platform, "process": d.process_index}
                    for d in devices],
        "num_devices": len(devices), "num_processes": jax.process_count(),
        "mesh_suggestion": suggest_mesh(len(devices), jax.process_count()),
        "kernel_backend": {"requested": backend, "resolved": resolve_backend(backend)},
        "python": platform.python_version(), "packages": _versions(),
        "kernels": kernel_status(check_lowering=check_kernels, backend=backend),
    }
