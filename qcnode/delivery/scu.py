"""C-STORE SCU: send files (or datasets) to one configured destination.

Files are sent as stored: each SOP class is proposed with the file's own transfer syntax, so
compressed pixel data is never decoded or re-encoded. Only for uncompressed data are Explicit
and Implicit VR Little Endian proposed as alternatives (pynetdicom converts between those
losslessly). TLS is used when ``destination.tls_enabled`` (CA bundle from ``destination.tls_ca``,
else the system CAs; the peer's certificate must match ``destination.host``).
"""
from __future__ import annotations

import ssl
from pathlib import Path
from typing import Iterable

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
from pynetdicom import AE

from qcnode.config import Destination
from qcnode.log import get_logger

log = get_logger(__name__)

UNCOMPRESSED = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
# pynetdicom: more than 128 presentation contexts cannot be proposed in one association
MAX_CONTEXTS = 128
# Warning statuses (coercion, elements discarded, data set mismatch): the instance was stored.
WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


class DeliveryError(RuntimeError):
    """The destination could not be reached, refused the association, or refused an instance.

    ``permanent``: retrying the same payload cannot succeed (e.g. HTTP 415 from a DICOMweb
    destination); the outbox makes such a delivery a dead letter at once instead of retrying it.
    """

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def _describe(dest: Destination) -> str:
    return f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{', TLS' if dest.tls_enabled else ''})"


def _identify(item: str | Path | Dataset) -> tuple[UID, UID, UID]:
    """(SOP class, SOP instance, transfer syntax) of a file or dataset, from its meta header."""
    if isinstance(item, Dataset):
        meta = getattr(item, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        if ts is None:
            raise DeliveryError("dataset to send has no file meta Transfer Syntax UID")
        return UID(item.SOPClassUID), UID(item.SOPInstanceUID), UID(ts)
    try:
        meta = pydicom.filereader.read_file_meta_info(str(item))
        return (UID(meta.MediaStorageSOPClassUID), UID(meta.MediaStorageSOPInstanceUID),
                UID(meta.TransferSyntaxUID))
    except FileNotFoundError as exc:
        raise DeliveryError(f"file to send is missing: {item}") from exc
    except Exception as exc:  # noqa: BLE001 - any unreadable meta header
        raise DeliveryError(f"cannot read the DICOM meta header of {item}: {exc}") from exc


def _ssl_context(dest: Destination, base_dir: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if dest.tls_ca:
        ca = Path(dest.tls_ca)
        if not ca.is_absolute() and base_dir is not None:
            ca = base_dir / ca
        if not ca.is_file():
            raise DeliveryError(f"destination {dest.name}: tls_ca file not found: {ca}")
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


def send_datasets(destination: Destination, paths_or_datasets: Iterable[str | Path | Dataset],
                  calling_ae: str, timeout: float = 30.0, base_dir: Path | None = None) -> list[int]:
    """Send every item in one association; returns the C-STORE status of each, in order.

    Raises ``DeliveryError`` when the association fails, a needed presentation context is not
    accepted, or any instance gets a failure status (all items are attempted first only up to
    the first failure: the outbox retries the whole payload, and the peer accepts duplicates).
    ``base_dir`` resolves a relative ``tls_ca``.
    """
    items = list(paths_or_datasets)
    if not items:
        return []
    where = _describe(destination)
    idents = [_identify(i) for i in items]
    pairs = list(dict.fromkeys((sop_class, ts) for sop_class, _, ts in idents))
    if len(pairs) > MAX_CONTEXTS:
        raise DeliveryError(f"{len(pairs)} SOP class/transfer syntax pairs exceed {MAX_CONTEXTS} contexts")

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, ts in pairs:
        syntaxes = [ts]
        if ts in UNCOMPRESSED:
            syntaxes += [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != ts]
        ae.add_requested_context(sop_class, syntaxes)

    tls_args = None
    if destination.tls_enabled:
        tls_args = (_ssl_context(destination, base_dir), destination.host)
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=tls_args)
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"cannot connect to {where}: {exc}") from exc
    if not assoc.is_established:
        rejected = [c for c in assoc.rejected_contexts]
        if rejected and not assoc.accepted_contexts:
            what = "; ".join(f"{UID(c.abstract_syntax).name} in "
                             f"{', '.join(UID(t).name for t in c.transfer_syntax)}" for c in rejected)
            raise DeliveryError(f"{where} did not accept transfer syntax or SOP class of any item: {what}")
        if assoc.is_rejected:
            reason = "association rejected by the peer (check its AE title configuration)"
        else:
            reason = "could not associate (peer down, connection refused, or TLS handshake failed)"
        raise DeliveryError(f"{where}: {reason}")

    statuses: list[int] = []
    try:
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        accepted_classes = {sop for sop, _ in accepted}
        for sop_class, ts in pairs:
            ok = (sop_class, ts) in accepted or (ts in UNCOMPRESSED and any(
                (sop_class, alt) in accepted for alt in UNCOMPRESSED))
            if not ok:
                what = "SOP class" if sop_class not in accepted_classes else "transfer syntax"
                raise DeliveryError(f"{where} did not accept {what}: {sop_class.name} in {ts.name}")
        for item, (_, sop_uid, _) in zip(items, idents):
            try:
                status = assoc.send_c_store(item if isinstance(item, Dataset) else Path(item))
            except (ValueError, AttributeError) as exc:
                raise DeliveryError(f"{where}: cannot send {sop_uid}: {exc}") from exc
            if not status or "Status" not in status:
                raise DeliveryError(f"{where}: no C-STORE response for {sop_uid} "
                                    "(connection lost or DIMSE timeout)")
            code = int(status.Status)
            statuses.append(code)
            if code != 0x0000 and code not in WARNING_STATUSES:
                comment = status.get("ErrorComment", "")
                raise DeliveryError(f"{where} refused {sop_uid}: status 0x{code:04X}"
                                    + (f" ({comment})" if comment else ""))
    finally:
        if assoc.is_established:
            assoc.release()
    log.debug("c_store_sent", destination=destination.name, count=len(statuses))
    return statuses

