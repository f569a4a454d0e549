"""`train`: an image folder in, a served adapter out (PIL decoder here; tests/python/test_train.py
runs the daemon's decoder and the daemon itself).

Expected values come from independent references: the authors' PIL pipeline (preprocess.py),
backbone.onnx recomputed here, a float64 PyTorch model that does not use ONNX Runtime, and
metric definitions written out directly."""

import copy
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fptserve_models import cli
from fptserve_models.config import TINY_BACKBONE
from fptserve_models.data import scan_dataset, sniff
from fptserve_models.export import ort_session
from fptserve_models.metrics import binary_auc, evaluate, macro_auc, quadratic_weighted_kappa
from fptserve_models.model import SELECTION_MARGIN, selection_margin
from fptserve_models.preprocess import load_rgb, preprocess, resize_u8
from fptserve_models.synthetic import CLASSES, write_dataset
from fptserve_models.train import TrainError, TrainOptions, train

# float32 implementations (ONNX Runtime, PyTorch) land within a few ulps of exact on logits
# of order 10 (models/README.md, Tolerances): 1e-4 holds on any CPU and thread count.
TOL = 1e-4


def tree(folder: Path) -> dict:
    """Every file under folder with its sha256, and every folder (to see new empty ones)."""
    if not folder.exists():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def backbone_dir(tiny_repo):
    return tiny_repo / "backbones" / "tiny"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root / "data", per_class=40, seed=1)
    write_dataset(root / "heldout", per_class=10, seed=2)
    return root


def options(backbone_dir, data, out, **kw):
    base = dict(backbone=backbone_dir, data=data, task="synth", version="1", out=out, epochs=15, batch_size=8,
                lr=1e-3, side_preset="tiny", decoder="pil", progress=False, preload_batch_size=1, threads=1)
    base.update(kw)
    return TrainOptions(**base)


@pytest.fixture(scope="module")
def trained(backbone_dir, synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained-repo")
    shutil.copytree(backbone_dir, out / "backbones" / "tiny")
    work = tmp_path_factory.mktemp("trained-work")
    result = train(options(backbone_dir, synth / "data", out, work_dir=work))
    return result, out, work


def float64_reference(backbone, side, x, y):
    """Probabilities of the whole PyTorch model in float64 (no ONNX Runtime) and the top-k
    selection margin of each image."""
    b64, s64 = copy.deepcopy(backbone).double(), copy.deepcopy(side).double()
    with torch.no_grad():
        details = b64.run(torch.from_numpy(x).double(), details=True)
        logits = s64(torch.from_numpy(y).double(), details.key_states, details.value_states)
    margins = [selection_margin(details.importance[i], TINY_BACKBONE.top_k) for i in range(len(x))]
    return torch.softmax(logits, -1).numpy(), margins


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_trained_adapter_learns_and_runs_as_trained(trained, synth, backbone_dir, tiny_backbone):
    result, out, _ = trained
    manifest = json.loads((out / "tasks" / "synth" / "1" / "manifest.json").read_text())
    assert manifest["training"]["best"]["val_accuracy"] >= 0.9
    assert manifest["classes"] == list(CLASSES)
    # held-out images, preprocessed by the authors' PIL pipeline, through the two ONNX files
    files = sorted((synth / "heldout").rglob("*.png"))
    labels = np.array([CLASSES.index(p.parent.name) for p in files])
    pre = manifest["preprocessing"]
    xs, ys = zip(*(preprocess(load_rgb(p), pre["backbone_size"], pre["side_size"], pre["mean"], pre["std"]) for p in files))
    x, y = np.stack(xs), np.stack(ys)
    k, v = ort_session(backbone_dir / "backbone.onnx").run(["key_states", "value_states"], {"pixel_values": x})
    (logits,) = ort_session(out / "tasks" / "synth" / "1" / "side.onnx").run(
        ["logits"], {"side_pixel_values": y, "key_states": k, "value_states": v})
    assert (logits.argmax(1) == labels).mean() >= 0.9
    # the trained PyTorch model on the same K/V
    with torch.no_grad():
        torch_logits = result.model(torch.from_numpy(y), torch.from_numpy(k), torch.from_numpy(v)).numpy()
    assert np.abs(logits - torch_logits).max() <= TOL
    # the whole model in float64 PyTorch (independent of ONNX Runtime), on every image whose
    # token selection is clear of float32 rounding
    probs64, margins = float64_reference(tiny_backbone, result.model, x, y)
    clear = np.array(margins) >= SELECTION_MARGIN
    assert clear.sum() >= 0.8 * len(files), f"too few images clear of top-k ties: {clear.sum()}/{len(files)}"
    assert np.abs(softmax(logits)[clear] - probs64[clear]).max() <= TOL


def test_manifest_records_what_was_trained(trained, backbone_dir, synth):
    result, out, _ = trained
    folder = out / "tasks" / "synth" / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "side.onnx"]
    assert sorted(p.name for p in (out / "tasks" / "synth").iterdir()) == ["1"]  # no temporary folder left
    m = json.loads((folder / "manifest.json").read_text())
    bm = json.loads((backbone_dir / "manifest.json").read_text())
    assert m["format"] == "fptserve.adapter/v1" and m["task"] == "synth" and m["version"] == "1"
    assert m["backbone"] == {"name": "tiny", "sha256": bm["sha256"]}
    assert m["sha256"] == hashlib.sha256((folder / "side.onnx").read_bytes()).hexdigest()
    assert m["preprocessing"]["backbone_size"] == [64, 64] and m["preprocessing"]["side_size"] == [32, 32]
    assert m["preprocessing"]["dicom"] == {"voi": "auto"}
    t = m["training"]
    assert t["preload"]["backbone"]["sha256"] == bm["sha256"]
    assert t["data"]["images"] == {"train": {c: 32 for c in CLASSES}, "val": {c: 8 for c in CLASSES}}
    assert t["data"]["sha256"] == m["provenance"]["training_data_sha256"] == result.dataset.digest
    assert t["seed"] == 0 and t["epochs_run"] == len(t["history"]) and 1 <= t["best_epoch"] <= t["epochs_run"]
    assert t["preload"]["kv_cache_dtype"] == "float16"
    assert t["preload"]["kv_bytes_per_image"] == 2 * 3 * 4 * 13 * 8 * 2
    assert t["memory"]["peak_rss_bytes"] > 0
    assert t["served_check"]["max_abs_diff"] <= TOL and t["served_check"]["images"] == 24
    assert m["parity"]["images"]["max_abs_diff"] <= TOL
    # mean/std: population statistics of the training images at the backbone size, from PIL
    train_files = [e.path for e in result.dataset.entries if e.split == "train"]
    pixels = np.stack([resize_u8(load_rgb(p), (64, 64)) for p in train_files]).reshape(-1, 3).astype(np.float64) / 255
    assert m["preprocessing"]["mean"] == pytest.approx(pixels.mean(0), abs=1e-6)
    assert m["preprocessing"]["std"] == pytest.approx(pixels.std(0), abs=1e-6)
    assert "epoch" in result.summary and "best epoch" in result.summary


