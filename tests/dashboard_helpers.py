"""Seed a migrated database with what the dashboard shows: studies, series, instances, slice
scores, results (with an earlier round), deliveries, an audit run with flags; plus a tiny app."""
from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from qcnode.db.audit_models import AuditFlag, AuditProtocolStat, AuditRun
from qcnode.db.models import Delivery, Instance, SeriesResult, Series, SliceScore, Study, utcnow

_n = itertools.count(1)
PATIENT_KEY = "pk-3f9a1c"  # the pseudonymised key as stored (a keyed hash in real use)


def uid() -> str:
    return f"1.2.826.0.1.3680043.10.777.{next(_n)}"


@dataclass
class Seeded:
    series_ids: list[int] = field(default_factory=list)
    fail_result_ids: list[int] = field(default_factory=list)
    flag_ids: list[int] = field(default_factory=list)
    run_id: int = 0
    uids: dict[int, str] = field(default_factory=dict)


SPECS = [  # protocol, manufacturer, model, station, kernel, body part, description, scores, verdict
    ("CHEST LD", "Philips", "Ingenuity", "CT4", "B", "CHEST", "Thorax 1.0 low dose", (3.1, 3.3, 2.9, 3.2), "PASS"),
    ("CHEST LD", "Philips", "Ingenuity", "CT4", "B", "CHEST", "Thorax 1.0 low dose", (2.4, 2.2, 2.6, 2.3), "WARN"),
    ("CHEST LD", "GE", "Revolution", "CT1", "STANDARD", "CHEST", "Chest routine", (3.4, 3.6, 3.5, 3.3), "PASS"),
    ("HEAD", "GE", "Revolution", "CT1", "SOFT", "HEAD", "Brain axial", (1.1, 1.3, 0.9, 1.2), "FAIL"),
    ("ABDOMEN", "Siemens", "Force", "CT2", "Br40", "ABDOMEN", "Abdomen portal venous", (2.9, 3.0, 3.1, 2.8), "PASS"),
]


