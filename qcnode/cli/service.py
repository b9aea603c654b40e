"""CLI commands of the daemon: ``serve``, ``status``, ``rescore``, ``db upgrade``, ``db current``,
``db pseudonymise``."""
from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Any, Callable

from qcnode.config import load_config

Command = Callable[[argparse.Namespace], int]


def register(subparsers: Any) -> None:
    """Add serve / status / rescore / db to the ``qcnode`` parser."""
    p = subparsers.add_parser("serve", help="run the DICOM node (SCP, tracker, worker, outbox, audit)")
    p.add_argument("--config", help="config.toml (default: the project's config.toml)")
    p.add_argument("--no-worker", action="store_true", help="receive only (no scoring/outbox/audit here)")
    p.add_argument("--no-scp", action="store_true", help="do not listen for DICOM (worker node)")
    p.add_argument("--worker-only", action="store_true", help="same as --no-scp")
    p.set_defaults(func=_cmd_serve)

    p = subparsers.add_parser("status", help="queue depths, last errors, dead letters, disk")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_status)

    p = subparsers.add_parser("rescore", help="queue series for scoring again now (e.g. those that gave up)")
    p.add_argument("--config")
    p.add_argument("series_uids", nargs="*", metavar="SERIES_UID", help="SeriesInstanceUID of a series to rescore")
    p.add_argument("--failed", action="store_true", help="every series whose scoring gave up")
    p.set_defaults(func=_cmd_rescore)

    p = subparsers.add_parser("db", help="database schema (Alembic)")
    dbsub = p.add_subparsers(dest="db_command", metavar="DB_COMMAND")
    up = dbsub.add_parser("upgrade", help="apply the migrations")
    up.add_argument("--config")
    up.add_argument("--revision", default="head")
    up.set_defaults(func=_cmd_db_upgrade)
    cur = dbsub.add_parser("current", help="print the current revision")
    cur.add_argument("--config")
    cur.set_defaults(func=_cmd_db_current)
    pse = dbsub.add_parser("pseudonymise", help="pseudonymise patient/accession IDs stored raw "
                                                "(while privacy.pseudonymise_patient_id was off)")
    pse.add_argument("--config")
    pse.set_defaults(func=_cmd_db_pseudonymise)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _db_errors(name: str) -> Callable[[Command], Command]:
    """Decorator: a migration error or an unusable database ends ``qcnode NAME`` with one line, exit 1."""
    def wrap(func: Command) -> Command:
        @functools.wraps(func)
        def run(args: argparse.Namespace) -> int:
            from alembic.util import CommandError
            from sqlalchemy.exc import OperationalError

            from qcnode.db.clock import ClockSkewError
            try:
                return func(args)
            except OperationalError as exc:
                return _fail(name, f"cannot use the database: {exc.orig}")
            except (CommandError, OSError, ClockSkewError) as exc:
                return _fail(name, exc)
        return run
    return wrap


def _fail(name: str, reason: object, code: int = 1) -> int:
    """Print the first line of ``reason`` as ``qcnode NAME: ...``; returns exit code ``code``."""
    text = str(reason).strip() or type(reason).__name__
    print(f"qcnode {name}: {text.splitlines()[0]}", file=sys.stderr)
    return code


@_db_errors("serve")  # e.g. the database unreachable at start, the port taken: one line, exit 1
def _cmd_serve(args: argparse.Namespace) -> int:
    from qcnode.service.daemon import ServeOptions, serve
    cfg = load_config(args.config)
    run_scp = not (args.no_scp or args.worker_only)
    if not run_scp and args.no_worker:
        raise SystemExit("qcnode serve: --no-scp and --no-worker leave nothing to run")
    return serve(cfg, ServeOptions(scp=run_scp, worker=False if args.no_worker else None))


@_db_errors("db upgrade")
def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from qcnode.db.migrate import current_revision, migrate
    cfg = load_config(args.config)
    migrate(cfg.database_url, args.revision)
    print(f"database at revision {current_revision(cfg.database_url)}")
    return 0


@_db_errors("db current")
def _cmd_db_current(args: argparse.Namespace) -> int:
    from qcnode.db.migrate import current_revision, head_revision
    cfg = load_config(args.config)
    rev = current_revision(cfg.database_url)
    head = head_revision()
    print(f"{rev or '(none)'}{' (head)' if rev == head else f' (head is {head})'}")
    return 0


@_db_errors("db pseudonymise")
def _cmd_db_pseudonymise(args: argparse.Namespace) -> int:
    """What ``serve`` does at start, on demand: the raw IDs stored while pseudonymisation was off
    get the keys ingest gives them now. Refused (exit 2) with the option off or an old schema."""
    from qcnode.db.engine import make_engine, session_factory
    from qcnode.db.migrate import current_revision, head_revision
    from qcnode.db.pseudonyms import pseudonymise_stored_ids
    from qcnode.dicom.privacy import load_or_create_key
    name = "db pseudonymise"
    cfg = load_config(args.config)
    if not cfg.privacy.pseudonymise_patient_id:
        return _fail(name, "privacy.pseudonymise_patient_id is false: turn it on first", code=2)
    if current_revision(cfg.database_url) != head_revision():
        return _fail(name, "database not at the current revision: run `qcnode db upgrade`", code=2)
    try:
        key = load_or_create_key(cfg.path(cfg.privacy.pseudonym_key_file))
    except ValueError as exc:  # a key file too short
        return _fail(name, exc)
    engine = make_engine(cfg.database_url)
    try:
        with session_factory(engine)() as s:
            n = pseudonymise_stored_ids(s, key)
            s.commit()
    finally:
        engine.dispose()
    print(f"{n} {'study' if n == 1 else 'studies'} pseudonymised")
    return 0


