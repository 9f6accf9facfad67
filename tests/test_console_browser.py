"""The console in a real browser: Debian's headless Chromium, driven by Selenium through the
system chromedriver (Selenium Manager off: nothing is downloaded), against a real
`functions-framework` status process on loopback and the emulator. Runs happen in this process
(`start_run`), so their operations are steered from here.

Few tests, each walking a whole story, with explicit waits and generous timeouts: the machine
is small and shared.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import opfuncs
import pytest
from conftest import free_port, seed_clients

from shared.resume.plan import RunOptions
from shared.runner import start_run

SECRET = "test-secret-1-0123456"
KEY = "smart-resume-secret"
WAIT = 45.0
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
)
LIVE = {"SMART_RESUME_HEARTBEAT_SECONDS": "1", "SMART_RESUME_LEASE_SECONDS": "10"}
STEPPED = """
[[operation]]
name = "step"
kind = "python"
target = "test_console_browser:stepper"
"""
QUARANTINING = """
quarantine_after = 1

[[operation]]
name = "first"
kind = "python"
target = "opfuncs:boom"
"""

#: Permits for `stepper`: each lets one client-operation finish, so the test moves the run.
STEPS = threading.Semaphore(0)


def stepper(ctx: Any) -> dict[str, Any] | None:
    """Waits for a permit from the test (or a stop: cancel, budget), then is done."""
    deadline = time.monotonic() + 120
    while not STEPS.acquire(timeout=0.1):
        if ctx.should_stop():
            return {"done": False}
        if time.monotonic() > deadline:
            raise RuntimeError("never given a step")
    return None


@pytest.fixture(scope="module")
def browser(chromium: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    # Selenium Manager would download drivers and browsers; it must never run here. A driver
    # path of our own skips it, and this makes any call to it fail instead of fetching.
    saved = {k: os.environ.get(k) for k in ("SE_MANAGER_PATH", "SE_OFFLINE", "SE_AVOID_STATS")}
    os.environ.update(
        SE_MANAGER_PATH="/nonexistent/selenium-manager-disabled",
        SE_OFFLINE="true",
        SE_AVOID_STATS="true",
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        service=Service(str(driver_path), log_output=os.devnull), options=options
    )
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- helpers --------------------------------------------------------------------------------


def wait(driver: Any, what: str, check: Callable[[Any], Any], timeout: float = WAIT) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The grid is redrawn by the page's refresh: an element found just before a redraw is
    # stale, which means "look again", not a failure.
    return WebDriverWait(
        driver, timeout, poll_frequency=0.25, ignored_exceptions=[StaleElementReferenceException]
    ).until(check, message=f"waited {timeout:.0f} s for {what}")


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def shown(driver: Any, element_id: str) -> bool:
    return bool(by_id(driver, element_id).is_displayed())


def text_of(driver: Any, element_id: str) -> str:
    return str(driver.execute_script(f"return document.getElementById('{element_id}').textContent"))


def give_secret(driver: Any, secret: str) -> None:
    wait(driver, "the secret prompt", lambda d: shown(d, "secret"))
    field = by_id(driver, "secret")
    field.clear()
    field.send_keys(secret)
    by_id(driver, "login-submit").click()


def open_console(driver: Any, url: str, secret: str = SECRET) -> None:
    driver.get(url + "/")
    give_secret(driver, secret)
    wait(driver, "the console", lambda d: shown(d, "app") and text_of(d, "health-state") != "…")


def same_origin_only(driver: Any, url: str) -> list[str]:
    """Every request the page made (navigation and resources): all to its own origin."""
    names = driver.execute_script(
        "return performance.getEntriesByType('navigation').concat("
        "performance.getEntriesByType('resource')).map(e => e.name)"
    )
    assert names, "no performance entries"
    return [n for n in names if not n.startswith(url + "/")]


def policy_violations(driver: Any) -> list[str]:
    """Console messages about the Content-Security-Policy, and script errors (a refused
    secret's 401 is an expected network message, not an error of the page)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"]
        or (entry["level"] == "SEVERE" and entry.get("source") != "network")
    ]


def run_in_background(settings: Any, db: Any) -> tuple[threading.Thread, dict[str, Any]]:
    done: dict[str, Any] = {}

    def work() -> None:
        done["outcome"] = start_run(settings, db, RunOptions(), trigger={"source": "test"})

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, done


# --- the stories ----------------------------------------------------------------------------


