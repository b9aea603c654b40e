"""The state machines of the tables, one enum each, with their allowed transitions in one place.

The values are the strings stored in the ``status`` columns (and read by the SQL views and by
people): the members are ``str`` subclasses, so they compare, hash, bind and print as those
strings. ``allowed(old, new)`` tells whether the code may move a row from one state to another;
``test_states`` checks the tables against the models' defaults.

Also here, because scoring and delivery both apply it: the one "superseded" rule (``superseded``).
"""
from __future__ import annotations

import enum
from typing import Mapping


class StrEnum(str, enum.Enum):
    """An enum whose members are their string values (``enum.StrEnum`` from Python 3.11 on)."""

    def __str__(self) -> str:
        return str(self.value)


class SeriesState(StrEnum):
    """``series.status``: where a series is in the flow (``version`` counts its scoring rounds)."""
    RECEIVING = "receiving"  # instances arrive (set again by a late instance: a new round follows)
    STABLE = "stable"        # quiet long enough: a scoring job is queued for this version
    SCORED = "scored"        # the round's result, SR and deliveries are stored
    SKIPPED = "skipped"      # nothing in the series could be scored
    FAILED = "failed"        # the round's job gave up: queued again after a back-off, or by `qcnode rescore`


class JobState(StrEnum):
    """``jobs.status``: a durable queue row, claimed with a lease."""
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(StrEnum):
    """``deliveries.status``: one payload for one destination in the outbox."""
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"                # gave up (attempts, or the destination is no longer configured)
    SUPERSEDED = "superseded"    # not sent: its series received new instances, the next round is sent


class AuditRunState(StrEnum):
    """``audit_runs.status``."""
    RUNNING = "running"
    OK = "ok"
    NO_DATA = "no_data"
    ERROR = "error"


S, J, D, A = SeriesState, JobState, DeliveryState, AuditRunState
TRANSITIONS: Mapping[type[StrEnum], Mapping[StrEnum, frozenset[StrEnum]]] = {
    SeriesState: {
        S.RECEIVING: frozenset({S.RECEIVING, S.STABLE}),       # more instances; quiet (tracker)
        S.STABLE: frozenset({S.RECEIVING, S.STABLE, S.SCORED, S.SKIPPED, S.FAILED}),  # late instance; rescore
        S.SCORED: frozenset({S.RECEIVING, S.STABLE}),          # late instance; rescore
        S.SKIPPED: frozenset({S.RECEIVING, S.STABLE}),
        S.FAILED: frozenset({S.RECEIVING, S.STABLE}),          # late instance; retry after back-off, rescore
    },
    JobState: {
        J.PENDING: frozenset({J.RUNNING}),                     # claimed
        J.RUNNING: frozenset({J.RUNNING, J.PENDING, J.DONE, J.FAILED}),  # reclaimed after its lease; retry later
        J.DONE: frozenset(),
        J.FAILED: frozenset(),                                 # a new round gets a new job
    },
    DeliveryState: {
        D.PENDING: frozenset({D.SENDING}),
        D.SENDING: frozenset({D.SENDING, D.PENDING, D.DELIVERED, D.DEAD, D.SUPERSEDED}),
        D.DELIVERED: frozenset(),
        D.DEAD: frozenset(),
        D.SUPERSEDED: frozenset(),
    },
    AuditRunState: {
        A.RUNNING: frozenset({A.OK, A.NO_DATA, A.ERROR}),
        A.OK: frozenset(), A.NO_DATA: frozenset(), A.ERROR: frozenset(),
    },
}
del S, J, D, A


def allowed(old: StrEnum | str, new: StrEnum) -> bool:
    """Whether a row in state ``old`` may move to ``new`` (same state machine as ``new``)."""
    machine = TRANSITIONS[type(new)]
    return new in machine.get(type(new)(old), frozenset())


def superseded(series_version: int, series_status: str, round_version: int) -> bool:
    """Whether scoring round ``round_version`` of a series is overtaken: the series has received
    instances since (it is receiving again, or a later round was queued). Such a round is neither
    stored by the worker nor delivered by the outbox; the next round brings its own result."""
    return series_version != round_version or series_status == SeriesState.RECEIVING
