"""Hardening of the Storage SCP against hostile or unlucky input, over real sockets on 127.0.0.1:

- a PDU header claiming a huge length is refused before anything is allocated (A-ABORT), before
  and after association establishment, and the node keeps serving;
- a C-STORE handler that outlasts node.network_timeout (a long database lock wait) still gets its
  Success to the peer, on the DUL-thread fast path and on pynetdicom's path, and keeps the association;
- pydicom's warnings, which quote element values (a PatientID mis-encoded as IS), reach no log
  line or stderr with the value;
- an invalid SOP Instance UID that is the same in the request and the data set is 0xC001 invalid UID,
  also one of 65 characters on the DUL-thread path (pynetdicom's own path aborts for it);
- a C-STORE whose SOP Class UID is not the abstract syntax of its presentation context (an unknown
  class on a CT context, a CT slice on the Verification context) is 0x0122, on both paths;
- a full disk (ENOSPC/EDQUOT) while spooling is 0xA700 out of resources;
- an IPv4 peer of a dual-stack listener (node.host "::") is matched against IPv4 node.allowed_ips.

Each test that starts a node runs on the fast path and on pynetdicom's own (test_scp.py's
``scp_path``); those about what only the fast path does are marked ``FAST_PATH_ONLY``.
"""
from __future__ import annotations

import errno
import json
import logging
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pydicom
import pytest
import structlog
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from qcnode.db.models import Instance, QuarantineRecord
from qcnode.ingest import scp as scp_mod
from qcnode.net.pdu import MAX_ASSOCIATION_PDU_LENGTH, pdata_length_limit
from qcnode.ingest.validate import error_reason
from qcnode.log import redact_quoted_values
from qcnode.net.policy import REJECT_IP
from test_scp import FAST_PATH_ONLY, scp_path, start_node  # noqa: F401 - the fixtures

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CT = str(CTImageStorage)
RSS_GROWTH_LIMIT_MB = 100
HUGE = 0x40000000  # 1 GiB claimed


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _ct_slice(shared_ct: Path, n: int = 0) -> pydicom.Dataset:
    ds = pydicom.dcmread(sorted((shared_ct / "ge_head").glob("*.dcm"))[n])
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    return ds


def _associate(port: int, *contexts, calling: str = "PYSCU"):
    ae = AE(ae_title=calling)
    for cx in contexts or (CTImageStorage,):
        ae.add_requested_context(cx)
    return ae.associate("127.0.0.1", port, ae_title="QCNODE")


def _echo_ok(port: int) -> bool:
    assoc = _associate(port, Verification, calling="ECHO")
    try:
        return assoc.is_established and int(assoc.send_c_echo().Status) == 0
    finally:
        if assoc.is_established:
            assoc.release()


def _no_server_associations(scp, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [a for a in scp.ae.active_associations if a.dul.is_alive()]:
            return True
        time.sleep(0.05)
    return False


# ---- 1. PDU length limits --------------------------------------------------------------------

@FAST_PATH_ONLY
@pytest.mark.parametrize("pdu_type", [0x01, 0x04, 0x07])
def test_huge_pdu_before_association_is_aborted_without_allocating(start_node, port, pdu_type):
    """01 00 40 00 00 00 (an A-ASSOCIATE-RQ of 1 GiB) from any address and AE title used to
    allocate 1 GiB before the allow-lists were looked at; now: A-ABORT, a log line, no memory."""
    scp, _, _ = start_node()
    assert _echo_ok(port)
    before = _rss_mb()
    with structlog.testing.capture_logs() as logs:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(struct.pack(">BBL", pdu_type, 0, HUGE) + b"\x00" * 4096)
            time.sleep(0.5)  # (the old code sat in recv here with the buffer allocated)
            peak = _rss_mb()
            reply = b""
            try:
                while chunk := sock.recv(4096):
                    reply += chunk
            except TimeoutError:
                pass
    assert peak - before < RSS_GROWTH_LIMIT_MB, f"RSS grew {peak - before:.0f} MB for one PDU header"
    assert reply[:1] == b"\x07", f"expected an A-ABORT PDU, got {reply[:10].hex()}"  # and then the close
    aborted = [e for e in logs if e.get("event") == "association_aborted"]
    assert aborted and aborted[0]["pdu_length"] == HUGE and aborted[0]["max_length"] == MAX_ASSOCIATION_PDU_LENGTH
    assert aborted[0]["source_ip"] == "127.0.0.1"
    assert _echo_ok(port)  # the node keeps serving


@FAST_PATH_ONLY
def test_huge_p_data_on_an_established_association_is_aborted(start_node, port):
    scp, _, cfg = start_node()
    assoc = _associate(port)
    assert assoc.is_established
    before = _rss_mb()
    try:
        with structlog.testing.capture_logs() as logs:
            assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, HUGE) + b"\x00" * 4096)
            deadline = time.monotonic() + 5
            while not assoc.is_aborted and time.monotonic() < deadline:
                time.sleep(0.02)
            peak = _rss_mb()
        assert assoc.is_aborted
        assert peak - before < RSS_GROWTH_LIMIT_MB, f"RSS grew {peak - before:.0f} MB for one PDU header"
        (line,) = [e for e in logs if e.get("event") == "association_aborted"]
        assert (line["pdu_type"], line["pdu_length"]) == ("P-DATA-TF", HUGE)
        assert line["max_length"] == pdata_length_limit(cfg.node.max_pdu_size)
    finally:
        if not assoc.is_aborted:
            assoc.abort()
    assert _no_server_associations(scp)
    assert _echo_ok(port)