@_db_errors("rescore")
def _cmd_rescore(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from qcnode.db.engine import make_engine, session_factory
    from qcnode.db.models import Series
    from qcnode.db.states import SeriesState
    from qcnode.tracking.series import rescore_series
    from qcnode.db.migrate import current_revision, head_revision
    if not args.series_uids and not args.failed:
        return _fail("rescore", "name series (SERIES_UID ...) or --failed")
    cfg = load_config(args.config)
    if current_revision(cfg.database_url) != head_revision():
        return _fail("rescore", "database not at the current revision: run `qcnode db upgrade`")
    engine = make_engine(cfg.database_url)
    code = 0
    try:
        sf = session_factory(engine)
        with sf() as s:
            cond = Series.series_instance_uid.in_(args.series_uids)
            if args.failed:
                cond = cond | (Series.status == SeriesState.FAILED)
            found = dict(s.execute(select(Series.series_instance_uid, Series.id).where(cond)).all())
        for uid in args.series_uids:
            if uid not in found:
                print(f"{uid}: no such series", file=sys.stderr)
                code = 1
        for uid, series_id in sorted(found.items()):
            version = rescore_series(sf, series_id)
            print(f"{uid}: " + (f"queued (version {version})" if version is not None
                                else "still receiving (scored once it is stable)"))
    finally:
        engine.dispose()
    return code


def collect_status(cfg: Any) -> dict[str, Any]:
    """Queue depths, last errors, dead letters, quarantine, model and disk, as a dict."""
    from qcnode.db.engine import make_engine, session_factory
    from qcnode.db.status import status_counts
    from qcnode.db.clock import database_clock_skew
    from qcnode.ingest.spool import free_disk_mb
    from qcnode.db.migrate import current_revision, head_revision

    url = cfg.database_url
    rev = current_revision(url)
    out: dict[str, Any] = {"database": make_engine_url_safe(url), "revision": rev, "head": head_revision()}
    spool_dir = cfg.path(cfg.storage.spool_dir)
    out["disk_free_mb"] = round(free_disk_mb(spool_dir), 1)
    out["min_free_disk_mb"] = cfg.storage.min_free_disk_mb
    ckpt = cfg.path(cfg.model.checkpoint)
    out["model"] = {"checkpoint": str(ckpt), "present": ckpt.is_file()}
    if rev is None:
        out["error"] = "database not migrated: run `qcnode db upgrade`"
        return out
    engine = make_engine(url)
    try:
        skew = database_clock_skew(engine)
        if skew is not None:
            out["clock_skew_seconds"] = round(skew, 3)
        with session_factory(engine)() as s:
            counts = status_counts(s)
        out["model"]["last_version_used"] = counts.pop("last_model_version")
        out.update(counts)
    finally:
        engine.dispose()
    return out


def make_engine_url_safe(url: str) -> str:
    """The database URL without its password."""
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


@_db_errors("status")
def _cmd_status(args: argparse.Namespace) -> int:
    from qcnode.db.states import SeriesState
    cfg = load_config(args.config)
    st = collect_status(cfg)
    if args.json:
        print(json.dumps(st, indent=1, default=str))
        return 0 if "error" not in st else 1
    print(f"database   {st['database']}  revision {st['revision']} (head {st['head']})")
    if "error" in st:
        print(st["error"])
        return 1
    fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"  # noqa: E731
    print(f"series     {fmt(st['series'])}")
    print(f"jobs       {fmt(st['jobs'])}")
    print(f"deliveries {fmt(st['deliveries'])}")
    if st.get("webhooks"):
        print(f"webhooks   {fmt(st['webhooks'])}")
    print(f"results    {st['results']}   quarantine {st['quarantine']}")
    print(f"model      {st['model']['checkpoint']} ({'present' if st['model']['present'] else 'MISSING'}),"
          f" last used version {st['model'].get('last_version_used')}")
    print(f"disk free  {st['disk_free_mb']} MiB (watermark {st['min_free_disk_mb']} MiB)")
    n_failed = st["series"].get(str(SeriesState.FAILED), 0)
    if n_failed:
        print(f"ALERT      {n_failed} series gave up scoring (no SR): retried with back-off, "
              f"or now with `qcnode rescore --failed`")
        for item in st["failed_series"]:
            print("  " + "  ".join(f"{k}={v}" for k, v in item.items()))
    if "clock_skew_seconds" in st:
        print(f"clock      {st['clock_skew_seconds']:+.3f} s to the database server")
    for title, key in (("last job errors", "last_job_errors"), ("dead letters", "dead_letters"),
                       ("dead webhooks", "dead_webhooks"),
                       ("delivery retries", "last_delivery_errors"), ("last quarantined", "last_quarantine")):
        if st.get(key):
            print(f"{title}:")
            for item in st[key]:
                print("  " + "  ".join(f"{k}={v}" for k, v in item.items()))
    return 0
