"""Group commit of received instances: one writer thread records many C-STOREs per transaction.

C-STORE handlers write their file, hand a :class:`PendingInstance` to
:meth:`InstanceRecorder.record` and block until it is committed; the writer fsyncs the touched
spool folders once per batch and upserts the whole batch in one transaction, so the per-instance
cost of fsync and commit shrinks under load and handlers never compete for SQLite's write lock.
Inserts are upserts on the unique UIDs (several SCP processes may share a database); a failing
batch is retried with empty id caches, then one record per transaction.
"""
from __future__ import annotations

import datetime as dt
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Connection, bindparam, case, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from qcnode.db.models import DoseReport, Instance, Series, Study
from qcnode.db.states import SeriesState
from qcnode.ingest.spool import fsync_dir
from qcnode.log import get_logger

log = get_logger("qcnode.recorder")

MAX_BATCH = 128           # records per transaction at most
LINGER_S = 0.003          # longest wait for the C-STOREs in flight to join a batch
RECORD_TIMEOUT_S = 600.0  # a handler gives up waiting (the DB is locked for that long) -> failure status


@dataclass
class PendingInstance:
    """One received instance, ready to be recorded (values already clipped to the columns)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    study_values: dict[str, Any]        # studies row (without id)
    series_values: dict[str, Any]       # series row for a first insert (without study_id)
    instance_values: dict[str, Any]     # instances row (without series_id)
    received_at: dt.datetime
    identical: bool = False             # the spool already held exactly these bytes
    sync_dir: Path | None = None        # folder whose fsync makes the file's rename durable
    dose_report: dict[str, Any] | None = None  # DoseReport row (without study_id) for dose SRs
    future: Future = field(default_factory=Future)


_INSTANCES = Instance.__table__
_SERIES = Series.__table__
# the series touched by a batch: receiving again, newest arrival (never earlier than one another
# receiving process committed first), instance count
_WHEN = bindparam("when", type_=_SERIES.c.last_received_at.type)
_NEWEST_ARRIVAL = case((or_(_SERIES.c.last_received_at.is_(None), _SERIES.c.last_received_at < _WHEN), _WHEN),
                       else_=_SERIES.c.last_received_at)
_TOUCH_SERIES = (update(_SERIES).where(_SERIES.c.id == bindparam("sid"))
                 .values(status=SeriesState.RECEIVING, last_received_at=_NEWEST_ARRIVAL,
                         instance_count=select(func.count(_INSTANCES.c.id))
                         .where(_INSTANCES.c.series_id == bindparam("sid")).scalar_subquery()))


class _FolderNotDurable(Exception):
    """A spool folder of the batch could not be fsynced: its records must not be committed."""


def _fsync_dirs(dirs: set[Path]) -> dict[Path, OSError]:
    """fsync each folder; returns the ones that failed with their error."""
    failed: dict[Path, OSError] = {}
    for d in dirs:
        try:
            fsync_dir(d)
        except OSError as exc:
            failed[d] = exc
    return failed


def _dialect_insert(conn: Connection, model: Any) -> Any:
    table = model.__table__  # Core statements: executemany without the ORM bulk machinery
    return pg_insert(table) if conn.dialect.name == "postgresql" else sqlite_insert(table)


def _group_by_keys(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by their key set (an executemany needs the same keys in every row)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    return list(groups.values())


class InstanceRecorder:
    """The group-commit writer. ``record(p)`` blocks until ``p`` is committed (or raises)."""

    def __init__(self, session_factory: Callable[[], Session], max_batch: int = MAX_BATCH,
                 in_flight: Callable[[], int] | None = None, linger_s: float = LINGER_S):
        """``in_flight``: how many C-STOREs are being handled now (queued ones included); the writer
        waits up to ``linger_s`` for them to join a batch before committing it."""
        self.session_factory = session_factory
        self.max_batch = max_batch
        self.in_flight = in_flight
        self.linger_s = linger_s
        self._queue: queue.Queue[PendingInstance | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._dir_syncer: ThreadPoolExecutor | None = None
        self._start_lock = threading.Lock()
        self._study_ids: dict[str, int] = {}
        self._series_ids: dict[str, int] = {}
        self._statements: dict[tuple[Any, ...], Any] = {}  # built once: building them costs more than running
        self.batches = 0
        self.records = 0
        self.begin_wait_s = 0.0      # time spent waiting for the database write lock
        self.begin_wait_max_s = 0.0

    # ---- handler side --------------------------------------------------------------------------
    def record(self, pending: PendingInstance, timeout: float = RECORD_TIMEOUT_S) -> None:
        """Queue ``pending`` and wait until its transaction is committed; re-raises its error."""
        self._ensure_started()
        self._queue.put(pending)
        pending.future.result(timeout=timeout)

    def _ensure_started(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._dir_syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scp-dirsync")
                self._thread = threading.Thread(target=self._run, name="scp-recorder", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Record what is queued, then stop the writer thread."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        if self._dir_syncer is not None:
            self._dir_syncer.shutdown(wait=False)
        if self.batches:
            log.info("recorder_stats", batches=self.batches, records=self.records,
                     mean_batch=round(self.records / self.batches, 2),
                     lock_wait_s=round(self.begin_wait_s, 3), lock_wait_max_s=round(self.begin_wait_max_s, 3))

    # ---- writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    # another C-STORE is being handled: it will be queued within a few ms
                    wait = deadline - time.monotonic()
                    if self.in_flight is None or wait <= 0 or self.in_flight() <= len(batch):
                        break
                    try:
                        nxt = self._queue.get(timeout=wait)
                    except queue.Empty:
                        break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                self._commit(batch)
            except BaseException as exc:  # noqa: BLE001 - never leave a handler waiting
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    def _commit(self, batch: list[PendingInstance]) -> None:
        # the folder fsyncs run in a helper thread while this one runs the SQL; COMMIT waits for them
        dirs = {p.sync_dir for p in batch if p.sync_dir is not None}
        synced: Future = Future()
        if dirs and self._dir_syncer is not None:
            synced = self._dir_syncer.submit(_fsync_dirs, dirs)
        else:  # nothing to sync, or no helper thread (not started through record()): fsync here
            synced.set_result(_fsync_dirs(dirs))

        def renames_durable() -> None:
            if synced.result():
                raise _FolderNotDurable()
        try:
            self._write(batch, before_commit=renames_durable)
        except Exception as exc:  # noqa: BLE001 - careful path: drop records whose folder fsync failed (an fsync
            # is not retried: after an error Linux may report a later one clean), then record by record
            if not isinstance(exc, _FolderNotDurable):
                log.warning("record_batch_retry", records=len(batch), error=f"{type(exc).__name__}: {exc}")
                self._study_ids.clear()
                self._series_ids.clear()
            self._write_each(self._drop_not_durable(batch, synced.result()))
            return
        self._done(batch)

    def _write_each(self, batch: list[PendingInstance]) -> None:
        """The batch in one transaction, or else one record per transaction (a bad one fails alone)."""
        if not batch:
            return
        try:
            self._write(batch)
        except Exception as exc:  # noqa: BLE001
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for p in batch:
                try:
                    self._write([p])
                except Exception as exc2:  # noqa: BLE001
                    p.future.set_exception(exc2)
                    continue
                self._done([p])
            return
        self._done(batch)

    def _done(self, batch: list[PendingInstance]) -> None:
        self.batches += 1
        self.records += len(batch)
        for p in batch:
            p.future.set_result(None)

    @staticmethod
    def _drop_not_durable(batch: list[PendingInstance],
                          failed: dict[Path, OSError]) -> list[PendingInstance]:
        """The records whose folder fsync succeeded; the others get the fsync error."""
        ok = []
        for p in batch:
            if p.sync_dir in failed:
                p.future.set_exception(failed[p.sync_dir])
            else:
                ok.append(p)
        return ok

    def _write(self, batch: list[PendingInstance], before_commit: Callable[[], None] | None = None) -> None:
        new_studies: dict[str, int] = {}
        new_series: dict[str, int] = {}
        with self.session_factory() as s:
            t0 = time.monotonic()
            conn = s.connection()  # SQLite: BEGIN IMMEDIATE, i.e. wait for the write lock
            waited = time.monotonic() - t0
            self.begin_wait_s += waited
            self.begin_wait_max_s = max(self.begin_wait_max_s, waited)
            todo = batch
            identical = [p.sop_uid for p in batch if p.identical]
            if identical:  # an exact resend of a recorded instance changes nothing
                known = set(conn.scalars(select(_INSTANCES.c.sop_instance_uid)
                                         .where(_INSTANCES.c.sop_instance_uid.in_(identical))))
                todo = [p for p in batch if not (p.identical and p.sop_uid in known)]
            if not todo:
                if before_commit is not None:
                    before_commit()
                s.commit()
                return
            study_ids = self._ids(conn, Study, "study_instance_uid",
                                  {p.study_uid: p.study_values for p in todo}, self._study_ids, new_studies)
            series_rows = {p.series_uid: {**p.series_values, "study_id": study_ids[p.study_uid]} for p in todo}
            series_ids = self._ids(conn, Series, "series_instance_uid", series_rows, self._series_ids, new_series)
            last: dict[str, PendingInstance] = {}
            for p in todo:  # one row per SOP Instance UID (a resend within the batch: the last wins)
                last[p.sop_uid] = p
            rows = [{**p.instance_values, "series_id": series_ids[p.series_uid]} for p in last.values()]
            # a SOP Instance UID arriving again in another series moves there (the newest copy wins);
            # the series it leaves is recounted and reopened, so it is scored again without it
            moved_from = {sid for uid, sid in conn.execute(select(_INSTANCES.c.sop_instance_uid, _INSTANCES.c.series_id)
                                                           .where(_INSTANCES.c.sop_instance_uid.in_(list(last))))
                          if sid != series_ids[last[uid].series_uid]}
            for group in _group_by_keys(rows):
                conn.execute(self._upsert(conn, Instance, "sop_instance_uid", tuple(group[0])), group)
            latest: dict[int, dt.datetime] = {sid: max(p.received_at for p in todo) for sid in moved_from}
            for p in todo:
                sid = series_ids[p.series_uid]
                latest[sid] = max(latest.get(sid, p.received_at), p.received_at)
            conn.execute(_TOUCH_SERIES, [{"sid": sid, "when": when} for sid, when in latest.items()])
            for p in todo:
                if p.dose_report is not None:
                    dr = {**p.dose_report, "study_id": study_ids[p.study_uid]}
                    conn.execute(self._upsert(conn, DoseReport, "sop_instance_uid", tuple(dr)), dr)
            if before_commit is not None:
                before_commit()
            s.commit()
        self._study_ids.update(new_studies)
        self._series_ids.update(new_series)
        for cache in (self._study_ids, self._series_ids):
            if len(cache) > 100_000:  # bound memory on a node that runs for months
                cache.clear()

    def _upsert(self, conn: Connection, model: Any, key: str, columns: tuple[str, ...]) -> Any:
        """INSERT ... ON CONFLICT (key) DO UPDATE SET <columns> = excluded.<columns> (cached)."""
        cache_key = ("upsert", conn.dialect.name, model.__tablename__, columns)
        stmt = self._statements.get(cache_key)
        if stmt is None:
            stmt = _dialect_insert(conn, model)
            stmt = stmt.on_conflict_do_update(index_elements=[key],
                                              set_={c: stmt.excluded[c] for c in columns if c != key})
            self._statements[cache_key] = stmt
        return stmt

    @staticmethod
    def _ids(s: Connection, model: Any, key: str, values: dict[str, dict[str, Any]], cache: dict[str, int],
             new: dict[str, int]) -> dict[str, int]:
        """Ids of the rows with these UIDs, inserting missing ones (insert-or-ignore + select)."""
        col = model.__table__.c[key]
        out = {uid: cache[uid] for uid in values if uid in cache}
        missing = [uid for uid in values if uid not in out]
        if not missing:
            return out
        found = dict(s.execute(select(col, model.__table__.c.id).where(col.in_(missing))).all())
        absent = [uid for uid in missing if uid not in found]
        if absent:
            for group in _group_by_keys([values[uid] for uid in absent]):
                s.execute(_dialect_insert(s, model).on_conflict_do_nothing(index_elements=[key]), group)
            found.update(s.execute(select(col, model.__table__.c.id).where(col.in_(absent))).all())
        ids = {uid: int(found[uid]) for uid in missing}
        new.update(ids)
        out.update(ids)
        return out
