"""The documentation: the site builds in strict mode, the README's links reach files, and the
pointers the code and configs make into the pages (``docs/PAGE.md#anchor``) name a page and a
heading that exist.

``mkdocs build --strict`` fails on a broken link or anchor between pages, a page outside the
navigation and a navigation entry without its page (``validation`` in mkdocs.yml); the other
two checks reach what MkDocs does not read.
"""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# [text](target) and ![alt](target); the target up to whitespace or the closing parenthesis
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# a pointer from code or config into the pages: docs/<page>.md, optionally #<anchor>
POINTER = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
SOURCE_SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".toml", ".json", ".cfg", ".ini"}
SKIPPED_DIRS = {".git", ".venv", "venv", "runs", ".cache", "site", "node_modules", "__pycache__", "build", "dist"}


def slugify(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading: its text without markup,
    lower-cased, punctuation dropped, whitespace runs as one hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"[`*]", "", text)  # code and emphasis marks (underscores are word characters: kept)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (fenced code left out)."""
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            found.add(slugify(match.group(1)))
    return found


def test_slugify_gives_the_anchors_mkdocs_gives():
    assert slugify("Serving the adapter: merged or lora") == "serving-the-adapter-merged-or-lora"
    assert slugify("A reward model: `reward.model`") == "a-reward-model-rewardmodel"
    assert slugify("The rooms of cluster/") == "the-rooms-of-cluster"


def test_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the test extra installs it: pip install -e '.[test]')")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_links_reach_files():
    broken = []
    for target in MARKDOWN_LINK.findall((ROOT / "README.md").read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # http:, mailto:, the page's own anchors
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / path).resolve()
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {path}")
    assert not broken, "README.md links that lead nowhere:\n" + "\n".join(broken)


def source_files():
    """The project's code, configs and scripts (not the virtual environment or run outputs)."""
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts[:-1]) or not path.is_file():
            continue
        if path.suffix in SOURCE_SUFFIXES or path.name == "Makefile" or path.name.startswith("Dockerfile"):
            if path != Path(__file__).resolve():
                yield path


def test_pointers_into_the_docs_name_a_page_and_a_heading():
    broken = []
    for path in source_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for page, anchor in POINTER.findall(line):
                where = f"{path.relative_to(ROOT)}:{number}: docs/{page}" + (f"#{anchor}" if anchor else "")
                if not (DOCS / page).is_file():
                    broken.append(f"{where}: no such page")
                elif anchor and anchor not in anchors(DOCS / page):
                    broken.append(f"{where}: no heading with that anchor")
    assert not broken, "pointers into docs/ that lead nowhere:\n" + "\n".join(broken)
