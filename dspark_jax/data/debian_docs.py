"""Fetch the CPython HTML documentation from Debian's ``python3.X-doc`` package.

Uses ``apt-get download`` (never ``apt install``: nothing is installed on the system) inside a cache
directory and ``dpkg-deb -x`` into a versioned extraction directory. Both steps are cached: a
second call with the same cache directory does no network access. If the lists are missing,
``apt-get update`` is run once and the download retried; any remaining failure raises
:class:`CorpusSourceError` naming the package and the command that failed.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

__all__ = ["CorpusSourceError", "DebianDocs", "fetch_debian_docs", "find_html_root"]


class CorpusSourceError(RuntimeError):
    """A corpus source (stdlib dir, docs dir or Debian package) is missing or unusable."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DebianDocs:
    """Where a fetched documentation package lives.

    Attributes:
        package: Debian package name, e.g. ``python3.11-doc``.
        version: the package version (``dpkg-deb -f DEB Version``).
        deb_path: the cached ``.deb`` file.
        deb_sha256: sha256 of the ``.deb`` file.
        html_dir: directory holding the HTML pages.
    """

    package: str
    version: str
    deb_path: str
    deb_sha256: str
    html_dir: str


def _run(cmd: list[str], *, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; a missing executable becomes a failed result."""
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:  # executable not found / not runnable
        return subprocess.CompletedProcess(cmd, 127, "", str(exc))


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "error", "dpkg-deb: error"))]
    return (errors or lines or [f"exit status {proc.returncode}"])[-1].strip()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_html_root(docs_dir: str, package: str = "python3.11-doc") -> str:
    """Return the directory of HTML pages inside ``docs_dir``.

    Accepts either the HTML directory itself or a ``dpkg-deb -x`` extraction root containing
    ``usr/share/doc/<python>/html``.

    Raises:
        CorpusSourceError: if ``docs_dir`` does not exist or holds no ``.html`` file.
    """
    if not os.path.isdir(docs_dir):
        raise CorpusSourceError(f"docs directory does not exist: {docs_dir}")
    python = package[: -len("-doc")] if package.endswith("-doc") else package
    nested = os.path.join(docs_dir, "usr", "share", "doc", python, "html")
    root = nested if os.path.isdir(nested) else docs_dir
    for _dirpath, _dirs, files in os.walk(root):
        if any(name.endswith(".html") for name in files):
            return root
    raise CorpusSourceError(f"docs directory contains no .html files: {docs_dir}")


def _download_deb(package: str, deb_dir: str) -> str:
    """Return a cached ``.deb`` for ``package`` in ``deb_dir``, downloading it if needed."""
    os.makedirs(deb_dir, exist_ok=True)
    pattern = os.path.join(deb_dir, f"{package}_*.deb")
    cached = sorted(glob.glob(pattern))
    if cached:
        return cached[-1]
    cmd = ["apt-get", "download", package]
    proc = _run(cmd, cwd=deb_dir)
    if proc.returncode != 0:
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise CorpusSourceError(
                f"cannot obtain Debian package {package!r}: `{' '.join(cmd)}` failed "
                f"({_last_line(proc)}) and `apt-get update` failed ({_last_line(update)})"
            )
        proc = _run(cmd, cwd=deb_dir)
    found = sorted(glob.glob(pattern))
    if proc.returncode != 0 or not found:
        raise CorpusSourceError(
            f"cannot obtain Debian package {package!r}: `{' '.join(cmd)}` (in {deb_dir}) failed: "
            f"{_last_line(proc)}; pass --docs-dir with an extracted copy to skip the download"
        )
    return found[-1]


def fetch_debian_docs(cache_dir: str, package: str = "python3.11-doc") -> DebianDocs:
    """Download (``apt-get download``) and extract (``dpkg-deb -x``) a Python docs package.

    Args:
        cache_dir: directory for the ``.deb`` (``<cache_dir>/debs``) and the extraction
            (``<cache_dir>/<package>_<version>``). Created if missing.
        package: Debian package name.

    Returns:
        A :class:`DebianDocs` describing the package and its HTML directory.

    Raises:
        CorpusSourceError: if the package cannot be downloaded or extracted.
    """
    deb_path = _download_deb(package, os.path.join(cache_dir, "debs"))
    proc = _run(["dpkg-deb", "-f", deb_path, "Version"])
    if proc.returncode != 0 or not proc.stdout.strip():
        raise CorpusSourceError(
            f"cannot read version of Debian package {package!r}: "
            f"`dpkg-deb -f {deb_path} Version` failed: {_last_line(proc)}"
        )
    version = proc.stdout.strip()
    extract_dir = os.path.join(cache_dir, f"{package}_{version.replace(':', '_')}")
    if not os.path.isdir(extract_dir):
        tmp = tempfile.mkdtemp(prefix=f".{package}-", dir=cache_dir)
        proc = _run(["dpkg-deb", "-x", deb_path, tmp])
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CorpusSourceError(
                f"cannot extract Debian package {package!r}: "
                f"`dpkg-deb -x {deb_path} {tmp}` failed: {_last_line(proc)}"
            )
        try:
            os.rename(tmp, extract_dir)
        except OSError:  # a concurrent build won the race; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return DebianDocs(
        package=package,
        version=version,
        deb_path=deb_path,
        deb_sha256=_sha256_file(deb_path),
        html_dir=find_html_root(extract_dir, package),
    )
