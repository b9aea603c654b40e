"""Run a dose-protocol audit (nightly inside ``qcnode serve``, or ``qcnode audit``).

Dates are scored dates (UTC calendar date of the scoring round, the ``scored_date`` column
of ``v_series_qa``); ranges are inclusive. Results go into audit_runs /
audit_protocol_stats / audit_flags and into ``<out_dir>/audit-<run>-<since>_<until>/``
(report.html, protocol_stats.csv, flags.csv).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from qcnode.audit import flags as flag_rules
from qcnode.audit import report
from qcnode.audit.stats import GroupStats, fetch_series, group_stats
from qcnode.config import Config, ConfigError
from qcnode.db.audit_models import AuditFlag, AuditProtocolStat, AuditRun
from qcnode.db.models import utcnow
from qcnode.db.states import AuditRunState
from qcnode.log import get_logger

log = get_logger("qcnode.audit")
NIGHTLY_JOB_ID = "qcnode-audit-nightly"
DEFAULT_MANUAL_DAYS = 7
MAX_CATCH_UP_DAYS = 31


@dataclass
class AuditResult:
    run_id: int
    status: AuditRunState  # ok | no_data
    since: dt.date
    until: dt.date
    n_series: int
    stats: list[GroupStats] = field(default_factory=list)
    flags: list[flag_rules.Flag] = field(default_factory=list)
    report_path: Path | None = None
    csv_path: Path | None = None
    flags_csv_path: Path | None = None
    message: str = ""


def utc_today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


def run_audit(cfg: Config, session_factory: sessionmaker[Session], since: dt.date | None = None,
              until: dt.date | None = None, out_dir: str | Path | None = None, trigger: str = "manual",
              progress: Callable[[str], Any] | None = None) -> AuditResult:
    """Audit the series scored in [since, until] (default: the last 7 days up to today, UTC).

    Stores one audit_runs row (+ stats and flag rows) and writes the HTML report and CSVs.
    With nothing scored in the range the run is stored with status ``no_data`` and its
    message (and a short report) says so. Raises ValueError when since > until.
    """
    say = progress or (lambda _msg: None)
    until = until or utc_today()
    since = since or (until - dt.timedelta(days=DEFAULT_MANUAL_DAYS - 1))
    if since > until:
        raise ValueError(f"--since {since} is after --until {until}")
    audit = cfg.audit
    out_root = Path(out_dir) if out_dir else cfg.path(audit.out_dir)

    with session_factory() as session, session.begin():
        run = AuditRun(trigger=trigger, since=since, until=until, status=AuditRunState.RUNNING,
                       started_at=utcnow())
        session.add(run)
        session.flush()
        run_id = run.id
    log.info("audit_started", run_id=run_id, since=str(since), until=str(until), trigger=trigger)
    try:
        say(f"reading series scored {since} .. {until}")
        base_since = since - dt.timedelta(days=audit.baseline_days)
        with session_factory() as session:
            rows = fetch_series(session, since, until)
            baseline_rows = fetch_series(session, base_since, since - dt.timedelta(days=1))
        run_dir = out_root / f"audit-{run_id:05d}-{since}_{until}"
        run_dir.mkdir(parents=True, exist_ok=True)
        if not rows:
            message = f"no new data: no series scored between {since} and {until}"
            say(message)
            html_path = report.write_html(run_dir / "report.html", since=since, until=until, run_id=run_id,
                                          records=[], flags=[], rows=[], trend_rows=[], message=message)
            _finish(session_factory, run_id, status=AuditRunState.NO_DATA, n_series=0, n_groups=0, n_flags=0,
                    message=message, report_path=str(html_path), csv_path=None)
            log.info("audit_finished", run_id=run_id, status=AuditRunState.NO_DATA)
            return AuditResult(run_id, AuditRunState.NO_DATA, since, until, 0, report_path=html_path, message=message)

        stats = group_stats(rows)
        baseline = {g.key: g for g in group_stats(baseline_rows)}
        say(f"{len(rows)} series in {len(stats)} protocol x scanner groups; baseline {len(baseline_rows)} series")
        flags = (flag_rules.reference_flags(stats, audit)
                 + flag_rules.drift_flags(stats, baseline, audit))
        records = [report.stat_record(g, baseline.get(g.key), flag_rules.reference_level(audit, g.protocol))
                   for g in stats]
        say("writing report and CSV")
        csv_path = report.write_csv(run_dir / "protocol_stats.csv", records, report.STAT_COLUMNS)
        flags_csv = report.write_csv(run_dir / "flags.csv", [f.__dict__ for f in flags], report.FLAG_COLUMNS)
        html_path = report.write_html(run_dir / "report.html", since=since, until=until, run_id=run_id,
                                      records=records, flags=flags, rows=rows,
                                      trend_rows=baseline_rows + rows)
        message = f"{len(rows)} series, {len(stats)} groups, {len(flags)} flags"
        with session_factory() as session, session.begin():
            session.add_all(AuditProtocolStat(run_id=run_id, **rec) for rec in records)
            session.add_all(AuditFlag(run_id=run_id, protocol=f.protocol, scanner=f.scanner, kind=f.kind,
                                      value=f.value, reference=f.reference, message=f.message) for f in flags)
        _finish(session_factory, run_id, status=AuditRunState.OK, n_series=len(rows), n_groups=len(stats),
                n_flags=len(flags), message=message, report_path=str(html_path), csv_path=str(csv_path))
        log.info("audit_finished", run_id=run_id, status=AuditRunState.OK, n_series=len(rows), n_groups=len(stats),
                 n_flags=len(flags))
        return AuditResult(run_id, AuditRunState.OK, since, until, len(rows), stats=stats, flags=flags,
                           report_path=html_path, csv_path=csv_path, flags_csv_path=flags_csv, message=message)
    except Exception as exc:
        _finish(session_factory, run_id, status=AuditRunState.ERROR, message=f"{type(exc).__name__}: {exc}")
        log.error("audit_failed", run_id=run_id, error=f"{type(exc).__name__}: {exc}")
        raise


def _finish(session_factory: sessionmaker[Session], run_id: int, **values: Any) -> None:
    with session_factory() as session, session.begin():
        session.execute(sa.update(AuditRun).where(AuditRun.id == run_id).values(finished_at=utcnow(), **values))


def nightly_window(session: Session, today: dt.date | None = None) -> tuple[dt.date, dt.date] | None:
    """The range the nightly audit covers: from the day after the last nightly run's ``until``
    (at most 31 days back; yesterday on the first run) up to yesterday (UTC); None when done."""
    until = (today or utc_today()) - dt.timedelta(days=1)
    done = (AuditRunState.OK, AuditRunState.NO_DATA)
    last = session.scalar(sa.select(sa.func.max(AuditRun.until))
                          .where(AuditRun.trigger == "nightly", AuditRun.status.in_(done)))
    since = until if last is None else last + dt.timedelta(days=1)
    since = max(since, until - dt.timedelta(days=MAX_CATCH_UP_DAYS - 1))
    return None if since > until else (since, until)


def nightly_audit(cfg: Config, session_factory: sessionmaker[Session]) -> AuditResult | None:
    """The scheduled job: audit the days not yet audited by a nightly run (None if none)."""
    with session_factory() as session:
        window = nightly_window(session)
    if window is None:
        log.info("audit_skipped", reason="already audited up to yesterday")
        return None
    return run_audit(cfg, session_factory, since=window[0], until=window[1], trigger="nightly")


def parse_time_of_day(value: str) -> tuple[int, int]:
    """'HH:MM' -> (hour, minute); ConfigError when malformed."""
    hh, _, mm = value.partition(":")
    if not (hh.isdigit() and mm.isdigit() and 0 <= int(hh) < 24 and 0 <= int(mm) < 60):
        raise ConfigError(f"audit.time_of_day must be HH:MM, got {value!r}")
    return int(hh), int(mm)


def schedule(cfg: Config, scheduler: Any, session_factory: sessionmaker[Session]) -> Any:
    """Add the nightly audit job (CronTrigger at audit.time_of_day, local time) to an
    APScheduler 3 scheduler; returns the job, or None when audit.enabled is false."""
    if not cfg.audit.enabled:
        return None
    from apscheduler.triggers.cron import CronTrigger

    hour, minute = parse_time_of_day(cfg.audit.time_of_day)

    def _job() -> None:
        try:
            nightly_audit(cfg, session_factory)
        except Exception:  # noqa: BLE001 - logged by run_audit; the scheduler must keep running
            pass

    job = scheduler.add_job(_job, CronTrigger(hour=hour, minute=minute), id=NIGHTLY_JOB_ID,
                            name="nightly dose-protocol audit", replace_existing=True, coalesce=True,
                            max_instances=1, misfire_grace_time=3600)
    log.info("audit_scheduled", time_of_day=cfg.audit.time_of_day)
    return job
