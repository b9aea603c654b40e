"""Raw PatientIDs / AccessionNumbers stored while ``privacy.pseudonymise_patient_id`` was off are
pseudonymised later (qcnode.db.pseudonyms): by the function, ``qcnode db pseudonymise`` and at
``serve`` start, with the key ingest uses, so that later studies of the same patient match."""
from __future__ import annotations

import dataclasses
import io
import stat
import threading

import pydicom
import pytest
import structlog
from pydicom.uid import generate_uid
from sqlalchemy import select

from daemon_helpers import write_config
from qcnode.cli import main
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory, upgrade
from qcnode.db.models import Study
from qcnode.db.pseudonyms import is_pseudonym, pseudonymise_stored_ids
from qcnode.dicom.privacy import load_or_create_key, pseudonymise

KEY = b"5e0c" * 16


def _add(sf, *keys: tuple[str | None, str | None]) -> list[int]:
    """Studies with these (patient_key, accession_key); their ids."""
    with sf() as s:
        studies = [Study(study_instance_uid=generate_uid(), patient_key=p, accession_key=a) for p, a in keys]
        s.add_all(studies)
        s.commit()
        return [st.id for st in studies]


def _keys(sf) -> dict[int, tuple[str | None, str | None]]:
    with sf() as s:
        return {i: (p, a) for i, p, a in s.execute(select(Study.id, Study.patient_key, Study.accession_key)
                                                       .order_by(Study.id))}


def _mixed(sf, key: bytes) -> tuple[list[int], dict[int, tuple[str | None, str | None]]]:
    """Raw, pseudonymised and missing keys; returns the ids and the keys expected afterwards."""
    done_p, done_a = pseudonymise("P-2", key), pseudonymise("A-2", key)
    rows = [("P-1", "A-1"),                 # both raw
            (done_p, "A-3"),                # patient done, accession raw
            ("P-4", None),                  # raw patient, no accession
            (None, None),                   # nothing stored
            (done_p, done_a),               # already pseudonymised
            ("F" * 64, "ab" * 32)]          # 64 upper-case hex: raw; 64 lower-case hex: taken as a pseudonym
    ids = _add(sf, *rows)
    expected = [(pseudonymise("P-1", key), pseudonymise("A-1", key)), (done_p, pseudonymise("A-3", key)),
                (pseudonymise("P-4", key), None), (None, None), (done_p, done_a),
                (pseudonymise("F" * 64, key), "ab" * 32)]
    return ids, dict(zip(ids, expected))


def test_raw_keys_become_the_pseudonyms_ingest_gives(sf):
    ids, expected = _mixed(sf, KEY)
    with sf() as s:
        assert pseudonymise_stored_ids(s, KEY) == 4
        s.commit()
    assert _keys(sf) == expected
    assert all(v is None or is_pseudonym(v) for pair in _keys(sf).values() for v in pair)
    with sf() as s:  # a second run finds nothing to do
        assert pseudonymise_stored_ids(s, KEY) == 0
        s.commit()
    assert _keys(sf) == expected


def test_the_caller_commits(sf):
    (sid,) = _add(sf, ("P-1", "A-1"))
    with sf() as s:
        assert pseudonymise_stored_ids(s, KEY) == 1
        s.rollback()
    assert _keys(sf) == {sid: ("P-1", "A-1")}


# ----------------------------------------------------------------------------- qcnode db pseudonymise
def _config(tmp_path, db_url: str, on: bool = True):
    key_file = tmp_path / "keys" / "pseudonym.key"
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\ndatabase_url = "{db_url}"\n'
                    f'[privacy]\npseudonymise_patient_id = {"true" if on else "false"}\n'
                    f'pseudonym_key_file = "{key_file}"\n')
    return path, key_file


