"""Tests of the offline corpus builder (dspark_jax.data.corpus / html_text / debian_docs / cli)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from dspark_jax.data import (
    DOMAINS,
    SPLITS,
    CorpusConfig,
    CorpusSourceError,
    build_corpus,
    fetch_debian_docs,
    html_to_text,
    iter_documents,
    load_manifest,
    split_for_path,
)
from dspark_cli.corpus_cmd import build_corpus_main

FRACTIONS = (0.6, 0.2, 0.2)  # wide val/test so tiny fake corpora fill every split

PAGE = """<!DOCTYPE html><html><head><title>T</title><style>p {{color: red}}</style>
<script>var x = "<p>not text</p>";</script></head><body>
<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li></ul></div>
<div class="sphinxsidebar"><h3>Table of Contents</h3><ul><li>sidebar entry</li></ul></div>
<div class="body" role="main"><section>
<h1>{title}<a class="headerlink" href="#x">¶</a></h1>
<p>Some   <strong>prose</strong> &amp; text
across lines, caf&eacute; 世界.</p>
<div class="highlight"><pre><span class="k">def</span> f():
    return  1

x = f()</pre></div>
<ul><li><p>first item</p></li><li>second <em>item</em></li></ul>
<div><div>nested div</div></div>
</section></div>
<div class="footer">&copy; Copyright footer</div></body></html>
"""


def _write(path: str, data: str | bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)


def make_sources(root: str, n_py: int = 18, n_html: int = 14) -> tuple[str, str]:
    """Fake stdlib + docs trees with a few files that must be skipped or excluded.

    With seed 0 and FRACTIONS, 18 .py / 14 .html files put at least one file in every split.
    """
    lib, docs = os.path.join(root, "lib"), os.path.join(root, "html")
    for i in range(n_py):
        source = f"def f_{i}(x):\n    return x * {i}\n"
        _write(os.path.join(lib, f"pkg{i % 3}", f"mod_{i}.py"), source)
    _write(os.path.join(lib, "pkg0", "__init__.py"), "")  # skipped: empty
    _write(os.path.join(lib, "latin.py"), "s = 'caf\xe9'\n".encode("latin-1"))  # skipped: not utf-8
    _write(os.path.join(lib, "nul.py"), b"x = 1\x00\n")  # skipped: binary
    _write(os.path.join(lib, "site-packages", "third.py"), "import os\n")  # excluded
    _write(os.path.join(lib, "pkg1", "__pycache__", "mod.py"), "x = 1\n")  # excluded
    _write(os.path.join(lib, "README.txt"), "not python\n")  # excluded
    for i in range(n_html):
        section = "library" if i % 2 else "tutorial"
        _write(os.path.join(docs, section, f"p{i}.html"), PAGE.format(title=f"Page {i}"))
    _write(os.path.join(docs, "blank.html"), "<html><body><script>x</script></body></html>")
    excluded_pages = ("genindex.html", "genindex-A.html", "search.html", "contents.html")
    for excluded in (*excluded_pages, "_static/x.html"):
        _write(os.path.join(docs, excluded), PAGE.format(title="excluded"))
    return lib, docs


@pytest.fixture()
def sources(tmp_path):
    return make_sources(str(tmp_path / "src"))


def _config(tmp_path, sources, **kw) -> CorpusConfig:
    lib, docs = sources
    kw.setdefault("fractions", FRACTIONS)
    kw.setdefault("out_dir", str(tmp_path / "corpus"))
    return CorpusConfig(stdlib_dir=lib, docs_dir=docs, **kw)


def _read_all(corpus: str) -> dict[tuple[str, str], list]:
    return {(d, s): list(iter_documents(corpus, d, s)) for d in DOMAINS for s in SPLITS}


def test_split_for_path_deterministic_and_proportional():
    paths = [f"a/b/file_{i}.py" for i in range(4000)]
    first = [split_for_path(p, 0, (0.9, 0.05, 0.05)) for p in paths]
    assert first == [split_for_path(p, 0, (0.9, 0.05, 0.05)) for p in reversed(paths)][::-1]
    share = {s: first.count(s) / len(paths) for s in SPLITS}
    assert abs(share["train"] - 0.9) < 0.03 and abs(share["test"] - 0.05) < 0.02
    assert first != [split_for_path(p, 1, (0.9, 0.05, 0.05)) for p in paths]
    assert {split_for_path(p, 0, (1.0, 0.0, 0.0)) for p in paths[:200]} == {"train"}


def test_build_splits_by_file_without_overlap(tmp_path, sources):
    config = _config(tmp_path, sources)
    build_corpus(config)
    docs = _read_all(config.out_dir)
    for domain in DOMAINS:
        seen = [d.path for s in SPLITS for d in docs[domain, s]]
        assert len(seen) == len(set(seen))  # each file in exactly one split
        for split in SPLITS:
            assert docs[domain, split], (domain, split)
            for d in docs[domain, split]:
                assert split_for_path(d.path, 0, FRACTIONS) == split
    code_paths = {d.path for s in SPLITS for d in docs["code", s]}
    assert len(code_paths) == 18 and all(p.startswith("pkg") for p in code_paths)
    prose_paths = {d.path for s in SPLITS for d in docs["prose", s]}
    assert len(prose_paths) == 14
    assert not any("genindex" in p or "_static" in p for p in prose_paths)
    text = next(d.text for d in docs["code", "train"])
    assert text.startswith("def f_")


def test_build_is_order_independent_and_reproducible(tmp_path, sources):
    first = build_corpus(_config(tmp_path, sources, out_dir=str(tmp_path / "a")))
    # Same files created in reverse order under another root: identical content.
    lib, docs = sources
    copy_root = tmp_path / "copy"
    for src, name in ((lib, "lib"), (docs, "html")):
        files = sorted(
            os.path.relpath(os.path.join(dp, f), src) for dp, _, fs in os.walk(src) for f in fs
        )
        for rel in reversed(files):
            dst = copy_root / name / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(src, rel), dst)
    second = build_corpus(
        CorpusConfig(out_dir=str(tmp_path / "b"), stdlib_dir=str(copy_root / "lib"),
                     docs_dir=str(copy_root / "html"), fractions=FRACTIONS)
    )
    assert first["content_hash"] == second["content_hash"]
    assert first["domains"] == second["domains"]
    for d in DOMAINS:
        for s in SPLITS:
            name = f"{d}/{s}.jsonl"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    third = build_corpus(_config(tmp_path, sources, out_dir=str(tmp_path / "c"), seed=7))
    assert third["content_hash"] != first["content_hash"]


def test_manifest_contents(tmp_path, sources):
    config = _config(tmp_path, sources, seed=3)
    manifest = build_corpus(config)
    assert load_manifest(config.out_dir) == manifest
    assert manifest["seed"] == 3
    assert manifest["fractions"] == dict(zip(SPLITS, FRACTIONS))
    assert manifest["sources"]["code"]["stdlib_dir"] == os.path.abspath(sources[0])
    assert manifest["sources"]["code"]["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert manifest["sources"]["prose"]["docs_dir"] == os.path.abspath(sources[1])
    assert manifest["sources"]["prose"]["deb_package"] is None
    assert manifest["content_hash"].startswith("sha256:")
    code = manifest["domains"]["code"]
    assert code["skipped"]["by_reason"] == {"binary": 1, "empty": 1, "not_utf8": 1}
    skipped = {f["path"] for f in code["skipped"]["files"]}
    assert skipped == {"pkg0/__init__.py", "latin.py", "nul.py"}
    assert manifest["domains"]["prose"]["skipped"]["by_reason"] == {"empty": 1}
    docs = _read_all(config.out_dir)
    for domain in DOMAINS:
        for split in SPLITS:
            stats = manifest["domains"][domain]["splits"][split]
            assert stats["files"] == len(docs[domain, split])
            assert stats["chars"] == sum(len(d.text) for d in docs[domain, split])
            assert stats["bytes"] == sum(len(d.text.encode()) for d in docs[domain, split])
            path = os.path.join(config.out_dir, domain, f"{split}.jsonl")
            assert stats["jsonl_bytes"] == os.path.getsize(path)
            assert os.stat(path).st_mode & stat.S_IROTH  # normal permissions, not mkstemp's 0600
    leftovers = [f for _, _, fs in os.walk(config.out_dir) for f in fs if ".tmp" in f]
    assert leftovers == []


def test_max_files_per_domain_keeps_split_assignment(tmp_path, sources):
    config = _config(tmp_path, sources, max_files_per_domain=5, fractions=(0.9, 0.05, 0.05))
    manifest = build_corpus(config)
    docs = _read_all(config.out_dir)
    for domain in DOMAINS:
        counts = [manifest["domains"][domain]["splits"][s]["files"] for s in SPLITS]
        assert sum(counts) <= 5 and counts[0] >= 1
        for split in SPLITS:
            for d in docs[domain, split]:
                assert split_for_path(d.path, 0, config.fractions) == split
    again = build_corpus(_config(tmp_path, sources, out_dir=str(tmp_path / "again"),
                                 max_files_per_domain=5, fractions=(0.9, 0.05, 0.05)))
    assert again["content_hash"] == manifest["content_hash"]


def test_html_to_text_strips_boilerplate():
    text = html_to_text(PAGE.format(title="Title"))
    assert text == (
        "Title\n\nSome prose & text across lines, café 世界.\n\n"
        "def f():\n    return  1\n\nx = f()\n\n- first item\n\n- second item\n\nnested div"
    )
    plain = html_to_text("<html><body><h2>Head</h2><p>a<br>b</p><style>x</style><table>"
                         "<tr><td>1</td><td>2</td></tr></table></body></html>")
    assert plain == "Head\n\na\n\nb\n\n1 | 2"


def test_missing_and_bad_sources(tmp_path, sources):
    lib, docs = sources
    out = str(tmp_path / "out")
    with pytest.raises(CorpusSourceError, match="stdlib"):
        build_corpus(CorpusConfig(out_dir=out, stdlib_dir=str(tmp_path / "nope"), docs_dir=docs))
    with pytest.raises(CorpusSourceError, match="does not exist"):
        build_corpus(CorpusConfig(out_dir=out, stdlib_dir=lib, docs_dir=str(tmp_path / "nope")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusSourceError, match="no .html"):
        build_corpus(CorpusConfig(out_dir=out, stdlib_dir=lib, docs_dir=str(empty)))
    with pytest.raises(CorpusSourceError, match="no .py"):
        build_corpus(CorpusConfig(out_dir=out, stdlib_dir=str(empty), docs_dir=docs))
    for bad in ((0.5, 0.2, 0.2), (0.9, 0.1), (1.1, -0.05, -0.05), (0.0, 0.5, 0.5)):
        with pytest.raises(ValueError, match="fraction"):
            CorpusConfig(out_dir=out, fractions=bad)
    with pytest.raises(ValueError, match="max_files_per_domain"):
        CorpusConfig(out_dir=out, max_files_per_domain=0)
    with pytest.raises(FileNotFoundError, match="manifest"):
        iter_documents(str(empty), "code", "train")
    build_corpus(_config(tmp_path, sources))
    with pytest.raises(ValueError, match="domain"):
        iter_documents(str(tmp_path / "corpus"), "poetry", "train")
    with pytest.raises(ValueError, match="split"):
        iter_documents(str(tmp_path / "corpus"), "code", "dev")


def _fake_apt(tmp_path, monkeypatch, *, deb: str | None) -> None:
    """Put a fake ``apt-get`` on PATH: copies ``deb`` on download, or fails (missing package)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = "#!/bin/sh\n"
    if deb is None:
        script += 'echo "E: Unable to locate package $2" >&2\nexit 100\n'
    else:
        script += f'[ "$1" = update ] && exit 0\ncp "{deb}" .\n'
    (bindir / "apt-get").write_text(script)
    (bindir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


def test_docs_package_download_failure_is_clear(tmp_path, monkeypatch, sources):
    _fake_apt(tmp_path, monkeypatch, deb=None)
    config = CorpusConfig(out_dir=str(tmp_path / "out"), stdlib_dir=sources[0],
                          cache_dir=str(tmp_path / "cache"), docs_package="python3.11-doc")
    expected = r"python3\.11-doc.*apt-get download python3\.11-doc"
    with pytest.raises(CorpusSourceError, match=expected):
        build_corpus(config)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")
    rc = build_corpus_main(["--out", str(tmp_path / "out"), "--stdlib-dir", sources[0],
                            "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2


def test_fetch_debian_docs_extracts_a_deb(tmp_path, monkeypatch, sources):
    pkg_root = tmp_path / "pkg"
    html = pkg_root / "usr" / "share" / "doc" / "python3.11" / "html"
    shutil.copytree(sources[1], html)
    (pkg_root / "DEBIAN").mkdir()
    (pkg_root / "DEBIAN" / "control").write_text(
        "Package: python3.11-doc\nVersion: 3.11.2-9\nArchitecture: all\n"
        "Maintainer: t <t@example.com>\nDescription: fake docs\n"
    )
    deb = tmp_path / "python3.11-doc_3.11.2-9_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg_root), str(deb)],
                   check=True, capture_output=True)
    _fake_apt(tmp_path, monkeypatch, deb=str(deb))
    cache = str(tmp_path / "cache")
    got = fetch_debian_docs(cache, "python3.11-doc")
    assert got.version == "3.11.2-9" and got.html_dir.endswith("usr/share/doc/python3.11/html")
    assert os.path.isfile(os.path.join(got.html_dir, "library", "p1.html"))
    manifest = build_corpus(CorpusConfig(out_dir=str(tmp_path / "out"), stdlib_dir=sources[0],
                                         cache_dir=cache, fractions=FRACTIONS))
    prose = manifest["sources"]["prose"]
    assert prose["deb_package"] == "python3.11-doc" and prose["deb_version"] == "3.11.2-9"
    assert len(prose["deb_sha256"]) == 64 and prose["docs_dir"] is None


def test_cli_build_corpus(tmp_path, sources, capsys):
    out = str(tmp_path / "cli")
    rc = build_corpus_main([
        "--out", out, "--stdlib-dir", sources[0], "--docs-dir", sources[1],
        "--seed", "2", "--fractions", "0.6,0.2,0.2", "--max-files-per-domain", "6",
    ])
    assert rc == 0
    assert load_manifest(out)["seed"] == 2
    assert "code:" in capsys.readouterr().out
    rc = build_corpus_main(["--out", out, "--docs-dir", sources[1], "--fractions", "0.5,0.1,0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "sum to 1" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:  # argparse usage error
        build_corpus_main(["--out", out, "--fractions", "abc"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_real_stdlib_and_debian_docs(tmp_path):
    """End to end on the real sources: this interpreter's stdlib + apt-get download of the docs."""
    out = str(tmp_path / "real")
    cache = str(tmp_path / "cache")
    rc = build_corpus_main(["--out", out, "--max-files-per-domain", "6", "--cache-dir", cache])
    assert rc == 0
    manifest = load_manifest(out)
    assert manifest["sources"]["prose"]["deb_package"] == "python3.11-doc"
    assert manifest["sources"]["prose"]["deb_version"]
    for domain in DOMAINS:
        counts = [manifest["domains"][domain]["splits"][s]["files"] for s in SPLITS]
        assert counts == [4, 1, 1], (domain, counts)
    prose = list(iter_documents(out, "prose", "train"))
    assert prose and all(d.text and "<div class=" not in d.text for d in prose)
    assert all(d.path.endswith(".py") for d in iter_documents(out, "code", "train"))
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as fh:
        assert json.load(fh)["content_hash"] == manifest["content_hash"]
