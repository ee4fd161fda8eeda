"""The HTML report page (``GET /jobs/{id}/report``) of a real prune -> eval pipeline, opened in
headless Chromium.

API under uvicorn (subprocess) -> PostgreSQL -> Redis -> a real Celery worker running the
engine on models/tiny-llama; the page is checked in the browser: one bar per block, removed
bars in their own colour, protected ones marked, bars actually drawn, the parent-vs-pruned
table. A screenshot is kept in test-artifacts/report.png.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.e2e_service import (
    REPO,
    failing_in_worker_spec,
    prune_spec,
    redis_namespace,
    submit,
    wait_for_job,
    wait_until,
    worker_and_api,
)

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO / "test-artifacts"
HELDOUT = REPO / "data" / "stdlib_docs_heldout.txt"

EVAL_SECTION = {
    "perplexity": {"datasets": [str(HELDOUT)], "seq_len": 64, "max_windows": 4},
    "efficiency": {"batch_sizes": [1], "output_lengths": [8], "repeats": 2, "warmup": 1},
    "device": "cpu",
    "dtype": "float32",
}


@pytest.fixture(scope="module")
def stack(postgres_url, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    with redis_namespace() as (broker_url, queue):
        common = {
            "SHORTENED_DATABASE_URL": postgres_url,
            "SHORTENED_BROKER_URL": broker_url,
            "SHORTENED_QUEUE": queue,
            "SHORTENED_ARTIFACTS_URL": f"file://{root / 'artifacts'}",
            "SHORTENED_ALLOWED_LOCAL_ROOTS": f'["{REPO}"]',
            "SHORTENED_WORKER_METRICS_PORT": "0",
        }
        with worker_and_api(common, queue, root) as (worker, url):
            with httpx.Client(base_url=url, timeout=30) as api:
                yield {"api": api, "url": url, "worker": worker, "database_url": postgres_url}


@pytest.fixture(scope="module")
def pipeline(stack):
    """A prune job (default protection: 4 first, 2 last blocks; every block scored, as in the
    paper's figures) with an eval follow-up."""
    api = stack["api"]
    prune_id = submit(api, prune_spec(score_all_blocks=True, eval=EVAL_SECTION))
    prune = wait_for_job(api, prune_id, worker=stack["worker"])
    assert prune["status"] == "succeeded", prune

    def eval_done():
        job = api.get(f"/jobs/{prune_id}").json()
        steps = job["pipeline"]["jobs"] if job["pipeline"] else []
        if len(steps) == 2 and steps[1]["status"] in ("succeeded", "failed", "cancelled"):
            return steps[1]
        return None

    step = wait_until(eval_done, 300, "the pipeline's eval job", stack["worker"])
    evaluation = api.get(f"/jobs/{step['id']}").json()
    assert evaluation["status"] == "succeeded", evaluation
    return {"prune": prune, "eval": evaluation}


BARS_JS = """
return Array.from(document.querySelectorAll('svg#block-scores rect.bar')).map(el => {
  const box = el.getBoundingClientRect();
  return {block: Number(el.dataset.block), classes: Array.from(el.classList),
          fill: getComputedStyle(el).fill, height: box.height, width: box.width};
});
"""


def test_report_page_draws_block_scores_and_comparison(stack, pipeline, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    report = pipeline["prune"]["result"]
    job_id = pipeline["prune"]["id"]
    browser.get(f"{stack['url']}/jobs/{job_id}/report")
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
    assert job_id in browser.title
    assert browser.find_element(By.ID, "job-status").text == "succeeded"

    bars = browser.execute_script(BARS_JS)
    n = report["num_layers_before"]
    assert [b["block"] for b in bars] == list(range(n))  # one bar per block, in order
    removed, protected = set(report["removed_blocks"]), set(report["protected_blocks"])
    assert len(removed) == 2 and protected == {0, 1, 2, 3, n - 2, n - 1}
    for bar in bars:
        kind = (
            "removed"
            if bar["block"] in removed
            else "protected"
            if bar["block"] in protected
            else "kept"
        )
        assert bar["classes"][:2] == ["bar", kind] and set(bar["classes"][2:]) <= {"clipped"}, bar
        assert bar["height"] > 0 and bar["width"] > 0, bar  # drawn, not just in the DOM
    fills = {
        kind: {b["fill"] for b in bars if kind in b["classes"]}
        for kind in ("removed", "protected", "kept")
    }
    assert all(len(f) == 1 for f in fills.values()), fills  # one colour per kind
    assert fills["removed"] != fills["kept"] and fills["removed"] != fills["protected"]
    assert fills["protected"] != fills["kept"]
    # Bar heights follow the scores (bars far above the median are clipped to full height).
    scores = report["block_scores"]
    by_score = sorted(bars, key=lambda b: scores[b["block"]])
    heights = [b["height"] for b in by_score]
    assert heights == sorted(heights), [(b["block"], b["height"]) for b in by_score]
    clipped = [b for b in bars if "clipped" in b["classes"]]
    unclipped = [b for b in bars if "clipped" not in b["classes"]]
    if clipped:
        assert min(scores[b["block"]] for b in clipped) > max(scores[b["block"]] for b in unclipped)

    marks = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg#block-scores text.mark'))"
        ".map(el => [el.classList[1], Number(el.dataset.block), el.textContent])"
    )
    assert sorted(m[1] for m in marks if m[0] == "protected") == sorted(protected)
    assert sorted(m[1] for m in marks if m[0] == "removed") == sorted(removed)
    assert {m[2] for m in marks if m[0] == "removed"} == {"R"}
    assert {m[2] for m in marks if m[0] == "protected"} == {"P"}
    # A labelled value axis: numeric ticks, rendered, spanning the unclipped scores.
    ticks = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg#block-scores g.axis text.tick'))"
        ".map(t => [t.textContent, t.getBoundingClientRect().width])"
    )
    values = [float(text.replace(",", "")) for text, _ in ticks]
    assert len(values) >= 3 and all(width > 0 for _, width in ticks), ticks
    assert (
        values[0]
        <= min(scores[b["block"]] for b in unclipped)
        <= max(scores[b["block"]] for b in unclipped)
        <= values[-1]
    )

    def cells(key: str) -> tuple[str, str]:
        row = browser.find_element(By.CSS_SELECTOR, f'#comparison tr[data-key="{key}"]')
        return (
            row.find_element(By.CSS_SELECTOR, "td.parent").text,
            row.find_element(By.CSS_SELECTOR, "td.pruned").text,
        )

    parent, pruned = cells("params-exact")
    assert int(parent.replace(",", "")) == report["params_before"]
    assert int(pruned.replace(",", "")) == report["params_after"]
    assert cells("layers") == (str(n), str(n - 2))
    # From the pipeline's eval job: perplexity and speed of the parent and the pruned model.
    result = pipeline["eval"]["result"]
    ppl_parent, ppl_pruned = cells(f"ppl:{HELDOUT}")
    assert float(ppl_parent) == pytest.approx(
        result["baseline"]["perplexity"][str(HELDOUT)]["ppl"], rel=1e-3
    )
    assert float(ppl_pruned) == pytest.approx(
        result["model"]["perplexity"][str(HELDOUT)]["ppl"], rel=1e-3
    )
    latency = cells("latency:0")
    assert all(float(v) > 0 for v in latency)
    assert all(float(v) > 0 for v in cells("throughput:0"))

    # Keep a full-page screenshot as a test artifact.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height + 120)
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "report.png"
    assert browser.save_screenshot(str(target))
    assert target.stat().st_size > 10_000


