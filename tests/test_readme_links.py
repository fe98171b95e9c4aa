"""The README is the front door: short, and every relative link in it leads somewhere.

The docs site (docs/) is checked by `make docs` (Sphinx, -W -n); the README is read on the
repository page, outside that build, so its links are checked here.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
FRONT_PAGES = ["README.md", "ARCHITECTURE.md"]


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's (and MyST's `myst_heading_anchors`) slugs of a markdown file's headings."""
    tokens = MarkdownIt().parse(markdown)
    anchors = set()
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type == "heading_open":
            text = re.sub(r"[^\w\- ]", "", inline.content.lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def relative_links(markdown: str) -> list[str]:
    """Targets of the markdown links outside code (absolute URLs left out: nothing is fetched)."""
    links = []
    for token in MarkdownIt().parse(markdown):
        for child in token.children or []:
            href = child.attrGet("href") if child.type == "link_open" else None
            if href and not re.match(r"[a-z][a-z0-9+.-]*:", href):
                links.append(href)
    return links


def broken_links(page: Path) -> list[str]:
    broken = []
    text = page.read_text(encoding="utf-8")
    for href in relative_links(text):
        path, _, anchor = href.partition("#")
        target = (page.parent / path) if path else page
        if not target.exists():
            broken.append(f"{href}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{href}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("name", FRONT_PAGES)
def test_every_relative_link_leads_to_a_file_and_heading(name):
    assert broken_links(ROOT / name) == []


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "guide.md").write_text("# Use with TRL\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text("[ok](guide.md#use-with-trl) [gone](missing.md) [anchor](guide.md#nope)\n"
                    "`[in code](also-missing.md)`\n", encoding="utf-8")
    assert broken_links(page) == ["missing.md: no such file", "guide.md#nope: no heading with that anchor"]


def test_readme_stays_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < 200, f"README.md has {lines} lines: move the detail into docs/"
