"""End to end: `qcnode serve` as a subprocess, DCMTK storescu sends ../shared/data/ct, the SRs reach
a test destination (which is down at first), `qcnode status` reports it, SIGTERM exits cleanly."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pydicom
import pytest
from sqlalchemy import select

from conftest import free_port
from daemon_helpers import (PROJECT_ROOT, Destination, checkpoint_for_tests, echoscu, serve_process,
                            stop_process, storescu, wait_for, wait_port, write_config)
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.models import Delivery, Instance, Series, SliceScore
from qcnode.report.read import read_series_sr


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


def _listeners(proc: "psutil.Process", port: int) -> set[int]:
    import psutil
    pids = set()
    for p in [proc, *proc.children(recursive=True)]:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in p.net_connections(kind="tcp")):
                pids.add(p.pid)
        except psutil.Error:
            pass
    return pids


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_receiving_processes_share_the_port_and_die_with_serve(tmp_path, port, shared_ct):
    """node.scp_processes = 2: two processes serve one listening socket (the balance itself is
    tested in test_activity_listener.py); four senders land in one database; kill -9 of `serve` takes its SCP and worker children with it."""
    import signal

    import psutil
    cfg_path = write_config(tmp_path, port, checkpoint=checkpoint_for_tests(tmp_path),
                            extra={"node": {"scp_processes": 2}})
    files = sorted((shared_ct / "philips_head_phantom").glob("I*.dcm"))[:8]
    proc = serve_process(cfg_path)
    engine = None
    try:
        wait_port(port, 120, proc)
        daemon = psutil.Process(proc.pid)
        # both processes hold the listening socket once serve is ready
        deadline = time.monotonic() + 60
        while len(_listeners(daemon, port)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_listeners(daemon, port)) == 2
        senders = [subprocess.Popen(["/usr/bin/storescu", "-aet", f"PACS{i}", "-aec", "QCNODE", "127.0.0.1",
                                     str(port), *map(str, files[i::4])], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE) for i in range(4)]
        assert [s.wait(120) for s in senders] == [0, 0, 0, 0]
        engine = make_engine(load_config(cfg_path).database_url)
        with session_factory(engine)() as s:
            assert len(s.scalars(select(Instance.id)).all()) == len(files)
        children = daemon.children(recursive=True)
        assert len(children) >= 2  # the other SCP and the worker (plus multiprocessing's tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        _, alive = psutil.wait_procs(children, timeout=20)

        def running(p: psutil.Process) -> bool:  # a killed orphan that init has not reaped yet is dead
            try:
                return p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False
        assert not [p.pid for p in alive if running(p)], "orphans left behind"
    finally:
        stop_process(proc)
        if engine is not None:
            engine.dispose()
