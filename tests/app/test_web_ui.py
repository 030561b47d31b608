"""The web page at `/` clicked through in headless Chromium (Debian's `chromium` and `chromium-driver`): a chat
streamed from the default model, an SDK-built inferlet uploaded through the file input and run with arguments,
its messages and final status, the engine panel's numbers; the API key typed into the page. Plus the page's
HTTP side without a browser: its files, their openness under an API key, GET /v1/engine/stats.

Without Chromium the browser tests skip, except under CI (the CI script installs it), where they fail."""
from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.app import raw_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 60.0
RUN_ARGS = ["--prompt", "The capital of France is", "--max-tokens", "8"]
RUN_ARGS_TYPED = '--prompt "The capital of France is" --max-tokens 8'
CHAT_TEXT = "Name one color."
CHAT_MAX_TOKENS = 12

pytestmark = pytest.mark.timeout(600)


# -- the browser ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = "Chromium not installed: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (missing {', '.join(missing)}; CI must run the web page's tests)")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    # Both paths given: Selenium Manager (which would download a browser) is never asked.
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="pie-chromium-") as profile:
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """condition(driver) once truthy; elements the page replaces meanwhile (stale) are looked up again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout_s, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    return wait.until(condition, f"timed out waiting for {what}")


def text_of(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def open_page(driver: Any, url: str) -> None:
    driver.get(url + "/")
    wait_for(driver, lambda d: text_of(d, "server-status") == "ready", "the status badge to say ready")


def browser_errors(driver: Any) -> list[str]:
    """Uncaught errors and failed requests of the page (Chromium's console log)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


# -- the real model and inferlet --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_completion_wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """inferlets/contrib/text-completion built by the SDK (cached by content hash for the session)."""
    from pie_server.app.inferlet_build import build_inferlet
    from pie_server.inferlets import CONTRIB_DIR

    return build_inferlet(CONTRIB_DIR / "text-completion", tmp_path_factory.mktemp("ui") / "text-completion.wasm")


def test_chat_upload_run_and_engine_panel(browser, real_server, text_completion_wasm: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url = real_server.url
    open_page(browser, url)
    browser_errors(browser)  # read (and so emptied) here: what an earlier test's page logged is not this one's
    model_name = raw_http.request(url + "/v1/models")[1]["data"][0]["id"]
    # The server is shared with other tests of the session: their runs are in the runs table too.
    earlier_run_ids = {r["id"][:16] for r in raw_http.request(url + "/v1/runs")[1]["data"]}
    assert wait_for(browser, lambda d: [o.text for o in Select(d.find_element(By.ID, "chat-model")).options],
                    "the model list") == [model_name]

    # Chat: greedy, so the streamed answer the page assembles equals the API's answer to the same request.
    for field, value in (("chat-temperature", "0"), ("chat-max-tokens", str(CHAT_MAX_TOKENS))):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "chat-input").send_keys(CHAT_TEXT)
    browser.find_element(By.ID, "chat-send").click()
    reply = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state='done']"),
                     "the streamed reply")[0]
    expected = raw_http.request(url + "/v1/chat/completions", "POST", {
        "model": model_name, "messages": [{"role": "user", "content": CHAT_TEXT}],
        "max_tokens": CHAT_MAX_TOKENS, "temperature": 0})[1]["choices"][0]["message"]["content"]
    assert expected.strip()
    assert reply.find_element(By.CSS_SELECTOR, ".text").text == expected.strip()  # .text trims, as a reader sees
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user .text").text == CHAT_TEXT
    assert browser.find_element(By.ID, "chat-send").is_enabled()

    # Upload through the file input: the name is taken from the file's name.
    browser.find_element(By.ID, "upload-file").send_keys(str(text_completion_wasm))
    assert browser.find_element(By.ID, "upload-name").get_attribute("value") == "text-completion"
    browser.find_element(By.ID, "upload-button").click()
    wait_for(browser, lambda d: text_of(d, "upload-status").startswith("Uploaded"), "the upload", timeout_s=300)
    listed = {r["name"]: r for r in raw_http.request(url + "/v1/inferlets")[1]["data"]}
    try:
        record = listed["text-completion"]
        table = text_of(browser, "inferlet-table")
        assert "text-completion" in table and record["id"][:12] in table
        assert Select(browser.find_element(By.ID, "run-inferlet")).first_selected_option.text == "text-completion"

        # Run with arguments typed as on a shell; the messages are the inferlet's (greedy: the API's again).
        browser.find_element(By.ID, "run-args").send_keys(RUN_ARGS_TYPED)
        browser.find_element(By.ID, "run-button").click()
        wait_for(browser, lambda d: text_of(d, "run-status") not in ("idle", "starting…", "running"),
                 "the run's final status")
        assert text_of(browser, "run-status") == "finished"
        run = raw_http.request(url + "/v1/inferlets/text-completion/runs", "POST", {"args": RUN_ARGS})[1]
        assert run["status"] == "finished" and "".join(run["messages"]).strip()
        output = browser.find_element(By.ID, "run-output").get_property("textContent")
        assert output == "".join(run["messages"])
        assert text_of(browser, "run-count") == str(len(run["messages"]))
        run_id = text_of(browser, "run-id")
        assert run_id.startswith("run-")

        # Cancel a long run once its first messages came (DELETE /v1/runs/{id}; the stream then ends cancelled).
        args = browser.find_element(By.ID, "run-args")
        args.clear()
        args.send_keys('--prompt "Once upon a time" --max-tokens 2000')
        browser.find_element(By.ID, "run-button").click()
        wait_for(browser, lambda d: int(text_of(d, "run-count")) >= 2, "the long run's first messages")
        browser.find_element(By.ID, "run-cancel").click()
        wait_for(browser, lambda d: text_of(d, "run-status") == "cancelled", "the cancelled status")
        assert int(text_of(browser, "run-count")) < 100 and browser.find_element(By.ID, "run-button").is_enabled()

        # The engine panel: numbers from /v1/engine/stats, the finished run in the runs table.
        wait_for(browser, lambda d: re.fullmatch(r"\d+ / 256", text_of(d, "stat-pages")), "the KV page numbers")
        assert re.fullmatch(r"\d+\.\d %", text_of(browser, "kv-usage"))
        for stat in ("stat-instances", "stat-requests-running", "stat-requests-waiting", "stat-runs-running"):
            assert text_of(browser, stat).isdigit(), stat
        wait_for(browser, lambda d: run_id[:16] in text_of(d, "run-table"), "the run in the runs table")
        # Read in one script: the page re-renders the table as it polls, so row elements may go stale.
        rows = dict(browser.execute_script(
            "return Array.from(document.querySelectorAll('#run-table tbody tr'))"
            ".map(r => [r.querySelector('code').textContent, r.innerText]);"))
        rows = {run: row for run, row in rows.items() if run not in earlier_run_ids}
        assert "text-completion" in rows[run_id[:16]] and "finished" in rows[run_id[:16]]
        # The page's two runs and the test's own run through the API.
        assert sorted(row.split()[2] for row in rows.values()) == ["cancelled", "finished", "finished"]
        assert browser_errors(browser) == []
    finally:
        raw_http.request(f"{url}/v1/inferlets/{listed.get('text-completion', {}).get('id', 'text-completion')}",
                         "DELETE")


