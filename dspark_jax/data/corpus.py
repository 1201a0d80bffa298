"""Reproducible offline text corpus with two domains, split by file.

* ``code``: the ``.py`` sources of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``), minus ``site-packages``/``__pycache__`` and files that are
  empty, too large, binary or not UTF-8 (those are counted in the manifest).
* ``prose``: the CPython HTML documentation from Debian's ``python3.11-doc`` package
  (``apt-get download`` + ``dpkg-deb -x`` into a cache directory, see :mod:`.debian_docs`), stripped
  to plain text by :func:`.html_text.html_to_text`; index/search/TOC pages are left out.

Each file lands in ``train``/``validation``/``test`` by a seeded sha256 of its relative path, so
the assignment does not depend on file order, on other files or on ``max_files_per_domain``.
Layout::

    <out>/code/{train,validation,test}.jsonl     # one {"path": ..., "text": ...} per line
    <out>/prose/{train,validation,test}.jsonl
    <out>/manifest.json                          # written last; its presence marks a full build
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sysconfig
import uuid
from collections.abc import Iterator

from dspark_jax.config import read_config_json

from .debian_docs import CorpusSourceError, fetch_debian_docs, find_html_root
from .html_text import html_to_text

__all__ = [
    "DOMAINS",
    "SPLITS",
    "CorpusConfig",
    "atomic_write_bytes",
    "CorpusSourceError",
    "CorpusFormatError",
    "Document",
    "build_corpus",
    "default_cache_dir",
    "iter_documents",
    "load_manifest",
    "split_for_path",
]

DOMAINS: tuple[str, ...] = ("code", "prose")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
MANIFEST_NAME = "manifest.json"
FORMAT = "dspark-corpus/v1"
_SKIP_CODE_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_SKIP_HTML_FILES = frozenset({"search.html", "py-modindex.html", "contents.html"})


class CorpusFormatError(ValueError):
    """A malformed built-corpus file (manifest or JSONL line); the message names the file and line."""


def default_cache_dir() -> str:
    """Default download cache: ``$XDG_CACHE_HOME/dspark_jax`` or ``~/.cache/dspark_jax``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache"))
    return os.path.join(base, "dspark_jax")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Options of :func:`build_corpus`.

    Attributes:
        out_dir: output directory (created if missing; existing corpus files are replaced).
        seed: seed of the split hash and of the ``max_files_per_domain`` selection.
        fractions: (train, validation, test) fractions; non-negative, sum to 1, train > 0.
        max_files_per_domain: keep at most this many files per domain (a deterministic, seeded
            sample spread over the splits by their fractions, at least one file per split with a
            non-zero fraction when N allows); ``None`` keeps all. Skip counts in the manifest
            then cover only the files examined.
        stdlib_dir: code source directory; ``None`` = the running interpreter's stdlib.
        docs_dir: an already-extracted docs directory (the HTML dir or a ``dpkg-deb -x`` root);
            ``None`` = fetch ``docs_package`` with apt-get into ``cache_dir``.
        cache_dir: download/extraction cache; ``None`` = :func:`default_cache_dir`.
        docs_package: Debian package holding the HTML docs.
        max_file_bytes: source files larger than this are skipped (reason ``too_large``).
    """

    out_dir: str
    seed: int = 0
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
    max_files_per_domain: int | None = None
    stdlib_dir: str | None = None
    docs_dir: str | None = None
    cache_dir: str | None = None
    docs_package: str = "python3.11-doc"
    max_file_bytes: int = 2_000_000

    def __post_init__(self) -> None:
        fr = tuple(float(f) for f in self.fractions)
        if len(fr) != len(SPLITS):
            raise ValueError(f"fractions must have 3 values (train, validation, test), got {fr}")
        if any(not math.isfinite(f) or f < 0 for f in fr):
            raise ValueError(f"fractions must be finite and >= 0, got {fr}")
        if abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {fr} (sum {sum(fr):.6g})")
        if fr[0] <= 0:
            raise ValueError(f"the train fraction must be > 0, got {fr}")
        object.__setattr__(self, "fractions", fr)
        if self.max_files_per_domain is not None and self.max_files_per_domain < 1:
            raise ValueError(f"max_files_per_domain must be >= 1, got {self.max_files_per_domain}")
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be >= 1, got {self.max_file_bytes}")
        if not self.out_dir:
            raise ValueError("out_dir must be a non-empty path")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Document:
    """One corpus document: ``path`` relative to its source root (POSIX separators) and text."""

    path: str
    text: str


def _unit_hash(tag: str, seed: int, relpath: str) -> float:
    """Map (tag, seed, path) to a float in [0, 1) via sha256."""
    digest = hashlib.sha256(f"{tag}\0{seed}\0{relpath}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_for_path(relpath: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """Return the split (``train``/``validation``/``test``) of a file from its relative path.

    Depends only on ``relpath``, ``seed`` and ``fractions``: never on file order or other files.
    """
    u = _unit_hash("split", seed, relpath)
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac
        if u < edge and frac > 0:
            return name
    return next(n for n, f in zip(reversed(SPLITS), reversed(fractions)) if f > 0)


def _walk(root: str, keep_dir, keep_file) -> list[str]:
    """Sorted POSIX relative paths of regular files under ``root`` passing the filters."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if keep_dir(d))
        for name in filenames:
            full = os.path.join(dirpath, name)
            if keep_file(name) and os.path.isfile(full):
                out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(out)


