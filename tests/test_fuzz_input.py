"""Bad input: hypothesis mutates a small real CT slice (pydicom's CT_small) at the byte and the
element level and pushes each mutant through the SCP's receive path (a real association, many
C-STOREs per association, the raw mutated bytes on the wire) and through the scoring path of
`qcnode score` / the worker (read -> HU slices -> model). Nothing may crash: every C-STORE gets a
known status, every failure a quarantine record, every success a stored instance. Plus aborted
associations, truncated PDUs, a 4096x4096 slice, path-traversal UIDs, non-CT SOP classes, and (on both
C-STORE paths) PixelData lengths that do not fit the image, contradictory or absurd pixel metadata and
UIDs with leading zeros, which are refused, and unusable pixel spacings, which are stored, never scored;
plain TCP connections that never associate (health checks), which must not hold association slots."""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (CTImageStorage, EnhancedCTImageStorage, MRImageStorage,
                                  SecondaryCaptureImageStorage)
from sqlalchemy import func, select

from conftest import free_port
from daemon_helpers import checkpoint_for_tests, serve_process, stop_process, wait_for, wait_port, write_config
from qcnode.db.models import Instance, QuarantineRecord
from qcnode.ingest import scp as scp_mod
from reliability_helpers import RssSampler, start_scp
from test_scp_hardening import RawStore, _store_command

FUZZ_EXAMPLES = int(os.environ.get("QCNODE_FUZZ_EXAMPLES", "1000"))
KNOWN_STATUSES = {scp_mod.SUCCESS, scp_mod.DATASET_MISMATCH, scp_mod.CANNOT_UNDERSTAND, scp_mod.INVALID_UID,
                  scp_mod.NO_PIXEL_DATA, scp_mod.INCONSISTENT, scp_mod.CANNOT_STORE,
                  scp_mod.SOP_CLASS_NOT_SUPPORTED}
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))

# element-level mutations: keyword -> values hypothesis may put there
_TEXT = st.text(min_size=0, max_size=40)
ELEMENT_VALUES = {
    "Rows": st.integers(0, 65535), "Columns": st.integers(0, 65535), "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 64), "HighBit": st.integers(0, 64), "PixelRepresentation": st.integers(0, 3),
    "SamplesPerPixel": st.integers(0, 4), "NumberOfFrames": st.sampled_from(["0", "1", "2", "-1", "x"]),
    "RescaleSlope": st.sampled_from(["0", "-1", "1e308", "nan", "inf", "abc", ""]),
    "RescaleIntercept": st.sampled_from(["-1024", "1e308", "nan", "x", ""]),
    "PixelSpacing": st.sampled_from([["0", "0"], ["-1", "1"], ["nan", "1"], ["1"], ["a", "b"]]),
    "ImageOrientationPatient": st.sampled_from([["0"] * 6, ["1", "0", "0", "0", "0", "1"], ["x"], ["nan"] * 6]),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "RGB", "PALETTE COLOR", "", "YBR_FULL"]),
    "Modality": st.sampled_from(["CT", "MR", "SR", "", "ct", "OT"]),
    "SOPClassUID": st.sampled_from([str(CTImageStorage), str(MRImageStorage), "1.2.3", "", "../x"]),
    "StudyInstanceUID": st.sampled_from(["../../etc", "1.2.3/../4", "", "1." * 40, "1.2.a"]),
    "SeriesInstanceUID": st.sampled_from(["..", "/tmp/x", "1.2\x00.3", "9" * 70]),
    "PatientName": _TEXT, "ImageType": st.sampled_from([["LOCALIZER"], ["DERIVED", "SECONDARY"], []]),
    "TransferSyntaxUID": st.sampled_from(["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.3.4"]),
}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzznode")
    n = start_scp(tmp, free_port(), node={"network_timeout": 10.0})
    yield n
    n.stop()


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    from qcnode.model.scorer import Scorer
    return Scorer.load(str(checkpoint_for_tests(tmp_path_factory.mktemp("model"))), "cpu", 1)