def _elem(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _store_command(sop_uid: str, message_id: int = 7, sop_class: str = CT) -> bytes:
    """A C-STORE-RQ command set, hand-encoded (pynetdicom would refuse to send some of these UIDs)."""
    body = (_elem(0x0002, sop_class.encode()) + _elem(0x0100, struct.pack("<H", 0x0001)) +
            _elem(0x0110, struct.pack("<H", message_id)) + _elem(0x0700, struct.pack("<H", 0)) +
            _elem(0x0800, struct.pack("<H", 0x0001)) + _elem(0x1000, sop_uid.encode()))
    return _elem(0x0000, struct.pack("<L", len(body))) + body


def _p_data_tf(*items: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack(">LB", len(data) + 1, cid) + data for cid, data in items)
    return struct.pack(">BBL", 0x04, 0x00, len(body)) + body


class RawStore:
    """An established association whose requestor reactor is held: the test writes the PDUs and
    reads the responses itself (as pynetdicom's send_c_* do)."""

    def __init__(self, port: int, abstract_syntax: str = CTImageStorage):
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(abstract_syntax, ImplicitVRLittleEndian)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
        assert self.assoc.is_established
        self.cx = next(c.context_id for c in self.assoc.accepted_contexts if c.abstract_syntax == abstract_syntax)
        self.assoc._reactor_checkpoint.clear()
        while not self.assoc._is_paused:
            time.sleep(0.001)

    def store(self, command: bytes, data: bytes, split_command: bool = False, wait_s: float = 15) -> int | None:
        send = self.assoc.dul.socket.send
        if split_command:  # a command set over two PDUs: pynetdicom's path, not the DUL-thread one
            send(_p_data_tf((self.cx, b"\x01" + command[:30])))
            send(_p_data_tf((self.cx, b"\x03" + command[30:])))
        else:
            send(_p_data_tf((self.cx, b"\x03" + command)))
        send(_p_data_tf((self.cx, b"\x02" + data)))  # the whole data set in one PDU
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self.assoc.is_established:
            _, msg = self.assoc.dimse.get_msg(block=False)
            if msg is not None:
                return int(msg.Status)
            time.sleep(0.01)
        return None

    def close(self) -> None:
        self.assoc._reactor_checkpoint.set()
        if self.assoc.is_established:
            self.assoc.release()


@FAST_PATH_ONLY
def test_long_p_data_within_the_limit_is_still_read(start_node, port, shared_ct):
    """A peer that ignores the negotiated maximum and sends a 2 MiB slice in one P-DATA-TF (longer
    than any PDU allowed before establishment) is still served."""
    scp, _, cfg = start_node()
    ds = _ct_slice(shared_ct)
    ds.Rows, ds.Columns = 1024, 1024
    ds.PixelData = bytes(1024 * 1024 * 2)
    data = encode(ds, True, True)
    assert MAX_ASSOCIATION_PDU_LENGTH < len(data) + 6 < pdata_length_limit(cfg.node.max_pdu_size)
    raw = RawStore(port)
    try:
        assert raw.store(_store_command(ds.SOPInstanceUID), data) == scp_mod.SUCCESS
    finally:
        raw.close()
    assert scp.stored == 1 and scp.direct_stores == 1


# ---- 2. a handler slower than the network timeout ---------------------------------------------

@FAST_PATH_ONLY
@pytest.mark.parametrize("direct", [True, False], ids=["dul-thread", "pynetdicom"])
def test_slow_store_handler_still_gets_success_and_keeps_the_association(start_node, port, shared_ct,
                                                                          monkeypatch, direct):
    scp, sf, _ = start_node(node={"network_timeout": 1.0})
    record = scp.recorder.record

    def slow_record(pending, **kwargs):  # a long database lock wait, after the durable spool write
        time.sleep(2.5)
        return record(pending, **kwargs)
    monkeypatch.setattr(scp.recorder, "record", slow_record)
    ds = _ct_slice(shared_ct)
    assoc = _associate(port, CTImageStorage, Verification)
    assert assoc.is_established
    try:
        if not direct:  # make the DirectStore decline: pynetdicom's DIMSE path runs the handler
            (server_assoc,) = scp.ae.active_associations
            server_assoc.dul.direct_store = None
        status = assoc.send_c_store(ds)
        assert status and int(status.Status) == scp_mod.SUCCESS
        assert scp.direct_stores == (1 if direct else 0)
        time.sleep(0.5)  # (pynetdicom's own reactor aborted here: "Network timeout reached")
        assert assoc.is_established and not assoc.is_aborted
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        if assoc.is_established:
            assoc.release()
    with sf() as s:
        assert s.scalar(select(Instance.id).where(Instance.sop_instance_uid == ds.SOPInstanceUID)) is not None


def test_idle_association_still_times_out(start_node, port):
    """Holding the idle timer while a handler runs leaves the network timeout itself working."""
    scp, _, _ = start_node(node={"network_timeout": 1.0})
    assoc = _associate(port, Verification)
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established
    assert _no_server_associations(scp)


# ---- 3. patient values in pydicom's warnings --------------------------------------------------

_PHI_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    import pydicom
    from pydicom.uid import generate_uid
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage
    from daemon_helpers import write_config
    from qcnode.config import load_config
    from qcnode.db.engine import make_engine, session_factory, upgrade
    from qcnode.ingest.scp import StorageSCP
    from qcnode.ingest.spool import Spool
    from qcnode.log import configure_logging

    tmp, port, src = Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    cfg = load_config(write_config(tmp, port, extra={"node": {"fast_path": sys.argv[6] == "fast"}}))
    configure_logging("debug", tmp / "qcnode.log")
    upgrade(cfg.database_url)
    scp = StorageSCP(cfg, session_factory(make_engine(cfg.database_url)),
                     Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir)))
    scp.start()
    statuses = []
    for patient_id, vr in (("SECRETID77", b"IS"), ("secretcs99", b"CS")):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = patient_id, "Smithson^Joe"
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        path = tmp / f"{patient_id}.dcm"
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        i = data.index(b"\\x10\\x00\\x20\\x00LO")  # (0010,0020) PatientID: re-label its VR
        path.write_bytes(data[:i + 4] + vr + data[i + 6:])
        _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are
        ae = AE("PYSCU")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
        statuses.append(int(assoc.send_c_store(path).Status))
        assoc.release()
    time.sleep(0.3)
    scp.stop(2)
    print("STATUSES", statuses)
