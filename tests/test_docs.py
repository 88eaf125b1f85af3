"""The docs: the site builds with `mkdocs build --strict`, its registry pages list what the code
registers, the README stays a front door, and benchmark scripts can rewrite their tables."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from colam.datasets import DATASETS
from colam.methods import METHODS
from colam.models import MODELS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site as `make docs` builds it, into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_the_site_builds_strictly_with_every_page(site):
    for page in ("index", "cli/index", "methods/index", "models/index", "datasets/index", "pipeline/index",
                 "kubeflow/index", "reliability/index", "benchmarks/index", "contributing/index", "api/index"):
        assert (site / f"{page}.html").is_file(), page
    # the API reference is rendered from the docstrings, not left as `::: module` text
    api = (site / "api" / "index.html").read_text()
    assert 'id="colam.methods.base.Method"' in api and ":::" not in api


@pytest.mark.parametrize("page, registry", [("methods", METHODS), ("models", MODELS), ("datasets", DATASETS)])
def test_the_registry_pages_list_every_registered_name(site, page, registry):
    html = (site / page / "index.html").read_text()
    assert "registry:" not in html  # the hook replaced its marker
    for name in registry:
        assert f"<td><code>{name}</code></td>" in html, f"{page}: {name} is registered but not listed"


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


def test_a_benchmark_rewrites_its_table_between_the_markers_and_nothing_else(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text("before\n<!-- table:t -->\n| old |\n<!-- /table:t -->\nafter \\1\n<!-- table:u -->\nu\n<!-- /table:u -->\n")
    (tmp_path / "README.md").write_text("no tables here\n")
    assert harness.write_table("t", "| new \\1 |\n|---|\n", tmp_path) == [page]
    assert page.read_text() == ("before\n<!-- table:t -->\n| new \\1 |\n|---|\n<!-- /table:t -->\nafter \\1\n"
                                "<!-- table:u -->\nu\n<!-- /table:u -->\n")
    with pytest.raises(SystemExit, match="table:missing"):
        harness.check_table("missing", tmp_path)

