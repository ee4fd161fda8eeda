"""prometheus_client's multiprocess mode, for every process tree that serves merged metrics:
the Celery worker (its prefork pool children, ``worker.metrics``) and ``shortened serve``
with several API processes (``service.serve``).

Each process of the tree writes its values to files in ``PROMETHEUS_MULTIPROC_DIR``; whoever
serves ``/metrics`` merges them (``MultiProcessCollector``). The directory must be set before
the processes create their metrics and be empty when the tree starts: a restarted tree must
not add its predecessor's counts.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 probes without
    signalling; a process of another user still counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fresh_directory(data_dir: Path, prefix: str) -> tuple[Path, bool]:
    """(directory, owned): ``PROMETHEUS_MULTIPROC_DIR`` if set (emptied of old files; not
    owned), else a new directory ``<data_dir>/metrics/<prefix>-<pid>-*`` (owned: the caller
    removes it when the tree stops). Directories of the same prefix left by processes that
    were killed are removed on the way."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        directory = Path(given)
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.db"):
            old.unlink(missing_ok=True)
        return directory, False
    root = data_dir.resolve() / "metrics"
    root.mkdir(parents=True, exist_ok=True)
    left_by = re.compile(rf"^{re.escape(prefix)}-(\d+)-")
    for entry in root.iterdir():
        match = left_by.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root)), True


def use_multiprocess(directory: Path) -> None:
    """Switch this process (and the children it forks or spawns, through the environment) to
    multiprocess values. Metrics created before this keep their in-process values."""
    from prometheus_client import values

    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.get_value_class()