def seed_dashboard(session: Session, now: dt.datetime | None = None, spool_paths: list[str] | None = None) -> Seeded:
    """Five scored series (one FAIL) from today back over four days, one with an earlier round,
    SR deliveries (delivered, pending, dead), and an audit run with a baseline and two flags."""
    now = now or utcnow()
    out = Seeded()
    for k, (proto, man, model, station, kernel, body, desc, scores, verdict) in enumerate(SPECS):
        at = now - dt.timedelta(days=k, minutes=5)
        study = Study(study_instance_uid=uid(), patient_key=PATIENT_KEY, study_date=at.date())
        session.add(study)
        session.flush()
        series = Series(series_instance_uid=uid(), study_id=study.id, modality="CT", protocol_name=proto,
                        series_description=desc, body_part=body, manufacturer=man, model_name=model,
                        station_name=station, status="scored", version=2 if k == 0 else 1,
                        instance_count=len(scores), first_received_at=at - dt.timedelta(minutes=1),
                        last_received_at=at)
        session.add(series)
        session.flush()
        out.series_ids.append(series.id)
        out.uids[series.id] = series.series_instance_uid
        instances = []
        for i, _ in enumerate(scores):
            inst = Instance(sop_instance_uid=uid(), series_id=series.id, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            instance_number=i + 1,
                            spool_path=(spool_paths[i] if spool_paths and i < len(spool_paths) else f"missing/{uid()}.dcm"),
                            size_bytes=1000, received_at=at, ctdivol_mgy=4.0 + k, kvp=120.0, tube_current_ma=80.0 + k,
                            exposure_mas=40.0, pitch=0.9, kernel=kernel, slice_thickness_mm=1.0,
                            slice_location=-100.0 - 2.5 * i)
            session.add(inst)
            instances.append(inst)
        session.flush()
        rounds = [1, 2] if k == 0 else [1]
        for version in rounds:
            shift = -0.4 if version < rounds[-1] else 0.0
            mean = sum(scores) / len(scores) + shift
            result = SeriesResult(series_id=series.id, version=version, model_version="mdiqa-test-1",
                                  n_slices=len(scores), mean_score=mean, min_score=min(scores) + shift,
                                  p10_score=min(scores) + shift, fraction_below=sum(s < 2.0 for s in scores) / len(scores),
                                  verdict=verdict, noise_hu=12.0 + k, ctdivol_mgy=4.0 + k, dw_cm=27.0,
                                  ssde_mgy=5.0 + 1.1 * k, created_at=at + dt.timedelta(minutes=version),
                                  sr_sop_instance_uid=uid(), sr_path=f"sr/{k}-{version}.dcm")
            session.add(result)
            session.flush()
            if verdict == "FAIL":
                out.fail_result_ids.append(result.id)
            for inst, score in zip(instances, scores):
                session.add(SliceScore(instance_id=inst.id, series_id=series.id, series_version=version,
                                       model_version="mdiqa-test-1", score=score + shift, score_low=score + shift - 0.4,
                                       score_high=score + shift + 0.4, noise_hu=12.0 + k, dw_cm=27.0,
                                       ssde_mgy=5.0 + 1.1 * k))
            status = {0: "delivered", 3: "dead"}.get(k, "pending")
            session.add(Delivery(series_result_id=result.id, destination="pacs", kind="sr", status=status,
                                 attempts=8 if status == "dead" else 1,
                                 last_error="association rejected" if status == "dead" else None,
                                 delivered_at=at + dt.timedelta(seconds=30) if status == "delivered" else None))
    run = AuditRun(trigger="nightly", since=(now - dt.timedelta(days=7)).date(), until=now.date(),
                   started_at=now - dt.timedelta(hours=1), finished_at=now - dt.timedelta(hours=1),
                   status="ok", n_series=5, n_groups=4, n_flags=2)
    session.add(run)
    session.flush()
    out.run_id = run.id
    session.add(AuditProtocolStat(run_id=run.id, protocol="CHEST LD", scanner="Philips Ingenuity CT4", n_series=2,
                                  n_fail=0, fail_fraction=0.0, score_median=2.8, baseline_n=5,
                                  baseline_score_median=3.0, baseline_noise_median=11.0))
    for kind, proto, scanner, msg in (
            ("noise_drift", "CHEST LD", "Philips Ingenuity CT4", "median noise 12.0 HU vs baseline 9.0 HU"),
            ("ctdivol_above_reference", "HEAD", "GE Revolution CT1", "median CTDIvol 7.0 mGy above reference 5.0")):
        flag = AuditFlag(run_id=run.id, protocol=proto, scanner=scanner, kind=kind, value=12.0, reference=9.0,
                         message=msg)
        session.add(flag)
        session.flush()
        out.flag_ids.append(flag.id)
    session.commit()
    return out


READ_TOKEN = "read-token-0123456789"
ADMIN_TOKEN = "admin-token-9876543210"
STORE_TOKEN = "store-token-5555555555"


def http_tokens() -> list[Any]:
    """``[[http.tokens]]`` for the three test tokens (named read-token, admin-token, store-token)."""
    from qcnode.config import HttpToken
    from qcnode.http.auth import token_sha256
    return [HttpToken(name=f"{role}-token", sha256=token_sha256(token), role=role)
            for role, token in (("read", READ_TOKEN), ("admin", ADMIN_TOKEN), ("store", STORE_TOKEN))]


def make_test_app(sf: Any, cfg: Any, open_: bool = False, http_options: dict[str, Any] | None = None) -> Any:
    """``qcnode serve``'s HTTP application (``qcnode.http.app.create_app``) over ``sf``: bound to a
    non-loopback address with the read, admin and store tokens, or with ``open_`` to loopback
    without tokens (open: every caller is the admin ``local``); ``http_options`` set further
    ``[http]`` keys (``tokens`` among them). Close ``app.state.node`` after use."""
    import dataclasses

    from qcnode.config import HttpConfig
    from qcnode.http.app import HttpNode, create_app
    from qcnode.ingest.spool import Spool
    options = {} if open_ else {"host": "0.0.0.0", "tokens": http_tokens()}
    http = HttpConfig(**{**options, **(http_options or {})})
    cfg = dataclasses.replace(cfg, http=http)
    spool = Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir))
    return create_app(HttpNode(cfg, sf, spool))