""")


def test_pydicom_warnings_never_put_patient_values_in_a_log_line(tmp_path, port, shared_ct, scp_path):
    """pydicom logs (and warns) "Invalid value for VR IS: 'SECRETID77'" for a PatientID
    mis-encoded as IS: in a process with qcnode's logging neither the JSON log nor stderr holds it."""
    src = sorted((shared_ct / "ge_head").glob("*.dcm"))[0]
    proc = subprocess.run([sys.executable, "-c", _PHI_SCRIPT, str(PROJECT_ROOT / "tests"), str(PROJECT_ROOT),
                           str(tmp_path), str(port), str(src), scp_path],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STATUSES [0, 0]" in proc.stdout  # stored (the node does not care about the PatientID's VR)
    log_text = (tmp_path / "qcnode.log").read_text()
    lines = [json.loads(line) for line in log_text.splitlines()]
    pydicom_lines = [e for e in lines if e.get("logger") in ("pydicom", "py.warnings")]
    assert any("Invalid value for VR IS: '<redacted>'" in e["event"] for e in pydicom_lines), pydicom_lines[:5]
    assert any(e["logger"] == "py.warnings" for e in pydicom_lines)  # warnings.warn went through the handler
    for needle in ("SECRETID77", "secretcs99", "Smithson"):
        assert needle.lower() not in log_text.lower(), f"{needle} in the log"
        assert needle.lower() not in proc.stderr.lower(), f"{needle} on stderr"


def test_redaction_filter_touches_pydicom_and_warnings_records_only():
    def record(name: str, msg: str, *args) -> logging.LogRecord:
        rec = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args or None, None)
        assert redact_quoted_values(rec) is True  # never drops a record
        return rec

    assert record("pydicom", "Invalid value for VR %s: %r", "IS", "SECRETID77").getMessage() == \
        "Invalid value for VR IS: '<redacted>'"
    assert record("pydicom.valuerep", 'bad value "O\'Brien^Pat" here').getMessage() == "bad value '<redacted>' here"
    assert "SECRETID77" not in record("py.warnings", "%s", "x.py:1: UserWarning: 'SECRETID77'\n").getMessage()
    assert record("pynetdicom.dul", "Unknown PDU type received '0x09'").getMessage() == \
        "Unknown PDU type received '0x09'"


