"""The Storage SCP: C-ECHO, C-STORE of CT / Enhanced CT images and CT radiation dose SRs.

Receipt is durable: the dataset, as encoded by the sender, is written to the spool (temp file,
fsync, rename) and recorded in the database (study, series, instance; dose SRs also as a
DoseReport) and only then answered with Success. Pixel data is *not* decoded here (the worker
does that); headers are validated. Bad input gets a failure status, a log line and a
quarantine copy with the reason; the server keeps running.
The checks after decoding, the spool write, the record and the quarantine are
``qcnode.ingest.store.InstanceStore``'s, shared with STOW-RS (``qcnode.http``).

Failure statuses: 0xA700 out of resources (free disk below the watermark, the spool's file system
full or over quota while writing, or shutting down), 0xA900 dataset does not match the SOP class
(or the request's UIDs; an Enhanced CT image without its per-frame functional groups), 0xC210 cannot
understand (undecodable dataset), 0xC001 invalid UIDs (in the dataset or in the C-STORE request; also a
component with a leading zero), 0xC002 no pixel data, 0xC003 inconsistent pixel data (a native PixelData
length other than Rows x Columns x BitsAllocated x SamplesPerPixel x frames, a PhotometricInterpretation
that contradicts SamplesPerPixel, a RescaleSlope/Intercept that is not finite, is 0 or gives absurd HU),
0xC004 cannot store/record, 0x0122 SOP class not supported (non-CT storage objects and SRs
that are not dose reports; other storage classes are accepted at negotiation only so that they
can be refused with a clear status and a quarantine copy; also a C-STORE whose SOP Class UID is not
the abstract syntax of the presentation context it came on, e.g. a CT slice on the Verification
context or an unknown SOP class on a CT context, which pynetdicom alone would abort or accept).

Associations are refused with an A-ASSOCIATE-RJ: calling AE title not in the allow-list
(permanent, service user, calling-AE-title-not-recognised); source IP not allowed (permanent,
service user, no-reason-given; an IPv4 peer of a dual-stack ``node.host`` such as ``::``, seen as
``::ffff:a.b.c.d``, is matched as that IPv4 address too); free disk below
``storage.min_free_disk_mb`` or more than ``node.max_associations`` (transient, service provider,
local-limit-exceeded). A connection that sends no A-ASSOCIATE-RQ (a load balancer's health check) is
closed after ``node.artim_timeout`` seconds, or at once when its peer has closed it, and holds no
association slot after that (``qcnode.net.reactors``, ``qcnode.net.listener``).
"""
from __future__ import annotations

import ipaddress
import ssl
import struct
import threading
import time
from typing import Any, Callable, cast

from pydicom.dataset import FileMetaDataset
from pynetdicom import (ALL_TRANSFER_SYNTAXES, AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
                        AllStoragePresentationContexts, evt)
from pynetdicom.acse import ACSE
from pynetdicom.sop_class import Verification
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)
from sqlalchemy.orm import Session

from qcnode.ingest.activity import open_activity
from qcnode.config import Config
from qcnode.net.listener import NodeAssociationServer, SharedListener, balanced_server_class
from qcnode.dicom.pixels import decode_public_elements
from qcnode.net.reactors import use_fast_receive
from qcnode.ingest.recorder import InstanceRecorder
from qcnode.ingest.spool import InvalidUID, Spool, check_uid
from qcnode.ingest.store import (  # noqa: F401 - validation, statuses and quarantine live there (also for STOW-RS)
    ACCEPTED_CLASSES, CANNOT_STORE, CANNOT_UNDERSTAND, DATASET_MISMATCH, DOSE_SR_CLASSES, INCONSISTENT, INVALID_UID,
    NO_PIXEL_DATA, OUT_OF_RESOURCES, PIXEL_DATA_TAG, SOP_CLASS_NOT_SUPPORTED, SUCCESS, InstanceStore, Refused, _error,
    _uid_or_none, _uid_text)
from qcnode.log import get_logger

log = get_logger("qcnode.scp")

# Other storage classes are negotiated only to be refused with a clear status: the uncompressed
# syntaxes suffice, and fewer contexts keep pynetdicom's per-association copy of the supported
# contexts cheap (all 45 syntaxes x 170 classes cost ~0.1 s of CPU per association).
REFUSE_ONLY_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                        ExplicitVRBigEndian]

