"""The review station end to end: a sample counted by a real `leukograph stream` run against the real CPU Triton
server, reviewed in headless Chromium (selenium), signed off, exported as HL7 v2.5.1 and FHIR, and locked.

Also, without a browser: thumbnails kept for every white and unidentified cell, old databases gaining the review
tables, the SQLite triggers, optimistic versions, and the HTTP guards (token, CSRF, image ids).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukograph.client.contract import CLASSES, UNIDENTIFIED, WBC_CLASSES
from leukograph.client.records import CellRecord, ResultStore
from leukograph.client.review_store import (
    NOT_WBC,
    THUMBNAIL_SIDE,
    ReviewConflict,
    ReviewStore,
    SampleSigned,
    decode_jpeg,
    keep_frame_images,
    review_choices,
)
from leukograph.deploy.server import TritonServer
from leukograph.training.datasets import load_bccd, split_frames

LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]
N_FRAMES = 8
REVIEW_THRESHOLD = "0.9"  # this sample has both pre-classified cells and an unidentified queue to work through
CHROMIUM = Path(os.environ.get("LEUKOGRAPH_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("LEUKOGRAPH_CHROMEDRIVER", "/usr/bin/chromedriver"))
SCREENSHOT_DIR = os.environ.get("LEUKOGRAPH_SCREENSHOT_DIR")  # set to docs/ to refresh the README's screenshots
SAMPLE = "REVIEW-1"


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*LEUKOGRAPH, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def streamed_db(triton_server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sample counted by `leukograph stream` from held-out BCCD frames through the real Triton server."""
    folder = tmp_path_factory.mktemp("review_frames")
    held_out = split_frames().held_out
    frames = [f for f in load_bccd() if f.frame_id in held_out][:N_FRAMES]
    for i, frame in enumerate(frames):
        assert cv2.imwrite(str(folder / f"{i:03d}_{frame.frame_id}.png"), cv2.imread(str(frame.image_path)))
    db = tmp_path_factory.mktemp("review_db") / "results.sqlite"
    # The classical localiser's cells (--localizer client): with them these frames leave the review queue the tests
    # below work through; the detector's path is tested in test_runners / test_detector_pipeline / test_stream.
    done = run_cli("stream", str(folder), "--url", triton_server.grpc_url, "--db", str(db), "--sample", SAMPLE,
                   "--target", "200", "--threshold", REVIEW_THRESHOLD, "--localizer", "client")
    assert done.returncode == 0, done.stderr
    return db


# ---- storage ---------------------------------------------------------------------------------------------------
@pytest.mark.server
def test_stream_keeps_a_thumbnail_of_every_white_and_unidentified_cell(streamed_db: Path) -> None:
    with ResultStore(streamed_db, create=False) as store:
        cells = store.cells(SAMPLE)
    wanted = {(c["frame_index"], c["cell_index"]): c for c in cells
              if c["kind"] == "wbc" or c["label"] in WBC_CLASSES or c["label"] == UNIDENTIFIED}
    assert wanted, "the stream recorded no white cell"
    with ReviewStore(streamed_db) as review:
        rows = review._query("SELECT * FROM thumbnails WHERE sample_id = ?", (SAMPLE,))
        sources = {r["frame_index"]: r["source"]
                   for r in review._query("SELECT frame_index, source FROM frames WHERE sample_id = ?", (SAMPLE,))}
        assert {(r["frame_index"], r["cell_index"]) for r in rows} == set(wanted)
        for r in rows:
            cell = wanted[(r["frame_index"], r["cell_index"])]
            assert (r["x1"], r["y1"], r["x2"], r["y2"]) == (cell["x1"], cell["y1"], cell["x2"], cell["y2"])
            assert r["frame_ref"] == sources[r["frame_index"]]  # the frame's source, as the result store records it
            assert decode_jpeg(r["jpeg"]).shape == (THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3)
        frames = {r["frame_index"] for r in rows}
        for frame_index in frames:  # the frame every such cell sits in, for the cell-in-frame view
            image = review.frame_image(SAMPLE, frame_index)
            assert decode_jpeg(image["jpeg"]).shape[:2] == (round(image["height"] * image["scale"]),
                                                            round(image["width"] * image["scale"]))
        gallery = review.gallery(SAMPLE)
        assert any(c.pre_label == UNIDENTIFIED for c in gallery)
        assert all(c.has_thumbnail for c in gallery)


