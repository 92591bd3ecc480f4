"""The README's method table is generated from the registry; this fails when it is stale.

Regenerate with: python tests/test_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

from optimlab.registry import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- methods:start[^\n]*-->\n)(.*?)(<!-- methods:end -->)", re.S)


def rendered(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + markdown_table() + "\n" + m.group(3), text)


def test_readme_method_table_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    assert BLOCK.search(text), "README lost its methods block"
    assert text == rendered(text), "README method table is stale: run python tests/test_readme.py"


if __name__ == "__main__":
    README.write_text(rendered(README.read_text(encoding="utf-8")), encoding="utf-8")