class Sender:
    """One association reused for many C-STOREs of raw files (re-opened if the peer aborted it)."""

    def __init__(self, port: int):
        self.port = port
        self.ae = AE(ae_title="FUZZER")
        for cx in (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(cx, ExplicitVRLittleEndian)
        self.assoc = None
        self.associations = 0

    def send(self, path: Path) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="QCNODE")
            assert self.assoc.is_established
            self.associations += 1
        status = self.assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def _file_with_body(meta_uid: str, sop_class: str, body: bytes, path: Path) -> Path:
    """A DICOM file whose file meta is intact (so the C-STORE request is well formed) and whose
    dataset bytes are ``body`` exactly (sent on the wire without decoding)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = meta_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    from io import BytesIO
    from pydicom.filewriter import write_file_meta_info
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(buf.getvalue() + body)
    return path


def _encode_body(ds: pydicom.Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _fresh_base() -> pydicom.Dataset:
    ds = pydicom.dcmread(CT_SMALL)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    return ds


byte_mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=24)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=64))),
)
element_mutation = st.one_of(
    *[st.tuples(st.just("set"), st.tuples(st.just(k), v)) for k, v in ELEMENT_VALUES.items()],
    st.tuples(st.just("delete"), st.sampled_from(["PixelData", "Rows", "SOPInstanceUID", "StudyInstanceUID",
                                                  "BitsAllocated", "PixelSpacing", "RescaleSlope", "Modality",
                                                  "ImageOrientationPatient", "SOPClassUID"])),
    st.tuples(st.just("cut_pixels"), st.integers(0, 32767)),
)
mutation = st.lists(st.one_of(byte_mutation, element_mutation), min_size=1, max_size=4)


def _mutant(muts: list) -> tuple[str, bytes]:
    """Apply element mutations to a fresh CT_small, encode it, then apply byte mutations."""
    ds = _fresh_base()
    sop_uid = str(ds.SOPInstanceUID)
    byte_muts = []
    for kind, arg in muts:
        if kind == "set":
            key, value = arg
            if key == "TransferSyntaxUID":
                continue  # the association's syntax is what counts; covered by byte mutations
            try:
                setattr(ds, key, value)
            except Exception:  # noqa: BLE001 - pydicom refuses some values; skip that mutation
                pass
        elif kind == "delete":
            if arg in ds:
                delattr(ds, arg)
        elif kind == "cut_pixels":
            if "PixelData" in ds:
                ds.PixelData = ds.PixelData[: arg & ~1]
        else:
            byte_muts.append((kind, arg))
    try:
        body = _encode_body(ds)
    except Exception:  # noqa: BLE001 - unencodable value: send the unmutated bytes mutated below
        body = _encode_body(_fresh_base())
    data = bytearray(body)
    for kind, arg in byte_muts:
        if not data:
            break
        if kind == "flip":
            for pos, val in arg:
                data[pos % len(data)] = val
        elif kind == "truncate":
            del data[arg % len(data):]
        elif kind == "insert":
            pos, blob = arg
            data[pos % (len(data) + 1):pos % (len(data) + 1)] = blob
    return sop_uid, bytes(data)


def _score_path(path: Path, scorer) -> str:
    """`qcnode score`'s code path (``score_paths``) on one file: 'scored' or 'skipped'. A skip must
    carry a clear reason (SkipSlice / unreadable), never an unexpected exception."""
    from qcnode.scoring.files import score_paths
    doc = score_paths(scorer, [path], batch_size=4, progress=lambda *_: None)
    slices = [r for e in doc["series"] for r in e["slices"]]
    skipped = [r for e in doc["series"] for r in e["skipped"]]
    assert len(slices) + len(skipped) >= 1
    for r in skipped:
        assert not r["reason"].startswith("error:"), r["reason"]
    for r in slices:
        assert np.isfinite(r["score"]) and 0.0 <= r["score"] <= 4.0
    return "scored" if slices and not skipped else "skipped"


def test_fuzzed_datasets_through_receive_and_score_paths(node, scorer, tmp_path_factory):
    old_chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    sender = Sender(node.scp.port)
    work = tmp_path_factory.mktemp("mutants")
    outcomes: list[tuple[str, int | None]] = []
    scored = {"scored": 0, "skipped": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(muts=mutation)
    def one(muts):
        sop_uid, body = _mutant(muts)
        path = _file_with_body(sop_uid, str(CTImageStorage), body, work / "m.dcm")
        status = sender.send(path)
        outcomes.append((sop_uid, status))
        assert status in KNOWN_STATUSES, f"unexpected status {status!r} for {muts!r}"
        assert status != scp_mod.CANNOT_STORE, f"internal error (0xC004) on bad input {muts!r}"
        scored[_score_path(path, scorer)] += 1

    t0 = time.monotonic()
    try:
        one()
    finally:
        sender.close()
        _config.STORE_SEND_CHUNKED_DATASET = old_chunked
    elapsed = time.monotonic() - t0
    ok = [u for u, s in outcomes if s == scp_mod.SUCCESS]
    failed = [u for u, s in outcomes if s != scp_mod.SUCCESS]
    with node.sf() as s:
        stored = set(s.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(ok))))
        quarantined = set(s.scalars(select(QuarantineRecord.sop_instance_uid)
                                    .where(QuarantineRecord.sop_instance_uid.in_(failed))))
    assert stored == set(ok)  # every Success is a stored instance
    assert quarantined == set(failed)  # every failure has a quarantine record
    qdir = node.cfg.path(node.cfg.storage.quarantine_dir)
    assert len(list(qdir.glob("*/*.reason.json"))) >= len(failed)
    from collections import Counter
    print(f"\nfuzz: {len(outcomes)} mutated datasets over {sender.associations} association(s) in {elapsed:.1f}s; "
          f"statuses {dict(Counter(f'0x{s:04X}' for _, s in outcomes))}; score path {scored}")
    assert len(outcomes) >= min(FUZZ_EXAMPLES, 1000) * 0.9  # hypothesis really ran ~all examples
    assert node.scp.server is not None and echo_ok(node.scp.port)


def echo_ok(port: int) -> bool:
    ae = AE(ae_title="ECHO")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    try:
        return assoc.is_established and int(assoc.send_c_echo().Status) == 0
    finally:
        if assoc.is_established:
            assoc.release()


# ---- targeted bad input -----------------------------------------------------------------------------

def _send_ds(port: int, ds: pydicom.Dataset, context=CTImageStorage) -> int:
    ae = AE(ae_title="BADINPUT")
    ae.add_requested_context(context, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@pytest.mark.parametrize("field,value", [
    ("StudyInstanceUID", "../../../../tmp/evil"), ("SeriesInstanceUID", "1.2.3/../../.."),
    ("StudyInstanceUID", "/etc/passwd"), ("SeriesInstanceUID", "..")])
def test_path_traversal_uids_are_refused(node, field, value):
    ds = _fresh_base()
    setattr(ds, field, value)
    before = set(Path("/tmp").glob("evil*"))
    assert _send_ds(node.scp.port, ds) == scp_mod.INVALID_UID
    with node.sf() as s:
        assert s.scalar(select(func.count(QuarantineRecord.id))
                        .where(QuarantineRecord.sop_instance_uid == str(ds.SOPInstanceUID))) == 1
        assert s.scalar(select(Instance.id).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))) is None
    assert set(Path("/tmp").glob("evil*")) == before
    spool = node.cfg.path(node.cfg.storage.spool_dir).resolve()
    for p in spool.rglob("*"):  # nothing was written outside the UID-named tree
        assert ".." not in p.relative_to(spool).parts


def test_sop_instance_uid_traversal_in_request(node, tmp_path):
    """A crafted SOP Instance UID in the C-STORE request itself (raw bytes: pynetdicom would refuse)."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ds = _fresh_base()
        ds.SOPInstanceUID = "../../x"
        path = _file_with_body("../../x", str(CTImageStorage), _encode_body(ds), tmp_path / "t.dcm")
        sender = Sender(node.scp.port)
        try:
            status = sender.send(path)
        except (ValueError, AttributeError):
            pytest.skip("pynetdicom refuses to send an invalid Affected SOP Instance UID")
        finally:
            sender.close()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert status in (scp_mod.INVALID_UID, scp_mod.DATASET_MISMATCH)
    assert not list(node.cfg.path(node.cfg.storage.spool_dir).rglob("x.dcm"))


