"""Command line: python -m fptserve_models {export-backbone, export-adapter, train, demo, full}."""

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
        model, args.out, args.name, source, seed, fp16=args.fp16, opset=args.opset, parity_samples=args.parity_samples,
        explain=not args.no_explain_outputs,
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
        parity_samples=args.parity_samples, explain=not args.no_explain_outputs,
    )
    print(json.dumps({"task": args.task, "version": args.version, "sha256": m["sha256"], "parity": m["parity"]}, indent=2))


def cmd_train(args) -> None:
    import signal

    from .train import TrainOptions, train

    def terminate(signum, frame):  # SIGTERM cleans up like Ctrl-C: no partial version folder stays
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)

    path = lambda v: Path(v) if v else None  # noqa: E731
    opts = TrainOptions(
        backbone=Path(args.backbone), data=Path(args.data), task=args.task, version=args.version, out=Path(args.out),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, grad_clip=args.grad_clip, seed=args.seed, val_fraction=args.val_fraction,
        mean=_floats(args.mean) if args.mean else None, std=_floats(args.std) if args.std else None,
        device=args.device, work_dir=path(args.work_dir), resume=args.resume, select_metric=args.select_metric,
        patience=args.patience, augment=args.augment, augment_source_size=args.augment_source_size,
        kv_cache_dtype=args.kv_cache_dtype, preload_batch_size=args.preload_batch_size, workers=args.workers,
        side_preset=args.side_preset,
        side={k: getattr(args, "side_" + k) for k in ("hidden_size", "num_layers", "num_heads", "mlp_size",
                                                      "patch_size", "image_size", "num_prompts")
              if getattr(args, "side_" + k) is not None},
        decoder=args.decoder, fptserve_bin=path(args.fptserve),
        dicom={"voi": args.voi, "window_center": args.window_center, "window_width": args.window_width,
               "voi_function": args.voi_function, "allow_request_override": args.allow_request_override,
               "decode_resolution": args.decode_resolution},
        hf_dir=path(args.hf_dir), publish=args.publish, publish_mode=args.publish_mode,
        make_default=args.make_default, admin_token_file=path(args.admin_token_file), tls_ca=path(args.tls_ca),
        tls_cert=path(args.tls_cert), tls_key=path(args.tls_key), tls_server_name=args.tls_server_name,
        progress=not args.quiet, opset=args.opset, threads=args.threads, explain=not args.no_explain_outputs,
    )
    result = train(opts)
    if args.quiet:
        print(result.summary)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps({
            "folder": str(result.folder), "task": args.task, "version": args.version,
            "sha256": result.manifest["sha256"], "classes": result.classes, "best_epoch": result.best_epoch,
            "preprocessing": result.manifest["preprocessing"],
            "training": result.manifest["training"], "parity": result.manifest["parity"],
            "published": result.published,
        }, indent=2) + "\n")


def cmd_demo(args) -> None:
    from .demo import generate_demo

    generate_demo(Path(args.out), Path(args.fixtures))


def cmd_full(args) -> None:
    from .demo import generate_full

    generate_full(Path(args.out), fp16=args.fp16, opset=args.opset)