def test_secret_prompt_wrong_secret_and_storage(browser, function_process, db) -> None:
    """The page asks for the secret before reading anything; a wrong one is refused with a
    message; the right one is kept in the tab's session storage only (not the URL, not local
    storage) and not asked again on reload; every request stays on the page's origin; a
    hostile client name shows as text; a store that is down is said so."""
    seed_clients(db, 2)
    db.document("clients/c00001").update({"name": "<img src=x onerror=window.pwned=1>"})
    status = function_process("smart_resume_status")
    browser.get(status.url + "/")
    wait(browser, "the secret prompt", lambda d: shown(d, "secret"))
    assert not shown(browser, "app")
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.initiatorType === 'fetch').length"
    )
    assert fetched == 0  # nothing is read before the secret is given

    give_secret(browser, "not-the-secret")
    wait(browser, "the wrong-secret message", lambda d: "not accepted" in text_of(d, "login-msg"))
    assert not shown(browser, "app")
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY}')") is None

    give_secret(browser, SECRET)
    wait(browser, "the console", lambda d: shown(d, "app"))
    wait(
        browser,
        "two client rows",
        lambda d: len(d.find_elements("css selector", "#grid tbody tr[data-client]")) == 2,
    )
    names = [e.text for e in browser.find_elements("css selector", "#grid td.client strong")]
    assert "<img src=x onerror=window.pwned=1>" in names
    assert browser.execute_script("return window.pwned") is None
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY}')") == SECRET
    assert browser.execute_script("return localStorage.length") == 0
    assert browser.execute_script("return document.cookie") == ""
    assert SECRET not in browser.current_url

    browser.refresh()
    wait(browser, "the console after a reload", lambda d: shown(d, "app"))
    assert not shown(browser, "login")  # asked once per tab
    assert SECRET not in browser.current_url
    assert same_origin_only(browser, status.url) == []
    assert policy_violations(browser) == []

    # The store is down: the page says so instead of failing silently.
    dead = function_process(
        "smart_resume_status",
        FIRESTORE_EMULATOR_HOST=f"127.0.0.1:{free_port()}",
        SMART_RESUME_RPC_TIMEOUT_SECONDS="1",
    )
    browser.get(dead.url + "/")
    give_secret(browser, SECRET)
    wait(
        browser,
        "the store message",
        lambda d: "Firestore is unavailable" in text_of(d, "notice-text"),
    )


def test_live_run_progress_moves_and_cancel_stops_it(
    browser, function_process, db, configure, pipeline_file
) -> None:
    """During a live run the progress bar moves (client n of m) as the run does, and Cancel
    stops the run: it ends `cancelled` and the page shows it ended."""
    pipeline_file(STEPPED)
    settings = configure(**LIVE)
    seed_clients(db, 3)
    while STEPS.acquire(blocking=False):
        pass
    status = function_process("smart_resume_status", **LIVE)
    thread, done = run_in_background(settings, db)
    try:
        open_console(browser, status.url)
        wait(browser, "a live run", lambda d: shown(d, "run-live"))
        progress = by_id(browser, "progress")
        wait(browser, "client 1 of 3", lambda d: "client 1 of 3" in text_of(d, "progress-text"))
        assert (progress.get_property("value"), progress.get_property("max")) == (1, 3)
        assert text_of(browser, "run-elapsed")
        assert "ago" in text_of(browser, "run-heartbeat")

        STEPS.release()
        wait(browser, "client 2 of 3", lambda d: "client 2 of 3" in text_of(d, "progress-text"))
        assert progress.get_property("value") == 2
        wait(browser, "1 done", lambda d: "· 1 done" in text_of(d, "progress-text"))

        by_id(browser, "cancel").click()
        wait(
            browser, "the cancel notice", lambda d: "Cancel requested" in text_of(d, "notice-text")
        )
        thread.join(WAIT)
        assert not thread.is_alive(), "the run did not stop after Cancel"
    finally:
        for _ in range(3):
            STEPS.release()
        thread.join(WAIT)
    assert done["outcome"].status == "cancelled"
    wait(browser, "the run's end", lambda d: shown(d, "run-idle"))
    assert "cancelled" in text_of(browser, "idle-text")
    assert same_origin_only(browser, status.url) == []
    assert policy_violations(browser) == []


