"""Celery app for the crash and shutdown tests of ``shortened serve`` (``service.serve``'s
``WORKER_APP``): the real app, tasks and engine, with two delays so a fault lands at a known
point whatever the machine's speed:

* ``RELIABILITY_BLOCK_DELAY_S`` after each scored block (see ``tests/reliability_worker.py``);
* ``SLOW_PUBLISH_DELAY_S`` after each object uploaded under ``jobs/`` (a kill lands
  mid-upload, leaving some of the job's objects in the store and no manifest).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from shortened import storage
from tests import reliability_worker  # noqa: F401  (the block delay)
from worker.celery_app import app  # noqa: F401  (the app Celery looks for)

PUBLISH_DELAY_S = float(os.environ.get("SLOW_PUBLISH_DELAY_S", "0"))
_put_file = storage.LocalStore.put_file


def _slow_put_file(self: storage.LocalStore, key: str, path: Path) -> None:
    _put_file(self, key, path)
    if PUBLISH_DELAY_S and key.startswith("jobs/"):
        time.sleep(PUBLISH_DELAY_S)


storage.LocalStore.put_file = _slow_put_file  # type: ignore[method-assign]
