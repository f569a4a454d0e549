"""Issue 17: `python -m fptserve_models train` against the real daemon.

A synthetic image folder trains an adapter on the tiny demo backbone; the daemon, given the
new version through the admin API (or finding it through repository watch), answers held-out
images with the trained PyTorch model's probabilities. DICOM training files in several
transfer syntaxes, carrying a window, are decoded by the daemon's own decoder: the preloaded
K/V equal backbone.onnx on the daemon's pixels for the same file, and the daemon serving the
adapter answers those files with the PyTorch probabilities.

References are independent of the code under test: the whole PyTorch model in float64 (no
ONNX Runtime), pydicom's decode with the pixel policy written out in dicom_reference.py,
protoc-generated admin messages.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
import torch
from grpc_tools import protoc
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "models" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicom_reference as ref  # noqa: E402
from test_daemon import BINARY, Daemon  # noqa: E402

from fptserve_models import cli, publish  # noqa: E402
from fptserve_models.config import TINY_BACKBONE  # noqa: E402
from fptserve_models.data import KVCache  # noqa: E402
from fptserve_models.export import ort_session  # noqa: E402
from fptserve_models.model import SELECTION_MARGIN, selection_margin  # noqa: E402
from fptserve_models.preprocess import load_rgb, normalize, preprocess, resize_u8  # noqa: E402
from fptserve_models.synthetic import CLASSES, make_image, write_dataset  # noqa: E402
from fptserve_models.train import TrainOptions, train  # noqa: E402
from fptserve_models.weights import random_backbone  # noqa: E402

DEMO_BACKBONE = ROOT / "models" / "demo" / "backbones" / "vit-tiny-demo"
DEMO_SEED = 0  # models/demo's backbone is random_backbone(TINY_BACKBONE, 0) (its manifest says so)
# float32 implementations against the float64 model: a few ulps of logits of order 10
# (models/README.md, Tolerances), so 1e-4 holds on any CPU and thread count.
TOL = 1e-4
TOKEN = "train-test-admin-token"


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-stubs")
    rc = protoc.main([
        "protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}",
        str(ROOT / "proto" / "fptserve" / "v1" / "classifier.proto"),
        str(ROOT / "proto" / "fptserve" / "v1" / "admin.proto"),
    ])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    from fptserve.v1 import admin_pb2, admin_pb2_grpc, classifier_pb2, classifier_pb2_grpc
    return classifier_pb2, classifier_pb2_grpc, admin_pb2, admin_pb2_grpc


@pytest.fixture(scope="module")
def pytorch_backbone():
    manifest = json.loads((DEMO_BACKBONE / "manifest.json").read_text())
    assert manifest["provenance"]["seed"] == DEMO_SEED and manifest["source_weights"] == f"random-init(seed={DEMO_SEED})"
    return random_backbone(TINY_BACKBONE, DEMO_SEED)


def new_repository(tmp: Path) -> Path:
    repo = tmp / "repo"
    shutil.copytree(DEMO_BACKBONE, repo / "backbones" / DEMO_BACKBONE.name)
    return repo


def options(repo: Path, data: Path, task: str, version: str, **kw) -> TrainOptions:
    base = dict(backbone=repo / "backbones" / DEMO_BACKBONE.name, data=data, task=task, version=version, out=repo,
                epochs=15, batch_size=8, lr=1e-3, side_preset="tiny", decoder="fptserve", fptserve_bin=BINARY,
                progress=False, threads=1)
    base.update(kw)
    return TrainOptions(**base)


def float64_probabilities(backbone, side, x: np.ndarray, y: np.ndarray):
    """The whole PyTorch model in float64 on float32 pixels, and each image's top-k margin."""
    b64, s64 = copy.deepcopy(backbone).double(), copy.deepcopy(side).double()
    with torch.no_grad():
        details = b64.run(torch.from_numpy(x).double(), details=True)
        logits = s64(torch.from_numpy(y).double(), details.key_states, details.value_states)
    margins = np.array([selection_margin(details.importance[i], TINY_BACKBONE.top_k) for i in range(len(x))])
    return torch.softmax(logits, -1).numpy(), margins