def test_runs_chart_and_retry_releases_quarantined_work(
    browser, function_process, db, configure, pipeline_file
) -> None:
    """The chart has one bar per run, coloured by outcome, with each run's summary on hover
    and click; Retry on a quarantined operation releases it (failures back to 0)."""
    pipeline_file(QUARANTINING)
    settings = configure()
    opfuncs.reset()
    seed_clients(db, 2)
    run_ids = [
        start_run(settings, db, RunOptions(), trigger={"source": "test"}).run_id for _ in range(3)
    ]
    status = function_process("smart_resume_status")
    open_console(browser, status.url)

    bars = wait(
        browser,
        "one bar per run",
        lambda d: (b := d.find_elements("css selector", "#chart rect.bar")) and len(b) == 3 and b,
    )
    assert sorted(b.get_attribute("data-run") for b in bars) == sorted(run_ids)
    assert all("o-completed" in b.get_attribute("class") for b in bars)
    title = browser.execute_script(
        "return arguments[0].querySelector('title').textContent", bars[0]
    )
    assert title.startswith(bars[0].get_attribute("data-run"))
    assert "completed" in title
    bars[-1].click()
    wait(browser, "the run's summary", lambda d: run_ids[-1] in text_of(d, "run-detail"))

    wait(browser, "quarantined work", lambda d: shown(d, "attention-card"))
    if not shown(browser, "health-note"):  # the status reports health: quarantine is failing
        assert text_of(browser, "health-state") == "failing"
    cell = '#grid tr[data-client="c00000"] td[data-operation="first"]'
    wait(
        browser,
        "the quarantined cell",
        lambda d: "quarantined" in d.find_element("css selector", cell).text,
    )
    browser.find_element("css selector", cell + " button.retry").click()
    wait(browser, "the release", lambda d: "Released c00000 / first" in text_of(d, "notice-text"))
    wait(
        browser,
        "the released cell",
        lambda d: "quarantined" not in d.find_element("css selector", cell).text,
    )

    released = db.document("clients/c00000/operations/first").get().to_dict()
    assert (released["status"], released["failures"]) == ("failed", 0)
    other = db.document("clients/c00001/operations/first").get().to_dict()
    assert other["status"] == "quarantined"
    assert same_origin_only(browser, status.url) == []
    assert policy_violations(browser) == []


FOLLOWED = """
fresh_hours = 0.0003
quarantine_after = 1

[[operation]]
name = "step"
kind = "python"
target = "test_console_browser:stepper"

[[operation]]
name = "enrich"
kind = "python"
target = "test_console_browser:enrich"
"""
ENRICH_ERROR = "HTTP 503 from the enrichment service: upstream timed out after 30 s"
#: What the status answer's `problems` holds in this story (added by a wrapper of the real
#: status function until the status itself lists them); the second one holds markup.
PROBLEMS = [
    {"clientId": "c00002", "operation": None, "problem": "'active' is not a boolean"},
    {
        "clientId": "c00000",
        "operation": "step",
        "problem": "'counts' holds <b>n/a</b>, not a number",
    },
]
WRAPPER = """
import importlib.util
import json

_spec = importlib.util.spec_from_file_location("real_status_main", {source!r})
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
PROBLEMS = json.loads({problems!r})


def smart_resume_status(request):
    response = _real.smart_resume_status(request)
    plain_get = request.method == "GET" and not (set(request.args) & {{"clients", "check"}})
    if plain_get and response.status_code == 200 and response.is_json:
        body = response.get_json()
        body["problems"] = list(body.get("problems") or []) + PROBLEMS
        response.set_data(json.dumps(body))
    return response
"""


def enrich(ctx: Any) -> None:
    """Fails for one client, so that it is quarantined (quarantine_after = 1)."""
    if ctx.client_id == "c00001":
        raise RuntimeError(ENRICH_ERROR)


def status_with_problems(tmp_path: Path, **env: str) -> Any:
    """The real status function, its plain GET answer carrying `PROBLEMS`."""
    import json

    from procs import ROOT, FunctionProcess

    wrapper = tmp_path / "status_with_problems.py"
    real = str(ROOT / "functions" / "smart_resume_status" / "main.py")
    wrapper.write_text(WRAPPER.format(source=real, problems=json.dumps(PROBLEMS)))
    return FunctionProcess(
        "smart_resume_status",
        free_port(),
        env,
        tmp_path / "status-with-problems.log",
        source=str(wrapper),
    )


def grid_cell(driver: Any, client_id: str, operation: str) -> str:
    """A grid cell's text as shown, in lower case (badges are shown in capitals)."""
    selector = f'#grid tr[data-client="{client_id}"] td[data-operation="{operation}"]'
    return str(driver.find_element("css selector", selector).text).lower()


def progress_client(db: Any) -> str | None:
    return ((db.document("locks/smart-resume").get().to_dict() or {}).get("progress") or {}).get(
        "clientId"
    )


