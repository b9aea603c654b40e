"""STOW-RS sender: store files on a DICOMweb destination (``type = "dicomweb"``) with dicomweb-client.

Same contract as ``qcnode.delivery.scu.send_datasets``: every file is stored or ``DeliveryError``
is raised with a one-line reason, and the outbox decides retry or dead letter. What is retried
(with the outbox's back-off, up to ``outbox.max_attempts``) and what is a dead letter at once
(``DeliveryError.permanent``):

- cannot connect, connection reset, TLS handshake or certificate failure, timeout: retried;
- HTTP 5xx, 408 Request Timeout, 429 Too Many Requests: retried;
- HTTP 401 / 403: retried, since ``password_file`` / ``bearer_token_file`` are read again at each
  try (a fixed password or a rotated token heals the delivery); dead after ``max_attempts``;
- any other HTTP 4xx (400, 404, 405, 409, 410, 413, 415, ...): dead at once: the same request
  would get the same answer;
- HTTP 2xx whose response lists failed instances (FailedSOPSequence): retried when every failure
  reason is 0xA7xx (out of resources), dead otherwise; 2xx whose response lists the stored
  instances without every one sent: retried.

Errors name the HTTP status first and the server's reason (failed SOP instances with their
failure reasons, or the server's message), never a credential: the url holds none (checked when
the config is loaded), and passwords and tokens go only into the request's Authorization header.

Files are sent as stored (no transcoding), in requests of at most ``MAX_BATCH_BYTES``; the
outbox re-sends the whole payload on a retry, and DICOMweb servers store a duplicate instance
again without error.
"""
from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any, Iterable

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from qcnode.config import Destination
from qcnode.delivery.scu import DeliveryError
from qcnode.log import get_logger

log = get_logger(__name__)
# dicomweb-client logs every request at info and its retry library each failure (with a traceback)
# at warning; the outbox's delivery_attempt line already says what happened, once.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
logging.getLogger("retrying").setLevel(logging.ERROR)

MAX_BATCH_BYTES = 64 * 1024 * 1024  # one STOW-RS request; a series larger than this takes several
RETRIED_HTTP = {408, 429}  # 4xx that another try may get past
AUTH_HTTP = {401, 403}  # retried: the secret files are read again at each try
FAILURE_REASONS = {  # PS3.18 / PS3.4 failure reasons seen in STOW-RS responses
    0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "not authorized",
    0xA700: "out of resources", 0xA900: "data set does not match SOP class",
    0xC000: "cannot understand", 0xC122: "transfer syntax not supported",
}
_warned_plain_http: set[str] = set()


def stow_root(url: str) -> str:
    """The DICOMweb root to give dicomweb-client: ``url`` without a trailing ``/`` or ``/studies``."""
    root = url.rstrip("/")
    return root[: -len("/studies")] if root.endswith("/studies") else root


def _describe(dest: Destination) -> str:
    return f"{dest.name} ({stow_root(dest.url)})"


def _resolve(value: str, base_dir: Path | None) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() or base_dir is None else base_dir / p


def _read_secret(dest: Destination, key: str, base_dir: Path | None) -> str:
    """The first line of the file named by ``dest.<key>`` (never logged)."""
    path = _resolve(getattr(dest, key), base_dir)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DeliveryError(f"{_describe(dest)}: cannot read {key} {path}: {exc.strerror or exc}") from None
    secret = text.splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise DeliveryError(f"{_describe(dest)}: {key} {path} is empty")
    return secret


