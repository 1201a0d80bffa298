"""Train a byte-level BPE tokenizer (HF ``tokenizers``) on a corpus built by :mod:`.corpus`.

The tokenizer has no normalizer, a GPT-2 style ``ByteLevel`` pre-tokenizer with
``add_prefix_space=False`` and a ``ByteLevel`` decoder, so ``decode(encode(text)) == text`` for
any string that does not itself contain a special-token literal. Special tokens come first:

====================  ===  =========================================
``<|endoftext|>``     0    end of text (EOS; also used as BOS if any)
``<|mask|>``          1    dedicated DSpark/DFlash drafter mask token
``<|pad|>``           2    padding
====================  ===  =========================================

Output directory: ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
(loadable with ``transformers.AutoTokenizer.from_pretrained(dir)`` or
``PreTrainedTokenizerFast(tokenizer_file=...)``) and ``tokenizer_meta.json`` (ids, vocab size,
corpus hash). Training is deterministic: the same corpus gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

from dspark_jax.config import read_config_json

from .corpus import DOMAINS, CorpusFormatError, atomic_write_bytes, iter_documents, load_manifest

__all__ = [
    "EOS_TOKEN",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TokenizerTrainingConfig",
    "read_tokenizer_meta",
    "train_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, MASK_TOKEN, PAD_TOKEN)
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerTrainingConfig:
    """Options of :func:`train_tokenizer`.

    Attributes:
        corpus_dir: a directory written by :func:`dspark_jax.data.corpus.build_corpus`.
        out_dir: where the tokenizer files go (created if missing).
        vocab_size: target vocabulary size including the 256 byte tokens and the 3 special
            tokens; a tiny corpus may yield fewer (see ``tokenizer_meta.json``).
        min_frequency: minimum pair count for a merge.
        domains: corpus domains to train on.
        split: corpus split to train on (only ``train`` should be used for real models).
        model_max_length: value written to ``tokenizer_config.json``.
    """

    corpus_dir: str
    out_dir: str
    vocab_size: int = 8192
    min_frequency: int = 2
    domains: tuple[str, ...] = DOMAINS
    split: str = "train"
    model_max_length: int = 4096

    def __post_init__(self) -> None:
        if self.vocab_size < _MIN_VOCAB:
            raise ValueError(
                f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
                f"tokens), got {self.vocab_size}"
            )
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if not self.domains or unknown:
            raise ValueError(f"domains must be a non-empty subset of {DOMAINS}, got {self.domains}")
        if self.model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {self.model_max_length}")


def _texts(config: TokenizerTrainingConfig) -> Iterator[str]:
    for domain in config.domains:
        for doc in iter_documents(config.corpus_dir, domain, config.split):
            yield doc.text


def _build_untrained():
    """An empty byte-level BPE tokenizer with the pipeline described in the module docstring."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _write_json(path: str, obj: object) -> None:
    _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _hf_configs(model_max_length: int) -> tuple[dict, dict]:
    """Contents of ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    added = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    special_map = {"eos_token": EOS_TOKEN, "mask_token": MASK_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        **special_map,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
    }
    return config, special_map


def train_tokenizer(config: TokenizerTrainingConfig) -> dict:
    """Train the tokenizer on the corpus and write it to ``config.out_dir``.

    Returns:
        The contents of ``tokenizer_meta.json``: ``vocab_size`` (actual), ``requested_vocab_size``,
        ``eos_id``/``mask_id``/``pad_id`` and their strings, and the corpus ``content_hash``.

    Raises:
        FileNotFoundError: ``config.corpus_dir`` is not a built corpus.
        ValueError: the selected split holds no text.
    """
    import tokenizers
    from tokenizers import pre_tokenizers, trainers

    manifest = load_manifest(config.corpus_dir)
    n_docs = sum(
        manifest["domains"][d]["splits"][config.split]["files"] for d in config.domains
    )
    if n_docs == 0:
        raise ValueError(f"corpus split {config.split!r} of {config.domains} holds no documents")
    tok = _build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(config), trainer=trainer, length=n_docs)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if [ids[t] for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"unexpected special-token ids after training: {ids}")

    os.makedirs(config.out_dir, exist_ok=True)
    _write_text(os.path.join(config.out_dir, "tokenizer.json"), tok.to_str(pretty=True))
    hf_config, special_map = _hf_configs(config.model_max_length)
    _write_json(os.path.join(config.out_dir, "tokenizer_config.json"), hf_config)
    _write_json(os.path.join(config.out_dir, "special_tokens_map.json"), special_map)
    meta = {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": config.vocab_size,
        "eos_token": EOS_TOKEN,
        "eos_id": ids[EOS_TOKEN],
        "mask_token": MASK_TOKEN,
        "mask_id": ids[MASK_TOKEN],
        "pad_token": PAD_TOKEN,
        "pad_id": ids[PAD_TOKEN],
        "min_frequency": config.min_frequency,
        "domains": list(config.domains),
        "split": config.split,
        "documents": n_docs,
        "corpus_content_hash": manifest["content_hash"],
        "tokenizers_version": tokenizers.__version__,
    }
    _write_json(os.path.join(config.out_dir, "tokenizer_meta.json"), meta)
    return meta


_META_INT_FIELDS = ("vocab_size", "requested_vocab_size", "eos_id", "mask_id", "pad_id", "documents")


def read_tokenizer_meta(path: str) -> dict:
    """The ``tokenizer_meta.json`` at `path`, checked: a JSON object whose id / size fields are integers >= 0.

    Raises CorpusFormatError naming the file and the field (bad UTF-8, bad JSON, wrong types).
    """
    meta = read_config_json(path, CorpusFormatError)
    for key in _META_INT_FIELDS:
        value = meta.get(key)
        if key in meta and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise CorpusFormatError(f"{path}: field {key!r} must be an integer >= 0, got {value!r}")
    return meta
