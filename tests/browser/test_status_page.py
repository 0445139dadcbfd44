"""The status page in a real headless Chromium (Debian's chromium + chromium-driver, via selenium):
load it, see a model change state after a request, save a screenshot artifact."""

import asyncio
import os
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.harness import fake_engine_spec, run_gateway, write_models

pytestmark = pytest.mark.browser
ARTIFACTS = Path(os.environ.get("SPARKGATE_ARTIFACTS", Path(__file__).resolve().parents[2] / ".cache" / "artifacts"))


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


async def row_state(driver: webdriver.Chrome, model: str, want: str, timeout: float = 20) -> str:
    """The model's state as the page shows it, once it is `want` (the page updates from the events stream)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    state = ""
    while loop.time() < deadline:
        rows = await asyncio.to_thread(driver.find_elements, By.CSS_SELECTOR, f'tr[data-model="{model}"]')
        state = await asyncio.to_thread(rows[0].get_attribute, "data-state") if rows else ""
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
            bar = await asyncio.to_thread(driver.find_element, By.CSS_SELECTOR, ".bar")
            assert "tiny 12 GB" in bar.text
            events = await asyncio.to_thread(driver.find_element, By.ID, "events")
            assert "starting → ready" in events.text
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "status-page.png"
            await asyncio.to_thread(driver.save_screenshot, str(shot))
            assert shot.stat().st_size > 10_000
        finally:
            await asyncio.to_thread(driver.quit)
