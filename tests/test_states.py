"""The state machines (``qcnode.db.states``): stored strings, transitions, and the shared rules."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qcnode.db import models
from qcnode.db.audit_models import AuditRun
from qcnode.db.queue import backoff_seconds
from qcnode.db.states import (TRANSITIONS, AuditRunState, DeliveryState, JobState, SeriesState, allowed,
                              superseded)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def test_members_are_the_stored_strings():
    assert [s.value for s in SeriesState] == ["receiving", "stable", "scored", "skipped", "failed"]
    assert [s.value for s in JobState] == ["pending", "running", "done", "failed"]
    assert [s.value for s in DeliveryState] == ["pending", "sending", "delivered", "dead", "superseded"]
    assert [s.value for s in AuditRunState] == ["running", "ok", "no_data", "error"]
    s = SeriesState.FAILED
    assert s == "failed" and str(s) == f"{s}" == "failed" and {"failed": 1}[s] == 1 and json.dumps(s) == '"failed"'


def test_defaults_of_the_models_are_initial_states():
    for column, state in ((models.Series.status, SeriesState.RECEIVING), (models.Job.status, JobState.PENDING),
                          (models.Delivery.status, DeliveryState.PENDING), (AuditRun.status, AuditRunState.RUNNING)):
        assert column.default.arg == state


def test_the_views_use_only_known_states():
    """The SQL views (migrations) compare status columns with literals: each must be a state."""
    known = {s.value for machine in TRANSITIONS for s in machine}
    text = "\n".join(p.read_text() for p in MIGRATIONS.rglob("*.py"))
    used = set(re.findall(r"status\s*(?:=|<>|!=|IN\s*\()\s*'([a-z_]+)'", text, flags=re.IGNORECASE))
    assert used and used <= known, (used, used - known)


@pytest.mark.parametrize("machine", list(TRANSITIONS))
def test_every_state_has_its_transitions(machine):
    assert set(TRANSITIONS[machine]) == set(machine)
    for targets in TRANSITIONS[machine].values():
        assert all(isinstance(t, machine) for t in targets)


def test_allowed_transitions():
    assert allowed("receiving", SeriesState.STABLE) and allowed(SeriesState.STABLE, SeriesState.SCORED)
    assert not allowed("receiving", SeriesState.SCORED)  # only a stable round is scored
    assert allowed("failed", SeriesState.STABLE)  # retried after a back-off, or rescored
    assert not allowed("done", JobState.PENDING) and allowed("running", JobState.PENDING)
    assert not allowed("delivered", DeliveryState.SENDING)


def test_superseded_rule():
    assert not superseded(2, "stable", 2) and not superseded(2, "scored", 2)
    assert superseded(2, "receiving", 2)  # a late instance reopened the series
    assert superseded(3, "stable", 2)  # a later round was queued


@pytest.mark.parametrize("n", [0, 1, 2, 5, 9, 20, 40, 100])
def test_one_back_off_policy_gives_the_earlier_delays(n):
    # outbox (initial, max), failed series (base, a day), job retries (2 s doubling, at most 300 s)
    assert backoff_seconds(n, 0.5, 60.0) == min(0.5 * 2.0 ** min(max(n - 1, 0), 64), 60.0)
    assert backoff_seconds(n, 100.0, 86400.0) == min(100.0 * 2.0 ** max(0, min(n, 32) - 1), 86400.0)
    if n >= 1:  # a claimed job has made at least one attempt
        assert backoff_seconds(n, 2.0, 300.0) == min(2.0 ** min(n, 16), 300.0)