# ---- 4. invalid UIDs in the request ---------------------------------------------------------

@pytest.mark.parametrize("split_command", [False, True], ids=["one-pdu-command", "split-command"])
@pytest.mark.parametrize("bad_uid", ["1.2.abc", "../../x"])
def test_invalid_sop_instance_uid_in_request_and_data_set_is_invalid_uid(start_node, port, shared_ct,
                                                                         bad_uid, split_command):
    scp, sf, _ = start_node()
    ds = _ct_slice(shared_ct)
    ds.SOPInstanceUID = bad_uid
    raw = RawStore(port)
    try:
        status = raw.store(_store_command(bad_uid), encode(ds, True, True), split_command=split_command)
    finally:
        raw.close()
    assert status == scp_mod.INVALID_UID == 0xC001
    with sf() as s:
        (rec,) = s.scalars(select(QuarantineRecord)).all()
    assert rec.status_code == 0xC001
    assert "invalid SOP Instance UID" in rec.reason and repr(bad_uid) in rec.reason
    assert "differs" not in rec.reason
    assert not list(scp.spool.root.rglob("x.dcm"))


@pytest.mark.parametrize("split_command", [False, True], ids=["one-pdu-command", "split-command"])
@pytest.mark.parametrize("case,scp_path", [("unknown-class-on-ct-context", "fast"),  # plain: pynetdicom aborts
                                           ("ct-on-verification-context", "fast"),
                                           ("ct-on-verification-context", "plain")])
def test_c_store_whose_sop_class_is_not_the_contexts_is_sop_class_not_supported(start_node, port, shared_ct,
                                                                                 case, split_command):
    """pynetdicom dispatches a C-STORE on the request's own SOP Class UID: an unknown one on an
    accepted CT context was an A-ABORT, a CT slice on the Verification context was stored."""
    scp, sf, _ = start_node()
    ds = _ct_slice(shared_ct)
    request_class, context = ("1.2.3.4", CTImageStorage) if case.startswith("unknown") else (CT, Verification)
    raw = RawStore(port, context)
    try:
        status = raw.store(_store_command(ds.SOPInstanceUID, sop_class=request_class), encode(ds, True, True),
                           split_command=split_command)
        assert raw.assoc.is_established  # answered, not aborted
    finally:
        raw.close()
    assert status == scp_mod.SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert scp.stored == 0
    with sf() as s:
        (rec,) = s.scalars(select(QuarantineRecord)).all()
        assert s.scalar(select(Instance.id)) is None
    assert rec.status_code == 0x0122
    assert f"SOP Class {request_class} on a presentation context negotiated for {context}" in rec.reason
    assert _echo_ok(port)


