"""Receipt of one instance, whatever transport brought it (C-STORE, STOW-RS): validate, spool, record.

``InstanceStore`` holds what the Storage SCP did per C-STORE once the dataset was decoded, so that
every way in gives the same answers: the same checks with the same DICOM status codes (also the
STOW-RS FailureReason), the same durable spool write (temp file, fsync, rename; the folder fsync and
the database commit by the group-commit recorder) before Success, the same quarantine copy and
QuarantineRecord for refused input. Checks and status codes: ``qcnode.ingest.validate``.
"""
from __future__ import annotations

import datetime as dt
import errno
import io
from typing import Any, Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from qcnode.config import Config
from qcnode.db.models import DoseReport, Instance, QuarantineRecord, Series, Study, utcnow
from qcnode.db.states import SeriesState
from qcnode.dicom.dose import dose_fields
from qcnode.dicom.pixels import CT_IMAGE_CLASSES, decode_public_elements, int_or_none
from qcnode.dicom.privacy import load_or_create_key, pseudonymise
from qcnode.ingest.recorder import InstanceRecorder, PendingInstance
from qcnode.ingest.spool import Spool
from qcnode.ingest.validate import (CANNOT_STORE, CANNOT_UNDERSTAND, DATASET_MISMATCH, INVALID_UID, OUT_OF_RESOURCES,
                                    SUCCESS, Refused, check_content, error_reason, identifiers, uid_or_none, uid_text)
from qcnode.log import get_logger

log = get_logger("qcnode.scp")  # the same logger (and log lines) for every transport

# OSErrors while writing the spool that mean "no space", not "cannot store": answered 0xA700
_NO_SPACE_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)


def _clip(model: type, values: dict[str, Any]) -> dict[str, Any]:
    """Drop keys that are not columns of ``model``; cut strings to the column length."""
    out: dict[str, Any] = {}
    cols = model.__table__.columns  # type: ignore[attr-defined]
    for key, value in values.items():
        if key not in cols:
            continue
        length = getattr(cols[key].type, "length", None)
        if isinstance(value, str) and length:
            value = value[:length]
        out[key] = value
    return out


def _parse_da(value: Any) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value).strip()[:8], "%Y%m%d").date() if value else None
    except ValueError:
        return None


