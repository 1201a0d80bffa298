"""The Colab badges and notebook install cells all derive from pyproject's repository URL."""

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("set_repo_url", ROOT / "scripts" / "set_repo_url.py")
set_repo_url = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(set_repo_url)


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    for rel in ["pyproject.toml", "README.md", *(f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb"))]:
        shutil.copy(ROOT / rel, root / rel)
    return root


def test_committed_tree_agrees_with_pyproject():
    assert set_repo_url.check(ROOT) == []


def test_set_repository_rewrites_every_place(tmp_path):
    root = _copy_tree(tmp_path)
    changed = set_repo_url.set_repository(root, "acme/dspark-jax", branch="dev")
    notebooks = sorted((root / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 3 and set(notebooks) | {root / "README.md", root / "pyproject.toml"} == set(changed)
    assert set_repo_url.repository(root) == "acme/dspark-jax"
    assert set_repo_url.check(root, branch="dev") == []
    for nb in notebooks:
        text = nb.read_text()
        assert f"colab.research.google.com/github/acme/dspark-jax/blob/dev/notebooks/{nb.name}" in text
        assert 'https://github.com/acme/dspark-jax\\")' in text
        assert "github/OWNER" not in text and "github.com/OWNER" not in text
    assert set_repo_url.set_repository(root, "acme/dspark-jax", branch="dev") == []  # idempotent


def test_check_names_the_disagreeing_file_and_line(tmp_path):
    root = _copy_tree(tmp_path)
    nb = root / "notebooks" / "quickstart.ipynb"
    nb.write_text(nb.read_text().replace("blob/main/notebooks/quickstart.ipynb", "blob/main/notebooks/serving.ipynb"))
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("github/OWNER/dspark-jax", "github/someone/else", 1))
    problems = set_repo_url.check(root)
    assert any(p.startswith("notebooks/quickstart.ipynb:") and "expected notebooks/quickstart.ipynb" in p
               for p in problems), problems
    assert any(p.startswith("README.md:") and "someone/else" in p for p in problems), problems
    assert set_repo_url.main(["--check", "--root", str(root)]) == 1
