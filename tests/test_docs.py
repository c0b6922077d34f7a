"""The documentation: the site builds strictly, the README's and Getting started's code runs, no page repeats another.

The site build needs the ``docs`` extra, which the ``test`` extra includes.
"""
import ast
import importlib
import os
import re
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import pytest
from repo_path import ROOT, child_env

ROOT = Path(ROOT)
DOCS = ROOT / "docs"
RUN_PAGES = ["README.md", "docs/getting-started.md"]
SKIP = re.compile(r"<!-- docs-test: skip \((.+?)\) -->\s*$")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def pages():
    """Every page of the site as it is in the repository: README.md, BENCHMARKS.md and docs/*.md."""
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]


def python_blocks(page):
    """``(first line, code, skip reason or None)`` of each ```python block of ``page``."""
    text = (ROOT / page).read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = SKIP.match(before)
        blocks.append((text.count("\n", 0, match.start()) + 2, match.group(2), reason and reason.group(1)))
    return blocks


def build_site(tmp_path, docs_dir=None):
    """``mkdocs build --strict`` of the repository's site (or of a copy's, ``docs_dir``) into tmp_path."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install '.[docs]', or '.[test]')")
    config = ROOT / "mkdocs.yml"
    if docs_dir is not None:  # the same configuration, reading another docs folder
        config = tmp_path / "mkdocs.yml"
        config.write_text((ROOT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs_dir}")
                          .replace("- docs/hooks.py", f"- {DOCS}/hooks.py").replace("paths: [.]", f"paths: [{ROOT}]"))
    env = child_env({**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d",
                           str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - started


def test_site_builds_strictly(tmp_path, capsys):
    done, seconds = build_site(tmp_path)
    with capsys.disabled():
        print(f"\n[docs] mkdocs build --strict: {seconds:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    for page in ("index.html", "BENCHMARKS/index.html", "api/index.html", "getting-started/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "index.html").read_text()
    assert "Wraps a base optimizer for PoF post-training" in api  # a docstring, rendered
    index = (site / "index.html").read_text()
    assert 'href="getting-started/"' in index  # the README's docs/ links point at the site's pages


def test_strict_build_fails_on_a_broken_link(tmp_path):
    copy = tmp_path / "docs"
    copy.mkdir()
    for path in DOCS.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(DOCS)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(DOCS)).write_bytes(path.read_bytes())
    page = copy / "capture.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    done, _ = build_site(tmp_path, docs_dir=copy)
    assert done.returncode != 0
    assert "no-such-page.md" in done.stdout + done.stderr


def test_every_public_name_has_an_api_entry():
    api = (DOCS / "api.md").read_text()
    modules = {"pof_fast": importlib.import_module("pof_fast")}
    for name in ("lightning", "transformers"):
        modules[f"pof_fast.integrations.{name}"] = pytest.importorskip(f"pof_fast.integrations.{name}")
    missing = [f"{module}.{name}" for module, m in modules.items() for name in m.__all__
               if not name.startswith("__") and f"::: {module}.{name}\n" not in api]
    assert not missing, f"docs/api.md has no entry for {missing}"


@pytest.mark.parametrize("page", RUN_PAGES)
def test_code_blocks_run(page, tmp_path):
    """Every Python block of the page not marked as needing the reader's own model or data, in order, in one process."""
    blocks = [(line, code) for line, code, reason in python_blocks(page) if reason is None]
    assert blocks, f"{page} has no Python block to run"
    script = "\n".join(f"# {page}, line {line}\n{code}" for line, code in blocks)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=child_env(dict(os.environ)),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("page,line,code,reason",
                         [(p, line, code, reason) for p in RUN_PAGES for line, code, reason in python_blocks(p) if reason],
                         ids=lambda v: v if isinstance(v, str) and len(v) < 80 and "\n" not in v else "")
def test_marked_blocks_compile(page, line, code, reason):
    """A block that needs the reader's own model or data is not run, but it must still be valid Python."""
    ast.parse(code, filename=f"{page}:{line}")
    assert "your" in reason  # the marker says what of the reader's the block needs


def sentences(text):
    """The prose sentences of a markdown page, paragraph by paragraph (code, tables and comments left out)."""
    text = FENCE.sub("\n\n", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    found = []
    for paragraph in re.split(r"\n\s*\n|\n(?=\s*[-*] )", text):
        lines = [line.strip() for line in paragraph.splitlines() if not line.lstrip().startswith(("|", "#"))]
        prose = " ".join(lines).lstrip("-* ").strip()
        found.append([s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`*(\[])", prose) if s])
    return found


def consecutive_pairs(text):
    return {(a, b) for paragraph in sentences(text) for a, b in zip(paragraph, paragraph[1:])}


def test_no_two_pages_share_two_consecutive_sentences():
    pairs = {page: consecutive_pairs(page.read_text()) for page in pages()}
    shared = [(a.relative_to(ROOT), b.relative_to(ROOT), sorted(pairs[a] & pairs[b])[0])
              for a, b in combinations(pairs, 2) if pairs[a] & pairs[b]]
    assert not shared, "each fact lives on one page, the others link to it; repeated:\n" + "\n".join(
        f"{a} and {b}: {pair[0]} {pair[1]}" for a, b, pair in shared)


def test_the_repetition_check_sees_a_repeated_paragraph():
    paragraph = "PoF keeps the head fixed. It post-trains the feature extractor. The head is never updated."
    assert consecutive_pairs(f"# A\n\n{paragraph}\n") & consecutive_pairs(f"Intro.\n\n- {paragraph}\n")
    assert not consecutive_pairs("# A\n\nOne sentence here. Another one.\n") & consecutive_pairs(
        "One sentence here.\n\nAnother one.\n")
