"""C-STORE SCU and outbox against real peers: a pynetdicom Storage SCP and DCMTK storescp.

Destinations down at first, back-off, dead-letter, forwarding by verdict, TLS.
"""
from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from conftest import free_port
from qcnode.config import Config, Destination
from qcnode.db.engine import make_engine, session_factory, upgrade
from qcnode.db.models import Delivery, Instance, Series, SeriesResult, Study
from qcnode.db.queue import as_utc
from qcnode.delivery.scu import DeliveryError, send_datasets
from qcnode.report.read import read_series_sr
from qcnode.report.sr import build_series_sr, write_sr
from qcnode.report.kos import build_quality_issue_kos, failing_slices
from qcnode.delivery.outbox import KIND_KOS, OutboxSender, enqueue, kos_relpath, payload_kinds, wants_kind
from sr_helpers import MODEL, MODEL_INFO, WHEN, slice_scores, summary_for, write_validated

N_SLICES = 4


class StoreSCP:
    """A real pynetdicom Storage SCP on 127.0.0.1 that keeps what it receives."""

    def __init__(self, port: int, transfer_syntaxes=None, status: int = 0x0000, ssl_context=None):
        self.port, self.status, self.received = port, status, []
        ae = AE(ae_title="TESTDEST")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, transfer_syntaxes or ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ssl_context,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append((str(event.context.transfer_syntax), ds))
        return self.status

    def uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for _, ds in self.received]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp_factory():
    servers: list[StoreSCP] = []

    def start(port: int | None = None, **kw) -> StoreSCP:
        servers.append(StoreSCP(port or free_port(), **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()


def _dest(name: str, port: int, send=("sr",), **kw) -> Destination:
    return Destination(name=name, ae_title="TESTDEST", host="127.0.0.1", port=port, send=list(send), **kw)


def _config(tmp_path: Path, db_url: str, destinations, **outbox) -> Config:
    cfg = Config()
    cfg.base_dir = tmp_path
    cfg.storage.database_url = db_url
    cfg.storage.spool_dir = str(tmp_path / "spool")
    cfg.outbox.backoff_initial_seconds = outbox.get("initial", 0.3)
    cfg.outbox.backoff_max_seconds = outbox.get("maximum", 5.0)
    cfg.outbox.max_attempts = outbox.get("max_attempts", 8)
    cfg.outbox.send_timeout_seconds = 5.0
    cfg.destinations = list(destinations)
    return cfg


@pytest.fixture(scope="module")
def ct_files(shared_ct) -> list[Path]:
    return sorted((shared_ct / "ge_head").glob("*.dcm"))[:N_SLICES]


def _seed(cfg: Config, ct_files: list[Path], verdict: str = "FAIL", version: int = 1):
    """Spool N CT files + their SR, insert study/series/instances/result rows; returns (sf, result id, SR)."""
    url = cfg.storage.database_url
    upgrade(url)
    sf = session_factory(make_engine(url))
    spool = cfg.path(cfg.storage.spool_dir)
    headers = []
    for f in ct_files:
        (spool / "in").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, spool / "in" / f.name)
        headers.append(pydicom.dcmread(f, stop_before_pixels=True))
    slices = slice_scores(headers)
    sr = build_series_sr(headers, slices, summary_for(slices, verdict), MODEL, version,
                         content_datetime=WHEN)
    sr_rel = f"sr/{sr.SOPInstanceUID}.dcm"
    write_sr(sr, spool / sr_rel)
    if wants_kind(cfg, verdict, KIND_KOS):  # as the worker does
        threshold = cfg.verdict.slice_threshold
        kos = build_quality_issue_kos(headers, failing_slices(slices, threshold), MODEL, version, threshold,
                                      content_datetime=WHEN)
        write_validated(kos, spool / kos_relpath(str(headers[0].StudyInstanceUID),
                                                 str(headers[0].SeriesInstanceUID), MODEL_INFO["version"], version))
    with sf() as s:
        study = Study(study_instance_uid=str(headers[0].StudyInstanceUID))
        series = Series(series_instance_uid=str(headers[0].SeriesInstanceUID), study=study,
                        status="scored", version=version)  # as the worker leaves it
        s.add_all([study, series])
        s.flush()
        for f, h in zip(ct_files, headers):
            s.add(Instance(sop_instance_uid=str(h.SOPInstanceUID), series_id=series.id,
                           sop_class_uid=str(h.SOPClassUID), instance_number=int(h.InstanceNumber),
                           spool_path=f"in/{f.name}", size_bytes=f.stat().st_size))
        result = SeriesResult(series_id=series.id, version=version, model_version=MODEL_INFO["version"],
                              n_slices=len(slices), verdict=verdict, sr_sop_instance_uid=str(sr.SOPInstanceUID),
                              sr_path=sr_rel)
        s.add(result)
        s.flush()
        enqueue(s, result, cfg)
        s.commit()
        return sf, result.id, sr


def _deliveries(sf) -> list[Delivery]:
    with sf() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def _run_until(sender: OutboxSender, sf, done, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sender.run_once()
        if done(_deliveries(sf)):
            return
        time.sleep(0.05)
    raise AssertionError(f"outbox did not finish: {[(d.status, d.attempts, d.last_error) for d in _deliveries(sf)]}")


# ---- SCU ------------------------------------------------------------------------------------------
def test_send_files_as_stored(scp_factory, ct_files):
    scp = scp_factory()
    jp2k = Path(get_testdata_file("MR_small_jp2klossless.dcm"))
    ct_small = Path(get_testdata_file("CT_small.dcm"))
    items = [*ct_files[:2], ct_small, jp2k]
    statuses = send_datasets(_dest("d", scp.port), items, "QCNODE", timeout=10)
    assert statuses == [0, 0, 0, 0]
    assert scp.uids() == [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in items]
    ts, got = scp.received[-1]
    original = pydicom.dcmread(jp2k)
    assert ts == original.file_meta.TransferSyntaxUID  # compressed data not re-encoded
    assert got.PixelData == original.PixelData


def test_uncompressed_falls_back_to_implicit_but_compressed_does_not(scp_factory, ct_files):
    scp = scp_factory(transfer_syntaxes=[ImplicitVRLittleEndian])
    assert send_datasets(_dest("d", scp.port), ct_files[:1], "QCNODE", timeout=10) == [0]
    assert scp.received[0][0] == ImplicitVRLittleEndian
    assert scp.received[0][1].PixelData == pydicom.dcmread(ct_files[0]).PixelData
    with pytest.raises(DeliveryError, match="did not accept transfer syntax"):
        send_datasets(_dest("d", scp.port), [get_testdata_file("MR_small_jp2klossless.dcm")], "QCNODE", 10)


def test_refused_instance_and_down_peer_raise(scp_factory, ct_files):
    scp = scp_factory(status=0xA700)
    with pytest.raises(DeliveryError, match="refused .* status 0xA700"):
        send_datasets(_dest("d", scp.port), ct_files[:1], "QCNODE", timeout=10)
    with pytest.raises(DeliveryError, match="could not associate|cannot connect"):
        send_datasets(_dest("down", free_port()), ct_files[:1], "QCNODE", timeout=5)
    with pytest.raises(DeliveryError, match="missing"):
        send_datasets(_dest("d", scp.port), [ct_files[0].parent / "nope.dcm"], "QCNODE", timeout=5)


# ---- outbox ---------------------------------------------------------------------------------------
def test_destination_down_at_first_gets_the_sr_once_up(tmp_path, db_url, scp_factory, ct_files):
    port = free_port()
    cfg = _config(tmp_path, db_url, [_dest("pacs", port)], initial=0.3)
    sf, _, sr = _seed(cfg, ct_files, verdict="WARN")
    sender = OutboxSender(cfg, sf, owner="test-sender")

    assert sender.run_once() == 1  # destination down: attempt 1 fails
    (d,) = _deliveries(sf)
    assert (d.status, d.attempts) == ("pending", 1) and "pacs" in d.last_error
    delay1 = (as_utc(d.next_attempt_at) - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 0.0 < delay1 <= 0.3
    assert sender.run_once() == 0  # not due yet: back-off respected
    time.sleep(0.35)
    assert sender.run_once() == 1  # attempt 2 fails too, back-off doubles
    (d,) = _deliveries(sf)
    delay2 = (as_utc(d.next_attempt_at) - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert d.attempts == 2 and 0.3 < delay2 <= 0.6

    scp = scp_factory(port)  # the destination comes up
    _run_until(sender, sf, lambda ds: ds[0].status == "delivered")
    (d,) = _deliveries(sf)
    assert d.attempts == 3 and d.delivered_at is not None and d.last_error is None
    for _ in range(3):
        assert sender.run_once() == 0
    assert scp.uids() == [sr.SOPInstanceUID]  # exactly one SR reached the destination
    parsed = read_series_sr(scp.received[0][1])
    assert {s["sop_instance_uid"] for s in parsed["slices"]} == {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ct_files}
    assert parsed["summary"]["verdict"] == "WARN"


def test_dead_letter_after_max_attempts(tmp_path, db_url, ct_files):
    cfg = _config(tmp_path, db_url, [_dest("pacs", free_port())], initial=0.02, maximum=0.05, max_attempts=3)
    sf, _, _ = _seed(cfg, ct_files)
    sender = OutboxSender(cfg, sf, owner="test-sender")
    _run_until(sender, sf, lambda ds: ds[0].status == "dead")
    (d,) = _deliveries(sf)
    assert d.attempts == 3 and d.delivered_at is None
    assert "could not associate" in d.last_error
    time.sleep(0.1)
    assert sender.run_once() == 0  # dead letters are not retried


def test_forwarding_by_verdict(tmp_path, scp_factory, ct_files):
    scp = scp_factory()
    dests = [_dest("pacs", scp.port, ["sr"]), _dest("qa-hold", scp.port, ["series:FAIL"]),
             _dest("archive", scp.port, ["series:PASS"])]
    assert payload_kinds(dests[1], "FAIL") == ["series"] and payload_kinds(dests[1], "PASS") == []
    assert payload_kinds(_dest("x", 1, ["sr", "series"]), "PASS") == ["sr", "series"]
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}", dests)
    sf, result_id, sr = _seed(cfg, ct_files, verdict="FAIL")
    with sf() as s:  # enqueue is idempotent
        again = enqueue(s, s.get(SeriesResult, result_id), cfg)
        s.commit()
    rows = _deliveries(sf)
    assert sorted((d.destination, d.kind) for d in rows) == [("pacs", "sr"), ("qa-hold", "series")]
    assert sorted(d.id for d in again) == sorted(d.id for d in rows)

    _run_until(OutboxSender(cfg, sf, "test-sender"), sf, lambda ds: all(d.status == "delivered" for d in ds))
    ct_uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ct_files]
    assert sorted(scp.uids()) == sorted([sr.SOPInstanceUID, *ct_uids])


@pytest.mark.parametrize("verdict", ["FAIL", "WARN"])
def test_quality_issue_kos_for_fail_only(tmp_path, scp_factory, ct_files, verdict):
    """``send = ["sr", "kos:FAIL"]``: a FAIL series' failing slices go out as a Quality Issue KOS
    (never a rejection note); a WARN series gets its SR only."""
    scp = scp_factory()
    dest = _dest("viewer", scp.port, ["sr", "kos:FAIL"])
    assert payload_kinds(dest, "FAIL") == ["sr", "kos"] and payload_kinds(dest, "WARN") == ["sr"]
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}", [dest])
    cfg.verdict.slice_threshold = 1.15  # two of the four slices are below
    sf, _result_id, sr = _seed(cfg, ct_files, verdict=verdict)
    assert sorted(d.kind for d in _deliveries(sf)) == (["kos", "sr"] if verdict == "FAIL" else ["sr"])
    _run_until(OutboxSender(cfg, sf, "test-sender"), sf, lambda ds: all(d.status == "delivered" for d in ds))
    kos = [ds for _, ds in scp.received if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"]
    assert [str(ds.SOPInstanceUID) for _, ds in scp.received if ds not in kos] == [sr.SOPInstanceUID]
    if verdict != "FAIL":
        assert not kos
        return
    assert len(kos) == 1
    title = kos[0].ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113010", "DCM", "Quality Issue")
    # the slices below the threshold (the helper's scores are 1.0, 1.1, ...), no others
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in ct_files]
    scores = {str(h.SOPInstanceUID): s.score for h, s in zip(headers, slice_scores(headers))}
    referenced = {str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for r in kos[0].ContentSequence if r.ValueType == "IMAGE"}
    assert referenced == {u for u, sc in scores.items() if sc < cfg.verdict.slice_threshold} and referenced
    assert kos[0].StudyInstanceUID == headers[0].StudyInstanceUID


def test_unconfigured_destination_and_expired_lease(tmp_path, scp_factory, ct_files):
    scp = scp_factory()
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}", [_dest("pacs", scp.port)])
    sf, result_id, sr = _seed(cfg, ct_files)
    with sf() as s:
        s.add(Delivery(series_result_id=result_id, destination="gone", kind="sr"))
        d = s.scalars(select(Delivery).where(Delivery.destination == "pacs")).one()
        # a sender died while holding this one: its lease has expired
        d.status, d.lease_owner = "sending", "dead-host:1:outbox:x"
        d.lease_expires_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        s.commit()
    _run_until(OutboxSender(cfg, sf, "test-sender"), sf,
               lambda ds: all(d.status in ("delivered", "dead") for d in ds))
    by_dest = {d.destination: d for d in _deliveries(sf)}
    assert by_dest["pacs"].status == "delivered"
    assert by_dest["gone"].status == "dead" and "no longer configured" in by_dest["gone"].last_error
    assert scp.uids() == [sr.SOPInstanceUID]


