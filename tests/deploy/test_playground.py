"""The playground page in a real headless Chromium (Debian's chromium + chromium-driver) driven by selenium:
streamed text grows, a 10-step image arrives with previews on the way, errors show the API's message."""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.deploy.conftest import LiveServer, find_tool

SCREENSHOT_ENV = "GENSERVE_PLAYGROUND_SCREENSHOT"  # optional: where to copy the screenshot


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = find_tool("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    service = Service(executable_path=find_tool("chromedriver"), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def choose_model(driver: webdriver.Chrome, name: str) -> None:
    WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) >= 2)
    Select(driver.find_element(By.ID, "model")).select_by_value(name)


def set_value(driver: webdriver.Chrome, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def test_page_is_self_contained(live_server: LiveServer) -> None:
    page = httpx.get(f"{live_server.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    script = httpx.get(f"{live_server.url}/playground.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    for text in (page.text, script.text):
        assert "http://" not in text.replace("http://127.0.0.1", "") and "https://" not in text  # no CDN


def test_playground_streams_text_and_draws_an_image(live_server: LiveServer, browser: webdriver.Chrome,
                                                    tmp_path: Path) -> None:
    browser.get(f"{live_server.url}/")
    assert browser.title == "genserve playground"
    choose_model(browser, "tiny-shakespeare")
    assert browser.find_element(By.ID, "ar-panel").is_displayed()
    prompt = browser.find_element(By.ID, "ar-prompt")
    prompt.clear()
    prompt.send_keys("KING LEAR:")
    set_value(browser, "ar-max-tokens", "200")  # the model's context is 256 tokens
    set_value(browser, "ar-temperature", "0.8")
    set_value(browser, "ar-seed", "5")
    browser.find_element(By.ID, "ar-generate").click()

    # Watch the output while it streams: it must be seen at several lengths before the end.
    lengths: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = browser.find_element(By.ID, "ar-output").text
        if text and (not lengths or len(text) != lengths[-1]):
            lengths.append(len(text))
        if browser.find_element(By.ID, "ar-status").text.startswith("done"):
            break
        assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
        time.sleep(0.01)
    status = browser.find_element(By.ID, "ar-status").text
    assert status.startswith("done"), status
    final_text = browser.find_element(By.ID, "ar-output").text
    assert len(final_text) > 40
    assert len(lengths) >= 3 and lengths == sorted(lengths), lengths
    reference = httpx.post(f"{live_server.url}/generate", timeout=120, json={
        "model": "tiny-shakespeare", "prompt": "KING LEAR:", "max_tokens": 200, "temperature": 0.8, "seed": 5})
    assert reference.json()["text"].strip() == final_text.strip()

    choose_model(browser, "tiny-digits")
    assert browser.find_element(By.ID, "diffusion-panel").is_displayed()
    assert not browser.find_element(By.ID, "ar-panel").is_displayed()
    set_value(browser, "diffusion-prompt", "digit 3")
    browser.execute_script("const s = document.getElementById('diffusion-steps'); s.value = 10;"
                           "s.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.ID, "diffusion-steps-value").text == "10"
    set_value(browser, "diffusion-seed", "1")
    browser.find_element(By.ID, "diffusion-generate").click()
    WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#diffusion-images img.final-image"))
    status = browser.find_element(By.ID, "diffusion-status").text
    assert status.startswith("done: 10 steps"), status
    assert "step 10" in browser.find_element(By.ID, "diffusion-preview-caption").text
    final = browser.find_element(By.CSS_SELECTOR, "#diffusion-images img.final-image")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", final) == 16
    png = base64.b64decode(final.get_attribute("src").split(",", 1)[1])
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (16, 16)
        assert image.convert("L").getextrema()[1] > 0  # not a blank image

    # The latency panel shows both paradigms' histograms with counts from /metrics.
    WebDriverWait(browser, 15).until(lambda d: d.find_elements(
        By.CSS_SELECTOR, 'table[data-paradigm="diffusion"] tr[data-histogram="genserve_denoise_step_seconds"]'))
    ar_count = browser.find_element(By.CSS_SELECTOR, 'table[data-paradigm="autoregressive"] '
                                    'tr[data-histogram="genserve_request_duration_seconds"] td:nth-child(2)').text
    assert int(ar_count) >= 1
    screenshot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        Path(os.environ[SCREENSHOT_ENV]).write_bytes(screenshot.read_bytes())


def test_playground_shows_the_api_error_message(live_server: LiveServer, browser: webdriver.Chrome) -> None:
    browser.get(f"{live_server.url}/")
    choose_model(browser, "tiny-digits")
    set_value(browser, "diffusion-prompt", "zebra")
    browser.find_element(By.ID, "diffusion-generate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    message = browser.find_element(By.ID, "error").text
    expected = httpx.post(f"{live_server.url}/generate", json={"model": "tiny-digits", "prompt": "zebra"},
                          timeout=30).json()["error"]["message"]
    assert message == expected and "unknown label 'zebra'" in message
    assert browser.find_element(By.ID, "diffusion-generate").is_enabled()