def test_old_database_opens_and_gains_review_tables(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    with ResultStore(db) as store:  # a database as leukograph wrote it before the review station
        store.start_sample("OLD", 100, "m0")
        store.record_frame("OLD", 0, [CellRecord((10, 10, 50, 50), "wbc", WBC_CLASSES[0], confidence=0.8)])
    user_version = sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0]
    with ReviewStore(db) as review:
        assert review.schema_version == 1
        assert review.samples()[0]["sample_id"] == "OLD"
    with ReviewStore(db) as review:  # idempotent second open
        assert review.schema_version == 1
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == user_version
    with ResultStore(db, create=False) as store:  # the records module still opens it
        assert store.samples() == ["OLD"]


def _small_db(tmp_path: Path) -> Path:
    db = tmp_path / "small.sqlite"
    rgb = np.full((120, 160, 3), 200, np.uint8)
    cells = [CellRecord((10, 10, 40, 40), "wbc", WBC_CLASSES[0], None, confidence=0.9),
             CellRecord((60, 60, 90, 90), "wbc", UNIDENTIFIED, None, confidence=0.4)]
    with ResultStore(db) as store:
        store.start_sample("S", 100, "m1")
        with ReviewStore(db) as review:
            review.keep_frame("S", 0, rgb, [(c.box, c.kind, c.label) for c in cells], "frame.png")
        store.record_frame("S", 0, cells)
    return db


def test_versions_audit_undo_signoff_and_triggers(tmp_path: Path) -> None:
    db = _small_db(tmp_path)
    with ReviewStore(db) as review:
        first = review.relabel("S", [((0, 1), 0)], WBC_CLASSES[1], "ann")
        assert first["versions"] == {"0-1": 1}
        with pytest.raises(ReviewConflict, match="changed to"):  # a second browser that read version 0
            review.relabel("S", [((0, 1), 0)], WBC_CLASSES[2], "bob")
        review.undo("S", "ann")
        assert review.gallery("S")[1].label == UNIDENTIFIED
        with pytest.raises(Exception, match="unidentified"):
            review.sign_off("S", "ann")
        review.relabel("S", [((0, 1), 2)], NOT_WBC, "ann")
        signed = review.sign_off("S", "ann")
        assert signed["reviewer"] == "ann"
        assert [a["action"] for a in review.audit("S")] == ["reclassify", "undo", "reclassify", "sign_off"]
        with pytest.raises(SampleSigned):
            review.relabel("S", [((0, 0), 0)], WBC_CLASSES[1], "ann")
        with pytest.raises(SampleSigned):
            review.undo("S", "ann")
    raw = sqlite3.connect(db, isolation_level=None)  # autocommit: a refused statement leaves no transaction open
    for sql in ("UPDATE cell_reviews SET label = 'monocyte'", "INSERT INTO cell_reviews VALUES "
                "('S', 0, 0, 'monocyte', 1, 'x', 'now')", "DELETE FROM review_audit", "UPDATE review_audit SET "
                "reviewer = 'x'", "DELETE FROM signoffs", "UPDATE cells SET label = 'monocyte'",
                "INSERT INTO frames (sample_id, frame_index, n_cells, model_version) VALUES ('S', 9, 0, 'm')"):
        with pytest.raises(sqlite3.IntegrityError):
            raw.execute(sql)


