"""Every ```python block of README.md runs as written, under Triton's interpreter without a GPU
(conftest sets TRITON_INTERPRET=1 and a temporary cache). A block that is not meant to run says
so inside itself with a comment `# not run: <why>`; such blocks stay few."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
NOT_RUN = re.compile(r"#\s*not run:\s*(\S.*)")
MAX_NOT_RUN = 2


def blocks() -> list[tuple[int, str]]:
    """(first line number, code) of each python block."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def runnable() -> list:
    return [pytest.param(code, id=f"README.md:{line}") for line, code in blocks()
            if not NOT_RUN.search(code)]


def test_the_readme_has_python_blocks_and_few_that_do_not_run():
    assert len(blocks()) >= 4
    skipped = [code for _, code in blocks() if NOT_RUN.search(code)]
    assert len(skipped) <= MAX_NOT_RUN, skipped


@pytest.mark.parametrize("code", runnable())
def test_readme_block_runs_as_written(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(code, str(README), "exec"), {"__name__": "readme_snippet"})
