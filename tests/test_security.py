"""Security: AE-title and IP allow-lists, TLS (certificates made in the test with the openssl CLI;
DCMTK storescu --tls as the peer; plain connections refused), no patient name or ID in any log
line, owner-only database / spool / quarantine / log / key files."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from conftest import free_port
from daemon_helpers import (Destination, STORESCU, checkpoint_for_tests, serve_process, stop_process, storescu,
                            wait_for, wait_port, write_config)
from qcnode.db.models import Instance, Study
from reliability_helpers import make_slices, start_scp


def _count(node) -> int:
    with node.sf() as s:
        return int(s.scalar(select(func.count(Instance.id))))


def test_ae_title_allow_list(tmp_path, port, shared_ct):
    files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:2], tmp_path / "in", 2)
    node = start_scp(tmp_path, port, node={"allowed_ae_titles": ["PACS", "SCANNER1"]})
    try:
        res = storescu(port, files, "INTRUDER")
        assert res.returncode != 0 and "Association Rejected" in res.stdout + res.stderr
        assert "Calling AE Title Not Recognized" in res.stdout + res.stderr
        assert _count(node) == 0
        assert storescu(port, files, "SCANNER1").returncode == 0
        assert _count(node) == 2
    finally:
        node.stop()


@pytest.mark.parametrize("allowed,accepted", [(["10.20.0.0/16", "192.168.1.7"], False),
                                              (["10.20.0.0/16", "127.0.0.0/8"], True),
                                              (["127.0.0.1"], True)])
def test_ip_allow_list(tmp_path, port, shared_ct, allowed, accepted):
    files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:1], tmp_path / "in", 1)
    node = start_scp(tmp_path, port, node={"allowed_ips": allowed})
    try:
        res = storescu(port, files, "PACS")
        assert (res.returncode == 0) is accepted, res.stdout + res.stderr
        assert _count(node) == (1 if accepted else 0)
        if not accepted:
            assert "Association Rejected" in res.stdout + res.stderr
    finally:
        node.stop()


def _make_cert(dir_: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    key, cert = dir_ / f"{name}.key", dir_ / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return key, cert


@pytest.fixture
def certs(tmp_path):
    d = tmp_path / "tls"
    d.mkdir()
    return {"server": _make_cert(d, "qcnode"), "client": _make_cert(d, "pacs")}


def test_tls_required_plain_refused(tmp_path, port, shared_ct, certs):
    files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:2], tmp_path / "in", 2)
    skey, scert = certs["server"]
    node = start_scp(tmp_path, port, node={"tls_enabled": True, "tls_cert": str(scert), "tls_key": str(skey)})
    try:
        plain = storescu(port, files[:1], "PACS", timeout=60)
        assert plain.returncode != 0  # a plain DICOM association cannot talk to the TLS port
        assert _count(node) == 0
        # anonymous TLS client that verifies the node's certificate
        res = storescu(port, files, "PACS", "+tla", "+cf", str(scert))
        assert res.returncode == 0, res.stdout + res.stderr
        assert _count(node) == 2
        # a client that does not trust the node's certificate refuses to talk to it
        _, other = certs["client"]
        bad = storescu(port, files[:1], "PACS", "+tla", "+cf", str(other), timeout=60)
        assert bad.returncode != 0
    finally:
        node.stop()


def test_tls_client_certificate_required(tmp_path, port, shared_ct, certs):
    files = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:1], tmp_path / "in", 1)
    skey, scert = certs["server"]
    ckey, ccert = certs["client"]
    node = start_scp(tmp_path, port, node={"tls_enabled": True, "tls_cert": str(scert), "tls_key": str(skey),
                                           "tls_ca": str(ccert), "tls_require_client_cert": True})
    try:
        anon = storescu(port, files, "PACS", "+tla", "+cf", str(scert), timeout=60)
        assert anon.returncode != 0 and _count(node) == 0
        res = storescu(port, files, "PACS", "+tls", str(ckey), str(ccert), "+cf", str(scert))
        assert res.returncode == 0, res.stdout + res.stderr
        assert _count(node) == 1
        # pynetdicom as a TLS client with the same client certificate
        import ssl

        from pynetdicom import AE
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(scert))
        ctx.load_cert_chain(str(ccert), str(ckey))
        ae = AE(ae_title="PYTLS")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE", tls_args=(ctx, "127.0.0.1"))
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
    finally:
        node.stop()


def test_tls_node_keeps_accepting_while_a_connection_sends_nothing(tmp_path, port, certs):
    """A plain TCP connection that sends nothing (no TLS ClientHello) stopped pynetdicom's accepting
    thread in the TLS handshake: no other peer was accepted. Now the handshake waits in the
    connection's own thread, and the node closes the silent connection after node.artim_timeout."""
    import socket
    import ssl

    from pynetdicom import AE
    skey, scert = certs["server"]
    node = start_scp(tmp_path, port, node={"tls_enabled": True, "tls_cert": str(scert), "tls_key": str(skey)})
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as silent:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(scert))
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                 server_hostname="127.0.0.1") as tls:  # the handshake is answered
                assert tls.version() is not None
            ae = AE(ae_title="PYTLS")
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE", tls_args=(ctx, "127.0.0.1"))
            assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
            assoc.release()
            assert silent.recv(1) == b""  # closed by the node (ARTIM), well before the 15 s
    finally:
        node.stop()


