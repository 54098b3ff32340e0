"""What the review station keeps, in the result database: thumbnails, frame images, verified labels, the audit
trail and sign-offs.

These tables live in the same SQLite file as samples/frames/cells (`records.ResultStore`) but are created and
versioned here, idempotently (`CREATE ... IF NOT EXISTS`, a `review_meta` row `schema_version`), so a database
written before the review station existed opens and gains them on first use; `PRAGMA user_version` stays the
records module's.

Storage (bounded):

* `thumbnails`: one JPEG per white cell and per unidentified cell (the localiser's WBC boxes and every cell whose
  label is a WBC class or unidentified). The crop is the model's own crop region (the box's longer side plus
  `contract.CROP_MARGIN` on each side, square, black outside the frame) resized to `THUMBNAIL_SIDE` px, JPEG quality
  `THUMBNAIL_QUALITY` (about 4-6 kB), with the frame reference and the box.
* `frame_images`: the frame of each such cell, JPEG quality `FRAME_QUALITY`, longer side at most `FRAME_MAX_SIDE`
  (its scale is stored), for the cell-in-frame view and for `leukograph adapt`. About 50-120 kB a frame.
* At most `MAX_THUMBNAILS_PER_SAMPLE` thumbnails and `MAX_FRAMES_PER_SAMPLE` frame images per sample: beyond that
  nothing more is kept for the sample (the counts still are). A 100-cell differential stays far below both.

Review (cell identity = sample_id, frame_index, cell_index, the counted observation of a cell):

* `cell_reviews`: the verified label of a reviewed cell and its `version` (optimistic concurrency: a change names
  the version it read; a later writer that read an older version gets `ReviewConflict`).
* `review_audit`: append-only (triggers refuse UPDATE and DELETE): who changed which cell, when, from what to what,
  undo, and the sign-off.
* `signoffs`: one row per signed sample. Triggers refuse any change to a signed sample's verified labels, frames
  or cells, and any change to a sign-off: the lock holds for every writer of the file, not only this module.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from leukograph.client.contract import CLASSES, CROP_MARGIN, NUCLEATED_CLASSES, UNIDENTIFIED
from leukograph.client.differential import PLATELET, RBC, Differential
from leukograph.client.errors import UserError
from leukograph.client.records import CellRecord, FrameOutcome, ResultStore

REVIEW_SCHEMA_VERSION = 1
THUMBNAIL_SIDE = 128
THUMBNAIL_QUALITY = 85
FRAME_MAX_SIDE = 1280
FRAME_QUALITY = 85
MAX_THUMBNAILS_PER_SAMPLE = 5000
MAX_FRAMES_PER_SAMPLE = 2000
MAX_IMAGE_BYTES = 2_000_000  # nothing larger is stored or served

NOT_WBC = "not_wbc"  # "not a white cell": leaves the count
SMUDGE = "smudge"  # "smudge / unclassifiable": leaves the count, noted in the report
REVIEW_ONLY_CHOICES: tuple[str, ...] = (NOT_WBC, SMUDGE)
CHOICE_TITLES = {NOT_WBC: "not a white cell", SMUDGE: "smudge / unclassifiable"}
ACCEPT, RECLASSIFY, UNDO, SIGN_OFF = "accept", "reclassify", "undo", "sign_off"
MAX_REVIEWER_LENGTH = 80


def review_choices() -> tuple[str, ...]:
    """What a reviewer may give a cell: the five WBC classes and the flagged IG and NRBC (the contract's nucleated
    classes), then the two choices that leave the count."""
    return (*NUCLEATED_CLASSES, *REVIEW_ONLY_CHOICES)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS review_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS thumbnails (
    sample_id   TEXT NOT NULL,
    frame_index INTEGER NOT NULL,
    cell_index  INTEGER NOT NULL,
    frame_ref   TEXT,                          -- the source's frame reference (file, video#position, camera)
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,   -- the box, frame pixels
    crop_x REAL NOT NULL, crop_y REAL NOT NULL, crop_side REAL NOT NULL,    -- the crop square (centre, side)
    jpeg        BLOB NOT NULL,
    created     TEXT NOT NULL,
    PRIMARY KEY (sample_id, frame_index, cell_index)
);
CREATE TABLE IF NOT EXISTS frame_images (
    sample_id   TEXT NOT NULL,
    frame_index INTEGER NOT NULL,
    frame_ref   TEXT,
    width       INTEGER NOT NULL,              -- of the original frame
    height      INTEGER NOT NULL,
    scale       REAL NOT NULL,                 -- stored JPEG pixels per frame pixel (<= 1)
    jpeg        BLOB NOT NULL,
    created     TEXT NOT NULL,
    PRIMARY KEY (sample_id, frame_index)
);
CREATE TABLE IF NOT EXISTS cell_reviews (
    sample_id   TEXT NOT NULL,
    frame_index INTEGER NOT NULL,
    cell_index  INTEGER NOT NULL,
    label       TEXT NOT NULL,                 -- a WBC class, not_wbc or smudge
    version     INTEGER NOT NULL CHECK (version > 0),
    reviewer    TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (sample_id, frame_index, cell_index)
);
CREATE TABLE IF NOT EXISTS review_audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id   TEXT NOT NULL,
    frame_index INTEGER,                       -- NULL for a sign-off
    cell_index  INTEGER,
    action      TEXT NOT NULL CHECK (action IN ('accept', 'reclassify', 'undo', 'sign_off')),
    from_label  TEXT,
    to_label    TEXT,
    reviewer    TEXT NOT NULL,
    at          TEXT NOT NULL,
    batch       TEXT NOT NULL,                 -- one user action (several selected cells) shares a batch
    undoes      TEXT                           -- for action 'undo': the batch it reverts
);
CREATE TABLE IF NOT EXISTS signoffs (
    sample_id    TEXT PRIMARY KEY,
    reviewer     TEXT NOT NULL,
    signed_at    TEXT NOT NULL,
    differential TEXT NOT NULL                 -- JSON: the verified differential as signed
);
CREATE INDEX IF NOT EXISTS review_audit_by_sample ON review_audit(sample_id, seq);
CREATE TRIGGER IF NOT EXISTS review_audit_no_update BEFORE UPDATE ON review_audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS review_audit_no_delete BEFORE DELETE ON review_audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS review_audit_signed BEFORE INSERT ON review_audit
    WHEN EXISTS (SELECT 1 FROM signoffs WHERE sample_id = NEW.sample_id)
    BEGIN SELECT RAISE(ABORT, 'sample is signed off: it cannot change'); END;
CREATE TRIGGER IF NOT EXISTS cell_reviews_signed_insert BEFORE INSERT ON cell_reviews
    WHEN EXISTS (SELECT 1 FROM signoffs WHERE sample_id = NEW.sample_id)
    BEGIN SELECT RAISE(ABORT, 'sample is signed off: it cannot change'); END;
CREATE TRIGGER IF NOT EXISTS cell_reviews_signed_update BEFORE UPDATE ON cell_reviews
    WHEN EXISTS (SELECT 1 FROM signoffs WHERE sample_id = OLD.sample_id)
    BEGIN SELECT RAISE(ABORT, 'sample is signed off: it cannot change'); END;
CREATE TRIGGER IF NOT EXISTS cell_reviews_signed_delete BEFORE DELETE ON cell_reviews
    WHEN EXISTS (SELECT 1 FROM signoffs WHERE sample_id = OLD.sample_id)
    BEGIN SELECT RAISE(ABORT, 'sample is signed off: it cannot change'); END;
CREATE TRIGGER IF NOT EXISTS signoffs_no_update BEFORE UPDATE ON signoffs
    BEGIN SELECT RAISE(ABORT, 'a sign-off is final'); END;
CREATE TRIGGER IF NOT EXISTS signoffs_no_delete BEFORE DELETE ON signoffs
    BEGIN SELECT RAISE(ABORT, 'a sign-off is final'); END;
CREATE TRIGGER IF NOT EXISTS frames_signed_insert BEFORE INSERT ON frames
    WHEN EXISTS (SELECT 1 FROM signoffs WHERE sample_id = NEW.sample_id)
    BEGIN SELECT RAISE(ABORT, 'sample is signed off: it cannot change'); END;
CREATE TRIGGER IF NOT EXISTS cells_signed_insert BEFORE INSERT ON cells
    WHEN EXISTS (SELECT 1 FROM signoffs WHERE sample_id = NEW.sample_id)
    BEGIN SELECT RAISE(ABORT, 'sample is signed off: it cannot change'); END;
CREATE TRIGGER IF NOT EXISTS cells_signed_update BEFORE UPDATE ON cells
    WHEN EXISTS (SELECT 1 FROM signoffs WHERE sample_id = OLD.sample_id)
    BEGIN SELECT RAISE(ABORT, 'sample is signed off: it cannot change'); END;
CREATE TRIGGER IF NOT EXISTS cells_signed_delete BEFORE DELETE ON cells
    WHEN EXISTS (SELECT 1 FROM signoffs WHERE sample_id = OLD.sample_id)
    BEGIN SELECT RAISE(ABORT, 'sample is signed off: it cannot change'); END;
"""


