"""Where a user-given local location points: a plain path as written, or a ``file://`` URI
percent-decoded exactly once (``file:///data/my%20model`` is ``/data/my model``). The API's
policy checks the same decoded path (``service/policy.py``), admission and the engine read it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit


def local_path(source: str) -> Path:
    if source.startswith("file://"):
        return Path(unquote(urlsplit(source).path))
    return Path(source)
