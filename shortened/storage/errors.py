"""What the artifact store raises besides ValueError (unsafe keys) and OSError."""

from __future__ import annotations

from typing import Any


class ArtifactNotFound(Exception):
    """The object (or published output) does not exist."""

    def __init__(self, key: str, message: str | None = None) -> None:
        super().__init__(message or f"artifact not found: {key}")
        self.key = key

    def __reduce__(self) -> Any:  # picklable (Celery result backends)
        return (type(self), (self.key, str(self)))


class IntegrityError(Exception):
    """A downloaded file does not match its manifest entry (size or sha256)."""

    def __init__(self, name: str, message: str = "integrity check failed") -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.detail = message

    def __reduce__(self) -> Any:  # picklable (Celery result backends)
        return (type(self), (self.name, self.detail))