def classify(stub, pb, data: bytes, task: str, dicom: bool = False):
    kind = {"dicom": data} if dicom else {"image": data}
    return stub.Classify(pb.ClassifyRequest(tasks=[task], **kind), timeout=60).results[0]


def decode_display(path: Path, *extra: str) -> np.ndarray:
    out = path.with_suffix(".display.npy")
    proc = subprocess.run([str(BINARY), "decode", str(path), "--output", "display", "--npy", str(out), *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    arr = np.load(out)
    out.unlink()
    return arr


# --------------------------------------------------------------------------------------------
# publish into a running daemon; the daemon answers with the trained model's probabilities
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-served")
    repo = new_repository(tmp)
    token = tmp / "admin-token"
    token.write_text(TOKEN + "\n")
    write_dataset(tmp / "data", per_class=40, seed=1)
    write_dataset(tmp / "data", per_class=4, seed=5, fmt="jpg")
    write_dataset(tmp / "data", per_class=4, seed=6, fmt="tiff")
    write_dataset(tmp / "heldout", per_class=10, seed=2)
    daemon = Daemon("--admin-token-file", str(token), repository=repo)
    yield tmp, repo, token, daemon
    if daemon.proc.poll() is None:
        daemon.proc.kill()


def test_published_adapter_answers_with_the_trained_probabilities(served, stubs, pytorch_backbone):
    tmp, repo, token, daemon = served
    pb, pb_grpc, admin_pb, admin_grpc = stubs
    channel = grpc.insecure_channel(daemon.addr)
    client = pb_grpc.ClassifierStub(channel)
    files = sorted((tmp / "heldout").rglob("*.png"))
    with pytest.raises(grpc.RpcError) as err:
        classify(client, pb, files[0].read_bytes(), "synth")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # not there before training

    result = train(options(repo, tmp / "data", "synth", "1", publish=daemon.admin_addr, make_default=True,
                           admin_token_file=token))
    assert result.published["state"] == "READY" and result.published["is_default"]
    assert result.manifest["training"]["best"]["val_accuracy"] >= 0.9
    assert result.manifest["training"]["data"]["formats"] == {"jpeg": 12, "png": 120, "tiff": 12}

    # the running daemon (not restarted) answers; compare with the float64 PyTorch model
    labels = np.array([CLASSES.index(p.parent.name) for p in files])
    pre = result.manifest["preprocessing"]
    xs, ys = zip(*(preprocess(load_rgb(p), pre["backbone_size"], pre["side_size"], pre["mean"], pre["std"]) for p in files))
    expected, margins = float64_probabilities(pytorch_backbone, result.model, np.stack(xs), np.stack(ys))
    got, versions = [], set()
    for p in files:
        answer = classify(client, pb, p.read_bytes(), "synth")
        versions.add(answer.adapter_version)
        assert [s.name for s in answer.scores] == list(CLASSES)
        got.append([s.probability for s in answer.scores])
    got = np.array(got)
    assert versions == {"1"}
    assert (got.argmax(1) == labels).mean() >= 0.9
    clear = margins >= SELECTION_MARGIN  # token selection clear of float32 rounding (models/README.md)
    assert clear.sum() >= 0.8 * len(files), f"only {clear.sum()}/{len(files)} held-out images clear of top-k ties"
    assert np.abs(got[clear] - expected[clear]).max() <= TOL

    # the daemon's own view, through protoc-generated admin stubs
    admin = admin_grpc.AdminStub(grpc.insecure_channel(daemon.admin_addr))
    listed = admin.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=[("authorization", f"Bearer {TOKEN}")])
    synth = [a for a in listed.adapters if a.task == "synth"]
    assert [(a.version, a.state, a.is_default) for a in synth] == [("1", admin_pb.ADAPTER_STATE_READY, True)]
    assert synth[0].sha256 == result.manifest["sha256"]


def test_cli_trains_and_publishes_by_path(served, stubs):
    """The command line as a user runs it: a new version, published by path and made the
    default; the summary table is printed; the daemon answers with version 2."""
    tmp, repo, token, daemon = served
    pb, pb_grpc, _, _ = stubs
    summary = tmp / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fptserve_models", "train", "--backbone", str(repo / "backbones" / DEMO_BACKBONE.name),
         "--data", str(tmp / "data"), "--task", "synth", "--version", "2", "--out", str(repo),
         "--epochs", "2", "--batch-size", "8", "--side-preset", "tiny", "--threads", "1", "--fptserve", str(BINARY),
         "--publish", daemon.admin_addr, "--publish-mode", "path", "--make-default", "--admin-token-file", str(token),
         "--summary-json", str(summary)],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "models" / "src")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "val AUC" in proc.stdout and "best epoch" in proc.stdout  # the summary table
    assert "preload K/V" in proc.stderr  # progress
    s = json.loads(summary.read_text())
    assert s["published"]["state"] == "READY" and s["published"]["is_default"]
    with grpc.insecure_channel(daemon.addr) as channel:
        answer = classify(pb_grpc.ClassifierStub(channel), pb, next((tmp / "heldout").rglob("*.png")).read_bytes(), "synth")
    assert answer.adapter_version == "2"