PATIENT = ("Zyxwvut^Qwertina^Marie", "PID-H6-7731942")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_no_phi_in_logs_and_owner_only_files(tmp_path, port, shared_ct):
    """Full daemon at debug level: good series, bad input, delivery failure; the logs never contain the
    patient's name or ID, and every file the node creates is owner-only."""
    dest = Destination(free_port())
    cfg_path = write_config(tmp_path, port, destinations=[dest.config()], checkpoint=checkpoint_for_tests(tmp_path),
                            extra={"logging": {"level": "debug"}})
    good = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:4], tmp_path / "good", 4, patient=PATIENT)
    bad_dir = tmp_path / "bad"
    bad = make_slices(sorted((shared_ct / "ge_head").glob("*.dcm"))[:2], bad_dir, 2, patient=PATIENT)
    ds = pydicom.dcmread(bad[0])
    ds.PixelData = ds.PixelData[:1000]  # inconsistent pixel data -> refused, quarantined
    ds.save_as(bad[0])
    ds = pydicom.dcmread(bad[1])
    ds.Modality = "MR"  # CT storage claiming MR -> refused
    ds.save_as(bad[1])
    old_umask = os.umask(0o022)  # a permissive umask in the parent: the node must not inherit it
    try:
        proc = serve_process(cfg_path)
    finally:
        os.umask(old_umask)
    try:
        wait_port(port, 120, proc)
        assert storescu(port, good, "PACS").returncode == 0
        storescu(port, bad, "PACS")
        from qcnode.config import load_config
        from qcnode.db.engine import make_engine, session_factory
        from qcnode.db.models import Delivery
        cfg = load_config(cfg_path)
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)
        wait_for(lambda: _first_delivery_error(sf, Delivery), 180, what="a failed delivery (destination down)")
        dest.start()
        wait_for(lambda: dest.srs(), 120, what="the SR at the destination")
        with sf() as s:
            keys = list(s.scalars(select(Study.patient_key)))
        assert keys and PATIENT[1] not in keys  # pseudonymised in the database too
        engine.dispose()
    finally:
        assert stop_process(proc) == 0
        dest.stop()
    logs = (tmp_path / "var" / "qcnode.log").read_text() + (tmp_path / "serve.stderr").read_text()
    assert '"store_refused"' in logs and '"series_scored"' in logs  # the interesting paths were logged
    needles = [PATIENT[1], *[p for p in PATIENT[0].split("^") if len(p) >= 4], PATIENT[0]]
    for line in logs.splitlines():
        for needle in needles:
            assert needle.lower() not in line.lower(), f"PHI {needle!r} in log line: {line[:200]}"
    # owner-only permissions on everything the node created
    var = tmp_path / "var"
    checked = 0
    for p in [var, *var.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} has mode {oct(mode)}"
        checked += 1
    assert (var / "qcnode.db").is_file() and (var / "pseudonym.key").is_file()
    assert list((var / "spool").rglob("*.dcm")) and list((var / "quarantine").rglob("*.reason.json"))
    print(f"\nsecurity: {len(logs.splitlines())} log lines free of PHI; {checked} files/folders owner-only")


def _first_delivery_error(sf, Delivery):
    with sf() as s:
        return s.scalars(select(Delivery).where(Delivery.last_error.is_not(None))).first()
