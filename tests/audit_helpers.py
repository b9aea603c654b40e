"""Seed a migrated database with scored series for the audit and view tests."""
from __future__ import annotations

import datetime as dt
import itertools

from sqlalchemy.orm import Session

from qcnode.db.models import SeriesResult, Series, Study

_uid = itertools.count(1)


def new_uid(prefix: str = "1.2.826.0.1.3680043.10.1234") -> str:
    return f"{prefix}.{next(_uid)}"


def seed_series(session: Session, *, protocol: str | None, scored_at: dt.datetime, score: float,
                verdict: str = "PASS", noise: float | None = 10.0, ctdivol: float | None = 10.0,
                ssde: float | None = 12.0, manufacturer: str = "Philips", model_name: str = "Ingenuity CT",
                station: str | None = "CT4", study: Study | None = None, patient_key: str | None = "pk-0001",
                study_date: dt.date | None = None, versions: list[tuple[float, str]] | None = None,
                model_version: str = "mdiqa-test-1") -> Series:
    """One study (unless given) + series + series_results rows. ``versions`` lists earlier
    (score, verdict) scoring rounds stored before the final one (score, verdict)."""
    if study is None:
        study = Study(study_instance_uid=new_uid(), patient_key=patient_key, study_date=study_date)
        session.add(study)
        session.flush()
    series = Series(series_instance_uid=new_uid(), study_id=study.id, modality="CT", protocol_name=protocol,
                    series_description="AXIAL 5MM", manufacturer=manufacturer, model_name=model_name,
                    station_name=station, status="scored", instance_count=20,
                    first_received_at=scored_at, last_received_at=scored_at)
    session.add(series)
    session.flush()
    rounds = list(versions or []) + [(score, verdict)]
    for version, (sc, vd) in enumerate(rounds, start=1):
        at = scored_at - dt.timedelta(minutes=10 * (len(rounds) - version))
        session.add(SeriesResult(series_id=series.id, version=version, model_version=model_version, n_slices=20,
                                 mean_score=sc, min_score=sc - 0.5, p10_score=sc - 0.3, fraction_below=0.0,
                                 verdict=vd, noise_hu=noise, ctdivol_mgy=ctdivol, ssde_mgy=ssde,
                                 dw_cm=25.0, created_at=at))
    series.version = len(rounds)
    session.flush()
    return series
