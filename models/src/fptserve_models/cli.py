"""Command line: python -m fptserve_models {export-backbone, export-adapter, demo, full}."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import BACKBONE_PRESETS, DEFAULT_OPSET, SIDE_PRESETS, ConfigError

# torch-heavy modules are imported inside the commands, so --help is instant

MODELS_DIR = Path(__file__).resolve().parents[2]  # models/ in a source checkout


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.replace(" ", "").split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def _classes(args) -> list[str]:
    if args.classes_file:
        names = [line.strip() for line in Path(args.classes_file).read_text().splitlines()]
        return [n for n in names if n]
    return [c.strip() for c in args.classes.split(",")]


def _backbone_overrides(args) -> dict:
    over = {}
    if args.image_size is not None:
        over["image_size"] = args.image_size
    if args.layers_used is not None:
        over["layers_used"] = tuple(_ints(args.layers_used))
    if args.token_ratio is not None:
        over["token_ratio"] = args.token_ratio
    return over


def cmd_export_backbone(args) -> None:
    from .export import export_backbone
    from .weights import load_hf_backbone, random_backbone

    over = _backbone_overrides(args)
    if args.hf_dir:
        loaded = load_hf_backbone(args.hf_dir, **over)
        model, source, seed = loaded.model, loaded.source, None
    else:
        config = BACKBONE_PRESETS[args.preset].replace(**over)
        model, source, seed = random_backbone(config, args.seed), f"random-init(seed={args.seed})", args.seed
    m = export_backbone(
        model, args.out, args.name, source, seed, fp16=args.fp16, opset=args.opset, parity_samples=args.parity_samples
    )
    print(json.dumps({"backbone": args.name, "sha256": m["sha256"], "parity": m["parity"]}, indent=2))


def cmd_export_adapter(args) -> None:
    from .export import ExportError, backbone_config_from_manifest, export_adapter, read_backbone
    from .weights import load_hf_backbone, load_side_checkpoint, random_backbone, random_side, sha256_file

    bmanifest, _ = read_backbone(args.out, args.backbone)
    bconfig = backbone_config_from_manifest(bmanifest)
    source = bmanifest["source_weights"]
    if args.hf_dir:
        backbone = load_hf_backbone(
            args.hf_dir,
            image_size=bconfig.image_size,
            layers_used=bconfig.layers_used,
            token_ratio=bconfig.token_ratio,
        ).model
    elif bmanifest["provenance"].get("seed") is not None and source.startswith("random-init"):
        backbone = random_backbone(bconfig, bmanifest["provenance"]["seed"])
    else:
        raise ExportError(
            f"backbone {args.backbone!r} was exported from {source!r}: pass --hf-dir with that folder so the "
            "parity check can run the PyTorch backbone"
        )
    classes = _classes(args)
    side_config = SIDE_PRESETS[args.side_preset]
    changes = {
        k: getattr(args, "side_" + k)
        for k in ("hidden_size", "num_layers", "num_heads", "mlp_size", "patch_size", "image_size", "num_prompts")
        if getattr(args, "side_" + k) is not None
    }
    side_config = side_config.replace(num_classes=len(classes), **changes)
    if args.checkpoint:
        side = load_side_checkpoint(args.checkpoint, bconfig, side_config, classes)
        ckpt, digest, seed = Path(args.checkpoint).name, sha256_file(args.checkpoint), None
    else:
        side = random_side(bconfig, side_config, args.seed)
        ckpt, digest, seed = f"random-init(seed={args.seed})", None, args.seed
    m = export_adapter(
        args.out, args.backbone, args.task, args.version, classes, side, backbone,
        _floats(args.mean), _floats(args.std), ckpt, digest, seed=seed, opset=args.opset,
        parity_samples=args.parity_samples,
    )
    print(json.dumps({"task": args.task, "version": args.version, "sha256": m["sha256"], "parity": m["parity"]}, indent=2))


def cmd_demo(args) -> None:
    from .demo import generate_demo

    generate_demo(Path(args.out), Path(args.fixtures))


def cmd_full(args) -> None:
    from .demo import generate_full

    generate_full(Path(args.out), fp16=args.fp16, opset=args.opset)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fptserve_models",
        description="Export FPT+ models (ViT backbone + per-task side networks) to an fptserve model repository.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "export-backbone",
        help="export backbones/<name>/backbone.onnx + manifest.json",
        description="Export the frozen ViT backbone, pruned after the last layer used, with parity check.",
    )
    b.add_argument("--out", required=True, help="model repository folder")
    b.add_argument("--name", required=True, help="backbone name (folder under backbones/)")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--hf-dir", help="local Hugging Face ViT folder (config.json + model.safetensors or pytorch_model.bin)")
    src.add_argument("--seed", type=int, default=0, help="seed of the random init when no --hf-dir (default 0)")
    b.add_argument("--preset", choices=sorted(BACKBONE_PRESETS), default="paper",
                   help="architecture for random init (paper: ViT-B/16 at 512 from 384; tiny: demo size)")
    b.add_argument("--image-size", type=int, help="input size the backbone sees (default: preset / 512)")
    b.add_argument("--layers-used", help="comma-separated 0-based layers whose K/V are selected (default 6..11)")
    b.add_argument("--token-ratio", type=float, help="fraction of tokens kept per head (default 0.2)")
    b.add_argument("--fp16", action="store_true", help="float16 weights/compute and K/V outputs (for GPU)")
    b.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    b.add_argument("--parity-samples", type=int, default=2, help="seeded inputs for the parity check (default 2)")
    b.set_defaults(func=cmd_export_backbone)

    a = sub.add_parser(
        "export-adapter",
        help="export tasks/<task>/<version>/side.onnx + manifest.json",
        description=(
            "Export one task adapter (fusion module + side ViT) against a backbone already in the repository, "
            "from an FPT+ side checkpoint (best_validation_weights.pt) or a seeded random init, with parity check."
        ),
    )
    a.add_argument("--out", required=True, help="model repository folder (holds the backbone)")
    a.add_argument("--backbone", required=True, help="backbone name in the repository")
    a.add_argument("--task", required=True, help="task name, e.g. dr-grade")
    a.add_argument("--version", required=True, help="adapter version (folder name), e.g. 1")
    cls = a.add_mutually_exclusive_group(required=True)
    cls.add_argument("--classes", help="comma-separated class names in index order (alphabetical folder order in training)")
    cls.add_argument("--classes-file", help="file with one class name per line, in index order")
    ck = a.add_mutually_exclusive_group()
    ck.add_argument("--checkpoint", help="authors'-style side state_dict (e.g. best_validation_weights.pt)")
    ck.add_argument("--seed", type=int, default=0, help="seed of the random init when no --checkpoint (default 0)")
    a.add_argument("--mean", required=True, help="per-channel normalisation mean, e.g. 0.425,0.296,0.197")
    a.add_argument("--std", required=True, help="per-channel normalisation std, e.g. 0.301,0.211,0.164")
    a.add_argument("--hf-dir", help="the HF ViT folder the backbone was exported from (needed unless random-init)")
    a.add_argument("--side-preset", choices=sorted(SIDE_PRESETS), default="paper",
                   help="side network architecture (paper: 6 layers, width 96, 12 heads, input 128, 16 prompts)")
    for name, help_ in (
        ("hidden-size", "side width"), ("num-layers", "side layers (= number of backbone layers used)"),
        ("num-heads", "side attention heads"), ("mlp-size", "side MLP size"), ("patch-size", "side patch size"),
        ("image-size", "side input size"), ("num-prompts", "prompts per layer"),
    ):
        a.add_argument(f"--side-{name}", type=int, help=f"{help_} (default: preset)")
    a.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    a.add_argument("--parity-samples", type=int, default=2, help="seeded inputs for the parity check (default 2)")
    a.set_defaults(func=cmd_export_adapter)

    d = sub.add_parser(
        "demo",
        help="regenerate the committed demo repository and reference fixtures",
        description="Regenerate models/demo (tiny backbone + 4 task versions) and models/fixtures (images, DICOM, reference.json).",
    )
    d.add_argument("--out", default=str(MODELS_DIR / "demo"), help="demo repository folder (default models/demo)")
    d.add_argument("--fixtures", default=str(MODELS_DIR / "fixtures"), help="fixtures folder (default models/fixtures)")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser(
        "full",
        help="write full-size random-weight models (ViT-B/16 512, side 128) for benchmarks",
        description="Write a full-size repository (backbone vit-b16-512 + dr-grade, skin-lesion, chest-xray) with random weights.",
    )
    f.add_argument("--out", default=str(MODELS_DIR / "full"), help="output folder (default models/full, git-ignored)")
    f.add_argument("--fp16", action="store_true", help="float16 backbone (named vit-b16-512-fp16)")
    f.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    f.set_defaults(func=cmd_full)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .export import ExportError
    from .weights import CheckpointMismatch

    try:
        args.func(args)
    except (CheckpointMismatch, ConfigError, ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
