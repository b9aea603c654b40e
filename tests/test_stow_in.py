"""DICOMweb in (STOW-RS, ``qcnode.http``): the same durable path, checks and statuses as C-STORE.

In-process servers (the HTTP server in a thread next to an in-process Storage SCP on the same
database) for the per-request rules: bad requests, per-instance failures compared with the SCP's
status for the same dataset, quarantine, limits, tokens and roles, readiness. ``qcnode serve`` as
a subprocess for the end to end path (a series posted with dicomweb-client is scored like the same
series sent with storescu) and for kill -9 during STOW-RS (nothing answered 200 is lost).
"""
from __future__ import annotations

import copy
import io
import random
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from conftest import free_port
from daemon_helpers import (checkpoint_for_tests, kill9, serve_process, stop_process, storescu, wait_for, wait_port,
                            write_config)
from qcnode.config import ConfigError, load_config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.migrate import migrate
from qcnode.db.models import Instance, QuarantineRecord, Series, SliceScore
from qcnode.http.auth import token_sha256
from qcnode.http.multipart import MultipartError, parse_media_type, split_parts
from qcnode.http.server import run_http
from qcnode.ingest import validate as store_mod
from qcnode.ingest.spool import Spool
from reliability_helpers import make_slices, start_scp
from test_config_cli import assert_one_line, qcnode
from test_scp import _send

BOUNDARY = "qcnode-test-7d1c"
CT_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
MAX_BODY_MB = 4
TOKENS = {"pacs": ("store", "s3cret-store-token"), "viewer": ("read", "s3cret-read-token"),
          "ops": ("admin", "s3cret-admin-token")}