def _wait_port(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_dcmtk_storescp_destination(tmp_path, ct_files):
    storescp = Path("/usr/bin/storescp")
    if not storescp.exists():
        pytest.skip("DCMTK storescp not installed")
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen([str(storescp), "-aet", "TESTDEST", "-od", str(out), "+xa", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_port(port)
        cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}", [_dest("dcmtk", port, ["sr", "series"])])
        sf, _, sr = _seed(cfg, ct_files, verdict="PASS")
        _run_until(OutboxSender(cfg, sf, "test-sender"), sf, lambda ds: all(d.status == "delivered" for d in ds))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    files = sorted(out.iterdir())
    got = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    assert len(files) == N_SLICES + 1 and sr.SOPInstanceUID in got
    parsed = read_series_sr(pydicom.dcmread(got[sr.SOPInstanceUID]))
    assert len(parsed["slices"]) == N_SLICES and parsed["summary"]["verdict"] == "PASS"


def _make_tls_files(d: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d, timeout=60)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=qcnode test CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "other.key", "-out", "other.pem", "-days", "2", "-subj", "/CN=other CA")
    return {n: d / f"{n}.pem" for n in ("ca", "server", "other")} | {"key": d / "server.key"}


def test_tls_destination(tmp_path, scp_factory, ct_files):
    tls = _make_tls_files(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls["server"], tls["key"])
    scp = scp_factory(ssl_context=server_ctx)
    good = _dest("tls-pacs", scp.port, tls_enabled=True, tls_ca="ca.pem")  # relative to base_dir
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}", [good])
    sf, _, sr = _seed(cfg, ct_files)
    _run_until(OutboxSender(cfg, sf, "test-sender"), sf, lambda ds: ds[0].status == "delivered")
    assert scp.uids() == [sr.SOPInstanceUID]

    # an untrusted server certificate or a plain connection to the TLS port never delivers
    with pytest.raises(DeliveryError):
        send_datasets(_dest("t", scp.port, tls_enabled=True, tls_ca=str(tls["other"])), ct_files[:1],
                      "QCNODE", timeout=5)
    with pytest.raises(DeliveryError):
        send_datasets(_dest("t", scp.port), ct_files[:1], "QCNODE", timeout=5)
    with pytest.raises(DeliveryError, match="tls_ca file not found"):
        send_datasets(_dest("t", scp.port, tls_enabled=True, tls_ca="/nonexistent/ca.pem"), ct_files[:1],
                      "QCNODE", timeout=5)
    assert scp.uids() == [sr.SOPInstanceUID]


def test_two_senders_never_send_a_delivery_twice(tmp_path, db_url, scp_factory, ct_files):
    import threading

    scp = scp_factory()
    dests = [_dest(f"pacs{i}", scp.port) for i in range(6)]
    cfg = _config(tmp_path, db_url, dests)
    sf, _, sr = _seed(cfg, ct_files[:1])
    senders = [OutboxSender(cfg, sf, owner=f"sender-{i}") for i in range(2)]
    counts = [0, 0]

    def loop(i: int) -> None:
        end = time.monotonic() + 30
        while time.monotonic() < end and not all(d.status == "delivered" for d in _deliveries(sf)):
            counts[i] += senders[i].run_once()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = _deliveries(sf)
    assert all(d.status == "delivered" and d.attempts == 1 for d in rows)
    assert sum(counts) == len(dests)  # each claimed exactly once
    assert scp.uids() == [sr.SOPInstanceUID] * len(dests)
