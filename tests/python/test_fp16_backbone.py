"""The float16 backbone variant served by the daemon (issue 20).

`quantize-backbone --precision float16` makes a float16 variant of the demo backbone beside the
float32 one. `--backbone-precision float16` (what `auto` means on a GPU) serves every adapter on
it, each result naming it; the served probabilities equal ONNX Runtime called from Python on
the same float16 backbone.onnx and the adapter's side.onnx (same library, same CPU kernels: 1e-4
is float32 roundoff headroom). `auto` on the CPU and `float32` keep the float32 backbone.
"""

import shutil

import numpy as np
import pytest

from test_daemon import ROOT, Daemon, stubs  # noqa: F401 (fixture)
from test_int8_backbone import FP32, TASKS, classify, python_probabilities

from fptserve_models.quantize import quantize_backbone  # noqa: E402 (path set by test_int8_backbone)

FP16 = "vit-tiny-demo-fp16"


@pytest.fixture(scope="module")
def fp16_repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("fp16") / "repo"
    shutil.copytree(ROOT / "models" / "demo", repo)
    manifest = quantize_backbone(repo, FP32, precision="float16", calibration_images=8, evaluation_images=8,
                                 log=lambda _: None)
    assert manifest["name"] == FP16 and manifest["precision"] == "float16"
    return repo


def test_float16_precision_serves_the_variant_as_onnx_runtime_does(fp16_repository, stubs):
    d = Daemon("--backbone-precision", "float16", repository=fp16_repository)
    try:
        assert "no float16 variant" not in d.log()
        for reference in TASKS:
            task, version = reference.split("@")
            result = classify(d, stubs, reference)
            assert result.backbone == FP16
            served = np.array([s.probability for s in result.scores], dtype=np.float64)
            expected = python_probabilities(fp16_repository, task, version, backbone=FP16)
            assert np.abs(served - expected).max() <= 1e-4, (reference, served, expected)
            fp32 = python_probabilities(fp16_repository, task, version, backbone=FP32)
            assert np.abs(served - fp32).max() > 0, "the float16 backbone ran, not the float32 one"
    finally:
        d.proc.kill()


@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_float32_serves_on_the_cpu_by_default_and_when_asked(fp16_repository, stubs, precision):
    d = Daemon("--backbone-precision", precision, repository=fp16_repository)
    try:
        result = classify(d, stubs, TASKS[0])
        assert result.backbone == FP32
        served = np.array([s.probability for s in result.scores], dtype=np.float64)
        task, version = TASKS[0].split("@")
        assert np.abs(served - python_probabilities(fp16_repository, task, version, backbone=FP32)).max() <= 1e-4
    finally:
        d.proc.kill()
