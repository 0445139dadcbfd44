"""The status page in a real headless Chromium (Debian's chromium + chromium-driver, via selenium):
load it, see a model change state after a request, save a screenshot artifact."""

import asyncio
import os
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.harness import fake_engine_spec, run_gateway, write_models

pytestmark = pytest.mark.browser
ARTIFACTS = Path(os.environ.get("SPARKGATE_ARTIFACTS", Path(__file__).resolve().parents[2] / ".cache" / "artifacts"))


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


_ROW_STATE = ("const row = document.querySelector(`tr[data-model='${arguments[0]}']`);"
              " return row ? row.dataset.state : '';")
_TEXT = "const el = document.querySelector(arguments[0]); return el ? el.innerText : '';"


async def row_state(driver: webdriver.Chrome, model: str, want: str, timeout: float = 20) -> str:
    """The model's state as the page shows it, once it is `want` (the page updates from the events stream)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    state = ""
    while loop.time() < deadline:
        # One script call reads the row atomically: the page re-renders its table on every event, so an
        # element found in one call may be gone (stale) by the next.
        state = await asyncio.to_thread(driver.execute_script, _ROW_STATE, model)
        if state == want:
            return state
        await asyncio.sleep(0.1)  # polling the DOM: a browser offers the test no event to await
    return state


async def test_status_page_shows_a_model_waking_up(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("tiny", memory_gb=12), fake_engine_spec("other", memory_gb=30))
    async with run_gateway(models) as gw:
        driver = await asyncio.to_thread(browser)
        try:
            await asyncio.to_thread(driver.get, gw.url + "/")
            assert await row_state(driver, "tiny", "stopped") == "stopped"
            async with httpx.AsyncClient(timeout=30) as client:
                resp = await client.post(gw.v1 + "/chat/completions", json={"model": "tiny", "messages": []})
                assert resp.status_code == 200
            assert await row_state(driver, "tiny", "ready") == "ready"
            assert "tiny 12 GB" in await asyncio.to_thread(driver.execute_script, _TEXT, ".bar")
            assert "starting → ready" in await asyncio.to_thread(driver.execute_script, _TEXT, "#events")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "status-page.png"
            await asyncio.to_thread(driver.save_screenshot, str(shot))
            assert shot.stat().st_size > 10_000
        finally:
            await asyncio.to_thread(driver.quit)
