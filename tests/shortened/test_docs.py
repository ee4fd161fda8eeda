"""The generated parts of the docs are current: every setting is in docs/configuration.md
with its default and meaning."""

from __future__ import annotations

from scripts.update_docs import CONFIGURATION, with_current_table
from shortened.config import Settings


def test_settings_table_is_current() -> None:
    text = CONFIGURATION.read_text()
    assert with_current_table(text) == text, "run: python scripts/update_docs.py"
    for name in Settings.model_fields:
        assert f"`SHORTENED_{name.upper()}`" in text
