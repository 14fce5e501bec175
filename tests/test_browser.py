"""The page of `pfadseg serve` in headless Chromium (Debian's chromium + chromium-driver,
driven by selenium): token, upload, overlay, score, threshold slider, CSV, errors.

Nothing is downloaded at run time; the test skips where Chromium or its driver is absent
(`apt-get install chromium chromium-driver`).
"""
from __future__ import annotations

import csv
import importlib.util
import io
import shutil
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'pfadseg[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from pfadseg.demo import demo_root  # noqa: E402
from test_serve import write_checkpoint  # noqa: E402  (tests/ is on sys.path under pytest)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file() or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, chromedriver on PATH): "
           "apt-get install chromium chromium-driver")

IMAGE = demo_root() / "bottle" / "test" / "broken_large" / "000.jpg"
TOKEN = "browser-test-token"
WAIT_S = 120  # the first prediction on 2 busy cores can take a while

spec = importlib.util.spec_from_file_location(
    "load_test", Path(__file__).parents[1] / "benchmarks" / "load_test.py")
load_test = importlib.util.module_from_spec(spec)
spec.loader.exec_module(load_test)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> str:
    checkpoint = write_checkpoint(tmp_path_factory.mktemp("browser") / "checkpoint.safetensors")
    with load_test.running_server(checkpoint, ("--device", "cpu", "--token", TOKEN)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S).until(condition, message=f"timed out waiting for {what}")


def set_threshold(driver, value: float) -> None:
    driver.execute_script("const s = document.getElementById('threshold'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", str(value))


def open_page(driver, server: str) -> None:
    """The page, signed in, once it shows the model."""
    driver.get(f"{server}/?token={TOKEN}")
    wait(driver, lambda d: "efficientnet_lite0" in d.find_element(By.ID, "model").text, "the model info")


def upload_image(driver, server: str):
    """A fresh page with IMAGE dropped on it; returns its result card."""
    open_page(driver, server)
    driver.find_element(By.ID, "files").send_keys(str(IMAGE))
    return wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".result"), "a result")[0]


def test_wrong_token_asks_for_the_right_one(server: str, browser) -> None:
    browser.get(f"{server}/?token=wrong")
    auth = browser.find_element(By.ID, "auth")
    wait(browser, lambda d: auth.is_displayed(), "the token prompt")
    assert "401" in browser.find_element(By.ID, "status").text
    assert "token=" not in browser.current_url  # the token is not left in the address bar
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "use-token").click()
    wait(browser, lambda d: "efficientnet_lite0" in d.find_element(By.ID, "model").text,
         "the model info")
    assert not auth.is_displayed()


def test_upload_shows_overlay_score_and_verdict(server: str, browser) -> None:
    card = upload_image(browser, server)
    score = float(card.find_element(By.CSS_SELECTOR, ".score").text)
    api = httpx.post(f"{server}/predict", files=[("file", (IMAGE.name, IMAGE.read_bytes()))],
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=WAIT_S).json()["results"][0]
    assert score == pytest.approx(api["score"], abs=2e-3)
    assert card.find_element(By.CSS_SELECTOR, ".name").text == IMAGE.name
    verdict = card.find_element(By.CSS_SELECTOR, ".verdict").text
    assert verdict == ("anomalous" if api["anomalous"] else "normal")
    # the overlay is drawn: the canvas has the image's size and is not blank
    width, height, total = browser.execute_script(
        "const c = document.querySelector('.result canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];"
        "return [c.width, c.height, s];")
    assert (width, height) == (256, 256) and total > 0


def test_threshold_slider_moves_verdicts_and_masks(server: str, browser) -> None:
    card = upload_image(browser, server)
    set_threshold(browser, 0)  # everything is at or over 0: all anomalous, the mask is the whole image
    assert card.get_attribute("data-anomalous") == "true"
    assert card.find_element(By.CSS_SELECTOR, ".verdict").text == "anomalous"
    assert card.find_element(By.CSS_SELECTOR, ".area").text == "100.0%"
    set_threshold(browser, 1)  # normalised values stay under 1: nothing is flagged
    assert card.get_attribute("data-anomalous") == "false"
    assert card.find_element(By.CSS_SELECTOR, ".verdict").text == "normal"
    assert card.find_element(By.CSS_SELECTOR, ".area").text == "0.0%"
    assert browser.find_element(By.ID, "threshold-value").text == "1.00"
    rows = list(csv.DictReader(io.StringIO(browser.execute_script("return csvText();"))))
    assert [(r["name"], r["anomalous"], r["normalized_threshold"]) for r in rows] == [
        (IMAGE.name, "false", "1")]
    assert browser.find_element(By.ID, "csv").is_enabled()


def test_a_bad_file_shows_the_servers_reason(server: str, browser, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    open_page(browser, server)
    browser.find_element(By.ID, "files").send_keys(str(notes))
    status = browser.find_element(By.ID, "status")
    wait(browser, lambda d: "notes.txt" in status.text, "the error message")
    assert status.text.startswith("0 image(s) scored, 1 refused: notes.txt: not an image")
    assert status.get_attribute("class") == "error"
    # with good images in the same upload, those are scored and the bad one is listed
    browser.find_element(By.ID, "clear").click()
    browser.find_element(By.ID, "files").send_keys(f"{IMAGE}\n{notes}")
    wait(browser, lambda d: "refused" in status.text, "the summary")
    assert status.text.startswith("1 image(s) scored, 1 refused: notes.txt")  # the reason, no HTTP code
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".result .name")]
    assert names == [IMAGE.name]


def test_a_busy_server_is_asked_again_after_its_retry_after(server: str, browser) -> None:
    """A 503 (busy with other clients) stopped the page's upload with an error; it now
    waits the Retry-After the server sends and sends the same request again."""
    open_page(browser, server)
    browser.execute_script(
        "window.predictCalls = 0; const real = window.fetch;"
        "window.fetch = (path, options) => {"
        "  if (path !== '/predict') return real(path, options);"
        "  window.predictCalls += 1;"
        "  if (window.predictCalls <= 2) return Promise.resolve(new Response("
        "    JSON.stringify({detail: 'busy'}), {status: 503, headers: {'Retry-After': '1'}}));"
        "  return real(path, options); };")
    browser.find_element(By.ID, "files").send_keys(str(IMAGE))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".result"), "a result")
    assert browser.execute_script("return window.predictCalls;") == 3
    assert browser.find_element(By.ID, "status").text == "1 image(s) scored"
