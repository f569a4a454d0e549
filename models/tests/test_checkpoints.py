"""Authors'-style side checkpoints (keys exactly as DESIGN.md lists them) and bad inputs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fptserve_models.config import TINY_BACKBONE, TINY_SIDE
from fptserve_models.export import ExportError, export_adapter, ort_session
from fptserve_models.model import SideNetwork
from fptserve_models.weights import CheckpointMismatch, load_hf_backbone, load_side_checkpoint, random_side

MODELS = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def authors_state_dict(hidden_b=32, layers_used=3, prompts=4, side=24, mlp=96, patch=8, image=32, side_layers=3, classes=5, seed=0):
    """Build the checkpoint from the key names the authors' training code saves (written out
    here, not taken from our model), with random tensors of the right shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    n = (image // patch) ** 2 + 1
    sd = {
        "fusion_module.prompts": r(layers_used, 1, prompts, hidden_b),
        "fusion_module.layer_norm.weight": 1 + r(hidden_b),
        "fusion_module.layer_norm.bias": r(hidden_b),
        "fusion_module.out_proj.weight": r(side, hidden_b),
        "fusion_module.out_proj.bias": r(side),
        "side_encoder.vit.embeddings.cls_token": r(1, 1, side),
        "side_encoder.vit.embeddings.position_embeddings": r(1, n, side),
        "side_encoder.vit.embeddings.patch_embeddings.projection.weight": r(side, 3, patch, patch),
        "side_encoder.vit.embeddings.patch_embeddings.projection.bias": r(side),
    }
    for i in range(side_layers):
        p = f"side_encoder.vit.encoder.layer.{i}."
        for lin, (o, i_) in {
            "attention.attention.query": (side, side), "attention.attention.key": (side, side),
            "attention.attention.value": (side, side), "attention.output.dense": (side, side),
            "intermediate.dense": (mlp, side), "output.dense": (side, mlp),
        }.items():
            sd[p + lin + ".weight"] = r(o, i_)
            sd[p + lin + ".bias"] = r(o)
        for ln in ("layernorm_before", "layernorm_after"):
            sd[p + ln + ".weight"] = 1 + r(side)
            sd[p + ln + ".bias"] = r(side)
    sd["side_encoder.vit.layernorm.weight"] = 1 + r(side)
    sd["side_encoder.vit.layernorm.bias"] = r(side)
    sd["side_encoder.classifier.weight"] = r(classes, side) * 5
    sd["side_encoder.classifier.bias"] = r(classes)
    return sd


CLASSES = ["a", "b", "c", "d", "e"]


def numpy_side_reference(sd, y, k, v, backbone_heads, side_heads):
    """Independent float64 NumPy forward of fusion module + side ViT, written from the paper's
    description and driven only by the checkpoint's key names."""
    sd = {name: t.double().numpy() for name, t in sd.items()}
    erf = np.vectorize(math.erf)

    def ln(x, name, eps):
        m = x.mean(-1, keepdims=True)
        var = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def softmax(s):
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    k, v, y = k.astype(np.float64), v.astype(np.float64), y.astype(np.float64)
    batch = y.shape[0]
    prompts = sd["fusion_module.prompts"]  # [L, 1, P, D]
    num_layers, _, num_prompts, dim = prompts.shape
    hd = dim // backbone_heads
    fused = []
    for l in range(num_layers):
        p = prompts[l, 0]
        q = ln(p, "fusion_module.layer_norm", 1e-5).reshape(num_prompts, backbone_heads, hd).transpose(1, 0, 2)
        att = softmax(q[None] @ k[:, l].transpose(0, 1, 3, 2) / math.sqrt(hd)) @ v[:, l]  # [B, h, P, d]
        ctx = att.transpose(0, 2, 1, 3).reshape(batch, num_prompts, dim)
        fused.append(lin(ctx + p[None], "fusion_module.out_proj"))  # residual with the RAW prompts

    pre = "side_encoder.vit."
    w = sd[pre + "embeddings.patch_embeddings.projection.weight"]
    width, ch, ps, _ = w.shape
    g = y.shape[2] // ps
    patches = y.reshape(batch, ch, g, ps, g, ps).transpose(0, 2, 4, 1, 3, 5).reshape(batch, g * g, ch * ps * ps)
    x = patches @ w.reshape(width, -1).T + sd[pre + "embeddings.patch_embeddings.projection.bias"]
    cls = np.broadcast_to(sd[pre + "embeddings.cls_token"], (batch, 1, width))
    x = np.concatenate([cls, x], 1) + sd[pre + "embeddings.position_embeddings"]
    sh = width // side_heads
    for i in range(num_layers):
        lp = f"{pre}encoder.layer.{i}."
        x = np.concatenate([x, fused[i]], 1)
        n = x.shape[1]
        h = ln(x, lp + "layernorm_before", 1e-12)
        split = lambda t: t.reshape(batch, n, side_heads, sh).transpose(0, 2, 1, 3)
        q, kk, vv = (split(lin(h, lp + "attention.attention." + m)) for m in ("query", "key", "value"))
        att = (softmax(q @ kk.transpose(0, 1, 3, 2) / math.sqrt(sh)) @ vv).transpose(0, 2, 1, 3).reshape(batch, n, width)
        x = x + lin(att, lp + "attention.output.dense")
        m = lin(ln(x, lp + "layernorm_after", 1e-12), lp + "intermediate.dense")
        x = x + lin(0.5 * m * (1 + erf(m / math.sqrt(2))), lp + "output.dense")
        x = x[:, :-num_prompts]
    x = ln(x, pre + "layernorm", 1e-12)
    return lin(x[:, 0], "side_encoder.classifier")


def test_authors_checkpoint_loads_as_is_and_reproduces_logits(tmp_path, tiny_repo, tiny_backbone):
    sd = authors_state_dict()
    path = tmp_path / "best_validation_weights.pt"
    torch.save(sd, path)
    side = load_side_checkpoint(path, TINY_BACKBONE, TINY_SIDE, CLASSES)
    loaded = side.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k

    man = export_adapter(tiny_repo, "tiny", "ckpt-task", "1", CLASSES, side, tiny_backbone, MEAN, STD,
                         path.name, __import__("fptserve_models.weights", fromlist=["x"]).sha256_file(path))
    assert man["provenance"]["checkpoint"] == "best_validation_weights.pt"
    assert len(man["provenance"]["checkpoint_sha256"]) == 64

    # logits of the exported side.onnx on K/V from backbone.onnx == a fresh PyTorch model
    # that got the raw checkpoint through torch's own strict load_state_dict
    fresh = SideNetwork(TINY_BACKBONE, TINY_SIDE)
    torch.nn.Module.load_state_dict(fresh, sd, strict=True)
    fresh.eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    k, v = ort_session(tiny_repo / "backbones" / "tiny" / "backbone.onnx").run(["key_states", "value_states"], {"pixel_values": x.numpy()})
    (got,) = ort_session(tiny_repo / "tasks" / "ckpt-task" / "1" / "side.onnx").run(
        ["logits"], {"side_pixel_values": y.numpy(), "key_states": k, "value_states": v})
    with torch.no_grad():
        want = fresh(y, torch.from_numpy(k), torch.from_numpy(v)).numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert got.std() > 0.1
    # and an independent NumPy implementation of the FPT+ side path agrees
    ref = numpy_side_reference(sd, y.numpy(), k, v, TINY_BACKBONE.num_heads, TINY_SIDE.num_heads)
    assert np.abs(got - ref).max() <= 1e-4


def test_wrong_keys_give_one_message_listing_all(tmp_path):
    sd = authors_state_dict()
    sd["fusion_module.proj.weight"] = sd.pop("fusion_module.out_proj.weight")  # renamed
    del sd["side_encoder.vit.layernorm.bias"]  # missing
    sd["side_encoder.vit.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(50, 24)  # mis-shaped
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatch) as e:
        load_side_checkpoint(tmp_path / "bad.pt", TINY_BACKBONE, TINY_SIDE, CLASSES)
    msg = str(e.value)
    assert "missing keys (2)" in msg and "fusion_module.out_proj.weight" in msg and "side_encoder.vit.layernorm.bias" in msg
    assert "unexpected keys (1)" in msg and "fusion_module.proj.weight" in msg
    assert "mis-shaped keys (1)" in msg
    assert "side_encoder.vit.encoder.layer.0.intermediate.dense.weight: checkpoint [50, 24], expected [96, 24]" in msg


def test_wrong_class_count(tmp_path):
    torch.save(authors_state_dict(classes=5), tmp_path / "c.pt")
    with pytest.raises(CheckpointMismatch) as e:
        load_side_checkpoint(tmp_path / "c.pt", TINY_BACKBONE, TINY_SIDE, ["normal", "pneumonia", "covid-19"])
    msg = str(e.value)
    assert "5 output classes" in msg and "3 class names" in msg and "covid-19" in msg


def test_classes_given_do_not_fit_side_network(tiny_repo, tiny_backbone):
    side = random_side(TINY_BACKBONE, TINY_SIDE, 3)  # 5 outputs
    with pytest.raises(ExportError, match=r"2 class names given .* the side network has 5 outputs"):
        export_adapter(tiny_repo, "tiny", "x", "1", ["a", "b"], side, tiny_backbone, MEAN, STD, "r", None)
    with pytest.raises(ExportError, match="unique"):
        export_adapter(tiny_repo, "tiny", "x", "1", ["a", "a", "b", "c", "d"], side, tiny_backbone, MEAN, STD, "r", None)


def test_side_checkpoint_for_other_width(tmp_path):
    torch.save(authors_state_dict(side=64, mlp=256), tmp_path / "w.pt")
    with pytest.raises(CheckpointMismatch) as e:
        load_side_checkpoint(tmp_path / "w.pt", TINY_BACKBONE, TINY_SIDE, CLASSES)
    msg = str(e.value)
    assert "mis-shaped keys (" in msg and "side_encoder.vit.embeddings.cls_token: checkpoint [1, 1, 64], expected [1, 1, 24]" in msg
    assert "width 64, not 24" in msg
    assert "missing keys: none" in msg and "unexpected keys: none" in msg


def test_side_checkpoint_for_other_backbone(tmp_path):
    torch.save(authors_state_dict(hidden_b=48), tmp_path / "b.pt")
    with pytest.raises(CheckpointMismatch, match="backbone of hidden size 48, not 32"):
        load_side_checkpoint(tmp_path / "b.pt", TINY_BACKBONE, TINY_SIDE, CLASSES)


def test_hf_folder_with_missing_weight(tmp_path):
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128,
                    image_size=48, patch_size=8)
    model = ViTModel(cfg, add_pooling_layer=False)
    model.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.layer.2.output.dense.bias"}
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match=r"missing keys \(1\):\n    encoder.layer.2.output.dense.bias"):
        load_hf_backbone(tmp_path, image_size=64, layers_used=(3, 4, 5))


