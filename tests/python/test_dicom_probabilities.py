"""Probabilities of `fptserve classify --json` on DICOM input equal those of an independent
Python pipeline to 1e-4 (issue 4): pydicom decode -> pixel policy "auto"
(tests/python/dicom_reference.py) -> PIL convert('RGB') + bilinear resize -> /255 ->
normalise (models/src/fptserve_models/preprocess.py) -> ONNX Runtime on the demo
backbone.onnx + side.onnx -> softmax.

For lossy files, where two conforming decoders may differ by a grey level, the reference
policy is applied to fptserve's own decoded values if (and only if) they differ from pydicom's
within the syntax's tolerance; identical decodes use pydicom's values. Either way the rest of
the pipeline is compared exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicom_parity as dp  # noqa: E402
import dicom_reference as ref  # noqa: E402

BINARY = Path(os.environ.get("FPTSERVE_BIN", ROOT / "target" / "debug" / "fptserve"))
REPOSITORY = ROOT / "models" / "demo"
TASKS = ["dr-grade@1", "dr-grade@2", "skin-lesion@1", "chest-xray@1"]
TOLERANCE = 1e-4

# (pydicom test file, frame, what it covers)
CASES = [
    ("MR_small.dcm", 0, "16-bit signed MONOCHROME2 with a window"),
    ("MR-SIEMENS-DICOM-WithOverlays.dcm", 0, "12-bit MONOCHROME2, two windows (the first is used)"),
    ("MR2_UNCI.dcm", 0, "12-bit MONOCHROME2, window + fractional rescale"),
    ("RG3_UNCI.dcm", 0, "MONOCHROME1 10-bit with a window, 1760 x 1760"),
    ("dicomdirtests/77654033/CR1/6154", 0, "MONOCHROME1 with rescale and window"),
    ("693_UNCI.dcm", 0, "signed CT (14 bits stored) with rescale and a window"),
    ("CT_small.dcm", 0, "signed CT with rescale, no window (min-max)"),
    ("mlut_18.dcm", 0, "Modality LUT Sequence"),
    ("vlut_04.dcm", 0, "VOI LUT Sequence"),
    ("US1_UNCI.dcm", 0, "8-bit RGB"),
    ("SC_rgb_16bit.dcm", 0, "16-bit RGB (>> 8)"),
    ("OBXXXX1A.dcm", 0, "PALETTE COLOR"),
    ("SC_rgb_jpeg_dcmtk.dcm", 0, "YBR_FULL JPEG baseline"),
    ("examples_ybr_color.dcm", 29, "YBR_FULL_422 JPEG baseline, multi-frame, last frame"),
    ("emri_small.dcm", 9, "multi-frame MONOCHROME2 12-bit, last frame (min-max)"),
]


def _file(name: str) -> dp.TestFile:
    for f in dp.pixel_test_files():
        if f.name == name:
            return f
    raise AssertionError(f"{name} is not among pydicom's test files: {ref.INSTALL_HINT}")


@pytest.fixture(scope="session")
def binary():
    assert BINARY.exists(), f"{BINARY} is missing: build it with `cargo build` (make test does)"
    return BINARY


@pytest.fixture(scope="session")
def tasks():
    return [ref.load_task(t, REPOSITORY) for t in TASKS]


def fptserve_classify(binary: Path, path: str, frame: int) -> dict:
    cmd = [str(binary), "classify", path, "--frame", str(frame), "--json", "--repository", str(REPOSITORY),
           "--intra-op-threads", "1"]
    for t in TASKS:
        cmd += ["--task", t]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"fptserve classify exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def reference_display(binary: Path, tf: dp.TestFile, frame: int) -> tuple[np.ndarray, str]:
    """The policy "auto" on pydicom's values, or on fptserve's when a lossy decode differs within tolerance."""
    ref.require_plugins()
    ds, _ = ref.read_dataset(tf.path)
    expected = ref.pydicom_frame(ds, frame)
    tol = dp.tolerance(ref.transfer_syntax(ds), int(ds.get("SamplesPerPixel", 1)))
    if tol == 0:
        return ref.display(ds, expected, frame), "pydicom's decode"
    answer = dp.run_decode(binary, tf.path, frame, "stored")
    assert answer.ok, f"fptserve cannot decode {tf.name} frame {frame}: {answer.describe()}"
    got = dp._fptserve_stored(answer, ds)
    assert got.shape == expected.shape, f"{tf.name}: shape {got.shape} != pydicom {expected.shape}"
    diff = int(np.abs(got - expected).max()) if got.size else 0
    assert diff <= tol, f"{tf.name}: fptserve's decode differs from pydicom's by {diff} > {tol}"
    if diff == 0:
        return ref.display(ds, expected, frame), "pydicom's decode (identical to fptserve's)"
    return ref.display(ds, got, frame), f"fptserve's decode (differs from pydicom's by {diff} <= {tol})"


@pytest.mark.parametrize("name,frame,covers", CASES, ids=[f"{n}@{f}" for n, f, _ in CASES])
def test_probabilities_match_python_reference(binary, tasks, name, frame, covers):
    tf = _file(name)
    display, source = reference_display(binary, tf, frame)
    got = fptserve_classify(binary, tf.path, frame)
    results = got["results"]
    assert [f"{r['task']}@{r['adapter_version']}" for r in results] == TASKS
    problems = []
    for task, result in zip(tasks, results):
        want = ref.classify(display, task)
        assert [s["name"] for s in result["scores"]] == want["classes"]
        p_got = np.array([s["probability"] for s in result["scores"]], dtype=np.float64)
        p_want = np.array(want["probabilities"])
        worst = float(np.abs(p_got - p_want).max())
        if worst > TOLERANCE:
            problems.append(f"{task.name}@{task.version}: max |dp| {worst:.3g} > {TOLERANCE}: fptserve "
                            f"{np.round(p_got, 5).tolist()} vs reference {np.round(p_want, 5).tolist()}")
    assert not problems, f"{name} frame {frame} ({covers}; reference from {source}):\n" + "\n".join(problems)
