"""The Storage SCP: C-ECHO, C-STORE of CT / Enhanced CT images and CT radiation dose SRs.

Receipt is durable: the dataset, as encoded by the sender, is written to the spool (temp file,
fsync, rename) and recorded in the database (study, series, instance; dose SRs also as a
DoseReport) and only then answered with Success, by :class:`qcnode.ingest.store.InstanceStore` (shared
with STOW-RS). Headers are validated first (:mod:`qcnode.ingest.validate`, which lists the failure
statuses); bad input gets a failure status, a log line and a quarantine copy with the reason.

Associations are admitted or rejected by :mod:`qcnode.net.policy` (allow-lists, free disk, stopping).
The network side runs on the fast path or on pynetdicom's own (``node.fast_path``; see
:mod:`qcnode.net`): on the fast path a connection that sends no A-ASSOCIATE-RQ (a load balancer's
health check) is closed after ``node.artim_timeout`` seconds, or at once when its peer has closed it,
and holds no association slot after that.
"""
from __future__ import annotations

import ssl
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, cast

from pynetdicom import (ALL_TRANSFER_SYNTAXES, AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
                        AllStoragePresentationContexts, evt)
from pynetdicom.sop_class import Verification
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)
from sqlalchemy.orm import Session

from qcnode.config import Config
from qcnode.ingest.activity import open_activity
from qcnode.ingest.recorder import InstanceRecorder
from qcnode.ingest.store import InstanceStore
from qcnode.ingest.spool import InvalidUID, Spool, check_uid
from qcnode.ingest.validate import (  # noqa: F401 - the statuses the SCP answers, also for its users
    ACCEPTED_CLASSES, CANNOT_STORE, CANNOT_UNDERSTAND, DATASET_MISMATCH, INCONSISTENT, INVALID_UID, NO_PIXEL_DATA,
    OUT_OF_RESOURCES, SOP_CLASS_NOT_SUPPORTED, SUCCESS, Refused, check_content, check_request, decode_dataset,
    error_reason, identifiers, uid_or_none)
from qcnode.log import get_logger
from qcnode.net import compat, server as net_server
from qcnode.net.policy import AssociationPolicy

if TYPE_CHECKING:
    from qcnode.net.listener import SharedListener

log = get_logger("qcnode.scp")


# Other storage classes are negotiated only to be refused with a clear status: the uncompressed
# syntaxes suffice, and fewer contexts keep pynetdicom's per-association copy of the supported
# contexts cheap.
REFUSE_ONLY_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                        ExplicitVRBigEndian]
ABORT_WAIT_S = 3.0  # at stop, after the in-flight C-STOREs: how long aborted associations get to end


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _meta_element(group_element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian File Meta element (UI/SH/UL with a 2-byte length)."""
    return struct.pack("<HH", 0x0002, group_element) + vr + struct.pack("<H", len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes | None:
    """Preamble, "DICM" and File Meta Information for a received dataset, byte for byte what
    pynetdicom's ``Event.encoded_dataset()`` writes before the dataset, without its pydicom encoder.

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
        self.fast_path = compat.fast_path_active(cfg.node.fast_path)
        self._closing = threading.Event()
        self._inflight = 0
        self._lock = threading.Lock()
        self.association_policy = AssociationPolicy(  # (looks at the spool and the watermark anew each time)
            cfg.node.allowed_ae_titles, cfg.node.allowed_ips, closing=self._closing.is_set,
            free_disk_mb=lambda: self.spool.free_disk_mb(), min_free_disk_mb=lambda: self.cfg.storage.min_free_disk_mb)
        self.server: Any = None
        self.ae = self._make_ae()
        self.recorder = InstanceRecorder(session_factory, in_flight=self._in_flight_now)
        self.store = InstanceStore(cfg, session_factory, spool, self.recorder)  # shared with STOW-RS
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
        ``qcnode.net.listener``: associations are spread evenly over the processes; fast path only)."""
        handlers = [(evt.EVT_CONN_OPEN, self._on_conn_open), (evt.EVT_CONN_CLOSE, self._on_conn_close),
                    (evt.EVT_REQUESTED, self.association_policy.on_requested),
                    (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REJECTED, self._on_rejected)]
        address = (self.cfg.node.host, self.cfg.node.port)
        self.server = net_server.start_server(self.ae, address, handlers, self.ssl_context(), fast=self.fast_path,
                                              listener=listener)
        log.info("scp_listening", ae_title=self.cfg.node.ae_title, host=self.cfg.node.host,
                 port=self.server.server_address[1], tls=self.cfg.node.tls_enabled, fast_path=self.fast_path,
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
        without waiting for each peer in turn; also those accepted while ``stop`` ran. They get
        until ``deadline`` to end (on the fast path their DUL threads are daemon threads: one whose
        peer never closes cannot keep the process alive after ``stop``)."""
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

    # ---- association events --------------------------------------------------------------------
    def _on_conn_open(self, event: Any) -> None:
        if self.fast_path:
            # one-buffer reads, no 1 ms polling, P-DATA without copies, plain C-STOREs served in the DUL thread,
            # a connection that sends no A-ASSOCIATE-RQ closed after node.artim_timeout
            net_server.use_fast_receive(event.assoc, store_handler=self._on_direct_store,
                                        artim_timeout=self.cfg.node.artim_timeout)

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
                                "sop_class_uid": uid_or_none(req.AffectedSOPClassUID),
                                "sop_instance_uid": uid_or_none(req.AffectedSOPInstanceUID)}
        raw: bytes | None = None
        try:
            self.store.check_free_disk()
            raw = encoded_dataset(event)
            check_request(req, str(event.context.abstract_syntax), info)
            self.store.store_dataset(decode_dataset(event), raw, info)
        except Refused as exc:
            self.refused += 1
            return self.store.refuse(exc, raw, info)
        except Exception as exc:  # noqa: BLE001 - never crash the association thread
            self.refused += 1
            log.exception("store_error", **info)
            return self.store.refuse(Refused(CANNOT_STORE, f"cannot store: {error_reason(exc)}"), raw, info)
        self.stored += 1
        return SUCCESS


def _safe_address(assoc: Any) -> str | None:
    try:
        return str(assoc.requestor.address)[:64]
    except (ValueError, AttributeError):
        return None
