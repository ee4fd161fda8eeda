"""A broken or collapsed model is never published as a success, through the real worker task
and engine: a retrain whose loss turns NaN ends ``failed`` with ``non_finite``, a prune that
collapses the model ends ``failed`` with ``quality_gate``, both with no artifacts; a sane
prune's gate ratio is in the job's result, its webhook summary and its batch row."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from service.batches import summarize
from service.db import make_engine, make_sessionmaker, upgrade_database
from service.models import Batch, utcnow
from service.stores.job_admission import create_job
from service.stores.job_reads import get_job
from service.webhooks.outbox import result_summary
from shortened.config import Settings
from shortened.storage import open_store
from tests.helpers import CALIBRATION, HELDOUT, TINY_MODEL
from worker.tasks import execute_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "var")
    upgrade_database(settings)
    return settings


@pytest.fixture
def sessions(settings: Settings):
    engine = make_engine(settings.resolved_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def run_job(settings, sessions, kind: str, spec: dict, batch_id: str | None = None):
    with sessions() as session:
        job_id = create_job(session, kind, spec, batch_id=batch_id).id
    execute_job(job_id, settings)
    with sessions() as session:
        job = get_job(session, job_id)
        assert job is not None
        session.expunge(job)
    return job


def published(settings: Settings, job_id: str) -> list:
    return open_store(settings.resolved_artifacts_url).list(f"jobs/{job_id}")


def test_a_retrain_whose_loss_turns_nan_fails_with_non_finite_and_publishes_nothing(
    settings, sessions, monkeypatch
):
    from transformers import Trainer

    compute_loss = Trainer.compute_loss

    def nan_loss(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        return loss * math.nan if self.model.training else loss

    monkeypatch.setattr(Trainer, "compute_loss", nan_loss)
    spec = {
        "model": str(TINY_MODEL),
        "method": "cpt",
        "data": {"source": str(HELDOUT.parent / "stdlib_docs_train.jsonl"), "max_records": 100},
        "cpt": {"max_steps": 2, "seq_len": 64, "warmup_steps": 0},
        "micro_batch_size": 4,
        "batch_size": 4,
    }
    job = run_job(settings, sessions, "retrain", spec)
    assert (job.status, job.error_code) == ("failed", "non_finite"), job.error_message
    assert "after cpt step 1" in job.error_message and job.result is None
    assert published(settings, job.id) == []


PRUNE = {"model": str(TINY_MODEL), "calibration": {"source": str(CALIBRATION), "n_samples": 4}}


def test_a_collapsing_prune_fails_with_quality_gate_and_publishes_nothing(settings, sessions):
    spec = {
        **PRUNE,
        "criterion": "magnitude",
        "num_blocks": 10,
        "protect_first": 0,
        "protect_last": 0,
    }
    job = run_job(settings, sessions, "prune", spec)
    assert (job.status, job.error_code) == ("failed", "quality_gate"), job.error_message
    assert "max_ppl_ratio 20" in job.error_message
    assert published(settings, job.id) == []


def test_the_gate_ratio_reaches_the_result_the_webhook_summary_and_the_batch_row(
    settings, sessions
):
    with sessions() as session:
        batch = Batch(
            id="b" * 32, tenant="default", kind="prune", request={"grid": {}}, job_count=1,
            created_at=utcnow(),
        )  # fmt: skip
        session.add(batch)
        session.commit()
    job = run_job(settings, sessions, "prune", {**PRUNE, "num_blocks": 2}, batch_id="b" * 32)
    assert job.status == "succeeded", job.error_message
    ratio = job.result["ppl_ratio"]
    assert 1.0 < ratio < 2.0 and job.result["quality_gate"]["ppl_ratio"] == ratio
    assert result_summary(job.result)["ppl_ratio"] == ratio
    with sessions() as session:
        summary = summarize(session, session.get(Batch, "b" * 32))
    assert "ppl_ratio" in summary["columns"] and summary["rows"][0]["ppl_ratio"] == ratio