# --------------------------------------------------------------------------------------------- helpers
def part10(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(*parts: bytes, boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A multipart/related body: one application/dicom part each (as dicomweb-client writes them)."""
    out = b"".join(b"\r\n--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p for p in parts)
    return out + (b"\r\n--" + boundary.encode() + b"--\r\n" if close else b"")


def fresh(ds: pydicom.Dataset, study_uid: str | None = None, series_uid: str | None = None) -> pydicom.Dataset:
    """A copy of ``ds`` with a new SOP Instance UID (and the given study / series)."""
    ds = copy.deepcopy(ds)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or ds.StudyInstanceUID
    ds.SeriesInstanceUID = series_uid or ds.SeriesInstanceUID
    return ds


def failures(response: requests.Response) -> dict[str, int]:
    """FailedSOPSequence of a STOW-RS response: SOP Instance UID (or "") -> FailureReason."""
    body = response.json()
    return {(item["00081155"].get("Value") or [""])[0]: item["00081197"]["Value"][0]
            for item in body.get("00081198", {}).get("Value", [])}


def referenced(response: requests.Response) -> list[str]:
    body = response.json()
    return [item["00081155"]["Value"][0] for item in body.get("00081199", {}).get("Value", [])]


class HttpNode:
    """An HTTP server (``run_http``) in a thread of this process."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.url = f"http://127.0.0.1:{cfg.http.port}"
        self.stop = threading.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=run_http, args=(cfg,), daemon=True,
                                       kwargs={"stop": self.stop, "ready": ready, "process_setup": False})
        self.thread.start()
        assert ready.wait(30), "the HTTP server did not start"

    def post(self, body: bytes, path: str = "/dicomweb/studies", content_type: str = CT_TYPE,
             token: str | None = None, **headers: str) -> requests.Response:
        headers = {"Content-Type": content_type, **headers}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(self.url + path, data=body, headers=headers, timeout=60)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


@contextmanager
def http_node(tmp_path: Path, **http: Any) -> Iterator[HttpNode]:
    """An in-process HTTP server on a fresh database (config ``[http]`` overrides in ``http``)."""
    tokens = http.pop("tokens", [])
    storage = http.pop("storage", {})
    path = write_config(tmp_path, free_port(), extra={"http": {"enabled": True, "port": free_port(), **http},
                                                      "storage": storage})
    if tokens:
        path.write_text(path.read_text() + "".join(
            f'[[http.tokens]]\nname = "{name}"\nrole = "{role}"\nsha256 = "{token_sha256(token)}"\n'
            for name, (role, token) in TOKENS.items()))
    cfg = load_config(path, environ={})
    if cfg.database_url.startswith("sqlite"):
        migrate(cfg.database_url)
    node = HttpNode(cfg)
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(scp_node, http_node) on one database: the Storage SCP and the HTTP server in this process."""
    tmp = tmp_path_factory.mktemp("stow")
    scp = start_scp(tmp, free_port(), http={"enabled": True, "port": free_port(), "max_body_mb": MAX_BODY_MB})
    node = HttpNode(scp.cfg)
    yield scp, node
    node.close()
    scp.stop()


@pytest.fixture(scope="module")
def ct(shared_ct) -> pydicom.Dataset:
    return pydicom.dcmread(sorted((shared_ct / "ge_head").glob("*.dcm"))[0])


def _count(sf, model) -> int:
    with sf() as s:
        return s.scalar(select(func.count(model.id)))


def _quarantine_records(sf, sop_uid: str) -> list[QuarantineRecord]:
    with sf() as s:
        return list(s.scalars(select(QuarantineRecord).where(QuarantineRecord.sop_instance_uid == sop_uid)))


# ----------------------------------------------------------------------------------------- unit level
def test_multipart_framing():
    body = b"preamble\r\n--b\r\nContent-Type: application/dicom\r\n\r\nAB\r\n--b  \r\n\r\nC\r\n--b--\r\nepilogue"
    parts = split_parts(body, "b")
    assert [body[p.start:p.end] for p in parts] == [b"AB", b"C"]
    assert [p.media_type for p in parts] == ["application/dicom", ""]
    for bad, why in [(b"no boundary at all", "no boundary"), (b"--b\r\n\r\nAB", "truncated"),
                     (b"--b\r\n\r\nAB\r\n--b", "ends after a boundary"), (b"--b--", "no part"),
                     (b"--bX\r\n\r\nAB\r\n--b--", "malformed boundary"), (b"--b\r\nbroken\r\n\r\nA\r\n--b--", "header")]:
        with pytest.raises(MultipartError, match=why):
            split_parts(bad, "b")
    assert parse_media_type('Multipart/Related; type="application/dicom"; boundary="a;b"') == \
        ("multipart/related", {"type": "application/dicom", "boundary": "a;b"})


@pytest.mark.parametrize("text,key", [
    ("[http]\nport = 0", "http.port"),
    ("[http]\nmax_body_mb = 0", "http.max_body_mb"),
    ('[http]\ntls_cert = "c.pem"', "http.tls_cert and http.tls_key"),
    ('[http]\nhost = ""', "http.host"),
    ('[[http.tokens]]\nname = "a"\nrole = "store"\nsha256 = "s3cret"', "sha256 must be the 64 hex digits"),
    (f'[[http.tokens]]\nname = "a"\nrole = "write"\nsha256 = "{"0" * 64}"', "role must be one of read, store, admin"),
    (f'[[http.tokens]]\nname = "a"\nsha256 = "{"0" * 64}"\n[[http.tokens]]\nname = "a"\nsha256 = "{"1" * 64}"',
     "unique, non-empty name"),
    ('[http]\nenabled = true\nhost = "0.0.0.0"', "http.host 0.0.0.0 is not a loopback address"),
    ("[http]\nsession_hours = 0", "http.session_hours must be more than 0 and at most 720"),
    ("[http]\nsession_hours = 721", "http.session_hours must be more than 0 and at most 720"),
    ("[http]\nsession_hours = nan", "http.session_hours must be more than 0"),
    ('[http]\nsession_hours = "12"', "http.session_hours must be a number"),
    ('[http]\nsession_key_file = " "', "http.session_key_file must not be empty"),
    ('[http]\nbehind_tls_proxy = "yes"', "http.behind_tls_proxy must be true or false"),
])
def test_http_config_validation(tmp_path, text, key):
    (tmp_path / "c.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=key) as err:
        load_config(tmp_path / "c.toml", environ={})
    assert "\n" not in str(err.value)  # one line


def test_http_config_valid_and_not_overridable_tokens(tmp_path):
    (tmp_path / "c.toml").write_text(f'[http]\nenabled = true\nhost = "0.0.0.0"\n'
                                     f'[[http.tokens]]\nname = "pacs"\nrole = "store"\nsha256 = "{"a" * 64}"\n')
    cfg = load_config(tmp_path / "c.toml", environ={"QCNODE__HTTP__PORT": "8443"})
    assert cfg.http.port == 8443 and cfg.http.tokens[0].role == "store" and cfg.http.max_body_mb == 2048
    with pytest.raises(ConfigError, match="http.tokens cannot be overridden"):
        load_config(tmp_path / "c.toml", environ={"QCNODE__HTTP__TOKENS": "x"})
    assert load_config(environ={}).http.enabled is False  # the project's config.toml: off by default
    defaults = load_config(environ={}).http
    assert (defaults.behind_tls_proxy, defaults.session_hours, defaults.session_key_file) == (
        False, 12.0, "var/http_session.key")
    cfg = load_config(tmp_path / "c.toml", environ={"QCNODE__HTTP__BEHIND_TLS_PROXY": "true",
                                                    "QCNODE__HTTP__SESSION_HOURS": "2"})
    assert cfg.http.behind_tls_proxy is True and cfg.http.session_hours == 2.0


def test_serve_refuses_a_public_bind_without_tokens_in_one_line(tmp_path):
    (tmp_path / "c.toml").write_text(f'[storage]\ndatabase_url = "sqlite:///{tmp_path}/q.db"\n'
                                     '[http]\nenabled = true\nhost = "0.0.0.0"\n')
    assert_one_line(qcnode("serve", "--config", str(tmp_path / "c.toml")), "serve",
                    text="configure [[http.tokens]]")


def test_serve_with_the_http_port_in_use_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[storage]\ndatabase_url = "sqlite:///{tmp_path}/q.db"\n[node]\nhost = "127.0.0.1"\n'
                       f'port = {free_port()}\n[http]\nenabled = true\nport = {taken.getsockname()[1]}\n')
        r = qcnode("serve", "--no-worker", "--config", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("qcnode serve: ") and "Address already in use" in last


# --------------------------------------------------------------------------- in-process: the store path
def test_stow_stores_durably_like_c_store(both, ct):
    scp, node = both
    study, series = generate_uid(), generate_uid()
    sent = [fresh(ct, study, series) for _ in range(3)]
    r = node.post(multipart(*map(part10, sent)))
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json", r.text
    assert sorted(referenced(r)) == sorted(str(d.SOPInstanceUID) for d in sent) and not failures(r)
    spool = Spool(scp.cfg.path(scp.cfg.storage.spool_dir), scp.cfg.path(scp.cfg.storage.quarantine_dir))
    with scp.sf() as s:
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance).where(
            Instance.sop_instance_uid.in_([str(d.SOPInstanceUID) for d in sent])))}
        series_row = s.scalars(select(Series).where(Series.series_instance_uid == series)).one()
    assert len(rows) == 3 and series_row.instance_count == 3 and series_row.status == "receiving"
    for d in sent:
        row = rows[str(d.SOPInstanceUID)]
        assert row.scorable and row.calling_ae is None and row.source_ip == "127.0.0.1"
        assert spool.abspath(row.spool_path).read_bytes() == part10(d)  # the file as sent
    # the study-scoped URL, and a repeat of the same instance (stored once)
    again = node.post(multipart(part10(sent[0])), path=f"/dicomweb/studies/{study}")
    assert again.status_code == 200 and referenced(again) == [str(sent[0].SOPInstanceUID)]
    with scp.sf() as s:
        assert s.scalar(select(func.count(Instance.id)).where(Instance.series_id == series_row.id)) == 3


def _mr(ct: pydicom.Dataset) -> pydicom.Dataset:
    return fresh(pydicom.dcmread(get_testdata_file("MR_small.dcm")))


def _no_pixels(ct: pydicom.Dataset) -> pydicom.Dataset:
    ds = fresh(ct)
    del ds.PixelData
    return ds


def _short_pixels(ct: pydicom.Dataset) -> pydicom.Dataset:
    ds = fresh(ct)
    ds.PixelData = ds.PixelData[:1000]
    return ds


def _leading_zero_uid(ct: pydicom.Dataset) -> pydicom.Dataset:
    return fresh(ct, series_uid="1.2.826.0.1.3680043.01.5")


def _ct_with_modality_mr(ct: pydicom.Dataset) -> pydicom.Dataset:
    ds = fresh(ct)
    ds.Modality = "MR"
    return ds


def _bad_slope(ct: pydicom.Dataset) -> pydicom.Dataset:
    ds = fresh(ct)
    ds.RescaleSlope = "0"
    return ds


@pytest.mark.parametrize("make,expected", [
    (_mr, store_mod.SOP_CLASS_NOT_SUPPORTED), (_no_pixels, store_mod.NO_PIXEL_DATA),
    (_short_pixels, store_mod.INCONSISTENT), (_leading_zero_uid, store_mod.INVALID_UID),
    (_ct_with_modality_mr, store_mod.DATASET_MISMATCH), (_bad_slope, store_mod.INCONSISTENT),
], ids=["non-CT", "no-pixel-data", "short-pixel-data", "invalid-uid", "modality-mismatch", "zero-slope"])
def test_failure_reason_is_the_scps_status_and_quarantined(both, ct, make, expected):
    scp, node = both
    ds = make(ct)
    stored_before = _count(scp.sf, Instance)
    sent = part10(ds)
    r = node.post(multipart(sent))
    assert r.status_code == 409, r.text  # nothing stored
    assert failures(r) == {str(ds.SOPInstanceUID): expected}
    assert _send(scp.cfg.node.port, ds, contexts=(ds.SOPClassUID,)) == expected  # what C-STORE answers
    records = _quarantine_records(scp.sf, str(ds.SOPInstanceUID))
    assert sorted(q.status_code for q in records) == [expected, expected]  # one for each way in
    stow_record = next(q for q in records if q.calling_ae is None)
    assert stow_record.source_ip == "127.0.0.1"
    kept_path = scp.scp.spool.quarantine_dir / stow_record.path
    kept = kept_path.read_bytes()  # as sent, but a preamble (MR_small's is a TIFF header) is zeroed
    assert kept[:128] == bytes(128) and kept[128:] == sent[128:] and kept_path.with_suffix(".reason.json").exists()
    assert _count(scp.sf, Instance) == stored_before


def test_a_part_that_is_not_dicom_cannot_be_understood(both):
    scp, node = both
    before = _count(scp.sf, QuarantineRecord)
    r = node.post(multipart(b"%PDF-1.7 this is not a DICOM file" * 10))
    assert r.status_code == 409
    assert list(failures(r).items()) == [("", store_mod.CANNOT_UNDERSTAND)]  # 0xC210: in PS3.18's Cxxx
    with scp.sf() as s:
        q = s.scalars(select(QuarantineRecord).order_by(QuarantineRecord.id.desc())).first()
    assert _count(scp.sf, QuarantineRecord) == before + 1 and q.status_code == store_mod.CANNOT_UNDERSTAND
    assert (scp.scp.spool.quarantine_dir / q.path).read_bytes().startswith(b"%PDF")


def test_some_stored_some_failed_is_202(both, ct):
    scp, node = both
    good = [fresh(ct), fresh(ct)]
    mr = _mr(ct)
    r = node.post(multipart(part10(good[0]), part10(mr), part10(good[1])))
    assert r.status_code == 202, r.text
    assert sorted(referenced(r)) == sorted(str(d.SOPInstanceUID) for d in good)
    assert failures(r) == {str(mr.SOPInstanceUID): store_mod.SOP_CLASS_NOT_SUPPORTED}


def test_instance_of_another_study_than_the_url_fails_with_a900(both, ct):
    scp, node = both
    ds = fresh(ct, study_uid=generate_uid())
    r = node.post(multipart(part10(ds)), path=f"/dicomweb/studies/{generate_uid()}")
    assert r.status_code == 409 and failures(r) == {str(ds.SOPInstanceUID): store_mod.DATASET_MISMATCH}
    assert [q.status_code for q in _quarantine_records(scp.sf, str(ds.SOPInstanceUID))] == [0xA900]
    assert node.post(multipart(part10(ds)), path="/dicomweb/studies/1.2.x").status_code == 400


@pytest.mark.parametrize("content_type,body,expected", [
    ("application/dicom", "dicom", 415),
    ('multipart/related; type="application/dicom+json"; boundary=' + BOUNDARY, "ok", 415),
    ("multipart/form-data; boundary=" + BOUNDARY, "ok", 415),
    ('multipart/related; type="application/dicom"', "ok", 400),
    (CT_TYPE, "truncated", 400),
    (CT_TYPE, "other-boundary", 400),
    (CT_TYPE, "unclosed", 400),
    (CT_TYPE, "empty", 400),
], ids=["not-multipart", "dicom-json", "form-data", "no-boundary", "truncated-part", "wrong-boundary",
        "no-close-delimiter", "empty"])
def test_malformed_requests_store_nothing(both, ct, content_type, body, expected):
    scp, node = both
    one = part10(fresh(ct))
    two = part10(fresh(ct))
    data = {"dicom": one, "ok": multipart(one), "truncated": multipart(one, two)[:len(one) + 300],
            "other-boundary": multipart(one, boundary="something-else"), "unclosed": multipart(one, two, close=False),
            "empty": b""}[body]
    instances, quarantined = _count(scp.sf, Instance), _count(scp.sf, QuarantineRecord)
    r = node.post(data, content_type=content_type)
    assert r.status_code == expected, r.text
    assert (_count(scp.sf, Instance), _count(scp.sf, QuarantineRecord)) == (instances, quarantined)


def test_body_announced_over_the_limit_is_413_without_reading_it(both):
    scp, node = both
    with socket.create_connection(("127.0.0.1", scp.cfg.http.port), timeout=10) as s:
        s.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {CT_TYPE}\r\n"
                   f"Content-Length: {(MAX_BODY_MB + 1) * 2**20}\r\n\r\n").encode())
        t0 = time.monotonic()
        reply = s.recv(65536)  # no byte of the body was sent: the answer comes at once
    assert reply.startswith(b"HTTP/1.1 413 ") and time.monotonic() - t0 < 5, reply[:200]


def test_streamed_body_over_the_limit_is_cut_off(both):
    scp, node = both
    instances = _count(scp.sf, Instance)
    chunk = b"\0" * 2**16

    def chunks():
        for _ in range((MAX_BODY_MB + 2) * 16):
            yield chunk
    try:  # chunked: no length announced; the server stops reading past the limit
        r = requests.post(node.url + "/dicomweb/studies", data=chunks(), headers={"Content-Type": CT_TYPE}, timeout=60)
        assert r.status_code == 413
    except requests.ConnectionError:
        pass  # closed while the client was still sending: also refused
    assert _count(scp.sf, Instance) == instances
    assert requests.get(node.url + "/healthz", timeout=10).status_code == 200
    assert not [p for p in scp.scp.spool.root.iterdir() if p.name.startswith(".stow-")]  # no leftover body


def test_disk_filling_while_a_chunked_body_arrives_is_503(tmp_path, monkeypatch):
    """A chunked body announces no length: free disk is looked at again while it arrives, and the
    request is refused once the spool's file system falls below the watermark (receiving comes first)."""
    from qcnode.http import stow
    from qcnode.ingest.spool import Spool
    monkeypatch.setattr(stow, "DISK_CHECK_BYTES", 2**20)
    calls = []

    def free_disk_mb(self) -> float:  # plenty before the body, nothing left once 1 MiB of it arrived
        calls.append(1)
        return 10**6 if len(calls) == 1 else 0.0
    with http_node(tmp_path) as node:
        monkeypatch.setattr(Spool, "free_disk_mb", free_disk_mb)

        def chunks():
            for _ in range(64):
                yield b"\0" * 2**16
        try:
            r = requests.post(node.url + "/dicomweb/studies", data=chunks(), headers={"Content-Type": CT_TYPE},
                              timeout=60)
            assert r.status_code == 503 and r.headers["retry-after"], r.text
        except requests.ConnectionError:
            pass  # closed while the client was still sending: also refused
        assert len(calls) >= 2  # looked at again while the body arrived
        assert not [p for p in node.cfg.path(node.cfg.storage.spool_dir).iterdir() if p.name.startswith(".stow-")]


# --------------------------------------------------------------------------------- tokens, readiness
def test_tokens_and_roles_on_a_public_bind(tmp_path, ct):
    with http_node(tmp_path, host="0.0.0.0", tokens=True) as node:
        body = multipart(part10(fresh(ct)))
        for path in ("/healthz", "/readyz"):  # open to load balancers and orchestrators
            assert requests.get(node.url + path, timeout=10).status_code == 200
        for method, path in (("POST", "/dicomweb/studies"), ("GET", "/dicomweb/studies"), ("GET", "/anything")):
            r = requests.request(method, node.url + path, data=body if method == "POST" else None, timeout=10,
                                 headers={"Content-Type": CT_TYPE})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (path, r.text)
        assert node.post(body, token="not-a-token").status_code == 401
        assert node.post(body, token=TOKENS["viewer"][1]).status_code == 403
        assert node.post(body, token=TOKENS["pacs"][1]).status_code == 200
        assert node.post(multipart(part10(fresh(ct))), token=TOKENS["ops"][1]).status_code == 200
    log = (tmp_path / "var" / "qcnode.log")
    assert not log.exists() or "s3cret" not in log.read_text()


def test_open_server_answers_only_requests_addressed_to_loopback(tmp_path, ct):
    """DNS rebinding: a web page whose name resolves to 127.0.0.1 sends its own Host header; an open
    (tokenless) server must not treat it as this host's admin."""
    with http_node(tmp_path) as node:
        assert requests.get(node.url + "/readyz", timeout=10).status_code == 200  # Host: 127.0.0.1:port
        for host in ("evil.example", "evil.example:8080", "10.0.0.5"):
            r = requests.get(node.url + "/readyz", headers={"Host": host}, timeout=10)
            assert r.status_code == 400 and "localhost" in r.json()["detail"], host
        assert requests.get(node.url + "/healthz", headers={"Host": "localhost:1"}, timeout=10).status_code == 200


def test_too_many_parts_is_400(both, monkeypatch):
    from qcnode.http import multipart as multipart_mod
    scp, node = both
    monkeypatch.setattr(multipart_mod, "MAX_PARTS", 3)
    r = node.post(multipart(*[b"x" * 10] * 4))
    assert r.status_code == 400 and "more than 3 parts" in r.text


def test_sign_in_reads_only_a_small_urlencoded_form(tmp_path):
    """/login is open to anyone: a multipart upload or a large body is refused before any of it is parsed."""
    with http_node(tmp_path, host="0.0.0.0", tokens=True) as node:
        big = requests.post(node.url + "/login", data={"token": "x" * 20000}, timeout=10, allow_redirects=False)
        upload = requests.post(node.url + "/login", files={"f": ("f.bin", b"\0" * 2**20)}, timeout=10,
                               allow_redirects=False)
        for r in (big, upload):
            assert r.status_code == 400 and "Sign in with the form" in r.text


def test_loopback_without_tokens_is_open(tmp_path, ct):
    with http_node(tmp_path) as node:
        assert node.post(multipart(part10(fresh(ct)))).status_code == 200
        assert requests.get(node.url + "/anything", timeout=10).status_code == 404


def test_readyz_reports_why_not_ready(tmp_path):
    with http_node(tmp_path, storage={"min_free_disk_mb": 2**40,
                                      "database_url": "postgresql://qc@127.0.0.1:1/none"}) as node:
        r = requests.get(node.url + "/readyz", timeout=30)
        assert requests.get(node.url + "/healthz", timeout=10).status_code == 200
    assert r.status_code == 503
    reasons = r.json()["reasons"]
    assert any(x.startswith("database unreachable") for x in reasons), reasons
    assert any("below storage.min_free_disk_mb" in x for x in reasons), reasons


# ------------------------------------------------------------------------------- qcnode serve, end to end
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_series_posted_with_dicomweb_client_is_scored_like_c_store(tmp_path, port, shared_ct):
    from dicomweb_client.api import DICOMwebClient
    hport = free_port()
    cfg_path = write_config(tmp_path, port, checkpoint=checkpoint_for_tests(tmp_path),
                            extra={"http": {"enabled": True, "port": hport}})
    sources = sorted((shared_ct / "ge_head").glob("*.dcm"))[:4]
    via_stow = make_slices(sources, tmp_path / "stow", 4)
    via_dimse = make_slices(sources, tmp_path / "dimse", 4)
    proc = serve_process(cfg_path)
    engine = None
    try:
        wait_port(port, 120, proc)
        wait_port(hport, 60, proc)
        client = DICOMwebClient(f"http://127.0.0.1:{hport}/dicomweb")
        response = client.store_instances([pydicom.dcmread(f) for f in via_stow])
        assert len(response.ReferencedSOPSequence) == 4 and "FailedSOPSequence" not in response
        assert storescu(port, via_dimse).returncode == 0
        cfg = load_config(cfg_path)
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)
        series = [str(pydicom.dcmread(f[0], stop_before_pixels=True).SeriesInstanceUID) for f in (via_stow, via_dimse)]

        def scored():
            with sf() as s:
                rows = s.scalars(select(Series).where(Series.series_instance_uid.in_(series))).all()
                return len(rows) == 2 and all(r.status == "scored" for r in rows)
        wait_for(scored, 300, interval=0.5, what="both series scored")
        with sf() as s:
            scores = {}
            for uid in series:
                rows = s.execute(select(Instance.instance_number, SliceScore.score).join(
                    SliceScore, SliceScore.instance_id == Instance.id).join(Series, Series.id == Instance.series_id)
                    .where(Series.series_instance_uid == uid)).all()
                scores[uid] = dict(rows)
        assert len(scores[series[0]]) == 4 and scores[series[0]] == pytest.approx(scores[series[1]], abs=1e-5)
    finally:
        if engine is not None:
            engine.dispose()
        assert stop_process(proc) == 0
    log_text = (tmp_path / "var" / "qcnode.log").read_text()
    assert '"stow_request"' in log_text and '"http_stopped"' in log_text


