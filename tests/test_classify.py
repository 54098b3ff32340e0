"""`leukograph classify` on real images: frames, 4-class images, single-cell crops, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukograph.client.contract import CLASSES, WBC_CLASSES, white_cell_class
from leukograph.client.images import read_image
from leukograph.training.datasets import load_bccd, load_four_class, split_frames

CLI = [sys.executable, "-m", "leukograph.client.cli", "classify"]
MIN_PBC_SAMPLE_ACCURACY = 0.8  # 5-class accuracy on a PBC test sample (the full figure is in docs/results)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def held_out_frame() -> Path:
    held = split_frames().held_out
    return next(f.image_path for f in load_bccd() if f.frame_id in held)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, held_out_frame: Path) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    image = read_image(held_out_frame)
    cv2.imwrite(str(folder / "frame.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "frame.bmp"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    test_image = load_four_class(split="TEST_SIMPLE")[0].path
    (folder / "fourclass.jpeg").write_bytes(test_image.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.jpg").write_text("this is text, not a JPEG")
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((10, 12, 3), np.uint8))
    return folder


def test_json_output_on_a_frame(held_out_frame: Path) -> None:
    result = run_cli(str(held_out_frame), "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip())
    assert record["path"] == str(held_out_frame)
    kinds = {cell["kind"] for cell in record["cells"]}
    assert "wbc" in kinds and "rbc" in kinds
    for cell in record["cells"]:
        x1, y1, x2, y2 = cell["box"]
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
        assert cell["label"] in CLASSES
        assert set(cell["probs"]) == set(CLASSES)
        assert abs(sum(cell["probs"].values()) - 1) < 1e-3
        assert cell["label"] == max(cell["probs"], key=cell["probs"].get)


def test_both_localizers_find_the_frame_s_white_cell(held_out_frame: Path) -> None:
    """Default: the learned detector (as served); --localizer client: the classical localiser. The detector also finds
    the red cells the classical one misses, so it reports more cells on a BCCD frame."""
    records = {}
    for localizer in ("server", "client"):
        result = run_cli(str(held_out_frame), "--json", "--localizer", localizer)
        assert result.returncode == 0, result.stderr
        records[localizer] = json.loads(result.stdout)
    assert records["server"]["white_cell"]["found_by"] == "detector"
    assert records["client"]["white_cell"]["found_by"] == "localiser"
    assert records["server"]["white_cell"]["class"] == records["client"]["white_cell"]["class"]
    assert len(records["server"]["cells"]) > len(records["client"]["cells"])


def test_python_api_matches_cli(held_out_frame: Path) -> None:
    from leukograph.training.classify import Classifier

    api = Classifier().classify_path(held_out_frame)
    cli = json.loads(run_cli(str(held_out_frame), "--json").stdout)
    assert api == cli


def test_single_cell_crop(held_out_frame: Path, tmp_path: Path) -> None:
    frame = next(f for f in load_bccd() if f.image_path == held_out_frame)
    x1, y1, x2, y2 = (int(v) for v in next(b.box for b in frame.boxes if b.kind == "wbc"))
    crop = read_image(held_out_frame)[max(0, y1 - 15):y2 + 15, max(0, x1 - 15):x2 + 15]
    path = tmp_path / "crop.png"
    cv2.imwrite(str(path), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    result = run_cli(str(path), "--json")
    assert result.returncode == 0, result.stderr
    cells = json.loads(result.stdout)["cells"]
    assert any(c["kind"] == "wbc" for c in cells)


def test_directory_of_mixed_files(mixed_folder: Path) -> None:
    result = run_cli(str(mixed_folder), "--json")
    assert result.returncode == 1
    good = [json.loads(line)["path"] for line in result.stdout.splitlines()]
    assert sorted(Path(p).name for p in good) == ["fourclass.jpeg", "frame.bmp", "frame.png"]
    errors = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    for name in ("empty.jpg", "notes.txt", "fake.jpg", "tiny.png"):
        assert sum(name in line for line in errors) == 1, result.stderr
    assert errors[-1].endswith("4 of 7 inputs failed")


@pytest.mark.parametrize("case", ["missing", "empty", "text", "tiny", "huge", "empty path"])
def test_bad_single_input_is_one_line(case: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case}.png"
    if case == "empty path":  # e.g. an unset shell variable: refused, not read as the working directory
        path = ""
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello")
    elif case == "tiny":
        cv2.imwrite(str(path), np.zeros((8, 40, 3), np.uint8))
    elif case == "huge":
        cv2.imwrite(str(path), np.zeros((10, 8200, 3), np.uint8))
    result = subprocess.run([*CLI, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("leukograph classify: error:"), result.stderr
    assert "Traceback" not in result.stderr


def test_single_cell_images_get_an_image_level_white_cell_class(tmp_path: Path) -> None:
    """The field other labs' single-cell images are scored on: `white_cell.class`, one of the five WBC classes,
    in --json and in the text line; on real PBC test images (never trained on) it names the cell's class."""
    from leukograph.client.contract import NUCLEATED_CLASSES, WBC_CLASSES
    from leukograph.training.datasets import load_pbc

    images = [img for img in load_pbc() if img.split == "test" and img.label in WBC_CLASSES][::10]
    result = run_cli(*(str(img.path) for img in images), "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(img.path) for img in images]
    for record in records:
        white = record["white_cell"]
        assert white["class"] in WBC_CLASSES and white["label"] in NUCLEATED_CLASSES
        assert white["found_by"] == "detector" and record["cells"][white["cell_index"]]["kind"] == "wbc"
        assert 0.0 <= white["probability"] <= 1.0
    correct = [r["white_cell"]["class"] == img.label for r, img in zip(records, images)]
    assert np.mean(correct) >= MIN_PBC_SAMPLE_ACCURACY, np.mean(correct)
    text = run_cli(str(images[0].path))
    assert text.stdout.startswith(f"{images[0].path}: white cell: {records[0]['white_cell']['class']} (")


def test_no_white_cell_found_falls_back_to_the_centre(tmp_path: Path) -> None:
    """An image where the localiser finds no cell still gets a white-cell answer, from the centred square."""
    path = tmp_path / "plain.png"
    cv2.imwrite(str(path), np.full((120, 160, 3), 200, np.uint8))
    result = run_cli(str(path), "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["cells"] == []
    white = record["white_cell"]
    assert white["found_by"] == "fallback" and white["cell_index"] is None
    assert white["box"] == [44.0, 24.0, 116.0, 96.0]  # a 72 px square: 60% of the shorter side, centred
    assert "no WBC box found: fallback" in run_cli(str(path)).stdout


def test_white_cell_reads_every_view_and_evaluate_scores_that_answer(held_out_frame: Path) -> None:
    """classify's white_cell averages each cell's embeddings over its 24 views (eight flips and turns at three
    scales), cut from viewed frames by the served crop_embedder; `leukograph evaluate` scores the same answer
    ("CNN+GNN, 24 views") from viewed stored crops. Both agree on a real held-out frame's cells (stored crops are
    uint8, and a scaled view re-samples them: up to 0.02 with the CNN's vote in the pool), and the per-cell `cells` stay
    the served view's (as the stream records them)."""
    from leukograph.client.localize import Cells
    from leukograph.deploy.paths import WEIGHTS_DIR
    from leukograph.training.cells import cells_of
    from leukograph.training.classify import Classifier
    from leukograph.training.evaluate import VIEWS_MODEL, Models, views_model
    from leukograph.training.views import DIHEDRAL, VIEWS

    frame = cells_of(next(f for f in load_bccd() if f.image_path == held_out_frame))
    image = read_image(held_out_frame)
    cells = Cells(frame.boxes, frame.kinds, np.ones(len(frame.boxes), np.float32))
    assert VIEWS_MODEL == views_model(VIEWS) == "CNN+GNN, 24 views"
    viewed_answers = {}
    for views in (DIHEDRAL, VIEWS):
        scored = Models(WEIGHTS_DIR, views=views).cell_probs([frame])
        classifier = Classifier(threads=1, views=views)
        viewed, served = classifier.viewed_probs(image, cells), classifier.predict(image, cells).probs
        np.testing.assert_allclose(viewed, scored[views_model(views)][0], atol=0.02, rtol=0)
        np.testing.assert_allclose(served, scored["CNN+GNN"][0], atol=0.01, rtol=0)
        viewed_answers[views] = viewed
    # the views change the answer by more than that: flips and turns against the served view, scales against those
    assert np.abs(viewed_answers[DIHEDRAL] - served).max() > 0.02
    assert np.abs(viewed_answers[VIEWS] - viewed_answers[DIHEDRAL]).max() > 0.02

    records = {views: json.loads(run_cli(str(held_out_frame), "--json", "--views", views).stdout)
               for views in ("1", "24")}
    assert records["1"]["white_cell"]["views"] == 1 and records["24"]["white_cell"]["views"] == 24
    assert records["1"]["cells"] == records["24"]["cells"]


def test_a_cell_too_large_for_the_detector_is_found_in_a_zoomed_out_field(tmp_path: Path) -> None:
    """PBC test cells magnified 2x and cut to the image (a tight crop, a higher magnification): where the detector
    finds no WBC box in the image itself, classify finds the cell in a zoomed-out field of the image's border colour
    and answers from it, instead of from the centred square."""
    from leukograph.client.contract import WBC_CLASSES
    from leukograph.client.localize import WBC
    from leukograph.training.classify import ZOOM_OUT, Classifier, zoomed_out
    from leukograph.training.datasets import load_pbc
    from leukograph.training.framing import magnified

    classifier = Classifier(views=1)
    missed = []
    for item in (img for img in load_pbc() if img.split == "test" and img.label in WBC_CLASSES):
        image = magnified(2.0)(read_image(item.path))
        if not (classifier.find_cells(image).kinds == WBC).any():
            missed.append(image)
        if len(missed) == 3:
            break
    assert len(missed) == 3
    field, offset = zoomed_out(missed[0], ZOOM_OUT[0])
    height, width = missed[0].shape[:2]
    left, top = int(offset[0]), int(offset[1])
    assert field.shape[:2] == (round(height * ZOOM_OUT[0]), round(width * ZOOM_OUT[0]))
    assert np.array_equal(field[top:top + height, left:left + width], missed[0])
    assert (field[0, 0] == np.median(np.concatenate([missed[0][0], missed[0][-1], missed[0][:, 0],
                                                     missed[0][:, -1]]), axis=0).astype(np.uint8)).all()
    paths = []
    for k, image in enumerate(missed):
        paths.append(tmp_path / f"magnified-{k}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    result = run_cli(*map(str, paths), "--json")
    assert result.returncode == 0, result.stderr
    for record in map(json.loads, result.stdout.splitlines()):
        white = record["white_cell"]
        assert white["found_by"] == "zoomed out" and white["cell_index"] is None
        assert white["class"] in WBC_CLASSES
        x1, y1, x2, y2 = white["box"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height and x2 - x1 >= 2 and y2 - y1 >= 2
    assert "WBC box found in a zoomed-out field" in run_cli(str(paths[0])).stdout


def test_a_cell_that_fills_the_image_is_answered_in_a_zoomed_out_field(tmp_path: Path) -> None:
    """PBC test cells magnified 2x and cut to the image, where the detector does find the WBC box but it spans
    LARGE_CELL or more of the image's shorter side: classify answers in a field LARGE_CELL_FIELD times the image's
    size (`found_by` "large cell"), the answer `answer_in_field` gives, with the box mapped back into the image.
    PBC's own framing stays below the limit (the single-cell test above: `found_by` "detector")."""
    from leukograph.client.contract import WBC_CLASSES
    from leukograph.client.localize import WBC
    from leukograph.training.classify import LARGE_CELL, LARGE_CELL_FIELD, Classifier, fills_image
    from leukograph.training.datasets import load_pbc
    from leukograph.training.framing import magnified

    assert fills_image([0, 0, 60, 10], (100, 200, 3)) and not fills_image([0, 0, 59, 59], (100, 200, 3))
    classifier = Classifier(views=1)
    large = []
    for item in (img for img in load_pbc() if img.split == "test" and img.label in WBC_CLASSES):
        image = magnified(2.0)(read_image(item.path))
        cells = classifier.find_cells(image)
        wbc = cells.boxes[cells.kinds == WBC]
        if len(wbc) == 1 and fills_image(list(wbc[0]), image.shape):
            large.append(image)
        if len(large) == 2:
            break
    assert len(large) == 2
    paths = []
    for k, image in enumerate(large):
        paths.append(tmp_path / f"large-{k}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    result = run_cli(*map(str, paths), "--json", "--views", "1")
    assert result.returncode == 0, result.stderr
    for image, record in zip(large, map(json.loads, result.stdout.splitlines())):
        white = record["white_cell"]
        assert white["found_by"] == "large cell" and white["cell_index"] is None
        expected = classifier.answer_in_field(image, LARGE_CELL_FIELD)
        assert white["class"] == expected["class"] in WBC_CLASSES and white["box"] == expected["box"]
        height, width = image.shape[:2]
        x1, y1, x2, y2 = white["box"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert any(c["kind"] == "wbc" and max(c["box"][2] - c["box"][0], c["box"][3] - c["box"][1])
                   >= LARGE_CELL * min(height, width) for c in record["cells"])  # the served cells stay as found
    assert "the cell fills the image: answered in a zoomed-out field" in run_cli(str(paths[0]), "--views", "1").stdout


def test_framing_reports_each_framing_from_the_classify_answer(tmp_path: Path) -> None:
    """`leukograph framing` scores classify's own answer on PBC validation cells in each framing."""
    from leukograph.training.framing import FRAMINGS

    out = tmp_path / "framing.json"
    result = subprocess.run([sys.executable, "-m", "leukograph.client.cli", "framing", "--limit", "6", "--views",
                             "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = report["weights"]["training/weights"]
    assert list(rows) == list(FRAMINGS) and report["images"] == 6 and report["split"] == "val"
    for row in rows.values():
        assert sum(found["images"] for found in row["found_by"].values()) == 6
        assert 0.0 <= row["accuracy"] <= 1.0
    assert rows["as given (360 px)"]["accuracy"] >= 4 / 6  # PBC validation cells as given: 95.1% over all 205
    assert "| magnified 2x, cut to the frame |" in result.stdout
    for wrong in (["--split", "val"], ["--split", "test", "--limit", "3"]):  # --readme: the release's test figures
        refused = subprocess.run([sys.executable, "-m", "leukograph.client.cli", "framing", "--readme", *wrong],
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr and "--readme" in refused.stderr


def test_model_card_states_the_framing_figures(tmp_path: Path) -> None:
    """The model card's framing line comes from the committed `leukograph framing --split test` report."""
    from leukograph.training.evaluate import RESULTS_DIR, framing_limits
    from leukograph.training.framing import FRAMINGS

    report = json.loads((RESULTS_DIR / "framing.json").read_text())
    line, = framing_limits(RESULTS_DIR / "framing.json")
    assert report["split"] == "test" and report["command"] in line
    for name, row in report["weights"]["training/weights"].items():
        assert name in FRAMINGS and f"{name}: {100 * row['accuracy']:.1f}%" in line
    assert framing_limits(tmp_path / "absent.json") == []


def test_the_committed_model_card_is_what_its_reports_give(tmp_path: Path) -> None:
    """`write_model_card` (evaluate's, and framing --readme's for the framing line) rebuilds the committed card from
    the committed evaluation and framing reports and the weights' training summary."""
    import shutil

    from leukograph.deploy.paths import WEIGHTS_DIR
    from leukograph.training.evaluate import write_model_card

    shutil.copy(WEIGHTS_DIR / "train_summary.json", tmp_path / "train_summary.json")
    write_model_card(tmp_path)
    assert (tmp_path / "MODEL_CARD.md").read_text() == (WEIGHTS_DIR / "MODEL_CARD.md").read_text()


def test_camera_framings_keep_the_image_s_shape() -> None:
    """The lamp, exposure, compression and monochrome framings change pixels only, as their names say."""
    from leukograph.training.framing import jpeg, lit, monochrome

    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    for framed in (lit((1.0, 0.95, 0.6))(image), jpeg(25)(image), monochrome(image)):
        assert framed.shape == image.shape and framed.dtype == np.uint8
    assert np.array_equal(lit((0.5, 0.5, 0.5))(image), (image.astype(np.float32) * 0.5).astype(np.uint8))
    grey = monochrome(image)
    assert np.array_equal(grey[:, :, 0], grey[:, :, 1]) and np.array_equal(grey[:, :, 0], grey[:, :, 2])
    assert 0 < np.abs(jpeg(25)(image).astype(int) - image).mean() < 64


def test_white_cell_class_is_the_likeliest_of_the_five_white_cell_classes() -> None:
    """An IG-looking cell is answered by its likeliest white-cell class; rows are answered one by one."""
    probs = np.zeros((2, len(CLASSES)))
    probs[0, [CLASSES.index("ig"), CLASSES.index("monocyte"), CLASSES.index("neutrophil")]] = (0.6, 0.3, 0.1)
    probs[1, [CLASSES.index("rbc"), CLASSES.index("basophil")]] = (0.9, 0.1)
    assert [WBC_CLASSES[i] for i in white_cell_class(probs)] == ["monocyte", "basophil"]
    assert WBC_CLASSES[int(white_cell_class(probs[0]))] == "monocyte"