class InstanceStore:
    """Validate, spool durably and record received instances; quarantine refused ones.

    Thread-safe: one per receiving process, shared by its transport threads; ``recorder`` is that
    process's group-commit writer."""

    def __init__(self, cfg: Config, session_factory: Callable[[], Session], spool: Spool,
                 recorder: InstanceRecorder):
        self.cfg = cfg
        self.session_factory = session_factory
        self.spool = spool
        self.recorder = recorder
        self.key = load_or_create_key(cfg.path(cfg.privacy.pseudonym_key_file)) \
            if cfg.privacy.pseudonymise_patient_id else b""

    def check_free_disk(self) -> None:
        """Refuse (0xA700, no copy) while free disk is below ``storage.min_free_disk_mb``."""
        free = self.spool.free_disk_mb()
        if free < self.cfg.storage.min_free_disk_mb:
            raise Refused(OUT_OF_RESOURCES, f"free disk {free:.0f} MiB below storage.min_free_disk_mb",
                          keep_copy=False)

    def store_part10(self, raw: bytes, info: dict[str, Any], study_uid: str | None = None) -> int:
        """Receive one DICOM Part 10 file (a STOW-RS part); returns its status (SUCCESS or a failure).

        The File Meta Information plays the C-STORE request's part: its Media Storage SOP Class /
        Instance UIDs (the dataset's own where absent) must be valid and match the dataset.
        ``study_uid``: the study the request addressed; an instance of another study is refused with
        0xA900. ``info`` (calling_ae, source_ip) gets the SOP UIDs filled in (None where invalid)."""
        info.setdefault("calling_ae", None)
        info.setdefault("source_ip", None)
        info["sop_class_uid"] = info["sop_instance_uid"] = None
        if raw[128:132] == b"DICM" and any(raw[:128]):
            raw = bytes(128) + raw[128:]  # the preamble is never used here: no polyglot file in the spool
        try:
            self.check_free_disk()
            try:
                ds = dcmread(io.BytesIO(raw))  # a Part 10 file: preamble, "DICM", meta header
                meta = ds.file_meta
                if not meta.get("TransferSyntaxUID"):
                    raise ValueError("no Transfer Syntax UID in the File Meta Information")
                ds.SOPClassUID  # noqa: B018 - force parsing of the key elements
                decode_public_elements(ds)  # a bad VR or length is C210 here, not C004 later
            except Exception as exc:  # noqa: BLE001
                raise Refused(CANNOT_UNDERSTAND, f"cannot decode dataset: {error_reason(exc)}") from exc
            for what, key, meta_kw, ds_kw in (
                    ("SOP Class UID", "sop_class_uid", "MediaStorageSOPClassUID", "SOPClassUID"),
                    ("SOP Instance UID", "sop_instance_uid", "MediaStorageSOPInstanceUID", "SOPInstanceUID")):
                value = meta.get(meta_kw) or ds.get(ds_kw)
                info[key] = uid_or_none(value)
                if info[key] is None:
                    raise Refused(INVALID_UID, f"invalid {what} in the File Meta Information: {uid_text(value)!r}")
            if study_uid is not None and str(ds.get("StudyInstanceUID", "")) != study_uid:
                raise Refused(DATASET_MISMATCH, "Study Instance UID of the dataset is not the study of the request")
            self.store_dataset(ds, raw, info)
        except Refused as exc:
            return self.refuse(exc, raw, info)
        except Exception as exc:  # noqa: BLE001 - one bad instance must not fail the others
            log.exception("store_error", **info)
            return self.refuse(Refused(CANNOT_STORE, f"cannot store: {error_reason(exc)}"), raw, info)
        return SUCCESS

    def store_dataset(self, ds: Dataset, raw: bytes, info: dict[str, Any]) -> None:
        """Validate a decoded dataset, spool ``raw`` durably and record it; raises Refused.

        ``info``: calling_ae, source_ip and the SOP Class / Instance UIDs its transport announced
        (the C-STORE request, a Part 10 file's meta header); the dataset must match them."""
        sop_class, sop_uid, study_uid, series_uid, rel = identifiers(ds, info)
        scorable, skip, dose_report = check_content(ds, sop_class)
        try:
            fields = dose_fields(ds) if sop_class in CT_IMAGE_CLASSES else {}
        except Exception as exc:  # noqa: BLE001 - odd header values must not lose the image
            log.warning("dose_fields_error", sop_instance_uid=sop_uid, error=error_reason(exc))
            fields = {}
        identical = self.spool.same_content(rel, raw)
        if not identical:  # the folder fsync is done once per batch by the recorder, before the commit
            try:
                self.spool.write(rel, raw, sync_dir=False)
            except OSError as exc:
                if exc.errno in _NO_SPACE_ERRNOS:  # a full disk or quota is a transient lack of resources
                    raise Refused(OUT_OF_RESOURCES, f"cannot write the spool file: {exc.strerror or exc}",
                                  keep_copy=False) from exc
                raise
        self._record(ds, rel, len(raw), identical, scorable, skip, fields, dose_report, info,
                     study_uid, series_uid, sop_uid, sop_class)

    def _record(self, ds: Dataset, rel: str, size: int, identical: bool, scorable: bool, skip: str | None,
                fields: dict[str, Any], dose_report: dict[str, Any] | None, info: dict[str, Any],
                study_uid: str, series_uid: str, sop_uid: str, sop_class: str) -> None:
        """Record study/series/instance (group commit); returns once the transaction is committed."""
        now = utcnow()
        pending = PendingInstance(
            study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, received_at=now, identical=identical,
            sync_dir=self.spool.abspath(rel).parent,
            study_values=_clip(Study, {
                "study_instance_uid": study_uid,
                "patient_key": self._key_of(ds.get("PatientID")),
                "accession_key": self._key_of(ds.get("AccessionNumber")),
                "study_date": _parse_da(ds.get("StudyDate")),
                "study_time": str(ds.get("StudyTime", "") or "") or None}),
            series_values=_clip(Series, {
                **fields, "series_instance_uid": series_uid,
                "modality": str(ds.get("Modality", "") or "") or None,
                "series_number": int_or_none(ds.get("SeriesNumber")),
                "first_received_at": now, "last_received_at": now, "status": SeriesState.RECEIVING, "version": 0,
                "instance_count": 0}),
            instance_values=_clip(Instance, {
                **fields, "sop_instance_uid": sop_uid, "sop_class_uid": sop_class,
                "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
                "instance_number": int_or_none(ds.get("InstanceNumber")), "spool_path": rel,
                "size_bytes": size, "calling_ae": info["calling_ae"], "source_ip": info["source_ip"],
                "received_at": now, "scorable": scorable, "skip_reason": skip}),
            dose_report=None if dose_report is None else _clip(DoseReport, {
                "sop_instance_uid": sop_uid, "total_dlp_mgycm": dose_report.get("total_dlp_mgycm"),
                "events": dose_report.get("events") or [], "spool_path": rel, "received_at": now}))
        self.recorder.record(pending)
        log.debug("instance_stored", sop_instance_uid=sop_uid, scorable=scorable, skip_reason=skip)

    def _key_of(self, value: Any) -> str | None:
        if value in (None, ""):
            return None
        text = str(value)
        return pseudonymise(text, self.key) if self.cfg.privacy.pseudonymise_patient_id else text[:128]

    def refuse(self, exc: Refused, raw: bytes | None, info: dict[str, Any]) -> int:
        """Log, quarantine (copy + reason) and record a refused instance; return its status."""
        rel = None
        try:
            if exc.status != OUT_OF_RESOURCES:
                rel = self.spool.quarantine(raw if exc.keep_copy else None, exc.reason,
                                            {**info, "status": f"0x{exc.status:04X}"})
        except OSError as err:
            log.error("quarantine_failed", error=str(err))
        log.warning("store_refused", status=f"0x{exc.status:04X}", reason=exc.reason, quarantine=rel, **info)
        if exc.status == OUT_OF_RESOURCES:
            return exc.status
        try:
            with self.session_factory() as s:
                s.add(QuarantineRecord(reason=exc.reason[:4000], status_code=exc.status, path=rel, **info))
                s.commit()
        except Exception as err:  # noqa: BLE001
            log.error("quarantine_record_failed", error=f"{type(err).__name__}: {err}")
        return exc.status