def test_non_ct_sop_classes_are_refused_with_quarantine(node):
    ds = _fresh_base()
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    assert _send_ds(node.scp.port, ds, MRImageStorage) == scp_mod.SOP_CLASS_NOT_SUPPORTED
    ds2 = _fresh_base()
    ds2.SOPClassUID = SecondaryCaptureImageStorage
    assert _send_ds(node.scp.port, ds2, SecondaryCaptureImageStorage) == scp_mod.SOP_CLASS_NOT_SUPPORTED
    with node.sf() as s:
        got = set(s.scalars(select(QuarantineRecord.sop_instance_uid).where(
            QuarantineRecord.sop_instance_uid.in_([str(ds.SOPInstanceUID), str(ds2.SOPInstanceUID)]))))
    assert got == {str(ds.SOPInstanceUID), str(ds2.SOPInstanceUID)}


def test_aborted_associations_and_truncated_pdus(node):
    port = node.scp.port
    # 1. an association aborted by the sender in the middle of its work
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert assoc.is_established
    assoc.abort()
    # 2. raw sockets: garbage, a truncated A-ASSOCIATE-RQ, a P-DATA-TF announcing more than it sends
    rq = _associate_rq_pdu("RAWSCU", "QCNODE")
    for payload in (b"\x00" * 3, b"GET / HTTP/1.1\r\n\r\n", rq[: len(rq) // 2],
                    struct.pack(">BBI", 0x01, 0, 10_000_000) + b"\x00" * 50):
        _raw_send(port, payload)
    # 3. an accepted association, then a P-DATA-TF truncated mid-PDU and the connection dropped
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(rq)
        reply = sock.recv(6)
        assert reply[:1] == b"\x02"  # A-ASSOCIATE-AC
        pdv = b"\x01\x03" + b"\x00" * 40  # context 1, command fragment that never completes
        sock.sendall(struct.pack(">BBI", 0x04, 0, 4000) + struct.pack(">I", 4000) + pdv)
    time.sleep(0.5)
    # the node still serves: a proper C-STORE afterwards succeeds
    assert _send_ds(port, _fresh_base()) == scp_mod.SUCCESS
    assert echo_ok(port)


def _raw_send(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.settimeout(2)
        try:
            sock.recv(1024)
        except (socket.timeout, ConnectionError):
            pass


def _associate_rq_pdu(calling: str, called: str) -> bytes:
    """A minimal A-ASSOCIATE-RQ proposing CT Image Storage / Explicit VR Little Endian."""
    def item(t: int, data: bytes) -> bytes:
        return struct.pack(">BBH", t, 0, len(data)) + data
    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = item(0x20, b"\x01\x00\x00\x00" + item(0x30, str(CTImageStorage).encode())
              + item(0x40, str(ExplicitVRLittleEndian).encode()))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.3811.2"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\x00" * 32
            + app + pc + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


@pytest.mark.slow
def test_4096_slice_is_scored_within_memory(node, scorer, tmp_path):
    import psutil
    ds = _fresh_base()
    ds.Rows = ds.Columns = 4096
    rng = np.random.default_rng(0)
    ds.PixelData = (rng.normal(0, 30, (4096, 4096)) + 1000).astype(np.int16).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    assert _send_ds(node.scp.port, ds) == scp_mod.SUCCESS
    with node.sf() as s:
        rel = s.scalar(select(Instance.spool_path).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID)))
    path = node.scp.spool.abspath(rel)
    before = psutil.Process().memory_info().rss / 2**20
    with RssSampler(os.getpid(), interval=0.05) as rss:
        outcome = _score_path(path, scorer)
    grown_mb = rss.peak_mb - before
    print(f"\n4096x4096 slice: {outcome}; peak RSS {rss.peak_mb:.0f} MiB (+{grown_mb:.0f} MiB while scoring)")
    assert outcome == "scored"
    assert grown_mb < 2048


