"""Reduced-resolution decoding (manifest: preprocessing.dicom.decode_resolution "reduced"),
end to end through the daemon.

A copy of the demo task dr-grade@1 opts in as dr-grade-reduced@1 (same ONNX files). The
input is pydicom's RG3_UNCI.dcm (MONOCHROME1, 10 bits, 1760 x 1760, with a window) made JPEG
2000 lossless by GDCM with 6 resolution levels. The demo models take 64 x 64 (backbone) and
32 x 32 (side network), so the opted-in task decodes 4 levels down, at 110 x 110: the
coarsest level whose sides are at least 64 (a fifth would give 55).

The expected probabilities come from an independent pipeline: OpenJPEG's own reduced decode
(`opj_decompress -r 4`) -> pydicom's attributes through the pixel policy "auto"
(tests/python/dicom_reference.py) -> PIL resize -> ONNX Runtime.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicom_reference as ref  # noqa: E402
from test_daemon import ROOT, Daemon, stubs  # noqa: E402,F401  (stubs is a fixture)
from test_dicom_probabilities import TOLERANCE, _file  # noqa: E402

LEVELS_DOWN = 4
FULL = 1760
REDUCED = -(-FULL // (1 << LEVELS_DOWN))  # 110


def read_pgm(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img).astype(np.int64)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """The opted-in repository, the J2K file, and OpenJPEG's reduced decode of it."""
    tmp = tmp_path_factory.mktemp("reduced")
    repo = tmp / "repo"
    shutil.copytree(ROOT / "models" / "demo", repo)
    reduced = repo / "tasks" / "dr-grade-reduced" / "1"
    shutil.copytree(repo / "tasks" / "dr-grade" / "1", reduced)
    manifest = json.loads((reduced / "manifest.json").read_text())
    manifest["task"] = "dr-grade-reduced"
    manifest["preprocessing"]["dicom"]["decode_resolution"] = "reduced"
    (reduced / "manifest.json").write_text(json.dumps(manifest, indent=2))

    source = _file("RG3_UNCI.dcm").path
    j2k = tmp / "rg3_j2k.dcm"
    subprocess.run(["gdcmconv", "--j2k", "-n", "6", source, str(j2k)], check=True, capture_output=True)
    ds = pydicom.dcmread(j2k)
    assert (ds.Rows, ds.Columns) == (FULL, FULL)
    codestream = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    stream = tmp / "rg3.j2k"
    stream.write_bytes(next(codestream))
    pgm = tmp / "rg3_reduced.pgm"
    subprocess.run(["opj_decompress", "-i", str(stream), "-o", str(pgm), "-r", str(LEVELS_DOWN)],
                   check=True, capture_output=True)
    # GDCM codes the 10 stored bits at 16-bit precision, so OpenJPEG writes level 4's
    # overshoot near edges (up to 1075) as is; the daemon saturates at the stored range.
    values = np.clip(read_pgm(pgm), 0, (1 << int(ds.BitsStored)) - 1)
    assert values.shape == (REDUCED, REDUCED)
    return {"repo": repo, "j2k": j2k, "ds": ds, "reduced_values": values}


@pytest.fixture(scope="module")
def daemon(material):
    d = Daemon(repository=material["repo"])
    yield d
    if d.proc.poll() is None:
        d.proc.kill()


def classify(daemon, stubs, data: bytes, tasks: list[str]):
    pb, pb_grpc = stubs
    with grpc.insecure_channel(daemon.addr) as channel:
        return pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(tasks=tasks, dicom=data), timeout=120)


def probabilities(result) -> np.ndarray:
    return np.array([s.probability for s in result.scores])


def test_an_opted_in_task_decodes_at_the_coarsest_level_it_needs(daemon, stubs, material):
    response = classify(daemon, stubs, material["j2k"].read_bytes(), ["dr-grade-reduced@1"])
    info = response.input
    assert (info.width, info.height) == (FULL, FULL)
    assert (info.decoded_width, info.decoded_height) == (REDUCED, REDUCED)
    task = ref.load_task("dr-grade@1", material["repo"])
    display = ref.display(material["ds"], material["reduced_values"])
    want = np.array(ref.classify(display, task)["probabilities"])
    got = probabilities(response.results[0])
    assert np.abs(got - want).max() <= TOLERANCE, f"fptserve {got} vs OpenJPEG -r {LEVELS_DOWN} + reference {want}"


def test_tasks_that_did_not_opt_in_are_unaffected_and_a_mixed_call_decodes_fully(daemon, stubs, material):
    data = material["j2k"].read_bytes()
    alone = classify(daemon, stubs, data, ["dr-grade@1"])
    assert (alone.input.decoded_width, alone.input.decoded_height) == (FULL, FULL)
    # the full-resolution reference: pydicom's own decode of the whole frame
    task = ref.load_task("dr-grade@1", material["repo"])
    want_full = np.array(ref.classify(ref.reference_display(material["j2k"]), task)["probabilities"])
    assert np.abs(probabilities(alone.results[0]) - want_full).max() <= TOLERANCE

    mixed = classify(daemon, stubs, data, ["dr-grade-reduced@1", "dr-grade@1"])
    assert (mixed.input.decoded_width, mixed.input.decoded_height) == (FULL, FULL)
    # one full decode serves both: the opted-in copy now answers exactly as the original
    reduced_in_mixed, full_in_mixed = (probabilities(r) for r in mixed.results)
    assert np.array_equal(full_in_mixed, probabilities(alone.results[0]))
    assert np.array_equal(reduced_in_mixed, full_in_mixed)


def test_images_and_full_only_syntaxes_ignore_the_opt_in(daemon, stubs, material):
    native = Path(_file("RG3_UNCI.dcm").path).read_bytes()
    response = classify(daemon, stubs, native, ["dr-grade-reduced@1"])
    assert (response.input.decoded_width, response.input.decoded_height) == (FULL, FULL)


def test_a_truncated_codestream_on_the_reduced_path_is_invalid_and_the_next_call_is_served(
    daemon, stubs, material, tmp_path
):
    ds = pydicom.dcmread(material["j2k"])
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 3]])
    cut = tmp_path / "cut.dcm"
    ds.save_as(cut)
    with pytest.raises(grpc.RpcError) as e:
        classify(daemon, stubs, cut.read_bytes(), ["dr-grade-reduced@1"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "JPEG 2000" in e.value.details()
    response = classify(daemon, stubs, material["j2k"].read_bytes(), ["dr-grade-reduced@1"])
    assert response.input.decoded_width == REDUCED