def test_eval_job_page_compares_model_with_baseline(stack, pipeline):
    evaluation = pipeline["eval"]
    response = stack["api"].get(f"/jobs/{evaluation['id']}/report")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "Model vs baseline" in page and f'data-key="ppl:{HELDOUT}"' in page
    assert evaluation["spec"]["compare_with"] in page  # the baseline is named
    # The follow-up links back to the prune job's page.
    assert f'href="../{pipeline["prune"]["id"]}/report"' in page


def test_pending_and_failed_jobs_get_a_page(stack):
    api = stack["api"]
    # No calibration document is long enough: the worker fails once the data is tokenized.
    job_id = submit(api, failing_in_worker_spec())
    pending = api.get(f"/jobs/{job_id}/report")
    assert pending.status_code == 200
    assert 'id="pending-note"' in pending.text
    assert "report is available when the job succeeds" in pending.text
    assert re.search(r'id="job-status">(queued|running)<', pending.text)

    job = wait_for_job(api, job_id, worker=stack["worker"])
    assert job["status"] == "failed" and job["error"]["code"], job
    failed = api.get(f"/jobs/{job_id}/report")
    assert failed.status_code == 200
    assert 'id="job-error"' in failed.text and job["error"]["code"] in failed.text
    assert 'id="pending-note"' not in failed.text and "block-scores" not in failed.text


def test_report_is_tenant_scoped(stack, pipeline):
    from service.auth import create_api_key
    from service.db import make_engine, make_sessionmaker

    engine = make_engine(stack["database_url"])
    try:
        with make_sessionmaker(engine)() as session:
            _, key = create_api_key(session, "someone-else")
            session.commit()
    finally:
        engine.dispose()
    api = stack["api"]
    job_id = pipeline["prune"]["id"]
    other = api.get(f"/jobs/{job_id}/report", headers={"Authorization": f"Bearer {key}"})
    assert other.status_code == 404  # another tenant's job: as if it did not exist
    assert api.get(f"/jobs/{'0' * 32}/report").status_code == 404
    bad = api.get(f"/jobs/{job_id}/report", headers={"Authorization": "Bearer sk_nope"})
    assert bad.status_code == 401
