"""`leukograph report SAMPLE (--csv OUT | --json OUT | --hl7 OUT | --fhir OUT | --audit OUT)`: a sample's results
for the lab system.

CSV: one row per recorded cell (every observation, with `counted` marking those that made the differential),
per-class probabilities as p_<class> columns. JSON: sample metadata, the differential summary with 95% Wilson
intervals, the review list (cells counted as unidentified) and the cells. Both carry the review station's verified
labels (CSV columns verified_label/verified_by/verified_version; JSON "verification" with the sign-off, the verified
differential, the agreement per class and the audit trail). HL7 v2.5.1 ORU^R01 and FHIR R4 (`lis_export`): the
verified differential, final when signed off, else preliminary. --audit: the audit trail as CSV.
OUT `-` writes to stdout.

Before exporting, every frame's checksum is verified (`ResultStore.verify`): a database changed outside leukograph
is refused with the frames that fail. CSV text cells that a spreadsheet would run as a formula (starting with
=, +, -, @, tab or carriage return) are written with a leading apostrophe.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from leukograph.client.contract import CLASSES
from leukograph.client.errors import UserError
from leukograph.client.lis_export import (
    VERIFIED_COLUMNS,
    audit_csv,
    export_input,
    fhir_bundle,
    hl7_message,
    require_results,
    review_json,
    with_verified_labels,
)
from leukograph.client.records import CELL_COLUMNS, DEFAULT_DB, DatabaseProblem, ResultStore
from leukograph.client.review_store import ReviewStore

CSV_COLUMNS: tuple[str, ...] = (tuple(c for c in CELL_COLUMNS if c != "probs") + tuple(f"p_{c}" for c in CLASSES)
                                + VERIFIED_COLUMNS)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
MAX_LISTED_FRAMES = 10


def csv_safe(value: Any) -> Any:
    """A text cell a spreadsheet would evaluate as a formula gets a leading apostrophe; other values unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def verified(store: ResultStore, sample_id: str) -> None:
    """DatabaseProblem naming the frames whose rows no longer match their checksum."""
    failing = store.verify(sample_id)
    if failing:
        listed = ", ".join(map(str, failing[:MAX_LISTED_FRAMES]))
        more = f" and {len(failing) - MAX_LISTED_FRAMES} more" if len(failing) > MAX_LISTED_FRAMES else ""
        raise DatabaseProblem(f"{store.path}: sample {sample_id!r}: frame(s) {listed}{more} do not match their "
                              "checksum (changed outside leukograph); nothing exported")


def build_report(store: ResultStore, sample_id: str) -> dict[str, Any]:
    diff = store.differential(sample_id)
    return {
        "sample": store.sample(sample_id),
        "differential": diff.summary().to_dict(),
        "review": store.review(sample_id),
        "cells": store.cells(sample_id),
    }


def csv_text(cells: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for cell in cells:
        row = {k: v for k, v in cell.items() if k != "probs"}
        row["counted"] = int(cell["counted"])
        probs = cell["probs"] or {}
        row.update({f"p_{c}": probs.get(c, "") for c in CLASSES})
        writer.writerow({k: csv_safe(v) for k, v in row.items()})
    return out.getvalue()


def _write(text: str, out: str) -> None:
    if out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(out).write_text(text)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a sample's recorded results as CSV or JSON",
                                     add_help=add_help)
    parser.add_argument("sample", help="sample id")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"result database (default ./{DEFAULT_DB})")
    fmt = parser.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--csv", metavar="OUT", help="one row per cell; - for stdout")
    fmt.add_argument("--json", metavar="OUT", help="metadata, differential with CIs, review list, cells; - for stdout")
    fmt.add_argument("--hl7", metavar="OUT", help="HL7 v2.5.1 ORU^R01 of the verified differential "
                     "(segments end in CR; - prints one per line)")
    fmt.add_argument("--fhir", metavar="OUT", help="FHIR R4 Bundle (DiagnosticReport + Observations); - for stdout")
    fmt.add_argument("--audit", metavar="OUT", help="the review audit trail as CSV; - for stdout")
    return parser


def main(args: argparse.Namespace) -> int:
    with ResultStore(args.db, create=False) as store:
        if args.sample not in store.samples():
            raise UserError(f"unknown sample {args.sample!r} in {args.db}")
        verified(store, args.sample)
        with ReviewStore(args.db) as review:
            if args.csv is not None:
                _write(csv_text(with_verified_labels(review, args.sample, store.cells(args.sample))), args.csv)
            elif args.json is not None:
                report = build_report(store, args.sample)
                report["cells"] = with_verified_labels(review, args.sample, report["cells"])
                report["verification"] = review_json(review, args.sample)
                _write(json.dumps(report, indent=2) + "\n", args.json)
            elif args.audit is not None:
                _write(audit_csv(review.audit(args.sample)), args.audit)
            else:
                data = export_input(review, args.sample)
                require_results(data)
                if args.hl7 is not None:
                    _write(hl7_message(data).replace("\r", "\n") if args.hl7 == "-" else hl7_message(data),
                           args.hl7)
                else:
                    _write(json.dumps(fhir_bundle(data), indent=2) + "\n", args.fhir)
    return 0
