"""The white-cell differential of one sample: counts, percentages and their 95% confidence intervals.

Counting rules (what a technologist needs to know when reading the numbers):

* Only the five WBC classes (`contract.WBC_CLASSES`: neutrophil, eosinophil, basophil, lymphocyte, monocyte) enter
  the percentages. Their denominator, `n_wbc`, is the number of *identified* WBCs of those five classes; a sample
  is complete when `n_wbc` reaches the target (100 or 200).
* Flagged cells (`contract.FLAGGED_CLASSES`) are reported beside the 100, as lab instruments do:
  - immature granulocytes (IG) as a percentage of white cells: 100 * n_ig / (n_wbc + n_ig), with its Wilson
    interval (IGs are white cells, but they are not one of the five counted classes);
  - NRBC per 100 WBC: 100 * n_nrbc / n_wbc (nucleated red cells are not white cells and are not in the 100).
* A nucleated cell the classifier is not sure about (`label_cell` gives `contract.UNIDENTIFIED`) goes to a separate
  review bucket. Review cells are NOT in the percentages and do not count towards the target; they are listed for
  the technologist to verify or reclassify.
* Platelets are reported per 100 WBC, over all WBCs seen (identified + review), the way analysers report
  non-WBC findings. Red cells are counted but not reported per 100 WBC.
* Intervals are Wilson score intervals from `scipy.stats.binomtest` (n = 100, p = 5% gives 2.2-11.2%).
* With tracking, each cell (track) is counted once, at its first observation. If that first label was
  UNIDENTIFIED, the first later confident WBC class of the same track replaces it (the cell moves from the
  review bucket to that class). A track's class never changes once it is a WBC class. See `observe`.
* When the target is reached the sample is complete and nothing more is counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from leukograph.client.contract import (
    CELL_KINDS,
    CLASSES,
    NUCLEATED_CLASSES,
    NUM_CLASSES,
    UNIDENTIFIED,
    UNIDENTIFIED_THRESHOLD,
    WBC_CLASSES,
)

TARGETS: tuple[int, ...] = (100, 200)  # the usual manual-differential sizes
DEFAULT_TARGET = 100
# The confidence rule: a WBC-kind cell whose calibrated top class probability is below this goes to review.
DEFAULT_THRESHOLD = UNIDENTIFIED_THRESHOLD
CONFIDENCE_LEVEL = 0.95
PLATELET = "platelet"
RBC = "rbc"
IG = "ig"
NRBC = "nrbc"


def label_cell(probs: np.ndarray | Sequence[float], threshold: float = DEFAULT_THRESHOLD,
               kind: str | None = None) -> str:
    """The label a cell is counted under: its argmax class, or UNIDENTIFIED for a WBC-kind cell that is unsure.

    probs: NUM_CLASSES probabilities in `contract.CLASSES` order. kind: what the localiser says the box is
    (`contract.CELL_KINDS`); None means "trust the classifier" (kind = WBC when the argmax is a nucleated class:
    the five WBC classes, IG or NRBC). A WBC-kind cell goes to review (UNIDENTIFIED) when its top probability is
    below `threshold`, or when the classifier's argmax is not a nucleated class. A cell the localiser calls RBC or
    platelet but the classifier calls a nucleated class also goes to review: when localiser and classifier
    disagree, a technologist decides, and the cell is never counted unseen. Other non-WBC cells get their argmax
    class. This is the only place the rule lives.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (NUM_CLASSES,):
        raise ValueError(f"probs must have shape ({NUM_CLASSES},), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinity")
    if kind is not None and kind not in CELL_KINDS:
        raise ValueError(f"unknown cell kind {kind!r}; expected one of {CELL_KINDS}")
    best = int(np.argmax(p))
    label = CLASSES[best]
    wbc_kind = kind == "wbc" if kind is not None else label in NUCLEATED_CLASSES
    if wbc_kind and (label not in NUCLEATED_CLASSES or p[best] < threshold):
        return UNIDENTIFIED
    if not wbc_kind and label in NUCLEATED_CLASSES:
        return UNIDENTIFIED
    return label


def label_cells(probs: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                kinds: Sequence[str | None] | None = None) -> list[str]:
    """`label_cell` for every row of an [N, NUM_CLASSES] array (kinds: one per row, or None)."""
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, {NUM_CLASSES}], got shape {probs.shape}")
    kinds = [None] * len(probs) if kinds is None else list(kinds)
    if len(kinds) != len(probs):
        raise ValueError(f"{len(kinds)} kinds for {len(probs)} cells")
    return [label_cell(row, threshold, kind) for row, kind in zip(probs, kinds, strict=True)]