BAD_HEADER_FIELDS = [("SpecificCharacterSet", "ISO IR 100"), ("SpecificCharacterSet", "ISO_IR 999"),
                     ("PatientSex", "X"), ("PatientSex", "m"), ("StudyDate", "2024-13-45")]


def test_bad_header_fields_still_get_an_sr(scorer, tmp_path, shared_ct):
    """A misspelled or unknown SpecificCharacterSet (pydicom reads both), or another value the SR
    builder used to refuse, is received by storescu, scored, and gets its SR (written in UTF-8)."""
    from daemon_helpers import storescu
    from qcnode.db.models import Job, Series, SeriesResult
    from qcnode.tracking.series import mark_stable_series
    from qcnode.scoring.worker import Worker
    from qcnode.service.publish import ReportPublisher
    from reliability_helpers import make_slices

    node = start_scp(tmp_path, free_port())
    try:
        series_uids = {}
        for i, (keyword, value) in enumerate(BAD_HEADER_FIELDS):
            files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:2], tmp_path / f"in{i}", 2,
                                patient=("Müller^Jürgen", "ID1"))
            for f in files:
                ds = pydicom.dcmread(f)
                setattr(ds, keyword, value)
                ds.save_as(f)
            series_uids[(keyword, value)] = str(ds.SeriesInstanceUID)
            res = storescu(node.scp.port, files)
            assert res.returncode == 0, res.stderr
        mark_stable_series(node.sf, 0.0)
        worker = Worker(node.cfg, node.sf, node.scp.spool, ReportPublisher(node.cfg), scorer=scorer)
        with node.sf() as s:
            jobs = list(s.scalars(select(Job.id)))
        assert len(jobs) == len(BAD_HEADER_FIELDS)
        for job_id in jobs:
            worker.process(job_id)
        with node.sf() as s:
            results = {s.get(Series, r.series_id).series_instance_uid: r for r in s.scalars(select(SeriesResult))}
        for field, uid in series_uids.items():
            assert uid in results, f"no SR for a series with {field}"
            sr = pydicom.dcmread(node.scp.spool.abspath(results[uid].sr_path))
            assert sr.SpecificCharacterSet == "ISO_IR 192", field
            assert str(sr.PatientName) == "Müller^Jürgen", field
    finally:
        node.stop()


