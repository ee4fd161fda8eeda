"""Regenerate the generated parts of the docs: the settings table of docs/configuration.md
(between its BEGIN/END markers) from shortened.config.Settings. A test checks it is current."""

from __future__ import annotations

import sys
from pathlib import Path

from shortened.config import settings_reference

CONFIGURATION = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
BEGIN, END = "<!-- BEGIN settings (scripts/update_docs.py) -->", "<!-- END settings -->"


def with_current_table(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _old, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{settings_reference()}{END}{tail}"


def main() -> int:
    text = CONFIGURATION.read_text()
    updated = with_current_table(text)
    if updated != text:
        CONFIGURATION.write_text(updated)
        print(f"updated {CONFIGURATION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