class _Session(requests.Session):
    """A session whose own ``verify`` (tls_ca, or tls_verify = false) wins over REQUESTS_CA_BUNDLE /
    CURL_CA_BUNDLE: requests lets those override ``Session.verify`` (psf/requests#3829)."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[override]
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:
            settings["verify"] = self.verify
        return settings


def _is_loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _session(dest: Destination, base_dir: Path | None) -> requests.Session:
    session = _Session()
    if dest.username:
        session.auth = (dest.username, _read_secret(dest, "password_file", base_dir))
    elif dest.bearer_token_file:
        session.headers["Authorization"] = f"Bearer {_read_secret(dest, 'bearer_token_file', base_dir)}"
    if (dest.username or dest.bearer_token_file) and dest.url.startswith("http://") \
            and not _is_loopback(dest.url) and dest.name not in _warned_plain_http:
        _warned_plain_http.add(dest.name)
        log.warning("dicomweb_credentials_over_http", destination=dest.name,
                    hint="use an https:// url: basic auth and bearer tokens travel in clear over http")
    if not dest.tls_verify:
        session.verify = False
    elif dest.tls_ca:
        ca = _resolve(dest.tls_ca, base_dir)
        if not ca.is_file():
            raise DeliveryError(f"{_describe(dest)}: tls_ca file not found: {ca}")
        session.verify = str(ca)
    session.headers["Accept"] = "application/dicom+json"
    return session


def _batches(paths: list[Path]) -> Iterable[list[Path]]:
    batch: list[Path] = []
    size = 0
    for p in paths:
        try:
            n = p.stat().st_size
        except OSError as exc:
            raise DeliveryError(f"file to send is missing: {p}") from exc
        if batch and size + n > MAX_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += n
    if batch:
        yield batch


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise DeliveryError(f"file to send is missing: {path}") from exc
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise DeliveryError(f"cannot read {path}: {exc}") from exc


def _response_dataset(response: requests.Response | None) -> pydicom.Dataset | None:
    """The STOW-RS response body as a dataset (DICOM JSON or XML), None when it is not one."""
    if response is None or not response.content:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict) and all(re.fullmatch(r"[0-9A-Fa-f]{8}", k) for k in body):
        try:
            return pydicom.Dataset.from_json(body)
        except Exception:  # noqa: BLE001 - a malformed body is reported as unreadable
            return None
    if response.content.lstrip().startswith(b"<"):
        try:  # dicomweb-client's reader of the DICOM XML (Native DICOM Model) response
            from xml.etree.ElementTree import fromstring
            from dicomweb_client.web import _load_xml_dataset
            return _load_xml_dataset(fromstring(response.content))
        except Exception:  # noqa: BLE001
            return None
    return None


def _server_message(response: requests.Response) -> str:
    """A short reason from a non-DICOM error body (Orthanc's JSON ``Message``, or the text)."""
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("Message", "message", "error", "detail", "OrthancError"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key][:200]
    text = response.text.strip() if response.content and b"<html" not in response.content[:200].lower() else ""
    return " ".join(text.split())[:200]


def _failures(ds: pydicom.Dataset | None) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, failure reason) of each FailedSOPSequence item."""
    if ds is None:
        return []
    out = []
    for item in ds.get("FailedSOPSequence", None) or []:
        reason = item.get("FailureReason")
        out.append((str(item.get("ReferencedSOPInstanceUID", "?")), int(reason) if reason is not None else None))
    return out


def _stored(ds: pydicom.Dataset | None) -> set[str] | None:
    """SOP Instance UIDs the response lists as stored; None when it lists none (no body)."""
    if ds is None or not ds.get("ReferencedSOPSequence"):
        return None
    return {str(item.get("ReferencedSOPInstanceUID", "")) for item in ds.ReferencedSOPSequence}


def _describe_failures(failures: list[tuple[str, int | None]]) -> str:
    def one(reason: int | None) -> str:
        if reason is None:
            return "no reason given"
        name = FAILURE_REASONS.get(reason) or ("out of resources" if reason >> 8 == 0xA7 else "")
        return f"0x{reason:04X}" + (f" {name}" if name else "")
    shown = "; ".join(f"{uid}: {one(r)}" for uid, r in failures[:3])
    more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
    return f"{len(failures)} instance(s) failed: {shown}{more}"


def _http_error(dest: Destination, response: requests.Response) -> DeliveryError:
    code = response.status_code
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = response.reason or ""
    failures = _failures(_response_dataset(response))
    detail = _describe_failures(failures) if failures else _server_message(response)
    hint = ""
    if code == 401:
        hint = ("check username and password_file" if dest.username else "check bearer_token_file"
                if dest.bearer_token_file else "the server wants credentials: username + password_file or "
                "bearer_token_file")
    elif code == 403:
        hint = "the credentials are not allowed to store"
    elif code in (404, 405):
        hint = "check url: the DICOMweb root, the URL before /studies"
    elif code == 413:
        hint = "the server's request size limit is below the payload"
    permanent = 400 <= code < 500 and code not in RETRIED_HTTP | AUTH_HTTP
    parts = [p for p in (hint, detail) if p]
    return DeliveryError(f"{_describe(dest)}: HTTP {code} {phrase}" + (f": {'; '.join(parts)}" if parts else ""),
                         permanent=permanent)


def _network_reason(exc: requests.RequestException) -> str:
    """The useful end of a requests/urllib3 error ("[Errno 111] Connection refused", ...)."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\][^'\"()]*", text)
    if m:
        return m.group(0).strip()
    m = re.search(r"\[SSL[^\]]*\][^'\"()]*", text)
    if m:
        return m.group(0).strip()
    return text[-200:]


