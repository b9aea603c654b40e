"""Receiving goes first: the SCP's activity mark, the worker's pacing, and the balanced shared listener."""
from __future__ import annotations

import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from daemon_helpers import copy_series, write_config
from qcnode.ingest.activity import ACTIVITY_FILE, Pacer, ReceiveActivity
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory, upgrade
from qcnode.net.listener import open_shared_listener
from qcnode.ingest.scp import StorageSCP
from qcnode.ingest.spool import Spool


def test_activity_is_shared_through_the_file(tmp_path):
    writer = ReceiveActivity(tmp_path / ACTIVITY_FILE)
    reader = ReceiveActivity(tmp_path / ACTIVITY_FILE)  # another process maps the same file
    assert reader.seconds_since() == float("inf")      # never marked
    writer.mark(now=100.0)
    assert reader.seconds_since(now=100.5) == pytest.approx(0.5)
    writer.mark()
    assert reader.seconds_since() < 1.0
    assert (tmp_path / ACTIVITY_FILE).stat().st_mode & 0o077 == 0


def test_pacer_holds_back_only_while_receiving(tmp_path):
    activity = ReceiveActivity(tmp_path / ACTIVITY_FILE)
    pacer = Pacer(activity, duty=0.25, window_s=1.0)
    time.sleep(0.02)
    assert pacer.pace() == 0.0                       # nothing received: full speed
    activity.mark()
    time.sleep(0.03)                                 # 30 ms of "work" while receiving
    slept = pacer.pace()
    assert 0.08 <= slept <= 0.2                      # busy * (1 - 0.25) / 0.25 = 90 ms (plus timer slack)
    assert Pacer(activity, duty=1.0).pace() == 0.0   # duty 1: never hold back
    activity.mark(now=time.monotonic() - 5.0)        # last C-STORE 5 s ago: outside the window
    time.sleep(0.02)
    assert pacer.pace() == 0.0
    assert Pacer(None).pace() == 0.0                  # no activity file: never hold back


def _node(tmp_path, port, **node):
    cfg = load_config(write_config(tmp_path, port, extra={"node": node}))
    upgrade(cfg.database_url)
    engine = make_engine(cfg.database_url)
    return cfg, engine, session_factory(engine)


def test_store_marks_activity(tmp_path, port, shared_ct):
    cfg, engine, sf = _node(tmp_path, port)
    spool = Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir))
    scp = StorageSCP(cfg, sf, spool)
    scp.start()
    try:
        seen = ReceiveActivity(spool.root / ACTIVITY_FILE)
        assert seen.seconds_since() == float("inf")
        f = copy_series(shared_ct / "philips_head_phantom", tmp_path / "a", n=1)[0]
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
        assert int(assoc.send_c_store(f).Status) == 0
        assoc.release()
        assert seen.seconds_since() < 5.0
    finally:
        scp.stop(grace_seconds=2)
        engine.dispose()


def test_shared_listener_spreads_associations_evenly(tmp_path, port):
    """Two SCPs on one listening socket (as two processes would be): four associations opened one
    after the other land 2 / 2, whatever the kernel's wake-up order, and the counts fall back to 0."""
    cfg, engine, sf = _node(tmp_path, port)
    spool = Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir))
    listener = open_shared_listener("127.0.0.1", port, 2)
    scps = [StorageSCP(cfg, sf, spool) for _ in range(2)]
    for i, scp in enumerate(scps):
        scp.start(listener=listener.for_process(i))
    assocs = []
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        for n in range(1, 5):
            assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
            assert assoc.is_established
            assocs.append(assoc)
            deadline = time.monotonic() + 5
            while sum(listener.loads) < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sum(listener.loads) == n
            assert max(listener.loads) - min(listener.loads) <= 1, list(listener.loads)
        assert list(listener.loads) == [2, 2]
        assert [len(s.ae.active_associations) for s in scps] == [2, 2]
        assert all(int(a.send_c_echo().Status) == 0 for a in assocs)
        for a in assocs:
            a.release()
        deadline = time.monotonic() + 10
        while sum(listener.loads) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(listener.loads) == [0, 0]
    finally:
        for a in assocs:
            if a.is_established:
                a.abort()
        for scp in scps:
            scp.stop(grace_seconds=2)
        engine.dispose()


@pytest.mark.parametrize("worker", [{"duty_while_receiving": 0.0}, {"duty_while_receiving": 1.5},
                                    {"receiving_window_seconds": -1.0}])
def test_pacing_config_is_validated(tmp_path, port, worker):
    from qcnode.config import ConfigError
    with pytest.raises(ConfigError, match="worker."):
        load_config(write_config(tmp_path, port, extra={"worker": worker}))


def test_fast_recv_reads_whole_pdus_and_stops_at_close():
    """The SCP's association socket reads a PDU into one buffer: same bytes as pynetdicom's chunked recv."""
    import os
    import socket
    import threading

    from qcnode.net.pdu import FastRecvSocket
    a, b = socket.socketpair()
    b.settimeout(10)
    sock = object.__new__(FastRecvSocket)  # only .socket is used by recv()
    sock.socket = b
    payload = os.urandom(300_000)
    sender = threading.Thread(target=lambda: (a.sendall(payload), a.close()))
    sender.start()
    first = sock.recv(6)
    rest = sock.recv(len(payload) - 6 - 1000)
    tail = sock.recv(5000)  # only 1000 bytes left before the peer closed: returns those
    sender.join()
    assert isinstance(rest, bytearray) and bytes(first + rest + tail) == payload and len(tail) == 1000
    assert sock.recv(10) == bytearray()
    b.close()
