"""A real Orthanc (Debian's ``orthanc``, optionally with ``orthanc-dicomweb``) for the tests:
its own storage and ports on loopback, started and stopped by the test."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from conftest import free_port
from daemon_helpers import stop_process, wait_for

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb
DICOMWEB_ROOT = "/dicom-web/"

# Forward every stable CT series to qcnode; never the SRs that come back (no loop). The store goes
# through Orthanc's job engine (REST /modalities/{id}/store): Lua's synchronous SendToModality fails
# in Debian's Orthanc 1.10 with "Unable to read attachment dicom of instance".
LUA_FORWARD = """
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    RestApiPost('/modalities/qcnode/store', seriesId, false)
  end
end
"""


class Orthanc:
    """An Orthanc instance on loopback with its own storage, stopped on ``stop()``.

    ``forward``: the Lua script that sends stable CT series to qcnode on ``qcnode_port``.
    ``dicomweb``: load the DICOMweb plugin (STOW/QIDO/WADO-RS under ``dicomweb_url``).
    ``dicomweb_servers``: the plugin's DICOMweb peers ({name: URL or {"Url", "HttpHeaders"}}).
    ``users``: {user: password}; when given, the REST API and DICOMweb need HTTP basic auth (the
    first user is the one this helper uses). ``start=False``: ports are chosen and the
    configuration written, but the server starts only on ``start()`` (a peer that is down at first).
    """

    def __init__(self, workdir: Path, qcnode_port: int = 0, qcnode_aet: str = "QCNODE", *,
                 forward: bool = True, dicomweb: bool = False, users: dict[str, str] | None = None,
                 dicomweb_servers: dict[str, Any] | None = None, start: bool = True):
        self.http_port, self.dicom_port = free_port(), free_port()
        self.workdir = workdir
        self.users = dict(users or {})
        self.proc: subprocess.Popen | None = None
        self.log = None
        workdir.mkdir(parents=True, exist_ok=True)
        lua = []
        if forward:
            (workdir / "forward.lua").write_text(LUA_FORWARD)
            lua = [str(workdir / "forward.lua")]
        config = {
            "Name": "qcnode-test", "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
            "DicomModalities": {"qcnode": [qcnode_aet, "127.0.0.1", qcnode_port]} if forward else {},
            "StableAge": 2, "LuaScripts": lua, "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
            "DicomCheckCalledAet": False, "HttpTimeout": 30, "ConcurrentJobs": 1,
        }
        if self.users:
            config["RegisteredUsers"] = self.users
        if dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_ROOT, "Servers": dict(dicomweb_servers or {})}
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=1))
        if start:
            self.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (STOW-RS posts to ``{dicomweb_url}/studies``)."""
        return self.base_url + DICOMWEB_ROOT.rstrip("/")

    def start(self) -> "Orthanc":
        self.log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.workdir / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        try:
            wait_for(self._up, 60, interval=0.3, what="Orthanc's REST API")
        except BaseException:
            self.stop()
            raise
        return self

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def _request(self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None,
                 method: str = "GET") -> bytes:
        headers = dict(headers or {})
        if self.users:
            user, password = next(iter(self.users.items()))
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def get(self, path: str, raw: bool = False):
        data = self._request(path)
        return data if raw else json.loads(data)

    def post(self, path: str, body: dict):
        return json.loads(self._request(path, json.dumps(body).encode(), {"Content-Type": "application/json"},
                                        "POST"))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None