# A-ASSOCIATE-RJ (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_IP = (0x01, 0x01, 0x01)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
ABORT_WAIT_S = 3.0  # at stop, after the in-flight C-STOREs: how long aborted associations get to end

AssociationPolicy = Callable[[str, str], "tuple[int, int, int] | None"]


class _PolicyACSE(ACSE):
    """ACSE that asks ``policy(calling_ae, ip)`` before negotiating; a tuple means reject."""

    def __init__(self, assoc: Any, policy: AssociationPolicy):
        super().__init__(assoc)
        self._policy = policy

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        try:
            address = self.assoc.requestor.address
        except ValueError:
            address = ""
        rsd = self._policy(str(rq.calling_ae_title).strip(), address)
        if rsd:
            self.send_reject(*rsd)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _meta_element(group_element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian File Meta element (UI/SH/UL with a 2-byte length)."""
    return struct.pack("<HH", 0x0002, group_element) + vr + struct.pack("<H", len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes | None:
    """Preamble, "DICM" and File Meta Information for a received dataset, byte for byte what
    pynetdicom's ``Event.encoded_dataset()`` writes before the dataset, at 1/30 of its cost.

    None if a UID is not a valid DICOM UID (then the caller uses pynetdicom's own encoder)."""
    try:
        uids = [check_uid(u) for u in (sop_class_uid, sop_instance_uid, transfer_syntax_uid)]
    except InvalidUID:
        return None

    def ui(text: str) -> bytes:
        value = text.encode("ascii")
        return value + b"\x00" if len(value) % 2 else value

    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join((
        struct.pack("<HH", 0x0002, 0x0001) + b"OB\x00\x00" + struct.pack("<L", 2) + b"\x00\x01",
        _meta_element(0x0002, b"UI", ui(uids[0])),
        _meta_element(0x0003, b"UI", ui(uids[1])),
        _meta_element(0x0010, b"UI", ui(uids[2])),
        _meta_element(0x0012, b"UI", ui(PYNETDICOM_IMPLEMENTATION_UID)),
        _meta_element(0x0013, b"SH", version + b" " if len(version) % 2 else version)))
    return _PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def encoded_dataset(event: Any) -> bytes:
    """The received dataset as a DICOM Part 10 file (pynetdicom's ``Event.encoded_dataset()``)."""
    req = event.request
    header = part10_header(req.AffectedSOPClassUID, req.AffectedSOPInstanceUID, event.context.transfer_syntax)
    if header is None:
        return cast(bytes, event.encoded_dataset())
    return header + req.DataSet.getbuffer()


class StorageSCP:
    """The DICOM listener. ``start()`` returns at once (threaded); ``stop()`` is graceful."""

    def __init__(self, cfg: Config, session_factory: Callable[[], Session], spool: Spool):
        self.cfg = cfg
        self.session_factory = session_factory
        self.spool = spool
        self.allowed_aets = {a.strip() for a in cfg.node.allowed_ae_titles if a.strip()}
        self.allowed_nets = [ipaddress.ip_network(n, strict=False) for n in cfg.node.allowed_ips]
        self._closing = threading.Event()
        self._inflight = 0
        self._lock = threading.Lock()
        self.server: Any = None
        self.ae = self._make_ae()
        self.recorder = InstanceRecorder(session_factory, in_flight=self._in_flight_now)
        self.store = InstanceStore(cfg, session_factory, spool, self.recorder)
        self.activity = open_activity(spool.root)
        self.stored = 0
        self.refused = 0
        self.direct_stores = 0  # C-STOREs served in the DUL thread (qcnode.net.direct_store)

    def _in_flight_now(self) -> int:
        return self._inflight

    # ---- setup ---------------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        node = self.cfg.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.maximum_pdu_size = node.max_pdu_size
        ae.add_supported_context(Verification)
        seen = set()
        for uid in sorted(ACCEPTED_CLASSES):
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
            seen.add(uid)
        for cx in AllStoragePresentationContexts:  # accepted only to refuse them clearly
            if cx.abstract_syntax not in seen:
                ae.add_supported_context(cx.abstract_syntax, REFUSE_ONLY_SYNTAXES)
        return ae

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server TLS context from ``node.tls_*`` (None when TLS is off)."""
        node = self.cfg.node
        if not node.tls_enabled:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cfg.path(node.tls_cert)), str(self.cfg.path(node.tls_key)))
        if node.tls_ca:
            ctx.load_verify_locations(str(self.cfg.path(node.tls_ca)))
        ctx.verify_mode = ssl.CERT_REQUIRED if node.tls_require_client_cert else \
            (ssl.CERT_OPTIONAL if node.tls_ca else ssl.CERT_NONE)
        return ctx

    def start(self, listener: SharedListener | None = None) -> None:
        """Listen on ``node.host:node.port`` in background threads.

        ``listener``: serve a listening socket shared with the node's other SCP processes (see
        ``qcnode.net.listener``: associations are spread evenly over the processes)."""
        handlers = [(evt.EVT_CONN_OPEN, self._on_conn_open), (evt.EVT_CONN_CLOSE, self._on_conn_close),
                    (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REJECTED, self._on_rejected)]
        address = (self.cfg.node.host, self.cfg.node.port)
        # what AE.start_server(block=False) does, with the node's server class (over the shared socket)
        server_class = NodeAssociationServer if listener is None else balanced_server_class(listener)
        self.server = self.ae.make_server(address, evt_handlers=handlers, ssl_context=self.ssl_context(),
                                          server_class=server_class)
        threading.Thread(target=self.server.serve_forever, name="scp-acceptor", daemon=True).start()
        self.ae._servers.append(self.server)  # noqa: SLF001 - as start_server does (shutdown removes it)
        log.info("scp_listening", ae_title=self.cfg.node.ae_title, host=self.cfg.node.host,
                 port=self.server.server_address[1], tls=self.cfg.node.tls_enabled,
                 shared_listener=None if listener is None else f"{listener.index + 1}/{listener.processes}")

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.cfg.node.port

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting associations, let in-flight C-STOREs finish, then abort the associations."""
        self._closing.set()
        if self.server is not None:
            self.server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            with self._lock:
                if self._inflight == 0:
                    break
            time.sleep(0.02)
        self._end_associations(deadline=time.monotonic() + ABORT_WAIT_S)
        self.recorder.close()
        log.info("scp_stopped", stored=self.stored, refused=self.refused)

    def _end_associations(self, deadline: float) -> None:
        """A-ABORT every established association and drop every connection still negotiating,
        without waiting for each peer in turn; also those accepted while ``stop`` ran. Their DUL
        threads are daemon threads (``use_fast_receive``): one whose peer never closes cannot
        keep the process alive after ``stop``; they get until ``deadline`` to end."""
        ended: set[int] = set()
        while True:
            assocs = [a for a in self.ae.active_associations if id(a) not in ended]
            for assoc in assocs:
                ended.add(id(assoc))
                if assoc.is_established:
                    assoc.abort(block=False)  # the DUL sends A-ABORT and ends when the peer closes
                else:  # no A-ASSOCIATE-RQ yet (A-ABORT is no valid event then): close the connection
                    assoc.dul.kill_dul()
            if not assocs and not any(a.dul.is_alive() for a in self.ae.active_associations):
                return
            if time.monotonic() > deadline:
                log.warning("scp_stop_left_connections", associations=len(self.ae.active_associations))
                return
            time.sleep(0.02)

    # ---- association policy --------------------------------------------------------------------
    def association_policy(self, calling_ae: str, address: str) -> tuple[int, int, int] | None:
        """None to accept, else the A-ASSOCIATE-RJ (result, source, reason)."""
        if self.allowed_aets and calling_ae not in self.allowed_aets:
            log.warning("association_rejected", reason="calling AE title not allowed", calling_ae=calling_ae,
                        source_ip=address)
            return REJECT_CALLING_AE
        if self.allowed_nets:
            try:
                ip = ipaddress.ip_address(address)
                # an IPv4 peer of a dual-stack listener (node.host "::") arrives as ::ffff:a.b.c.d
                mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
                ok = any(ip in net or (mapped is not None and mapped in net) for net in self.allowed_nets)
            except ValueError:
                ok = False
            if not ok:
                log.warning("association_rejected", reason="source IP not allowed", calling_ae=calling_ae,
                            source_ip=address)
                return REJECT_IP
        if self._closing.is_set():
            return REJECT_LOCAL_LIMIT
        free = self.spool.free_disk_mb()
        if free < self.cfg.storage.min_free_disk_mb:
            log.error("association_rejected", reason="free disk below watermark", free_mb=round(free, 1),
                      min_free_disk_mb=self.cfg.storage.min_free_disk_mb, calling_ae=calling_ae, source_ip=address)
            return REJECT_LOCAL_LIMIT
        return None

    def _on_conn_open(self, event: Any) -> None:
        event.assoc.acse = _PolicyACSE(event.assoc, self.association_policy)
        # one-buffer reads, no 1 ms polling, P-DATA without copies, plain C-STOREs served in the DUL thread,
        # a connection that sends no A-ASSOCIATE-RQ closed after node.artim_timeout
        use_fast_receive(event.assoc, store_handler=self._on_direct_store, artim_timeout=self.cfg.node.artim_timeout)

    def _on_conn_close(self, event: Any) -> None:
        closed = getattr(self.server, "connection_closed", None)
        if closed is not None:
            closed()

    def _on_rejected(self, event: Any) -> None:
        pass  # logged by the policy

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    # ---- C-STORE -------------------------------------------------------------------------------
    def _on_direct_store(self, event: Any) -> int:
        with self._lock:
            self.direct_stores += 1
        return self._on_store(event)

    def _on_store(self, event: Any) -> int:
        with self._lock:
            if self._closing.is_set():
                return OUT_OF_RESOURCES
            self._inflight += 1
        if self.activity is not None:
            self.activity.mark()  # the worker holds back while the node receives
        try:
            return self.handle_store(event)
        finally:
            with self._lock:
                self._inflight -= 1

    def handle_store(self, event: Any) -> int:
        """Validate, spool durably, record, and return the DIMSE status for one C-STORE."""
        req = event.request
        assoc = event.assoc
        info: dict[str, Any] = {"calling_ae": str(assoc.requestor.ae_title).strip()[:16],
                                "source_ip": _safe_address(assoc),
                                "sop_class_uid": _uid_or_none(req.AffectedSOPClassUID),
                                "sop_instance_uid": _uid_or_none(req.AffectedSOPInstanceUID)}
        raw: bytes | None = None
        try:
            self.store.check_free_disk()
            raw = encoded_dataset(event)
            for what, key, value in (("SOP Class UID", "sop_class_uid", req.AffectedSOPClassUID),
                                     ("SOP Instance UID", "sop_instance_uid", req.AffectedSOPInstanceUID)):
                if info[key] is None:  # (the dataset's own UID is compared with it below)
                    raise Refused(INVALID_UID, f"invalid {what} in the C-STORE request: {_uid_text(value)!r}")
            context_class = str(event.context.abstract_syntax)
            if info["sop_class_uid"] != context_class:  # pynetdicom dispatches on the request's own UID
                raise Refused(SOP_CLASS_NOT_SUPPORTED,
                              f"C-STORE of SOP Class {info['sop_class_uid']} on a presentation context "
                              f"negotiated for {context_class}")
            try:
                ds = event.dataset
                if getattr(ds, "file_meta", None) is None:
                    ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = event.context.transfer_syntax
                ds.SOPClassUID  # noqa: B018 - force parsing of the key elements
                decode_public_elements(ds)  # a bad VR or length is C210 here, not C004 later
            except Exception as exc:  # noqa: BLE001
                raise Refused(CANNOT_UNDERSTAND, f"cannot decode dataset: {_error(exc)}") from exc
            self.store.store_dataset(ds, raw, info)
        except Refused as exc:
            self.refused += 1
            return self.store.refuse(exc, raw, info)
        except Exception as exc:  # noqa: BLE001 - never crash the association thread
            self.refused += 1
            log.exception("store_error", **info)
            return self.store.refuse(Refused(CANNOT_STORE, f"cannot store: {_error(exc)}"), raw, info)
        self.stored += 1
        return SUCCESS

def _safe_address(assoc: Any) -> str | None:
    try:
        return str(assoc.requestor.address)[:64]
    except (ValueError, AttributeError):
        return None
