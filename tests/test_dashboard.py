"""The web dashboard end to end in a real headless browser (Debian's chromium via selenium).

An approval-gated campaign runs through the session's stack; the test loads the dashboard,
checks the campaign's numbers against ClickHouse, approves and rejects proposals with the
page's own forms, sees the approved request reach the robot, and saves a screenshot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab
from labloop.consumers.approval import decision_record, pending_proposals
from labloop.consumers.kafka import make_producer
from labloop.consumers.publisher import publish_records
from labloop.schemas import Codec
from labloop.streams.campaign import now_ms
from labloop.streams.definition import CampaignSpec
from labloop.streams.procs import free_port, wait_for_port
from labloop.streams.runtime import Stack

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
CID = "dash-it"
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"  # kept after the run (gitignored)
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (make system-packages)")


@pytest.fixture(scope="module")
def dashboard(stack: Stack) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "LABLOOP_KAFKA_BOOTSTRAP": stack.bootstrap,
           "LABLOOP_CLICKHOUSE_HTTP_PORT": str(stack.settings.clickhouse_http_port),
           "LABLOOP_DATA_DIR": str(stack.settings.data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "labloop.streams.cli", "dashboard", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, 60, proc, "dashboard")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
        print(out)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    # This machine has no network beyond loopback: without the background-networking flags
    # chromium keeps trying Google's hosts.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,2200",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _until(check: Any, what: str, timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_dashboard_shows_a_campaign_and_approves_in_a_real_browser(
        stack: Stack, codec: Codec, ch: Any, define_campaign: Any, dashboard: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    spec = CampaignSpec(CID, "tpsa", "A^2", batch_size=6, init_size=6, budget=18, min_pool_size=300, seed=2,
                        request_ttl_s=600.0, approval=True)
    robot = RobotClient(stack.kafka_config, codec, robot_id="dash-robot", group_id="dash-robots", campaigns={CID})
    lab = VirtualLab(robot, Oracle.from_csv(DATA, "smiles", "tpsa"), LabConfig(unit="A^2", plate_size=0)).start()
    try:
        define_campaign(stack.kafka_config, spec, DATA)
        first = _until(lambda: len(pending_proposals(ch, CID)) == 6 and pending_proposals(ch, CID), "6 proposals")
        # The first round approved outside the browser, so the campaign has results and a model to show.
        publish_records(make_producer(stack.kafka_config), codec, "decisions", "Decision",
                        iter([decision_record(ch, r["request_id"], "APPROVE", "setup", now_ms()) for r in first]))
        second = _until(lambda: [r for r in pending_proposals(ch, CID) if r["model_version"] > 0], "the second round")
        _until(lambda: ch.query(f"SELECT count() FROM readings WHERE campaign_id = '{CID}'").result_rows[0][0] == 6,
               "the first round's readings")
        browser.get(dashboard + "/")
        row = browser.find_element(By.XPATH, f"//table[contains(@class,'campaigns')]//tr[td/a[text()='{CID}']]")
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        prog = ch.query(f"SELECT budget, requested FROM campaign_progress WHERE campaign_id = '{CID}'").result_rows[0]
        assert cells[2:4] == [str(prog[0]), str(prog[1])] == ["18", "6"]  # budget, requested
        assert cells[-1] == str(len(second))  # proposals waiting

        row.find_element(By.TAG_NAME, "a").click()
        assert browser.title.startswith(f"Campaign {CID}")
        summary = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "table.summary td")]
        assert summary[:4] == ["18", "6", "0", "6"]  # budget, requested, in flight, measured
        best = max(float(v) for (v,) in ch.query(f"SELECT value FROM readings WHERE campaign_id = '{CID}'").result_rows)
        assert float(summary[4]) == pytest.approx(best, rel=1e-3)
        assert browser.find_elements(By.CSS_SELECTOR, "svg[aria-label='Best so far'] polyline")
        assert len(browser.find_elements(By.CSS_SELECTOR, "table.best svg.mol")) == 6  # RDKit depictions
        queue = browser.find_elements(By.CSS_SELECTOR, "table.queue tbody tr")
        assert len(queue) == len(second)

        # Approve the first proposal and reject the second with the page's forms.
        target = second[0]["request_id"]
        form = browser.find_element(By.XPATH, f"//form[@class='approve'][input[@name='request_id' and @value='{target}']]")
        form.find_element(By.NAME, "by").send_keys("dana")
        form.find_element(By.TAG_NAME, "button").click()
        # The click returns before the browser has followed the form's redirect: wait for it.
        WebDriverWait(browser, 15).until(lambda b: f"decided={target}" in b.current_url)
        assert f"decided={target}" in browser.current_url
        victim = second[1]["request_id"]
        form = browser.find_element(By.XPATH, f"//form[@class='reject'][input[@name='request_id' and @value='{victim}']]")
        form.find_element(By.NAME, "by").send_keys("dana")
        form.find_element(By.NAME, "reason").send_keys("poor solubility expected")
        form.find_element(By.TAG_NAME, "button").click()
        _until(lambda: target in robot.seen, "the approved request at the robot")
        assert victim not in robot.seen
        sql = (f"SELECT action, decided_by, reason FROM decisions WHERE request_id IN ('{target}', '{victim}') "
               f"ORDER BY action")
        rows = _until(lambda: len(got := ch.query(sql).result_rows) == 2 and got, "both decisions in ClickHouse")
        assert rows == [("APPROVE", "dana", None), ("REJECT", "dana", "poor solubility expected")]

        def queue_shrank() -> bool:
            browser.refresh()
            ids = {e.get_attribute("value") for e in browser.find_elements(
                By.CSS_SELECTOR, "table.queue form.approve input[name='request_id']")}
            return bool(ids) and target not in ids and victim not in ids

        _until(queue_shrank, "the queue without the decided proposals")
        OUTPUT.mkdir(exist_ok=True)
        shot = OUTPUT / "dashboard-campaign.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        browser.get(f"{dashboard}/request/{victim}")
        assert "poor solubility expected" in browser.find_element(By.CSS_SELECTOR, "table.decisions").text
        # A form from elsewhere (no token) is refused, and changes nothing.
        browser.get(f"{dashboard}/approvals")
        browser.execute_script("document.querySelector(\"form.approve input[name='token']\").value = 'forged';")
        form = browser.find_element(By.CSS_SELECTOR, "form.approve")
        form.find_element(By.NAME, "by").send_keys("mallory")
        form.find_element(By.TAG_NAME, "button").click()
        _until(lambda: "did not come from this dashboard" in browser.page_source, "the refusal page", 20)
        assert ch.query("SELECT count() FROM decisions WHERE decided_by = 'mallory'").result_rows[0][0] == 0
    finally:
        lab.stop()
