"""Clock agreement with a shared database server: leases are stamped with each node's own clock."""
from __future__ import annotations

from typing import Any

from qcnode.db.models import utcnow
from qcnode.log import get_logger

log = get_logger("qcnode.clock")


class ClockSkewError(RuntimeError):
    """This host's clock and the shared database server's differ by more than leases tolerate."""


CLOCK_SKEW_WARN_SECONDS = 1.0


def database_clock_skew(engine: Any) -> float | None:
    """Seconds the database server's clock is ahead of this host's (negative: behind), or None
    for SQLite, whose clock is this host's. Leases are stamped and compared with each node's own
    clock, so nodes sharing a database must agree with it."""
    if engine.dialect.name != "postgresql":
        return None
    from sqlalchemy import text
    with engine.connect() as conn:
        before = utcnow()
        server = conn.scalar(text("SELECT clock_timestamp()"))
        after = utcnow()
    return (server - (before + (after - before) / 2)).total_seconds()


def check_clock(engine: Any, lease_seconds: float) -> float | None:
    """Raise :class:`ClockSkewError` when the skew to the database server is over half of
    ``lease_seconds`` (another node would take this node's leases while it still works on them);
    log a warning over CLOCK_SKEW_WARN_SECONDS. Returns the skew (None for SQLite)."""
    skew = database_clock_skew(engine)
    if skew is None:
        return None
    if abs(skew) > lease_seconds / 2:
        raise ClockSkewError(
            f"this host's clock is {abs(skew):.1f} s {'behind' if skew > 0 else 'ahead of'} the database "
            f"server's; leases of {lease_seconds:g} s need the nodes within {lease_seconds / 2:g} s of it "
            f"(synchronise the clocks, e.g. with NTP)")
    if abs(skew) > CLOCK_SKEW_WARN_SECONDS:
        log.warning("clock_skew", seconds=round(skew, 2), limit_seconds=lease_seconds / 2)
    return skew
