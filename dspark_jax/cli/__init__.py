"""The ``dspark`` command line (see `dspark_jax.cli.main`).

Subcommands live in their own modules and are imported only when run, so ``dspark --help``
stays fast (no JAX import).
"""

__all__ = ["main"]


def main(argv=None) -> int:
    """Run the ``dspark`` command line; see `dspark_jax.cli.main.main`."""
    from dspark_jax.cli.main import main as _main

    return _main(argv)
