"""The README and docs/: short front door, links that resolve, generated tables that match the JSON.

Fast and torch-free: reads markdown files and runs docs/build_docs.py's renderer in memory.
Run: ``python -m pytest -q tests/test_docs.py``; regenerate the tables with ``python docs/build_docs.py``.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`(preflexor_core/[^`\s]*)`")


def _build_docs():
    spec = importlib.util.spec_from_file_location("build_docs", DOCS / "build_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _markdown_files() -> list[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}); move details into docs/"


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(md: Path):
    text = _without_code_blocks(md.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue                                   # URLs and same-page anchors
        path = target.split("#", 1)[0]
        if not (md.parent / path).exists():
            broken.append(target)
    assert not broken, f"{md.relative_to(ROOT)}: links to missing files: {broken}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_anchors_into_markdown_resolve(md: Path):
    text = _without_code_blocks(md.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if "#" not in target or re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        path, anchor = target.split("#", 1)
        dest = (md.parent / path) if path else md
        if dest.suffix != ".md" or not dest.exists():
            continue
        headings = re.findall(r"^#+ (.+)$", _without_code_blocks(dest.read_text(encoding="utf-8")), flags=re.M)
        if anchor not in {_slug(h) for h in headings}:
            broken.append(target)
    assert not broken, f"{md.relative_to(ROOT)}: links to missing headings: {broken}"


def test_readme_names_only_existing_modules():
    text = README.read_text(encoding="utf-8")
    paths = set(CODE_PATH.findall(text))
    paths |= {t.split("#", 1)[0] for t in LINK.findall(text) if t.startswith("preflexor_core/")}
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    assert paths, "expected the README to name some preflexor_core paths"
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_benchmarks_md_is_what_the_generator_writes():
    mod = _build_docs()
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    assert mod.render(text) == text, "docs/benchmarks.md is out of date: run python docs/build_docs.py"


def test_generator_output_is_deterministic_and_free_of_machine_paths():
    mod = _build_docs()
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    emptied = mod.MARKER.sub(lambda m: f"<!-- begin generated: {m['name']} -->\n<!-- end generated: {m['name']} -->",
                             text)
    once, twice = mod.render(emptied), mod.render(mod.render(emptied))
    assert once == twice == text
    assert str(ROOT) not in once


def test_generator_refuses_missing_or_unknown_sections():
    mod = _build_docs()
    with pytest.raises(mod.DocsError, match="missing"):
        mod.render("no markers here\n")
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    with pytest.raises(mod.DocsError, match="unknown"):
        mod.render(text + "<!-- begin generated: nope -->\n<!-- end generated: nope -->\n")