def test_repository_watch_picks_up_a_trained_version(tmp_path, stubs):
    pb, pb_grpc, _, _ = stubs
    repo = new_repository(tmp_path)
    write_dataset(tmp_path / "data", per_class=6, seed=3)
    daemon = Daemon("--watch-interval", "1", repository=repo)
    try:
        train(options(repo, tmp_path / "data", "watched", "1", epochs=1))
        image = next((tmp_path / "data").rglob("*.png")).read_bytes()
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(daemon.addr) as channel:
            client = pb_grpc.ClassifierStub(channel)
            while True:
                try:
                    answer = classify(client, pb, image, "watched")
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline, e
                    time.sleep(0.5)
        assert answer.adapter_version == "1"
    finally:
        daemon.proc.kill()


def test_publish_over_mutual_tls_with_a_token(tmp_path):
    from test_tls import Authority  # the CA helper of the TLS tests

    ca = Authority("train test CA")
    for name, server in (("server", True), ("client", False)):
        cert, key = ca.issue(name, server)
        (tmp_path / f"{name}.pem").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)
    (tmp_path / "ca.pem").write_bytes(ca.pem())
    token = tmp_path / "admin-token"
    token.write_text(TOKEN)
    repo = new_repository(tmp_path)
    write_dataset(tmp_path / "data", per_class=6, seed=4)
    daemon = Daemon("--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
                    "--tls-client-ca", str(tmp_path / "ca.pem"), "--admin-token-file", str(token), repository=repo)
    try:
        tls = dict(tls_ca=tmp_path / "ca.pem", tls_server_name="localhost", admin_token_file=token)
        result = train(options(repo, tmp_path / "data", "secure", "1", epochs=1, publish=daemon.admin_addr,
                               tls_cert=tmp_path / "client.pem", tls_key=tmp_path / "client.key", **tls))
        assert result.published["state"] == "READY" and result.published["sha256"] == result.manifest["sha256"]
        # without the client certificate the daemon does not talk: TLS really was in use
        with pytest.raises(publish.PublishError, match="UNAVAILABLE"):
            publish.publish_adapter(publish.AdminTarget(daemon.admin_addr, token, tmp_path / "ca.pem",
                                                        tls_server_name="localhost", timeout_s=10),
                                    result.folder, "secure", "1")
    finally:
        daemon.proc.kill()


# --------------------------------------------------------------------------------------------
# DICOM: the daemon's decoder at training and at serving
# --------------------------------------------------------------------------------------------

SYNTAXES = ["explicit", "implicit", "rle", "jpeg-lossless", "jpeg-ls", "j2k", "jpeg-baseline"]


