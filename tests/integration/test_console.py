"""The console at / in Debian's headless chromium (Selenium with chromium-driver).

A `stowaway serve` forwards to the Healthcare API stub standing in front of a real
Orthanc. The stub answers one upload 400 (the instance fails) and then 403s (the
destination is blocked): the console shows both, with the reason and the fix. Once
the "IAM role is granted" (the faults end) the queue drains; the operator enters a
token, clicks Requeue on the failed instance, and it ends in Orthanc. Screenshots of
each step are kept in the test's directory (``screenshots/``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import StowawayFactory
from tests.support.dicom_files import make_study, read_uids
from tests.support.healthcare_stub import Fault, HealthcareStub, google_error_body
from tests.support.orthanc import OrthancServer, orthanc_available
from tests.support.processes import dcmsend, wait_for_port
from tests.support.seeding import wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.parametrize("db_url", ["sqlite"], indirect=True),
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists() and orthanc_available()),
        reason="needs Debian's chromium, chromium-driver and Orthanc",
    ),
]

TOKEN = "console-token-0123456789abcdef"
FAST = ("--poll-interval", "50ms", "--backoff-initial", "200ms", "--backoff-max", "1s")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--window-size=1400,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    # The Debian driver, never a download (Selenium Manager is not asked).
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def shot(driver: Any, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "screenshots"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def eventually(driver: Any, condition: Callable[[], object], timeout: float = 60) -> None:
    """Poll the page (it re-renders every few seconds: stale elements are retried)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def holds() -> object:
        try:
            return condition()
        except StaleElementReferenceException:
            return False

    wait_until(holds, timeout=timeout, interval=0.25)


def test_console_shows_a_blocked_destination_and_a_failed_instance_and_requeues_it(
    stowaway: StowawayFactory, tmp_path: Path, orthanc: OrthancServer, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    tokens = tmp_path / "tokens"
    tokens.write_text(f"operator:{TOKEN}\n")
    with HealthcareStub(upstream=orthanc.dicomweb_url) as stub:
        bad_request = google_error_body(400, "INVALID_ARGUMENT", "invalid DICOM data")
        stub.script(Fault.http(400, body=bad_request))
        proc = stowaway(
            "serve",
            "--dicomweb-url",
            stub.base_url,
            "--auth",
            "none",
            "--admin-token-file",
            str(tokens),
            *FAST,
            wait_port=False,
        )
        assert proc.proc is not None
        wait_for_port(proc.port, timeout=120, proc=proc.proc)  # a busy machine starts slowly
        api = f"http://127.0.0.1:{proc.http_port}/api/v1"
        http = requests.Session()
        http.trust_env = False

        def rows(status: str) -> list[dict[str, Any]]:
            page = http.get(f"{api}/instances", params={"status": status}, timeout=10).json()
            return list(page["items"])

        [failing] = make_study(tmp_path / "a", 1, rows=16, cols=16, seed=31)
        assert dcmsend(proc.port, [failing]).returncode == 0
        wait_until(lambda: len(rows("failed")) == 1, timeout=60)
        [failed] = rows("failed")
        stub.script(Fault.iam_denied(times=100_000))
        waiting = make_study(tmp_path / "b", 2, rows=16, cols=16, seed=32)
        assert dcmsend(proc.port, waiting).returncode == 0

        def destination_state() -> str:
            [d] = http.get(f"{api}/destinations", timeout=10).json()
            return str(d["state"])

        wait_until(lambda: destination_state() == "blocked", timeout=60)

        browser.get(f"http://127.0.0.1:{proc.http_port}/")
        blocked_row = '#destinations tr[data-state="blocked"]'
        eventually(browser, lambda: browser.find_elements(By.CSS_SELECTOR, blocked_row))
        row = browser.find_element(By.CSS_SELECTOR, blocked_row)
        assert "default" in row.text and "BLOCKED" in row.text.upper()
        fix = row.find_element(By.CSS_SELECTOR, "td.fix").text
        assert "roles/healthcare.dicomEditor" in fix  # what `stowaway check` would print
        failed_row = f'#failed tr[data-id="{failed["id"]}"]'
        eventually(browser, lambda: browser.find_elements(By.CSS_SELECTOR, failed_row))
        text = browser.find_element(By.CSS_SELECTOR, failed_row).text
        assert failed["sop_instance_uid"] in text and "HTTP 400" in text
        assert browser.find_element(By.ID, "count-failed").text == "1"
        eventually(browser, lambda: browser.find_element(By.ID, "count-pending").text == "2")
        # No token yet: no action buttons.
        assert not browser.find_elements(By.CSS_SELECTOR, f"{failed_row} button.requeue")
        shot(browser, tmp_path, "1-blocked-and-failed")

        # The history of the failed row, from the console.
        browser.find_element(By.CSS_SELECTOR, f"{failed_row} button.history").click()
        eventually(browser, lambda: browser.find_element(By.ID, "details").is_displayed())
        assert "present, intact" in browser.find_element(By.ID, "details-spool").text
        assert "failed" in browser.find_element(By.ID, "history").text
        shot(browser, tmp_path, "2-history")

        # The IAM role is granted: the destination unblocks and the queue drains.
        stub.fault = None
        eventually(
            browser,
            lambda: browser.find_elements(By.CSS_SELECTOR, '#destinations tr[data-state="ok"]'),
        )
        wait_until(lambda: {read_uids(f).sop_uid for f in waiting} <= orthanc.instance_uids(), 60)
        eventually(browser, lambda: browser.find_element(By.ID, "count-pending").text == "0")
        shot(browser, tmp_path, "3-drained")

        # With a token, Requeue moves the failed instance back, and it goes to Orthanc.
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "token-use").click()
        requeue = f"{failed_row} button.requeue"
        eventually(browser, lambda: browser.find_elements(By.CSS_SELECTOR, requeue))
        browser.find_element(By.CSS_SELECTOR, requeue).click()
        eventually(browser, lambda: "requeued 1" in browser.find_element(By.ID, "message").text)
        wait_until(lambda: failed["sop_instance_uid"] in orthanc.instance_uids(), timeout=60)
        eventually(browser, lambda: browser.find_element(By.ID, "count-failed").text == "0")
        eventually(browser, lambda: not browser.find_elements(By.CSS_SELECTOR, failed_row))
        eventually(browser, lambda: browser.find_element(By.ID, "count-done").text == "3")
        # The history shown (refreshed with the page) now ends in the upload.
        eventually(browser, lambda: "requeued" in browser.find_element(By.ID, "history").text)
        shot(browser, tmp_path, "4-requeued")
        assert "who=operator" in proc.log() and "action=requeue" in proc.log()
        assert TOKEN not in proc.log()
        assert proc.stop() == 0
    assert os.listdir(tmp_path / "screenshots")
