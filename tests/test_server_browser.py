"""The chat page of `kiln serve` in a real headless browser (Debian's chromium and
chromium-driver, driven by selenium): a message gets a streamed reply, and a second reply
can be stopped mid-stream, after which the server's slot is free again."""
import json
import shutil
import time

import pytest

from test_server import Server

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (extra oracles)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.oracle,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="no headless browser: apt-get install chromium chromium-driver")]
WAIT = 120


@pytest.fixture(scope="module")
def browser(smollm2_path):
    server = Server(smollm2_path, "--ctx", "1024", "--threads", "1")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    from selenium.webdriver.chrome.service import Service
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield server, driver
    finally:
        driver.quit()
        server.close()


def _send(driver, text):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def test_chat_page_streams_a_reply_and_stops_one(browser):
    server, driver = browser
    driver.get(server.url + "/")
    wait = WebDriverWait(driver, WAIT)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "SmolLM2"))

    _send(driver, "Say hello.")
    first = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#reply-1.done")))
    assert first.text.strip(), "the first reply is empty"
    assert first.get_attribute("data-finish") in ("stop", "length")
    assert "tokens/s" in driver.find_element(By.ID, "stats").text

    # a long reply, stopped as soon as it has started streaming; the page samples at its
    # default temperature, so a reply can end on its own before the click: then ask again
    for attempt in range(8):
        n = driver.execute_script("return messages.length")
        _send(driver, "Write a very long story about a dragon, at least a thousand words.")
        reply = wait.until(EC.presence_of_element_located((By.ID, f"reply-{n + 1}")))
        wait.until(lambda d: len(reply.text) > 0 or "done" in reply.get_attribute("class"))
        stop = driver.find_element(By.ID, "stop")
        if stop.is_enabled():
            stop.click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"#reply-{n + 1}.done")))
        if reply.get_attribute("data-finish") == "stopped":
            break
    else:
        pytest.fail("no reply was still streaming when Stop was clicked, in 8 tries")
    assert reply.text.strip(), "the stopped reply shows no text"
    # the conversation keeps every turn, the stopped reply's partial text included
    assert driver.execute_script("return messages.length") == n + 2
    assert driver.execute_script("return messages[messages.length - 1].role") == "assistant"

    deadline = time.monotonic() + 60
    while json.loads(server.get("/health")[1])["slots_busy"] != 0:
        assert time.monotonic() < deadline, "the stopped reply still holds its slot"
        time.sleep(0.2)
