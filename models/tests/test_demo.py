"""The committed demo repository and fixtures: up to date, in the documented format, and the
reference numbers reproduced by ONNX Runtime on the committed files."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from fptserve_models.demo import generate_demo
from fptserve_models.export import ort_session
from fptserve_models.preprocess import load_rgb, preprocess

MODELS = Path(__file__).resolve().parents[1]
DEMO, FIXTURES = MODELS / "demo", MODELS / "fixtures"

BACKBONE_KEYS = {"format", "name", "file", "sha256", "source_weights", "architecture", "inputs", "outputs", "opset", "parity", "provenance"}
BACKBONE_ARCH = {"kind", "hidden_size", "num_heads", "head_dim", "patch_size", "num_layers", "image_size",
                 "pretrained_image_size", "num_tokens", "layers_used", "token_ratio", "top_k", "layer_norm_eps",
                 "kv_dtype", "kv_layout"}
ADAPTER_KEYS = {"format", "task", "version", "method", "file", "sha256", "backbone", "classes", "preprocessing",
                "architecture", "inputs", "outputs", "opset", "parity", "provenance"}
ADAPTER_ARCH = {"hidden_size", "num_layers", "num_heads", "head_dim", "mlp_size", "patch_size", "image_size",
                "num_prompts", "num_classes", "layer_norm_eps"}
PARITY = {"dtype", "max_abs_diff", "samples", "method"}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    root = tmp_path_factory.mktemp("regen")
    generate_demo(root / "demo", root / "fixtures", log=lambda *a: None)
    return root


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def strip_measured(manifest):
    m = json.loads(json.dumps(manifest))
    m.pop("parity")
    return m


def test_demo_is_up_to_date(regenerated):
    assert files(DEMO) == files(regenerated / "demo")
    for rel in files(DEMO):
        a, b = DEMO / rel, regenerated / "demo" / rel
        if rel.endswith(".onnx"):
            assert a.read_bytes() == b.read_bytes(), f"{rel} is stale: run python -m fptserve_models demo"
        else:
            ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
            # parity figures are measurements (machine dependent in the last bits): same keys, within bounds
            assert strip_measured(ma) == strip_measured(mb), f"{rel} is stale: run python -m fptserve_models demo"
            assert set(ma["parity"]) == set(mb["parity"])
            assert ma["parity"]["max_abs_diff"] <= 1e-4


def test_fixtures_are_up_to_date(regenerated):
    assert files(FIXTURES) == files(regenerated / "fixtures")
    for rel in files(FIXTURES):
        a, b = FIXTURES / rel, regenerated / "fixtures" / rel
        if rel.endswith(".png"):  # compare decoded content (zlib builds may differ in bytes)
            with Image.open(a) as ia, Image.open(b) as ib:
                assert (ia.mode, ia.size) == (ib.mode, ib.size) and np.array_equal(np.asarray(ia), np.asarray(ib)), rel
        elif rel.endswith(".dcm"):
            assert a.read_bytes() == b.read_bytes(), rel
    ra = json.loads((FIXTURES / "reference.json").read_text())
    rb = json.loads((regenerated / "fixtures" / "reference.json").read_text())
    assert len(ra["cases"]) == len(rb["cases"])
    for ca, cb in zip(ra["cases"], rb["cases"]):
        for key in set(ca) | set(cb):
            if key in ("logits", "probabilities"):
                np.testing.assert_allclose(ca[key], cb[key], atol=1e-6, rtol=0)
            else:
                assert ca[key] == cb[key], key
    assert {k: v for k, v in ra.items() if k != "cases"} == {k: v for k, v in rb.items() if k != "cases"}


def test_demo_format_and_size():
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= 5_000_000
    bdirs = sorted(p.name for p in (DEMO / "backbones").iterdir())
    assert bdirs == ["vit-tiny-demo"]
    bm = json.loads((DEMO / "backbones" / "vit-tiny-demo" / "manifest.json").read_text())
    assert BACKBONE_KEYS <= set(bm) and BACKBONE_ARCH <= set(bm["architecture"]) and PARITY <= set(bm["parity"])
    assert bm["format"] == "fptserve.backbone/v1" and bm["name"] == "vit-tiny-demo" and bm["file"] == "backbone.onnx"
    onnx_bytes = (DEMO / "backbones" / "vit-tiny-demo" / "backbone.onnx").read_bytes()
    assert bm["sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    a = bm["architecture"]
    assert (a["image_size"], a["pretrained_image_size"], a["num_tokens"], a["top_k"], a["layers_used"]) == (64, 48, 65, 13, [3, 4, 5])
    assert a["kv_layout"] == "batch,layer,head,token,head_dim" and a["kv_dtype"] == "float32"
    assert bm["outputs"] == [{"name": n, "dtype": "float32", "shape": [-1, 3, 4, 13, 8]} for n in ("key_states", "value_states")]
    assert (DEMO / "backbones" / "vit-tiny-demo" / "manifest.json").read_text() == json.dumps(bm, indent=2) + "\n"

    tasks = {}
    for mpath in sorted((DEMO / "tasks").glob("*/*/manifest.json")):
        m = json.loads(mpath.read_text())
        assert ADAPTER_KEYS <= set(m) and ADAPTER_ARCH <= set(m["architecture"]) and PARITY <= set(m["parity"])
        assert m["format"] == "fptserve.adapter/v1" and m["method"] == "fpt+" and m["file"] == "side.onnx"
        assert (m["task"], m["version"]) == (mpath.parent.parent.name, mpath.parent.name)
        assert m["sha256"] == hashlib.sha256((mpath.parent / "side.onnx").read_bytes()).hexdigest()
        assert m["backbone"] == {"name": "vit-tiny-demo", "sha256": bm["sha256"]}
        assert m["architecture"]["num_classes"] == len(m["classes"]) and m["outputs"][0]["shape"] == [-1, len(m["classes"])]
        p = m["preprocessing"]
        assert p["backbone_size"] == [64, 64] and p["side_size"] == [32, 32] and p["resize"] == "pil-bilinear"
        assert p["channels"] == "rgb" and p["dicom"] == {"voi": "auto"}
        assert [i["name"] for i in m["inputs"]] == ["side_pixel_values", "key_states", "value_states"]
        assert m["inputs"][1]["shape"] == bm["outputs"][0]["shape"]
        assert {"exporter", "checkpoint", "checkpoint_sha256"} <= set(m["provenance"])
        tasks[(m["task"], m["version"])] = m
    assert sorted(tasks) == [("chest-xray", "1"), ("dr-grade", "1"), ("dr-grade", "2"), ("skin-lesion", "1")]
    pre = lambda t: (tasks[t]["preprocessing"]["mean"], tasks[t]["preprocessing"]["std"])
    assert pre(("dr-grade", "1")) == pre(("skin-lesion", "1")) == pre(("dr-grade", "2")) != pre(("chest-xray", "1"))
    assert len({len(m["classes"]) for m in tasks.values()}) == 3


def test_fixture_inputs():
    with Image.open(FIXTURES / "images" / "grey8.png") as im:
        assert im.mode == "L" and im.size == (300, 220) and np.asarray(im).std() > 20
    with Image.open(FIXTURES / "images" / "grey16.png") as im:
        arr = np.asarray(im)
        assert im.mode == "I;16" and arr.max() > 255 and (arr <= 255).mean() > 0.1
    with Image.open(FIXTURES / "images" / "rgb8.png") as im:
        assert im.mode == "RGB"
    with Image.open(FIXTURES / "images" / "rgba8.png") as im:
        assert im.mode == "RGBA" and np.asarray(im)[..., 3].min() < 255
    g = pydicom.dcmread(FIXTURES / "dicom" / "grey8_explicit_le.dcm")
    assert g.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian and g.PhotometricInterpretation == "MONOCHROME2"
    assert "WindowCenter" not in g
    with Image.open(FIXTURES / "images" / "grey8.png") as im:
        assert np.array_equal(g.pixel_array, np.asarray(im))
    c = pydicom.dcmread(FIXTURES / "dicom" / "rgb8_rle.dcm")
    assert c.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless and c.PhotometricInterpretation == "RGB"
    with Image.open(FIXTURES / "images" / "rgb8.png") as im:
        assert np.array_equal(c.pixel_array, np.asarray(im))


def test_reference_reproduced_by_onnxruntime():
    """What the daemon does: PIL-equivalent preprocessing + backbone.onnx + side.onnx."""
    ref = json.loads((FIXTURES / "reference.json").read_text())
    inputs = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.suffix in (".png", ".dcm")}
    manifests = {(m.parent.parent.name, m.parent.name): json.loads(m.read_text()) for m in (DEMO / "tasks").glob("*/*/manifest.json")}
    assert {(c["input"], c["task"], c["version"]) for c in ref["cases"]} == {(i, t, v) for i in inputs for (t, v) in manifests}
    backbone = ort_session(DEMO / "backbones" / "vit-tiny-demo" / "backbone.onnx")
    labels = set()
    for case in ref["cases"]:
        m = manifests[(case["task"], case["version"])]
        assert case["classes"] == m["classes"]
        p = m["preprocessing"]
        x, y = preprocess(load_rgb(FIXTURES / case["input"]), p["backbone_size"], p["side_size"], p["mean"], p["std"])
        k, v = backbone.run(None, {"pixel_values": x[None]})
        side = ort_session(DEMO / "tasks" / case["task"] / case["version"] / "side.onnx")
        (logits,) = side.run(None, {"side_pixel_values": y[None], "key_states": k, "value_states": v})
        np.testing.assert_allclose(logits[0], case["logits"], atol=ref["tolerance"], rtol=0)
        probs = np.exp(np.asarray(case["logits"], np.float64) - max(case["logits"]))
        np.testing.assert_allclose(case["probabilities"], probs / probs.sum(), atol=1e-12)
        assert case["label"] == case["classes"][int(np.argmax(case["probabilities"]))]
        if case["kind"] == "dicom":
            ds = pydicom.dcmread(FIXTURES / case["input"], stop_before_pixels=True)
            assert case["study_instance_uid"] == ds.StudyInstanceUID and case["sop_instance_uid"] == ds.SOPInstanceUID
            assert case["series_instance_uid"] == ds.SeriesInstanceUID
        labels.add((case["task"], case["label"]))
        assert max(case["probabilities"]) < 0.9999  # not saturated
    # non-trivial outputs: some task gives different labels for different inputs
    assert len(labels) > len(manifests)


def test_sixteen_bit_clip_matters():
    """PIL convert('RGB') clips 16-bit grey at 255; a rescale would give other pixels."""
    with Image.open(FIXTURES / "images" / "grey16.png") as im:
        arr = np.asarray(im).astype(np.float64)
    rgb = np.asarray(load_rgb(FIXTURES / "images" / "grey16.png"))
    assert np.array_equal(rgb[..., 0], np.minimum(arr, 255).astype(np.uint8))
    assert not np.array_equal(rgb[..., 0], np.round(arr / arr.max() * 255).astype(np.uint8))
