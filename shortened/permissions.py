"""Files and directories this package creates through temporary names (written whole, then
renamed into place) get the permissions a plain ``open``/``mkdir`` would give them: the user's
umask applied to 0666 / 0777, not the 0600 / 0700 of ``tempfile``."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path: Path | str) -> None:
    """Give ``path`` the mode a plain create would have given it."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    path.chmod(base & ~current_umask())