def stow_files(destination: Destination, paths: Iterable[str | Path], timeout: float = 30.0,
               base_dir: Path | None = None) -> list[str]:
    """Store every file on ``destination`` over STOW-RS; returns the SOP Instance UIDs stored.

    Raises ``DeliveryError`` (``permanent`` when a retry cannot help, see the module docstring).
    ``base_dir`` resolves relative ``tls_ca``, ``password_file`` and ``bearer_token_file``.
    """
    files = [Path(p) for p in paths]
    if not files:
        return []
    where = _describe(destination)
    responses: list[requests.Response] = []

    def keep(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        responses.append(response)
        return response

    session = _session(destination, base_dir)
    try:
        client = DICOMwebClient(url=stow_root(destination.url), session=session, callback=keep,
                                timeout=(timeout, timeout))
    except ValueError as exc:
        raise DeliveryError(f"{where}: {exc}", permanent=True) from exc
    client.set_http_retry_params(retry=False)  # the outbox retries, with its back-off and dead letters
    stored: list[str] = []
    try:
        for batch in _batches(files):
            datasets = [_read(p) for p in batch]
            sent = [str(ds.SOPInstanceUID) for ds in datasets]
            responses.clear()
            try:
                client.store_instances(datasets)
            except requests.HTTPError as exc:
                if exc.response is None:
                    raise DeliveryError(f"{where}: {exc}") from exc
                raise _http_error(destination, exc.response) from exc
            except requests.Timeout as exc:
                raise DeliveryError(f"{where}: no answer within {timeout:g} s ({_network_reason(exc)})") from exc
            except requests.exceptions.SSLError as exc:
                raise DeliveryError(f"{where}: TLS failed: {_network_reason(exc)}") from exc
            except requests.ConnectionError as exc:
                raise DeliveryError(f"{where}: cannot connect: {_network_reason(exc)}") from exc
            except requests.RequestException as exc:
                raise DeliveryError(f"{where}: {type(exc).__name__}: {exc}") from exc
            except (KeyError, ValueError) as exc:
                # dicomweb-client could not read a 2xx response (e.g. no Content-Type): judged below
                if not responses or not responses[-1].ok:
                    raise DeliveryError(f"{where}: {type(exc).__name__}: {exc}") from exc
            response = responses[-1] if responses else None
            result = _response_dataset(response)
            failures = _failures(result)
            if failures:
                transient = all(r is not None and r >> 8 == 0xA7 for _, r in failures)
                code = response.status_code if response is not None else 0
                raise DeliveryError(f"{where}: HTTP {code}: {_describe_failures(failures)}",
                                    permanent=not transient)
            listed = _stored(result)
            if listed is not None and set(sent) - listed:
                missing = sorted(set(sent) - listed)
                raise DeliveryError(f"{where}: HTTP {response.status_code if response else 0}: "
                                    f"{len(missing)} instance(s) sent but not listed as stored "
                                    f"(first {missing[0]})")
            if response is not None and response.status_code == 202 and result is None:
                raise DeliveryError(f"{where}: HTTP 202 Accepted (some instances failed) with an unreadable "
                                    "response body")
            stored += sent
    finally:
        session.close()
    log.debug("stow_rs_sent", destination=destination.name, count=len(stored))
    return stored
