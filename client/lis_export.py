"""Results for the laboratory information system: the (verified) differential of one sample as an HL7 v2.5.1
ORU^R01 message (hl7apy) or a FHIR R4 DiagnosticReport with Observations (fhir.resources), both built as data by
their library and validated by it (the HL7 message is also parsed back).

One result per white-cell class of `contract.WBC_CLASSES` (read at run time: the class list may grow), as a
percentage of the identified white cells, LOINC-coded from `LOINC_BY_CLASS`; NRBC, when it is a class, is reported
per 100 WBC. A sample that is not signed off is sent as preliminary (OBR-25 / OBX-11 `P`; FHIR status
`preliminary`); a signed one as final (`F`; `final`) with the reviewer as the responsible observer.

LOINC codes used (LOINC, Regenstrief Institute, https://loinc.org; long common names as LOINC publishes them):

| key | LOINC | long common name |
|---|---|---|
| panel (OBR-4, DiagnosticReport.code) | 57023-4 | Auto differential panel - Blood |
| neutrophil | 770-8 | Neutrophils/100 leukocytes in Blood by Automated count |
| eosinophil | 713-8 | Eosinophils/100 leukocytes in Blood by Automated count |
| basophil | 706-2 | Basophils/100 leukocytes in Blood by Automated count |
| lymphocyte | 736-9 | Lymphocytes/100 leukocytes in Blood by Automated count |
| monocyte | 5905-5 | Monocytes/100 leukocytes in Blood by Automated count |
| ig | 71695-1 | Immature granulocytes/100 leukocytes in Blood by Automated count |
| nrbc | 58413-6 | Nucleated erythrocytes/100 leukocytes [Ratio] in Blood by Automated count |

A class without a LOINC entry is sent with a local code (`LG-<class>`, coding system `L` /
`urn:leukograph:cell-class`) rather than a guessed LOINC.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from leukograph.client.contract import WBC_CLASSES
from leukograph.client.errors import UserError
from leukograph.client.review_store import ReviewStore

LOINC_SYSTEM_HL7 = "LN"
LOINC_SYSTEM_FHIR = "http://loinc.org"
LOCAL_SYSTEM_HL7 = "L"
LOCAL_SYSTEM_FHIR = "urn:leukograph:cell-class"
UCUM_SYSTEM_FHIR = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class LoincCode:
    code: str
    display: str
    unit: str  # UCUM
    unit_display: str


PANEL = LoincCode("57023-4", "Auto differential panel - Blood", "", "")
PERCENT = ("%", "percent")
PER_100_WBC = ("/100{WBCs}", "per 100 white cells")
LOINC_BY_CLASS: dict[str, LoincCode] = {
    "neutrophil": LoincCode("770-8", "Neutrophils/100 leukocytes in Blood by Automated count", *PERCENT),
    "eosinophil": LoincCode("713-8", "Eosinophils/100 leukocytes in Blood by Automated count", *PERCENT),
    "basophil": LoincCode("706-2", "Basophils/100 leukocytes in Blood by Automated count", *PERCENT),
    "lymphocyte": LoincCode("736-9", "Lymphocytes/100 leukocytes in Blood by Automated count", *PERCENT),
    "monocyte": LoincCode("5905-5", "Monocytes/100 leukocytes in Blood by Automated count", *PERCENT),
    "ig": LoincCode("71695-1", "Immature granulocytes/100 leukocytes in Blood by Automated count", *PERCENT),
    "nrbc": LoincCode("58413-6", "Nucleated erythrocytes/100 leukocytes [Ratio] in Blood by Automated count",
                      *PER_100_WBC),
}
SENDING_APPLICATION = "LEUKOGRAPH"


@dataclass(frozen=True)
class ResultLine:
    """One reported class: code, value and its Wilson interval."""

    name: str
    code: str
    display: str
    system_hl7: str
    system_fhir: str
    unit: str
    unit_display: str
    value: float
    count: int
    ci_low: float | None
    ci_high: float | None


def result_lines(differential: dict[str, Any]) -> list[ResultLine]:
    """One line per class of the differential summary (`Differential.summary().to_dict()` rows), in
    `contract.WBC_CLASSES` order, then IG (% of white cells) and NRBC (per 100 WBC) when the sample has any.
    Empty when no white cell was identified (nothing to report)."""
    rows = {r["name"]: r for r in differential["rows"]}
    lines = []
    for name in WBC_CLASSES:
        row = rows.get(name)
        if row is None or row["percent"] is None:
            continue
        loinc = LOINC_BY_CLASS.get(name)
        if loinc is None:
            code, display, hl7_sys, fhir_sys, unit, unit_display = (f"LG-{name}", f"{name}/100 leukocytes",
                                                                    LOCAL_SYSTEM_HL7, LOCAL_SYSTEM_FHIR, *PERCENT)
        else:
            code, display, hl7_sys, fhir_sys = loinc.code, loinc.display, LOINC_SYSTEM_HL7, LOINC_SYSTEM_FHIR
            unit, unit_display = loinc.unit, loinc.unit_display
        lines.append(ResultLine(name, code, display, hl7_sys, fhir_sys, unit, unit_display,
                                round(float(row["percent"]), 1), int(row["count"]), row["ci_low"], row["ci_high"]))
    # Flagged nucleated cells, reported beside the 100 as lab instruments do: IG as % of white cells, NRBC per 100 WBC.
    flagged = (("ig", "ig_percent", "n_ig", "ig_ci_low", "ig_ci_high"),
               ("nrbc", "nrbc_per_100_wbc", "n_nrbc", None, None))
    for name, value_key, count_key, low_key, high_key in flagged:
        value, loinc = differential.get(value_key), LOINC_BY_CLASS[name]
        if value is None or not differential.get(count_key):
            continue
        lines.append(ResultLine(name, loinc.code, loinc.display, LOINC_SYSTEM_HL7, LOINC_SYSTEM_FHIR, loinc.unit,
                                loinc.unit_display, round(float(value), 1), int(differential[count_key]),
                                differential.get(low_key) if low_key else None,
                                differential.get(high_key) if high_key else None))
    return lines


@dataclass(frozen=True)
class ExportInput:
    """What both formats need: the sample, its verified differential and its sign-off (None: preliminary)."""

    sample_id: str
    created: str
    model_versions: list[str]
    differential: dict[str, Any]  # verified differential summary dict
    signoff: dict[str, Any] | None
    not_wbc: int = 0
    smudge: int = 0

    @property
    def final(self) -> bool:
        return self.signoff is not None


def _hl7_ts(iso: str | None) -> str:
    moment = datetime.fromisoformat(iso) if iso else datetime.now(timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S") + "+0000"


def _hl7_text(value: str) -> str:
    """Free text for an ST/TX field: HL7 delimiters and control characters replaced (names come from users)."""
    return "".join(" " if (ch in "|^~\\&\r\n\t" or not ch.isprintable()) else ch for ch in value)[:199]


def hl7_message(data: ExportInput, control_id: str | None = None) -> str:
    """The HL7 v2.5.1 ORU^R01 message (ER7, segments separated by CR), validated by parsing it back."""
    from hl7apy.core import Message
    from hl7apy.parser import parse_message

    status = "F" if data.final else "P"
    now = _hl7_ts(None)
    msg = Message("ORU_R01", version="2.5.1")
    msg.msh.msh_3 = SENDING_APPLICATION
    msg.msh.msh_7 = now
    msg.msh.msh_9 = "ORU^R01^ORU_R01"
    msg.msh.msh_10 = control_id or datetime.now(timezone.utc).strftime("LG%Y%m%d%H%M%S%f")
    msg.msh.msh_11 = "P"
    msg.msh.msh_12 = "2.5.1"
    group = msg.add_group("ORU_R01_PATIENT_RESULT")
    order = group.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    obr.obr_3 = _hl7_text(data.sample_id)  # filler order number: the sample
    obr.obr_4 = f"{PANEL.code}^{PANEL.display}^{LOINC_SYSTEM_HL7}"
    obr.obr_7 = _hl7_ts(data.created)
    obr.obr_22 = _hl7_ts(data.signoff["signed_at"] if data.signoff else None)
    obr.obr_25 = status
    reviewer = _hl7_text(data.signoff["reviewer"]) if data.signoff else ""
    for index, line in enumerate(result_lines(data.differential), start=1):
        observation = order.add_group("ORU_R01_OBSERVATION")
        obx = observation.add_segment("OBX")
        obx.obx_1 = str(index)
        obx.obx_2 = "NM"
        obx.obx_3 = f"{line.code}^{line.display}^{line.system_hl7}"
        obx.obx_5 = f"{line.value:.1f}"
        obx.obx_6 = f"{line.unit}^{line.unit_display}^UCUM"
        obx.obx_11 = status
        obx.obx_14 = _hl7_ts(data.created)
        if reviewer:
            obx.obx_16 = reviewer
        if line.ci_low is not None:
            nte = observation.add_segment("NTE")
            nte.nte_1 = "1"
            nte.nte_3 = (f"{line.count} of {data.differential['n_wbc']} WBC; 95% CI (Wilson) "
                         f"{line.ci_low:.1f}-{line.ci_high:.1f}")
    notes = [f"{data.differential['n_wbc']} white cells identified (target {data.differential['target']})",
             "signed off by " + reviewer if reviewer else "preliminary: not signed off",
             f"model {', '.join(data.model_versions) or 'unknown'}"]
    if data.not_wbc or data.smudge:
        notes.append(f"removed by review: {data.not_wbc} not a white cell, {data.smudge} smudge/unclassifiable")
    for index, note in enumerate(notes, start=1):
        nte = order.add_segment("NTE")
        nte.nte_1 = str(index)
        nte.nte_3 = _hl7_text(note)
    msg.validate()  # raises on a structure the 2.5.1 ORU^R01 definition does not allow
    text = msg.to_er7()
    parsed = parse_message(text, find_groups=True)  # validation by parsing back
    if parsed.msh.msh_9.to_er7() != "ORU^R01^ORU_R01" or len(parsed.to_er7()) != len(text):
        raise ValueError("HL7 message does not parse back to itself")
    return text


def fhir_bundle(data: ExportInput) -> dict[str, Any]:
    """A FHIR R4 collection Bundle: one DiagnosticReport and one Observation per class, validated by
    fhir.resources. Returns the JSON-ready dict."""
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    status = "final" if data.final else "preliminary"
    issued = (datetime.fromisoformat(data.signoff["signed_at"]) if data.signoff
              else datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="seconds")
    effective = datetime.fromisoformat(data.created).astimezone(timezone.utc).isoformat(timespec="seconds")
    safe_id = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in data.sample_id)[:50] or "sample"
    performer = [{"display": data.signoff["reviewer"]}] if data.signoff else []
    observations = []
    urls: dict[str, str] = {}  # resource id -> fullUrl (urn:uuid, stable for a sample)
    for line in result_lines(data.differential):
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": f"{safe_id}-{line.name}"[:64],
            "status": status,
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory", "display": "Laboratory"}]}],
            "code": {"coding": [{"system": line.system_fhir, "code": line.code, "display": line.display}],
                     "text": line.name},
            "effectiveDateTime": effective,
            "issued": issued,
            "valueQuantity": {"value": line.value, "unit": line.unit_display, "system": UCUM_SYSTEM_FHIR,
                              "code": line.unit},
            "specimen": {"display": data.sample_id},
            "note": [{"text": f"{line.count} of {data.differential['n_wbc']} WBC"}],
        }
        if line.ci_low is not None:
            obs["referenceRange"] = [{
                "low": {"value": round(line.ci_low, 1), "unit": line.unit_display, "system": UCUM_SYSTEM_FHIR,
                        "code": line.unit},
                "high": {"value": round(line.ci_high, 1), "unit": line.unit_display, "system": UCUM_SYSTEM_FHIR,
                         "code": line.unit},
                "text": "95% confidence interval (Wilson) of this count, not a population reference range"}]
        if performer:
            obs["performer"] = performer
        observations.append(Observation.model_validate(obs))
        urls[obs["id"]] = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'leukograph:{data.sample_id}:{line.name}')}"
    conclusion = (f"{data.differential['n_wbc']} white cells identified; "
                  + (f"signed off by {data.signoff['reviewer']}" if data.signoff else "preliminary: not signed off"))
    if data.not_wbc or data.smudge:
        conclusion += f"; removed by review: {data.not_wbc} not a white cell, {data.smudge} smudge/unclassifiable"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": safe_id,
        "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "HM",
                                  "display": "Hematology"}]}],
        "code": {"coding": [{"system": LOINC_SYSTEM_FHIR, "code": PANEL.code, "display": PANEL.display}]},
        "identifier": [{"system": "urn:leukograph:sample", "value": data.sample_id}],
        "effectiveDateTime": effective,
        "issued": issued,
        "result": [{"reference": urls[o.id]} for o in observations],
        "conclusion": conclusion,
    }
    if performer:
        report["resultsInterpreter"] = performer
    diagnostic = DiagnosticReport.model_validate(report)
    urls[safe_id] = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'leukograph:{data.sample_id}')}"
    bundle = Bundle.model_validate({
        "resourceType": "Bundle", "type": "collection", "timestamp": issued,
        "entry": [{"fullUrl": urls[r.id], "resource": json.loads(r.model_dump_json(exclude_none=True))}
                  for r in (diagnostic, *observations)]})
    return json.loads(bundle.model_dump_json(exclude_none=True))


def require_results(data: ExportInput) -> None:
    if not result_lines(data.differential):
        raise UserError(f"sample {data.sample_id!r} has no identified white cell: nothing to send")


# ---- what `leukograph report` adds to its CSV and JSON ------------------------------------------------------------
VERIFIED_COLUMNS: tuple[str, ...] = ("verified_label", "verified_by", "verified_version")
AUDIT_COLUMNS: tuple[str, ...] = ("seq", "sample_id", "frame_index", "cell_index", "action", "from_label", "to_label",
                                  "reviewer", "at", "batch", "undoes")


def export_input(review: ReviewStore, sample_id: str) -> ExportInput:
    """The verified differential and sign-off of a sample, as the LIS exports need them."""
    sample = review.sample_row(sample_id)
    summary = review.review_summary(sample_id)
    return ExportInput(sample_id=sample_id, created=sample["created"], model_versions=sample["model_versions"],
                       differential=summary["differential"], signoff=review.signoff(sample_id),
                       not_wbc=summary["not_wbc"], smudge=summary["smudge"])


def with_verified_labels(review: ReviewStore, sample_id: str, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recorded cells with their verified label (empty for cells no reviewer touched and for non-gallery
    cells; after sign-off every gallery cell carries its verified label, kept or changed)."""
    signed = review.signoff(sample_id) is not None
    gallery = {(c.frame_index, c.cell_index): c for c in review.gallery(sample_id)}
    out = []
    for cell in cells:
        g = gallery.get((cell["frame_index"], cell["cell_index"]))
        verified = g is not None and (g.reviewed or signed)
        out.append({**cell, "verified_label": g.label if verified else "",
                    "verified_by": (g.reviewer or (review.signoff(sample_id) or {}).get("reviewer", "")) if verified
                    else "", "verified_version": g.version if g is not None else ""})
    return out


def review_json(review: ReviewStore, sample_id: str) -> dict[str, Any]:
    """The review part of `leukograph report --json`: status, sign-off, verified differential, agreement, audit."""
    data = export_input(review, sample_id)
    summary = review.review_summary(sample_id)
    return {"status": "final" if data.final else "preliminary", "review_status": review.status(sample_id),
            "signoff": data.signoff, "verified": summary, "audit": review.audit(sample_id)}


def audit_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=AUDIT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in AUDIT_COLUMNS})
    return out.getvalue()
