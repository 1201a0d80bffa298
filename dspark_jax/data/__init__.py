"""Offline training data: a two-domain text corpus (stdlib code + CPython docs prose) split by
file, and a byte-level BPE tokenizer trained on it. See :mod:`.corpus` and
:mod:`.tokenizer_training`; the CLI entry points live in :mod:`dspark_cli.corpus_cmd`.
"""

from .corpus import (
    DOMAINS,
    SPLITS,
    CorpusConfig,
    CorpusFormatError,
    CorpusSourceError,
    Document,
    build_corpus,
    default_cache_dir,
    iter_documents,
    load_manifest,
    split_for_path,
)
from .debian_docs import DebianDocs, fetch_debian_docs
from .html_text import html_to_text
from .tokenizer_training import (
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TokenizerTrainingConfig,
    read_tokenizer_meta,
    train_tokenizer,
)

__all__ = [
    "DOMAINS",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "SPLITS",
    "CorpusConfig",
    "CorpusFormatError",
    "CorpusSourceError",
    "DebianDocs",
    "Document",
    "TokenizerTrainingConfig",
    "build_corpus",
    "default_cache_dir",
    "fetch_debian_docs",
    "html_to_text",
    "iter_documents",
    "load_manifest",
    "read_tokenizer_meta",
    "split_for_path",
    "train_tokenizer",
]