def test_sop_instance_moved_to_another_series_keeps_counts_consistent(tmp_path, shared_ct):
    """The same SOP Instance UID sent again in another series moves there; the series it left is
    recounted (no phantom instance_count) and reopened, so it is scored again without it."""
    from daemon_helpers import storescu
    from qcnode.db.models import Series
    from reliability_helpers import make_slices

    node = start_scp(tmp_path, free_port())
    try:
        first = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:2], tmp_path / "a", 2)
        assert storescu(node.scp.port, first).returncode == 0
        ds = pydicom.dcmread(first[0])
        old_series = str(ds.SeriesInstanceUID)
        ds.SeriesInstanceUID = generate_uid()
        moved = tmp_path / "moved.dcm"
        ds.save_as(moved)
        with node.sf() as s:
            s.execute(Series.__table__.update().values(status="scored"))
            s.commit()
        assert storescu(node.scp.port, [moved]).returncode == 0
        with node.sf() as s:
            counts = {x.series_instance_uid: (x.instance_count, x.status) for x in s.scalars(select(Series))}
            rows = dict(s.execute(select(Series.series_instance_uid, func.count(Instance.id))
                                  .join(Instance, Instance.series_id == Series.id)
                                  .group_by(Series.series_instance_uid)).all())
        assert counts == {old_series: (1, "receiving"), str(ds.SeriesInstanceUID): (1, "receiving")}
        assert rows == {old_series: 1, str(ds.SeriesInstanceUID): 1}
    finally:
        node.stop()


# ---- inconsistent pixel data and metadata, on both C-STORE paths -------------------------------------

def _pixel_length_claim(ds: pydicom.Dataset, claimed: int) -> bytes:
    """``ds`` encoded (implicit VR little endian) with its PixelData length field set to ``claimed``."""
    data = encode(ds, True, True)
    i = data.rindex(b"\xe0\x7f\x10\x00")
    return data[:i + 4] + struct.pack("<L", claimed) + data[i + 8:]


def _with(**values) -> pydicom.Dataset:
    ds = _fresh_base()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def _rgb_one_sample() -> pydicom.Dataset:
    return _with(PhotometricInterpretation="RGB")


def _monochrome_three_samples() -> pydicom.Dataset:
    ds = _with(SamplesPerPixel=3, PlanarConfiguration=0)
    ds.PixelData = ds.PixelData * 3  # the length fits: only the photometric interpretation contradicts
    return ds


def _enhanced_ct_without_functional_groups() -> pydicom.Dataset:
    return _with(SOPClassUID=EnhancedCTImageStorage, NumberOfFrames=1)


def _odd_8_bit_slice() -> pydicom.Dataset:
    """127 x 127 8-bit pixels: an odd length, padded with one byte on the wire (valid)."""
    ds = _with(Rows=127, Columns=127, BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0)
    ds.PixelData = bytes(range(127)) * 127
    return ds


def _claiming_0xfffffff0(ds: pydicom.Dataset) -> bytes:
    return _pixel_length_claim(ds, 0xFFFFFFF0)


def _implicit_le(ds: pydicom.Dataset) -> bytes:
    return encode(ds, True, True)


