"""Tokenize, pack and iterate a corpus for causal-LM training, resumably.

* `load_tokenizer(dir)` reads `tokenizer.json` (+ `tokenizer_meta.json` when present) and the
  ids of `<|endoftext|>` / `<|pad|>`.
* `tokenize_split` turns one domain/split of a corpus (`dspark_jax.data.corpus` layout) into one
  int32 stream: every document followed by `<|endoftext|>`, documents in path order. Streams
  are cached as `.npy` keyed by the corpus content hash and the tokenizer's sha256.
* `pack_stream` cuts a stream into windows of `seq_len + 1` tokens with stride `seq_len` (inputs
  = window[:-1], targets = window[1:]); the last partial window is padded with `<|pad|>` and
  its padded targets get mask 0.
* `BatchIterator` shuffles the windows each epoch with `np.random.default_rng([seed, epoch])`
  and yields global batches; its whole state is `DataState(epoch, index)` and `restore` puts it
  back exactly. A partial batch at the end of an epoch is dropped.
* `validation_batches` packs each domain's validation split (unshuffled) into fixed batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from dspark_jax.data.corpus import CorpusFormatError, iter_documents, load_manifest
from dspark_jax.data.tokenizer_training import read_tokenizer_meta
from dspark_jax.data.tokenizer_training import EOS_TOKEN, PAD_TOKEN

__all__ = ["DataError", "TokenizerInfo", "load_tokenizer", "check_corpus", "tokenize_split",
           "PackedSequences", "pack_stream", "DataState", "BatchIterator", "validation_batches"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer_meta.json")


class DataError(ValueError):
    """A missing / unusable corpus or tokenizer, or a corpus too small for the batch (message says which)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerInfo:
    """A loaded `tokenizers.Tokenizer` plus what training needs to know about it."""

    tokenizer: Any
    directory: str
    vocab_size: int  # including added/special tokens
    eos_id: int
    pad_id: int
    sha256: str  # of tokenizer.json
    files: tuple[str, ...]  # tokenizer files present in `directory` (copied next to an export)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> TokenizerInfo:
    """Load `<dir>/tokenizer.json`; EOS / pad ids from `tokenizer_meta.json` or the token strings."""
    import tokenizers

    d = os.fspath(tokenizer_dir)
    path = os.path.join(d, "tokenizer.json")
    if not os.path.isdir(d):
        raise DataError(f"tokenizer directory not found: {d}")
    if not os.path.isfile(path):
        raise DataError(f"no tokenizer.json in {d} (run `dspark train-tokenizer`)")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception subclass
        raise DataError(f"{path}: cannot load tokenizer ({e})") from e
    meta_path = os.path.join(d, "tokenizer_meta.json")
    meta: dict = {}
    if os.path.isfile(meta_path):
        try:
            meta = read_tokenizer_meta(meta_path)
        except CorpusFormatError as e:
            raise DataError(str(e)) from None
    eos = meta.get("eos_id", tok.token_to_id(EOS_TOKEN))
    pad = meta.get("pad_id", tok.token_to_id(PAD_TOKEN))
    if eos is None or pad is None:
        raise DataError(f"{path}: tokenizer lacks {EOS_TOKEN!r} or {PAD_TOKEN!r}")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if "vocab_size" in meta and int(meta["vocab_size"]) != vocab:
        raise DataError(f"{meta_path} says vocab_size {meta['vocab_size']} but tokenizer.json has {vocab} tokens")
    files = tuple(n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(d, n)))
    return TokenizerInfo(tokenizer=tok, directory=d, vocab_size=vocab, eos_id=int(eos), pad_id=int(pad),
                         sha256=_sha256_file(path), files=files)


def check_corpus(corpus_dir: str | os.PathLike) -> dict:
    """The corpus manifest; DataError if `corpus_dir` is missing or not a built corpus."""
    d = os.fspath(corpus_dir)
    if not os.path.isdir(d):
        raise DataError(f"corpus directory not found: {d}")
    try:
        return load_manifest(d)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from e