def run_cli(*args):
    env = dict(__import__("os").environ, PYTHONPATH=str(MODELS / "src"))
    return subprocess.run([sys.executable, "-m", "fptserve_models", *map(str, args)], capture_output=True, text=True, env=env)


def test_cli_help():
    for sub in ("export-backbone", "export-adapter", "demo", "full"):
        r = run_cli(sub, "--help")
        assert r.returncode == 0 and "usage" in r.stdout, sub


def test_cli_export_with_checkpoint_and_errors(tmp_path):
    repo = tmp_path / "repo"
    r = run_cli("export-backbone", "--out", repo, "--name", "tiny", "--preset", "tiny", "--seed", "0")
    assert r.returncode == 0, r.stderr
    torch.save(authors_state_dict(classes=3), tmp_path / "best_validation_weights.pt")
    (tmp_path / "classes.txt").write_text("normal\npneumonia\ncovid-19\n")
    common = ["--out", repo, "--backbone", "tiny", "--task", "chest-xray", "--mean", "0.5,0.5,0.5",
              "--std", "0.25,0.25,0.25", "--side-preset", "tiny", "--checkpoint", tmp_path / "best_validation_weights.pt"]
    r = run_cli("export-adapter", *common, "--version", "7", "--classes-file", tmp_path / "classes.txt")
    assert r.returncode == 0, r.stderr
    man = json.loads((repo / "tasks" / "chest-xray" / "7" / "manifest.json").read_text())
    assert man["classes"] == ["normal", "pneumonia", "covid-19"] and man["version"] == "7"
    assert man["provenance"]["checkpoint"] == "best_validation_weights.pt"
    r = run_cli("export-adapter", *common, "--version", "8", "--classes", "normal,pneumonia")
    assert r.returncode == 2 and "3 output classes" in r.stderr and "2 class names" in r.stderr
    assert not (repo / "tasks" / "chest-xray" / "8").exists()
