"""What ``dspark train-target`` and ``dspark train-draft`` share: config flags, run flags, error exits.

  * `add_config_flags`: one ``--field-name V`` flag per field of a training-config dataclass
    (`dest="cfg_<field>"`, default None = not given), typed from the field's annotation;
  * `add_run_flags` / `add_output_flags`: ``--resume --stop-at --mesh`` and
    ``--no-progress --no-export --print-config``;
  * `config_from_flags`: base (e.g. a preset) <- ``--config FILE`` <- explicit flags;
  * `run_training_command`: parse, ``--print-config``, input checks, train, print the JSON
    summary; expected failures print ``<prog>: error: <message>`` to stderr and return `EXIT_ERROR`.
    With the multi-process flags, `jax.distributed.initialize` runs after the input checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any, Callable, Iterable, Mapping, Sequence

from dspark_cli.errors import EXIT_ERROR, report_error  # the one CLI error/exit stack of every command
from train.distributed import add_distributed_flags, distributed_error, initialize_from_args

__all__ = ["EXIT_ERROR", "parse_bool", "parse_optional_int", "parse_str_list", "parse_int_list", "mesh_parser",
           "add_config_flags", "add_run_flags", "add_output_flags", "flag_overrides", "config_from_flags",
           "report_error", "input_error", "run_training_command"]


# ---------------------------------------------------------------------------------------------- flag values
def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_optional_int(text: str) -> int | None:
    if text.strip().lower() in ("none", "null", "auto"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def parse_str_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_int_list(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() in ("none", "null", "auto"):
        return None
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or 'auto', got {text!r}") from None


def mesh_parser(expected: str) -> Callable[[str], tuple[int, int, int]]:
    """Parser of ``--mesh DATA,FSDP,MODEL``; a bad value says ``expected <expected>, got '<text>'``."""

    def parse_mesh(text: str) -> tuple[int, int, int]:
        try:
            sizes = tuple(int(p) for p in text.split(","))
        except ValueError:
            sizes = ()
        if len(sizes) != 3 or min(sizes) < 1:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return sizes  # type: ignore[return-value]

    return parse_mesh


def _type_parser(hint: Any) -> Callable[[str], Any]:
    if hint is bool:
        return parse_bool
    if hint in (int, float, str):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # int | None
        return parse_optional_int
    return parse_str_list  # tuple[str, ...]


# ---------------------------------------------------------------------------------------------- parser
def add_config_flags(group: Any, config_cls: type, *, aliases: Mapping[str, list[str]] | None = None,
                     parsers: Mapping[str, Callable[[str], Any]] | None = None) -> None:
    """``--field-name V`` (plus `aliases[field]`) for every field of `config_cls`, into `dest="cfg_<field>"`.

    The value parser follows the annotation (bool: true/false, `int | None`: an integer or 'auto',
    tuples: comma lists) unless `parsers[field]` names one.
    """
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flags = ["--" + f.name.replace("_", "-")] + list((aliases or {}).get(f.name, []))
        parse = (parsers or {}).get(f.name) or _type_parser(hints[f.name])
        group.add_argument(*flags, dest=f"cfg_{f.name}", type=parse, default=None, metavar="V",
                           help=f"default {f.default!r}")


def add_run_flags(p: argparse.ArgumentParser, *, mesh_expected: str, mesh_example: str) -> None:
    """``--resume``, ``--stop-at STEP``, ``--mesh DATA,FSDP,MODEL`` and the multi-process flags
    (`train.distributed.add_distributed_flags`)."""
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop this invocation after STEP (checkpointed)")
    p.add_argument("--mesh", type=mesh_parser(mesh_expected), metavar="DATA,FSDP,MODEL",
                   help=f"device mesh, e.g. {mesh_example}")
    add_distributed_flags(p)


def add_output_flags(p: argparse.ArgumentParser, *, export_what: str) -> None:
    """``--no-progress``, ``--no-export``, ``--print-config``."""
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-export", action="store_true", help=f"skip the final {export_what} export")
    p.add_argument("--print-config", action="store_true", help="print the merged config as JSON and exit")


# ---------------------------------------------------------------------------------------------- config
def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given as flags (``--mesh`` sets the three mesh fields)."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if args.mesh is not None:
        overrides.update(mesh_data=args.mesh[0], mesh_fsdp=args.mesh[1], mesh_model=args.mesh[2])
    return overrides


def _flag_source(args: argparse.Namespace, overrides: Mapping[str, Any], message: str) -> str:
    """The flags (``--name value``) whose fields `message` mentions, e.g. ``--hidden-size 0``."""
    named = []
    for field, value in overrides.items():
        if field in message:
            if field.startswith("mesh_") and args.mesh is not None:
                text = "--mesh " + ",".join(map(str, args.mesh))
            else:
                text = f"--{field.replace('_', '-')} {value if not isinstance(value, tuple) else ','.join(map(str, value))}"
            if text not in named:
                named.append(text)
    return ", ".join(named) if named else "command-line flags"


def config_from_flags(config_cls: Any, args: argparse.Namespace, *, base: Mapping[str, Any] | None = None) -> Any:
    """Defaults <- `base` <- ``--config`` JSON <- explicit flags; the class's `config_error` on bad values.

    An invalid value is blamed on where it came from: the config file when the file alone is
    invalid, else the flag(s) naming the offending field (``--hidden-size 0: hidden_size must be ...``).
    """
    overrides = flag_overrides(args)
    data = {**dict(base or {})}
    if args.config:
        from train.config_io import read_json_object

        file_data = read_json_object(args.config, config_cls.config_error)
        config_cls.from_dict({**data, **file_data}, source=args.config)  # the file alone must be valid
        data.update(file_data)
    try:
        return config_cls.from_dict({**data, **overrides}, source="command line")
    except config_cls.config_error as e:
        message = str(e).removeprefix("command line: ")
        raise config_cls.config_error(f"{_flag_source(args, overrides, message)}: {message}") from None


# ---------------------------------------------------------------------------------------------- running
def input_error(args: argparse.Namespace, dirs: Iterable[tuple[str, str | None]],
                extra: Iterable[tuple[bool, str]] = ()) -> str | None:
    """The first problem with the run arguments, or None.

    `dirs`: (flag, path) pairs that must be existing directories when given; ``--out`` must not
    be a file; `extra`: further (is-bad, message) checks; ``--stop-at`` must be >= 1; the
    multi-process flags must be complete and consistent.
    """
    for flag, path in dirs:
        if path is not None and not os.path.isdir(path):
            return f"{flag} directory not found: {path}"
    from train.distributed import is_remote

    if not is_remote(args.out) and os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out exists and is not a directory: {args.out}"
    for bad, message in extra:
        if bad:
            return message
    if args.stop_at is not None and args.stop_at < 1:
        return f"--stop-at must be >= 1, got {args.stop_at}"
    return distributed_error(args)


def run_training_command(argv: Sequence[str] | None, *, parser: argparse.ArgumentParser,
                         config_from_args: Callable[[argparse.Namespace], Any], config_error: type[Exception],
                         error: Callable[[str], int], dirs: Callable[[argparse.Namespace], Iterable],
                         extra_checks: Callable[[argparse.Namespace], Iterable] = lambda args: (),
                         train: Callable[[Any, argparse.Namespace], Any],
                         train_errors: Callable[[], tuple[type[Exception], ...]],
                         summary: Callable[[Any], dict]) -> int:
    """The body of a training command; returns the exit status (0 ok, EXIT_ERROR bad input).

    `config_from_args(args)` may raise `config_error`; `train(config, args)` runs (heavy imports
    belong inside it) and may raise any of `train_errors()`; `summary(result)` is printed as JSON.
    """
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        config = config_from_args(args)
    except config_error as e:
        return error(str(e))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    message = input_error(args, dirs(args), extra_checks(args))
    if message is not None:
        return error(message)
    errors = train_errors()
    try:
        initialize_from_args(args)
    except (RuntimeError, ValueError) as e:  # unreachable coordinator, bad environment on a pod, ...
        return error(f"jax.distributed.initialize failed: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}")
    try:
        result = train(config, args)
    except errors as e:
        return error(str(e))
    print(json.dumps(summary(result), sort_keys=True))
    return 0
