"""A multi-node retrain job runs on the cluster's training operator: the worker submits a
TrainJob, follows it, mirrors it into the job, and publishes what the training pods staged.

The real task code (``execute_job``) and job store (SQLite), a real S3 server (moto) as the
artifact store the pods and the worker share, and the real ``kubernetes`` client talking over
HTTP to a stand-in for the API server and the Trainer operator (``tests/worker/fake_kube.py``),
whose script says what the cluster does at each of the worker's watch requests.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from service.db import make_engine, make_sessionmaker, upgrade_database
from service.reaper import Reaper
from service.stores.events import list_events
from service.stores.job_admission import create_job
from service.stores.job_lifecycle import request_cancel
from service.stores.job_reads import get_job
from shortened.config import Settings
from shortened.engine.progress import Progress
from shortened.engine.progress_wire import MARKER, progress_line
from shortened.specs import RetrainSpec
from shortened.storage import open_store, publish_directory
from shortened.storage.keys import staging_prefix
from tests.worker.fake_kube import FakeApiServer, FakeCluster
from tests.worker.test_reliability_jobs import expire_lease
from worker import tasks
from worker.celery_app import make_celery
from worker.cluster.manifest import LABEL_ATTEMPT, LABEL_JOB_ID, LABEL_TENANT

TRAINER_API = pytest.importorskip("kubeflow_trainer_api.models.trainer_v1alpha1_train_job")


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    yield FakeCluster()


@pytest.fixture
def api(cluster: FakeCluster) -> Iterator[FakeApiServer]:
    with FakeApiServer(cluster) as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path, s3_server: str, api: FakeApiServer) -> Settings:
    bucket = f"cluster-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    database_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_database(database_url)
    return Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        artifacts_url=f"s3://{bucket}/artifacts",
        s3_endpoint_url=s3_server,
        worker_device="cuda",
        lease_ttl_s=2.0,
        heartbeat_interval_s=0.2,
        max_attempts=2,
        kubeflow_runtime="torch-distributed",
        kubeflow_image="registry.example/shortened-worker:1.2.3",
        kubeflow_kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"),
        kubeflow_poll_interval_s=0.05,
    )


@pytest.fixture
def sessions(settings: Settings):
    engine = make_engine(settings.resolved_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def retrain_spec(**distributed) -> dict:
    spec = RetrainSpec.model_validate(
        {
            "model": f"job://{'a' * 32}",
            "data": {"source": "s3://corpora/train.jsonl"},
            "max_steps": 4,
            "distributed": {"nnodes": 2, "nproc_per_node": 4, **distributed},
        }
    )
    return spec.model_dump(mode="json")


def new_job(sessions, spec: dict | None = None, tenant: str = "acme") -> str:
    with sessions() as session:
        return create_job(session, "retrain", spec or retrain_spec(), tenant=tenant).id


def job_row(sessions, job_id: str):
    with sessions() as session:
        return get_job(session, job_id)


def events(sessions, job_id: str) -> list[tuple[str, str]]:
    with sessions() as session:
        return [(e.type, e.message) for e in list_events(session, job_id)]


# --------------------------------------------------------------- what the cluster does


def pending(cluster: FakeCluster, name: str) -> None:
    """Waiting for nodes: nothing changes."""


def running(cluster: FakeCluster, name: str) -> None:
    cluster.start_nodes(name)
    cluster.print(name, progress_line(Progress("loading", message="job://aaaa")), "loaded 2 layers")


def training(cluster: FakeCluster, name: str) -> None:
    cluster.print(
        name,
        progress_line(Progress("training", 2, 4, "steps", metrics={"loss": 2.5})),
        "step 2: loss 2.5",
    )


def staged_by_rank0(store, tmp_path: Path):
    """Rank 0 publishes its output under the prefix its arguments name, then ends."""

    def step(cluster: FakeCluster, name: str) -> None:
        args = cluster.objects[name]["spec"]["trainer"]["args"]
        out = tmp_path / "rank0-output"
        out.mkdir()
        (out / "config.json").write_text('{"num_hidden_layers": 2}')
        (out / "model.safetensors").write_bytes(b"\1" * 4096)
        (out / "report.json").write_text(json.dumps({"method": "lora", "final_loss": 1.9}))
        publish_directory(store, out, args[args.index("--publish-to") + 1])
        cluster.print(name, progress_line(Progress("training", 4, 4, "steps")))

    return step


def completed(cluster: FakeCluster, name: str) -> None:
    cluster.finish(name, "Complete", "JobSetCompleted", "the JobSet completed")


# ---------------------------------------------------------------------------- outcomes


def test_a_multi_node_job_runs_as_a_trainjob_and_publishes_what_rank0_staged(
    sessions, settings, cluster, tmp_path
):
    store = open_store(settings.resolved_artifacts_url, s3_endpoint_url=settings.s3_endpoint_url)
    job_id = new_job(sessions, {**retrain_spec(), "webhook": {"url": "https://hooks.example/x"}})
    # What a dead worker's attempt left on the cluster: removed before the new TrainJob.
    leftover = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "shortened-leftover-a0", "labels": {LABEL_JOB_ID: job_id}},
        "spec": {"runtimeRef": {"name": "torch-distributed"}},
    }
    cluster.add_object(leftover)
    cluster.script = [pending, running, training, staged_by_rank0(store, tmp_path), completed]

    assert tasks.execute_job(job_id, settings) == "succeeded"

    [body] = cluster.created
    name = body["metadata"]["name"]
    job = job_row(sessions, job_id)
    assert job.result["final_loss"] == 1.9
    published = {o.key.rsplit("/", 1)[-1] for o in store.list(f"jobs/{job_id}")}
    assert published == {"config.json", "model.safetensors", "report.json", "manifest.json"}
    assert store.list(staging_prefix(job_id, 1)) == []
    assert cluster.deleted == ["shortened-leftover-a0", name] and cluster.objects == {}
    # Rank 0's progress became the job's stages and progress, its other lines log events.
    seen = events(sessions, job_id)
    assert ("log", "loaded 2 layers") in seen and ("log", "step 2: loss 2.5") in seen
    stages = [message.split(":")[0] for kind, message in seen if kind == "stage"]
    assert stages[:2] == ["submitting", "scheduling"] and "training" in stages
    assert stages.index("loading") < stages.index("training") < stages.index("collecting")
    with sessions() as session:
        metrics = [e.data for e in list_events(session, job_id) if e.type == "metric"]
    assert {"stage": "training", "loss": 2.5} in metrics
    assert not any(MARKER.strip() in message for _, message in seen)
    assert sum(1 for _, message in seen if message == "loaded 2 layers") == 1  # read once
    assert any(f"TrainJob {name}: succeeded (JobSetCompleted" in m for _, m in seen)

    # The object: the operator's own schema, secrets by reference, the job's labels.
    model = TRAINER_API.TrainerV1alpha1TrainJob.from_dict(body)
    assert model.to_dict() == body
    assert body["metadata"]["labels"][LABEL_JOB_ID] == job_id
    assert body["metadata"]["labels"][LABEL_TENANT] == "acme"
    assert body["metadata"]["labels"][LABEL_ATTEMPT] == "1"
    trainer = body["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    refs = {e["name"]: e["valueFrom"] for e in trainer["env"] if "valueFrom" in e}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "shortened-secrets", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert "testing" not in json.dumps(body)  # the credentials' values (conftest's S3)
    spec = json.loads(trainer["args"][trainer["args"].index("--spec-json") + 1])
    assert RetrainSpec.model_validate(spec).distributed.nnodes == 2
    assert "hooks.example" not in json.dumps(body)  # the job's webhook stays with the worker


def test_the_operator_reporting_failed_fails_the_job_with_its_own_code(sessions, settings, cluster):
    def failed(cluster: FakeCluster, name: str) -> None:
        cluster.print(name, "torch.OutOfMemoryError: CUDA out of memory on rank 3")
        cluster.finish(name, "Failed", "FailedJobs", "jobset failed: node-1 exited 1")

    cluster.script = [running, training, failed]
    job_id = new_job(sessions)
    assert tasks.execute_job(job_id, settings) == "failed"

    job = job_row(sessions, job_id)
    assert job.error_code == "cluster_training_failed"
    assert "FailedJobs: jobset failed: node-1 exited 1" in job.error_message
    assert "CUDA out of memory on rank 3" in job.error_message  # rank 0's last line
    assert cluster.deleted == [cluster.created[0]["metadata"]["name"]]
    store = open_store(settings.resolved_artifacts_url, s3_endpoint_url=settings.s3_endpoint_url)
    assert store.list(f"jobs/{job_id}") == []


def test_a_cancel_deletes_the_trainjob(sessions, settings, cluster):
    def cancelled(cluster: FakeCluster, name: str) -> None:
        with sessions() as session:
            request_cancel(session, job_id)

    never_ends = [pending] * 1000
    cluster.script = [running, training, cancelled, *never_ends]
    job_id = new_job(sessions)
    assert tasks.execute_job(job_id, settings) == "cancelled"
    assert cluster.deleted == [cluster.created[0]["metadata"]["name"]] and not cluster.objects
    assert not cluster.pods


def test_a_lost_lease_deletes_the_trainjob_and_the_next_attempt_starts_afresh(
    sessions, settings, cluster, tmp_path
):
    reaper = Reaper(settings, sessions, make_celery(settings))

    def lost(cluster: FakeCluster, name: str) -> None:
        # The job store thinks this worker is dead and re-queues the job.
        expire_lease(sessions, job_id)
        assert reaper.run_once().requeued == [job_id]

    never_ends = [pending] * 1000
    cluster.script = [running, lost, *never_ends]
    job_id = new_job(sessions)
    assert tasks.execute_job(job_id, settings) == "lost"
    first = cluster.created[0]["metadata"]["name"]
    assert cluster.deleted == [first] and not cluster.objects
    assert job_row(sessions, job_id).status == "queued"

    store = open_store(settings.resolved_artifacts_url, s3_endpoint_url=settings.s3_endpoint_url)
    cluster.script = [running, staged_by_rank0(store, tmp_path), completed]
    assert tasks.execute_job(job_id, settings) == "succeeded"
    second = cluster.created[1]
    assert second["metadata"]["name"] != first
    assert second["metadata"]["labels"][LABEL_ATTEMPT] == "2"
    args = second["spec"]["trainer"]["args"]
    assert args[args.index("--publish-to") + 1] == staging_prefix(job_id, 2)


def test_the_time_limit_deletes_the_trainjob(sessions, settings, cluster):
    cluster.script = [running] + [pending] * 1000  # it never ends
    job_id = new_job(sessions)
    limited = settings.model_copy(update={"job_time_limit_s": 3.0})
    assert tasks.execute_job(job_id, limited) == "failed"
    assert job_row(sessions, job_id).error_code == "timeout"
    body = cluster.created[0]
    # The operator ends it by itself too, should the worker die before it can delete it.
    assert 0 < body["spec"]["activeDeadlineSeconds"] <= 3
    assert cluster.deleted == [body["metadata"]["name"]]


def test_a_trainjob_the_cluster_refuses_fails_the_job(sessions, settings, cluster):
    cluster.refuse_create = (403, "Forbidden")
    job_id = new_job(sessions)
    assert tasks.execute_job(job_id, settings) == "failed"
    job = job_row(sessions, job_id)
    assert job.error_code == "cluster_training_failed" and "403 Forbidden" in job.error_message


def test_a_completed_training_without_staged_output_fails(sessions, settings, cluster):
    cluster.script = [running, completed]
    job_id = new_job(sessions)
    assert tasks.execute_job(job_id, settings) == "failed"
    job = job_row(sessions, job_id)
    assert job.error_code == "cluster_training_failed"
    assert "published no output" in job.error_message


@pytest.mark.parametrize(
    ("engine", "unset", "message"),
    [
        ("ray", {}, "ray engine is not configured on this server"),
        ("kubeflow", {"kubeflow_runtime": None}, "kubeflow engine is not configured"),
    ],
)
def test_an_engine_this_server_lacks_fails_the_job_without_calling_the_cluster(
    sessions, settings, cluster, engine, unset, message
):
    job_id = new_job(sessions, retrain_spec(engine=engine))
    assert tasks.execute_job(job_id, settings.model_copy(update=unset)) == "failed"
    job = job_row(sessions, job_id)
    assert job.error_code == "cluster_engine_not_configured" and message in job.error_message
    assert cluster.requests == []
