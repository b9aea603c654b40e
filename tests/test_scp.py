"""Storage SCP on a real socket: DCMTK storescu/echoscu and pynetdicom as peers.

Every test that starts a node (``start_node``; also those of test_scp_hardening.py, which imports
these fixtures) runs twice: on the fast path ("fast": ``node.fast_path = true``, qcnode's reactors
and direct C-STORE) and on pynetdicom's own ("plain"). Tests of what only the fast path does are
marked ``FAST_PATH_ONLY``.
"""
from __future__ import annotations

import stat
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from sqlalchemy import func, select, update

from daemon_helpers import copy_series, echoscu, storescu, write_config
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory, upgrade
from qcnode.db.models import Instance, QuarantineRecord, Series
from qcnode.ingest.scp import StorageSCP
from qcnode.ingest.spool import Spool


@pytest.fixture(params=["fast", "plain"])
def scp_path(request) -> str:
    """The node's receive path: "fast" (node.fast_path = true) or "plain" (pynetdicom's own)."""
    return request.param


FAST_PATH_ONLY = pytest.mark.parametrize("scp_path", ["fast"])  # what pynetdicom's own path does not do


@pytest.fixture
def start_node(tmp_path, port, scp_path):
    """start_node(**node_or_storage_overrides) -> (scp, session_factory, cfg) on the receive path
    ``scp_path``; stopped afterwards."""
    started = []

    def start(node: dict | None = None, storage: dict | None = None):
        node = {"fast_path": scp_path == "fast", **(node or {})}
        cfg = load_config(write_config(tmp_path, port, extra={"node": node, "storage": storage or {}}))
        upgrade(cfg.database_url)
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)
        scp = StorageSCP(cfg, sf, Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir)))
        assert scp.fast_path == (scp_path == "fast")
        scp.start()
        started.append((scp, engine))
        return scp, sf, cfg
    yield start
    for scp, engine in started:
        scp.stop(grace_seconds=2)
        engine.dispose()


def _send(port: int, ds_or_path, calling="PYSCU", contexts=(CTImageStorage,), syntax=None) -> int:
    ae = AE(ae_title=calling)
    for cx in contexts:
        ae.add_requested_context(cx, *([syntax] if syntax else []))
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds_or_path)
        return int(status.Status)
    finally:
        assoc.release()


def test_echo_and_store_with_storescu(start_node, port, shared_ct, tmp_path):
    scp, sf, cfg = start_node()
    assert echoscu(port).returncode == 0
    files = copy_series(shared_ct / "philips_head_phantom", tmp_path / "a", n=3)
    files += copy_series(shared_ct / "philips_head_phantom", tmp_path / "b", pattern="localizer*")
    res = storescu(port, files)
    assert res.returncode == 0, res.stderr
    with sf() as s:
        rows = s.scalars(select(Instance)).all()
        assert len(rows) == 4
        by_uid = {r.sop_instance_uid: r for r in rows}
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            row = by_uid[ds.SOPInstanceUID]
            spooled = scp.spool.abspath(row.spool_path)
            assert spooled.read_bytes()[128:132] == b"DICM"
            assert stat.S_IMODE(spooled.stat().st_mode) == 0o600
            assert pydicom.dcmread(spooled).SOPInstanceUID == ds.SOPInstanceUID
            assert row.calling_ae == "STORESCU" and row.source_ip == "127.0.0.1"
        localizer = [r for r in rows if not r.scorable]
        assert len(localizer) == 1 and "localizer" in localizer[0].skip_reason
        assert all(r.ctdivol_mgy is not None for r in rows if r.scorable)
        series = s.scalars(select(Series)).all()
        assert sorted(x.instance_count for x in series) == [1, 3]
        assert all(x.status == "receiving" for x in series)
        # an exact resend changes nothing (the series is not reopened)
        s.execute(update(Series).values(status="scored"))
        s.commit()
    assert storescu(port, files[:1]).returncode == 0
    with sf() as s:
        assert s.scalar(select(func.count(Instance.id))) == 4
        assert {x.status for x in s.scalars(select(Series))} == {"scored"}
    # a changed instance with the same SOP Instance UID replaces the file and reopens the series
    ds = pydicom.dcmread(files[0])
    ds.InstanceNumber = 999
    assert _send(port, ds) == 0
    with sf() as s:
        assert s.scalar(select(func.count(Instance.id))) == 4
        assert s.scalar(select(Instance.instance_number).where(Instance.sop_instance_uid == ds.SOPInstanceUID)) == 999
        assert "receiving" in {x.status for x in s.scalars(select(Series))}