# ---- HTTP ------------------------------------------------------------------------------------------------------
def test_http_guards(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from leukograph.client.review.app import create_app

    db = _small_db(tmp_path)
    token = "t" * 24
    app = create_app(db, token=token)
    client = TestClient(app)
    assert client.get("/").status_code == 401
    assert client.get("/api/samples/S/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/", headers=auth).status_code == 200
    body = {"cells": [{"id": "0-1", "version": 0}], "label": WBC_CLASSES[0], "reviewer": "ann"}
    assert client.post("/api/samples/S/relabel", json=body, headers=auth).status_code == 403  # no CSRF token
    csrf = {**auth, "X-CSRF-Token": app.state.csrf_token}
    assert client.post("/api/samples/S/relabel", json=body, headers={**csrf, "Origin": "http://evil.example"}
                       ).status_code == 403
    assert client.post("/api/samples/S/relabel", json=body, headers=csrf).status_code == 200
    conflict = client.post("/api/samples/S/relabel", json=body, headers=csrf)
    assert conflict.status_code == 409 and "changed to" in conflict.json()["error"]
    assert client.get("/api/samples/S/cells/0-1/thumbnail.jpg", headers=auth).headers["content-type"] == "image/jpeg"
    for bad in ("../../etc/passwd", "0-9", "x-1", "1-1-1"):
        assert client.get(f"/api/samples/S/cells/{bad}/thumbnail.jpg", headers=auth).status_code == 404
    assert client.post("/api/samples/S/relabel", content=b"[" * 100_000, headers=csrf).status_code == 413
    assert client.get("/samples/NOPE", headers=auth).status_code == 404
    local = TestClient(create_app(db, allowed_hosts={"127.0.0.1:8765"}), base_url="http://127.0.0.1:8765")
    assert local.get("/").status_code == 200
    assert local.get("/", headers={"Host": "rebound.example:8765"}).status_code == 421


def test_review_refuses_an_open_host_without_token(tmp_path: Path) -> None:
    done = run_cli("review", "--db", str(_small_db(tmp_path)), "--host", "0.0.0.0", timeout=60)
    assert done.returncode == 2 and "--token" in done.stderr and "Traceback" not in done.stderr


# ---- the browser -----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def review_server(streamed_db: Path) -> Iterator[str]:
    import uvicorn

    from leukograph.client.review.app import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(streamed_db), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"no browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1400,1700", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(predicate, timeout: float = 30.0, what: str = "condition"):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _retry(action, timeout: float = 30.0):  # noqa: ANN001, ANN202
    """Run a selenium action again when the page re-rendered the element under it (live polling)."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except StaleElementReferenceException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _label(db: Path, cell_id: str) -> tuple[str | None, int]:
    frame_index, cell_index = (int(v) for v in cell_id.split("-"))
    with ReviewStore(db) as review:
        cell = next(c for c in review.gallery(SAMPLE) if (c.frame_index, c.cell_index) == (frame_index, cell_index))
        return cell.label, cell.version


@pytest.mark.server
@pytest.mark.slow
def test_review_in_the_browser(streamed_db: Path, review_server: str, browser, tmp_path: Path) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(review_server + "/")
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-sample="{SAMPLE}"]')
    assert row.text.split()[-1] in ("counting", "review")  # counting: incomplete, a frame in the last minute
    row.find_element(By.TAG_NAME, "a").click()
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#gallery .cell"), what="gallery")
    driver.find_element(By.ID, "reviewer").send_keys("A. Tech")
    groups = [g.get_attribute("data-group") for g in driver.find_elements(By.CSS_SELECTOR, "#gallery .group")]
    assert groups[0] == UNIDENTIFIED, groups
    with ReviewStore(streamed_db) as review:
        unidentified = [c for c in review.gallery(SAMPLE) if c.label == UNIDENTIFIED]
    confidences = [c.confidence for c in sorted(unidentified, key=lambda c: (c.confidence, c.id))]
    shown = [t.get_attribute("data-id") for t in driver.find_elements(
        By.CSS_SELECTOR, f'.group[data-group="{UNIDENTIFIED}"] .cell')]
    assert len(shown) == len(unidentified) and confidences == sorted(confidences)  # least confident first

    gallery = driver.find_element(By.ID, "gallery")
    if SCREENSHOT_DIR:  # the gallery as the reviewer first sees it: the unidentified queue on top
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        _retry(lambda: gallery.screenshot(str(Path(SCREENSHOT_DIR) / "review-gallery.png")))

    # keyboard: the focused cell (first unidentified) -> class 2 by its number key
    first = _retry(lambda: driver.find_element(By.CSS_SELECTOR, ".cell.focused").get_attribute("data-id"))
    gallery.send_keys("2")
    _wait(lambda: _label(streamed_db, first) == (review_choices()[1], 1), what="keyboard reclassification")
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#detail-frame svg rect.this"), what="cell in frame")

    # mouse: click a cell, then "not a white cell"
    target_css = f'.group[data-group="{UNIDENTIFIED}"] .cell'
    _wait(lambda: not driver.find_elements(By.CSS_SELECTOR, f'{target_css}[data-id="{first}"]'),
          what="the keyboard-reclassified cell leaving the unidentified queue")
    target_id = _retry(lambda: driver.find_element(By.CSS_SELECTOR, target_css).get_attribute("data-id"))
    _retry(lambda: driver.find_element(By.CSS_SELECTOR, f'.cell[data-id="{target_id}"]').click())
    _wait(lambda: _retry(lambda: driver.find_element(By.CSS_SELECTOR, ".cell.focused").get_attribute("data-id"))
          == target_id, what="the clicked cell focused")
    _retry(lambda: driver.find_element(By.CSS_SELECTOR, f'.choice[data-label="{NOT_WBC}"]').click())
    _wait(lambda: _label(streamed_db, target_id) == (NOT_WBC, 1), what="mouse reclassification")

    # undo (button): the mouse change is reverted
    driver.find_element(By.ID, "undo").click()
    _wait(lambda: _label(streamed_db, target_id) == (UNIDENTIFIED, 2), what="undo")

    # multi-select the whole unidentified queue with shift-click, class 1 by the keyboard
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, f'.group[data-group="{UNIDENTIFIED}"] .cell'))
          == len(unidentified) - 1, what="gallery refresh")
    ids = _retry(lambda: [t.get_attribute("data-id") for t in driver.find_elements(
        By.CSS_SELECTOR, f'.group[data-group="{UNIDENTIFIED}"] .cell')])
    tile = lambda cell_id: driver.find_element(By.CSS_SELECTOR, f'.cell[data-id="{cell_id}"]')  # noqa: E731
    _retry(lambda: tile(ids[0]).click())
    if len(ids) > 1:
        from selenium.webdriver.common.action_chains import ActionChains

        _retry(lambda: ActionChains(driver).key_down(Keys.SHIFT).click(tile(ids[-1])).key_up(Keys.SHIFT).perform())
        _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".cell.selected")) == len(ids), what="selection")
    gallery.send_keys("1")
    _wait(lambda: all(_label(streamed_db, i)[0] == review_choices()[0] for i in ids), what="multi-select")
    _wait(lambda: not driver.find_elements(By.CSS_SELECTOR, f'.group[data-group="{UNIDENTIFIED}"]'),
          what="empty unidentified queue")

    # arrows + Enter: accept a pre-classified cell (Escape first: Enter acts on the selection when there is one)
    gallery.send_keys(Keys.ESCAPE)
    _wait(lambda: not driver.find_elements(By.CSS_SELECTOR, ".cell.selected"), what="selection cleared")
    focused_id = lambda: driver.find_element(By.CSS_SELECTOR, ".cell.focused").get_attribute("data-id")  # noqa: E731
    focused = _retry(focused_id)
    order = _retry(lambda: [t.get_attribute("data-id")
                            for t in driver.find_elements(By.CSS_SELECTOR, "#gallery .cell")])
    with ReviewStore(streamed_db) as review:  # Enter accepts a pre-classification: go to a pre-classified cell
        pre_classified = {f"{c.frame_index}-{c.cell_index}" for c in review.gallery(SAMPLE)
                          if c.pre_label in WBC_CLASSES}
    goal = next(i for i in order if i in pre_classified and i != focused)
    step = Keys.ARROW_RIGHT if order.index(goal) > order.index(focused) else Keys.ARROW_LEFT
    for _ in range(abs(order.index(goal) - order.index(focused))):
        gallery.send_keys(step)
    _wait(lambda: _retry(focused_id) == goal, what="arrow move")
    accepted = goal
    before = _label(streamed_db, accepted)
    gallery.send_keys(Keys.ENTER)
    _wait(lambda: _label(streamed_db, accepted) == (before[0], before[1] + 1), what="accept")

    if SCREENSHOT_DIR:
        driver.save_screenshot(str(Path(SCREENSHOT_DIR) / "review-sample.png"))

    # sign off (the confirm dialog)
    driver.find_element(By.ID, "signoff").click()
    _wait(lambda: driver.switch_to.alert, what="confirm dialog").accept()
    _wait(lambda: "Signed off by A. Tech" in driver.find_element(By.ID, "signoff-state").text, what="signed")
    assert driver.find_element(By.CSS_SELECTOR, ".choice").get_attribute("disabled") is not None
    audit_rows = driver.find_elements(By.CSS_SELECTOR, "#audit tbody tr")
    driver.save_screenshot(str(tmp_path / "signed.png"))

    # the database
    with ReviewStore(streamed_db) as review:
        audit = review.audit(SAMPLE)
        assert [a["action"] for a in audit] == ["reclassify", "reclassify", "undo", *["reclassify"] * len(ids),
                                                "accept", "sign_off"]
        assert len(audit_rows) == len(audit)
        assert all(a["reviewer"] == "A. Tech" for a in audit)
        signoff = review.signoff(SAMPLE)
        assert signoff["reviewer"] == "A. Tech"
        verified = review.review_summary(SAMPLE)
        assert verified["differential"]["n_unidentified"] == 0
        kept = {r["class"]: r for r in verified["agreement"]}
        assert kept[UNIDENTIFIED]["kept"] == 0 and kept[UNIDENTIFIED]["changed"] == len(unidentified)

    # exports: HL7 parsed back, FHIR validated, both final; the audit trail in JSON and CSV
    from fhir.resources.R4B.bundle import Bundle
    from hl7apy.parser import parse_message

    hl7 = tmp_path / "result.hl7"
    assert run_cli("report", SAMPLE, "--db", str(streamed_db), "--hl7", str(hl7)).returncode == 0
    message = parse_message(hl7.read_text().replace("\n", "\r"), find_groups=True)
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and message.msh.msh_12.to_er7() == "2.5.1"
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.to_er7() == "F"
    obx = [o.obx for o in order.oru_r01_observation]
    rows = {r["name"]: r for r in verified["differential"]["rows"]}
    diff = verified["differential"]
    flagged = {"ig": diff["ig_percent"], "nrbc": diff["nrbc_per_100_wbc"]}  # reported beside the 100 when present
    present = {name for name, count in (("ig", diff["n_ig"]), ("nrbc", diff["n_nrbc"])) if count}
    assert len(obx) == len(WBC_CLASSES) + len(present)
    for segment in obx:
        code = segment.obx_3.to_er7().split("^")[0]
        name = next(n for n in (*WBC_CLASSES, *present) if code in (f"LG-{n}",) or _loinc(n) == code)
        expected = rows[name]["percent"] if name in rows else flagged[name]
        assert float(segment.obx_5.to_er7()) == pytest.approx(expected, abs=0.05)
        assert segment.obx_11.to_er7() == "F"
    fhir = tmp_path / "result.json"
    assert run_cli("report", SAMPLE, "--db", str(streamed_db), "--fhir", str(fhir)).returncode == 0
    bundle = Bundle.model_validate_json(fhir.read_text())
    resources = [e.resource for e in bundle.entry]
    assert resources[0].status == "final" and len(resources) == 1 + len(WBC_CLASSES) + len(present)
    assert resources[0].get_resource_type() == "DiagnosticReport"
    report = json.loads(run_cli("report", SAMPLE, "--db", str(streamed_db), "--json", "-").stdout)
    assert report["verification"]["audit"] == json.loads(json.dumps(audit))
    assert report["verification"]["status"] == "final"

    # a signed sample cannot change: HTTP (423) and SQL (the trigger)
    cell = review_choices()[0]
    response = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const config = JSON.parse(document.getElementById("config").textContent);
        fetch("/api/samples/" + encodeURIComponent(config.sample) + "/relabel", {method: "POST",
          headers: {"Content-Type": "application/json", "X-CSRF-Token": config.csrf},
          body: JSON.stringify({cells: [{id: arguments[0], version: arguments[1]}], label: arguments[2],
                                reviewer: "B. Late"})}).then(r => r.json().then(j => done([r.status, j.error])));
    """, accepted, before[1] + 1, cell)
    assert response[0] == 423 and "signed off" in response[1]
    with pytest.raises(sqlite3.IntegrityError, match="signed off"):
        sqlite3.connect(streamed_db, isolation_level=None).execute(
            "UPDATE cell_reviews SET label = ? WHERE sample_id = ?", (cell, SAMPLE))
    with ReviewStore(streamed_db) as review, pytest.raises(SampleSigned):  # the stream's hook: no more frames
        review.keep_frame(SAMPLE, 10_000, np.zeros((64, 64, 3), np.uint8), [((1, 1, 9, 9), "wbc", cell)])


