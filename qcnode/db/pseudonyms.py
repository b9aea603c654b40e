"""Pseudonymise patient and accession IDs stored raw while ``privacy.pseudonymise_patient_id`` was off.

With the option off, ingest stores PatientID / AccessionNumber as they are in ``studies.patient_key``
/ ``studies.accession_key``; once it is on, those raw IDs would stay and be shown as if they were
pseudonyms. ``pseudonymise_stored_ids`` replaces each of them by the key ingest stores now, so a
later study of the same patient gets the same key.
"""
from __future__ import annotations

import re

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from qcnode.db.models import Study
from qcnode.dicom.privacy import pseudonymise

_PSEUDONYM = re.compile(r"[0-9a-f]{64}")  # what ``pseudonymise`` gives: hex HMAC-SHA256
_KEY_COLUMNS = ("patient_key", "accession_key")


def is_pseudonym(value: str) -> bool:
    """Whether a stored key already has the form of a pseudonym (64 lowercase hex characters)."""
    return _PSEUDONYM.fullmatch(value) is not None


def pseudonymise_stored_ids(session: Session, key: bytes) -> int:
    """Replace every stored ``patient_key`` / ``accession_key`` that is not a pseudonym by
    ``pseudonymise(value, key)``; None and pseudonyms stay. Returns how many studies changed.
    The caller commits.

    Ingest stored ``str(value)[:128]`` raw and stores ``pseudonymise(str(value), key)`` now, so the
    result is the key ingest gives the same ID (IDs longer than 128 characters were cut on storage
    and cannot be matched; a raw ID of 64 lowercase hex characters is taken for a pseudonym).
    Reads only the id and the two keys and writes only the changed values, each guarded by its old
    value, so that nodes starting together do not hash a key twice."""
    table = Study.__table__
    changes: dict[str, list[dict[str, object]]] = {col: [] for col in _KEY_COLUMNS}
    changed: set[int] = set()
    rows = session.execute(select(table.c.id, *(table.c[col] for col in _KEY_COLUMNS)))
    for study_id, *values in rows:
        for col, old in zip(_KEY_COLUMNS, values):
            if old is None or is_pseudonym(old):
                continue
            changes[col].append({"b_id": study_id, "b_old": old, "b_new": pseudonymise(old, key)})
            changed.add(study_id)
    for col, params in changes.items():
        if params:
            session.execute(update(table).where(table.c.id == bindparam("b_id"), table.c[col] == bindparam("b_old"))
                            .values({col: bindparam("b_new")}), params)
    return len(changed)
