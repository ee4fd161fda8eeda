"""Distillation is just another retrain method to the service: a KD job is admitted like any
retrain (its teacher checked as a source), and a prune pipeline's KD step gets the prune
job's source model as its teacher."""

from __future__ import annotations

from service.models import Job
from tests.e2e_service import TINY_MODEL
from tests.service.test_submission import Api, api_for  # noqa: F401 - the fixture

REPO = TINY_MODEL.parents[1]
DATA = str(REPO / "data" / "stdlib_docs_train.jsonl")


def kd_job(**kd) -> dict:
    return {
        "model": str(TINY_MODEL),
        "method": "kd",
        "data": {"source": DATA},
        "kd": {"max_steps": 10, **kd},
    }


def test_kd_retrain_job_is_admitted_and_its_teacher_checked(api_for):  # noqa: F811
    api: Api = api_for(None)
    accepted = api.post("/jobs/retrain", kd_job(teacher=str(TINY_MODEL), alpha=0.5))
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["spec"]["kd"]["teacher"] == str(TINY_MODEL)

    teacher = ["body", "kd", "teacher"]
    refused = {
        "no teacher": (kd_job(), ["body"], "needs kd.teacher"),
        "outside the roots": (kd_job(teacher="/etc"), teacher, "outside the allowed roots"),
        "no such model": (kd_job(teacher=str(REPO / "models" / "none")), teacher, "not exist"),
        "alpha": (kd_job(teacher=str(TINY_MODEL), alpha=2), ["body", "kd", "alpha"], "1"),
    }
    for case, (body, loc, message) in refused.items():
        response = api.post("/jobs/retrain", body)
        assert response.status_code == 422, (case, response.text)
        [error] = response.json()["detail"]
        assert error["loc"] == loc and message in error["msg"], (case, error)


def test_prune_pipeline_kd_step_distils_from_the_prune_jobs_model(api_for):  # noqa: F811
    api: Api = api_for(None)
    parent = api.submit(retrain={"method": "kd", "data": {"source": DATA}, "kd": {"max_steps": 10}})
    api.succeed(parent)
    [child] = api.followups(parent)
    with api.sessions() as session:
        job = session.get(Job, child)
        assert job is not None and job.kind == "retrain" and job.parent_id == parent
        assert job.spec["model"] == f"job://{parent}"
        assert job.spec["kd"]["teacher"] == str(TINY_MODEL)