@pytest.mark.server
def test_sample_page_updates_while_counting(streamed_db: Path, review_server: str, browser) -> None:  # noqa: ANN001
    """A frame recorded while the page is open shows up in its differential (the page polls while counting)."""
    from selenium.webdriver.common.by import By

    sample = "LIVE-1"
    image = np.full((240, 320, 3), 180, np.uint8)
    first = CellRecord((40.0, 40.0, 120.0, 120.0), "wbc", WBC_CLASSES[0], confidence=0.99)
    second = CellRecord((160.0, 40.0, 240.0, 120.0), "wbc", WBC_CLASSES[-1], confidence=0.99)
    with ResultStore(streamed_db, create=False) as store:
        store.start_sample(sample, 100, "live-check")
        keep_frame_images(streamed_db, sample, 0, image, [first], "live#0")
        store.record_frame(sample, 0, [first])
        browser.get(f"{review_server}/samples/{sample}")
        _wait(lambda: _text(browser, "n-wbc") == "1", what="page")
        assert browser.find_element(By.ID, "status").text == "counting"
        keep_frame_images(streamed_db, sample, 1, image, [second], "live#1")
        store.record_frame(sample, 1, [second])
    _wait(lambda: _text(browser, "n-wbc") == "2", what="live update")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .cell")) == 2


