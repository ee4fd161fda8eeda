"""The README runs as written: every ``bash`` block, in order, in one shell, from a copy of the
repository's models, data and examples, against ``shortened serve`` on localhost:8000 (what
``make serve`` runs); then every ``python`` block. ``sh`` blocks need a GPU, a Hub token or a
cluster and are not run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e_service import base_env, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
PORT = 8000  # the README's commands name it


def blocks(language: str) -> list[tuple[int, str]]:
    text = (REPO / "README.md").read_text()
    return [
        (text.count("\n", 0, match.start()) + 1, match.group(2))
        for match in FENCE.finditer(text)
        if match.group(1) == language
    ]


def _answers(url: str) -> bool:
    try:
        import httpx

        return httpx.get(url, timeout=2).status_code == 200
    except Exception:
        return False


def test_readme_blocks_are_found() -> None:
    assert len(blocks("bash")) >= 8 and blocks("python")
    # Every bash block uses only what the repository ships.
    for line, code in blocks("bash"):
        assert "example.com" not in code and "hf://" not in code, f"README line {line}"


@pytest.mark.timeout(3600)
def test_readme_runs_as_written(tmp_path: Path) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            pytest.fail(f"port {PORT} is in use: the README's commands need it for `make serve`")
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("models", "data", "examples"):
        shutil.copytree(REPO / name, work / name)
    (work / ".venv").symlink_to(REPO / ".venv")
    env = base_env({"SHORTENED_PROGRESS_INTERVAL_S": "30"})
    env.pop("SHORTENED_URL", None)
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "shortened.cli", "serve"],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{PORT}/healthz"), 120, "make serve")
        script = ["set -eu"]
        for line, code in blocks("bash"):
            script += [f'echo "### README line {line}" >&2', code]
        transcript = tmp_path / "readme.out"
        with open(transcript, "w") as out:
            returncode = subprocess.run(
                ["bash", "-c", "\n".join(script)],
                cwd=work,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=2400,
            ).returncode
        text = transcript.read_text()
        markers = re.findall(r"### README line \d+", text)
        assert returncode == 0, (
            f"failed after {markers[-1] if markers else 'start'}:\n{text[-4000:]}"
        )
        assert (work / "out" / "quickstart" / "model.safetensors").is_file()
        assert (work / "out" / "tiny-lora" / "model.safetensors").is_file()
        for line, code in blocks("python"):
            ran = subprocess.run(
                [str(REPO / ".venv" / "bin" / "python"), "-c", code],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert ran.returncode == 0, f"README line {line}:\n{ran.stderr[-3000:]}"
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            code = serve.wait()
        log.close()
    # Ctrl-C / SIGTERM is a warm shutdown with exit status 0.
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert os.path.exists(work / "var")
