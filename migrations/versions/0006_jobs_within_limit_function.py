"""PostgreSQL function: lock a tenant's admissions and count its queued and running jobs

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Called with the COMMIT right behind it (job_admission.commit_within_limit): the advisory
# lock is then held only for the count and the commit, on the server, never across a round
# trip.
# Each statement of a volatile PL/pgSQL function takes a new snapshot, so the count, made
# after the lock is granted, sees every job committed by the admissions that held it before.
# Over the limit it raises SQLSTATE SH429 and the COMMIT behind it never runs.
CREATE = """
CREATE OR REPLACE FUNCTION jobs_active_within_limit(
    lock_key text, job_tenant text, job_limit integer
) RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    active integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(lock_key));
    SELECT count(*) INTO active FROM (
        SELECT 1 FROM jobs
        WHERE tenant = job_tenant AND status IN ('queued', 'running')
        LIMIT job_limit + 1
    ) AS counted;
    IF active > job_limit THEN
        RAISE EXCEPTION 'tenant % would have % queued or running jobs (limit %)',
            job_tenant, active, job_limit USING ERRCODE = 'SH429';
    END IF;
    RETURN active;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS jobs_active_within_limit(text, text, integer)")
