"""Log configuration shared by the API, the worker and the CLI: JSON lines (python-json-logger)
or plain text, and the id of the job being run on every record logged while it runs.

    configure_logging("json", "INFO")
    with job_context(job_id):
        log.info("...")        # {"time": ..., "level": "INFO", ..., "job_id": "<job_id>"}

The job id lives in a ``contextvars.ContextVar``: it follows the code that runs the job (and
threads started with ``contextvars.copy_context().run``), never another request or job.
(Named ``logs``, not ``logging``, so that it does not shadow the standard library module.)
"""

from __future__ import annotations

import contextvars
import logging
import logging.config
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

LogFormat = Literal["json", "text"]

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

# Fields every JSON line has (renamed below), besides "time"; anything passed with
# ``extra={...}`` and the job id are added after them.
JSON_FIELDS = ("levelname", "name", "message")
JSON_RENAMES = {"levelname": "level", "name": "logger"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(job_tag)s: %(message)s"

# The loggers uvicorn configures with handlers of its own; they are pointed at ours instead.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def current_job_id() -> str | None:
    return _job_id.get()


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Every record logged inside the block (in this context) carries ``job_id``."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


class JobIdFilter(logging.Filter):
    """Adds ``job_id`` (None outside a job) and ``job_tag`` (`` [job <id>]`` or empty, for the
    text format) to every record. Installed on handlers, so it sees every logger's records."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = getattr(record, "job_id", None)  # an explicit extra={"job_id": ...} wins
        if job_id is None:
            job_id = _job_id.get()
        record.job_id = job_id
        record.job_tag = f" [job {job_id}]" if job_id else ""
        return True


def _json_formatter_class() -> str:
    try:
        import pythonjsonlogger.json  # noqa: F401  (python-json-logger >= 3.1)

        return "pythonjsonlogger.json.JsonFormatter"
    except ImportError:  # pragma: no cover - older releases
        return "pythonjsonlogger.jsonlogger.JsonFormatter"


def logging_config(log_format: LogFormat = "json", level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dictionary: one stderr handler on the root logger with the
    job id filter, uvicorn's loggers routed to it (access lines included)."""
    if log_format == "json":
        formatter: dict[str, Any] = {
            "()": _json_formatter_class(),
            "fmt": list(JSON_FIELDS),
            "rename_fields": JSON_RENAMES,
            "timestamp": "time",  # ISO 8601 in UTC
            # The text format's helper; the JSON line has job_id itself.
            "reserved_attrs": [*_reserved_attrs(), "job_tag", "color_message"],
        }
    elif log_format == "text":
        formatter = {"format": TEXT_FORMAT}
    else:
        raise ValueError(f"log format must be 'json' or 'text', not {log_format!r}")
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"job_id": {"()": JobIdFilter}},
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["job_id"],
            }
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            name: {"handlers": [], "level": level, "propagate": True} for name in UVICORN_LOGGERS
        },
    }


def _reserved_attrs() -> list[str]:
    try:
        from pythonjsonlogger.core import RESERVED_ATTRS
    except ImportError:  # pragma: no cover - older releases
        from pythonjsonlogger.jsonlogger import RESERVED_ATTRS  # type: ignore[no-redef]
    return list(RESERVED_ATTRS)


def resolve_format(log_format: str | None, default: LogFormat) -> LogFormat:
    value = (log_format or default).lower()
    if value not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', not {log_format!r}")
    return value  # type: ignore[return-value]


def configure_logging(log_format: str | None = None, level: str = "INFO") -> LogFormat:
    """Configure the process's logging (root logger and uvicorn's); return the format used.
    ``log_format`` None: JSON (the service's default)."""
    resolved = resolve_format(log_format, "json")
    logging.config.dictConfig(logging_config(resolved, level))
    return resolved


def setup_celery_logging(loglevel: Any = None, **_kwargs: Any) -> None:
    """Receiver of Celery's ``setup_logging`` signal: the worker logs through
    :func:`configure_logging` (SHORTENED_LOG_FORMAT, default JSON) instead of Celery's own
    set-up. ``loglevel`` is the worker's ``--loglevel``."""
    from shortened.config import get_settings

    settings = get_settings()
    if isinstance(loglevel, int):
        level = logging.getLevelName(loglevel)
    else:
        level = str(loglevel or settings.log_level)
    configure_logging(settings.log_format, level)