def write_dicom(path: Path, grey: np.ndarray, syntax: str, index: int) -> None:
    """A MONOCHROME2 file carrying a window: 12 bits stored (8 for the lossy JPEG), a rescale on
    some, in the given transfer syntax (pydicom writes the uncompressed ones, dcmtk / GDCM
    compress)."""
    eight = syntax == "jpeg-baseline"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{int(hashlib.sha256(path.name.encode()).hexdigest()[:24], 16)}"
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if syntax == "implicit" else ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "2.25.17001"
    ds.SeriesInstanceUID = "2.25.17002"
    ds.PatientName, ds.PatientID, ds.Modality = "Train^Test", "T17", "OT"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelRepresentation = 0
    if eight:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        values = np.round(grey * 255).astype(np.uint8)
        ds.WindowCenter, ds.WindowWidth = 120, 200
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        values = np.round(grey * 4095).astype(np.uint16)
        if index % 2:
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "US"
            ds.WindowCenter, ds.WindowWidth = 1000, 2600  # modality values run -1024..3071
        else:
            ds.WindowCenter, ds.WindowWidth = 2000, 3000
    ds.PixelData = values.tobytes()
    plain = path.with_suffix(".plain.dcm")
    ds.save_as(plain, enforce_file_format=True)
    tools = {
        "rle": ["dcmcrle", str(plain), str(path)],
        "jpeg-lossless": ["dcmcjpeg", "+e1", str(plain), str(path)],
        "jpeg-ls": ["dcmcjpls", str(plain), str(path)],
        "j2k": ["gdcmconv", "--j2k", str(plain), str(path)],
        "jpeg-baseline": ["dcmcjpeg", "+eb", str(plain), str(path)],
    }
    if syntax in tools:
        subprocess.run(tools[syntax], check=True, capture_output=True, timeout=60)
        plain.unlink()
    else:
        plain.rename(path)


