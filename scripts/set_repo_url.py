"""Point every "Open in Colab" badge and notebook install cell at the published repository.

The repository's public path is a publication-time fact, so it lives in ONE place,
``[project.urls] Repository`` of ``pyproject.toml``; the README's Colab badge, each notebook's own
badge and each notebook's ``REPO_URL`` default (the ``git clone`` of its install cell) are derived
from it. Until the project is published the path is the placeholder ``OWNER/dspark-jax`` and the
notebooks' install cells stop with a message asking for ``DSPARK_REPO_URL``.

    python scripts/set_repo_url.py acme/dspark-jax [--branch main]   # rewrite every place
    python scripts/set_repo_url.py --check                           # exit 1 if any place disagrees
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "OWNER/dspark-jax"
_REPO_PATH = r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*"
_PYPROJECT_URL = re.compile(r'^(Repository\s*=\s*")https://github\.com/(' + _REPO_PATH + r')(")', re.M)
_BADGE = re.compile(r"(https://colab\.research\.google\.com/github/)(" + _REPO_PATH
                    + r")/blob/([A-Za-z0-9_.-]+)/(notebooks/[A-Za-z0-9_.-]+\.ipynb)")
_CLONE_URL = re.compile(r'(REPO_URL = os\.environ\.get\(\\?"DSPARK_REPO_URL\\?", \\?")https://github\.com/('
                        + _REPO_PATH + r')(\\?")')


def linked_files(root: Path) -> list[Path]:
    """The README and every notebook: the files that carry badges or an install cell."""
    return [root / "README.md", *sorted((root / "notebooks").glob("*.ipynb"))]


def repository(root: Path) -> str:
    """``owner/name`` from ``[project.urls] Repository`` of ``pyproject.toml``."""
    with open(root / "pyproject.toml", "rb") as f:
        url = tomllib.load(f).get("project", {}).get("urls", {}).get("Repository", "")
    match = re.fullmatch(r"https://github\.com/(" + _REPO_PATH + r")/?", url)
    if match is None:
        raise SystemExit(f"error: pyproject.toml: [project.urls] Repository = {url!r} is not "
                         "https://github.com/OWNER/NAME")
    return match.group(1)


def check(root: Path, branch: str = "main") -> list[str]:
    """Every place that disagrees with pyproject's repository, as ``file:line: problem`` strings."""
    repo, problems = repository(root), []
    for path in linked_files(root):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(root)}:{lineno}"
            for m in _BADGE.finditer(line):
                if m.group(2) != repo or m.group(3) != branch:
                    problems.append(f"{where}: Colab badge points at {m.group(2)}@{m.group(3)}, "
                                    f"expected {repo}@{branch}")
                if path.suffix == ".ipynb" and m.group(4) != f"notebooks/{path.name}":
                    problems.append(f"{where}: badge opens {m.group(4)}, expected notebooks/{path.name}")
            for m in _CLONE_URL.finditer(line):
                if m.group(2) != repo:
                    problems.append(f"{where}: REPO_URL clones {m.group(2)}, expected {repo}")
        if path.suffix == ".ipynb" and not any(_BADGE.search(l) for l in path.read_text("utf-8").splitlines()):
            problems.append(f"{path.relative_to(root)}: no Open-in-Colab badge")
    return problems


def set_repository(root: Path, repo: str, branch: str = "main") -> list[Path]:
    """Rewrite pyproject's URL, every badge and every ``REPO_URL`` default to ``repo``; the changed files."""
    if not re.fullmatch(_REPO_PATH, repo):
        raise SystemExit(f"error: repository {repo!r} is not OWNER/NAME")
    changed = []
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    if _PYPROJECT_URL.search(text) is None:
        raise SystemExit("error: pyproject.toml has no [project.urls] Repository = \"https://github.com/...\" line")
    edits = {pyproject: _PYPROJECT_URL.sub(lambda m: f"{m.group(1)}https://github.com/{repo}{m.group(3)}", text)}
    for path in linked_files(root):
        text = path.read_text(encoding="utf-8")
        text = _BADGE.sub(lambda m: f"{m.group(1)}{repo}/blob/{branch}/{m.group(4)}", text)
        edits[path] = _CLONE_URL.sub(lambda m: f"{m.group(1)}https://github.com/{repo}{m.group(3)}", text)
    for path, text in edits.items():
        if path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    """CLI: ``OWNER/NAME`` rewrites every place; ``--check`` reports disagreements (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", nargs="?", help="OWNER/NAME on GitHub")
    parser.add_argument("--branch", default="main", help="branch the Colab badges open (default main)")
    parser.add_argument("--check", action="store_true", help="only check that every place agrees")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check == (args.repository is not None):
        parser.error("give OWNER/NAME or --check")
    if args.repository:
        for path in set_repository(args.root, args.repository, args.branch):
            print(f"updated {path.relative_to(args.root)}")
    problems = check(args.root, args.branch)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems and repository(args.root) == PLACEHOLDER:
        print(f"note: the repository is still the placeholder {PLACEHOLDER}; "
              "run scripts/set_repo_url.py OWNER/NAME when publishing")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