# case: (data set, its encoding on the wire, context SOP class, expected status, refusal reason part)
_PIXEL_CASES = {
    "pixel-length-claims-0xFFFFFFF0": (_fresh_base, _claiming_0xfffffff0, CTImageStorage, scp_mod.INCONSISTENT,
                                       "pixel data element declares 4294967280 bytes"),
    "pixel-data-too-long": (lambda: _with(PixelData=_fresh_base().PixelData + b"\x00" * 100), _implicit_le,
                            CTImageStorage, scp_mod.INCONSISTENT, "pixel data has 32868 bytes"),
    "pixel-data-too-short": (lambda: _with(PixelData=_fresh_base().PixelData[:1000]), _implicit_le,
                             CTImageStorage, scp_mod.INCONSISTENT, "pixel data has 1000 bytes"),
    "odd-length-with-pad-byte": (_odd_8_bit_slice, _implicit_le, CTImageStorage, scp_mod.SUCCESS, ""),
    "rescale-slope-nan-intercept-inf": (lambda: _with(RescaleSlope="nan", RescaleIntercept="inf"), _implicit_le,
                                        CTImageStorage, scp_mod.INCONSISTENT, "RescaleSlope"),
    "rescale-slope-1e308": (lambda: _with(RescaleSlope="1e308"), _implicit_le, CTImageStorage,
                            scp_mod.INCONSISTENT, "HU"),
    "rescale-slope-0": (lambda: _with(RescaleSlope="0"), _implicit_le, CTImageStorage, scp_mod.INCONSISTENT,
                        "RescaleSlope"),
    "rgb-with-one-sample": (_rgb_one_sample, _implicit_le, CTImageStorage, scp_mod.INCONSISTENT,
                            "PhotometricInterpretation"),
    "monochrome-with-three-samples": (_monochrome_three_samples, _implicit_le, CTImageStorage,
                                      scp_mod.INCONSISTENT, "PhotometricInterpretation"),
    "enhanced-ct-without-functional-groups": (_enhanced_ct_without_functional_groups, _implicit_le,
                                              EnhancedCTImageStorage, scp_mod.DATASET_MISMATCH,
                                              "PerFrameFunctionalGroupsSequence"),
    "leading-zero-sop-instance-uid": (lambda: _with(SOPInstanceUID="1.2.03.4"), _implicit_le, CTImageStorage,
                                      scp_mod.INVALID_UID, "'1.2.03.4'"),
    "leading-zero-study-uid": (lambda: _with(StudyInstanceUID="1.2.840.010.5"), _implicit_le, CTImageStorage,
                               scp_mod.INVALID_UID, "Study Instance UID"),
}
# cases whose file is also put through the scoring path (which must skip it)
_SCORE_PATH_CASES = {"rescale-slope-nan-intercept-inf", "rescale-slope-1e308", "rescale-slope-0",
                     "rgb-with-one-sample", "monochrome-with-three-samples", "enhanced-ct-without-functional-groups"}


def _store_on_path(node, data: bytes, sop_uid: str, sop_class: str, path: str) -> int | None:
    """One C-STORE of the encoded data set ``data`` on the DUL-thread path or on pynetdicom's (a command
    set split over two PDUs); asserts that the path named served it."""
    before = node.scp.direct_stores
    raw = RawStore(node.scp.port, sop_class)
    try:
        status = raw.store(_store_command(sop_uid, sop_class=sop_class), data,
                           split_command=path == "pynetdicom")
    finally:
        raw.close()
    assert node.scp.direct_stores - before == (1 if path == "dul-thread" else 0)
    return status


@pytest.mark.parametrize("path", ["dul-thread", "pynetdicom"])
@pytest.mark.parametrize("case", list(_PIXEL_CASES))
def test_inconsistent_pixel_data_and_metadata_are_refused_and_quarantined(node, scorer, tmp_path, case, path):
    """A PixelData length that is not Rows x Columns x bits x samples x frames (even one that claims
    0xFFFFFFF0 bytes), non-finite, zero or absurd rescale values, a photometric interpretation that
    contradicts SamplesPerPixel, an Enhanced CT image without functional groups and a UID component with
    a leading zero are refused before Success and quarantined with the reason; the scoring path skips
    such a file with a reason, never scores it."""
    make, wire, sop_class, expected, reason = _PIXEL_CASES[case]
    ds = make()
    sop_uid = str(ds.SOPInstanceUID)
    status = _store_on_path(node, wire(ds), sop_uid, str(sop_class), path)
    assert status == expected, "no response" if status is None else f"0x{status:04X}"
    with node.sf() as s:
        stored = s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_uid))
        reasons = s.scalars(select(QuarantineRecord.reason).where(QuarantineRecord.status_code == expected)
                            .where((QuarantineRecord.sop_instance_uid == sop_uid)
                                   | QuarantineRecord.reason.contains(sop_uid))).all()
    assert (stored is not None) == (expected == scp_mod.SUCCESS)
    if expected != scp_mod.SUCCESS:
        assert any(reason in r for r in reasons), reasons
    if case in _SCORE_PATH_CASES:
        file = _file_with_body(sop_uid, str(sop_class), _encode_body(ds), tmp_path / "f.dcm")
        assert _score_path(file, scorer) == "skipped"