def test_unknown_calling_ae_and_ip_are_rejected(start_node, port, shared_ct, tmp_path):
    start_node(node={"allowed_ae_titles": ["GOODSCU"]})
    assert echoscu(port, aet="GOODSCU").returncode == 0
    bad = echoscu(port, aet="BADSCU")
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in (bad.stdout + bad.stderr)


def test_source_ip_not_allowed(start_node, port):
    start_node(node={"allowed_ips": ["10.0.0.0/8"]})
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert assoc.is_rejected and (assoc.acceptor.primitive.result, assoc.acceptor.primitive.result_source) == (1, 1)


def test_low_disk_refuses_associations_transiently(start_node, port):
    start_node(storage={"min_free_disk_mb": 10**12})
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert assoc.is_rejected
    p = assoc.acceptor.primitive
    assert (p.result, p.result_source, p.diagnostic) == (2, 3, 2)  # transient, local limit exceeded


def _undecodable_file(path: Path) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    buf = DicomBytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    path.write_bytes(buf.getvalue() + body.getvalue() + b"\x10\x00\x10\x00ZZ\x04\x00abcd")
    return path


def _quarantined(sf) -> list[QuarantineRecord]:
    with sf() as s:
        return list(s.scalars(select(QuarantineRecord)))


def test_corrupt_and_non_ct_get_failures_and_quarantine(start_node, port, shared_ct, tmp_path):
    scp, sf, cfg = start_node()
    # truncated pixel data, sent by DCMTK
    f = copy_series(shared_ct / "ge_head", tmp_path / "c", n=1)[0]
    ds = pydicom.dcmread(f)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(f, enforce_file_format=True)
    res = storescu(port, [f], "STORESCU", "-v")
    assert "Store Response (Error: CannotUnderstand)" in res.stdout + res.stderr, res.stdout + res.stderr
    # non-CT object (MR)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    assert _send(port, mr, contexts=(MRImageStorage,)) == 0x0122
    # undecodable: valid file meta and SOP UIDs, then an element with an unknown VR
    from pynetdicom import _config
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        assert (_send(port, _undecodable_file(tmp_path / "garbage.dcm"), syntax="1.2.840.10008.1.2.1") & 0xF000) == 0xC000
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    # CT without pixel data
    nopix = pydicom.dcmread(copy_series(shared_ct / "ge_head", tmp_path / "e", n=1)[0])
    del nopix.PixelData
    assert _send(port, nopix) == 0xC002
    # UIDs crafted for path traversal never reach the file system
    evil = pydicom.dcmread(copy_series(shared_ct / "ge_head", tmp_path / "f", n=1)[0])
    evil.StudyInstanceUID = "../../../../tmp/qcnode-evil"
    assert _send(port, evil) == 0xC001
    assert not Path("/tmp/qcnode-evil").exists()
    records = _quarantined(sf)
    assert sorted(r.status_code for r in records) == sorted([0xC003, 0x0122, records[2].status_code, 0xC002, 0xC001])
    for r in records:
        q = scp.spool.quarantine_dir / r.path
        assert q.exists() and q.with_suffix(".reason.json").exists()
    with sf() as s:
        assert s.scalar(select(func.count(Instance.id))) == 0
    # the SCP keeps working
    assert storescu(port, copy_series(shared_ct / "ge_head", tmp_path / "g", n=1)).returncode == 0


