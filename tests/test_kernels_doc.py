"""docs/kernels.md is generated from pyvmbus.mock.generations and cannot drift from it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from pyvmbus.mock.generations import BEHAVIOURS, GENERATIONS, SOURCES, kernels_markdown

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from kernels_md import BEGIN, END  # noqa: E402


def test_the_page_holds_the_generated_table() -> None:
    text = (ROOT / "docs" / "kernels.md").read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block == "\n" + kernels_markdown(), "docs/kernels.md is stale: run scripts/kernels_md.py"


def test_every_row_names_a_test_that_exists_and_every_column_a_source() -> None:
    assert set(SOURCES) == set(GENERATIONS)
    for b in BEHAVIOURS:
        path, name = b.test.split("::")
        tree = ast.parse((ROOT / path).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in names, f"{b.title}: {b.test} does not exist"
        for g in GENERATIONS.values():
            assert b.value(g) and b.source(g), f"{b.title} / {g.name} has an empty cell"
