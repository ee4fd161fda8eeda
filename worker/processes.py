"""Process helpers shared by the worker's housekeeping (work directories, metrics files)."""

from __future__ import annotations

import os
import socket


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


def worker_id_for(pid: int) -> str:
    """How the process ``pid`` of this machine names itself when it claims a job."""
    return f"{socket.gethostname()}:{pid}"