def grey_pattern(kind: str, rng) -> np.ndarray:
    return make_image(kind, rng, height=72, width=88).astype(np.float64).mean(axis=2) / 255.0


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-dicom")
    rng = np.random.default_rng(7)
    n = 0
    for split, per_class in (("train", 14), ("val", 7)):
        for cls in ("horizontal", "vertical"):
            (tmp / "data" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                syntax = SYNTAXES[n % len(SYNTAXES)]
                write_dicom(tmp / "data" / split / cls / f"{cls}-{i:02d}-{syntax}.dcm", grey_pattern(cls, rng), syntax, n)
                n += 1
    repo = new_repository(tmp)
    result = train(options(repo, tmp / "data", "dicom-task", "1", epochs=10, batch_size=4, kv_cache_dtype="float32",
                           preload_batch_size=1, work_dir=tmp / "work"))
    return tmp, repo, result


def test_dicom_files_cover_the_transfer_syntaxes(dicom_run):
    tmp, _, result = dicom_run
    seen = {str(pydicom.dcmread(e.path, stop_before_pixels=True).file_meta.TransferSyntaxUID) for e in result.dataset.entries}
    assert seen == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.70",
                    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50"}
    assert result.manifest["training"]["data"]["formats"] == {"dicom": len(result.dataset.entries)}
    assert result.manifest["training"]["best"]["val_auc"] >= 0.8  # it trains (two stripe orientations)
    assert result.manifest["training"]["data"]["decoder"]["binary_sha256"] == hashlib.sha256(BINARY.read_bytes()).hexdigest()


def test_preloaded_kv_are_backbone_onnx_on_the_daemons_pixels(dicom_run):
    """For every training and validation file: the cached K/V equal, exactly, backbone.onnx
    (ONNX Runtime, batch 1, as preloaded) on the pixels `fptserve decode` renders for it; for
    the lossless files those pixels are also pydicom's, with the window applied."""
    tmp, repo, result = dicom_run
    m = result.manifest
    kv = KVCache(result.kv_cache, json.loads((result.kv_cache / "meta.json").read_text()))
    session = ort_session(repo / "backbones" / DEMO_BACKBONE.name / "backbone.onnx")
    try:
        for i, entry in enumerate(result.dataset.entries):
            rgb = decode_display(entry.path)
            if "baseline" not in entry.rel:  # lossy JPEG: decoders may differ by a grey level
                assert np.array_equal(rgb, ref.reference_display(entry.path)), entry.rel
            x = normalize(resize_u8(Image.fromarray(rgb, "RGB"), m["preprocessing"]["backbone_size"]),
                          m["preprocessing"]["mean"], m["preprocessing"]["std"])
            k, v = session.run(["key_states", "value_states"], {"pixel_values": x[None]})
            ck, cv = kv.read([i])
            assert np.array_equal(ck, k) and np.array_equal(cv, v), entry.rel
    finally:
        kv.close()


def test_daemon_answers_dicom_with_the_trained_probabilities(dicom_run, stubs, pytorch_backbone):
    tmp, repo, result = dicom_run
    pb, pb_grpc, _, _ = stubs
    m = result.manifest
    pre = m["preprocessing"]
    val = [e for e in result.dataset.entries if e.split == "val"]
    xs, ys = [], []
    for e in val:
        img = Image.fromarray(decode_display(e.path), "RGB")
        x, y = preprocess(img, pre["backbone_size"], pre["side_size"], pre["mean"], pre["std"])
        xs.append(x)
        ys.append(y)
    expected, margins = float64_probabilities(pytorch_backbone, result.model, np.stack(xs), np.stack(ys))
    daemon = Daemon(repository=repo)
    try:
        with grpc.insecure_channel(daemon.addr) as channel:
            client = pb_grpc.ClassifierStub(channel)
            got = np.array([[s.probability for s in classify(client, pb, e.path.read_bytes(), "dicom-task", dicom=True).scores]
                            for e in val])
    finally:
        daemon.proc.kill()
    clear = margins >= SELECTION_MARGIN
    assert clear.sum() >= 0.8 * len(val), f"only {clear.sum()}/{len(val)} files clear of top-k ties"
    assert np.abs(got[clear] - expected[clear]).max() <= TOL


def test_reduced_resolution_training_renders_as_the_daemon_serves(tmp_path, stubs):
    """--decode-resolution reduced: the manifest records it, training renders each J2K / JPEG
    file at the coarsest resolution at least the task's largest input (300 -> 75 for the demo
    backbone's 64), exactly as `fptserve decode --min-size 64` and the daemon decode it."""
    rng = np.random.default_rng(3)
    size, reduced = 300, 75
    for split, per_class in (("train", 4), ("val", 2)):
        for cls in ("horizontal", "vertical"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                grey = np.asarray(Image.fromarray(np.uint8(grey_pattern(cls, rng) * 255)).resize((size, size))) / 255.0
                syntax = ("j2k", "jpeg-baseline")[i % 2]
                write_dicom(tmp_path / "data" / split / cls / f"{cls}-{i}-{syntax}.dcm", grey, syntax, i)
    repo = new_repository(tmp_path)
    result = train(options(repo, tmp_path / "data", "reduced-task", "1", epochs=2, batch_size=4,
                           kv_cache_dtype="float32", work_dir=tmp_path / "work",
                           dicom={"voi": "auto", "decode_resolution": "reduced"}))
    m = result.manifest
    assert m["preprocessing"]["dicom"] == {"voi": "auto", "decode_resolution": "reduced"}
    assert m["training"]["data"]["decoder"]["min_size"] == 64
    kv = KVCache(result.kv_cache, json.loads((result.kv_cache / "meta.json").read_text()))
    session = ort_session(repo / "backbones" / DEMO_BACKBONE.name / "backbone.onnx")
    pb, pb_grpc, _, _ = stubs
    daemon = Daemon(repository=repo)
    try:
        with grpc.insecure_channel(daemon.addr) as channel:
            client = pb_grpc.ClassifierStub(channel)
            for i, entry in enumerate(result.dataset.entries):
                rgb = decode_display(entry.path, "--min-size", "64")
                assert rgb.shape == (reduced, reduced, 3), entry.rel
                x = normalize(resize_u8(Image.fromarray(rgb, "RGB"), m["preprocessing"]["backbone_size"]),
                              m["preprocessing"]["mean"], m["preprocessing"]["std"])
                k, v = session.run(["key_states", "value_states"], {"pixel_values": x[None]})
                ck, cv = kv.read([i])
                assert np.array_equal(ck, k) and np.array_equal(cv, v), entry.rel
                served = client.Classify(pb.ClassifyRequest(tasks=["reduced-task"], dicom=entry.path.read_bytes()),
                                         timeout=60)
                assert (served.input.decoded_width, served.input.decoded_height) == (reduced, reduced), entry.rel
    finally:
        kv.close()
        daemon.proc.kill()


# --------------------------------------------------------------------------------------------
# bad inputs through the daemon's decoder; the admin codec
# --------------------------------------------------------------------------------------------


def dicom_without_pixels(path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "2.25.17999"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "2.25.17999"
    ds.PatientName, ds.PatientID, ds.Modality = "No^Pixels", "T17", "OT"
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("kind", ["DICOM without pixel data", "truncated DICOM", "corrupt JPEG"])
def test_undecodable_training_file_is_named_and_nothing_is_written(kind, tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(data, 3, 0)
    if kind == "DICOM without pixel data":
        bad = data / "spot" / "no-pixels.dcm"
        dicom_without_pixels(bad)
    elif kind == "truncated DICOM":
        bad = data / "spot" / "truncated.dcm"
        write_dicom(bad, grey_pattern("spot", np.random.default_rng(0)), "explicit", 0)
        bad.write_bytes(bad.read_bytes()[:400])
    else:
        bad = data / "spot" / "broken.jpg"
        bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    repo = new_repository(tmp_path)
    before = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*"))
    code = cli.main(["train", "--backbone", str(repo / "backbones" / DEMO_BACKBONE.name), "--data", str(data),
                     "--task", "t", "--version", "1", "--out", str(repo), "--side-preset", "tiny", "--epochs", "1",
                     "--fptserve", str(BINARY), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and f"{bad}: cannot decode" in err, err
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == before


def test_admin_messages_match_protoc(stubs):
    """The hand-written admin encoding (publish.py) against protoc's for the same messages."""
    _, _, admin_pb, _ = stubs
    for fields in ({"path": "tasks/x/1"}, {"manifest_json": "{\"a\": \"é\"}", "onnx": bytes(range(256)) * 3,
                                           "make_default": True}, {"path": "p", "pin": True, "replace": True}, {}):
        assert publish.encode_load_adapter(**fields) == admin_pb.LoadAdapterRequest(**fields).SerializeToString()
    assert publish.encode_set_default("t", "2") == admin_pb.SetDefaultVersionRequest(task="t", version="2").SerializeToString()
    status = admin_pb.AdapterStatus(task="t", version="3", state=admin_pb.ADAPTER_STATE_FAILED, sha256="ab" * 32,
                                    backbone="b", backbone_sha256="cd" * 32, bytes=3_700_000, load_ms=12.5,
                                    loaded_unix_ms=1_700_000_000_000, is_default=True, error="why", path="tasks/t/3")
    got = publish.decode_load_adapter_response(admin_pb.LoadAdapterResponse(adapter=status, replaced=True).SerializeToString())
    assert got["replaced"] is True
    a = got["adapter"]
    assert (a["task"], a["version"], a["state"], a["sha256"], a["backbone"], a["backbone_sha256"], a["bytes"],
            a["load_ms"], a["is_default"], a["error"], a["path"]) == (
        "t", "3", "FAILED", "ab" * 32, "b", "cd" * 32, 3_700_000, 12.5, True, "why", "tasks/t/3")
