"""``/docs`` and ``/redoc`` render in a real browser that cannot reach the internet: their
scripts and styles come from the service itself, not from a CDN."""

from __future__ import annotations

import pytest
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e_service import base_env, free_port, start_api, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    env = base_env({"SHORTENED_DATA_DIR": str(root / "var"), "SHORTENED_REAPER_INTERVAL_S": "0"})
    process, url = start_api(env, free_port(), root / "api.log")
    try:
        yield url
    finally:
        process.stop()


def test_swagger_ui_renders_offline(api_url, browser) -> None:
    browser.get(f"{api_url}/docs")
    # Swagger UI draws one block per operation once its bundle has run and read the schema.
    operations = wait_until(
        lambda: (
            browser.execute_script(
                "return document.querySelectorAll('.swagger-ui .opblock').length"
            )
            or None
        ),
        30,
        "Swagger UI operations",
    )
    assert operations >= 10
    sources = browser.execute_script(
        "return Array.from(document.scripts).map(s => s.src).concat("
        "Array.from(document.querySelectorAll('link[rel=stylesheet]')).map(l => l.href))"
    )
    assert sources and all(src.startswith(api_url) for src in sources if src), sources


def test_redoc_renders_offline(api_url, browser) -> None:
    browser.get(f"{api_url}/redoc")
    WebDriverWait(browser, 30).until(
        lambda d: (
            d.execute_script(
                "return document.querySelectorAll('[role=menuitem], li[data-item-id]').length"
            )
            > 5
        )
    )
    title = browser.execute_script(
        "return document.querySelector('h1') && document.querySelector('h1').textContent"
    )
    assert title and "shortened" in title
