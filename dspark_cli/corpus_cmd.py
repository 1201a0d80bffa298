"""Command-line entry points ``dspark build-corpus`` and ``dspark train-tokenizer``.

Both return a process exit status (0 on success); expected failures (bad options, missing
sources, a docs package that cannot be downloaded, a malformed corpus line) print one
``<prog>: error: ...`` line to stderr and return 2 (`dspark_cli.errors`), like argparse usage errors.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from dspark_cli.errors import run_command, seed_int
from dspark_jax.data.corpus import DOMAINS, SPLITS, CorpusConfig, build_corpus
from dspark_jax.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer

__all__ = ["build_corpus_main", "train_tokenizer_main"]

# Config validation in the data package raises plain ValueError (fractions, vocabulary size, ...).
_EXTRA_ERRORS = (ValueError, OSError)


def _fractions(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def build_corpus_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark build-corpus``."""
    parser = argparse.ArgumentParser(
        prog="dspark build-corpus",
        description=(
            "Build the offline two-domain text corpus: 'code' = the running Python's stdlib .py "
            "sources, 'prose' = the CPython HTML docs from Debian's python3.11-doc package "
            "(apt-get download + dpkg-deb -x, cached; nothing is installed). Files are split "
            "into train/validation/test by a seeded hash of their path. Writes "
            "OUT/{code,prose}/{train,validation,test}.jsonl and OUT/manifest.json."
        ),
    )
    parser.add_argument("--out", required=True, help="output corpus directory")
    parser.add_argument(
        "--max-files-per-domain", type=int, default=None, metavar="N",
        help="keep at most N files per domain (seeded sample; default: all)",
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="split/sample seed (default 0)")
    parser.add_argument(
        "--fractions", type=_fractions, default=(0.9, 0.05, 0.05), metavar="TRAIN,VAL,TEST",
        help="split fractions, must sum to 1 (default 0.9,0.05,0.05)",
    )
    parser.add_argument(
        "--docs-dir", default=None,
        help="already-extracted docs (HTML dir or dpkg-deb -x root); skips the download",
    )
    parser.add_argument(
        "--cache-dir", default=None,
        help="download/extraction cache "
        "(default $XDG_CACHE_HOME/dspark_jax or ~/.cache/dspark_jax)",
    )
    parser.add_argument(
        "--stdlib-dir", default=None,
        help="code source directory (default: this interpreter's stdlib)",
    )
    parser.add_argument(
        "--docs-package", default="python3.11-doc",
        help="Debian docs package (default python3.11-doc)",
    )
    return parser


def build_corpus_main(argv: Sequence[str] | None = None) -> int:
    """Run ``dspark build-corpus`` with ``argv`` (default ``sys.argv[1:]``); return exit status."""
    def body(args: argparse.Namespace) -> int:
        config = CorpusConfig(
            out_dir=args.out,
            seed=args.seed,
            fractions=args.fractions,
            max_files_per_domain=args.max_files_per_domain,
            stdlib_dir=args.stdlib_dir,
            docs_dir=args.docs_dir,
            cache_dir=args.cache_dir,
            docs_package=args.docs_package,
        )
        manifest = build_corpus(config)
        for domain in DOMAINS:
            info = manifest["domains"][domain]
            parts = ", ".join(
                f"{s} {info['splits'][s]['files']} files/{info['splits'][s]['bytes'] / 1e6:.2f} MB"
                for s in SPLITS
            )
            print(f"{domain}: {parts}; skipped {info['skipped']['count']}")
        print(f"wrote {args.out} (content {manifest['content_hash']})")
        return 0

    return run_command("dspark build-corpus", build_corpus_parser(), body, argv, extra_errors=_EXTRA_ERRORS)


def train_tokenizer_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark train-tokenizer``."""
    parser = argparse.ArgumentParser(
        prog="dspark train-tokenizer",
        description=(
            "Train a byte-level BPE tokenizer (HF tokenizers) on the train split of a corpus "
            "built by 'dspark build-corpus'. Special tokens: <|endoftext|>=0 (EOS), "
            "<|mask|>=1 (drafter mask), <|pad|>=2. Writes tokenizer.json, tokenizer_config.json, "
            "special_tokens_map.json (loadable by transformers.AutoTokenizer) and "
            "tokenizer_meta.json. Deterministic for a given corpus."
        ),
    )
    parser.add_argument("--corpus", required=True, help="corpus directory (has manifest.json)")
    parser.add_argument("--out", required=True, help="output tokenizer directory")
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="vocabulary size (default 8192)"
    )
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)"
    )
    parser.add_argument(
        "--domains", default=",".join(DOMAINS),
        help=f"comma-separated corpus domains to train on (default {','.join(DOMAINS)})",
    )
    return parser


def train_tokenizer_main(argv: Sequence[str] | None = None) -> int:
    """Run ``dspark train-tokenizer`` with ``argv`` (default ``sys.argv[1:]``); return status."""
    def body(args: argparse.Namespace) -> int:
        config = TokenizerTrainingConfig(
            corpus_dir=args.corpus,
            out_dir=args.out,
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()),
        )
        meta = train_tokenizer(config)
        print(json.dumps(meta, indent=2))
        return 0

    return run_command("dspark train-tokenizer", train_tokenizer_parser(), body, argv, extra_errors=_EXTRA_ERRORS)
