"""Process helpers shared by the worker's housekeeping (work directories, metrics files)."""

from __future__ import annotations

import socket

from service.multiproc import pid_alive  # noqa: F401  (re-exported: the worker's housekeeping uses it)


def worker_id_for(pid: int) -> str:
    """How the process ``pid`` of this machine names itself when it claims a job."""
    return f"{socket.gethostname()}:{pid}"