def tokenize_split(corpus_dir: str, domain: str, split: str, tok: TokenizerInfo, *,
                   cache_dir: str | None = None, chunk_docs: int = 256) -> np.ndarray:
    """int32 [n_tokens] stream of `domain/split`: each document's ids followed by EOS (cached)."""
    manifest = check_corpus(corpus_dir)
    cache_path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{manifest.get('content_hash')}\0{tok.sha256}\0{domain}\0{split}".encode()).hexdigest()
        cache_path = os.path.join(cache_dir, f"{domain}-{split}-{key[:16]}.npy")
        if os.path.isfile(cache_path):
            return np.load(cache_path)
    try:
        docs = iter_documents(corpus_dir, domain, split)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from e
    parts: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        for enc in tok.tokenizer.encode_batch(batch, add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [tok.eos_id], np.int32))
        batch.clear()

    for doc in docs:
        batch.append(doc.text)
        if len(batch) >= chunk_docs:
            flush()
    if batch:
        flush()
    stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    if cache_path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache_path}.tmp-{os.getpid()}.npy"
        np.save(tmp, stream)
        os.replace(tmp, cache_path)
    return stream


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """tokens int32 [N, L + 1] (inputs = [:, :-1], targets = [:, 1:]); mask float32 [N, L] (1 = counted target)."""

    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_target_tokens(self) -> int:
        """Number of counted (unpadded) targets."""
        return int(self.mask.sum())


def pack_stream(stream: np.ndarray, seq_len: int, pad_id: int) -> PackedSequences:
    """Windows of `seq_len + 1` tokens, stride `seq_len`; the last partial window padded (mask 0)."""
    stream = np.asarray(stream, np.int32)
    n_targets = max(int(stream.shape[0]) - 1, 0)
    n = -(-n_targets // seq_len)  # ceil
    padded = np.full((n * seq_len + 1,), pad_id, np.int32)
    padded[:stream.shape[0]] = stream[:n * seq_len + 1]
    starts = np.arange(n, dtype=np.int64)[:, None] * seq_len
    tokens = padded[starts + np.arange(seq_len + 1)[None, :]]
    mask = ((starts + np.arange(seq_len)[None, :]) < n_targets).astype(np.float32)
    return PackedSequences(tokens=tokens, mask=mask)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataState:
    """Position of a `BatchIterator`: `index` windows of epoch `epoch` have been consumed."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON-ready form."""
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataState":
        """Inverse of `to_dict`."""
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


class BatchIterator:
    """Infinite iterator of shuffled global batches {tokens [B, L+1], mask [B, L]} over `data`."""

    def __init__(self, data: PackedSequences, batch_size: int, seed: int, state: DataState = DataState()):
        if len(data) < batch_size:
            raise DataError(f"training data has {len(data)} packed sequences, fewer than batch_size "
                            f"{batch_size}; use a larger corpus or a smaller batch_size / seq_len")
        self.data, self.batch_size, self.seed = data, int(batch_size), int(seed)
        self._perm_epoch, self._perm = -1, None
        self.restore(state)

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch (the remainder is dropped)."""
        return len(self.data) // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            self._perm_epoch = epoch
        return self._perm

    @property
    def state(self) -> DataState:
        """The current position (what `restore` takes)."""
        return DataState(epoch=self._epoch, index=self._index)

    def restore(self, state: DataState) -> None:
        """Continue exactly from `state`."""
        if state.index < 0 or state.index > len(self.data) or state.epoch < 0:
            raise DataError(f"data state {state} does not fit {len(self.data)} packed sequences")
        self._epoch, self._index = state.epoch, state.index

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._index + self.batch_size > len(self.data):
            self._epoch, self._index = self._epoch + 1, 0
        rows = np.sort(self._permutation(self._epoch)[self._index:self._index + self.batch_size])
        self._index += self.batch_size
        return {"tokens": self.data.tokens[rows], "mask": self.data.mask[rows]}


def validation_batches(corpus_dir: str, domains: Sequence[str], tok: TokenizerInfo, *, seq_len: int,
                       batch_size: int, max_batches: int, cache_dir: str | None = None
                       ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per domain, up to `max_batches` fixed batches of its validation split (pad rows have mask 0).

    A domain whose validation split holds no tokens maps to an empty list.
    """
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for domain in domains:
        packed = pack_stream(tokenize_split(corpus_dir, domain, "validation", tok, cache_dir=cache_dir),
                             seq_len, tok.pad_id)
        n = min(len(packed), max_batches * batch_size)
        n_batches = -(-n // batch_size)
        tokens = np.full((n_batches * batch_size, seq_len + 1), tok.pad_id, np.int32)
        mask = np.zeros((n_batches * batch_size, seq_len), np.float32)
        tokens[:n], mask[:n] = packed.tokens[:n], packed.mask[:n]
        out[domain] = [{"tokens": tokens[i * batch_size:(i + 1) * batch_size],
                        "mask": mask[i * batch_size:(i + 1) * batch_size]} for i in range(n_batches)]
    return out
