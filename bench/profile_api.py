"""Where the API's CPU goes for one request: ``POST /jobs/prune`` and ``GET /jobs/{id}``
under cProfile, against a fresh PostgreSQL database and a Redis broker (as in production).

The app runs in this process on one thread: requests go through the full ASGI stack
(middleware, auth, validation, admission, the job store, the response class) via httpx's
ASGI transport, and the thread pool FastAPI uses for sync routes is replaced by direct calls
so that cProfile sees the route code too. Only the HTTP parsing of uvicorn is left out (it
is measured by bench_service, which reads the API processes' CPU times).

    python -m bench.profile_api            # CPU ms per request and the top functions
    python -m bench.profile_api --top 40
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests import e2e_service as e2e  # the e2e tests' stack helpers

REPO = Path(__file__).resolve().parents[1]

N_WARMUP = 50
N_REQUESTS = 400


def bench_model(root: Path) -> dict[str, Any]:
    """A model directory admission accepts (the tiny model's config.json, no weights: the
    worker would fail it once claimed) and a calibration file; the spec that names them."""
    model = root / "models" / "bench-model"
    model.mkdir(parents=True)
    (model / "config.json").write_text((e2e.TINY_MODEL / "config.json").read_text())
    data = root / "data"
    data.mkdir()
    (data / "calibration.jsonl").write_text(e2e.CALIBRATION.read_text())
    return {
        "model": str(model),
        "criterion": "magnitude",
        "num_blocks": 1,
        "calibration": {"source": str(data / "calibration.jsonl"), "n_samples": 2},
        "device": "cpu",
    }


def _inline_threadpool() -> None:
    """Sync routes and dependencies run on the calling thread (one thread for cProfile)."""
    import fastapi.dependencies.utils
    import fastapi.routing

    async def run_inline(func: Any, *args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    fastapi.routing.run_in_threadpool = run_inline  # type: ignore[assignment]
    fastapi.dependencies.utils.run_in_threadpool = run_inline  # type: ignore[assignment]

    import contextlib

    @contextlib.asynccontextmanager
    async def inline_cm(cm: Any) -> Any:
        try:
            yield cm.__enter__()
        except Exception as exc:
            if not cm.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            cm.__exit__(None, None, None)

    fastapi.dependencies.utils.contextmanager_in_threadpool = inline_cm  # type: ignore[attr-defined]


async def _measure(app: Any, spec: dict[str, Any], top: int) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=app)
    out: dict[str, Any] = {}
    # The lifespan as in production (httpx's transport does not run it): with PostgreSQL,
    # status reads then run on the event loop (service.async_reads).
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client,
    ):
        ids: list[str] = []
        for _ in range(N_WARMUP):
            response = await client.post("/jobs/prune", json=spec)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
            assert (await client.get(f"/jobs/{ids[-1]}")).status_code == 200

        async def submit(_: int) -> None:
            response = await client.post("/jobs/prune", json=spec)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])

        async def status(i: int) -> None:
            response = await client.get(f"/jobs/{ids[i % len(ids)]}")
            assert response.status_code == 200, response.text

        for name, call in (("submit", submit), ("status", status)):
            # CPU time, not wall time: waiting on PostgreSQL is not the API's cost.
            profiler = cProfile.Profile(time.process_time)
            cpu0 = time.process_time()
            profiler.enable()
            for i in range(N_REQUESTS):
                await call(i)
            profiler.disable()
            cpu = time.process_time() - cpu0
            # Without the profiler's own overhead: the figure to compare with the targets.
            cpu0 = time.process_time()
            for i in range(N_REQUESTS):
                await call(i)
            plain = time.process_time() - cpu0
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            stats.sort_stats("tottime").print_stats(top)
            # The project's own functions and the ones it calls into, by cumulative time.
            stats.sort_stats("cumulative").print_stats(
                r"service/|shortened/|send_task|_put|commit|_get_impl|lazy", top
            )
            out[name] = {
                "cpu_ms_per_request": round(plain / N_REQUESTS * 1000, 3),
                "cpu_ms_per_request_profiled": round(cpu / N_REQUESTS * 1000, 3),
                "profile": text.getvalue(),
            }
    return out


def run(top: int = 25) -> dict[str, Any]:
    from service.db import upgrade_database

    _inline_threadpool()
    workdir = Path(tempfile.mkdtemp(prefix="profile-api-"))
    spec = bench_model(workdir)
    with e2e.redis_namespace() as (broker_url, queue), e2e.postgres_database() as database_url:
        upgrade_database(database_url)
        os.environ.update(
            {
                "SHORTENED_DATABASE_URL": database_url,
                "SHORTENED_BROKER_URL": broker_url,
                "SHORTENED_QUEUE": queue,
                "SHORTENED_DATA_DIR": str(workdir / "api"),
                "SHORTENED_ARTIFACTS_URL": (workdir / "artifacts").as_uri(),
                "SHORTENED_ALLOWED_LOCAL_ROOTS": json.dumps([str(workdir)]),
                "SHORTENED_MAX_CONCURRENT_JOBS": "100000",
                "SHORTENED_WRITE_RATE_PER_S": "100000",
                "SHORTENED_WRITE_BURST": "100000",
                "SHORTENED_REAPER_INTERVAL_S": "0",
                "SHORTENED_SCHEDULER_INTERVAL_S": "0",
                "SHORTENED_WEBHOOK_INTERVAL_S": "0",
                "SHORTENED_LOG_LEVEL": "WARNING",
            }
        )
        from service.main import create_app
        from shortened.config import Settings

        app = create_app(Settings())
        try:
            return asyncio.run(_measure(app, spec, top))
        finally:
            app.state.engine.dispose()
            app.state.celery.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    result = run(args.top)
    for name, figures in result.items():
        print(
            f"== {name}: {figures['cpu_ms_per_request']} ms CPU per request "
            f"({figures['cpu_ms_per_request_profiled']} ms under cProfile)"
        )
        print(figures["profile"])


if __name__ == "__main__":
    main()
