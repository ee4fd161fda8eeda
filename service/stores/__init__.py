"""The service's stores: the SQL of one concern per module, called by the routes, the
admission path, the worker, the reaper and the scheduler.

``events`` (a job's event log), ``job_admission`` (inserting jobs under the tenant's
limit and Idempotency-Key), ``job_reads`` (a job and job listings for the API),
``job_lifecycle`` (claim, lease, progress, cancel, finish), ``job_recovery`` (what the
reaper and a stopping worker give back to the queue), ``schedules``, ``webhooks`` and
``batches``; ``paging`` is the cursor paging the listings share.
"""
