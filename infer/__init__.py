"""Generation on top of the `dspark_jax` library: the jitted loops, `generate()`, evaluation.

    from infer import generate, stream, load_target_bundle, load_draft_bundle

    target = load_target_bundle("path/to/qwen3_dir")
    draft = load_draft_bundle("path/to/dspark_draft", target)
    result = generate(target, "def fib(n):", draft=draft, max_new_tokens=64)

The names below are imported from their modules on first use (importing `infer` stays cheap).
"""

__all__ = ["generate", "stream", "load_target_bundle", "load_draft_bundle", "Target", "Draft", "GenerationResult",
           "GenerationError"]

_LAZY = {
    "generate": "infer.api",
    "stream": "infer.api",
    "load_target_bundle": "infer.api",
    "Target": "infer.api",
    "GenerationResult": "infer.api",
    "GenerationError": "infer.api",
    "load_draft_bundle": "infer.speculative_api",
    "Draft": "infer.speculative_api",
}


def __getattr__(name: str):
    """Import the public generation symbols from their modules on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'infer' has no attribute {name!r}")
