"""Every result, persisted in SQLite: samples, frames and cells, written so that a crash loses nothing committed,
a retry records nothing twice, and a changed or damaged file is noticed.

* WAL journal, `synchronous=FULL`, one transaction per frame (the frame row, its cell rows and the count
  they add commit together or not at all).
* A frame's identity is its source identity (`source_key`: file path plus content hash, video file plus frame
  number, camera/stream plus capture time), UNIQUE per sample: recording a frame that is already there is a no-op
  that reports `new=False` (a retry, a re-run or a reordered folder cannot double count). `frame_index` is the
  recording order, assigned inside the write transaction.
* One live writer per sample: `start_sample` takes a lease row (owner, pid, host, heartbeat). A second writer is
  refused (`SampleBusy`) while the lease is fresh; a lease whose process is gone (same host) or whose heartbeat is
  older than LEASE_TIMEOUT_S is taken over.
* Each frame row carries a sha256 of its own fields and its cells' rows; `verify()` names the frames that fail.
* Opening runs `PRAGMA quick_check`; a damaged, empty (zero-byte) or foreign file is refused with one line naming it.
* The differential is derived, never stored: `differential(sample)` replays the cells in the order their frames
  were recorded through `Differential.observe` (a cursor, not a list in memory), which is exactly what
  `record_frame` did live. Track labels of tracks not seen for TRACK_MEMORY_FRAMES frames are forgotten (the
  tracker ended them long before), so the state is bounded by the cells in view plus the counts.
* Schema versioned with PRAGMA user_version; older databases are migrated on open.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from leukograph.client.contract import CELL_KINDS, CLASSES, NUM_CLASSES, UNIDENTIFIED
from leukograph.client.differential import Differential
from leukograph.client.errors import UserError

DEFAULT_DB = "leukograph.sqlite"  # relative to the current directory; the stream client uses it too
SCHEMA_VERSION = 2
LEASE_TIMEOUT_S = 20.0  # a writer whose heartbeat is older than this is presumed dead
HEARTBEAT_S = 2.0
TRACK_MEMORY_FRAMES = 64  # a track unseen for this many recorded frames has ended (the tracker drops it after 3)

_SCHEMA_V1 = """
CREATE TABLE samples (
    sample_id     TEXT PRIMARY KEY,
    created       TEXT NOT NULL,              -- ISO 8601 UTC
    target        INTEGER NOT NULL CHECK (target > 0),
    model_version TEXT NOT NULL,
    settings      TEXT NOT NULL DEFAULT '{}'  -- JSON
);
CREATE TABLE frames (
    seq           INTEGER PRIMARY KEY,        -- recording order (the order the differential was counted in)
    sample_id     TEXT NOT NULL REFERENCES samples(sample_id),
    frame_index   INTEGER NOT NULL,
    source        TEXT,
    captured_at   TEXT,
    received_at   TEXT,
    n_cells       INTEGER NOT NULL,
    latency_ms    REAL,
    model_version TEXT NOT NULL,
    UNIQUE (sample_id, frame_index)
);
CREATE TABLE cells (
    sample_id     TEXT NOT NULL,
    frame_index   INTEGER NOT NULL,
    cell_index    INTEGER NOT NULL,
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
    kind          TEXT NOT NULL,              -- what the localiser says: wbc | rbc | platelet
    label         TEXT NOT NULL,              -- a class name or 'unidentified'
    confidence    REAL,                       -- top class probability
    probs         TEXT,                       -- JSON {class: probability}
    track_id      INTEGER,
    counted       INTEGER NOT NULL,           -- 1 when this observation changed the differential
    model_version TEXT NOT NULL,
    recorded_at   TEXT NOT NULL,
    UNIQUE (sample_id, frame_index, cell_index),
    FOREIGN KEY (sample_id, frame_index) REFERENCES frames(sample_id, frame_index)
);
CREATE INDEX cells_by_track ON cells(sample_id, track_id);
"""

_SCHEMA_V2 = """
ALTER TABLE frames ADD COLUMN source_key TEXT;  -- the frame's source identity (see module docstring)
ALTER TABLE frames ADD COLUMN checksum TEXT;    -- sha256 of the frame's fields and its cells' rows
CREATE UNIQUE INDEX frames_by_source ON frames(sample_id, source_key) WHERE source_key IS NOT NULL;
CREATE TABLE writers (
    sample_id     TEXT PRIMARY KEY REFERENCES samples(sample_id),
    owner         TEXT NOT NULL,              -- host:pid:process start:random, unique per open store
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    since         TEXT NOT NULL,
    heartbeat     REAL NOT NULL               -- epoch seconds
);
"""

_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2}  # version -> statements that reach it

CELL_COLUMNS: tuple[str, ...] = (
    "sample_id", "frame_index", "cell_index", "x1", "y1", "x2", "y2", "kind", "label", "confidence", "probs",
    "track_id", "counted", "model_version", "recorded_at")
_CHECKSUM_FRAME_FIELDS = ("sample_id", "frame_index", "source_key", "n_cells", "model_version")


class DatabaseProblem(UserError):
    """The result database is damaged, empty, foreign or unreadable."""


class SampleBusy(UserError):
    """Another live writer holds the sample."""


def _iso(value: float | str | datetime | None) -> str | None:
    """Timestamps are stored as ISO 8601 UTC text; accepts epoch seconds, datetime or text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return datetime.fromtimestamp(float(value), tz=timezone.utc).isoformat(timespec="milliseconds")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def frame_checksum(frame: Mapping[str, Any], cell_rows: Iterable[Sequence[Any]]) -> str:
    """sha256 over a frame's identifying fields and its cells' rows (CELL_COLUMNS order, by cell_index)."""
    payload = [[frame[k] for k in _CHECKSUM_FRAME_FIELDS], [list(r) for r in cell_rows]]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' when unknown): pid plus this names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _process_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    return not start or _process_start(pid) in ("", start)


