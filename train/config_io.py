"""What the frozen training-config dataclasses share: JSON / dict loading and the common checks.

`TargetTrainConfig` (`train.target_config`) and `DraftTrainConfig` (`train.draft_config`) are
flat frozen dataclasses loaded from a JSON file and/or command-line flags (flags win) and
stored in every checkpoint. `TrainConfigBase` gives both:

  * `from_dict` / `from_json_file` / `to_dict` / `write_json` / `replace`: unknown keys, invalid
    values and unreadable files raise the subclass's `config_error` (a ValueError) with a message
    that names the source and the field;
  * `num_devices`, `tokens_per_step`, and the checks of the fields both configs have
    (`_check_positive`, `_check_common`), called from the subclasses' `__post_init__`.

The field blocks both configs share are small frozen dataclasses composed into them by
inheritance (as levanter composes its trainer / optimizer configs): `OptimizerFields`
(steps, batch, AdamW, schedule, dtype, seed), `MeshFields` (data x fsdp x model) and
`IntervalFields` (log / eval / checkpoint intervals, export dtype). A config redeclares a field
only to change its default. The configs stay flat: the same CLI flags and the same saved JSON.

`BOOKKEEPING_FIELDS` are the fields both configs allow to change on resume (they do not change
the math of a step: bookkeeping, or the device layout, which orbax reshards on restore).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, TypeVar

__all__ = ["TrainConfigBase", "OptimizerFields", "MeshFields", "IntervalFields", "BOOKKEEPING_FIELDS", "DTYPES",
           "read_json_object"]

BOOKKEEPING_FIELDS: frozenset[str] = frozenset({
    "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints",
    "export_dtype", "mesh_data", "mesh_fsdp", "mesh_model",
})

DTYPES = ("float32", "bfloat16")

_C = TypeVar("_C", bound="TrainConfigBase")


def read_json_object(path: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in the file `path`; `error(message)` if it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise error(f"config file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{path}: cannot read JSON config ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerFields:
    """Optimisation block: steps and global batch, AdamW + warmup/cosine schedule, compute dtype, seed."""

    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.04
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    compute_dtype: str = "float32"
    seed: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshFields:
    """Device mesh block: data x fsdp x model (the product is the number of devices used)."""

    mesh_data: int = 1
    mesh_fsdp: int = 1
    mesh_model: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntervalFields:
    """Bookkeeping block: log / eval / checkpoint intervals, kept checkpoints, export dtype."""

    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 4
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    export_dtype: str = "bfloat16"


SHARED_POSITIVE_FIELDS = ("steps", "batch_size", "mesh_data", "mesh_fsdp", "mesh_model", "log_every", "eval_every",
                          "eval_batches", "ckpt_every", "keep_checkpoints")


class TrainConfigBase:
    """Mixin for a flat frozen training-config dataclass (see the module docstring).

    Subclasses also inherit `OptimizerFields`, `MeshFields` and `IntervalFields`, set
    `config_error` (the exception class of bad files / keys / values) and have the fields
    `seq_len` and `domains`.
    """

    config_error: type[ValueError] = ValueError

    # ------------------------------------------------------------------ derived
    @property
    def num_devices(self) -> int:
        """Devices the mesh needs (`mesh_data * mesh_fsdp * mesh_model`)."""
        return self.mesh_data * self.mesh_fsdp * self.mesh_model

    @property
    def tokens_per_step(self) -> int:
        """Sequence tokens per optimizer step (`batch_size * seq_len`)."""
        return self.batch_size * self.seq_len

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ checks (from __post_init__)
    def _check_positive(self, names: Iterable[str]) -> None:
        """Each of `names` and of the shared blocks' counts must be a positive int (not bool)."""
        for name in (*SHARED_POSITIVE_FIELDS, *names):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def _check_common(self, dtype_fields: Iterable[str]) -> None:
        """Schedule, clipping, dtype and domain checks (the last ones of both configs)."""
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        for name in dtype_fields:
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be a non-empty list without repeats, got {list(self.domains)}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any], *, source: str = "config") -> _C:
        """Build from a dict; unknown keys and invalid values raise `config_error` naming them.

        JSON lists become tuples, and a JSON integer given for a float field becomes a float.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise cls.config_error(f"{source}: unknown field(s) {unknown}; known: {sorted(names)}")
        kw = dict(data)
        for f in dataclasses.fields(cls):
            v = kw.get(f.name)
            if isinstance(f.default, float) and isinstance(v, int) and not isinstance(v, bool):
                kw[f.name] = float(v)  # JSON `3` for a float field
            elif isinstance(v, list):
                kw[f.name] = tuple(v)
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise cls.config_error(f"{source}: {e}") from e

    @classmethod
    def from_json_file(cls: type[_C], path: str | os.PathLike, *, base: Mapping[str, Any] | None = None,
                       **overrides: Any) -> _C:
        """`base` (e.g. a preset) <- JSON object at `path` <- `overrides` (e.g. command-line flags)."""
        p = os.fspath(path)
        data = read_json_object(p, cls.config_error)
        return cls.from_dict({**dict(base or {}), **data, **overrides}, source=p)

    def write_json(self, path: str | os.PathLike) -> None:
        """Write the config as pretty JSON (local: temp file then rename; URLs via `etils.epath`)."""
        from train.distributed import out_path

        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        target = out_path(path)
        tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
