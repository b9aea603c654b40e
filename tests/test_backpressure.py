"""Back-pressure: below the free-disk watermark new associations are refused (transient, local limit
exceeded) and C-STOREs on an open association get 0xA700 out of resources -- nothing is acknowledged
and lost; a destination that is down gets its SR later; dead letters show in `qcnode status`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from conftest import free_port
from daemon_helpers import (PROJECT_ROOT, Destination, checkpoint_for_tests, serve_process, stop_process, storescu,
                            wait_for, wait_port, write_config)
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.models import Delivery, Instance
from qcnode.ingest import scp as scp_mod
from reliability_helpers import make_slices, start_scp

HUGE_MB = 10**9  # a watermark no disk can meet


def test_watermark_refuses_associations_and_stores(tmp_path, port, shared_ct):
    files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:3], tmp_path / "in", 3)
    node = start_scp(tmp_path, port)
    try:
        # an association already open when the disk fills: each C-STORE answers 0xA700, none is recorded
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
        assert assoc.is_established
        node.cfg.storage.min_free_disk_mb = HUGE_MB
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
        assoc.release()
        assert statuses == [scp_mod.OUT_OF_RESOURCES] * 3
        # a new association is rejected outright (transient: the sender keeps its data and retries)
        res = storescu(port, files, "PACS")
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "Association Rejected" in out and "Local Limit Exceeded" in out, out
        with node.sf() as s:
            assert s.scalar(select(func.count(Instance.id))) == 0
        spool = node.cfg.path(node.cfg.storage.spool_dir)
        assert not list(spool.rglob("*.dcm"))
        # disk space back: the retry stores everything
        node.cfg.storage.min_free_disk_mb = 1
        assert storescu(port, files, "PACS").returncode == 0
        with node.sf() as s:
            assert s.scalar(select(func.count(Instance.id))) == 3
    finally:
        node.stop()


def _status(cfg_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcnode.cli", "status", "--config", str(cfg_path), *args],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_down_destination_gets_sr_later_and_dead_letters_in_status(tmp_path, port, shared_ct):
    late = Destination(free_port(), "LATEPACS")  # down now, up later
    never_port = free_port()  # nothing ever listens here
    cfg_path = write_config(tmp_path, port, checkpoint=checkpoint_for_tests(tmp_path), destinations=[
        {**late.config(), "name": "late"},
        {"name": "gone", "ae_title": "GONE", "host": "127.0.0.1", "port": never_port, "send": ["sr"]}],
        extra={"outbox": {"max_attempts": 3, "backoff_initial_seconds": 0.3, "backoff_max_seconds": 1.0,
                          "send_timeout_seconds": 3.0}})
    files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:3], tmp_path / "in", 3)
    proc = serve_process(cfg_path)
    cfg = load_config(cfg_path)
    engine = make_engine(cfg.database_url)
    sf = session_factory(engine)
    try:
        wait_port(port, 120, proc)
        assert storescu(port, files, "PACS").returncode == 0

        def failed_once(dest_name: str):
            with sf() as s:
                return s.scalars(select(Delivery).where(Delivery.destination == dest_name,
                                                        Delivery.last_error.is_not(None))).first()
        wait_for(lambda: failed_once("late"), 180, what="a failed delivery to the destination that is down")
        late.start()
        wait_for(lambda: late.srs(), 60, what="the SR at the destination once it is up")

        def dead():
            with sf() as s:
                return s.scalars(select(Delivery).where(Delivery.status == "dead")).first()
        wait_for(dead, 120, what="the undeliverable SR in dead-letter")
        with sf() as s:
            rows = {d.destination: (d.status, d.attempts) for d in s.scalars(select(Delivery))}
        assert rows["late"][0] == "delivered" and rows["late"][1] >= 2
        assert rows["gone"] == ("dead", 3)
        st = json.loads(_status(cfg_path, "--json").stdout)
        assert [d["destination"] for d in st["dead_letters"]] == ["gone"]
        assert st["deliveries"] == {"delivered": 1, "dead": 1}
        text = _status(cfg_path)
        assert text.returncode == 0 and "dead letters:" in text.stdout and "destination=gone" in text.stdout
        assert len(late.srs()) == 1
    finally:
        stop_process(proc)
        late.stop()
        engine.dispose()