def wilson_interval(count: int, n: int, confidence: float = CONFIDENCE_LEVEL) -> tuple[float, float] | None:
    """Wilson score interval of count/n as proportions (scipy), or None when n == 0."""
    if n <= 0:
        return None
    from scipy.stats import binomtest  # imported here: scipy.stats costs ~1 s of CLI start-up

    ci = binomtest(int(count), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class ClassRow:
    name: str
    count: int
    percent: float | None  # of identified WBCs; None while n_wbc == 0
    ci_low: float | None  # percent
    ci_high: float | None  # percent


@dataclass(frozen=True)
class DifferentialSummary:
    target: int
    n_wbc: int  # identified WBCs of the five classes: the denominator of the percentages
    n_unidentified: int  # review bucket, not in the percentages
    n_platelets: int
    n_rbc: int
    platelets_per_100_wbc: float | None  # over identified + review WBCs
    complete: bool
    confidence: float
    rows: tuple[ClassRow, ...]
    n_ig: int = 0  # immature granulocytes, not in the 100
    ig_percent: float | None = None  # of white cells: 100 * n_ig / (n_wbc + n_ig)
    ig_ci_low: float | None = None
    ig_ci_high: float | None = None
    n_nrbc: int = 0  # nucleated red cells, not in the 100
    nrbc_per_100_wbc: float | None = None  # 100 * n_nrbc / n_wbc

    def row(self, name: str) -> ClassRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rows"] = [asdict(r) for r in self.rows]
        out["ci_method"] = "wilson"
        out["percent_denominator"] = "identified WBCs (n_wbc); unidentified cells are excluded"
        out["ig_denominator"] = "white cells (n_wbc + n_ig)"
        out["nrbc_denominator"] = "per 100 identified WBCs (n_wbc), not in the 100"
        return out


class Differential:
    """Per-class WBC counts of one sample towards a target of 100 or 200 identified WBCs."""

    def __init__(self, target: int = DEFAULT_TARGET, confidence: float = CONFIDENCE_LEVEL) -> None:
        if int(target) != target or target <= 0:
            raise ValueError(f"target must be a positive integer, got {target!r}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.target = int(target)
        self.confidence = confidence
        self._counts: dict[str, int] = {name: 0 for name in (*CLASSES, UNIDENTIFIED)}
        self._track_labels: dict[int, str] = {}

    # ---- counting ------------------------------------------------------------------------------
    def add(self, label: str, n: int = 1) -> None:
        """Count n cells under label (a CLASSES name or UNIDENTIFIED), ignoring tracks and the target."""
        if label not in self._counts:
            raise ValueError(f"unknown label {label!r}; expected one of {tuple(self._counts)}")
        if n < 0:
            raise ValueError("n must be >= 0")
        self._counts[label] += n

    def observe(self, label: str, track_id: int | None = None) -> bool:
        """Count one observation of a (tracked) cell; return True when it changed the differential.

        - complete sample: nothing is counted;
        - no track, or a track seen for the first time: counted under label;
        - a track counted as UNIDENTIFIED that now has a WBC class: moved from review to that class
          (the track's class is its first confident classification);
        - anything else (the same cell again): not counted.
        """
        if label not in self._counts:
            raise ValueError(f"unknown label {label!r}; expected one of {tuple(self._counts)}")
        if self.is_complete:
            return False
        if track_id is None:
            self._counts[label] += 1
            return True
        previous = self._track_labels.get(track_id)
        if previous is None:
            self._track_labels[track_id] = label
            self._counts[label] += 1
            return True
        if previous == UNIDENTIFIED and label in NUCLEATED_CLASSES:
            self._track_labels[track_id] = label
            self._counts[UNIDENTIFIED] -= 1
            self._counts[label] += 1
            return True
        return False

    def forget_tracks(self, track_ids: Iterable[int]) -> None:
        """Drop the labels of tracks that can never be observed again (ended), keeping the counts: the state stays
        bounded by the tracks still in view."""
        for track_id in track_ids:
            self._track_labels.pop(track_id, None)

    def track_label(self, track_id: int) -> str | None:
        """The label a track is counted under, or None if it was never counted."""
        return self._track_labels.get(track_id)

    def copy(self) -> Differential:
        other = Differential(self.target, self.confidence)
        other._counts = dict(self._counts)
        other._track_labels = dict(self._track_labels)
        return other

    @classmethod
    def from_labels(cls, labels: Iterable[str], target: int = DEFAULT_TARGET) -> Differential:
        diff = cls(target)
        for label in labels:
            diff.add(label)
        return diff

    # ---- state ---------------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """Counts per CLASSES name and UNIDENTIFIED (a copy)."""
        return dict(self._counts)

    @property
    def n_wbc(self) -> int:
        return sum(self._counts[name] for name in WBC_CLASSES)

    @property
    def n_unidentified(self) -> int:
        return self._counts[UNIDENTIFIED]

    @property
    def n_platelets(self) -> int:
        return self._counts[PLATELET]

    @property
    def is_complete(self) -> bool:
        return self.n_wbc >= self.target

    @property
    def remaining(self) -> int:
        return max(self.target - self.n_wbc, 0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Differential):
            return NotImplemented
        return (self.target, self._counts, self._track_labels) == (other.target, other._counts,
                                                                   other._track_labels)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self._counts.items() if v)
        return f"Differential(target={self.target}, n_wbc={self.n_wbc}, {counts})"

    # ---- reporting -----------------------------------------------------------------------------
    def summary(self) -> DifferentialSummary:
        n = self.n_wbc
        rows = []
        for name in WBC_CLASSES:
            count = self._counts[name]
            ci = wilson_interval(count, n, self.confidence)
            rows.append(ClassRow(
                name=name, count=count,
                percent=100.0 * count / n if n else None,
                ci_low=100.0 * ci[0] if ci else None,
                ci_high=100.0 * ci[1] if ci else None))
        all_wbc = n + self.n_unidentified
        n_ig, n_nrbc = self._counts[IG], self._counts[NRBC]
        ig_ci = wilson_interval(n_ig, n + n_ig, self.confidence)
        return DifferentialSummary(
            target=self.target, n_wbc=n, n_unidentified=self.n_unidentified, n_platelets=self.n_platelets,
            n_rbc=self._counts[RBC],
            platelets_per_100_wbc=100.0 * self.n_platelets / all_wbc if all_wbc else None,
            complete=self.is_complete, confidence=self.confidence, rows=tuple(rows),
            n_ig=n_ig, ig_percent=100.0 * n_ig / (n + n_ig) if n + n_ig else None,
            ig_ci_low=100.0 * ig_ci[0] if ig_ci else None, ig_ci_high=100.0 * ig_ci[1] if ig_ci else None,
            n_nrbc=n_nrbc, nrbc_per_100_wbc=100.0 * n_nrbc / n if n else None)

    def to_markdown(self) -> str:
        """A table a technologist reads: class, count, %, 95% CI; then review and platelet lines."""
        s = self.summary()
        level = f"{100 * s.confidence:g}%"
        lines = [f"| Cell class | Count | % | {level} CI (Wilson) |", "|---|---:|---:|---|"]
        for r in s.rows:
            pct = "-" if r.percent is None else f"{r.percent:.1f}"
            ci = "-" if r.ci_low is None else f"{r.ci_low:.1f}-{r.ci_high:.1f}"
            lines.append(f"| {r.name.capitalize()} | {r.count} | {pct} | {ci} |")
        total = "100.0" if s.n_wbc else "-"
        lines.append(f"| **WBC identified** | **{s.n_wbc}** | {total} | target {s.target} |")
        status = "complete" if s.complete else f"incomplete: {self.remaining} more WBC to count"
        per100 = "-" if s.platelets_per_100_wbc is None else f"{s.platelets_per_100_wbc:.1f}"
        ig = ("-" if s.ig_percent is None
              else f"{s.ig_percent:.1f}% of white cells ({s.ig_ci_low:.1f}-{s.ig_ci_high:.1f})")
        nrbc = "-" if s.nrbc_per_100_wbc is None else f"{s.nrbc_per_100_wbc:.1f} per 100 WBC"
        lines += [
            "",
            f"- Immature granulocytes (IG, not in the 100): {s.n_ig}, {ig}.",
            f"- NRBC (not in the 100): {s.n_nrbc}, {nrbc}.",
            f"- Status: {status}.",
            f"- Unidentified (for review, NOT in the percentages): {s.n_unidentified}.",
            f"- Platelets: {s.n_platelets} ({per100} per 100 WBC, identified + review).",
        ]
        return "\n".join(lines)