def test_part10_header_matches_pynetdicoms_encoder():
    """The SCP's own File Meta encoder writes exactly what pynetdicom's encoded_dataset() writes."""
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from qcnode.ingest.scp import part10_header
    for sop_class, sop_uid, syntax in [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2"),
                                       ("1.2.840.10008.5.1.4.1.1.2.1", generate_uid(), "1.2.840.10008.1.2.1"),
                                       ("1.2", "1.23", "1.2.840.10008.1.2.4.50")]:
        expected = b"\x00" * 128 + b"DICM" + encode_file_meta(
            create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=syntax))
        assert part10_header(sop_class, sop_uid, syntax) == expected
    assert part10_header("1.2.x", "1.2", "1.2.840.10008.1.2") is None  # not a UID: pynetdicom's encoder is used


@FAST_PATH_ONLY
def test_associations_wait_for_events_instead_of_polling(start_node, port):
    """The SCP's association threads block until something happens: request/response round trips
    do not wait for the idle timeout, open idle associations hardly wake up, release works."""
    import time

    from qcnode.net.reactors import IDLE_WAIT_S, EventDrivenAssociation, EventDrivenDUL
    scp, _, _ = start_node()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert assoc.is_established
    (server_assoc,) = scp.ae.active_associations
    assert isinstance(server_assoc, EventDrivenAssociation) and isinstance(server_assoc.dul, EventDrivenDUL)
    before = (server_assoc.idle_timeouts, server_assoc.dul.idle_timeouts)
    for _ in range(40):  # a lost wake-up would cost IDLE_WAIT_S on one side of each round trip
        assert int(assoc.send_c_echo().Status) == 0
    assert server_assoc.idle_timeouts - before[0] < 10
    assert server_assoc.dul.idle_timeouts - before[1] < 10
    before = (server_assoc.idle_timeouts, server_assoc.dul.idle_timeouts)
    time.sleep(1.0)  # idle: pynetdicom's reactors would have polled ~1000 times each
    woke = (server_assoc.idle_timeouts - before[0], server_assoc.dul.idle_timeouts - before[1])
    assert all(n <= 2 / IDLE_WAIT_S for n in woke), woke
    assoc.release()
    assert assoc.is_released
    _wait_no_associations(scp)


def test_network_timeout_still_aborts_a_silent_association(start_node, port):
    """pynetdicom's network timeout keeps working with the event-driven reactors."""
    import time
    scp, _, _ = start_node(node={"network_timeout": 0.5})
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert assoc.is_established
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established and (assoc.is_aborted or assoc.is_released)
    _wait_no_associations(scp)


def _wait_no_associations(scp: StorageSCP, timeout: float = 5.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while scp.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not scp.ae.active_associations


def test_pdv_items_are_cut_from_the_p_data_tf_body():
    import struct

    from qcnode.net.pdu import InvalidPDU, split_pdv_items

    def item(context_id: int, data: bytes) -> bytes:
        return struct.pack(">LB", len(data) + 1, context_id) + data
    body = item(1, b"\x03command") + item(3, b"\x02" + bytes(range(256)) * 10)
    items = split_pdv_items(memoryview(body))
    assert [(cid, bytes(data)) for cid, data in items] == [(1, b"\x03command"), (3, b"\x02" + bytes(range(256)) * 10)]
    for bad in (b"", item(1, b"\x03x")[:-1], struct.pack(">LB", 1, 1),  # empty, truncated, no control header
                item(1, b"\x03x") + b"\x00\x00"):                        # trailing bytes
        with pytest.raises(InvalidPDU):
            split_pdv_items(memoryview(bad))


def test_malformed_p_data_tf_aborts_the_association_and_the_node_keeps_serving(start_node, port):
    """A P-DATA-TF whose PDV item overruns the PDU is an invalid PDU (A-ABORT), not a crash."""
    import struct
    import time
    scp, _, _ = start_node()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert assoc.is_established
    body = struct.pack(">LB", 500, 1) + b"\x03" + b"\x00" * 20  # says 500 bytes, holds 22
    assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, len(body)) + body)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    _wait_no_associations(scp)
    again = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert again.is_established and int(again.send_c_echo().Status) == 0
    again.release()