@FAST_PATH_ONLY
def test_overlong_sop_instance_uid_is_invalid_uid_not_an_abort(start_node, port, shared_ct):
    """A 65-character UID made pynetdicom abort the association; on the DUL-thread path it is
    0xC001 now, and the response leaves the UID out so that the peer can decode it."""
    scp, sf, _ = start_node()
    ds = _ct_slice(shared_ct)
    ds.SOPInstanceUID = "1.2." + "3" * 61
    raw = RawStore(port)
    try:
        status = raw.store(_store_command(ds.SOPInstanceUID), encode(ds, True, True))
        assert raw.assoc.is_established
    finally:
        raw.close()
    assert status == scp_mod.INVALID_UID
    with sf() as s:
        (rec,) = s.scalars(select(QuarantineRecord)).all()
    assert "invalid SOP Instance UID" in rec.reason
    assert scp.stored == 0 and _echo_ok(port)


def test_overlong_uid_in_a_split_command_set_aborts_and_the_node_keeps_serving(start_node, port, shared_ct):
    """pynetdicom's own path (a command set over two PDUs) cannot decode such a command: it aborts
    the association (documented); the node frees it and keeps serving."""
    scp, _, _ = start_node()
    ds = _ct_slice(shared_ct)
    ds.SOPInstanceUID = "1.2." + "3" * 61
    raw = RawStore(port)
    try:
        assert raw.store(_store_command(ds.SOPInstanceUID), encode(ds, True, True), split_command=True,
                         wait_s=3) is None
    finally:
        raw.close()
    assert _no_server_associations(scp)
    assert scp.stored == 0 and _echo_ok(port)


# ---- 5. full disk, IPv4-mapped peers --------------------------------------------------------

@pytest.mark.parametrize("code,expected", [(errno.ENOSPC, 0xA700), (errno.EDQUOT, 0xA700), (errno.EACCES, 0xC004)])
def test_full_disk_while_spooling_is_out_of_resources(start_node, port, shared_ct, monkeypatch, code, expected):
    scp, sf, _ = start_node()

    def failing_write(relpath, data, sync_dir=True):
        raise OSError(code, __import__("os").strerror(code))
    monkeypatch.setattr(scp.spool, "write", failing_write)
    ds = _ct_slice(shared_ct)
    assoc = _associate(port)
    try:
        assert int(assoc.send_c_store(ds).Status) == expected
    finally:
        assoc.release()
    with sf() as s:
        assert s.scalar(select(Instance.id).where(Instance.sop_instance_uid == ds.SOPInstanceUID)) is None
    assert scp.stored == 0 and scp.refused == 1


def test_ipv4_peer_of_a_dual_stack_listener_matches_ipv4_allowed_ips(start_node, port):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    scp, _, _ = start_node(node={"host": "::", "allowed_ips": ["127.0.0.0/8"]})
    assoc = _associate(port, Verification)  # to 127.0.0.1: the node sees ::ffff:127.0.0.1
    try:
        assert assoc.is_established, "an IPv4 peer on '::' was refused although 127.0.0.0/8 is allowed"
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        if assoc.is_established:
            assoc.release()
    assert scp.association_policy("PYSCU", "::ffff:127.0.0.1") is None
    assert scp.association_policy("PYSCU", "::ffff:10.1.2.3") == REJECT_IP
    assert scp.association_policy("PYSCU", "::1") == REJECT_IP
    assert scp.association_policy("PYSCU", "not an address") == REJECT_IP


def test_refusal_reasons_from_exceptions_never_quote_a_value():
    """A conversion error quotes the offending text, which may be a patient's name or ID sent
    under a numeric VR: reasons (logged and written next to the quarantine copy) redact it."""
    reason = error_reason(ValueError("invalid literal for int() with base 10: 'SMITH^JOHN'"))
    assert reason == "ValueError: invalid literal for int() with base 10: '<redacted>'"


def test_a_failing_association_check_rejects_transiently(start_node, port, monkeypatch):
    """A policy check that raises (the spool's file system gone) rejects the association (transient,
    local limit exceeded) instead of accepting it, and the node keeps serving."""
    scp, _, _ = start_node()
    free_disk_mb = scp.spool.free_disk_mb

    def broken() -> float:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(scp.spool, "free_disk_mb", broken)
    assoc = _associate(port, Verification)
    assert assoc.is_rejected
    p = assoc.acceptor.primitive
    assert (p.result, p.result_source, p.diagnostic) == (2, 3, 2)
    assert _no_server_associations(scp)
    monkeypatch.setattr(scp.spool, "free_disk_mb", free_disk_mb)
    assert _echo_ok(port)
