"""``qcnode audit``: run the dose-protocol audit on demand."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``audit`` sub-command."""
    p = subparsers.add_parser(
        "audit", help="run the dose-protocol audit now (HTML report + CSV + audit tables)",
        description="Per protocol x scanner over the series scored in [--since, --until] (inclusive, "
                    "UTC dates): count, median/IQR of score, noise, CTDIvol, SSDE, FAIL fraction; "
                    "flags CTDIvol above the reference level and drift from the trailing baseline.")
    p.add_argument("--config", help="config file (default: the project's config.toml)")
    p.add_argument("--since", type=_date, help="first scored date (default: 6 days before --until)")
    p.add_argument("--until", type=_date, help="last scored date (default: today, UTC)")
    p.add_argument("--out", help="output folder (default: audit.out_dir)")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from qcnode.audit.run import run_audit
    from qcnode.config import ConfigError, load_config
    from qcnode.db.engine import make_engine, session_factory, upgrade
    from qcnode.log import configure_logging

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"qcnode audit: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.logging.level, cfg.path(cfg.logging.file) if cfg.logging.file else None)
    if args.since and args.until and args.since > args.until:
        print(f"qcnode audit: --since {args.since} is after --until {args.until}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else cfg.path(cfg.audit.out_dir)
    try:  # before any work: an unusable report folder must not cost a run (and leave an error row)
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"not writable: {out}")
    except OSError as exc:
        print(f"qcnode audit: cannot write the report to {out}: {exc}", file=sys.stderr)
        return 2
    url = cfg.database_url
    upgrade(url)  # idempotent: makes sure the audit tables and views exist
    engine = make_engine(url)
    try:
        result = run_audit(cfg, session_factory(engine), since=args.since, until=args.until, out_dir=args.out,
                           trigger="manual", progress=lambda msg: print(f"[audit] {msg}", flush=True))
    finally:
        engine.dispose()
    kinds: dict[str, int] = {}
    for f in result.flags:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    detail = ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())) or "none"
    print(f"audit run {result.run_id} {result.since}..{result.until}: {result.status}; {result.n_series} series, "
          f"{len(result.stats)} groups, {len(result.flags)} flags ({detail})")
    for f in result.flags:
        print(f"  FLAG {f.kind}: {f.protocol} @ {f.scanner}: {f.message}")
    for label, path in (("report", result.report_path), ("stats csv", result.csv_path),
                        ("flags csv", result.flags_csv_path)):
        if path:
            print(f"  {label}: {path}")
    return 0
