"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from igsp.results import RunResults

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    if not README.is_file():
        return []
    return PYTHON_BLOCK.findall(README.read_text(encoding="utf-8"))


BLOCKS = python_blocks()


@pytest.mark.skipif(not BLOCKS, reason="README.md has no ```python block to run")
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    # Blocks run with the backbone, stream and budget they name, in an empty working folder so
    # that any run folder they write lands in tmp_path.
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}

    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)

    for value in namespace.values():
        if isinstance(value, RunResults):
            assert value.finished
            assert value.rows_done == len(value.task_names)
