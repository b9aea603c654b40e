"""Dashboard response times with 50,000 series and 5 million slice scores (SQLite and PostgreSQL).

Seeds a migrated database in bulk (executemany on SQLite, COPY on PostgreSQL): 50,000 studies and
series over the last 365 days (8 protocols on 4 scanners, 6 kernels, 5 % FAIL, 10 % WARN), 100
instances and 100 slice scores per series, one result and one SR delivery per series, then
requests the pages, the API list and /metrics in-process through the FastAPI app (routing, queries,
templates, JSON: everything but the socket) and prints p50 / p95 per route. Targets (printed, never
gating): pages <= 300 ms p95, API list <= 200 ms p95.

    .venv/bin/python bench/bench_dashboard.py                        # SQLite in a temp dir
    .venv/bin/python bench/bench_dashboard.py --pg postgresql://...  # also PostgreSQL (an empty db)
    .venv/bin/python bench/bench_dashboard.py --series 5000          # a quicker, smaller run
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROTOCOLS = ["CHEST LD", "CHEST ROUTINE", "ABDOMEN PV", "HEAD ROUTINE", "HEAD TRAUMA", "LUNG SCREENING",
             "PELVIS", "NECK"]
SCANNERS = [("Siemens", "Force", "CT1"), ("Siemens", "Edge", "CT2"), ("GE", "Revolution", "CT3"),
            ("Philips", "Ingenuity", "CT4")]
KERNELS = ["Br40", "Br64", "STANDARD", "LUNG", "B", "YA"]
SLICES = 100
TARGETS = {"series list": 0.300, "series list (filtered)": 0.300, "series detail": 0.300,
           "protocols": 0.300, "API series list": 0.200, "overview": 0.300, "alerts": 0.300,
           "/metrics": None}


def _ts(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def generate(n_series: int, seed: int = 7) -> dict[str, Iterator[tuple]]:
    """Row generators per table (ids from 1), deterministic."""
    rng = random.Random(seed)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    plan = []
    for i in range(1, n_series + 1):
        proto = PROTOCOLS[i % len(PROTOCOLS)]
        scanner = SCANNERS[(i // 3) % len(SCANNERS)]
        at = now - dt.timedelta(seconds=rng.uniform(0, 365 * 86400))
        mean = rng.gauss(3.0, 0.45)
        verdict = "FAIL" if i % 20 == 0 else ("WARN" if i % 10 == 0 else "PASS")
        plan.append((i, proto, scanner, at, mean, verdict, KERNELS[i % len(KERNELS)], 5 + (i % 7)))

    def studies() -> Iterator[tuple]:
        for i, _p, _s, at, *_ in plan:
            yield (i, f"1.2.9.{i}", f"pk{i % 9000:05d}", at.date().isoformat(), _ts(at))

    def series() -> Iterator[tuple]:
        for i, proto, (man, model, station), at, *_ in plan:
            yield (i, f"1.2.9.{i}.1", i, "CT", proto, f"{proto.title()} {1 + i % 3} mm", "CHEST" if "CHEST" in proto
                   else proto.split()[0], man, model, station, "scored", 1, SLICES, _ts(at - dt.timedelta(minutes=2)),
                   _ts(at))

    def results() -> Iterator[tuple]:
        for i, _p, _s, at, mean, verdict, _k, ctdi in plan:
            yield (i, i, 1, "mdiqa-bench", SLICES, 0, round(mean, 3), round(mean - 0.8, 3), round(mean - 0.5, 3),
                   0.6 if verdict == "FAIL" else 0.02, verdict, round(8 + rng.random() * 10, 2), float(ctdi), 27.0,
                   round(ctdi * 1.25, 2), _ts(at + dt.timedelta(seconds=20)))

    def deliveries() -> Iterator[tuple]:
        for i, _p, _s, at, *_ in plan:
            yield (i, i, "pacs", "sr", "delivered", 1, _ts(at), _ts(at), _ts(at + dt.timedelta(seconds=25)))

    def instances() -> Iterator[tuple]:
        for i, _p, _s, at, _m, _v, kernel, ctdi in plan:
            base = (i - 1) * SLICES
            for k in range(SLICES):
                yield (base + k + 1, f"1.2.9.{i}.1.{k}", i, "1.2.840.10008.5.1.4.1.1.2", k + 1,
                       f"s/{i}/{k}.dcm", 524288, _ts(at), 1, float(ctdi), kernel, -200.0 + 2.5 * k)

    def slice_scores() -> Iterator[tuple]:
        r2 = random.Random(seed + 1)
        for i, _p, _s, at, mean, *_ in plan:
            base = (i - 1) * SLICES
            for k in range(SLICES):
                s = round(min(4.0, max(0.0, mean + r2.gauss(0, 0.3))), 3)
                yield (base + k + 1, base + k + 1, i, 1, "mdiqa-bench", s, round(s - 0.35, 3), round(s + 0.35, 3),
                       12.0, 27.0, 9.0, _ts(at))
    return {"studies": studies(), "series": series(), "series_results": results(), "deliveries": deliveries(),
            "instances": instances(), "slice_scores": slice_scores()}


COLUMNS = {
    "studies": "id, study_instance_uid, patient_key, study_date, created_at",
    "series": "id, series_instance_uid, study_id, modality, protocol_name, series_description, body_part, "
              "manufacturer, model_name, station_name, status, version, instance_count, first_received_at, "
              "last_received_at",
    "series_results": "id, series_id, version, model_version, n_slices, n_skipped, mean_score, min_score, p10_score, "
                      "fraction_below, verdict, noise_hu, ctdivol_mgy, dw_cm, ssde_mgy, created_at",
    "deliveries": "id, series_result_id, destination, kind, status, attempts, next_attempt_at, created_at, "
                  "delivered_at",
    "instances": "id, sop_instance_uid, series_id, sop_class_uid, instance_number, spool_path, size_bytes, "
                 "received_at, scorable, ctdivol_mgy, kernel, slice_location",
    "slice_scores": "id, instance_id, series_id, series_version, model_version, score, score_low, score_high, "
                    "noise_hu, dw_cm, ssde_mgy, created_at",
}


def _chunks(rows: Iterator[tuple], n: int = 20000) -> Iterator[list[tuple]]:
    chunk: list[tuple] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def seed(url: str, n_series: int) -> float:
    """Migrate ``url`` and bulk-insert the data set; returns seconds."""
    from qcnode.db.engine import upgrade
    upgrade(url)
    t0 = time.perf_counter()
    tables = generate(n_series)
    if url.startswith("sqlite"):
        import sqlite3
        conn = sqlite3.connect(url[len("sqlite:///"):])
        conn.execute("PRAGMA synchronous=OFF")
        for table, rows in tables.items():
            cols = COLUMNS[table]
            marks = ", ".join("?" * len(cols.split(",")))
            for chunk in _chunks(rows):
                conn.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", chunk)
            conn.commit()
            print(f"  {table}: done at {time.perf_counter() - t0:.0f} s", flush=True)
        conn.execute("ANALYZE")
        conn.commit()
        conn.close()
    else:
        import psycopg2
        from sqlalchemy.engine import make_url
        u = make_url(url)
        conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database)
        cur = conn.cursor()
        for table, rows in tables.items():
            for chunk in _chunks(rows, 200000):
                buf = io.StringIO()
                for row in chunk:
                    buf.write("\t".join("\\N" if v is None else str(v) for v in row) + "\n")
                buf.seek(0)
                cur.copy_expert(f"COPY {table} ({COLUMNS[table]}) FROM STDIN", buf)
            conn.commit()
            print(f"  {table}: done at {time.perf_counter() - t0:.0f} s", flush=True)
        for table in tables:
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))")
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE")
        conn.close()
    return time.perf_counter() - t0


def _seeded(url: str, n_series: int) -> bool:
    """Whether ``url`` already holds this data set (then it is measured again as it is)."""
    import sqlalchemy as sa
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT COUNT(*) FROM series")).scalar() == n_series
    except sa.exc.DBAPIError:
        return False
    finally:
        engine.dispose()


def measure(url: str, n_series: int, repeats: int) -> dict[str, list[float]]:
    """Time each route ``repeats`` times (after one warm-up) through the app in-process."""
    from fastapi.testclient import TestClient

    from qcnode.config import Config, HttpConfig, HttpToken
    from qcnode.db.engine import make_engine, session_factory
    from qcnode.http.app import HttpNode, create_app
    from qcnode.http.auth import token_sha256
    from qcnode.ingest.spool import Spool
    cfg = Config()
    cfg.base_dir = Path(tempfile.mkdtemp(prefix="qcnode-bench-dash-"))
    cfg.http = HttpConfig(host="0.0.0.0", tokens=[HttpToken(name="bench", sha256=token_sha256("t"), role="read")])
    engine = make_engine(url)
    node = HttpNode(cfg, session_factory(engine), Spool(cfg.path(cfg.storage.spool_dir),
                                                        cfg.path(cfg.storage.quarantine_dir)), engine)
    client = TestClient(create_app(node), headers={"Authorization": "Bearer t"})  # serve's HTTP app
    rng = random.Random(3)
    routes = {
        "series list": lambda: "/series",
        "series list (filtered)": lambda: f"/series?protocol={PROTOCOLS[rng.randrange(8)].replace(' ', '+')}"
                                          f"&verdict=PASS&sort=score&order=asc&page=3",
        "series detail": lambda: f"/series/{rng.randint(1, n_series)}",
        "protocols": lambda: "/protocols",
        "API series list": lambda: "/api/v1/series",
        "overview": lambda: "/",
        "alerts": lambda: "/alerts",
        "/metrics": lambda: "/metrics",  # a Prometheus scrape (no target: once a minute or so)
    }
    out: dict[str, list[float]] = {}
    for name, path in routes.items():
        assert client.get(path()).status_code == 200, name
        times = []
        for _ in range(repeats):
            p = path()
            t0 = time.perf_counter()
            r = client.get(p)
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200, (name, p, r.status_code)
        out[name] = times
    node.close()
    engine.dispose()
    return out


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(round(0.95 * len(values))) - 1)]


def report(label: str, times: dict[str, list[float]]) -> None:
    print(f"\n{label}")
    print(f"  {'route':<26} {'p50 ms':>8} {'p95 ms':>8} {'target':>8}")
    for name, t in times.items():
        target = TARGETS[name]
        if target is None:
            print(f"  {name:<26} {statistics.median(t) * 1000:8.1f} {p95(t) * 1000:8.1f} {'-':>8}")
            continue
        mark = "met" if p95(t) <= target else "NOT met"
        print(f"  {name:<26} {statistics.median(t) * 1000:8.1f} {p95(t) * 1000:8.1f} {target * 1000:8.0f}  {mark}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=int, default=50000)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--pg", help="URL of an empty PostgreSQL database to seed and measure too")
    p.add_argument("--sqlite", help="SQLite file (default: a new one in a temp dir)")
    p.add_argument("--skip-sqlite", action="store_true")
    args = p.parse_args()
    targets = []
    if not args.skip_sqlite:
        path = Path(args.sqlite or Path(tempfile.mkdtemp(prefix="qcnode-bench-")) / "qcnode.db")
        targets.append(("SQLite", f"sqlite:///{path}"))
    if args.pg:
        url = args.pg.replace("postgresql://", "postgresql+psycopg2://", 1) if args.pg.startswith(
            "postgresql://") else args.pg
        targets.append(("PostgreSQL", url))
    for label, url in targets:
        if not _seeded(url, args.series):
            print(f"{label}: seeding {args.series} series, {args.series * SLICES} slice scores ...", flush=True)
            print(f"{label}: seeded in {seed(url, args.series):.0f} s", flush=True)
        report(f"{label}, {args.series} series / {args.series * SLICES} slice scores, {args.repeats} requests each",
               measure(url, args.series, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
