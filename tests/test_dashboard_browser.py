"""A real browser on real data: `qcnode serve` (with `[http] enabled`) receives real CT series
through DCMTK's storescu, scores them, sends the SRs to a test PACS and POSTs the FAIL alerts to a
webhook; `qcnode audit` runs; Debian's headless Chromium (selenium, /usr/bin/chromedriver, nothing
downloaded) loads every page from serve's own HTTP port (loopback, open), checks that every Plotly
chart drew its traces as SVG, filters the series list, opens a series, acknowledges an alert and
saves screenshots to tests/artifacts/. Then serve restarts with `[[http.tokens]]`: the browser is
sent to /login, signs in with a read token (pages shown, acknowledging refused with a page saying
why) and then with an admin token (acknowledging works)."""
from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from conftest import free_port
from dashboard_helpers import ADMIN_TOKEN, READ_TOKEN, http_tokens
from daemon_helpers import (PROJECT_ROOT, Destination, checkpoint_for_tests, copy_series, qcnode_cli,
                            serve_process, stop_process, storescu, wait_for, wait_port, write_config)
from qcnode.config import load_config
from qcnode.db.alert_models import AlertAck
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.models import SeriesResult

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"
PATIENT_NAME, PATIENT_ID = "Doe^Jane^Dashboard", "PID-7731-XYZ"

CHART_STATE_JS = """
return Array.from(document.querySelectorAll('.chart')).map(function (el) {
  return {id: el.id, rendered: el.getAttribute('data-rendered'), traces: (el.data || []).length,
          svg_traces: el.querySelectorAll('svg.main-svg g.trace').length,
          names: (el.data || []).map(function (t) { return t.type + ':' + (t.name || ''); })};
});"""


