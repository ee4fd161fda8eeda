"""The pure parts of cluster training: the TrainJob as rendered (checked against the Kubeflow
Trainer's own API models, from the ``kubeflow-trainer-api`` wheel, offline), the reading of
its status, the progress lines of rank 0, and the piecewise reading of its pod log."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from shortened.config import Settings
from shortened.engine.progress import Progress
from shortened.engine.progress_wire import ProgressPrinter, parse_progress_line, progress_line
from worker.cluster.logs import RankZeroLog
from worker.cluster.manifest import (
    ANNOTATION_TENANT,
    LABEL_TENANT,
    ClusterTarget,
    TrainJobRequest,
    cluster_target,
    render_train_job,
    tenant_label,
    train_job_name,
)
from worker.cluster.status import train_job_state

trainer_api = pytest.importorskip("kubeflow_trainer_api.models.trainer_v1alpha1_train_job")

JOB_ID = "0123456789abcdef0123456789abcdef"


def target(**changes: Any) -> ClusterTarget:
    base = ClusterTarget(
        namespace="training",
        runtime="torch-distributed",
        image="registry.example/shortened-worker:1.2.3",
        env={"SHORTENED_ARTIFACTS_URL": "s3://bucket/artifacts"},
        secret_name="shortened-secrets",
        secret_keys=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        gpu=True,
    )
    return ClusterTarget(**{**base.__dict__, **changes})


def request(**changes: Any) -> TrainJobRequest:
    base = TrainJobRequest(
        job_id=JOB_ID,
        tenant="acme",
        attempt=2,
        spec={"model": "job://x", "distributed": {"nnodes": 3, "nproc_per_node": 8}},
        nnodes=3,
        nproc_per_node=8,
        staging_prefix=f"staging/{JOB_ID}/attempt-2",
        deadline_s=7200,
    )
    return TrainJobRequest(**{**base.__dict__, **changes})


def trainer_schema_errors(doc: dict[str, Any]) -> str | None:
    """Why the Trainer's API models refuse ``doc`` (None: they accept it as it is). The
    models ignore unknown fields, so a field they do not know shows as one they drop."""
    from pydantic import ValidationError

    try:
        parsed = trainer_api.TrainerV1alpha1TrainJob.from_dict(copy.deepcopy(doc))
    except ValidationError as exc:
        return str(exc)
    return None if parsed.to_dict() == doc else "fields the schema does not know were dropped"


def test_the_trainjob_is_what_the_operator_accepts() -> None:
    doc = render_train_job(target(), request())
    assert trainer_schema_errors(doc) is None
    assert doc["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and doc["kind"] == "TrainJob"
    assert doc["spec"]["runtimeRef"]["name"] == "torch-distributed"
    trainer = doc["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", "--module", "shortened.engine.retrain.rank_main"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"] == {
        "requests": {"nvidia.com/gpu": "8"},
        "limits": {"nvidia.com/gpu": "8"},
    }
    assert doc["spec"]["activeDeadlineSeconds"] == 7200


def test_the_schema_check_catches_a_misspelt_field_and_a_wrong_type() -> None:
    doc = render_train_job(target(), request())
    misspelt = copy.deepcopy(doc)
    misspelt["spec"]["trainer"]["numProcsPerNode"] = misspelt["spec"]["trainer"].pop(
        "numProcPerNode"
    )
    assert trainer_schema_errors(misspelt) is not None
    wrong = copy.deepcopy(doc)
    wrong["spec"]["trainer"]["numNodes"] = "3"
    assert trainer_schema_errors(wrong) is not None


def test_credentials_go_by_reference_and_settings_by_value() -> None:
    settings = Settings(
        artifacts_url="s3://bucket/artifacts",
        s3_endpoint_url="http://minio:9000",
        kubeflow_runtime="torch-distributed",
        kubeflow_image="img:1",
    )
    doc = render_train_job(cluster_target(settings), request())
    env = {e["name"]: e for e in doc["spec"]["trainer"]["env"]}
    assert env["SHORTENED_ARTIFACTS_URL"]["value"] == "s3://bucket/artifacts"
    assert env["SHORTENED_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": "shortened-secrets", "key": key}},
        }
    # Nothing of the worker's own secrets travels: the database and the broker stay out.
    assert not {"SHORTENED_DATABASE_URL", "SHORTENED_BROKER_URL"} & set(env)


def test_cpu_ranks_ask_for_no_gpu() -> None:
    doc = render_train_job(target(gpu=False), request(deadline_s=None))
    assert trainer_schema_errors(doc) is None
    assert "resourcesPerNode" not in doc["spec"]["trainer"]
    assert "activeDeadlineSeconds" not in doc["spec"]
    assert "tolerations" not in json.dumps(doc)


def test_names_and_labels_fit_kubernetes() -> None:
    name = train_job_name(JOB_ID, 12)
    # A DNS label that leaves room for the pod names the JobSet derives from it.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 40
    assert train_job_name(JOB_ID, 1) != train_job_name(JOB_ID, 2)
    assert tenant_label("acme") == "acme"
    odd = "team/ü blue"
    label = tenant_label(odd)
    assert re.fullmatch(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,61}[A-Za-z0-9]", label)
    doc = render_train_job(target(), request(tenant=odd))
    assert doc["metadata"]["labels"][LABEL_TENANT] == label
    assert doc["metadata"]["annotations"][ANNOTATION_TENANT] == odd
    assert trainer_schema_errors(doc) is None


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ({}, "pending"),
        ({"conditions": [{"type": "Suspended", "status": "True", "reason": "Q"}]}, "pending"),
        ({"jobsStatus": [{"name": "node", "active": 2, "ready": 0}]}, "running"),
        ({"conditions": [{"type": "Complete", "status": "True"}]}, "succeeded"),
        ({"conditions": [{"type": "Complete", "status": "False"}]}, "pending"),
        (
            {
                "conditions": [
                    {"type": "Complete", "status": "True"},
                    {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"},
                ]
            },
            "failed",
        ),
    ],
)
def test_trainjob_states(status: dict[str, Any], phase: str) -> None:
    assert train_job_state({"status": status}).phase == phase


def test_progress_lines_round_trip_among_other_output(capsys: pytest.CaptureFixture[str]) -> None:
    update = Progress("training", 3, 10, "steps", "lora", {"loss": 1.25})
    assert parse_progress_line(progress_line(update)) == update
    assert parse_progress_line(f"[rank0]: {progress_line(update)}") == update
    for other in ("step 3/10", "@shortened-progress {not json", '@shortened-progress {"done": 1}'):
        assert parse_progress_line(other) is None
    ProgressPrinter()(Progress("saving"))
    assert parse_progress_line(capsys.readouterr().out) == Progress("saving")


class _Jobs:
    """The two calls RankZeroLog makes, answered from a list of stamped lines."""

    def __init__(self) -> None:
        self.pod = "tj-node-0-0-abcde"
        self.lines: list[str] = []
        self.since: list[int | None] = []

    def rank0_pod(self, name: str) -> str | None:
        return self.pod

    def read_log(self, pod: str, since_seconds: int | None) -> str:
        self.since.append(since_seconds)
        return "".join(line + "\n" for line in self.lines)


def test_the_log_is_read_in_pieces_without_repeating_a_line() -> None:
    jobs = _Jobs()
    now = [100.0]
    reader = RankZeroLog(jobs, "tj", clock=lambda: now[0])  # type: ignore[arg-type]
    jobs.lines = ["2026-01-01T00:00:01.123456789Z one", "2026-01-01T00:00:01.5Z two"]
    assert reader.new_lines() == ["one", "two"]
    now[0] += 5
    # The server answers with an overlap: the lines read before are not read again (the
    # same instant in fewer digits included).
    jobs.lines += ["2026-01-01T00:00:01.50Z two", "2026-01-01T00:00:02Z three"]
    jobs.lines.remove("2026-01-01T00:00:01.5Z two")
    assert reader.new_lines() == ["three"]
    assert jobs.since[0] is None and jobs.since[1] >= 5 + 30
    jobs.pod = "tj-node-0-0-fghij"  # node 0's pod was replaced: its log from the start
    jobs.lines = ["2026-01-01T00:00:00.5Z again"]
    assert reader.new_lines() == ["again"]