def _one_line(capsys, prefix: str, text: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qcnode {prefix}: ") and text in err[0], err


def test_cli_pseudonymises_on_demand(sf, db_url, tmp_path, capsys):
    config, key_file = _config(tmp_path, db_url)
    key = load_or_create_key(key_file)
    ids, expected = _mixed(sf, key)
    assert main(["db", "pseudonymise", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "4 studies pseudonymised"
    assert _keys(sf) == expected
    assert main(["db", "pseudonymise", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "0 studies pseudonymised"
    assert _keys(sf) == expected


def test_cli_refuses_while_the_option_is_off(sf, db_url, tmp_path, capsys):
    config, key_file = _config(tmp_path, db_url, on=False)
    (sid,) = _add(sf, ("P-1", "A-1"))
    assert main(["db", "pseudonymise", "--config", str(config)]) == 2
    _one_line(capsys, "db pseudonymise", "privacy.pseudonymise_patient_id is false")
    assert _keys(sf) == {sid: ("P-1", "A-1")}
    assert not key_file.exists()


def test_cli_refuses_an_old_schema(tmp_path, capsys):
    config, _ = _config(tmp_path, f"sqlite:///{tmp_path / 'never-migrated.db'}")
    assert main(["db", "pseudonymise", "--config", str(config)]) == 2
    _one_line(capsys, "db pseudonymise", "not at the current revision")


# ----------------------------------------------------------------------------- serve start
@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
def test_serve_start_pseudonymises_once_migrated(tmp_path, monkeypatch, on):
    from qcnode.service import daemon
    url = f"sqlite:///{tmp_path / 'q.db'}"
    cfg = load_config(write_config(tmp_path, 11112, db_url=url,
                                   extra={"privacy": {"pseudonymise_patient_id": on}}))
    upgrade(url)
    engine = make_engine(url)
    sf = session_factory(engine)
    try:
        (sid,) = _add(sf, ("P-1", "A-1"))
        # only the start: no signal handlers, logging, umask or pydicom settings of this test process
        for name in ("_stop_on_signals", "configure_logging", "_fast_dicom_reading"):
            monkeypatch.setattr(daemon, name, lambda *a, **k: None)
        monkeypatch.setattr(daemon.os, "umask", lambda mask: 0o022)
        stop = threading.Event()
        stop.set()
        with structlog.testing.capture_logs() as logs:
            assert daemon.run_process(cfg, daemon.ProcessPlan(daemon.Roles()), stop=stop) == 0
        done = [e for e in logs if e["event"] == "stored_ids_pseudonymised"]
        if on:
            key = load_or_create_key(cfg.path(cfg.privacy.pseudonym_key_file))
            assert _keys(sf) == {sid: (pseudonymise("P-1", key), pseudonymise("A-1", key))}
            assert [e["studies"] for e in done] == [1]
        else:
            assert _keys(sf) == {sid: ("P-1", "A-1")} and done == []
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------- ingest before and after
def _part10(src, patient_id: str, accession: str) -> bytes:
    ds = pydicom.dcmread(src)
    ds.PatientID, ds.AccessionNumber = patient_id, accession
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _ingest(cfg, sf, raw: bytes) -> None:
    from qcnode.ingest.recorder import InstanceRecorder
    from qcnode.ingest.spool import Spool
    from qcnode.ingest.store import InstanceStore
    from qcnode.ingest.validate import SUCCESS
    recorder = InstanceRecorder(sf)
    try:
        store = InstanceStore(cfg, sf, Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir)),
                              recorder)
        assert store.store_part10(raw, {"calling_ae": "TEST", "source_ip": "127.0.0.1"}) == SUCCESS
    finally:
        recorder.close()


def test_a_patient_stored_raw_then_pseudonymised_matches_later_studies(tmp_path, shared_ct):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    off = load_config(write_config(tmp_path, 11112, db_url=url, extra={"privacy": {"pseudonymise_patient_id": False}}))
    on = dataclasses.replace(off, privacy=dataclasses.replace(off.privacy, pseudonymise_patient_id=True))
    upgrade(url)
    engine = make_engine(url)
    sf = session_factory(engine)
    src = sorted((shared_ct / "ge_head").glob("*.dcm"))[0]
    try:
        _ingest(off, sf, _part10(src, "QC-PAT-7", "ACC-7"))
        assert list(_keys(sf).values()) == [("QC-PAT-7", "ACC-7")]  # stored raw while the option was off
        key = load_or_create_key(on.path(on.privacy.pseudonym_key_file))
        with sf() as s:
            assert pseudonymise_stored_ids(s, key) == 1
            s.commit()
        _ingest(on, sf, _part10(src, "QC-PAT-7", "ACC-7"))  # a later study of the same patient
        first, later = _keys(sf).values()
        assert first == later == (pseudonymise("QC-PAT-7", key), pseudonymise("ACC-7", key))
    finally:
        engine.dispose()


def test_key_files_are_published_whole_and_first_creator_wins(tmp_path):
    """Both key files (pseudonym and dashboard/session secrets) are created through ``publish_once``."""
    from qcnode.dashboard.csrf import load_or_create_key as load_secret
    from qcnode.dicom.privacy import publish_once
    path = tmp_path / "var" / "k.key"
    publish_once(path, b"first")
    publish_once(path, b"second")  # a process that lost the race keeps the winner's key
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["k.key"]  # no temporary file left
    hex_key = load_or_create_key(tmp_path / "p.key")
    assert len(hex_key) == 64 and load_or_create_key(tmp_path / "p.key") == hex_key
    raw = load_secret(tmp_path / "s.key")
    assert len(raw) == 32 and load_secret(tmp_path / "s.key") == raw
