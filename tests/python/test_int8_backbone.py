"""The INT8 backbone variant served by the daemon.

`quantize-backbone` makes an INT8 variant of the demo backbone; with the float32 backbone
removed from the repository, the daemon refuses every adapter until the operator allows the
variant by name, and then answers with the variant named in each result. The served
probabilities equal ONNX Runtime called from Python on the same INT8 backbone.onnx and the
adapter's side.onnx (same library, same CPU kernels: 1e-4 is float32 roundoff headroom), so
the daemon adds nothing of its own to the variant's answers.
"""

import json
import shutil
import sys

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from test_daemon import FIXTURES, ROOT, Daemon, stubs  # noqa: F401 (fixture)

sys.path.insert(0, str(ROOT / "models" / "src"))
from fptserve_models import preprocess  # noqa: E402
from fptserve_models.quantize import quantize_backbone  # noqa: E402

DEMO = ROOT / "models" / "demo"
FP32 = "vit-tiny-demo"
INT8 = "vit-tiny-demo-int8"
IMAGE = FIXTURES / "images" / "rgb8.png"
TASKS = ["dr-grade@1", "dr-grade@2", "skin-lesion@1", "chest-xray@1"]


@pytest.fixture(scope="module")
def int8_repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("int8") / "repo"
    shutil.copytree(DEMO, repo)
    manifest = quantize_backbone(repo, FP32, INT8, calibration_images=16, evaluation_images=8,
                                 log=lambda _: None)
    assert manifest["quantized_from"]["name"] == FP32
    assert manifest["precision"] == "int8"
    shutil.rmtree(repo / "backbones" / FP32)
    return repo


def ort_session(path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def python_probabilities(repo, task, version, backbone=INT8):
    """The variant's backbone.onnx then side.onnx through ONNX Runtime, preprocessing as the
    exporter's."""
    adapter = json.loads((repo / "tasks" / task / version / "manifest.json").read_text())
    pre = adapter["preprocessing"]
    image = preprocess.load_rgb(IMAGE)
    pixels = preprocess.to_tensor(image, pre["backbone_size"], pre["mean"], pre["std"])[None]
    side = preprocess.to_tensor(image, pre["side_size"], pre["mean"], pre["std"])[None]
    keys, values = ort_session(repo / "backbones" / backbone / "backbone.onnx").run(
        ["key_states", "value_states"], {"pixel_values": pixels})
    (logits,) = ort_session(repo / "tasks" / task / version / adapter["file"]).run(
        ["logits"], {"side_pixel_values": side, "key_states": keys, "value_states": values})
    z = logits[0].astype(np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def classify(daemon, stubs, task):
    pb, pb_grpc = stubs
    with grpc.insecure_channel(daemon.addr) as channel:
        reply = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(image=IMAGE.read_bytes(), tasks=[task]), timeout=60)
    return reply.results[0]


def test_variant_refused_until_allowed(int8_repository, stubs):
    d = Daemon(repository=int8_repository)
    try:
        log = d.log()
        assert log.count(f"--allow-backbone-variant {INT8}") >= len(TASKS), log
        pb, pb_grpc = stubs
        with grpc.insecure_channel(d.addr) as channel:
            tasks = pb_grpc.ClassifierStub(channel).ListTasks(pb.ListTasksRequest()).tasks
        assert list(tasks) == []
    finally:
        d.proc.kill()


def test_allowed_variant_answers_as_onnx_runtime_on_the_same_files(int8_repository, stubs):
    d = Daemon("--allow-backbone-variant", INT8, repository=int8_repository)
    try:
        for reference in TASKS:
            task, version = reference.split("@")
            result = classify(d, stubs, reference)
            assert result.backbone == INT8
            served = np.array([s.probability for s in result.scores], dtype=np.float64)
            expected = python_probabilities(int8_repository, task, version)
            assert np.abs(served - expected).max() <= 1e-4, (reference, served, expected)
    finally:
        d.proc.kill()
