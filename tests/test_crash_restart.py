"""kill -9 during ingest and during scoring, restart: every acknowledged instance is scored and each
series' SR is delivered exactly once."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest
from sqlalchemy import func, select

from conftest import free_port
from daemon_helpers import (STORESCU, Destination, checkpoint_for_tests, kill9, qcnode_cli, serve_process,
                            stop_process, storescu, wait_for, wait_port, write_config)
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.models import Instance, Job, Series, SeriesResult, SliceScore
from reliability_helpers import acknowledged_files, make_slices

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _setup(tmp_path, port, **worker):
    dest = Destination(free_port()).start()
    cfg_path = write_config(tmp_path, port, destinations=[dest.config()], checkpoint=checkpoint_for_tests(tmp_path),
                            extra={"series": {"stable_seconds": 2.0}, "worker": worker})
    cfg = load_config(cfg_path)
    return dest, cfg_path, cfg


def _kill_while_scoring(sf, proc, cfg_path, port) -> subprocess.Popen:
    """Wait until this ``serve`` runs a scoring job (a lease of a live process, not one left by the
    previous kill), kill -9 it, start it again; returns the new process."""
    def a_job_running_here():
        pids = {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))}
        with sf() as s:
            owners = s.scalars(select(Job.lease_owner).where(Job.status == "running"))
            return any(int(o.split(":")[1]) in pids for o in owners if o)
    wait_for(a_job_running_here, 120, interval=0.02, what="a running scoring job")
    kill9(proc)
    proc = serve_process(cfg_path)
    wait_port(port, 120, proc)
    return proc


def _check_exactly_once(sf, dest, n_scored_series: int) -> None:
    def settled():
        with sf() as s:
            open_jobs = s.scalar(select(func.count(Job.id)).where(Job.status.in_(["pending", "running"])))
            return open_jobs == 0 and len(dest.srs()) >= n_scored_series
    wait_for(settled, 300, what="all jobs done and SRs delivered")
    time.sleep(1.0)  # nothing more may arrive
    with sf() as s:
        scorable = s.scalars(select(Instance.id).where(Instance.scorable.is_(True))).all()
        scored = set(s.scalars(select(SliceScore.instance_id)).all())
        assert set(scorable) <= scored
        assert s.scalar(select(func.count(SeriesResult.id))) == n_scored_series
    uids = [str(d.SOPInstanceUID) for d in dest.srs()]
    assert len(uids) == n_scored_series == len(set(uids))


def test_kill_during_ingest(tmp_path, port, shared_ct):
    dest, cfg_path, cfg = _setup(tmp_path, port)
    files = sorted(shared_ct.glob("*/*.dcm"))
    proc = serve_process(cfg_path)
    engine = None
    try:
        wait_port(port, 120, proc)
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)
        sender = subprocess.Popen([STORESCU, "-aet", "PACS", "-aec", "QCNODE", "127.0.0.1", str(port),
                                   *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def some_stored():
            with sf() as s:
                return s.scalar(select(func.count(Instance.id))) >= 10
        wait_for(some_stored, 60, interval=0.02, what="10 stored instances")
        kill9(proc)
        sender.wait(60)
        with sf() as s:
            acknowledged_before = s.scalar(select(func.count(Instance.id)))
        assert acknowledged_before < len(files)  # the kill really interrupted the ingest
        proc = serve_process(cfg_path)  # restart; the PACS sends again what was not acknowledged (all)
        wait_port(port, 120, proc)
        assert storescu(port, files, "PACS").returncode == 0
        _check_exactly_once(sf, dest, 2)
        with sf() as s:
            assert s.scalar(select(func.count(Instance.id))) == len(files)
    finally:
        stop_process(proc)
        dest.stop()
        if engine is not None:
            engine.dispose()


def test_kill_during_scoring(tmp_path, port, shared_ct):
    dest, cfg_path, cfg = _setup(tmp_path, port)
    files = sorted(shared_ct.glob("*/*.dcm"))
    proc = serve_process(cfg_path)
    engine = None
    try:
        wait_port(port, 120, proc)
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)
        assert storescu(port, files, "PACS").returncode == 0

        def a_job_running():
            with sf() as s:
                return s.scalar(select(func.count(Job.id)).where(Job.status == "running"))
        wait_for(a_job_running, 120, interval=0.02, what="a running scoring job")
        kill9(proc)
        with sf() as s:
            assert s.scalar(select(func.count(Job.id)).where(Job.status == "running")) >= 1
            before = s.scalar(select(func.count(SeriesResult.id)))
        assert before < 2
        proc = serve_process(cfg_path)  # restart: the dead worker's lease is released at once
        _check_exactly_once(sf, dest, 2)
    finally:
        stop_process(proc)
        dest.stop()
        if engine is not None:
            engine.dispose()


def test_crash_loop_does_not_use_up_attempts(tmp_path, port, shared_ct):
    """Kills during scoring are interruptions, not failed attempts: with worker.max_attempts = 1 a
    job killed twice still runs to its SR (it used to give up: 'lease expired too many times')."""
    dest, cfg_path, cfg = _setup(tmp_path, port, max_attempts=1)
    proc = serve_process(cfg_path)
    engine = make_engine(cfg.database_url)
    sf = session_factory(engine)
    try:
        wait_port(port, 120, proc)
        assert storescu(port, sorted((shared_ct / "ge_head").glob("*.dcm")), "PACS").returncode == 0
        for _ in range(2):
            proc = _kill_while_scoring(sf, proc, cfg_path, port)

        def job_finished():
            with sf() as s:
                return s.scalars(select(Job).where(Job.status.in_(["done", "failed"]))).first()
        job = wait_for(job_finished, 300, what="the job done or failed")
        assert job.status == "done", job.last_error
        assert (job.attempts, job.interruptions) == (1, 2)
        _check_exactly_once(sf, dest, 1)
    finally:
        stop_process(proc)
        dest.stop()
        engine.dispose()


def test_job_that_gave_up_alerts_and_is_rescored(tmp_path, port, shared_ct):
    """A job that does give up (here: worker.max_interruptions = 0 and one kill) leaves its series
    ``failed``, logs ``series_gave_up`` at error level, shows an ALERT line in `qcnode status`,
    and `qcnode rescore --failed` gets the series its SR."""
    dest, cfg_path, cfg = _setup(tmp_path, port, max_interruptions=0, retry_failed_seconds=0.0)
    proc = serve_process(cfg_path)
    engine = make_engine(cfg.database_url)
    sf = session_factory(engine)
    try:
        wait_port(port, 120, proc)
        assert storescu(port, sorted((shared_ct / "ge_head").glob("*.dcm")), "PACS").returncode == 0
        proc = _kill_while_scoring(sf, proc, cfg_path, port)

        def series_failed():
            with sf() as s:
                return s.scalar(select(func.count(Series.id)).where(Series.status == "failed"))
        wait_for(series_failed, 120, what="the series failed")
        log_lines = [json.loads(x) for x in (tmp_path / "var" / "qcnode.log").read_text().splitlines()
                     if '"series_gave_up"' in x]
        assert log_lines and log_lines[0]["level"] == "error"
        status = qcnode_cli("status", "--config", str(cfg_path))
        assert "ALERT" in status.stdout and "1 series gave up scoring" in status.stdout, status.stdout
        rescore = qcnode_cli("rescore", "--failed", "--config", str(cfg_path))
        assert rescore.returncode == 0 and "queued (version 2)" in rescore.stdout, rescore.stderr
        _check_exactly_once(sf, dest, 1)
        with sf() as s:
            assert [x.status for x in s.scalars(select(Series))] == ["scored"]
        assert "ALERT" not in qcnode_cli("status", "--config", str(cfg_path)).stdout
    finally:
        stop_process(proc)
        dest.stop()
        engine.dispose()


def test_sigterm_to_the_process_group_while_receiving(tmp_path, port, shared_ct):
    """SIGTERM to the whole process group (systemd, Ctrl-C) while storescu sends to two SCP
    processes and plain TCP connections sit idle: every process exits within a few seconds, and
    every C-STORE answered with Success is stored (the one in progress finishes)."""
    cfg_path = write_config(tmp_path, port, checkpoint=checkpoint_for_tests(tmp_path),
                            extra={"node": {"scp_processes": 2}})
    cfg = load_config(cfg_path)
    files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm")), tmp_path / "in", 200)
    proc = serve_process(cfg_path, process_group=True)
    senders: list[subprocess.Popen] = []
    idle: list[socket.socket] = []
    try:
        wait_port(port, 120, proc)
        procs = wait_for(lambda: [psutil.Process(proc.pid), *psutil.Process(proc.pid).children()]
                         if len(psutil.Process(proc.pid).children()) == 2 else None, 60, what="scp1 and worker")
        senders = [subprocess.Popen([STORESCU, "-v", "-aet", f"PACS{i}", "-aec", "QCNODE", "-nh", "127.0.0.1",
                                     str(port), *map(str, files[i::2])], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for i in range(2)]
        stop_connecting = threading.Event()

        def connect_and_stay_idle() -> None:  # a load balancer's health checks, around the shutdown too
            while not stop_connecting.wait(0.01):
                try:
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=1))
                except OSError:
                    pass
        threading.Thread(target=connect_and_stay_idle, daemon=True).start()
        time.sleep(3.0)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=10)
        took = time.monotonic() - t0
        stop_connecting.set()
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # zombies: exited
        if alive:
            for p in alive:
                p.send_signal(signal.SIGABRT)  # faulthandler: the threads' stacks into serve.stderr
        assert not alive, f"still running {took:.0f} s after SIGTERM: {[p.pid for p in alive]}"
        acked = [f for s in senders for f in acknowledged_files(s.communicate(timeout=60)[0])]
        assert acked
        engine = make_engine(cfg.database_url)
        with session_factory(engine)() as s:
            stored = s.scalar(select(func.count(Instance.id)))
        engine.dispose()
        assert stored >= len(acked)
    finally:
        for sock in idle:
            sock.close()
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
        stop_process(proc, signal.SIGKILL)