def _explain_flag(parser, what: str) -> None:
    parser.add_argument(
        "--no-explain-outputs", action="store_true",
        help=f"leave out {what}: the extra outputs saliency maps are built from (added by default; older daemons "
             "ignore them)",
    )


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
    _explain_flag(b, "the output token_indices (which tokens each used layer and head selected)")
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
    _explain_flag(a, "the outputs token_relevance and patch_relevance (per-class relevance of the selected tokens and side patches)")
    a.set_defaults(func=cmd_export_adapter)

    t = sub.add_parser(
        "train",
        help="train a task adapter on an image folder and write tasks/<task>/<version>/",
        description=(
            "Train an FPT+ task adapter (side network + fusion module) on a labelled image folder against a backbone "
            "folder, with the backbone's K/V preloaded once by its backbone.onnx, and export it to "
            "REPOSITORY/tasks/<task>/<version>/ (nothing else is written there; a failed or interrupted run "
            "writes nothing). Data: DATA/<class>/... (seeded validation split) or DATA/train/<class>/... + "
            "DATA/val/<class>/...; PNG, JPEG, TIFF and DICOM files, decoded by the daemon's own decoder "
            "(fptserve decode) when the fptserve binary is found."
        ),
    )
    t.add_argument("--backbone", required=True, help="backbone folder (manifest.json + backbone.onnx), e.g. REPO/backbones/vit-b16-512")
    t.add_argument("--data", required=True, help="image folder: <class>/ folders, or train/<class>/ + val/<class>/")
    t.add_argument("--task", required=True, help="task name, e.g. dr-grade")
    t.add_argument("--version", required=True, help="version to write (a new folder; never overwritten)")
    t.add_argument("--out", required=True, help="model repository to write tasks/<task>/<version>/ into")
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=20, help="epochs (default 20)")
    g.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW (default 1e-4)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up before the cosine decay (default 0)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = off (default 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, init, shuffling, augmentation and dropout (default 0)")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of each class held out for validation when there are no train/ val/ folders (default 0.2)")
    g.add_argument("--select-metric", choices=["auc", "accuracy", "kappa"], default="auc",
                   help="validation metric that picks the best epoch (default auc: macro one-vs-rest; kappa: quadratic-weighted, for ordered grades)")
    g.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a better best (0 = never; default 10)")
    g.add_argument("--augment", choices=["side", "none"], default="side",
                   help="side: the authors' weak augmentation on the side input only (default); none")
    g.add_argument("--augment-source-size", type=int, help="size of the image the side augmentation crops from (default 2x the side input)")
    g.add_argument("--device", default="cpu", help="PyTorch device for training: cpu, cuda, cuda:N (default cpu)")
    g.add_argument("--threads", type=int, help="PyTorch CPU threads (default: PyTorch's, one per core)")
    g.add_argument("--work-dir", help="folder for the decoded-pixel and K/V caches and the per-epoch checkpoint, kept "
                                      "for reruns and --resume (default: a temporary folder, removed at the end)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --work-dir")
    p2 = t.add_argument_group("preprocessing and preloading")
    p2.add_argument("--mean", help="normalisation mean r,g,b (default: computed from the training images)")
    p2.add_argument("--std", help="normalisation std r,g,b (default: computed from the training images)")
    p2.add_argument("--kv-cache-dtype", choices=["float16", "float32"], default="float16",
                    help="dtype of the cached K/V (default float16: half the disk; moves logits by ~1e-4)")
    p2.add_argument("--preload-batch-size", type=int, default=1,
                    help="images per backbone.onnx run while preloading (default 1: on a CPU larger batches are no "
                         "faster and each image adds about 0.9 GB at ViT-B/512; raise it on a GPU)")
    p2.add_argument("--workers", type=int, help="parallel decodes (default: one per CPU)")
    p2.add_argument("--decoder", choices=["auto", "fptserve", "pil"], default="auto",
                    help="fptserve: the daemon's decoder for every file; pil: PIL for PNG/JPEG/TIFF (no DICOM); "
                         "auto (default): fptserve when the binary is found, else pil")
    p2.add_argument("--fptserve", help="the fptserve binary (default: $FPTSERVE_BIN, else fptserve on PATH)")
    p2.add_argument("--voi", choices=["auto", "window", "minmax"], default="auto", help="the task's DICOM pixel policy (default auto)")
    p2.add_argument("--window-center", type=float, help="window centre for --voi window")
    p2.add_argument("--window-width", type=float, help="window width for --voi window")
    p2.add_argument("--voi-function", choices=["linear", "linear_exact", "sigmoid"], help="VOI function for --voi window (default linear)")
    p2.add_argument("--allow-request-override", action="store_true", help="let requests replace the task's DICOM pixel policy")
    p2.add_argument("--decode-resolution", choices=["full", "reduced"], default="full",
                    help="reduced: JPEG 2000/HTJ2K/JPEG DICOM frames decode at the coarsest resolution at least the "
                         "task's input size, in training and when served (default full)")
    s2 = t.add_argument_group("side network")
    s2.add_argument("--side-preset", choices=sorted(SIDE_PRESETS), default="paper",
                    help="architecture (paper: width 96, 12 heads, MLP 384, patch 16, input 128, 16 prompts; its layers = the backbone's layers used)")
    for name, help_ in (
        ("hidden-size", "side width"), ("num-layers", "side layers (= number of backbone layers used)"),
        ("num-heads", "side attention heads"), ("mlp-size", "side MLP size"), ("patch-size", "side patch size"),
        ("image-size", "side input size"), ("num-prompts", "prompts per layer"),
    ):
        s2.add_argument(f"--side-{name}", type=int, help=f"{help_} (default: preset)")
    s2.add_argument("--hf-dir", help="the HF ViT folder the backbone was exported from: adds the end-to-end parity check "
                                     "against the PyTorch backbone (random-init backbones are rebuilt from their seed)")
    s2.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    _explain_flag(s2, "the adapter's outputs token_relevance and patch_relevance")
    pub = t.add_argument_group("publishing")
    pub.add_argument("--publish", metavar="ADDR", help="admin API address (host:port) of a running daemon to load the new version into")
    pub.add_argument("--publish-mode", choices=["upload", "path"], default="upload",
                     help="upload: send manifest + side.onnx (default); path: the daemon reads tasks/<task>/<version> from its own repository")
    pub.add_argument("--make-default", action="store_true", help="make the new version the task's default")
    pub.add_argument("--admin-token-file", help="file with the admin API's bearer token")
    pub.add_argument("--tls-ca", help="PEM CA that signed the daemon's certificate (turns TLS on)")
    pub.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    pub.add_argument("--tls-key", help="PEM key of --tls-cert")
    pub.add_argument("--tls-server-name", help="name to check the daemon's certificate against (default: the address's host)")
    t.add_argument("--quiet", action="store_true", help="no progress output; print only the final summary")
    t.add_argument("--summary-json", help="also write the run's summary (metrics, memory, times, parity) to this JSON file")
    t.set_defaults(func=cmd_train)

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

    from .quantize import register as register_quantize  # imports no torch: --help stays instant

    register_quantize(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .export import ExportError
    from .weights import CheckpointMismatch

    errors: tuple = (CheckpointMismatch, ConfigError, ExportError, FileNotFoundError)
    if args.command == "train":
        from .data import DataError
        from .publish import PublishError
        from .train import TrainError

        errors += (DataError, TrainError)
    else:
        PublishError = None  # noqa: N806
    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.command == "train":
            version = Path(args.out) / "tasks" / args.task / args.version
            if version.is_dir():  # interrupted while publishing: the version is complete
                print(f"interrupted after writing {version}", file=sys.stderr)
            else:
                print(f"interrupted: nothing was written to {args.out}", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if PublishError is not None and isinstance(e, PublishError):
            print(
                f"error: publishing failed: {e}\n(the new version is complete in "
                f"{Path(args.out) / 'tasks' / args.task / args.version}; load it later or let the repository watch pick it up)",
                file=sys.stderr,
            )
            return 3
        raise
    return 0
