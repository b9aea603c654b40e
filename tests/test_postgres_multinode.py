"""Multi-node on one PostgreSQL: two receiving processes (`qcnode serve --no-worker`) share one spool
folder, two worker processes (`qcnode serve --no-scp`) share the job queue and the outbox. One series
arrives half through each receiver. Every instance is stored once, every series version is scored by
exactly one worker (no job done twice, none lost) and its SR is delivered exactly once."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from conftest import free_port
from daemon_helpers import (PROJECT_ROOT, Destination, checkpoint_for_tests, serve_process, stop_process, storescu,
                            wait_for, wait_port, write_config)
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.models import Delivery, Instance, Job, Series, SeriesResult, SliceScore
from reliability_helpers import make_slices

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(600)]


def _node_config(base: Path, name: str, port: int, pg_url: str, shared: Path, checkpoint: Path,
                 dest: Destination) -> Path:
    d = base / name
    d.mkdir()
    return write_config(d, port, db_url=pg_url, checkpoint=checkpoint, destinations=[dest.config()], extra={
        "storage": {"spool_dir": str(shared / "spool"), "quarantine_dir": str(shared / "quarantine")},
        "privacy": {"pseudonym_key_file": str(shared / "pseudonym.key")},
        "worker": {"lease_seconds": 120.0}})


def _events(log: Path, name: str) -> list[dict]:
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == name:
            out.append(rec)
    return out


def test_two_receivers_two_workers_share_one_postgresql(tmp_path, pg_url, shared_ct):
    dest = Destination(free_port()).start()
    ckpt = checkpoint_for_tests(tmp_path)
    shared = tmp_path / "shared"
    p1, p2 = free_port(), free_port()
    cfgs = {"scp1": _node_config(tmp_path, "scp1", p1, pg_url, shared, ckpt, dest),
            "scp2": _node_config(tmp_path, "scp2", p2, pg_url, shared, ckpt, dest),
            "work1": _node_config(tmp_path, "work1", free_port(), pg_url, shared, ckpt, dest),
            "work2": _node_config(tmp_path, "work2", free_port(), pg_url, shared, ckpt, dest)}
    # the schema once, as an operator would (`qcnode db upgrade`); every process also checks on start
    subprocess.run([sys.executable, "-m", "qcnode.cli", "db", "upgrade", "--config", str(cfgs["scp1"])],
                   check=True, cwd=PROJECT_ROOT, capture_output=True, timeout=120)
    procs = {"scp1": serve_process(cfgs["scp1"], "--no-worker"), "scp2": serve_process(cfgs["scp2"], "--no-worker"),
             "work1": serve_process(cfgs["work1"], "--no-scp"), "work2": serve_process(cfgs["work2"], "--no-scp")}
    logs = {k: c.parent / "var" / "qcnode.log" for k, c in cfgs.items()}
    engine = make_engine(pg_url)
    sf = session_factory(engine)
    try:
        wait_port(p1, 120, procs["scp1"])
        wait_port(p2, 120, procs["scp2"])
        for w in ("work1", "work2"):
            wait_for(lambda w=w: _events(logs[w], "model_loaded") or procs[w].poll() is not None, 120,
                     what=f"{w} ready")
            assert procs[w].poll() is None, f"{w} exited"
        sources = sorted((shared_ct / "ge_head").glob("*.dcm"))[:6]
        per_node: dict[int, list[Path]] = {p1: [], p2: []}
        for i in range(6):  # six series, three through each receiver
            per_node[p1 if i % 2 == 0 else p2] += make_slices(sources, tmp_path / "in" / f"s{i}", 4)
        split = make_slices(sources, tmp_path / "in" / "split", 6)  # one series through both receivers
        per_node[p1] += split[:3]
        per_node[p2] += split[3:]
        results: dict[int, subprocess.CompletedProcess] = {}
        senders = [threading.Thread(target=lambda p=p: results.__setitem__(p, storescu(p, per_node[p], "PACS")))
                   for p in per_node]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        assert all(r.returncode == 0 for r in results.values()), [r.stderr for r in results.values()]
        n_files = sum(len(v) for v in per_node.values())

        def settled():
            with sf() as s:
                open_jobs = s.scalar(select(func.count(Job.id)).where(Job.status.in_(["pending", "running"])))
                open_series = s.scalar(select(func.count(Series.id)).where(Series.status.in_(["receiving", "stable"])))
                undelivered = s.scalar(select(func.count(Delivery.id)).where(Delivery.status != "delivered"))
                n_results = s.scalar(select(func.count(SeriesResult.id)))
                return open_jobs == 0 and open_series == 0 and undelivered == 0 and n_results >= 7
        wait_for(settled, 300, interval=0.5, what="all 7 series scored and delivered")

        with sf() as s:
            assert s.scalar(select(func.count(Instance.id))) == n_files
            assert s.scalar(select(func.count(Series.id))) == 7
            assert set(s.scalars(select(Series.status))) == {"scored"}
            per_version = Counter(s.execute(select(SeriesResult.series_id, SeriesResult.version)).all())
            assert max(per_version.values()) == 1
            scorable = set(s.scalars(select(Instance.id).where(Instance.scorable.is_(True))))
            current = select(Series.id, Series.version).subquery()
            scored = Counter(s.execute(select(SliceScore.instance_id).join(
                current, (current.c.id == SliceScore.series_id)
                & (current.c.version == SliceScore.series_version))).scalars())
            assert set(scored) == scorable and max(scored.values()) == 1
            jobs = s.scalars(select(Job)).all()
            assert all(j.status == "done" for j in jobs)
            sr_uids = set(s.scalars(select(SeriesResult.sr_sop_instance_uid)))
            n_results = len(per_version)
        # every instance file is in the one shared spool
        spool_files = {p.stem for p in (shared / "spool").rglob("*.dcm") if "sr" not in p.parts}
        with sf() as s:
            assert set(s.scalars(select(Instance.sop_instance_uid))) <= spool_files
        # no job processed twice: each job started and each series version scored by exactly one worker
        started = Counter(e["job_id"] for w in ("work1", "work2") for e in _events(logs[w], "job_started"))
        assert started and max(started.values()) == 1
        scored_by = {w: len(_events(logs[w], "series_scored")) for w in ("work1", "work2")}
        assert sum(scored_by.values()) == n_results
        assert all(n >= 1 for n in scored_by.values()), f"one worker did all the work: {scored_by}"
        received = Counter(str(d.SOPInstanceUID) for d in dest.srs())
        assert set(received) == sr_uids and max(received.values()) == 1  # each SR delivered exactly once
        print(f"\npostgres multi-node: {n_files} instances via 2 receivers, {n_results} series versions scored "
              f"by 2 workers {scored_by}, {len(received)} SRs delivered once each")
    finally:
        for p in procs.values():
            stop_process(p)
        dest.stop()
        engine.dispose()
