"""Every result, persisted in SQLite: samples, frames and cells, written so that a crash loses nothing committed
and a retry records nothing twice.

* WAL journal, `synchronous=FULL`, one transaction per frame (the frame row, its cell rows and the count
  they add commit together or not at all).
* UNIQUE(sample_id, frame_index) and UNIQUE(sample_id, frame_index, cell_index): recording a frame that is
  already there is a no-op that reports `new=False` (a client retry cannot double count).
* The differential is derived, never stored: `differential(sample)` replays the cells in the order their frames
  were recorded through `Differential.observe`, which is exactly what `record_frame` did live, so a restarted
  client (`start_sample` on an existing sample) resumes with the same counts, the last frame index and the next
  free track id.
* Schema versioned with PRAGMA user_version.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from leukograph.client.contract import CELL_KINDS, CLASSES, NUM_CLASSES, UNIDENTIFIED
from leukograph.client.differential import Differential
from leukograph.client.errors import UserError

DEFAULT_DB = "leukograph.sqlite"  # relative to the current directory; the stream client uses it too
SCHEMA_VERSION = 1

_SCHEMA = """
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

CELL_COLUMNS: tuple[str, ...] = (
    "sample_id", "frame_index", "cell_index", "x1", "y1", "x2", "y2", "kind", "label", "confidence", "probs",
    "track_id", "counted", "model_version", "recorded_at")