def test_the_api_key_typed_into_the_page_is_sent_and_kept(browser, make_fake_server) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server = make_fake_server(api_key="secret")
    open_page(browser, server.url)  # the page itself is open
    wait_for(browser, lambda d: "401" in text_of(d, "engine-error"), "the 401 of the stats without a key")
    assert text_of(browser, "stat-pages") == "-"
    try:
        browser.find_element(By.ID, "api-key").send_keys("secret", Keys.TAB)  # change: all is read again, with it
        wait_for(browser, lambda d: re.fullmatch(r"\d+ / \d+", text_of(d, "stat-pages")), "the stats with the key")
        assert text_of(browser, "engine-error") == ""
        browser.refresh()  # the key survives a reload (localStorage)
        wait_for(browser, lambda d: re.fullmatch(r"\d+ / \d+", text_of(d, "stat-pages")), "the stats after a reload")
        assert browser.find_element(By.ID, "api-key").get_attribute("value") == "secret"
    finally:
        browser.execute_script("localStorage.clear()")  # the browser is shared by the module's tests


# -- the page's HTTP side -----------------------------------------------------------------------------------------

class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_the_page_and_its_files_are_served_open_and_local(make_fake_server) -> None:
    server = make_fake_server(api_key="secret")
    status, html, headers = raw_http.request(server.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    parser = _Assets()
    parser.feed(html)
    assert {"/static/app.js", "/static/style.css"} <= set(parser.urls)
    for asset in parser.urls:  # nothing from another origin: the page works offline
        assert asset.startswith("/static/") or asset.startswith("data:"), asset
        if asset.startswith("/static/"):
            assert raw_http.request(server.url + asset)[0] == 200, asset
    assert raw_http.request(server.url + "/static/../auth.py")[0] == 404
    assert raw_http.request(server.url + "/static/nothing.js")[0] == 404
    assert raw_http.request(server.url + "/v1/engine/stats")[0] == 401  # the API stays closed


def test_engine_stats_counts_pages_instances_and_requests(make_fake_server) -> None:
    """While one streamed chat runs on the fake engine (2 KV pages per instance), then after it."""
    from tests.app.fake_engine import PAGES_PER_INSTANCE, FakeEngine

    server = make_fake_server(FakeEngine(token_delay_s=0.05, num_pages=64))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60, "stream": True}
    chat = threading.Thread(target=raw_http.sse_events, args=(server.url + "/v1/chat/completions", body))
    chat.start()
    try:
        deadline = time.monotonic() + 10
        # Generating: launched, its prompt event read and its KV pages reserved (num_requests_waiting counts it
        # until then).
        while ((stats := _stats(server.url))["num_instances"], stats["num_requests_waiting"]) != (1, 0) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        used = PAGES_PER_INSTANCE
        assert stats == {"object": "engine.stats", "model": "fake-model", "page_size": 16, "num_pages": 64,
                         "num_free_pages": 64 - used, "kv_cache_usage_perc": pytest.approx(used / 64),
                         "num_instances": 1, "num_requests_running": 1, "num_requests_waiting": 0,
                         "num_runs_running": 0}
    finally:
        chat.join(timeout=30)
    stats = _stats(server.url)
    assert (stats["num_instances"], stats["num_requests_running"], stats["kv_cache_usage_perc"]) == (0, 0, 0.0)


def _stats(url: str) -> dict[str, Any]:
    status, body, _ = raw_http.request(url + "/v1/engine/stats")
    assert status == 200, body
    return body