@dataclass(frozen=True)
class CellRecord:
    """One classified cell of a frame, as the client has it."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in frame pixels
    kind: str  # contract.CELL_KINDS
    label: str  # from differential.label_cell
    probs: Sequence[float] | None = None  # NUM_CLASSES, contract.CLASSES order
    track_id: int | None = None
    confidence: float | None = None  # default: max(probs)


@dataclass(frozen=True)
class FrameOutcome:
    """What `record_frame` did. Truthy when the frame was new."""

    new: bool
    counted: tuple[bool, ...]  # per cell; all False when the frame was already recorded
    frame_index: int | None = None  # the frame's index in the sample (the existing one when not new)

    def __bool__(self) -> bool:
        return self.new


class _Counting:
    """A sample's live differential plus when each remembered track was last seen; forgets ended tracks."""

    def __init__(self, target: int) -> None:
        self.differential = Differential(target)
        self.last_seen: dict[int, int] = {}
        self.frames = 0

    def trial(self, observations: Sequence[tuple[str, int | None]]) -> tuple[bool, ...]:
        """What observing these would count, without changing anything."""
        trial = self.differential.copy()
        return tuple(trial.observe(label, track) for label, track in observations)

    def observe_frame(self, observations: Sequence[tuple[str, int | None]]) -> None:
        for label, track in observations:
            self.differential.observe(label, track)
            if track is not None:
                self.last_seen[track] = self.frames
        self.frames += 1
        horizon = self.frames - TRACK_MEMORY_FRAMES
        if self.last_seen and min(self.last_seen.values()) < horizon:
            ended = [t for t, seen in self.last_seen.items() if seen < horizon]
            self.differential.forget_tracks(ended)
            for track in ended:
                del self.last_seen[track]


@dataclass
class SampleState:
    sample_id: str
    created: str
    target: int
    model_version: str
    settings: dict[str, Any]
    differential: Differential  # live: record_frame updates it
    last_frame_index: int | None
    next_track_id: int  # give this to CellTracker(first_track_id=...) so ids never repeat in a sample
    n_frames: int
    resumed: bool
    model_versions: list[str] = field(default_factory=list)  # all versions that recorded frames