def _text(driver, element_id: str) -> str:  # noqa: ANN001
    """The element's text, or '' while the page has not rendered it."""
    from selenium.webdriver.common.by import By

    return _retry(lambda: "".join(e.text for e in driver.find_elements(By.ID, element_id)))


def _loinc(name: str) -> str | None:
    from leukograph.client.lis_export import LOINC_BY_CLASS

    entry = LOINC_BY_CLASS.get(name)
    return entry.code if entry else None


def test_screenshots_are_in_docs() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs"
    for name in ("review-sample.png", "review-gallery.png"):
        assert (docs / name).is_file() and (docs / name).stat().st_size > 10_000, name
    readme = (docs.parent / "README.md").read_text()
    assert "docs/review-sample.png" in readme and "docs/review-gallery.png" in readme


# ---- classify --db ---------------------------------------------------------------------------------------------
CLASSIFIED = "CLASSIFY-1"


@pytest.fixture(scope="module")
def classified(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """(database, image folder, classify's JSON per image): real PBC single-cell images and held-out BCCD frames
    classified in-process by `leukograph classify --db`."""
    from leukograph.deploy.paths import data_root

    folder = tmp_path_factory.mktemp("classify_images")
    pbc = data_root() / "pbc"
    for name in WBC_CLASSES[:3]:
        for path in sorted((pbc / name).glob("*.jpg"))[:2]:
            (folder / path.name).write_bytes(path.read_bytes())
    held_out = split_frames().held_out
    for frame in [f for f in load_bccd() if f.frame_id in held_out][:2]:
        assert cv2.imwrite(str(folder / f"bccd_{frame.frame_id}.png"), cv2.imread(str(frame.image_path)))
    db = tmp_path_factory.mktemp("classify_db") / "results.sqlite"
    done = run_cli("classify", str(folder), "--db", str(db), "--sample", CLASSIFIED, "--threshold", REVIEW_THRESHOLD,
                   "--json", "--threads", "1", timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"sample {CLASSIFIED} in {db}: 8 image(s) recorded" in done.stderr
    return db, folder, [json.loads(line) for line in done.stdout.splitlines()]


def test_classify_db_records_what_it_prints_with_thumbnails(classified: tuple[Path, Path, list[dict]]) -> None:
    from leukograph.client.differential import label_cells
    from leukograph.deploy.model_repository import weights_id
    from leukograph.deploy.paths import WEIGHTS_DIR

    db, folder, results = classified
    with ResultStore(db, create=False) as store:
        frames = store.frames(CLASSIFIED)
        cells = store.cells(CLASSIFIED)
    assert len(frames) == len(results) == 8
    version = weights_id(WEIGHTS_DIR)  # the id `leukograph serve` reports for these weights
    assert {f["model_version"] for f in frames} == {c["model_version"] for c in cells} == {version}
    by_source = {f["source"]: f["frame_index"] for f in frames}
    for result in results:  # the recorded cells are the printed cells, labelled with the review threshold
        frame_index = by_source[str(Path(result["path"]).resolve())]
        recorded = [c for c in cells if c["frame_index"] == frame_index]
        assert [c["kind"] for c in recorded] == [c["kind"] for c in result["cells"]]
        for mine, printed in zip(recorded, result["cells"], strict=True):
            assert [mine[k] for k in ("x1", "y1", "x2", "y2")] == pytest.approx(printed["box"], abs=0.06)
            assert [mine["probs"][k] for k in CLASSES] == pytest.approx([printed["probs"][k] for k in CLASSES],
                                                                        abs=1e-5)
        probs = np.array([[c["probs"][k] for k in CLASSES] for c in recorded]).reshape(-1, len(CLASSES))
        assert [c["label"] for c in recorded] == label_cells(probs, float(REVIEW_THRESHOLD),
                                                             [c["kind"] for c in recorded])
    wanted = {(c["frame_index"], c["cell_index"]) for c in cells
              if c["kind"] == "wbc" or c["label"] in WBC_CLASSES or c["label"] == UNIDENTIFIED}
    with ReviewStore(db) as review:
        rows = review._query("SELECT frame_index, cell_index, jpeg FROM thumbnails WHERE sample_id = ?", (CLASSIFIED,))
        assert wanted and {(r["frame_index"], r["cell_index"]) for r in rows} >= wanted
        assert all(decode_jpeg(r["jpeg"]).shape == (THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3) for r in rows)
        assert all(c.has_thumbnail for c in review.gallery(CLASSIFIED))

    again = run_cli("classify", str(folder), "--db", str(db), "--sample", CLASSIFIED, "--threshold", REVIEW_THRESHOLD,
                    "--threads", "1", timeout=600)
    assert again.returncode == 0 and "0 image(s) recorded (0 cells), 8 already recorded" in again.stderr
    with ResultStore(db, create=False) as store:
        assert len(store.frames(CLASSIFIED)) == 8 and store.verify(CLASSIFIED) == []


@pytest.mark.slow
def test_classify_db_opens_in_the_review_station(classified: tuple[Path, Path, list[dict]], browser) -> None:  # noqa: ANN001
    """The real review app on a database `classify --db` wrote: list, gallery thumbnails in Chromium, the cell in
    its frame, review and sign-off; then classify refuses to add to the signed sample with one line."""
    import uvicorn
    from fastapi.testclient import TestClient
    from selenium.webdriver.common.by import By

    from leukograph.client.review.app import create_app

    db, folder, _ = classified
    app = create_app(db)
    client = TestClient(app)
    listed = {s["sample_id"]: s for s in client.get("/api/samples").json()}
    assert listed[CLASSIFIED]["n_frames"] == 8
    state = client.get(f"/api/samples/{CLASSIFIED}/state").json()
    assert state["cells"] and all(c["has_thumbnail"] for c in state["cells"])
    for cell in state["cells"]:
        thumb = client.get(f"/api/samples/{CLASSIFIED}/cells/{cell['id']}/thumbnail.jpg")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert decode_jpeg(thumb.content).shape == (THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3)
        detail = client.get(f"/api/samples/{CLASSIFIED}/cells/{cell['id']}").json()
        assert client.get(detail["frame"]["url"]).status_code == 200

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(db), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, what="review server")
        browser.get(f"http://127.0.0.1:{port}/samples/{CLASSIFIED}")
        shown = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery .cell img"), what="gallery")
        assert len(shown) == len(state["cells"])
        _wait(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", shown[0])
              == THUMBNAIL_SIDE, what="first thumbnail")
    finally:
        server.should_exit = True
        thread.join(10)

    csrf = {"X-CSRF-Token": app.state.csrf_token}
    for cell in state["cells"]:  # what the page sends: every unidentified cell classified, then sign-off
        if cell["label"] == UNIDENTIFIED:
            body = {"cells": [{"id": cell["id"], "version": cell["version"]}], "label": WBC_CLASSES[0],
                    "reviewer": "A. Tech"}
            assert client.post(f"/api/samples/{CLASSIFIED}/relabel", json=body, headers=csrf).status_code == 200
    signed = client.post(f"/api/samples/{CLASSIFIED}/signoff", json={"reviewer": "A. Tech"}, headers=csrf)
    assert signed.status_code == 200, signed.text
    client.close()
    refused = run_cli("classify", str(folder), "--db", str(db), "--sample", CLASSIFIED, "--threads", "1", timeout=600)
    assert refused.returncode != 0 and "signed off" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
