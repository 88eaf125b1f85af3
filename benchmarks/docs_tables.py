"""Benchmark tables in the docs, refreshed by the script that measures them, never copied by hand.

A page (README.md or one under docs/) holds a table between `<!-- table:NAME -->` and `<!-- /table:NAME -->`.
A benchmark calls `check_table(NAME)` before it measures, so a missing marker stops it at once, not
after an hour of training, and `write_table(NAME, text)` when it has the table.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _markers(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- table:{re.escape(name)} -->\n).*?(\n<!-- /table:{re.escape(name)} -->)", re.DOTALL)


def check_table(name: str, root: Path = ROOT) -> list[Path]:
    """The pages that hold the markers NAME; SystemExit naming the markers when none does."""
    pages = [page for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
             if page.is_file() and _markers(name).search(page.read_text())]
    if not pages:
        raise SystemExit(f"no page of README.md or docs/ holds <!-- table:{name} --> ... <!-- /table:{name} -->")
    return pages


def write_table(name: str, table: str, root: Path = ROOT) -> list[Path]:
    """Put `table` between the markers NAME in every page that holds them; the pages written."""
    pages = check_table(name, root)
    for page in pages:  # a function, not a replacement string: a table's backslashes are no group references
        page.write_text(_markers(name).sub(lambda found: found.group(1) + table.strip("\n") + found.group(2),
                                           page.read_text()))
    return pages