def _statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (triggers contain ';' inside BEGIN ... END)."""
    out, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            out.append(buffer.strip())
            buffer = ""
    return out


class ReviewError(UserError):
    """A review action that cannot be done (unknown cell, bad label, signed sample). HTTP 400/404/423."""

    status = 400


class SampleSigned(ReviewError):
    status = 423


class UnknownCell(ReviewError):
    status = 404


class ReviewConflict(ReviewError):
    """Another writer changed the cell since this one read it."""

    status = 409

    def __init__(self, message: str, current: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.current = current or {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


CellKey = tuple[int, int]  # (frame_index, cell_index) within a sample


def crop_square(box: Sequence[float], margin: float = CROP_MARGIN) -> tuple[float, float, float]:
    """The model's crop region of a box (`training.models.crop_regions`): centre x, centre y, side."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)


def thumbnail_rgb(frame_rgb: np.ndarray, box: Sequence[float], side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """The crop with its margin, as the CNN sees it (black outside the frame), at side x side pixels."""
    cx, cy, region = crop_square(box)
    scale = side / region
    # Maps region pixel edges to thumbnail edges: x' = (x - (cx - region/2)) * scale, pixel centres at +0.5.
    matrix = np.array([[scale, 0.0, (region / 2 - cx) * scale + 0.5 * scale - 0.5],
                       [0.0, scale, (region / 2 - cy) * scale + 0.5 * scale - 0.5]], np.float64)
    return cv2.warpAffine(frame_rgb, matrix, (side, side), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB pixels of a stored JPEG."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("stored image cannot be decoded")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def in_review(label: str) -> bool:
    """A label the review station shows and the verified differential counts: a nucleated class or unidentified."""
    return label in NUCLEATED_CLASSES or label == UNIDENTIFIED


def keeps_thumbnail(kind: str, label: str) -> bool:
    """Every white cell (localiser kind wbc, or a nucleated class label) and every unidentified cell."""
    return kind == "wbc" or in_review(label)


@dataclass(frozen=True)
class GalleryCell:
    """A counted white or unidentified cell of a sample, with its pre-classification and its review."""

    frame_index: int
    cell_index: int
    track_id: int | None
    kind: str
    pre_label: str  # what the model (and the threshold) said
    confidence: float | None
    probs: dict[str, float] | None
    box: tuple[float, float, float, float]
    model_version: str
    label: str  # verified label when reviewed, else pre_label
    version: int  # 0: never reviewed
    reviewer: str | None
    has_thumbnail: bool

    @property
    def id(self) -> str:
        return f"{self.frame_index}-{self.cell_index}"

    @property
    def reviewed(self) -> bool:
        return self.version > 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "frame_index": self.frame_index, "cell_index": self.cell_index,
                "track_id": self.track_id, "kind": self.kind, "pre_label": self.pre_label,
                "confidence": self.confidence, "probs": self.probs, "box": list(self.box),
                "model_version": self.model_version, "label": self.label, "version": self.version,
                "reviewer": self.reviewer, "has_thumbnail": self.has_thumbnail}


def parse_cell_id(cell_id: str) -> CellKey:
    """'frame-cell' -> (frame_index, cell_index); ReviewError on anything else."""
    parts = str(cell_id).split("-")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 9 for p in parts):
        raise UnknownCell(f"bad cell id {cell_id!r} (expected FRAME-CELL)")
    return int(parts[0]), int(parts[1])


