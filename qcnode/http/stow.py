"""STOW-RS in (PS3.18 10.5, Studies Store): ``POST /dicomweb/studies[/{study}]``.

The request is ``multipart/related; type="application/dicom"`` with one DICOM Part 10 file per part.
Its body is streamed to an unnamed temporary file in the spool's file system (nothing is left behind
by a crash), never held in memory; the framing is checked whole, then every part goes through
``InstanceStore.store_part10``: the Storage SCP's checks, spool write and commit, quarantine and
status codes. The response is sent only after every stored instance is committed.

HTTP status: 200 all stored, 202 some failed, 409 none stored (each failure's FailureReason is the
DIMSE status the SCP would give), 503 none stored for lack of disk (transient: retry); 400 a
malformed request (nothing stored), 403 a token without the store permission, 413 a body over
``http.max_body_mb``, 415 not ``multipart/related`` of ``application/dicom``.
"""
from __future__ import annotations

import errno
import json
import mmap
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from qcnode.http.auth import caller_of
from qcnode.http.multipart import MultipartError, parse_media_type, split_parts
from qcnode.ingest.spool import InvalidUID, check_uid
from qcnode.ingest.validate import CANNOT_STORE, CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Refused
from qcnode.log import get_logger

log = get_logger("qcnode.http.stow")
router = APIRouter()
DICOM_JSON = "application/dicom+json"
DISK_CHECK_BYTES = 64 * 2**20  # free disk is looked at again after this much of a body
RETRY_AFTER_S = "60"


@dataclass(frozen=True)
class PartResult:
    """The outcome of one part: its DIMSE status and SOP UIDs (None where unknown or invalid)."""
    status: int
    sop_class_uid: str | None
    sop_instance_uid: str | None


class StowIngest:
    """Stores the parts of STOW-RS bodies through the process's ``InstanceStore``."""

    def __init__(self, store: Any, activity: Any = None):
        self.store = store
        self.activity = activity
        self._lock = threading.Lock()
        self.in_flight = 0  # parts being stored now (the group-commit writer waits for them to join a batch)
        self.stored = 0
        self.refused = 0

    def in_flight_now(self) -> int:
        return self.in_flight

    def store_body(self, body: IO[bytes], size: int, boundary: str, study_uid: str | None,
                   source_ip: str | None) -> list[PartResult]:
        """Split the body on disk into parts and store each; raises MultipartError if malformed."""
        with mmap.mmap(body.fileno(), size, access=mmap.ACCESS_READ) as view:
            parts = split_parts(view, boundary)
            results = []
            for part in parts:
                info: dict[str, Any] = {"calling_ae": None, "source_ip": source_ip}
                raw = view[part.start:part.end]
                with self._lock:
                    self.in_flight += 1
                if self.activity is not None:
                    self.activity.mark()  # the worker holds back while the node receives
                status = CANNOT_STORE
                try:
                    if part.media_type not in ("", "application/dicom"):
                        status = self.store.refuse(Refused(
                            CANNOT_UNDERSTAND, f"part of media type {part.media_type[:60]!r}, not application/dicom"),
                            raw, {**info, "sop_class_uid": None, "sop_instance_uid": None})
                    else:
                        status = self.store.store_part10(raw, info, study_uid)
                finally:
                    with self._lock:
                        self.in_flight -= 1
                        if status == SUCCESS:
                            self.stored += 1
                        else:
                            self.refused += 1
                results.append(PartResult(status, info.get("sop_class_uid"), info.get("sop_instance_uid")))
                del raw
        return results


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps({"detail": detail}), status_code=status, media_type="application/json",
                    headers=headers)


def _reference(r: PartResult, failed: bool) -> dict[str, Any]:
    """A Referenced / Failed SOP Sequence item (DICOM JSON); RetrieveURL empty: no WADO-RS here."""
    def ui(value: str | None) -> dict[str, Any]:
        return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}
    item: dict[str, Any] = {"00081150": ui(r.sop_class_uid), "00081155": ui(r.sop_instance_uid)}
    if failed:
        item["00081197"] = {"vr": "US", "Value": [r.status]}
    else:
        item["00081190"] = {"vr": "UR"}
    return item


