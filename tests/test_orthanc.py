"""A real PACS round trip: Debian's Orthanc receives a CT series from DCMTK storescu, its Lua
``OnStableSeries`` forwards the stable CT series to `qcnode serve`, and qcnode's SR comes back into
Orthanc (checked through Orthanc's REST API) referencing exactly the slices of that series."""
from __future__ import annotations

import io
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from daemon_helpers import (checkpoint_for_tests, serve_process, stop_process, wait_for, wait_port, write_config,
                            STORESCU)
from conftest import free_port
from orthanc_helpers import DICOMWEB_PLUGIN, ORTHANC, Orthanc
from qcnode.report.read import read_series_sr
from reliability_helpers import make_slices

pytestmark = [pytest.mark.orthanc, pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture
def orthanc_and_node(tmp_path, port):
    if not Path(ORTHANC).exists():
        pytest.fail("Orthanc not installed (scripts/setup.sh --test installs Debian's orthanc)")
    pacs = Orthanc(tmp_path / "orthanc", port)
    cfg_path = write_config(tmp_path, port, checkpoint=checkpoint_for_tests(tmp_path), destinations=[
        {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port, "send": ["sr"]}])
    node = serve_process(cfg_path)
    try:
        wait_port(port, 120, node)
        yield pacs, node
    finally:
        stop_process(node)
        pacs.stop()


def test_orthanc_forwards_stable_ct_and_receives_the_sr(tmp_path, orthanc_and_node, shared_ct):
    pacs, node = orthanc_and_node
    files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:5], tmp_path / "in", 5)
    sent = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    series_uid, study_uid = str(sent[0].SeriesInstanceUID), str(sent[0].StudyInstanceUID)
    t0 = time.monotonic()
    res = subprocess.run([STORESCU, "-aet", "SCANNER", "-aec", "ORTHANC", "127.0.0.1", str(pacs.dicom_port),
                          *map(str, files)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr

    def sr_series():
        found = pacs.post("/tools/find", {"Level": "Series", "Query": {"Modality": "SR"}, "Expand": True})
        return found if found and found[0].get("IsStable") else None
    found = wait_for(sr_series, 240, interval=1.0, what="qcnode's SR back in Orthanc")
    elapsed = time.monotonic() - t0
    assert len(found) == 1
    instances = found[0]["Instances"]
    assert len(instances) == 1  # one SR for the one CT series
    tags = pacs.get(f"/instances/{instances[0]}/simplified-tags")
    assert tags["Modality"] == "SR" and tags["StudyInstanceUID"] == study_uid
    sr = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{instances[0]}/file", raw=True)))
    parsed = read_series_sr(sr)
    assert parsed["source_series_instance_uid"] == series_uid
    assert {x["sop_instance_uid"] for x in parsed["slices"]} == {str(d.SOPInstanceUID) for d in sent}
    assert parsed["summary"]["n_slices"] == len(files)
    # Orthanc holds exactly the CT series and the SR series in that study (the SR was not bounced back)
    study = pacs.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
    assert len(study) == 1 and len(study[0]["Series"]) == 2
    ct = pacs.post("/tools/find", {"Level": "Series", "Query": {"SeriesInstanceUID": series_uid}, "Expand": True})
    assert len(ct[0]["Instances"]) == len(files)
    print(f"\northanc round trip: {len(files)} CT slices -> Orthanc -> qcnode -> SR in Orthanc in {elapsed:.1f}s")


def test_orthanc_pushes_a_study_to_qcnode_over_stow_rs(tmp_path, port, shared_ct):
    """Orthanc's DICOMweb client (POST /dicom-web/servers/qcnode/stow, with a bearer token of role
    store) sends a study to qcnode's STOW-RS endpoint: every instance is stored (no calling AE: it came
    over HTTP) and the series is grouped, becomes stable and is scored as if it had come over C-STORE."""
    from sqlalchemy import select

    from qcnode.config import load_config
    from qcnode.db.engine import make_engine, session_factory
    from qcnode.db.models import Instance, Series
    from qcnode.http.auth import token_sha256

    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.fail("Orthanc's DICOMweb plugin not installed (Debian's orthanc-dicomweb)")
    hport = free_port()
    cfg_path = write_config(tmp_path, port, checkpoint=checkpoint_for_tests(tmp_path),
                            extra={"http": {"enabled": True, "port": hport}})
    token = "orthanc-stow-token-4f1d"
    cfg_path.write_text(cfg_path.read_text() + f'[[http.tokens]]\nname = "orthanc"\nrole = "store"\n'
                                               f'sha256 = "{token_sha256(token)}"\n')
    node = serve_process(cfg_path)
    pacs = Orthanc(tmp_path / "orthanc", port, forward=False, dicomweb=True, dicomweb_servers={"qcnode": {
        "Url": f"http://127.0.0.1:{hport}/dicomweb/", "HttpHeaders": {"Authorization": f"Bearer {token}"}}})
    engine = None
    try:
        files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:5], tmp_path / "in", 5)
        sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        res = subprocess.run([STORESCU, "-aet", "SCANNER", "-aec", "ORTHANC", "127.0.0.1", str(pacs.dicom_port),
                              *map(str, files)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        wait_port(hport, 120, node)
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{hport}/readyz", timeout=5).status == 200, 120,
                 what="qcnode's /readyz")
        studies = pacs.get("/studies")
        assert len(studies) == 1
        out = pacs.post("/dicom-web/servers/qcnode/stow", {"Resources": studies})  # synchronous
        assert int(out["InstancesCount"]) == len(files), out
        engine = make_engine(load_config(cfg_path).database_url)
        sf = session_factory(engine)
        with sf() as s:
            rows = s.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sent))).all()
            assert {r.sop_instance_uid for r in rows} == sent and all(r.calling_ae is None for r in rows)

        def scored():
            with sf() as s:
                return s.scalar(select(Series.status).where(Series.series_instance_uid == series_uid)) == "scored"
        wait_for(scored, 240, interval=1.0, what="the series pushed over STOW-RS scored")
    finally:
        if engine is not None:
            engine.dispose()
        pacs.stop()
        stop_process(node)
    log_text = (tmp_path / "var" / "qcnode.log").read_text()
    assert '"token": "orthanc"' in log_text and token not in log_text
