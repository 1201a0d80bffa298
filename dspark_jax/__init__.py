"""dspark-jax: DSpark confidence-scheduled speculative decoding in JAX/Flax.

The library: model-level pieces `TargetConfig`, `TargetModel`, `KVCache`, `DraftConfig`,
`DraftModel`, `SamplingConfig`, checkpoint I/O (`load_target`, `save_target`, `load_draft`,
`save_draft`), `Tokenizer`, and the sharding helpers (`make_mesh`, `target_param_shardings`).

Generation lives one floor up, in the `infer` package (the library never imports its callers)::

    >>> from infer import generate, load_target_bundle, load_draft_bundle

The confidence scheduler (`prefix_schedule`, `async_schedule`, `survival_from_confidence`) lives
in `dspark_jax.scheduling`.
"""

from dspark_jax.config import ConfigError, TargetConfig
from dspark_jax.sampling import SamplingConfig, SamplingError

__all__ = [
    "ConfigError", "TargetConfig", "SamplingConfig", "SamplingError",
    "TargetModel", "KVCache", "DraftConfig", "DraftModel",
    "load_target", "save_target", "load_draft", "save_draft", "Tokenizer",
    "make_mesh", "target_param_shardings",
    "prefix_schedule", "survival_from_confidence", "async_schedule",
]

_LAZY = {
    "TargetModel": "dspark_jax.target.model",
    "KVCache": "dspark_jax.target.kv_cache",
    "DraftConfig": "dspark_jax.draft.config",
    "DraftModel": "dspark_jax.draft.model",
    "load_target": "dspark_jax.checkpoint.hf",
    "save_target": "dspark_jax.checkpoint.hf",
    "load_draft": "dspark_jax.checkpoint.deepspec",
    "save_draft": "dspark_jax.checkpoint.deepspec",
    "Tokenizer": "dspark_jax.tokenizer",
    "make_mesh": "dspark_jax.sharding",
    "target_param_shardings": "dspark_jax.sharding",
    "prefix_schedule": "dspark_jax.scheduling",
    "survival_from_confidence": "dspark_jax.scheduling",
    "async_schedule": "dspark_jax.scheduling",
}


def __getattr__(name: str):
    """Import the public symbols that live in heavier submodules on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dspark_jax' has no attribute {name!r}")