def stow_response(results: list[PartResult]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the Store Instances Response Module (PS3.18 Annex I) as DICOM JSON."""
    ok = [r for r in results if r.status == SUCCESS]
    failed = [r for r in results if r.status != SUCCESS]
    body: dict[str, Any] = {"00081190": {"vr": "UR"}}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_reference(r, True) for r in failed]}
    if ok:
        body["00081199"] = {"vr": "SQ", "Value": [_reference(r, False) for r in ok]}
    if not failed:
        return 200, body
    if ok:
        return 202, body
    return (503 if all(r.status == OUT_OF_RESOURCES for r in failed) else 409), body


@router.post("/dicomweb/studies")
async def store_instances(request: Request) -> Response:
    """STOW-RS: store the instances of any studies."""
    return await _stow(request, None)


@router.post("/dicomweb/studies/{study}")
async def store_study_instances(request: Request, study: str) -> Response:
    """STOW-RS: store instances of study ``study`` (an instance of another study fails with 0xA900)."""
    return await _stow(request, study)


async def _stow(request: Request, study: str | None) -> Response:
    t0 = time.monotonic()
    node = request.app.state.node
    cfg = node.cfg
    caller = caller_of(request.scope)
    if not caller.may("store"):
        return _problem(403, f"role {caller.role!r} may not store (STOW-RS needs a store or admin token)")
    if study is not None:
        try:
            check_uid(study, "Study Instance UID", strict=True)
        except InvalidUID as exc:
            return _problem(400, str(exc))
    media, params = parse_media_type(request.headers.get("content-type", ""))
    part_type = parse_media_type(params.get("type", "application/dicom"))[0]
    if media != "multipart/related" or part_type != "application/dicom":
        return _problem(415, 'STOW-RS here takes multipart/related; type="application/dicom" (Part 10 files)')
    boundary = params.get("boundary", "")
    if not boundary:
        return _problem(400, "multipart/related without a boundary parameter")
    max_bytes = cfg.http.max_body_mb * 1024 * 1024
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > max_bytes:
        return _problem(413, f"the body ({int(announced)} bytes) exceeds http.max_body_mb ({cfg.http.max_body_mb})")
    free_mb = node.spool.free_disk_mb() - (int(announced) if announced and announced.isdigit() else 0) / 2**20
    if free_mb < cfg.storage.min_free_disk_mb:
        log.error("stow_refused", reason="free disk below storage.min_free_disk_mb", client=_client(request))
        return _problem(503, "out of resources: free disk below the node's watermark", {"Retry-After": RETRY_AFTER_S})
    received = 0
    checked = 0  # bytes received when free disk was last looked at (a chunked body announces no length)
    with tempfile.TemporaryFile(dir=node.spool.root, prefix=".stow-") as body:
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    return _problem(413, f"the body exceeds http.max_body_mb ({cfg.http.max_body_mb})")
                if received - checked >= DISK_CHECK_BYTES:
                    checked = received
                    if node.spool.free_disk_mb() < cfg.storage.min_free_disk_mb:
                        log.error("stow_refused", reason="free disk below storage.min_free_disk_mb while receiving",
                                  received_bytes=received, client=_client(request))
                        return _problem(503, "out of resources: free disk below the node's watermark",
                                        {"Retry-After": RETRY_AFTER_S})
                await run_in_threadpool(body.write, chunk)  # a slow disk must not stall the event loop
            body.flush()
        except ClientDisconnect:
            log.warning("stow_client_disconnected", received_bytes=received, client=_client(request))
            return _problem(400, "the client disconnected before the end of the body")
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                return _problem(503, "out of resources: no space for the request body", {"Retry-After": RETRY_AFTER_S})
            raise
        if received == 0:
            return _problem(400, "empty body")
        try:
            results = await run_in_threadpool(node.stow.store_body, body, received, boundary, study, _client(request))
        except MultipartError as exc:
            log.warning("stow_malformed", reason=str(exc), received_bytes=received, client=_client(request))
            return _problem(400, f"malformed multipart body: {exc}")
    status, payload = stow_response(results)
    log.info("stow_request", http_status=status, stored=sum(r.status == SUCCESS for r in results),
             failed=sum(r.status != SUCCESS for r in results), received_bytes=received,
             seconds=round(time.monotonic() - t0, 3), client=_client(request), token=caller.name)
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return Response(json.dumps(payload), status_code=status, media_type=DICOM_JSON, headers=headers)


def _client(request: Request) -> str | None:
    return request.client.host[:64] if request.client else None