def test_kv_cache_holds_backbone_onnx_output(trained, backbone_dir):
    """The preloaded K/V are backbone.onnx's output for the served pixels of each file (float16
    cache: the float32 output rounded once)."""
    result, out, work = trained
    from fptserve_models.data import KVCache

    kv = KVCache(result.kv_cache, json.loads((result.kv_cache / "meta.json").read_text()))
    m = result.manifest
    session = ort_session(backbone_dir / "backbone.onnx")
    for i in (0, 40, len(result.dataset.entries) - 1):
        entry = result.dataset.entries[i]
        x, _ = preprocess(load_rgb(entry.path), [64, 64], [32, 32], m["preprocessing"]["mean"], m["preprocessing"]["std"])
        k, v = session.run(["key_states", "value_states"], {"pixel_values": x[None]})
        ck, cv = kv.read([i])
        assert ck.dtype == np.float16
        assert np.array_equal(ck, k.astype(np.float16)) and np.array_equal(cv, v.astype(np.float16))
    kv.close()


def test_interrupted_run_leaves_nothing_and_resumes_to_the_same_model(backbone_dir, synth, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    before = tree(out)

    def stop_after_2(stage, info):
        if stage == "epoch_end" and info["epoch"] == 2:
            raise KeyboardInterrupt

    kw = dict(epochs=4, patience=0)
    with pytest.raises(KeyboardInterrupt):
        train(options(backbone_dir, synth / "data", out, work_dir=tmp_path / "a", **kw), hook=stop_after_2)
    assert tree(out) == before
    resumed = train(options(backbone_dir, synth / "data", out, work_dir=tmp_path / "a", resume=True, **kw))
    straight = train(options(backbone_dir, synth / "data", out, version="2", work_dir=tmp_path / "b", **kw))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming changed the result"
    assert (out / "tasks/synth/1/side.onnx").read_bytes() == (out / "tasks/synth/2/side.onnx").read_bytes()

    # a resume with other settings is refused, naming them
    with pytest.raises(TrainError, match="lr"):
        train(options(backbone_dir, synth / "data", out, version="3", work_dir=tmp_path / "a", resume=True,
                      lr=5e-4, **kw))


def test_interrupt_while_exporting_leaves_no_version_folder(backbone_dir, synth, tmp_path):
    out = tmp_path / "new-repo"  # does not exist yet: the run creates nothing that stays

    def stop(stage, info):
        if stage == "exported":
            assert (info["folder"] / "side.onnx").is_file()  # written, not yet moved into place
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(options(backbone_dir, synth / "data", out, epochs=1), hook=stop)
    assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_command_line_interrupt_writes_nothing_and_resume_finishes(sig, backbone_dir, synth, tmp_path):
    """Ctrl-C (or SIGTERM) of the command: exit 130, nothing in the repository; --resume (same
    settings) then finishes the run from its last epoch."""
    out, work = tmp_path / "repo", tmp_path / "work"
    argv = [sys.executable, "-m", "fptserve_models", "train", "--backbone", str(backbone_dir), "--data",
            str(synth / "data"), "--task", "synth", "--version", "1", "--out", str(out), "--side-preset", "tiny",
            "--epochs", "40", "--patience", "0", "--batch-size", "32", "--decoder", "pil", "--threads", "1",
            "--work-dir", str(work), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (work / "checkpoint.pt").exists():  # an epoch has finished: training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"interrupted: nothing was written to {out}" in err
    assert not out.exists()
    done = torch.load(work / "checkpoint.pt", weights_only=True)["epochs_done"]
    assert done < 40
    if sig == signal.SIGTERM:
        return
    finished = subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr
    manifest = json.loads((out / "tasks" / "synth" / "1" / "manifest.json").read_text())
    assert [h["epoch"] for h in manifest["training"]["history"]] == list(range(1, 41))


def bad(kind, root: Path, backbone_dir: Path):
    """Builds one bad input; returns (argv overrides, text the error must contain)."""
    data = root / "data"
    if kind == "empty class folder":
        write_dataset(data, 3, 0)
        shutil.rmtree(data / "spot")
        (data / "spot").mkdir()
        return {}, str(data / "spot")
    if kind == "single class":
        write_dataset(data, 3, 0)
        shutil.rmtree(data / "spot")
        shutil.rmtree(data / "vertical")
        return {}, "only one class folder (horizontal/)"
    if kind == "non-image file":
        write_dataset(data, 3, 0)
        (data / "spot" / "notes.txt").write_text("not an image")
        return {}, f"{data / 'spot' / 'notes.txt'}: not a PNG, JPEG, TIFF or DICOM"
    if kind == "unreadable image":
        write_dataset(data, 3, 0)
        good = (data / "spot" / "spot-000.png").read_bytes()
        (data / "spot" / "spot-001.png").write_bytes(good[:60])  # PNG signature, truncated
        return {}, str(data / "spot" / "spot-001.png")
    if kind == "DICOM without the daemon's decoder":
        write_dataset(data, 3, 0)
        (data / "spot" / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
        return {}, f"{data / 'spot' / 'x.dcm'}: DICOM files are decoded by the daemon's own decoder"
    if kind == "backbone folder without a manifest":
        write_dataset(data, 3, 0)
        fake = root / "not-a-backbone"
        fake.mkdir()
        (fake / "backbone.onnx").write_bytes((backbone_dir / "backbone.onnx").read_bytes())
        return {"--backbone": str(fake)}, str(fake / "manifest.json")
    if kind == "one image in a class":
        write_dataset(data, 3, 0)
        for p in sorted((data / "spot").iterdir())[1:]:
            p.unlink()
        return {}, f"{data / 'spot'} has 1 image"
    if kind == "train without val":
        write_dataset(data / "train", 3, 0)
        return {}, "has train/ but no val/"
    if kind == "existing version":
        write_dataset(data, 3, 0)
        return {}, "already exists"
    raise AssertionError(kind)


BAD = ["empty class folder", "single class", "non-image file", "unreadable image", "DICOM without the daemon's decoder",
       "backbone folder without a manifest", "one image in a class", "train without val", "existing version"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_named_and_the_repository_is_unchanged(kind, backbone_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(backbone_dir, repo / "backbones" / "tiny")
    (repo / "tasks" / "other" / "1").mkdir(parents=True)
    (repo / "tasks" / "other" / "1" / "manifest.json").write_text("{}\n")
    if kind == "existing version":
        (repo / "tasks" / "synth" / "1").mkdir(parents=True)
    overrides, expected = bad(kind, tmp_path, backbone_dir)
    before = tree(repo)
    args = {"--backbone": str(backbone_dir), "--data": str(tmp_path / "data"), "--task": "synth", "--version": "1",
            "--out": str(repo), "--side-preset": "tiny", "--epochs": "1", "--decoder": "pil", "--quiet": None,
            **overrides}
    argv = ["train"] + [x for k, v in args.items() for x in ([k] if v is None else [k, v])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert tree(repo) == before


def test_scan_splits_by_seed_and_class_and_digests_the_bytes(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 10, 0)
    (data / ".hidden").mkdir()
    (data / "spot" / ".DS_Store").write_bytes(b"junk")
    a, b, c = scan_dataset(data, 0.2, 0), scan_dataset(data, 0.2, 0), scan_dataset(data, 0.2, 1)
    assert a.classes == list(CLASSES) and a.layout == "class-folders"
    assert [e.rel for e in a.entries] == [e.rel for e in b.entries] and a.digest == b.digest
    assert a.counts() == {"train": {k: 8 for k in CLASSES}, "val": {k: 2 for k in CLASSES}}
    assert {e.rel for e in a.entries if e.split == "val"} != {e.rel for e in c.entries if e.split == "val"}
    assert len(a.entries) == 30 and not any(".DS_Store" in e.rel for e in a.entries)
    # labels are the sorted folder order
    assert all(e.label == CLASSES.index(e.cls) for e in a.entries)
    # changing one file's bytes changes the digest
    p = data / "spot" / "spot-003.png"
    p.write_bytes(p.read_bytes() + b"\0")
    assert scan_dataset(data, 0.2, 0).digest != a.digest

    split = tmp_path / "split"
    write_dataset(split / "train", 4, 0)
    write_dataset(split / "val", 2, 1)
    (split / "test").mkdir()
    d = scan_dataset(split, 0.2, 0)
    assert d.layout == "train-val-folders" and d.counts()["val"] == {k: 2 for k in CLASSES}
    assert all(e.rel.startswith(e.split + "/") for e in d.entries)


def test_sniff_tells_kinds_by_content():
    assert sniff(b"\x89PNG\r\n\x1a\n" + b"\0" * 124) == "png"
    assert sniff(b"\xff\xd8\xff\xe0" + b"\0" * 128) == "jpeg"
    assert sniff(b"II*\x00" + b"\0" * 128) == "tiff" and sniff(b"MM\x00*" + b"\0" * 128) == "tiff"
    assert sniff(b"\0" * 128 + b"DICM") == "dicom" and sniff(b"DICM" + b"\0" * 128) == "dicom"
    assert sniff(b"hello world" + b"\0" * 121) is None


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    scores = np.round(rng.random((200, 3)), 1)  # rounded: many ties
    # AUC = P(positive ranked above negative) + P(tie) / 2, over all pairs
    for c in range(3):
        pos, neg = scores[labels == c, c], scores[labels != c, c]
        pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
        assert binary_auc(labels == c, scores[:, c]) == pytest.approx(pairs, abs=1e-12)
    expected = np.mean([binary_auc(labels == c, scores[:, c]) for c in range(3)])
    assert macro_auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(binary_auc(np.ones(4, bool), np.arange(4.0)))
    # quadratic-weighted kappa, worked by hand: truth [0,0,1,2], predicted [0,1,1,0], C = 3,
    # W = (i-j)^2/4. O has ones at (0,0),(0,1),(1,1),(2,0): sum W*O = 0 + 0.25 + 0 + 1 = 1.25.
    # Rows (2,1,1), columns (2,2,0), E = row x column / 4: sum W*E =
    # (W01*2*2 + W10*1*2 + W20*1*2 + W21*1*2) / 4 = (1 + 0.5 + 2 + 0.5) / 4 = 1.0, kappa = 1 - 1.25
    assert quadratic_weighted_kappa([0, 0, 1, 2], [0, 1, 1, 0], 3) == pytest.approx(-0.25, abs=1e-12)
    assert quadratic_weighted_kappa([0, 1, 2, 2], [0, 1, 2, 2], 3) == 1.0
    result = evaluate(np.array([0, 1]), np.array([[2.0, 0.0], [0.0, 1.0]]))
    p0, p1 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))
    assert result["loss"] == pytest.approx(-(math.log(p0) + math.log(p1)) / 2, abs=1e-12)
    assert result["accuracy"] == 1.0 and result["auc"] == 1.0
