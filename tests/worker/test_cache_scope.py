"""Score and evaluation caches are per tenant by default: a tenant's job never reuses (and so
never reveals) what another tenant's job computed on byte-identical weights, while jobs of
the same tenant reuse as before; ``cache_scope="global"`` shares them across tenants. Real
prune jobs of the repository's tiny model through the worker's own code."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.db import make_engine, make_sessionmaker, upgrade_database
from service.stores.job_admission import create_job
from service.stores.job_reads import get_job
from shortened.config import Settings
from tests.e2e_service import TINY_MODEL
from worker.tasks import execute_job

SPEC = {
    "model": str(TINY_MODEL),
    "criterion": "ppl",
    "num_blocks": 2,
    "calibration": {"source": str(TINY_MODEL.parents[1] / "data" / "calibration.jsonl"),
                    "n_samples": 4, "seq_len": 32},
}  # fmt: skip


def run_as(settings: Settings, tenant: str, num_blocks: int) -> dict:
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    with sessions() as session:
        job_id = create_job(session, "prune", {**SPEC, "num_blocks": num_blocks}, tenant=tenant).id
    assert execute_job(job_id, settings) == "succeeded"
    with sessions() as session:
        job = get_job(session, job_id)
        assert job is not None
        return job.result


@pytest.mark.parametrize("scope", ["tenant", "global"])
def test_caches_are_shared_only_within_their_scope(tmp_path: Path, scope: str) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_database(url)
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=url,
        allowed_local_roots=[TINY_MODEL.parents[1]],
        cache_scope=scope,
    )
    first = run_as(settings, "acme", 2)
    assert first["scores_reused"] == 0
    other_tenant = run_as(settings, "globex", 3)
    same_tenant = run_as(settings, "acme", 3)
    assert same_tenant["scores_reused"] > 0  # reuse within a tenant is as before
    if scope == "tenant":
        assert other_tenant["scores_reused"] == 0
        assert (
            "acme" not in str(other_tenant)
            and first["score_cache"]["location"] != (other_tenant["score_cache"]["location"])
        )
    else:
        assert other_tenant["scores_reused"] == same_tenant["scores_reused"]
