"""The one error/exit stack of every ``dspark`` subcommand (and of ``train/cli_*``).

A subcommand raises; `run_command` turns the *expected* failures — bad values, missing or
malformed files, invalid checkpoints — into one ``<prog>: error: <message>`` line on stderr and
returns `EXIT_ERROR` (2, like argparse usage errors). Anything else (a bug) keeps its traceback.
An interrupt prints one line and returns 130.

Expected error types are collected from the modules already imported (`expected_errors`), so this
module imports neither JAX nor the library and ``dspark --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Iterable, Sequence

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "CliError", "positive_int", "seed_int", "log", "report_error",
           "check_dir", "check_output_dir", "check_output_file", "check_text", "read_text_lines", "expected_errors",
           "run_command"]

EXIT_ERROR = 2  # bad input, like argparse usage errors
EXIT_INTERRUPTED = 130
SEED_MAX = 2**63 - 1  # numpy / JAX PRNG seeds are 64-bit

# (module, class name) of the user-facing error types of the library and its callers. A type counts
# only once its module has been imported (nothing else can have raised it).
_ERROR_TYPES: tuple[tuple[str, str], ...] = (
    ("dspark_jax.config", "ConfigError"),
    ("dspark_jax.sampling", "SamplingError"),
    ("dspark_jax.checkpoint.hf_layout", "CheckpointError"),
    ("dspark_jax.draft.config", "DraftConfigError"),
    ("dspark_jax.tokenizer", "TokenizerError"),
    ("dspark_jax.data.corpus", "CorpusSourceError"),
    ("dspark_jax.data.corpus", "CorpusFormatError"),
    ("dspark_jax.calibration", "CalibrationFileError"),
    ("infer.api", "GenerationError"),
    ("infer.request_validation", "RequestError"),
    ("infer.evaluate", "PromptFileError"),
    ("train.regenerate", "RegenerateError"),
)


class CliError(ValueError):
    """A bad command-line value that argparse itself cannot detect (message is user-facing)."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2^63 - 1] (what the PRNG accepts without overflowing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2^63 - 1], got {value}")
    return value


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries only results)."""
    print(f"[dspark] {msg}", file=sys.stderr, flush=True)


def report_error(prog: str, message: object, *, one_line: bool = True) -> int:
    """Print ``<prog>: error: <message>`` on stderr (whitespace collapsed to one line); `EXIT_ERROR`."""
    text = " ".join(str(message).split()) if one_line else str(message)
    print(f"{prog}: error: {text}", file=sys.stderr)
    return EXIT_ERROR


def check_dir(path: str, option: str) -> None:
    """FileNotFoundError naming `option` unless `path` is an existing directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{option} directory not found: {path!r}")


def check_output_dir(path: str, option: str) -> None:
    """CliError unless `path` is (or can become) a writable directory; creates nothing.

    Run before any computation, so a bad output location fails in a second, not after the work.
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CliError(f"{option} {path!r} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CliError(f"{option} {path!r} is not writable")
        return
    parent = _existing_ancestor(path)
    if not os.path.isdir(parent):
        raise CliError(f"{option} {path!r}: {parent!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{option} {path!r}: cannot create it inside {parent!r} (not writable)")


def check_output_file(path: str, option: str) -> None:
    """CliError unless a file can be written at `path` (its directory must already exist); creates nothing."""
    if os.path.isdir(path):
        raise CliError(f"{option} {path!r} is a directory")
    if path.endswith(("/", os.sep)):
        raise CliError(f"{option} {path!r}: directory does not exist")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CliError(f"{option} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{option} {path!r}: directory {parent!r} is not writable")


def check_text(text: str, where: str) -> str:
    """`text` unchanged if it is valid Unicode (UTF-8 encodable); CliError naming `where` otherwise.

    Catches arguments that were not UTF-8 on the command line (Python keeps their bytes as lone
    surrogates) and lone surrogates written as ``\\ud800`` escapes in JSON.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raw = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"lone surrogate {bad!r}"
        raise CliError(f"{where}: not valid UTF-8 text ({raw} at character {e.start})") from None
    return text


def read_text_lines(path: str) -> list[str]:
    """The lines of UTF-8 text file `path` (line endings stripped); CliError naming the file and 1-based
    line of the first invalid UTF-8 byte sequence."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path!r}")
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as e:
                raise CliError(f"{path}:{lineno}: not valid UTF-8 text ({e.reason} at byte {e.start} of the "
                               f"line)") from None
    return lines


def _existing_ancestor(path: str) -> str:
    cur = os.path.abspath(path)
    while not os.path.exists(cur):
        up = os.path.dirname(cur)
        if up == cur:
            break
        cur = up
    return cur


def expected_errors(extra: Iterable[type[BaseException]] = ()) -> tuple[type[BaseException], ...]:
    """The error types reported as one line: CliError, OS-level file errors, text decoding errors, the
    library's own error types (only from modules already imported) and `extra`."""
    errors: list[type[BaseException]] = [CliError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                         PermissionError, UnicodeError, *extra]
    for module, name in _ERROR_TYPES:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(getattr(mod, name, None), type):
            errors.append(getattr(mod, name))
    return tuple(errors)


def run_command(prog: str, parser: argparse.ArgumentParser, runner: Callable[[argparse.Namespace], Any],
                argv: Sequence[str] | None, *, extra_errors: Iterable[type[BaseException]] = ()) -> int:
    """Parse `argv` (default ``sys.argv[1:]``), call `runner(args)`; return its status (None -> 0).

    Expected errors -> one ``<prog>: error:`` line and `EXIT_ERROR`; Ctrl-C -> `EXIT_INTERRUPTED`.
    argparse's ``--help`` / usage errors keep raising SystemExit (0 / 2).
    """
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return int(runner(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - re-raised unless it is an expected error type
        if isinstance(e, expected_errors(extra_errors)):
            return report_error(prog, _message(e))
        raise


def _message(e: BaseException) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"not valid UTF-8 text ({e.reason} at byte {e.start})"
    if isinstance(e, UnicodeEncodeError):
        return f"text cannot be encoded as UTF-8 ({e.reason} at character {e.start})"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)
