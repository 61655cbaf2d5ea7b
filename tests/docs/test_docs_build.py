"""The documentation site: it builds with ``mkdocs build --strict``, and the code of the
"Anatomy of a quantizer" and "Writing an algorithm" pages runs as written."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return FENCE.findall(page.read_text(encoding="utf-8"))


def test_python_blocks_are_found():
    blocks = python_blocks(DOCS / "anatomy-of-a-quantizer.md")
    assert len(blocks) >= 15
    assert all(block.strip() for block in blocks)


@pytest.mark.parametrize("page_name", ["anatomy-of-a-quantizer.md", "writing-an-algorithm.md"])
def test_page_code_runs(monkeypatch, page_name):
    """Every ```python block of the page runs, in order, in one namespace."""
    from quantwire import config

    monkeypatch.setattr(config, "IGNORE_MISSING_KEYS", False)
    monkeypatch.setattr(config, "PROGRESS", False)
    page = DOCS / page_name
    namespace: dict = {"__name__": page.stem.replace("-", "_")}
    for index, block in enumerate(python_blocks(page), start=1):
        code = compile(block, f"{page.name}[block {index}]", "exec")
        try:
            exec(code, namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"block {index} of {page.name} failed:\n{block}") from error


@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("mkdocs", "mkdocstrings", "material")),
    reason="mkdocs / mkdocstrings / mkdocs-material not installed (pip install -e '.[test]')",
)
def test_site_builds_strictly(tmp_path):
    env_cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(env_cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    pages = ("index", "getting-started", "concepts", "anatomy-of-a-quantizer", "writing-an-algorithm", "ptq-qat", "api")
    for page in pages:
        target = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert target.is_file(), f"{target} was not built"