class ReviewStore:
    """The review tables of one result database. Thread-safe (one lock around one connection)."""

    def __init__(self, path: str | Path, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"no result database at {self.path}")
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"samples", "frames", "cells"} <= tables:
                raise UserError(f"{self.path} is not a leukograph result database (no samples/frames/cells)")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"cannot open result database {self.path}: {exc}") from None

    def _init_schema(self) -> None:
        row = None
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE name='review_meta'").fetchone():
            row = self._db.execute("SELECT value FROM review_meta WHERE key='schema_version'").fetchone()
        if row is not None and int(row[0]) > REVIEW_SCHEMA_VERSION:
            raise UserError(f"{self.path} has review schema version {row[0]}, newer than this leukograph "
                            f"({REVIEW_SCHEMA_VERSION}); upgrade leukograph")
        if row is not None and int(row[0]) == REVIEW_SCHEMA_VERSION:
            return
        with self._transaction() as db:  # idempotent: every statement is IF NOT EXISTS
            for statement in _statements(_SCHEMA):
                db.execute(statement)
            db.execute("INSERT OR REPLACE INTO review_meta (key, value) VALUES ('schema_version', ?)",
                       (str(REVIEW_SCHEMA_VERSION),))

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._query("SELECT value FROM review_meta WHERE key='schema_version'")[0][0])

    # ---- keeping images (the stream's one call) -------------------------------------------------
    def keep_frame(self, sample_id: str, frame_index: int, frame_rgb: np.ndarray,
                   cells: Sequence[tuple[Sequence[float], str, str]], frame_ref: str | None = None) -> int:
        """Store thumbnails of the frame's white and unidentified cells (cells: (box, kind, label) in cell order)
        and the frame image they sit in. Idempotent (a frame kept again changes nothing). Returns thumbnails added.

        Refuses (SampleSigned) a frame for a signed sample: the stream stops with one clear line."""
        if self.signoff(sample_id) is not None:
            raise SampleSigned(f"sample {sample_id!r} is signed off; stream into a new sample")
        keep = [(i, box) for i, (box, kind, label) in enumerate(cells) if keeps_thumbnail(kind, label)]
        if not keep:
            return 0
        counts = self._query(
            "SELECT (SELECT count(*) FROM thumbnails WHERE sample_id = ?), "
            "(SELECT count(*) FROM frame_images WHERE sample_id = ?)", (sample_id, sample_id))[0]
        if counts[0] >= MAX_THUMBNAILS_PER_SAMPLE or counts[1] >= MAX_FRAMES_PER_SAMPLE:
            return 0
        height, width = frame_rgb.shape[:2]
        now = _now()
        thumbs = []
        for cell_index, box in keep:
            cx, cy, side = crop_square(box)
            jpeg = encode_jpeg(thumbnail_rgb(frame_rgb, box), THUMBNAIL_QUALITY)
            thumbs.append((sample_id, int(frame_index), cell_index, frame_ref, *(float(v) for v in box),
                           cx, cy, side, jpeg, now))
        scale = min(1.0, FRAME_MAX_SIDE / max(height, width))
        shown = frame_rgb if scale == 1.0 else cv2.resize(
            frame_rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        frame_jpeg = encode_jpeg(np.ascontiguousarray(shown), FRAME_QUALITY)
        with self._transaction() as db:
            added = db.executemany(
                "INSERT OR IGNORE INTO thumbnails (sample_id, frame_index, cell_index, frame_ref, x1, y1, x2, y2, "
                "crop_x, crop_y, crop_side, jpeg, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                thumbs).rowcount
            if len(frame_jpeg) <= MAX_IMAGE_BYTES:
                db.execute("INSERT OR IGNORE INTO frame_images (sample_id, frame_index, frame_ref, width, height, "
                           "scale, jpeg, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (sample_id, int(frame_index), frame_ref, width, height, scale, frame_jpeg, now))
        return added

    def thumbnail(self, sample_id: str, key: CellKey) -> bytes:
        rows = self._query("SELECT jpeg FROM thumbnails WHERE sample_id = ? AND frame_index = ? AND cell_index = ?",
                           (sample_id, *key))
        if not rows:
            raise UnknownCell(f"no thumbnail for cell {key[0]}-{key[1]} of {sample_id!r}")
        return bytes(rows[0][0])

    def frame_image(self, sample_id: str, frame_index: int) -> dict[str, Any]:
        rows = self._query("SELECT * FROM frame_images WHERE sample_id = ? AND frame_index = ?",
                           (sample_id, int(frame_index)))
        if not rows:
            raise UnknownCell(f"no frame image for frame {frame_index} of {sample_id!r}")
        out = dict(rows[0])
        out["jpeg"] = bytes(out["jpeg"])
        return out

    def storage(self, sample_id: str | None = None) -> dict[str, int]:
        """Bytes and rows the images take (one sample, or the whole database)."""
        where, params = ("WHERE sample_id = ?", (sample_id,)) if sample_id else ("", ())
        t = self._query(f"SELECT count(*), coalesce(sum(length(jpeg)), 0) FROM thumbnails {where}", params)[0]
        f = self._query(f"SELECT count(*), coalesce(sum(length(jpeg)), 0) FROM frame_images {where}", params)[0]
        return {"thumbnails": t[0], "thumbnail_bytes": t[1], "frames": f[0], "frame_bytes": f[1]}

    # ---- the sample's cells ---------------------------------------------------------------------
    def samples(self) -> list[dict[str, Any]]:
        """Every sample with its counts and review status, newest first."""
        rows = self._query(
            "SELECT s.sample_id, s.created, s.target, s.model_version, "
            "max(coalesce((SELECT max(received_at) FROM frames f WHERE f.sample_id = s.sample_id), ''), "
            "coalesce((SELECT max(recorded_at) FROM cells c WHERE c.sample_id = s.sample_id), '')) AS last_frame_at, "
            "(SELECT count(*) FROM frames f WHERE f.sample_id = s.sample_id) AS n_frames, "
            "g.reviewer AS signed_by, g.signed_at FROM samples s LEFT JOIN signoffs g ON g.sample_id = s.sample_id "
            "ORDER BY s.created DESC, s.sample_id")
        out = []
        for row in rows:
            item = dict(row)
            diff = self.verified_differential(row["sample_id"])
            item.update(n_wbc=diff.n_wbc, n_unidentified=diff.n_unidentified, complete=diff.is_complete,
                        status=self.status(row["sample_id"], diff, row["last_frame_at"], row["signed_by"]))
            out.append(item)
        return out

    def sample_row(self, sample_id: str) -> dict[str, Any]:
        rows = self._query("SELECT * FROM samples WHERE sample_id = ?", (sample_id,))
        if not rows:
            raise UnknownCell(f"unknown sample {sample_id!r}")
        out = dict(rows[0])
        out["model_versions"] = [r[0] for r in self._query(
            "SELECT DISTINCT model_version FROM frames WHERE sample_id = ? ORDER BY model_version", (sample_id,))]
        return out

    COUNTING_IDLE_S = 60.0  # an incomplete sample with a frame newer than this is still counting

    def status(self, sample_id: str, diff: Differential | None = None, last_frame_at: str | None = None,
               signed_by: str | None = None) -> str:
        """'signed', 'counting' (incomplete, a frame received or a cell recorded in the last minute) or 'to review'."""
        if signed_by or self.signoff(sample_id):
            return "signed"
        diff = diff or self.verified_differential(sample_id)
        if last_frame_at is None:
            rows = self._query("SELECT max(coalesce((SELECT max(received_at) FROM frames WHERE sample_id = ?), ''), "
                               "coalesce((SELECT max(recorded_at) FROM cells WHERE sample_id = ?), ''))",
                               (sample_id, sample_id))
            last_frame_at = rows[0][0]
        if not diff.is_complete and last_frame_at:
            try:
                age = (datetime.now(timezone.utc) - datetime.fromisoformat(last_frame_at)).total_seconds()
            except ValueError:
                age = None
            if age is not None and age < self.COUNTING_IDLE_S:
                return "counting"
        return "to review"

    def _raw_cells(self, sample_id: str) -> list[sqlite3.Row]:
        return self._query(
            "SELECT c.frame_index, c.cell_index, c.x1, c.y1, c.x2, c.y2, c.kind, c.label, c.confidence, c.probs, "
            "c.track_id, c.counted, c.model_version FROM cells c JOIN frames f "
            "ON f.sample_id = c.sample_id AND f.frame_index = c.frame_index "
            "WHERE c.sample_id = ? ORDER BY f.seq, c.cell_index", (sample_id,))

    def gallery(self, sample_id: str) -> list[GalleryCell]:
        """The counted white and unidentified cells, one per tracked cell (its observation that decided the count),
        with their verified labels. Recording order."""
        chosen: dict[Any, sqlite3.Row] = {}
        for r in self._raw_cells(sample_id):
            if not r["counted"] or not in_review(r["label"]):
                continue
            key = ("track", r["track_id"]) if r["track_id"] is not None else ("cell", r["frame_index"],
                                                                              r["cell_index"])
            chosen[key] = r  # a later counted observation of a track replaced its earlier one in the count
        reviews = {(r["frame_index"], r["cell_index"]): r for r in self._query(
            "SELECT * FROM cell_reviews WHERE sample_id = ?", (sample_id,))}
        thumbs = {(r[0], r[1]) for r in self._query(
            "SELECT frame_index, cell_index FROM thumbnails WHERE sample_id = ?", (sample_id,))}
        out = []
        for r in chosen.values():
            key = (r["frame_index"], r["cell_index"])
            review = reviews.get(key)
            out.append(GalleryCell(
                frame_index=key[0], cell_index=key[1], track_id=r["track_id"], kind=r["kind"], pre_label=r["label"],
                confidence=r["confidence"], probs=None if r["probs"] is None else json.loads(r["probs"]),
                box=(r["x1"], r["y1"], r["x2"], r["y2"]), model_version=r["model_version"],
                label=review["label"] if review else r["label"], version=review["version"] if review else 0,
                reviewer=review["reviewer"] if review else None, has_thumbnail=key in thumbs))
        return out

    def frame_cells(self, sample_id: str, frame_index: int) -> list[dict[str, Any]]:
        """Every cell of one frame (all kinds) with its verified label where reviewed."""
        reviews = {r["cell_index"]: r for r in self._query(
            "SELECT cell_index, label, version FROM cell_reviews WHERE sample_id = ? AND frame_index = ?",
            (sample_id, int(frame_index)))}
        out = []
        for r in self._query("SELECT * FROM cells WHERE sample_id = ? AND frame_index = ? ORDER BY cell_index",
                             (sample_id, int(frame_index))):
            review = reviews.get(r["cell_index"])
            out.append({"id": f"{r['frame_index']}-{r['cell_index']}", "cell_index": r["cell_index"],
                        "box": [r["x1"], r["y1"], r["x2"], r["y2"]], "kind": r["kind"], "pre_label": r["label"],
                        "label": review["label"] if review else r["label"], "confidence": r["confidence"],
                        "probs": None if r["probs"] is None else json.loads(r["probs"])})
        return out

    def verified_differential(self, sample_id: str) -> Differential:
        """The differential with every verified label applied: reclassified cells move class, not_wbc and smudge
        leave the count. Platelets and red cells are the recorded counts (replayed as `records` counts them)."""
        recorded = Differential(int(self._query("SELECT target FROM samples WHERE sample_id = ?",
                                                (sample_id,))[0][0]))
        for r in self._raw_cells(sample_id):
            recorded.observe(r["label"], r["track_id"])
        diff = Differential(recorded.target)
        diff.add(PLATELET, recorded.counts[PLATELET])
        diff.add(RBC, recorded.counts[RBC])
        for cell in self.gallery(sample_id):
            if in_review(cell.label):
                diff.add(cell.label)
        return diff

    def review_summary(self, sample_id: str) -> dict[str, Any]:
        """Verified differential (with Wilson CIs), not_wbc / smudge counts and per-class agreement."""
        cells = self.gallery(sample_id)
        diff = self.verified_differential(sample_id)
        return {"differential": diff.summary().to_dict(),
                "not_wbc": sum(c.label == NOT_WBC for c in cells),
                "smudge": sum(c.label == SMUDGE for c in cells),
                "reviewed": sum(c.reviewed for c in cells), "cells": len(cells),
                "agreement": agreement(cells)}

    # ---- changing labels ------------------------------------------------------------------------
    def _check_reviewer(self, reviewer: str) -> str:
        reviewer = (reviewer or "").strip()
        if not reviewer or len(reviewer) > MAX_REVIEWER_LENGTH or not reviewer.isprintable():
            raise ReviewError(f"a reviewer name (1-{MAX_REVIEWER_LENGTH} printable characters) is required")
        return reviewer

    def _require_unsigned(self, sample_id: str) -> None:
        if self.signoff(sample_id) is not None:
            raise SampleSigned(f"sample {sample_id!r} is signed off: it cannot change")

    def relabel(self, sample_id: str, changes: Sequence[tuple[CellKey, int]], label: str, reviewer: str,
                action: str = RECLASSIFY) -> dict[str, Any]:
        """Give cells a verified label. changes: ((frame_index, cell_index), version the writer read) per cell.

        All or nothing, in one transaction: a cell whose version moved on since it was read raises ReviewConflict
        and changes nothing. action 'accept' keeps the pre-classification (label must equal it). Returns the
        batch id and the cells' new versions."""
        reviewer = self._check_reviewer(reviewer)
        if label not in review_choices():
            raise ReviewError(f"unknown label {label!r}; expected one of {review_choices()}")
        if action not in (ACCEPT, RECLASSIFY):
            raise ReviewError(f"unknown action {action!r}")
        if not changes:
            raise ReviewError("no cells selected")
        batch = uuid.uuid4().hex
        now = _now()
        with self._lock:
            self._require_unsigned(sample_id)
            cells = {(c.frame_index, c.cell_index): c for c in self.gallery(sample_id)}
            try:
                with self._transaction() as db:
                    versions = {}
                    for key, read_version in changes:
                        cell = cells.get(tuple(key))
                        if cell is None:
                            raise UnknownCell(f"cell {key[0]}-{key[1]} is not a white or unidentified cell of "
                                              f"{sample_id!r}")
                        current = self._current(db, sample_id, cell)
                        if current["version"] != int(read_version):
                            raise ReviewConflict(
                                f"cell {cell.id} was changed to {current['label']} by {current['reviewer']} "
                                f"(version {current['version']}, you had {read_version}); reload and retry",
                                {"id": cell.id, **current})
                        if action == ACCEPT and label != cell.pre_label:
                            raise ReviewError(f"accept keeps the pre-classification {cell.pre_label}, not {label}")
                        versions[cell.id] = self._write_label(db, sample_id, cell, current, label, reviewer, now,
                                                              action, batch)
            except sqlite3.IntegrityError as exc:  # the triggers: signed in between
                raise SampleSigned(f"sample {sample_id!r} is signed off: {exc}") from None
        return {"batch": batch, "versions": versions, "label": label}

    @staticmethod
    def _current(db: sqlite3.Connection, sample_id: str, cell: GalleryCell) -> dict[str, Any]:
        row = db.execute("SELECT label, version, reviewer FROM cell_reviews WHERE sample_id = ? AND frame_index = ? "
                         "AND cell_index = ?", (sample_id, cell.frame_index, cell.cell_index)).fetchone()
        if row is None:
            return {"label": cell.pre_label, "version": 0, "reviewer": None}
        return dict(row)

    @staticmethod
    def _write_label(db: sqlite3.Connection, sample_id: str, cell: GalleryCell, current: dict[str, Any],
                     label: str, reviewer: str, now: str, action: str, batch: str,
                     undoes: str | None = None) -> int:
        version = current["version"] + 1
        db.execute("INSERT INTO cell_reviews (sample_id, frame_index, cell_index, label, version, reviewer, "
                   "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sample_id, frame_index, cell_index) DO "
                   "UPDATE SET label = excluded.label, version = excluded.version, reviewer = excluded.reviewer, "
                   "updated_at = excluded.updated_at",
                   (sample_id, cell.frame_index, cell.cell_index, label, version, reviewer, now))
        db.execute("INSERT INTO review_audit (sample_id, frame_index, cell_index, action, from_label, to_label, "
                   "reviewer, at, batch, undoes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (sample_id, cell.frame_index, cell.cell_index, action, current["label"], label, reviewer, now,
                    batch, undoes))
        return version

    def undo(self, sample_id: str, reviewer: str) -> dict[str, Any]:
        """Revert the most recent change not yet undone (repeat to go further back). A cell changed again by
        someone else since raises ReviewConflict."""
        reviewer = self._check_reviewer(reviewer)
        now = _now()
        with self._lock:
            self._require_unsigned(sample_id)
            rows = self._query(
                "SELECT batch FROM review_audit WHERE sample_id = ? AND action IN ('accept', 'reclassify') AND "
                "batch NOT IN (SELECT undoes FROM review_audit WHERE sample_id = ? AND undoes IS NOT NULL) "
                "ORDER BY seq DESC LIMIT 1", (sample_id, sample_id))
            if not rows:
                raise ReviewError("nothing to undo")
            target = rows[0]["batch"]
            entries = self._query("SELECT * FROM review_audit WHERE batch = ? ORDER BY seq", (target,))
            cells = {(c.frame_index, c.cell_index): c for c in self.gallery(sample_id)}
            batch = uuid.uuid4().hex
            versions = {}
            try:
                with self._transaction() as db:
                    for entry in entries:
                        cell = cells[(entry["frame_index"], entry["cell_index"])]
                        current = self._current(db, sample_id, cell)
                        if current["label"] != entry["to_label"]:
                            raise ReviewConflict(f"cell {cell.id} was changed again ({current['label']} by "
                                                 f"{current['reviewer']}); it cannot be undone",
                                                 {"id": cell.id, **current})
                        versions[cell.id] = self._write_label(db, sample_id, cell, current, entry["from_label"],
                                                              reviewer, now, UNDO, batch, undoes=target)
            except sqlite3.IntegrityError as exc:
                raise SampleSigned(f"sample {sample_id!r} is signed off: {exc}") from None
        return {"batch": batch, "undid": target, "versions": versions,
                "cells": [f"{e['frame_index']}-{e['cell_index']}" for e in entries]}

    # ---- sign-off -------------------------------------------------------------------------------
    def signoff(self, sample_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM signoffs WHERE sample_id = ?", (sample_id,))
        if not rows:
            return None
        out = dict(rows[0])
        out["differential"] = json.loads(out["differential"])
        return out

    def sign_off(self, sample_id: str, reviewer: str) -> dict[str, Any]:
        """Lock the sample under the reviewer's name. Refused while unidentified cells remain, while nothing was
        counted, or when already signed."""
        reviewer = self._check_reviewer(reviewer)
        with self._lock:
            self.sample_row(sample_id)
            self._require_unsigned(sample_id)
            summary = self.review_summary(sample_id)
            diff = summary["differential"]
            if diff["n_unidentified"]:
                raise ReviewError(f"{diff['n_unidentified']} unidentified cell(s) left: classify them first")
            if not diff["n_wbc"]:
                raise ReviewError("no white cell counted: nothing to sign")
            now = _now()
            try:
                with self._transaction() as db:
                    db.execute("INSERT INTO review_audit (sample_id, action, reviewer, at, batch) "
                               "VALUES (?, 'sign_off', ?, ?, ?)", (sample_id, reviewer, now, uuid.uuid4().hex))
                    db.execute("INSERT INTO signoffs (sample_id, reviewer, signed_at, differential) VALUES "
                               "(?, ?, ?, ?)", (sample_id, reviewer, now, json.dumps(summary, sort_keys=True)))
            except sqlite3.IntegrityError as exc:
                raise SampleSigned(f"sample {sample_id!r} is signed off: {exc}") from None
        return self.signoff(sample_id) or {}

    def audit(self, sample_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT seq, sample_id, frame_index, cell_index, action, from_label, "
                                             "to_label, reviewer, at, batch, undoes FROM review_audit "
                                             "WHERE sample_id = ? ORDER BY seq", (sample_id,))]

    def verified_cells(self, sample_ids: Sequence[str] | None = None, signed_only: bool = True,
                       ) -> list[dict[str, Any]]:
        """Cells with a verified WBC class from signed samples (for exports and `leukograph adapt`): after sign-off
        every gallery cell's label is verified (kept or changed)."""
        if sample_ids is None:
            sample_ids = [r[0] for r in self._query(
                "SELECT sample_id FROM signoffs ORDER BY signed_at" if signed_only else
                "SELECT sample_id FROM samples ORDER BY created")]
        out = []
        for sample_id in sample_ids:
            if signed_only and self.signoff(sample_id) is None:
                continue
            for cell in self.gallery(sample_id):
                if cell.label in NUCLEATED_CLASSES:
                    out.append({"sample_id": sample_id, **cell.to_dict()})
        return out


def agreement(cells: Sequence[GalleryCell]) -> list[dict[str, Any]]:
    """Pre-classification agreement per class (as CellaVision reports it): of the cells the model put in a class,
    how many the reviewer kept and how many changed (and to what). Unreviewed cells count as kept."""
    rows = []
    for name in (*NUCLEATED_CLASSES, UNIDENTIFIED):
        mine = [c for c in cells if c.pre_label == name]
        kept = sum(c.label == c.pre_label for c in mine)
        changed_to: dict[str, int] = {}
        for c in mine:
            if c.label != c.pre_label:
                changed_to[c.label] = changed_to.get(c.label, 0) + 1
        rows.append({"class": name, "pre_classified": len(mine), "kept": kept, "changed": len(mine) - kept,
                     "agreement_percent": round(100.0 * kept / len(mine), 1) if mine else None,
                     "changed_to": changed_to})
    return rows


# ---- recording a classified frame (stream and classify --db) --------------------------------------------------
_STORES: dict[Path, ReviewStore] = {}
_STORES_LOCK = threading.Lock()


def cell_records(boxes: np.ndarray, kinds: Sequence[str], labels: Sequence[str], probs: np.ndarray,
                 track_ids: Sequence[int | None] | None = None) -> list[CellRecord]:
    """A classified frame's cells as the result store records them (probs: [N, NUM_CLASSES], labels from
    `differential.label_cells`; track_ids None: every cell is its own, as in unrelated still images)."""
    track_ids = [None] * len(boxes) if track_ids is None else track_ids
    return [CellRecord(box=tuple(float(v) for v in box), kind=kind, label=label, probs=[float(v) for v in row],
                       track_id=track)
            for box, kind, label, row, track in zip(boxes, kinds, labels, probs, track_ids, strict=True)]


def require_unsigned(db_path: str | Path, sample_id: str) -> None:
    """SampleSigned (one line) when the sample exists in the database and is signed off: nothing can be added."""
    with _STORES_LOCK:
        store = _review_store(db_path)
    store._require_unsigned(sample_id)


def record_classified_frame(store: ResultStore, sample_id: str, frame_rgb: np.ndarray, records: Sequence[CellRecord],
                            *, source_key: str | None, source: str | None, captured_at: float | None = None,
                            received_at: float | None = None, latency_ms: float | None = None,
                            model_version: str | None = None) -> FrameOutcome:
    """The one writer of a classified frame, for `stream` and `classify --db`: the frame and its cells in one
    result-store transaction (idempotent by source_key), then, for a new frame, the thumbnails and frame image the
    review station shows, under the frame_index that transaction assigned."""
    outcome = store.record_frame(sample_id, None, records, source_key=source_key, source=source,
                                 captured_at=captured_at, received_at=received_at, latency_ms=latency_ms,
                                 model_version=model_version)
    if outcome.new:
        keep_frame_images(store.path, sample_id, outcome.frame_index, frame_rgb, records, source)
    return outcome


def _review_store(db_path: str | Path) -> ReviewStore:
    """One ReviewStore per database file in this process (call under _STORES_LOCK)."""
    path = Path(db_path).resolve()
    store = _STORES.get(path)
    if store is None:
        store = _STORES[path] = ReviewStore(path)
    return store


def keep_frame_images(db_path: str | Path, sample_id: str, frame_index: int, frame_rgb: np.ndarray,
                      cells: Sequence[Any], frame_ref: str | None = None) -> int:
    """Thumbnails + frame image for review of a newly recorded frame, under the frame_index the result store
    assigned in its write transaction (`record_classified_frame` calls it).

    cells: objects with `.box`, `.kind`, `.label` (records.CellRecord). A crash between the frame's transaction and
    this call leaves that one frame's cells without thumbnails; the review pages show such cells without an image."""
    with _STORES_LOCK:
        store = _review_store(db_path)
    return store.keep_frame(sample_id, frame_index, frame_rgb, [(c.box, c.kind, c.label) for c in cells], frame_ref)


def all_labels() -> tuple[str, ...]:
    """Every label a cell can show in the review pages."""
    return (*CLASSES, UNIDENTIFIED, *REVIEW_ONLY_CHOICES)