class ResultStore:
    """SQLite store of samples, frames and cells. Safe to share between threads (one lock)."""

    def __init__(self, path: str | Path = DEFAULT_DB, create: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}:{uuid.uuid4().hex[:8]}"
        self._leases: set[str] = set()
        self._heartbeat: threading.Thread | None = None
        self._closing = threading.Event()
        self._live: dict[str, _Counting] = {}
        self._versions: dict[str, str] = {}  # model version this client session records with, per sample
        if not create and not self.path.is_file():
            raise UserError(f"no result database at {self.path}")
        try:
            self._open(create)
        except sqlite3.DatabaseError as exc:
            self._close_connection()
            raise DatabaseProblem(f"cannot open result database {self.path}: {exc}") from None
        except BaseException:
            self._close_connection()
            raise

    def _open(self, create: bool) -> None:
        """Connect, check, create or migrate the schema, holding an flock on the database's folder: the first
        write (WAL mode) gives a new database its header before anyone else looks, so a zero-byte file seen here
        is a database that lost its contents, never one being created right now."""
        folder = self.path.resolve().parent
        try:
            folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise DatabaseProblem(f"cannot open result database {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(folder_fd, fcntl.LOCK_EX)
            existed = self.path.exists()
            if existed and self.path.stat().st_size == 0:
                raise DatabaseProblem(f"{self.path} is an empty file, not a result database (a database that "
                                      "lost its contents?); move it away or choose another --db")
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed frame survives power loss too
            self._db.execute("PRAGMA foreign_keys=ON")
            if existed:
                problems = [r[0] for r in self._db.execute("PRAGMA quick_check(3)")]
                if problems != ["ok"]:
                    details = "; ".join(" ".join(line.split()) for p in problems for line in str(p).splitlines())
                    raise DatabaseProblem(f"result database {self.path} is damaged: {details}")
            self._init_schema()
        finally:
            os.close(folder_fd)  # releases the flock

    def _init_schema(self) -> None:
        if self._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self._transaction():  # checked again under the write lock: another process may be creating it
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                return
            if version > SCHEMA_VERSION:
                raise DatabaseProblem(f"{self.path} has schema version {version}, newer than this leukograph "
                                      f"({SCHEMA_VERSION}); upgrade leukograph")
            tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
            if version == 0 and tables:
                raise DatabaseProblem(f"{self.path} is an SQLite file but not a leukograph result database")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            if version == 1:
                self._backfill_checksums()
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _backfill_checksums(self) -> None:
        """Migration 1 -> 2: frames recorded before checksums existed get theirs now."""
        for frame in self._db.execute("SELECT * FROM frames").fetchall():
            cells = self._db.execute(
                f"SELECT {', '.join(CELL_COLUMNS)} FROM cells WHERE sample_id = ? AND frame_index = ? "
                "ORDER BY cell_index", (frame["sample_id"], frame["frame_index"])).fetchall()
            self._db.execute("UPDATE frames SET checksum = ? WHERE seq = ?",
                             (frame_checksum(frame, cells), frame["seq"]))

    def _problem(self, exc: sqlite3.DatabaseError) -> DatabaseProblem:
        return DatabaseProblem(f"result database {self.path}: {exc}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise self._problem(exc) from None
        try:
            yield self._db
        except BaseException:
            with contextlib.suppress(sqlite3.DatabaseError):
                self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(sqlite3.DatabaseError):
                self._db.execute("ROLLBACK")
            raise self._problem(exc) from None

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Run a read under the store's lock (the connection is shared between threads)."""
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise self._problem(exc) from None

    def _rows(self, sql: str, params: tuple = ()) -> Iterator[sqlite3.Row]:
        """Stream a read row by row (bounded memory) on its own cursor."""
        with self._lock:
            cursor = self._db.execute(sql, params)
        while True:
            try:
                with self._lock:
                    batch = cursor.fetchmany(512)
            except sqlite3.DatabaseError as exc:
                raise self._problem(exc) from None
            if not batch:
                return
            yield from batch

    def close(self) -> None:
        self._closing.set()
        if self._heartbeat is not None:
            self._heartbeat.join(5)
        with self._lock:
            if self._db is not None and self._leases:
                with contextlib.suppress(sqlite3.DatabaseError, UserError), self._transaction() as db:
                    db.execute("DELETE FROM writers WHERE owner = ?", (self._owner,))
            self._leases.clear()
            self._close_connection()

    def _close_connection(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the writer lease ----------------------------------------------------------------------
    def _acquire_lease(self, sample_id: str) -> None:
        """Become the sample's one writer, or raise SampleBusy naming the live one."""
        host, pid, now = socket.gethostname(), os.getpid(), time.time()
        with self._transaction() as db:
            row = db.execute("SELECT * FROM writers WHERE sample_id = ?", (sample_id,)).fetchone()
            if row is not None and row["owner"] != self._owner and not self._stale(row, now):
                raise SampleBusy(
                    f"sample {sample_id!r} is being recorded by another writer (pid {row['pid']} on {row['host']}, "
                    f"heartbeat {now - row['heartbeat']:.0f} s ago) in {self.path}; wait for it to finish")
            db.execute("INSERT OR REPLACE INTO writers (sample_id, owner, host, pid, since, heartbeat) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (sample_id, self._owner, host, pid, _now(), now))
        self._leases.add(sample_id)
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, name="records-heartbeat", daemon=True)
            self._heartbeat.start()

    @staticmethod
    def _stale(row: sqlite3.Row, now: float) -> bool:
        if now - row["heartbeat"] > LEASE_TIMEOUT_S:
            return True
        if row["host"] == socket.gethostname():
            start = row["owner"].split(":")[2] if row["owner"].count(":") >= 3 else ""
            return not _process_alive(int(row["pid"]), start)
        return False

    def _beat(self) -> None:
        while not self._closing.wait(HEARTBEAT_S):
            with self._lock:
                if self._db is None or not self._leases:
                    continue
                # busy now: the next beat
                with contextlib.suppress(sqlite3.DatabaseError, UserError), self._transaction() as db:
                    db.execute("UPDATE writers SET heartbeat = ? WHERE owner = ?", (time.time(), self._owner))

    def _check_lease(self, db: sqlite3.Connection, sample_id: str) -> None:
        """Inside a write transaction: this store still holds the sample's lease (refreshes the heartbeat)."""
        updated = db.execute("UPDATE writers SET heartbeat = ? WHERE sample_id = ? AND owner = ?",
                             (time.time(), sample_id, self._owner)).rowcount
        if not updated:
            self._leases.discard(sample_id)
            raise SampleBusy(f"sample {sample_id!r}: another writer took over {self.path}; nothing more recorded")

    # ---- samples -------------------------------------------------------------------------------
    def start_sample(self, sample_id: str, target: int = 100, model_version: str = "unknown",
                     settings: Mapping[str, Any] | None = None) -> SampleState:
        """Create a sample, or resume it when it exists (same target required), as its one writer (SampleBusy
        when another live writer has it). Returns its state.

        On resume the stored metadata (created, model_version, settings) is kept; the model_version given here
        is what this session's frames record."""
        if not sample_id or not isinstance(sample_id, str):
            raise UserError("sample id must be a non-empty string")
        with self._lock:
            row = self._sample_row(sample_id)
            resumed = row is not None
            if row is None:
                Differential(target)  # validates target
                with self._transaction() as db:
                    db.execute("INSERT OR IGNORE INTO samples (sample_id, created, target, model_version, settings) "
                               "VALUES (?, ?, ?, ?, ?)",
                               (sample_id, _now(), int(target), model_version,
                                json.dumps(dict(settings or {}), sort_keys=True)))
                row = self._sample_row(sample_id)
            if row["target"] != target:
                raise UserError(f"sample {sample_id!r} was started with target {row['target']}, not {target}")
            self._acquire_lease(sample_id)
            self._live[sample_id] = self._replay(sample_id, row["target"])
            self._versions[sample_id] = model_version
            return self._state(row, resumed)

    def _sample_row(self, sample_id: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM samples WHERE sample_id = ?", (sample_id,))
        return rows[0] if rows else None

    def _require_sample(self, sample_id: str) -> sqlite3.Row:
        row = self._sample_row(sample_id)
        if row is None:
            raise UserError(f"unknown sample {sample_id!r} in {self.path}")
        return row

    def _state(self, row: sqlite3.Row, resumed: bool) -> SampleState:
        sample_id = row["sample_id"]
        stats = self._query(
            "SELECT max(frame_index), count(*) FROM frames WHERE sample_id = ?", (sample_id,))[0]
        max_track = self._query(
            "SELECT max(track_id) FROM cells WHERE sample_id = ?", (sample_id,))[0][0]
        versions = [r[0] for r in self._query(
            "SELECT DISTINCT model_version FROM frames WHERE sample_id = ? ORDER BY model_version", (sample_id,))]
        live = self._live.get(sample_id) or self._replay(sample_id, row["target"])
        return SampleState(
            sample_id=sample_id, created=row["created"], target=row["target"],
            model_version=row["model_version"], settings=json.loads(row["settings"]),
            differential=live.differential, last_frame_index=stats[0],
            next_track_id=0 if max_track is None else max_track + 1, n_frames=stats[1], resumed=resumed,
            model_versions=versions)

    def sample(self, sample_id: str) -> dict[str, Any]:
        """Sample metadata plus frame count, last frame index and model versions used."""
        with self._lock:
            state = self._state(self._require_sample(sample_id), resumed=True)
        return {"sample_id": state.sample_id, "created": state.created, "target": state.target,
                "model_version": state.model_version, "settings": state.settings, "n_frames": state.n_frames,
                "last_frame_index": state.last_frame_index, "model_versions": state.model_versions}

    def samples(self) -> list[str]:
        return [r[0] for r in self._query("SELECT sample_id FROM samples ORDER BY created, sample_id")]

    # ---- frames --------------------------------------------------------------------------------
    def has_frame(self, sample_id: str, source_key: str) -> bool:
        """Whether a frame with this source identity is recorded in the sample."""
        return bool(self._query("SELECT 1 FROM frames WHERE sample_id = ? AND source_key = ?",
                                (sample_id, source_key)))

    def record_frame(self, sample_id: str, frame_index: int | None, cells: Sequence[CellRecord], *,
                     source_key: str | None = None, source: str | None = None,
                     captured_at: float | str | datetime | None = None,
                     received_at: float | str | datetime | None = None, latency_ms: float | None = None,
                     model_version: str | None = None) -> FrameOutcome:
        """Record one frame and its cells in one transaction, counting them into the sample's differential.

        frame_index None: the next index, assigned inside the transaction. Idempotent: a frame already recorded
        (same source_key, or the same explicit frame_index) is left as it is and the outcome is `new=False`.
        model_version defaults to the one given to `start_sample` (a resumed sample may run a newer model: each
        frame and cell records its own), else the sample's. SampleBusy when another writer holds the sample."""
        with self._lock:
            row = self._require_sample(sample_id)
            if sample_id not in self._leases:
                self._acquire_lease(sample_id)
            live = self._live.get(sample_id)
            if live is None:
                live = self._live[sample_id] = self._replay(sample_id, row["target"])
            version = model_version or self._versions.get(sample_id) or row["model_version"]
            rows = [self._cell_row(sample_id, i, cell, version) for i, cell in enumerate(cells)]
            observations = [(r[8], r[11]) for r in rows]  # label, track_id
            counted = live.trial(observations)
            with self._transaction() as db:
                self._check_lease(db, sample_id)
                existing = self._existing(db, sample_id, frame_index, source_key)
                if existing is not None:
                    return FrameOutcome(False, (False,) * len(rows), existing)
                if frame_index is None:
                    frame_index = db.execute("SELECT coalesce(max(frame_index) + 1, 0) FROM frames "
                                             "WHERE sample_id = ?", (sample_id,)).fetchone()[0]
                frame_index = int(frame_index)
                cell_rows = [(r[0], frame_index, *r[2:12], int(c), *r[13:])
                             for r, c in zip(rows, counted, strict=True)]
                frame = {"sample_id": sample_id, "frame_index": frame_index, "source_key": source_key,
                         "n_cells": len(rows), "model_version": version}
                db.execute(
                    "INSERT INTO frames (sample_id, frame_index, source_key, source, captured_at, received_at, "
                    "n_cells, latency_ms, model_version, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (sample_id, frame_index, source_key, source, _iso(captured_at), _iso(received_at), len(rows),
                     latency_ms, version, frame_checksum(frame, cell_rows)))
                db.executemany(
                    f"INSERT INTO cells ({', '.join(CELL_COLUMNS)}) VALUES ({', '.join('?' * len(CELL_COLUMNS))})",
                    cell_rows)
            # Committed: count into the live differential (the object SampleState.differential holds).
            # observe is deterministic, so this repeats exactly what the trial did.
            live.observe_frame(observations)
            return FrameOutcome(True, counted, frame_index)

    @staticmethod
    def _existing(db: sqlite3.Connection, sample_id: str, frame_index: int | None,
                  source_key: str | None) -> int | None:
        """The index of the already recorded frame with this identity, or None."""
        if source_key is not None:
            hit = db.execute("SELECT frame_index FROM frames WHERE sample_id = ? AND source_key = ?",
                             (sample_id, source_key)).fetchone()
            if hit is not None:
                return int(hit[0])
        if frame_index is not None:
            hit = db.execute("SELECT frame_index FROM frames WHERE sample_id = ? AND frame_index = ?",
                             (sample_id, int(frame_index))).fetchone()
            if hit is not None:
                return int(hit[0])
        return None

    @staticmethod
    def _cell_row(sample_id: str, cell_index: int, cell: CellRecord, version: str) -> tuple:
        """The cell's row in CELL_COLUMNS order (frame_index and counted filled in when it is written)."""
        if cell.kind not in CELL_KINDS:
            raise ValueError(f"cell {cell_index}: unknown kind {cell.kind!r}")
        if cell.label not in (*CLASSES, UNIDENTIFIED):
            raise ValueError(f"cell {cell_index}: unknown label {cell.label!r}")
        x1, y1, x2, y2 = (float(v) for v in cell.box)
        probs_json = None
        confidence = cell.confidence
        if cell.probs is not None:
            probs = [float(p) for p in cell.probs]
            if len(probs) != NUM_CLASSES:
                raise ValueError(f"cell {cell_index}: {len(probs)} probabilities, expected {NUM_CLASSES}")
            probs_json = json.dumps(dict(zip(CLASSES, probs, strict=True)))
            confidence = max(probs) if confidence is None else confidence
        track = None if cell.track_id is None else int(cell.track_id)
        return (sample_id, None, cell_index, x1, y1, x2, y2, cell.kind, cell.label,
                None if confidence is None else float(confidence), probs_json, track, 0, version, _now())

    def frames(self, sample_id: str) -> list[dict[str, Any]]:
        self._require_sample(sample_id)
        return [dict(r) for r in self._query(
            "SELECT * FROM frames WHERE sample_id = ? ORDER BY seq", (sample_id,))]

    def _cell_dict(self, r: sqlite3.Row) -> dict[str, Any]:
        cell = dict(r)
        cell["probs"] = None if cell["probs"] is None else json.loads(cell["probs"])
        cell["counted"] = bool(cell["counted"])
        return cell

    def iter_cells(self, sample_id: str) -> Iterator[dict[str, Any]]:
        """Every cell of a sample in recording order, streamed; probs parsed to {class: probability} (or None)."""
        self._require_sample(sample_id)
        for r in self._rows(
                f"SELECT {', '.join('c.' + c for c in CELL_COLUMNS)} FROM cells c JOIN frames f "
                "ON f.sample_id = c.sample_id AND f.frame_index = c.frame_index "
                "WHERE c.sample_id = ? ORDER BY f.seq, c.cell_index", (sample_id,)):
            yield self._cell_dict(r)

    def cells(self, sample_id: str) -> list[dict[str, Any]]:
        """Every cell of a sample in recording order; probs parsed to {class: probability} (or None)."""
        return list(self.iter_cells(sample_id))

    def last_frame_cells(self, sample_id: str) -> list[dict[str, Any]]:
        """The cells of the sample's last recorded frame (a resumed tracker continues them)."""
        return [self._cell_dict(r) for r in self._query(
            f"SELECT {', '.join(CELL_COLUMNS)} FROM cells WHERE sample_id = ? AND frame_index = "
            "(SELECT frame_index FROM frames WHERE sample_id = ? ORDER BY seq DESC LIMIT 1) ORDER BY cell_index",
            (sample_id, sample_id))]

    def _replay(self, sample_id: str, target: int) -> _Counting:
        counting = _Counting(target)
        frame: list[tuple[str, int | None]] = []
        current = None
        for r in self._rows(
                "SELECT f.seq, c.label, c.track_id FROM frames f LEFT JOIN cells c "
                "ON f.sample_id = c.sample_id AND f.frame_index = c.frame_index "
                "WHERE f.sample_id = ? ORDER BY f.seq, c.cell_index", (sample_id,)):
            if r["seq"] != current:
                if current is not None:
                    counting.observe_frame(frame)
                current, frame = r["seq"], []
            if r["label"] is not None:
                frame.append((r["label"], r["track_id"]))
        if current is not None:
            counting.observe_frame(frame)
        return counting

    def differential(self, sample_id: str) -> Differential:
        """The sample's differential rebuilt from the database (replaying `Differential.observe`, streamed)."""
        row = self._require_sample(sample_id)
        return self._replay(sample_id, row["target"]).differential

    def review(self, sample_id: str) -> list[dict[str, Any]]:
        """The cells in the review bucket: the counted observation of each cell that is still UNIDENTIFIED (no
        later observation of its track moved it to a WBC class)."""
        self._require_sample(sample_id)
        return [self._cell_dict(r) for r in self._query(
            f"SELECT {', '.join('c.' + c for c in CELL_COLUMNS)} FROM cells c JOIN frames f "
            "ON f.sample_id = c.sample_id AND f.frame_index = c.frame_index "
            "WHERE c.sample_id = ? AND c.counted = 1 AND c.label = ? AND (c.track_id IS NULL OR NOT EXISTS ("
            "  SELECT 1 FROM cells d WHERE d.sample_id = c.sample_id AND d.track_id = c.track_id "
            "  AND d.counted = 1 AND d.label != ?)) ORDER BY f.seq, c.cell_index",
            (sample_id, UNIDENTIFIED, UNIDENTIFIED))]

    def verify(self, sample_id: str) -> list[int]:
        """The frame indices whose stored checksum does not match their rows (changed outside leukograph)."""
        self._require_sample(sample_id)
        failing = []
        frames = self._rows(f"SELECT frame_index, checksum, {', '.join(_CHECKSUM_FRAME_FIELDS[2:])} FROM frames "
                            "WHERE sample_id = ? ORDER BY frame_index", (sample_id,))
        cells = self._rows(f"SELECT {', '.join(CELL_COLUMNS)} FROM cells WHERE sample_id = ? "
                           "ORDER BY frame_index, cell_index", (sample_id,))
        cell = next(cells, None)
        for frame in frames:
            index = frame["frame_index"]
            rows = []
            while cell is not None and cell["frame_index"] < index:
                cell = next(cells, None)  # cells of no frame (foreign key off): not this check's business
            while cell is not None and cell["frame_index"] == index:
                rows.append(tuple(cell))
                cell = next(cells, None)
            fields = {"sample_id": sample_id, **dict(frame)}
            if frame["checksum"] != frame_checksum(fields, rows):
                failing.append(index)
        return failing
