"""The ``dspark`` command line: entry points above the library (`dspark_jax`) and `infer`/`train`.

`dspark_cli.main` holds the subcommand table; each subcommand lives in its own module and is
imported only when run, so ``dspark --help`` stays fast (no JAX import). `dspark_cli.errors` is
the one error/exit stack every subcommand uses.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    """Run the ``dspark`` command line; see `dspark_cli.main.main`."""
    from dspark_cli.main import main as _main

    return _main(argv)