@pytest.mark.parametrize("spacing", [["0", "0"], ["-0.5", "0.5"], ["nan", "0.5"]], ids=["zero", "negative", "nan"])
def test_unusable_pixel_spacing_is_stored_but_never_scored(node, scorer, tmp_path, spacing):
    """PixelSpacing 0, negative or not a number: the image is stored (the DICOM is readable) and
    skipped with the reason, on receipt and by the scoring path."""
    ds = _with(PixelSpacing=spacing)
    assert _send_ds(node.scp.port, ds) == scp_mod.SUCCESS
    with node.sf() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))).one()
    assert not inst.scorable and "PixelSpacing" in inst.skip_reason
    file = _file_with_body(str(ds.SOPInstanceUID), str(CTImageStorage), _encode_body(ds), tmp_path / "f.dcm")
    assert _score_path(file, scorer) == "skipped"


# ---- connections that never associate (a load balancer's health check) ------------------------------

def _connect_and_close(port: int, count: int) -> None:
    """``count`` plain TCP connections that close without sending a byte; every other one with a reset."""
    for i in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if i % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _echo_seconds(port: int, within: float = 1.0) -> float:
    """Seconds until a C-ECHO is answered with Success, trying again for ``within`` seconds (a slot
    freed a moment after the burst counts); infinite when none is."""
    t0 = time.monotonic()
    while True:
        if echo_ok(port):
            return time.monotonic() - t0
        if time.monotonic() - t0 >= within:
            return float("inf")
        time.sleep(0.05)


def test_connection_that_never_sends_an_association_request_is_dropped_quickly(tmp_path):
    """A connection that sends no A-ASSOCIATE-RQ (nothing, or part of a PDU) holds an association slot
    only until the ARTIM timer (node.artim_timeout, a few seconds), not for node.acse_timeout or until
    the peer goes; closed ones free theirs at once."""
    n = start_scp(tmp_path, free_port(), node={"max_associations": 2})
    rq = _associate_rq_pdu("STALLER", "QCNODE")
    try:
        stalled = []
        for part in (b"", b"\x01\x00\x00", rq[:len(rq) // 2]):
            sock = socket.create_connection(("127.0.0.1", n.scp.port), timeout=15)
            sock.sendall(part)
            stalled.append(sock)
        t0 = time.monotonic()
        for sock in stalled:
            with sock:
                assert sock.recv(1) == b""  # closed by the node
        assert time.monotonic() - t0 < 6
        _connect_and_close(n.scp.port, 40)
        assert _echo_seconds(n.scp.port) < 1.0
    finally:
        n.stop()


@pytest.mark.timeout(300)
def test_burst_of_1000_health_checks_leaves_echo_answered_within_a_second(tmp_path):
    """`qcnode serve` (two SCP processes on one listening socket, the default on two cores): 1000 plain
    TCP connect-and-close in a burst, then a C-ECHO is answered within 1 s (it was "Local Limit Exceeded"
    for up to node.acse_timeout)."""
    port = free_port()
    cfg = write_config(tmp_path, port, extra={"node": {"scp_processes": 2}, "worker": {"enabled": False}})
    proc = serve_process(cfg)
    try:
        wait_port(port, 120, proc)
        wait_for(lambda: echo_ok(port), 60, what="C-ECHO before the burst")
        t0 = time.monotonic()
        _connect_and_close(port, 1000)
        burst = time.monotonic() - t0
        echo = _echo_seconds(port)
        print(f"\n1000 connect-and-close in {burst:.1f}s; the C-ECHO after them took {echo:.3f}s")
        assert burst < 120 and echo < 1.0
        assert proc.poll() is None
    finally:
        stop_process(proc)
