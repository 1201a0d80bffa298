"""Pieces shared by the `dspark` subcommands: the exit code, the user-facing error, arg types."""

from __future__ import annotations

import argparse

__all__ = ["EXIT_ERROR", "CliError", "positive_int"]

EXIT_ERROR = 2  # bad input, like argparse usage errors


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
