"""The README says what a new user gets: its quick start, and a support table generated from the registry."""

from __future__ import annotations

import re
from pathlib import Path

from peftfx import support

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_quick_start_is_make_demo_and_make_test():
    block = re.search(r"## Quick start\s+```sh\n(.*?)```", README, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_support_table_is_fresh():
    assert support.render(README) == README, "run: python -m peftfx.support --write README.md"


def test_support_table_lists_every_kind():
    from peftfx.adapters import KINDS

    table = support.table()
    for name in KINDS:
        assert f"| `{name}` |" in table
