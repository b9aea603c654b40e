"""Spool: durable writes, owner-only permissions, UID validation, quarantine."""
from __future__ import annotations

import json
import stat

import pytest

from qcnode.ingest.spool import InvalidUID, Spool, check_uid


def test_write_is_atomic_and_owner_only(tmp_path):
    spool = Spool(tmp_path / "spool", tmp_path / "q")
    rel = Spool.instance_relpath("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert rel == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    path = spool.write(rel, b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    spool.write(rel, b"xyz")  # overwrite
    assert path.read_bytes() == b"xyz"
    assert spool.same_content(rel, b"xyz") and not spool.same_content(rel, b"xy")
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("bad", ["../../etc", "1.2/../3", "..", "/abs/path", "1.2.3\x00", "1.2.a", "",
                                 "1." + "2" * 70, "1..2", ".1.2"])
def test_crafted_uids_never_make_paths(tmp_path, bad):
    with pytest.raises(InvalidUID):
        check_uid(bad)
    with pytest.raises(InvalidUID):
        Spool.instance_relpath("1.2.3", "1.2.4", bad)


def test_abspath_refuses_escape(tmp_path):
    spool = Spool(tmp_path / "spool", tmp_path / "q")
    with pytest.raises(InvalidUID):
        spool.abspath("../outside.dcm")
    assert spool.abspath("sr/1.2/1.3/1.4.dcm").is_relative_to(spool.root)


def test_quarantine_keeps_copy_and_reason(tmp_path):
    spool = Spool(tmp_path / "spool", tmp_path / "q")
    rel = spool.quarantine(b"garbage", "cannot decode", {"calling_ae": "X", "status": "0xC210"})
    copy = spool.quarantine_dir / rel
    assert copy.read_bytes() == b"garbage"
    reason = json.loads(copy.with_suffix(".reason.json").read_text())
    assert reason["reason"] == "cannot decode" and reason["status"] == "0xC210" and reason["has_copy"]
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert spool.quarantine_count() == 1
    assert spool.free_disk_mb() > 0
