"""End to end: `qcnode serve` as a subprocess, DCMTK storescu sends ../shared/data/ct, the SRs reach
a test destination (which is down at first), `qcnode status` reports it, SIGTERM exits cleanly."""
from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pytest
from sqlalchemy import select

from conftest import free_port
from daemon_helpers import (PROJECT_ROOT, Destination, checkpoint_for_tests, echoscu, serve_process,
                            stop_process, storescu, wait_for, wait_port, write_config)
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.models import Delivery, Instance, Series, SliceScore
from qcnode.dicom.sr import read_series_sr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_storescu_to_sr_at_destination(tmp_path, port, shared_ct):
    dest = Destination(free_port())
    cfg_path = write_config(tmp_path, port, destinations=[dest.config()], checkpoint=checkpoint_for_tests(tmp_path))
    proc = serve_process(cfg_path)
    try:
        wait_port(port, 120, proc)
        assert echoscu(port).returncode == 0
        files = sorted(shared_ct.glob("*/*.dcm"))
        res = storescu(port, files)
        assert res.returncode == 0, res.stderr
        cfg = load_config(cfg_path)
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)

        def first_failed_delivery():
            with sf() as s:
                return s.scalars(select(Delivery).where(Delivery.last_error.is_not(None))).first()
        wait_for(first_failed_delivery, 300, what="a failed delivery to the destination that is down")
        dest.start()  # the destination comes up: the outbox retries
        wait_for(lambda: len(dest.srs()) >= 2, 120, what="two SRs at the destination")

        with sf() as s:
            instances = s.scalars(select(Instance)).all()
            assert len(instances) == len(files)
            scored = {sc.instance_id for sc in s.scalars(select(SliceScore))}
            for inst in instances:
                assert (inst.id in scored) == inst.scorable, inst.sop_instance_uid
            assert sum(not i.scorable for i in instances) == 1  # the localizer: stored, not scored
            statuses = {x.series_instance_uid: x.status for x in s.scalars(select(Series))}
            by_series = {}
            for inst in instances:
                if inst.scorable:
                    by_series.setdefault(inst.series_id, set()).add(inst.sop_instance_uid)
        srs = dest.srs()
        assert len(srs) == 2  # exactly one SR per scored series
        referenced = [set(x["sop_instance_uid"] for x in read_series_sr(sr)["slices"]) for sr in srs]
        assert sorted(map(sorted, referenced)) == sorted(map(sorted, by_series.values()))
        assert sorted(statuses.values()) == ["scored", "scored", "skipped"]

        out = subprocess.run([sys.executable, "-m", "qcnode.cli", "status", "--config", str(cfg_path), "--json"],
                             capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
        st = json.loads(out.stdout)
        assert st["deliveries"] == {"delivered": 2} and st["jobs"].get("done") == 3 and st["results"] == 2
        engine.dispose()
    finally:
        assert stop_process(proc) == 0
        dest.stop()
    # no patient name or ID in any log line
    log_text = (tmp_path / "var" / "qcnode.log").read_text()
    for f in files[::7]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for value in (str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))):
            if len(value) >= 4:
                assert value not in log_text
    assert '"shutdown_complete"' in log_text
