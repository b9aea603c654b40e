"""DICOMweb out: a ``type = "dicomweb"`` destination stores the SR over STOW-RS (dicomweb-client)
through the outbox, with its retries, back-off and dead letters.

- The sender alone, against a tiny local HTTP server answering what each case needs: which answers
  are retried and which are dead letters at once, the failure reasons of a STOW-RS response, auth.
- The sender against Debian's Orthanc with its DICOMweb plugin (``orthanc-dicomweb``) and HTTP basic
  auth: stored, wrong password, wrong URL path.
- `qcnode serve` end to end, one run shared by the last tests: Orthanc is down when the CT series
  arrives; the SR is retried and arrives once Orthanc starts, QIDO-RS finds it, WADO-RS gives it
  back with the series verdict; a 415 and a 404 destination are dead letters at once and a wrong
  password one after ``outbox.max_attempts``, all listed by `qcnode status --json`.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass

from conftest import free_port
from daemon_helpers import (checkpoint_for_tests, qcnode_cli, serve_process, stop_process, storescu, wait_for,
                            wait_port, write_config)
from orthanc_helpers import DICOMWEB_PLUGIN, ORTHANC, Orthanc
from qcnode.config import Destination
from qcnode.delivery.dicomweb import stow_files, stow_root
from qcnode.delivery.scu import DeliveryError
from qcnode.report.read import read_series_sr
from reliability_helpers import make_slices

USER, PASSWORD = "qcnode", "s3cret-Pa55"
orthanc_needed = [pytest.mark.orthanc, pytest.mark.slow]


# ------------------------------------------------------------------------------ a tiny HTTP server
class StubServer:
    """Answers every POST with ``status`` and ``body`` (JSON when a dict); records path and headers."""

    def __init__(self, status: int = 200, body: dict | str | None = None,
                 content_type: str = "application/dicom+json", ssl_context=None):
        self.status, self.body, self.content_type = status, body, content_type
        self.requests: list[tuple[str, dict[str, str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        self.rfile.read(size + 2)
                        if size == 0:
                            break
                else:
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.requests.append((self.path, dict(self.headers)))
                data = (json.dumps(stub.body) if isinstance(stub.body, dict) else (stub.body or "")).encode()
                self.send_response(stub.status)
                if data:
                    self.send_header("Content-Type", stub.content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/dicomweb"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers: list[StubServer] = []

    def start(*args, **kwargs) -> StubServer:
        servers.append(StubServer(*args, **kwargs))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def sr_file(tmp_path_factory, shared_ct) -> Path:
    """A small DICOM file to send (any instance will do for the sender)."""
    return make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:1], tmp_path_factory.mktemp("one"), 1)[0]


def web(name: str, url: str, **kw) -> Destination:
    return Destination(name=name, type="dicomweb", url=url, **kw)


def failed_sop_response(uid: str, reason: int) -> dict:
    return {"00081198": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                                                "00081155": {"vr": "UI", "Value": [uid]},
                                                "00081197": {"vr": "US", "Value": [reason]}}]}}


def test_stow_root_takes_the_root_or_the_studies_url():
    assert stow_root("https://pacs/dicom-web/") == "https://pacs/dicom-web"
    assert stow_root("https://pacs/dicom-web/studies") == "https://pacs/dicom-web"
    assert stow_root("https://pacs/dicom-web/studies/") == "https://pacs/dicom-web"


@pytest.mark.parametrize("status,permanent,text", [
    (415, True, "HTTP 415 Unsupported Media Type"),
    (404, True, "HTTP 404 Not Found: check url"),
    (413, True, "HTTP 413"),
    (400, True, "HTTP 400 Bad Request"),
    (409, True, "HTTP 409 Conflict"),
    (503, False, "HTTP 503 Service Unavailable"),
    (500, False, "HTTP 500"),
    (429, False, "HTTP 429 Too Many Requests"),
    (408, False, "HTTP 408"),
    (401, False, "HTTP 401 Unauthorized: the server wants credentials: username + password_file or "),
    (403, False, "HTTP 403 Forbidden"),
])
def test_http_status_retry_or_dead_letter(stub, sr_file, status, permanent, text):
    s = stub(status, {"Message": "the reason given by the server"}, "application/json")
    with pytest.raises(DeliveryError) as err:
        stow_files(web("w", s.url), [sr_file], timeout=10)
    assert text in str(err.value) and err.value.permanent is permanent
    assert str(err.value).startswith(f"w ({s.url}): HTTP {status}")
    assert "the reason given by the server" in str(err.value)
    assert s.requests[0][0] == "/dicomweb/studies"


def test_failed_sop_sequence_is_a_failure(stub, sr_file):
    uid = str(pydicom.dcmread(sr_file, stop_before_pixels=True).SOPInstanceUID)
    s = stub(200, failed_sop_response(uid, 0xC000))
    with pytest.raises(DeliveryError, match=rf"HTTP 200: 1 instance\(s\) failed: {uid}: 0xC000 cannot understand") as e:
        stow_files(web("w", s.url), [sr_file], timeout=10)
    assert e.value.permanent
    s.body = failed_sop_response(uid, 0xA700)  # out of resources: another try may succeed
    with pytest.raises(DeliveryError, match="0xA700 out of resources") as e:
        stow_files(web("w", s.url), [sr_file], timeout=10)
    assert not e.value.permanent
    s.status, s.body = 409, failed_sop_response(uid, 0x0110)  # Orthanc's answer to a study UID mismatch
    with pytest.raises(DeliveryError, match="HTTP 409 Conflict: 1 instance.* 0x0110 processing failure") as e:
        stow_files(web("w", s.url), [sr_file], timeout=10)
    assert e.value.permanent


def test_success_must_list_what_was_sent(stub, sr_file):
    uid = str(pydicom.dcmread(sr_file, stop_before_pixels=True).SOPInstanceUID)
    listed = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}}]}}
    s = stub(200, listed)
    assert stow_files(web("w", s.url), [sr_file], timeout=10) == [uid]
    s.body = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]}}
    with pytest.raises(DeliveryError, match="1 instance.* sent but not listed as stored") as e:
        stow_files(web("w", s.url), [sr_file], timeout=10)
    assert not e.value.permanent
    s.body = None  # 200 without a body: the HTTP status is all there is
    assert stow_files(web("w", s.url), [sr_file], timeout=10) == [uid]


def test_auth_headers_and_secret_files(stub, sr_file, tmp_path):
    s = stub(200)
    (tmp_path / "token").write_text("tok-123\n")
    (tmp_path / "pw").write_text("pw-456\n")
    stow_files(web("w", s.url, bearer_token_file="token"), [sr_file], timeout=10, base_dir=tmp_path)
    assert s.requests[-1][1]["Authorization"] == "Bearer tok-123"
    assert s.requests[-1][1]["Accept"] == "application/dicom+json"
    stow_files(web("w", s.url, username="qc", password_file=str(tmp_path / "pw")), [sr_file], timeout=10)
    assert s.requests[-1][1]["Authorization"] == "Basic cWM6cHctNDU2"  # qc:pw-456
    with pytest.raises(DeliveryError, match="cannot read password_file .*missing") as e:
        stow_files(web("w", s.url, username="qc", password_file="missing"), [sr_file], 10, base_dir=tmp_path)
    assert not e.value.permanent and len(s.requests) == 2  # nothing sent without its password
    s.status = 401
    with pytest.raises(DeliveryError, match="HTTP 401 Unauthorized: check bearer_token_file$"):
        stow_files(web("w", s.url, bearer_token_file="token"), [sr_file], timeout=10, base_dir=tmp_path)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(DeliveryError, match="bearer_token_file .* is empty"):
        stow_files(web("w", s.url, bearer_token_file="empty"), [sr_file], 10, base_dir=tmp_path)


def test_unreachable_is_retried(sr_file, tmp_path):
    with pytest.raises(DeliveryError, match=r"cannot connect: \[Errno 111\] Connection refused") as e:
        stow_files(web("w", f"http://127.0.0.1:{free_port()}/dicom-web"), [sr_file], timeout=5)
    assert not e.value.permanent
    with pytest.raises(DeliveryError, match="tls_ca file not found") as e:
        stow_files(web("w", "https://127.0.0.1:1/dicom-web", tls_ca="none.pem"), [sr_file], 5, base_dir=tmp_path)
    with pytest.raises(DeliveryError, match="file to send is missing"):
        stow_files(web("w", "http://127.0.0.1:1/dicom-web"), [tmp_path / "gone.dcm"], 5)


def test_tls_certificate_is_verified(stub, sr_file, tmp_path):
    """https to a server whose certificate no CA vouches for: a retried TLS error, not a send."""
    import ssl
    from test_scu_outbox import _make_tls_files
    tls = _make_tls_files(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls["server"], tls["key"])
    s = stub(200, ssl_context=ctx)
    url = s.url
    with pytest.raises(DeliveryError, match="TLS failed: .*CERTIFICATE_VERIFY_FAILED") as e:
        stow_files(web("w", url), [sr_file], timeout=10)
    assert not e.value.permanent and not s.requests
    stow_files(web("w", url, tls_ca=str(tls["ca"])), [sr_file], timeout=10)
    assert len(s.requests) == 1


def test_outbox_dispatches_by_type_retries_and_dead_letters(stub, tmp_path, shared_ct):
    """The outbox's one dispatch point: a dicomweb destination goes through STOW-RS; a 503 is
    retried with back-off until the server answers 200, a 415 is a dead letter after one try."""
    from test_scu_outbox import _config, _deliveries, _run_until, _seed
    from qcnode.delivery.outbox import OutboxSender
    flaky, refusing = stub(503, {"Message": "busy"}, "application/json"), stub(415)
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}",
                  [web("flaky", flaky.url, send=["sr", "kos:FAIL"]), web("refusing", refusing.url)],
                  initial=0.2, maximum=0.2)
    sf, _, sr = _seed(cfg, sorted((shared_ct / "ge_head").glob("*.dcm"))[:3], verdict="FAIL")
    sender = OutboxSender(cfg, sf, "test-sender")
    _run_until(sender, sf, lambda ds: all(d.attempts >= 2 for d in ds if d.destination == "flaky"))
    flaky.status, flaky.body = 200, None
    _run_until(sender, sf, lambda ds: all(d.status in ("delivered", "dead") for d in ds))
    rows = {(d.destination, d.kind): d for d in _deliveries(sf)}
    assert {k: (d.status, d.attempts >= 3) for k, d in rows.items() if k[0] == "flaky"} == {
        ("flaky", "sr"): ("delivered", True), ("flaky", "kos"): ("delivered", True)}
    dead = rows[("refusing", "sr")]
    assert (dead.status, dead.attempts) == ("dead", 1) and "HTTP 415 Unsupported Media Type" in dead.last_error
    assert len(refusing.requests) == 1 and all(p == "/dicomweb/studies" for p, _ in flaky.requests)


# ------------------------------------------------------------------------------ Orthanc + DICOMweb
def _need_orthanc() -> None:
    if not Path(ORTHANC).exists() or not Path(DICOMWEB_PLUGIN).exists():
        pytest.fail("Orthanc or its DICOMweb plugin not installed (scripts/setup.sh --test installs Debian's "
                    "orthanc and orthanc-dicomweb)")


def _client(pacs: Orthanc) -> DICOMwebClient:
    return DICOMwebClient(pacs.dicomweb_url, session=create_session_from_user_pass(USER, PASSWORD))


@pytest.mark.orthanc
@pytest.mark.slow
def test_stow_to_orthanc_with_basic_auth(tmp_path, shared_ct):
    _need_orthanc()
    pacs = Orthanc(tmp_path / "orthanc", forward=False, dicomweb=True, users={USER: PASSWORD})
    try:
        files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:3], tmp_path / "in", 3)
        (tmp_path / "pw").write_text(PASSWORD + "\n")
        (tmp_path / "bad").write_text("not-the-password\n")
        ok = web("pacs", pacs.dicomweb_url + "/studies/", username=USER, password_file="pw")
        uids = stow_files(ok, files, timeout=20, base_dir=tmp_path)
        assert uids == [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        assert stow_files(ok, files[:1], timeout=20, base_dir=tmp_path) == uids[:1]  # a duplicate is fine
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert len(_client(pacs).search_for_instances(study_instance_uid=study)) == 3
        with pytest.raises(DeliveryError, match="HTTP 401 Unauthorized: check username and password_file") as e:
            stow_files(web("pacs", pacs.dicomweb_url, username=USER, password_file="bad"), files[:1], 20,
                       base_dir=tmp_path)
        assert not e.value.permanent and "not-the-password" not in str(e.value)
        with pytest.raises(DeliveryError, match="HTTP 404 Not Found: check url") as e:
            stow_files(web("pacs", pacs.base_url + "/wrong", username=USER, password_file="pw"), files[:1], 20,
                       base_dir=tmp_path)
        assert e.value.permanent
    finally:
        pacs.stop()


# ------------------------------------------------------------------------------ qcnode serve end to end
@pytest.fixture(scope="module")
def served(tmp_path_factory, shared_ct):
    """One `qcnode serve` run with four DICOMweb destinations; Orthanc is down when the series arrives."""
    _need_orthanc()
    tmp = tmp_path_factory.mktemp("dicomweb_serve")
    port = free_port()
    pacs = Orthanc(tmp / "orthanc", forward=False, dicomweb=True, users={USER: PASSWORD}, start=False)
    refuse = StubServer(415, {"Message": "Unsupported media type"}, "application/json")
    (tmp / "pw").write_text(PASSWORD + "\n")
    (tmp / "pw").chmod(0o600)
    (tmp / "wrong.pw").write_text("Wr0ng-secret\n")
    max_attempts = 10
    cfg = write_config(tmp, port, checkpoint=checkpoint_for_tests(tmp), destinations=[
        {"name": "web", "type": "dicomweb", "url": pacs.dicomweb_url, "username": USER, "password_file": "pw"},
        {"name": "web415", "type": "dicomweb", "url": refuse.url},
        {"name": "web404", "type": "dicomweb", "url": pacs.base_url + "/no-dicomweb-here", "username": USER,
         "password_file": "pw"},
        {"name": "badpw", "type": "dicomweb", "url": pacs.dicomweb_url, "username": USER,
         "password_file": "wrong.pw"},
    ], extra={"outbox": {"max_attempts": max_attempts, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 1.5}})
    db = tmp / "var" / "qcnode.db"

    def deliveries() -> dict[str, tuple[str, int, str | None]]:
        if not db.exists():
            return {}
        with sqlite3.connect(db, timeout=10) as con:
            try:
                rows = con.execute("SELECT destination, status, attempts, last_error FROM deliveries").fetchall()
            except sqlite3.OperationalError:  # not migrated yet
                return {}
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    out: dict = {"tmp": tmp, "cfg": cfg, "pacs": pacs, "refuse": refuse, "max_attempts": max_attempts}
    try:
        node = serve_process(cfg)
        try:
            wait_port(port, 120, node)
            files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:5], tmp / "in", 5)
            res = storescu(port, files)
            assert res.returncode == 0, res.stderr
            first = pydicom.dcmread(files[0], stop_before_pixels=True)
            out.update(series_uid=str(first.SeriesInstanceUID), study_uid=str(first.StudyInstanceUID))
            t0 = time.monotonic()
            # Orthanc is down: the SR's first try fails (connection refused) and is retried
            out["error_while_down"] = wait_for(lambda: deliveries().get("web", (None, 0, None))[2], 180, 0.1,
                                               "a failed first delivery to the Orthanc that is down")
            out["attempts_while_down"] = deliveries()["web"][1]
            pacs.start()

            def all_settled():
                d = deliveries()
                return d if len(d) == 4 and all(st in ("delivered", "dead") for st, _, _ in d.values()) else None
            out["deliveries"] = wait_for(all_settled, 120, 0.2, "every delivery delivered or dead")
            out["elapsed"] = time.monotonic() - t0
            with sqlite3.connect(db, timeout=10) as con:
                out["verdict"] = con.execute("SELECT verdict FROM series_results").fetchone()[0]
            st = qcnode_cli("status", "--json", "--config", str(cfg))
            assert st.returncode == 0, st.stderr
            out["status"] = json.loads(st.stdout)
        finally:
            stop_process(node)
        out["logs"] = b"".join(p.read_bytes() for p in (tmp / "var" / "qcnode.log", tmp / "serve.stderr")
                               if p.exists()).decode(errors="replace")
        yield out
    finally:
        pacs.stop()
        refuse.stop()


@pytest.mark.orthanc
@pytest.mark.slow
def test_sr_arrives_over_stow_and_qido_finds_it(served):
    status, attempts, error = served["deliveries"]["web"]
    assert status == "delivered" and error is None
    client = _client(served["pacs"])
    found = client.search_for_series(served["study_uid"], search_filters={"Modality": "SR"})
    assert len(found) == 1
    series = pydicom.Dataset.from_json(found[0])
    instances = client.search_for_instances(served["study_uid"], str(series.SeriesInstanceUID))
    assert len(instances) == 1  # one SR for the one CT series
    sop_uid = str(pydicom.Dataset.from_json(instances[0]).SOPInstanceUID)
    sr = client.retrieve_instance(served["study_uid"], str(series.SeriesInstanceUID), sop_uid)
    parsed = read_series_sr(sr)
    assert parsed["source_series_instance_uid"] == served["series_uid"]
    assert parsed["summary"]["verdict"] == served["verdict"] and parsed["summary"]["n_slices"] == 5
    print(f"\nDICOMweb out: SR of {parsed['summary']['n_slices']} slices ({served['verdict']}) stored over STOW-RS "
          f"after {attempts} tries, {served['elapsed']:.1f}s after the series arrived")


@pytest.mark.orthanc
@pytest.mark.slow
def test_down_at_first_is_retried_until_it_arrives(served):
    assert "cannot connect" in served["error_while_down"] and "Connection refused" in served["error_while_down"]
    status, attempts, _ = served["deliveries"]["web"]
    assert status == "delivered" and attempts > served["attempts_while_down"] >= 1


@pytest.mark.orthanc
@pytest.mark.slow
def test_4xx_is_a_dead_letter_at_once_in_status(served):
    dead = {d["destination"]: d for d in served["status"]["dead_letters"]}
    assert dead["web415"]["attempts"] == 1 and "HTTP 415 Unsupported Media Type" in dead["web415"]["error"]
    assert served["refuse"].requests[0][0] == "/dicomweb/studies"
    # (its first tries met the Orthanc that was down: retried; the first answer, a 404, ended it)
    assert dead["web404"]["error"].startswith(f"web404 ({served['pacs'].base_url}/no-dicomweb-here): HTTP 404")
    assert dead["web404"]["attempts"] < served["max_attempts"]
    assert served["status"]["deliveries"] == {"delivered": 1, "dead": 3}


@pytest.mark.orthanc
@pytest.mark.slow
def test_wrong_password_is_retried_then_dead_and_never_logged(served):
    status, attempts, error = served["deliveries"]["badpw"]
    assert status == "dead" and attempts == served["max_attempts"]
    assert "HTTP 401 Unauthorized: check username and password_file" in error
    logs = served["logs"]
    assert "HTTP 401" in logs and "delivery_attempt" in logs
    for secret in (PASSWORD, "Wr0ng-secret"):
        assert secret not in logs and secret not in json.dumps(served["status"])
