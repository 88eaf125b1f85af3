"""Benchmark tables in the docs, refreshed by the script that measures them, never copied by hand.

A page (README.md or one under docs/) holds a table between `<!-- table:NAME -->` and
`<!-- /table:NAME -->`; `write_table(NAME, text)` replaces what lies between them in every page that
has the pair. A benchmark calls `check_table(NAME)` before it measures, so a missing marker stops it
at once instead of after an hour of training.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def _markers(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- table:{re.escape(name)} -->\n).*?(\n<!-- /table:{re.escape(name)} -->)", re.DOTALL)


def replace_table(text: str, name: str, table: str) -> str:
    """`text` with `table` between the markers NAME (unchanged where there are none)."""
    # a function, not a replacement string: a table's backslashes must not be read as group references
    return _markers(name).sub(lambda found: found.group(1) + table.strip("\n") + found.group(2), text)


def check_table(name: str, root: Path = ROOT) -> list[Path]:
    """The pages that hold the markers NAME; SystemExit naming the markers when none does."""
    pages = [page for page in _pages(root) if page.is_file() and _markers(name).search(page.read_text())]
    if not pages:
        raise SystemExit(f"no page of README.md or docs/ holds <!-- table:{name} --> ... <!-- /table:{name} -->")
    return pages


def write_table(name: str, table: str, root: Path = ROOT) -> list[Path]:
    """Put `table` between the markers NAME in every page that holds them; the pages written."""
    pages = check_table(name, root)
    for page in pages:
        page.write_text(replace_table(page.read_text(), name, table))
    return pages