STOW_KILLS = 5
INSTANCES_PER_REQUEST = 3


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill9_during_stow_loses_nothing_acknowledged(tmp_path, port, shared_ct):
    """Clients post continuously; serve is killed with SIGKILL at random moments. Every instance of
    every request answered 200 is in the database with a complete spool file after each kill."""
    rng = random.Random(2005)
    hport = free_port()
    cfg_path = write_config(tmp_path, port, extra={"http": {"enabled": True, "port": hport},
                                                   "worker": {"enabled": False}, "node": {"scp_processes": 1}})
    cfg = load_config(cfg_path)
    spool = Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir))
    template = pydicom.dcmread(sorted((shared_ct / "ge_head").glob("*.dcm"))[0])
    url = f"http://127.0.0.1:{hport}/dicomweb/studies"
    acked: list[str] = []
    other: list[Any] = []
    interrupted = 0
    engine = None
    proc = None

    def client(stop: threading.Event, cut: list[int]) -> None:
        session = requests.Session()
        study, series = generate_uid(), generate_uid()
        while not stop.is_set():
            batch = [fresh(template, study, series) for _ in range(INSTANCES_PER_REQUEST)]
            try:
                r = session.post(url, data=multipart(*map(part10, batch)), headers={"Content-Type": CT_TYPE},
                                 timeout=30)
            except requests.RequestException:
                cut.append(1)  # killed mid-request (or down): not acknowledged, the sender would retry
                return
            if r.status_code == 200:
                acked.extend(str(d.SOPInstanceUID) for d in batch)
            else:
                other.append((r.status_code, r.text[:200]))

    try:
        for round_no in range(STOW_KILLS):
            proc = serve_process(cfg_path)
            wait_port(hport, 120, proc)
            wait_for(lambda: requests.get(f"http://127.0.0.1:{hport}/readyz", timeout=5).ok, 60, what="readyz")
            if engine is None:
                engine = make_engine(cfg.database_url)
                sf = session_factory(engine)
            stop, cut = threading.Event(), []
            clients = [threading.Thread(target=client, args=(stop, cut)) for _ in range(3)]
            for t in clients:
                t.start()
            time.sleep(rng.uniform(0.3, 2.5))
            kill9(proc)
            stop.set()
            for t in clients:
                t.join(60)
            interrupted += len(cut)
            with sf() as s:
                rows = dict(s.execute(select(Instance.sop_instance_uid, Instance.spool_path)
                                      .where(Instance.sop_instance_uid.in_(acked))).all())
            missing = [u for u in acked if u not in rows]
            assert not missing, f"round {round_no}: answered 200 but not stored: {missing[:3]}"
            for uid in acked[-INSTANCES_PER_REQUEST * 3:]:
                stored = pydicom.dcmread(spool.abspath(rows[uid]))
                assert str(stored.SOPInstanceUID) == uid and len(stored.PixelData) == len(template.PixelData)
        assert not other, other[:3]
        assert acked and interrupted >= 1, (len(acked), interrupted)
        assert not [p for p in spool.root.iterdir() if p.name.startswith(".stow-")]
        print(f"\nkill -9 during STOW-RS: {STOW_KILLS} kills, {len(acked)} instances answered 200 (all stored), "
              f"{interrupted} requests cut short")
    finally:
        if proc is not None and proc.poll() is None:
            stop_process(proc)
        if engine is not None:
            engine.dispose()