def _iso(value: float | str | datetime | None) -> str | None:
    """Timestamps are stored as ISO 8601 UTC text; accepts epoch seconds, datetime or text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return datetime.fromtimestamp(float(value), tz=timezone.utc).isoformat(timespec="milliseconds")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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

    def __bool__(self) -> bool:
        return self.new


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
        if not create and not self.path.is_file():
            raise UserError(f"no result database at {self.path}")
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed frame survives power loss too
            self._db.execute("PRAGMA foreign_keys=ON")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"cannot open result database {self.path}: {exc}") from None
        self._live: dict[str, Differential] = {}
        self._versions: dict[str, str] = {}  # model version this client session records with, per sample

    def _init_schema(self) -> None:
        if self._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self._transaction():  # checked again under the write lock: another process may be creating it
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                return
            if version > SCHEMA_VERSION:
                raise UserError(f"{self.path} has schema version {version}, newer than this leukograph "
                                f"({SCHEMA_VERSION}); upgrade leukograph")
            tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
            if version == 0 and tables:
                raise UserError(f"{self.path} is an SQLite file but not a leukograph result database")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Run a read under the store's lock (the connection is shared between threads)."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- samples -------------------------------------------------------------------------------
    def start_sample(self, sample_id: str, target: int = 100, model_version: str = "unknown",
                     settings: Mapping[str, Any] | None = None) -> SampleState:
        """Create a sample, or resume it when it exists (same target required). Returns its state.

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
                    db.execute("INSERT INTO samples (sample_id, created, target, model_version, settings) "
                               "VALUES (?, ?, ?, ?, ?)",
                               (sample_id, _now(), int(target), model_version,
                                json.dumps(dict(settings or {}), sort_keys=True)))
                row = self._sample_row(sample_id)
            elif row["target"] != target:
                raise UserError(f"sample {sample_id!r} was started with target {row['target']}, not {target}")
            self._live[sample_id] = self.differential(sample_id)
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
        return SampleState(
            sample_id=sample_id, created=row["created"], target=row["target"],
            model_version=row["model_version"], settings=json.loads(row["settings"]),
            differential=self._live[sample_id], last_frame_index=stats[0],
            next_track_id=0 if max_track is None else max_track + 1, n_frames=stats[1], resumed=resumed,
            model_versions=versions)

    def sample(self, sample_id: str) -> dict[str, Any]:
        """Sample metadata plus frame count, last frame index and model versions used."""
        with self._lock:
            row = self._require_sample(sample_id)
            if sample_id not in self._live:
                self._live[sample_id] = self.differential(sample_id)
            state = self._state(row, resumed=True)
        return {"sample_id": state.sample_id, "created": state.created, "target": state.target,
                "model_version": state.model_version, "settings": state.settings, "n_frames": state.n_frames,
                "last_frame_index": state.last_frame_index, "model_versions": state.model_versions}

    def samples(self) -> list[str]:
        return [r[0] for r in self._query("SELECT sample_id FROM samples ORDER BY created, sample_id")]

    # ---- frames --------------------------------------------------------------------------------
    def record_frame(self, sample_id: str, frame_index: int, cells: Sequence[CellRecord], *,
                     source: str | None = None, captured_at: float | str | datetime | None = None,
                     received_at: float | str | datetime | None = None, latency_ms: float | None = None,
                     model_version: str | None = None) -> FrameOutcome:
        """Record one frame and its cells in one transaction, counting them into the sample's differential.

        Idempotent: a frame already recorded (same sample and frame_index) is left as it is and the outcome is
        `new=False`. model_version defaults to the one given to `start_sample` (a resumed sample may run a
        newer model: each frame and cell records its own), else the sample's."""
        with self._lock:
            row = self._require_sample(sample_id)
            live = self._live.get(sample_id)
            if live is None:
                live = self._live[sample_id] = self.differential(sample_id)
            version = model_version or self._versions.get(sample_id) or row["model_version"]
            rows = [self._cell_row(sample_id, frame_index, i, cell, version) for i, cell in enumerate(cells)]
            trial = live.copy()
            counted = tuple(trial.observe(r[8], r[11]) for r in rows)  # label, track_id
            with self._transaction() as db:
                inserted = db.execute(
                    "INSERT OR IGNORE INTO frames (sample_id, frame_index, source, captured_at, received_at, "
                    "n_cells, latency_ms, model_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (sample_id, int(frame_index), source, _iso(captured_at), _iso(received_at), len(rows),
                     latency_ms, version)).rowcount
                if not inserted:
                    return FrameOutcome(False, (False,) * len(rows))
                db.executemany(
                    f"INSERT INTO cells ({', '.join(CELL_COLUMNS)}) VALUES ({', '.join('?' * len(CELL_COLUMNS))})",
                    [r[:12] + (int(c),) + r[13:] for r, c in zip(rows, counted, strict=True)])
            # Committed: count into the live differential (the object SampleState.differential holds).
            # observe is deterministic, so this repeats exactly what the trial copy did.
            for r in rows:
                live.observe(r[8], r[11])
            return FrameOutcome(True, counted)

    @staticmethod
    def _cell_row(sample_id: str, frame_index: int, cell_index: int, cell: CellRecord,
                  version: str) -> tuple:
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
        return (sample_id, int(frame_index), cell_index, x1, y1, x2, y2, cell.kind, cell.label,
                None if confidence is None else float(confidence), probs_json, track, 0, version, _now())

    def frames(self, sample_id: str) -> list[dict[str, Any]]:
        self._require_sample(sample_id)
        return [dict(r) for r in self._query(
            "SELECT * FROM frames WHERE sample_id = ? ORDER BY seq", (sample_id,))]

    def cells(self, sample_id: str) -> list[dict[str, Any]]:
        """Every cell of a sample in recording order; probs parsed to {class: probability} (or None)."""
        self._require_sample(sample_id)
        out = []
        for r in self._query(
                f"SELECT {', '.join('c.' + c for c in CELL_COLUMNS)} FROM cells c JOIN frames f "
                "ON f.sample_id = c.sample_id AND f.frame_index = c.frame_index "
                "WHERE c.sample_id = ? ORDER BY f.seq, c.cell_index", (sample_id,)):
            cell = dict(r)
            cell["probs"] = None if cell["probs"] is None else json.loads(cell["probs"])
            cell["counted"] = bool(cell["counted"])
            out.append(cell)
        return out

    def differential(self, sample_id: str) -> Differential:
        """The sample's differential rebuilt from the database (replaying `Differential.observe`)."""
        row = self._require_sample(sample_id)
        diff = Differential(row["target"])
        for r in self._query(
                "SELECT c.label, c.track_id FROM cells c JOIN frames f "
                "ON f.sample_id = c.sample_id AND f.frame_index = c.frame_index "
                "WHERE c.sample_id = ? ORDER BY f.seq, c.cell_index", (sample_id,)):
            diff.observe(r["label"], r["track_id"])
        return diff

    def review(self, sample_id: str) -> list[dict[str, Any]]:
        """The cells in the review bucket: the counted observation of each cell that is still UNIDENTIFIED."""
        diff = self.differential(sample_id)
        return [c for c in self.cells(sample_id)
                if c["counted"] and c["label"] == UNIDENTIFIED
                and (c["track_id"] is None or diff.track_label(c["track_id"]) == UNIDENTIFIED)]