def test_grid_follows_a_live_run_and_shows_errors_and_problems(
    browser, db, configure, pipeline_file, tmp_path
) -> None:
    """During a live run the 5 s refresh reloads the client grid too (the row being run is
    marked, a finished client shows its success); the health reason's "running for" and the Elapsed
    tile read one clock; a quarantined operation shows its last error and "1 failure in a
    row"; an inactive client reads `inactive`, not new and due now; the last good run is the
    completed one, not the newer cancelled one; the status's `problems` are listed as text.
    With CONSOLE_SCREENSHOT set, the page is saved there (docs/console.png)."""
    pipeline_file(FOLLOWED)
    settings = configure(**LIVE)
    seed_clients(db, 3)
    db.document("clients/zz-sleepy").set({"name": "Sleepy", "active": False})
    while STEPS.acquire(blocking=False):
        pass

    # A completed run (it quarantines c00001/enrich), then a cancelled one.
    for _ in range(3):
        STEPS.release()
    first = start_run(settings, db, RunOptions(), trigger={"source": "test"})
    assert first.status == "completed"
    time.sleep(1.5)  # fresh for about a second: every client is due again
    thread, done = run_in_background(settings, db)
    deadline = time.monotonic() + WAIT
    while progress_client(db) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    from shared import status as status_module

    status_module.cancel(settings, db)
    thread.join(WAIT)
    assert done["outcome"].status == "cancelled"
    time.sleep(1.5)

    status = status_with_problems(tmp_path, **LIVE)
    thread, done = run_in_background(settings, db)
    try:
        open_console(browser, status.url)
        wait(browser, "a live run", lambda d: shown(d, "run-live"))
        wait(browser, "client 1 of 3", lambda d: "client 1 of 3" in text_of(d, "progress-text"))
        current = progress_client(db)
        assert current
        row = f'#grid tr[data-client="{current}"]'
        wait(
            browser,
            "the running client marked in the grid",
            lambda d: (
                "current" in d.find_element("css selector", row).get_attribute("class")
                and "running" in grid_cell(d, current, "step")
            ),
        )

        STEPS.release()  # the first client finishes; the grid follows without a reload
        wait(browser, "client 2 of 3", lambda d: "client 2 of 3" in text_of(d, "progress-text"))
        wait(
            browser,
            "the finished client's success in the grid",
            lambda d: (
                "succeeded" in grid_cell(d, current, "step")
                and "current" not in d.find_element("css selector", row).get_attribute("class")
            ),
        )
        assert browser.execute_script("return performance.getEntriesByType('navigation').length")

        # One clock: the health reason's "running for" is the Elapsed tile's value.
        clocks = browser.execute_script(
            "const s = document.querySelector('#health-reasons [data-clock=age]');"
            "return [document.getElementById('run-elapsed').textContent, s && s.textContent];"
        )
        assert clocks[1] is not None, text_of(browser, "health-reasons")
        assert clocks[0] == clocks[1]
        assert "is running for" in text_of(browser, "health-reasons")

        # The quarantined operation: its last error, one failure in the singular.
        broken = grid_cell(browser, "c00001", "enrich")
        assert "quarantined" in broken
        assert "1 failure in a row" in broken and "1 failures" not in broken
        assert ENRICH_ERROR.lower() in broken
        wait(
            browser,
            "the error in the attention list",
            lambda d: ENRICH_ERROR in text_of(d, "attention"),
        )
        assert "1 failure in a row" in text_of(browser, "attention")

        # The inactive client is neither new nor due.
        for name in ("step", "enrich"):
            sleepy = grid_cell(browser, "zz-sleepy", name)
            assert "inactive" in sleepy
            assert "new" not in sleepy and "due now" not in sleepy

        # The last good run is the completed one, not the newer cancelled one.
        facts = text_of(browser, "health-facts")
        good = facts.split("Last good run", 1)[1].split("Last run", 1)[0]
        assert "completed" in good and "cancelled" not in good, facts

        # The status's problems, as text.
        wait(browser, "the problems panel", lambda d: shown(d, "problems-card"))
        listed = text_of(browser, "problems")
        assert "c00002: 'active' is not a boolean" in listed
        assert "c00000 / step: 'counts' holds <b>n/a</b>, not a number" in listed
        assert browser.execute_script("return document.querySelectorAll('#problems b').length") == 0

        target = os.environ.get("CONSOLE_SCREENSHOT")
        if target:
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(1280, min(int(height) + 140, 4000))
            time.sleep(0.5)
            browser.save_screenshot(target)
            browser.set_window_size(1280, 1000)
        assert same_origin_only(browser, status.url) == []
        assert policy_violations(browser) == []
    finally:
        for _ in range(3):
            STEPS.release()
        thread.join(WAIT)
        status.stop()
    assert done["outcome"].status == "completed"
