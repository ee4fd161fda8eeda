"""What may be shown to a tenant of a server-side message: no traceback, no server path, no
interpreter or library version.

``redact`` is applied where job errors, job events and schedule run messages are written
(``service.stores``), so every reader (API, webhooks, CLI) sees the redacted text; the full text
goes to the server log with the job id. Object-store and job URIs (``s3://b/k``,
``job://id/f``, ``https://host/p``) and relative paths are the tenant's own names and stay.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

PATH = "<path>"
TRACEBACK_HEADER = "Traceback (most recent call last)"

# An absolute POSIX path of two or more components (/work/x, /tmp/a.b, /usr/lib/python3.12/
# site-packages/...), a home path (~/x), or a Windows drive path; not the path part of a
# URL (preceded by ':' '/' or a host name's characters).
_PATH = re.compile(
    r"(?<![\w:/.\-@%~])(?:~|[A-Za-z]:)?[/\\](?:[^\s/\\'\"<>|,;:()\[\]{}]+[/\\])+"
    r"[^\s/\\'\"<>|,;:()\[\]{}]*"
)
# Frames of a traceback quoted inside a message ('File "x.py", line 3, in f').
_FRAME = re.compile(r'File "[^"]*", line \d+(?:, in \S+)?')
_SITE_PACKAGES = re.compile(r"\S*(?:site|dist)-packages\S*")
_LIBRARIES = (
    r"python|cpython|torch|pytorch|transformers|peft|accelerate|datasets|tokenizers|"
    r"safetensors|huggingface[-_]hub|numpy|pandas|pyarrow|lm[-_]eval|pydantic(?:[-_]core)?|"
    r"fastapi|starlette|uvicorn|sqlalchemy|alembic|psycopg2?|celery|kombu|redis|boto3|"
    r"botocore|httpx|cuda|cudnn|nccl|gcc|glibc"
)
# "torch 2.3.1", "transformers==4.44.0", "Python 3.12.1", "CUDA version 12.1", "peft v0.11"
_VERSION = re.compile(
    rf"\b({_LIBRARIES})(?:\s*(?:==|>=|<=|~=|/|-|\s)\s*|\s+version\s+)v?\d+(?:\.\d+)+[\w.+-]*",
    re.IGNORECASE,
)
# pydantic's "For further information visit https://errors.pydantic.dev/2.14/v/..." names
# the library version in its URL.
_PYDANTIC_URL = re.compile(r"\s*For further information visit https://errors\.pydantic\.dev\S*")
MAX_MESSAGE = 2000


def redact_uri(uri: str | None) -> str | None:
    """``uri`` as it may be shown anywhere (responses, events, logs of a job): without
    user-info (``user:password@``), query string or fragment, where credentials and tokens
    travel. The one redaction for every URI the service shows."""
    if not uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<uri>"
    if not parts.scheme or not parts.netloc:
        return uri if "@" not in uri and "?" not in uri else "<uri>"
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact(text: str) -> str:
    """``text`` without tracebacks, server paths and version numbers, at most
    ``MAX_MESSAGE`` characters."""
    if not text:
        return text
    head, found, _ = text.partition(TRACEBACK_HEADER)
    if found:  # the message before the traceback is what the tenant can act on
        text = head.rstrip(" \n:") or "internal error"
    text = _PYDANTIC_URL.sub("", text)
    text = _FRAME.sub("", text)
    text = _SITE_PACKAGES.sub(PATH, text)
    text = _PATH.sub(PATH, text)
    text = _VERSION.sub(lambda m: m.group(1), text)
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    return text


def redact_data(value: Any) -> Any:
    """A copy of a JSON-like value with every string redacted (event data)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_data(child) for key, child in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(child) for child in value]
    return value


def spec_strings(spec: Any) -> set[str]:
    """Every string a tenant wrote in a spec: its own names, which a result may repeat."""
    if isinstance(spec, str):
        return {spec}
    if isinstance(spec, dict):
        return set().union(*(spec_strings(child) for child in spec.values()))
    if isinstance(spec, (list, tuple)):
        return set().union(*(spec_strings(child) for child in spec))
    return set()


def redact_result(value: Any, keep: set[str] = frozenset()) -> Any:  # type: ignore[assignment]
    """A job's result as the API shows it: without the ``versions`` sections (interpreter and
    library versions stay in the report.json artifact, the model's own record) and with server
    paths redacted, except strings in ``keep`` (what the tenant wrote in its spec)."""
    if isinstance(value, str):
        return value if value in keep else redact(value)
    if isinstance(value, dict):
        return {
            key: redact_result(child, keep) for key, child in value.items() if key != "versions"
        }
    if isinstance(value, (list, tuple)):
        return [redact_result(child, keep) for child in value]
    return value