def _driver(javascript: bool = True):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    os.environ["SE_OFFLINE"] = "true"  # selenium manager must never fetch a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1800", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    if not javascript:
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _charts(driver, timeout: float = 60.0) -> list[dict]:
    """Wait until every chart on the page was drawn; returns their trace counts."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(
        lambda d: all(c["rendered"] is not None for c in d.execute_script(CHART_STATE_JS)))
    return driver.execute_script(CHART_STATE_JS)


def _shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    driver.save_screenshot(str(path))
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_browser_on_a_node_that_received_real_series(tmp_path, port, shared_ct):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian's chromium and chromium-driver are needed (scripts/setup.sh --test installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    dest = Destination(free_port()).start()
    hook_bodies: list[dict] = []

    class Hook(BaseHTTPRequestHandler):  # the alert webhook's receiver
        def do_POST(self):  # noqa: N802
            hook_bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    web_port = free_port()
    cfg_path = write_config(
        tmp_path, port, destinations=[dest.config()], checkpoint=checkpoint_for_tests(tmp_path),
        extra={"verdict": {"warn_mean_below": 3.95, "fail_mean_below": 3.9},  # every real series FAILs: alerts
               "audit": {"default_reference_ctdivol_mgy": 1.0},  # and the audit flags the CTDIvol
               "alerts": {"webhook_verdict_fail": f"http://127.0.0.1:{hook.server_port}/qc"},
               "http": {"enabled": True, "host": "127.0.0.1", "port": web_port}})  # loopback, no token: open
    files = (copy_series(shared_ct / "philips_head_phantom", tmp_path / "in" / "p1", n=12, pattern="I*.dcm")
             + copy_series(shared_ct / "philips_head_phantom", tmp_path / "in" / "p2", n=12, pattern="I*.dcm")
             + copy_series(shared_ct / "ge_head", tmp_path / "in" / "g1", n=12))
    for f in files:  # distinctive identifiers, to prove none reaches a page
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.save_as(f)
    serve = serve_process(cfg_path)
    driver = engine = None
    try:
        wait_port(port, 120, serve)
        res = storescu(port, files)
        assert res.returncode == 0, res.stderr
        cfg = load_config(cfg_path)
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)

        def scored() -> int:
            with sf() as s:
                return int(s.scalar(select(func.count(SeriesResult.id))) or 0)
        wait_for(lambda: scored() >= 3, 400, what="three scored series")
        wait_for(lambda: len(dest.srs()) >= 3, 120, what="three SRs at the test PACS")
        wait_for(lambda: len(hook_bodies) >= 3, 60, what="three FAIL alerts POSTed by serve's webhook loop")
        assert sorted(b["kind"] for b in hook_bodies) == ["verdict_fail"] * 3
        assert all(b["verdict"] == "FAIL" for b in hook_bodies)
        assert PATIENT_ID not in json.dumps(hook_bodies) and "Doe" not in json.dumps(hook_bodies)
        audit = qcnode_cli("audit", "--config", str(cfg_path))
        assert audit.returncode == 0, audit.stderr

        wait_port(web_port, 60, serve)
        base = f"http://127.0.0.1:{web_port}"
        driver = _driver()

        # Overview: everything `qcnode status` shows
        driver.get(base + "/")
        assert "Overview" in driver.title
        assert driver.find_element(By.ID, "queues").text.count("scored 3") == 1
        _shot(driver, "overview")

        # Series: three rows; filter by protocol; open a series
        driver.get(base + "/series")
        rows = driver.find_elements(By.CSS_SELECTOR, "#series-table tbody tr[data-series-id]")
        assert len(rows) == 3
        _shot(driver, "series")
        Select(driver.find_element(By.NAME, "protocol")).select_by_visible_text("(unnamed)")  # the GE series
        driver.find_element(By.ID, "apply-filter").click()
        wait_for(lambda: "protocol=%28unnamed%29" in driver.current_url, 20, what="the filtered list")
        rows = driver.find_elements(By.CSS_SELECTOR, "#series-table tbody tr[data-series-id]")
        assert len(rows) == 1 and driver.find_element(By.ID, "total").text == "1"
        Select(driver.find_element(By.NAME, "protocol")).select_by_index(0)
        Select(driver.find_element(By.NAME, "verdict")).select_by_visible_text("PASS")
        driver.find_element(By.ID, "apply-filter").click()
        wait_for(lambda: "verdict=PASS" in driver.current_url, 20, what="the verdict filter")
        assert driver.find_element(By.ID, "total").text == "0"

        driver.get(base + "/series?sort=received&order=asc")
        driver.find_element(By.CSS_SELECTOR, "#series-table a.open-series").click()
        wait_for(lambda: "/series/" in driver.current_url, 20, what="the series page")
        charts = _charts(driver)
        strip = next(c for c in charts if c["id"] == "chart-strip")
        assert strip["traces"] == 3 and strip["svg_traces"] == 3  # band (2 traces) + score
        assert "FAIL" in driver.find_element(By.ID, "summary").text
        assert "delivered" in driver.find_element(By.ID, "rounds").text
        imgs = driver.find_elements(By.CSS_SELECTOR, ".thumb img")
        assert len(imgs) == 2
        wait_for(lambda: all(driver.execute_script("return arguments[0].naturalWidth", i) == 256 for i in imgs),
                 20, what="both thumbnails")
        _shot(driver, "series-detail")

        # Protocols: every chart drew its traces (one per protocol in the box plots and the scatter)
        driver.get(base + "/protocols")
        charts = {c["id"]: c for c in _charts(driver)}
        assert set(charts) == {"chart-box-score", "chart-box-noise", "chart-box-ctdivol", "chart-box-ssde",
                               "chart-trend-score", "chart-trend-noise", "chart-scatter"}
        for c in charts.values():
            assert c["svg_traces"] == c["traces"] == int(c["rendered"]), c
        assert charts["chart-box-score"]["traces"] == 2 and all(
            n.startswith("box:") for n in charts["chart-box-score"]["names"])
        assert charts["chart-trend-score"]["traces"] == 2
        assert charts["chart-scatter"]["traces"] == 1  # the GE series has no CTDIvol, hence no SSDE
        _shot(driver, "protocols")
        from selenium.webdriver.common.action_chains import ActionChains
        point = driver.find_element(By.CSS_SELECTOR, "#chart-scatter g.points path.point")
        ActionChains(driver).move_to_element(point).click().perform()  # a point opens its series
        wait_for(lambda: "/series/" in driver.current_url, 20, what="the series of a scatter point")

        # Audit: the run and its flag
        driver.get(base + "/audit")
        assert "ctdivol_above_reference" in driver.find_element(By.ID, "audit-runs").text
        _shot(driver, "audit")
        driver.find_element(By.LINK_TEXT, "report").click()
        wait_for(lambda: "/report" in driver.current_url, 20, what="the audit report")
        assert "ctdivol_above_reference" in driver.page_source  # the run's own HTML report

        # Alerts: acknowledge the audit flag with a comment
        driver.get(base + "/alerts")
        assert driver.find_element(By.ID, "open-count").text == "4"  # 3 FAIL verdicts + 1 audit flag
        _shot(driver, "alerts")
        row = driver.find_element(By.CSS_SELECTOR, "tr[id^='alert-audit_flag-']")
        row.find_element(By.NAME, "comment").send_keys("phantom protocol, expected")
        row.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(lambda: driver.find_elements(By.ID, "flash"), 20, what="the acknowledgement")
        assert driver.find_element(By.ID, "flash").text == "acknowledged"
        assert driver.find_element(By.ID, "open-count").text == "3"
        with sf() as s:
            ack = s.scalars(select(AlertAck)).one()
            assert (ack.kind, ack.acknowledged_by, ack.comment) == ("audit_flag", "local", "phantom protocol, expected")

        # without JavaScript the tables, filters and forms still work (only the charts need it)
        plain = _driver(javascript=False)
        try:
            plain.get(base + "/series")
            assert len(plain.find_elements(By.CSS_SELECTOR, "#series-table tbody tr[data-series-id]")) == 3
            Select(plain.find_element(By.NAME, "protocol")).select_by_visible_text("(unnamed)")
            plain.find_element(By.ID, "apply-filter").click()
            wait_for(lambda: "protocol=%28unnamed%29" in plain.current_url, 20, what="the filter without JS")
            assert plain.find_element(By.ID, "total").text == "1"
            plain.get(base + "/protocols")
            assert len(plain.find_elements(By.CSS_SELECTOR, "#protocol-table tr")) == 3  # header + 2 groups
            assert not plain.find_elements(By.CSS_SELECTOR, ".chart svg")  # scripts are off: no chart drawn
            plain.get(base + "/alerts")
            row = plain.find_element(By.CSS_SELECTOR, "tr[id^='alert-verdict_fail-']")
            row.find_element(By.CSS_SELECTOR, "button[type=submit]").click()  # a plain form POST
            wait_for(lambda: plain.find_elements(By.ID, "flash"), 20, what="the acknowledgement without JS")
            assert plain.find_element(By.ID, "open-count").text == "2"
        finally:
            plain.quit()

        # no patient name or ID on any page
        sources = []
        for path in ("/", "/series", "/protocols", "/audit", "/alerts?open=0", "/api/v1/series", "/series.csv"):
            driver.get(base + path)
            sources.append(driver.page_source)
        page_text = "\n".join(sources)
        assert "Doe" not in page_text and PATIENT_ID not in page_text

        # serve again with tokens: the browser signs in (a read token, then an admin token)
        assert stop_process(serve) == 0
        with cfg_path.open("a") as fh:
            for t in http_tokens():
                fh.write(f'[[http.tokens]]\nname = "{t.name}"\nsha256 = "{t.sha256}"\nrole = "{t.role}"\n')
        serve = serve_process(cfg_path)
        wait_port(web_port, 120, serve)
        driver.get(base + "/alerts")
        wait_for(lambda: driver.current_url == base + "/login", 20, what="the redirect to the sign-in page")
        _shot(driver, "login")

        def sign_in(token: str) -> None:
            driver.get(base + "/login")
            driver.find_element(By.ID, "token").send_keys(token)
            driver.find_element(By.ID, "sign-in").click()
            wait_for(lambda: driver.current_url == base + "/", 20, what="the overview after signing in")
            assert "Overview" in driver.title and driver.find_element(By.ID, "sign-out")

        sign_in(READ_TOKEN)
        driver.get(base + "/alerts")
        assert driver.find_element(By.ID, "open-count").text == "2"
        driver.find_element(By.CSS_SELECTOR, "tr[id^='alert-verdict_fail-'] button[type=submit]").click()
        wait_for(lambda: driver.find_elements(By.ID, "error"), 20, what="the refusal page")
        assert "an admin token is needed" in driver.find_element(By.ID, "error").text
        assert driver.find_element(By.TAG_NAME, "h1").text == "403"
        driver.get(base + "/")
        driver.find_element(By.ID, "sign-out").click()
        wait_for(lambda: driver.current_url == base + "/login", 20, what="the sign-in page after signing out")
        sign_in(ADMIN_TOKEN)
        driver.get(base + "/alerts")
        assert driver.find_element(By.ID, "open-count").text == "2"  # the read token changed nothing
        driver.find_element(By.CSS_SELECTOR, "tr[id^='alert-verdict_fail-'] button[type=submit]").click()
        wait_for(lambda: driver.find_elements(By.ID, "flash"), 20, what="the admin's acknowledgement")
        assert driver.find_element(By.ID, "flash").text == "acknowledged"
        assert driver.find_element(By.ID, "open-count").text == "1"
        with sf() as s:
            assert s.scalars(select(AlertAck.acknowledged_by).order_by(AlertAck.id)).all()[-1] == "admin-token"
    finally:
        if driver is not None:
            driver.quit()
        assert stop_process(serve) == 0
        dest.stop()
        hook.shutdown()
        if engine is not None:
            engine.dispose()
    log = (tmp_path / "var" / "qcnode.log").read_text()
    assert '"alert_acknowledged"' in log and '"user": "local"' in log and '"user": "admin-token"' in log
    assert '"signed_in"' in log and '"token": "read-token"' in log and READ_TOKEN not in log
