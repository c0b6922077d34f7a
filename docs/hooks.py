"""MkDocs hook: README.md is the site's landing page and BENCHMARKS.md one of its pages.

Both live at the repository's root, where GitHub shows them, and their links are written for that place
(``docs/cli.md``, ``benchmarks/speedup_cpu.png``); the pages under ``docs/`` reach them as ``../README.md`` and
``../BENCHMARKS.md``. This hook adds the two files (and the images BENCHMARKS.md shows) to the site and rewrites
every relative link from a repository path to the site's path, so one set of links works in both places. A link to
any other file outside ``docs/`` is left as it is, and the strict build fails on it. The API page shows the
docstrings' Sphinx roles (``:func:``) as plain code.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
FROM_ROOT = {"index.md": "README.md", "BENCHMARKS.md": "BENCHMARKS.md"}  # site page -> repository file
IMAGES = ("benchmarks/speedup_cpu.png", "benchmarks/speedup_cuda.png")  # shown by BENCHMARKS.md
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):(?=<code>)")  # Sphinx roles the docstrings use


def on_files(files: Files, config) -> Files:
    for page, source in FROM_ROOT.items():
        files.append(File.generated(config, page, content=(ROOT / source).read_text()))
    for image in IMAGES:
        files.append(File.generated(config, image, content=(ROOT / image).read_bytes()))
    return files


def site_path(repo_path: str) -> str:
    """The site's path of a file given by its path in the repository."""
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/"):]
    return {source: page for page, source in FROM_ROOT.items()}.get(repo_path, repo_path)


def on_page_markdown(markdown: str, page, config, files) -> str:
    src = page.file.src_uri
    repo_page = FROM_ROOT.get(src, "docs/" + src)  # where this page lives in the repository

    def rewrite(match: re.Match) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("#", "mailto:")):
            return match.group(0)
        path, hash_, anchor = target.partition("#")
        repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(repo_page), path))
        new = posixpath.relpath(site_path(repo_target), posixpath.dirname(src) or ".")
        return f"{match.group(1)}{new}{hash_}{anchor}{match.group(3)}"

    return LINK.sub(rewrite, markdown)


def on_page_content(html: str, page, config, files) -> str:
    """The docstrings' Sphinx roles (``:func:`line_search```) shown as the code they name, without the role."""
    return ROLE.sub("", html)