def _code_candidates(root: str) -> list[str]:
    return _walk(root, lambda d: d not in _SKIP_CODE_DIRS, lambda f: f.endswith(".py"))


def _prose_candidates(root: str) -> list[str]:
    def keep_file(name: str) -> bool:
        return (
            name.endswith(".html")
            and name not in _SKIP_HTML_FILES
            and not name.startswith("genindex")
        )

    return _walk(root, lambda d: not d.startswith(("_", ".")), keep_file)


def _read_doc(root: str, relpath: str, domain: str, max_bytes: int) -> tuple[str | None, str]:
    """Return (text, "") or (None, skip reason)."""
    full = os.path.join(root, *relpath.split("/"))
    if os.path.getsize(full) > max_bytes:
        return None, "too_large"
    with open(full, "rb") as fh:
        raw = fh.read()
    if b"\x00" in raw:
        return None, "binary"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    if domain == "prose":
        text = html_to_text(text)
    if not text.strip():
        return None, "empty"
    return text, ""


def _quotas(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split ``n`` files over the splits: largest remainder, >= 1 per non-empty fraction if able."""
    raw = [n * f for f in fractions]
    q = [math.floor(r) for r in raw]
    order = sorted(range(len(q)), key=lambda i: (-(raw[i] - q[i]), i))
    for i in order[: n - sum(q)]:
        q[i] += 1
    nonzero = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(nonzero):
        for i in nonzero:
            if q[i] == 0:
                q[max(range(len(q)), key=lambda j: q[j])] -= 1
                q[i] = 1
    return q


def _collect(
    root: str, candidates: list[str], domain: str, cfg: CorpusConfig
) -> tuple[dict[str, list[Document]], list[dict[str, str]]]:
    """Read candidates into per-split document lists (sorted by path) and a skip list."""
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel in candidates:
        by_split[split_for_path(rel, cfg.seed, cfg.fractions)].append(rel)
    if cfg.max_files_per_domain is None:
        quotas = [len(by_split[s]) for s in SPLITS]
    else:
        quotas = _quotas(cfg.max_files_per_domain, cfg.fractions)
        for s in SPLITS:  # seeded, order-independent sample order
            by_split[s].sort(key=lambda rel: (_unit_hash("select", cfg.seed, rel), rel))
    docs: dict[str, list[Document]] = {}
    skipped: list[dict[str, str]] = []
    for split, quota in zip(SPLITS, quotas):
        kept: list[Document] = []
        for rel in by_split[split]:
            if len(kept) >= quota:
                break
            text, reason = _read_doc(root, rel, domain, cfg.max_file_bytes)
            if text is None:
                skipped.append({"path": rel, "reason": reason})
            else:
                kept.append(Document(path=rel, text=text))
        docs[split] = sorted(kept, key=lambda d: d.path)
    skipped.sort(key=lambda s: s["path"])
    return docs, skipped


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a unique temp file in the same directory (created
    with the default umask permissions), then ``os.replace``."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _resolve_sources(cfg: CorpusConfig) -> tuple[str, str, dict, dict]:
    """Return (code root, prose root, code source info, prose source info); check they exist."""
    stdlib = cfg.stdlib_dir or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(stdlib):
        raise CorpusSourceError(f"code source (stdlib) directory does not exist: {stdlib}")
    code_info = {
        "stdlib_dir": os.path.abspath(stdlib),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }
    if cfg.docs_dir is not None:
        html_dir = find_html_root(cfg.docs_dir, cfg.docs_package)
        prose_info = {
            "docs_dir": os.path.abspath(cfg.docs_dir),
            "deb_package": None,
            "deb_version": None,
            "deb_sha256": None,
        }
    else:
        deb = fetch_debian_docs(cfg.cache_dir or default_cache_dir(), cfg.docs_package)
        html_dir = deb.html_dir
        prose_info = {
            "docs_dir": None,
            "deb_package": deb.package,
            "deb_version": deb.version,
            "deb_sha256": deb.deb_sha256,
        }
    prose_info["html_dir"] = os.path.abspath(html_dir)
    return stdlib, html_dir, code_info, prose_info


def build_corpus(config: CorpusConfig) -> dict:
    """Build the corpus described by ``config`` and return its manifest (also saved to disk).

    Raises:
        CorpusSourceError: a source directory is missing or the docs package cannot be fetched.
        ValueError: a domain ends up with no training document.
    """
    stdlib, html_dir, code_info, prose_info = _resolve_sources(config)
    os.makedirs(config.out_dir, exist_ok=True)
    manifest_path = os.path.join(config.out_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):  # an interrupted rebuild must not look complete
        os.unlink(manifest_path)
    roots = {
        "code": (stdlib, _code_candidates(stdlib)),
        "prose": (html_dir, _prose_candidates(html_dir)),
    }
    content = hashlib.sha256()
    domains: dict[str, dict] = {}
    for domain in DOMAINS:
        root, candidates = roots[domain]
        if not candidates:
            kind = ".py" if domain == "code" else ".html"
            raise CorpusSourceError(f"no {kind} files found for domain {domain!r} under {root}")
        docs, skipped = _collect(root, candidates, domain, config)
        if not docs["train"]:
            raise ValueError(f"domain {domain!r} has no usable training file under {root}")
        os.makedirs(os.path.join(config.out_dir, domain), exist_ok=True)
        stats: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            lines = [
                json.dumps({"path": d.path, "text": d.text}, ensure_ascii=False) + "\n"
                for d in docs[split]
            ]
            payload = "".join(lines).encode("utf-8")
            out_path = os.path.join(config.out_dir, domain, f"{split}.jsonl")
            atomic_write_bytes(out_path, payload)
            content.update(f"{domain}/{split}.jsonl\0{len(payload)}\0".encode())
            content.update(payload)
            stats[split] = {
                "files": len(docs[split]),
                "chars": sum(len(d.text) for d in docs[split]),
                "bytes": sum(len(d.text.encode("utf-8")) for d in docs[split]),
                "jsonl_bytes": len(payload),
            }
        reasons: dict[str, int] = {}
        for s in skipped:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        domains[domain] = {
            "candidate_files": len(candidates),
            "splits": stats,
            "skipped": {
                "count": len(skipped),
                "by_reason": dict(sorted(reasons.items())),
                "files": skipped,
            },
        }
    manifest = {
        "format": FORMAT,
        "sources": {"code": code_info, "prose": prose_info},
        "seed": config.seed,
        "fractions": dict(zip(SPLITS, config.fractions)),
        "max_files_per_domain": config.max_files_per_domain,
        "max_file_bytes": config.max_file_bytes,
        "domains": domains,
        "content_hash": "sha256:" + content.hexdigest(),
    }
    data = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write_bytes(manifest_path, data)
    return manifest


def load_manifest(corpus_dir: str) -> dict:
    """Read ``<corpus_dir>/manifest.json``.

    Raises:
        FileNotFoundError: if the directory is not a (completely built) corpus.
    """
    path = os.path.join(corpus_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"not a corpus directory (no {MANIFEST_NAME}; run `dspark build-corpus`): {corpus_dir}"
        )
    manifest = read_config_json(path, CorpusFormatError)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"unsupported corpus format {manifest.get('format')!r} in {path}")
    return manifest


def iter_documents(corpus_dir: str, domain: str, split: str) -> Iterator[Document]:
    """Yield the documents of one domain/split of a built corpus, in path order.

    Raises:
        ValueError: unknown ``domain`` or ``split``.
        FileNotFoundError: ``corpus_dir`` is not a complete corpus.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    load_manifest(corpus_dir)
    path = os.path.join(corpus_dir, domain, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file missing: {path}")
    return _read_jsonl(path)


def _read_jsonl(path: str) -> Iterator[Document]:
    """Documents of a corpus JSONL file; CorpusFormatError naming the file and 1-based line of the first
    malformed line (bad UTF-8, bad JSON, not ``{"path": str, "text": str}``, unencodable text)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise CorpusFormatError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise CorpusFormatError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("path"), str) \
                    or not isinstance(record.get("text"), str):
                raise CorpusFormatError(f"{where}: expected an object with string fields 'path' and 'text'")
            try:
                record["text"].encode("utf-8")
            except UnicodeEncodeError as e:
                raise CorpusFormatError(f"{where}: 'text' holds a lone surrogate ({e.object[e.start]!r} at "
                                        f"character {e.start}); it is not valid Unicode text") from None
            yield Document(path=record["path"], text=record["text"])
