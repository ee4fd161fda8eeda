"""The Celery worker: the task, one job run (claim -> engine -> publish -> finish) and its parts."""
