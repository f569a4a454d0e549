"""Training memory and time: FPT+ with preloaded K/V (`python -m fptserve_models train`) against
full fine-tuning of the same backbone + classifier, same images, same batch size; and the cost of
preloading. Writes a markdown section for BENCHMARKS.md.

    .venv/bin/python benches/train_memory.py [--backbone models/full/backbones/vit-b16-512]
        [--images 24] [--batch-sizes 4,8] [--full-steps 3] [--out target/bench/train-memory.md]

Every measurement is its own child process (peak resident set size from os.wait4's rusage, or
the trainer's own record), so one method's memory never counts against the other's:

  1. `train` on the images: decodes, preloads the K/V with backbone.onnx (preload cost), trains
     one epoch, exports.
  2. `train` again with the same --work-dir, once per batch size: its caches are found, so the
     process only loads the side network and trains one epoch over the cached K/V (then
     exports): FPT+ training memory is the process's peak RSS during the training loop (the
     trainer's own per-stage record).
  3. full fine-tuning, once per batch size: the same ViT (every layer, final LayerNorm) + Linear
     head on CLS, all parameters trainable, AdamW, the same training images' backbone pixels
     (same preprocessing, same mean/std), a few optimizer steps: peak RSS of the process.

Without --backbone the full-size backbone is exported into the work folder first (random
weights, ViT-B/16 at 512; ~2 minutes). Random weights do not change memory or time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "src"))

PAPER = {"fpt+": 736, "full": 23128}  # MB, ViT-B, arXiv 2408.02426 (and the authors' README)


def run_child(cmd: list[str], env: dict | None = None) -> float:
    """Runs cmd (progress to this process's stderr); returns its wall seconds."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return time.monotonic() - t0


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "models" / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


# --------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------


def child_export_backbone(out: Path) -> None:
    from fptserve_models.config import PAPER_BACKBONE
    from fptserve_models.export import export_backbone
    from fptserve_models.weights import random_backbone

    export_backbone(random_backbone(PAPER_BACKBONE, 0), out, "vit-b16-512", "random-init(seed=0)", 0, parity_samples=1)


def child_full_finetune(work: Path, backbone_dir: Path, mean, std, batch_size: int, steps: int, threads: int | None,
                        result_path: Path) -> None:
    """Full fine-tuning: the whole ViT (model.py's blocks: embeddings, every encoder layer,
    final LayerNorm) + Linear(hidden, classes) on CLS; everything trainable."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fptserve_models.data import PixelCache
    from fptserve_models.export import backbone_config_from_manifest
    from fptserve_models.model import Embeddings, Encoder
    from fptserve_models.preprocess import normalize

    if threads:
        torch.set_num_threads(threads)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    manifest = json.loads((backbone_dir / "manifest.json").read_text())
    c = backbone_config_from_manifest(manifest)

    class FullViT(nn.Module):
        def __init__(self, classes: int):
            super().__init__()
            self.embeddings = Embeddings(c.num_channels, c.hidden_size, c.patch_size, c.pretrained_grid_size, c.grid_size)
            self.encoder = Encoder(c.num_layers, c.hidden_size, c.num_heads, c.mlp_size, c.layer_norm_eps, c.qkv_bias)
            self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
            self.classifier = nn.Linear(c.hidden_size, classes)

        def forward(self, x):
            hidden = self.embeddings(x)
            for layer in self.encoder.layer:
                hidden = layer(hidden)
            return self.classifier(self.layernorm(hidden)[:, 0])

    pixels_dir = next(p for p in (work / "cache").iterdir() if p.name.startswith("pixels-"))
    pixels = PixelCache(pixels_dir, json.loads((pixels_dir / "meta.json").read_text()))
    split = json.loads((work / "labels.json").read_text())  # the trainer's training entries: index, label
    torch.manual_seed(0)
    model = FullViT(split["classes"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1)
    params = sum(p.numel() for p in model.parameters())
    train = split["train"]
    times = []
    for step in range(steps):
        batch = [train[(step * batch_size + j) % len(train)] for j in range(batch_size)]
        x = torch.from_numpy(normalize(pixels.backbone.read([i for i, _ in batch]), mean, std))
        y = torch.tensor([label for _, label in batch])
        t0 = time.monotonic()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.monotonic() - t0)
    result_path.write_text(json.dumps({
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "baseline_rss_bytes": baseline,
        "step_seconds": times,
        "parameters": params,
        "steps": steps,
    }))


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", help="backbone folder (default models/full/backbones/vit-b16-512, else exported into --work)")
    ap.add_argument("--images", type=int, default=24, help="images (default 24, 8 per class; 1/5 held out for validation)")
    ap.add_argument("--image-size", type=int, default=600, help="side of the synthetic source images (default 600)")
    ap.add_argument("--batch-sizes", default="4,8", help="batch sizes, each run by both methods (default 4,8)")
    ap.add_argument("--full-steps", type=int, default=3, help="optimizer steps of full fine-tuning (default 3)")
    ap.add_argument("--extrapolate", default="16",
                    help="batch sizes FPT+ is measured at while full fine-tuning's peak is extrapolated linearly from "
                         "the measured batch sizes (it does not fit in memory; default 16, the paper's)")
    ap.add_argument("--reuse-full", action="store_true",
                    help="reuse full fine-tuning results already in --work (they take minutes)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the markdown from the results in --work")
    ap.add_argument("--threads", type=int, default=None, help="PyTorch threads in both (default: PyTorch's)")
    ap.add_argument("--work", default=str(ROOT / "target" / "bench-train"), help="work folder (kept between runs)")
    ap.add_argument("--out", default=str(ROOT / "target" / "bench" / "train-memory.md"), help="markdown output")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        a = json.loads(args.child_args)
        if args.child == "export-backbone":
            child_export_backbone(Path(a["out"]))
        elif args.child == "full":
            child_full_finetune(Path(a["work"]), Path(a["backbone"]), a["mean"], a["std"], a["batch_size"], a["steps"],
                                a["threads"], Path(a["result"]))
        return

    import shutil

    started = time.monotonic()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    me = str(Path(__file__).resolve())
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    extra = [int(b) for b in args.extrapolate.split(",") if b and int(b) not in batches]
    if extra and len(batches) < 2:
        raise SystemExit("--extrapolate needs at least two measured --batch-sizes")

    backbone = Path(args.backbone) if args.backbone else ROOT / "models" / "full" / "backbones" / "vit-b16-512"
    if not (backbone / "manifest.json").is_file():
        exported = work / "repo" / "backbones" / "vit-b16-512"
        if not (exported / "manifest.json").is_file():
            print(f"exporting the full-size backbone into {exported} (~2 min) ...", file=sys.stderr, flush=True)
            run_child([py, me, "--child", "export-backbone", "--child-args", json.dumps({"out": str(work / "repo")})], env())
        backbone = exported
    bmanifest = json.loads((backbone / "manifest.json").read_text())
    arch = bmanifest["architecture"]

    from fptserve_models.synthetic import CLASSES, write_dataset

    per_class = max(2, args.images // len(CLASSES))
    data = work / f"data-{per_class}x{args.image_size}"
    if not data.is_dir():
        write_dataset(data, per_class, 0, height=args.image_size, width=args.image_size)
    train_work = work / "train-work"
    if train_work.exists() and not args.report_only:
        shutil.rmtree(train_work)  # so that the first run preloads (its cost is measured)

    def train_child(name: str, batch: int) -> dict:
        out_repo, summary = work / f"out-{name}", work / f"summary-{name}.json"
        if args.report_only:
            return json.loads(summary.read_text())["training"]
        if out_repo.exists():
            shutil.rmtree(out_repo)
        cmd = [py, "-m", "fptserve_models", "train", "--backbone", str(backbone), "--data", str(data), "--task", "bench",
               "--version", "1", "--out", str(out_repo), "--epochs", "1", "--batch-size", str(batch), "--decoder", "pil",
               "--quiet", "--work-dir", str(train_work), "--summary-json", str(summary)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"train ({name}) ...", file=sys.stderr, flush=True)
        run_child(cmd, env())
        return json.loads(summary.read_text())["training"]

    first = train_child("preload", batches[0])
    fpt = {b: train_child(f"fpt-batch-{b}", b) for b in batches + extra}
    for b, t in fpt.items():
        if t["memory"]["training_peak_rss_bytes"] is None:
            raise SystemExit("this kernel does not let a process reset its peak-RSS mark: no per-stage figures")

    # full fine-tuning on the same (training) images, with the mean/std the trainer computed
    from fptserve_models.data import scan_dataset

    dataset = scan_dataset(data, 0.2, 0)  # the trainer's split (same folder, fraction and seed)
    (train_work / "labels.json").write_text(json.dumps({
        "classes": len(dataset.classes),
        "train": [[i, e.label] for i, e in enumerate(dataset.entries) if e.split == "train"],
    }))
    mean, std = first["normalization"]["mean"], first["normalization"]["std"]
    full, reused = {}, []
    for b in batches:
        result_path = work / f"full-batch-{b}.json"
        if (args.reuse_full or args.report_only) and result_path.is_file():
            full[b] = json.loads(result_path.read_text())
            if full[b]["steps"] == args.full_steps:
                reused.append(b)
                continue
        print(f"full fine-tuning (batch {b}) ...", file=sys.stderr, flush=True)
        run_child([py, me, "--child", "full", "--child-args", json.dumps({
            "work": str(train_work), "backbone": str(backbone), "mean": mean, "std": std, "batch_size": b,
            "steps": args.full_steps, "threads": args.threads, "result": str(result_path),
        })], env())
        full[b] = json.loads(result_path.read_text())

    run_path = work / "run.json"
    if not args.report_only:
        run_path.write_text(json.dumps({"minutes": (time.monotonic() - started) / 60, "reused": reused}))
    recorded = json.loads(run_path.read_text()) if run_path.is_file() else {}
    minutes = recorded.get("minutes", (time.monotonic() - started) / 60)
    reused = recorded.get("reused", reused)
    torch_path = work / "torch-rss.json"
    if not args.report_only:  # what importing PyTorch alone costs, in a fresh interpreter
        out = subprocess.run([py, "-c", "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                             capture_output=True, text=True, check=True).stdout
        torch_path.write_text(json.dumps({"rss_bytes": int(out.split()[-1]) * 1024}))
    torch_rss = json.loads(torch_path.read_text())["rss_bytes"]

    n_train = sum(first["data"]["images"]["train"].values())
    pre = first["preload"]
    side = 128
    mb = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    import numpy as np
    import torch

    rows, ratios = [], {}
    for b in batches:
        t, f = fpt[b], full[b]
        epoch = t["history"][0]
        fpt_peak, fpt_base = t["memory"]["training_peak_rss_bytes"], t["memory"]["preload_peak_rss_bytes"]
        later = f["step_seconds"][1:] or f["step_seconds"]
        full_step = sorted(later)[len(later) // 2]
        fpt_step = epoch.get("step_seconds_median") or epoch["train_seconds"] / epoch["steps"]
        ratios[b] = (fpt_peak / f["peak_rss_bytes"], (fpt_peak - fpt_base) / (f["peak_rss_bytes"] - f["baseline_rss_bytes"]))
        rows += [
            f"| {b} | peak RSS, MB | {mb(fpt_peak)} | {mb(f['peak_rss_bytes'])} | **{ratios[b][0]:.1%}** |",
            f"| {b} | peak RSS minus the process's size before training (interpreter, libraries, data), MB | "
            f"{mb(fpt_peak - fpt_base)} | {mb(f['peak_rss_bytes'] - f['baseline_rss_bytes'])} | {ratios[b][1]:.2%} |",
            f"| {b} | seconds per optimizer step (median) | {fpt_step:.2f} | {full_step:.1f} | {fpt_step / full_step:.1%} |",
        ]
    # full fine-tuning's peak is linear in the batch (activations per image): fit the measured ones
    xs = np.array(batches, dtype=np.float64)
    ys = np.array([full[b]["peak_rss_bytes"] for b in batches], dtype=np.float64)
    slope, intercept = np.polyfit(xs, ys, 1)
    for b in extra:
        fpt_peak = fpt[b]["memory"]["training_peak_rss_bytes"]
        estimate = intercept + slope * b
        ratios[b] = (fpt_peak / estimate, None)
        rows.append(f"| {b} | peak RSS, MB | {mb(fpt_peak)} (measured) | {mb(estimate)} (extrapolated) | "
                    f"{ratios[b][0]:.1%} (extrapolated) |")
    params_fpt, params_full = first["parameters"], full[batches[0]]["parameters"]
    fixed = min(fpt[b]["memory"]["preload_peak_rss_bytes"] for b in batches)
    measured = ", ".join(f"{ratios[b][0]:.1%} at batch {b}" for b in batches)
    added = ", ".join(f"{ratios[b][1]:.2%} at batch {b}" for b in batches)
    met = [b for b in batches if ratios[b][0] <= 0.05]
    verdict = (f"the goal (at most 5%) is met at batch {', '.join(map(str, met))}" if met else
               "the goal (at most 5%) is not met at the batch sizes that fit this machine")
    lines = [
        "## 8. Training memory: FPT+ with preloaded K/V against full fine-tuning",
        "",
        f"Written by `benches/train_memory.py` in {minutes:.1f} min on {cpu}, {os.cpu_count()} logical cores, "
        f"PyTorch {torch.__version__.split('+')[0]}, float32 on the CPU"
        + (f", PyTorch threads: {args.threads}" if args.threads else "")
        + (f"; full fine-tuning at batch {', '.join(map(str, reused))} reused from an earlier run of the script "
           "(--reuse-full)" if reused else "") + ". "
        f"Backbone `{bmanifest['name']}`: ViT, {arch['num_layers']} layers of width {arch['hidden_size']}, patch "
        f"{arch['patch_size']}, seen at {arch['image_size']} ({arch['num_tokens']} tokens; random weights: memory and "
        f"time do not depend on them). FPT+: the `train` command (side network at {side}, K/V of layers "
        f"{arch['layers_used']} preloaded, {pre['kv_cache_dtype']} cache), one epoch over its cached K/V. Full "
        "fine-tuning: the same ViT with every layer, its final LayerNorm and a Linear head on CLS, all parameters "
        f"trainable, AdamW, {args.full_steps} optimizer steps (the first left out of the median time). Same {n_train} "
        f"training images ({args.image_size}x{args.image_size}, synthetic, 3 classes), same preprocessing and batch "
        "size. Each run is its own process; memory is that process's peak resident set size (RSS) while training, "
        f"the Python interpreter and libraries included (importing PyTorch alone: {mb(torch_rss)} MB).",
        "",
        f"Trainable parameters: FPT+ {params_fpt:,}, full fine-tuning {params_full:,} ({params_fpt / params_full:.2%}).",
        "",
        "| batch | | FPT+ (K/V preloaded) | full fine-tuning | FPT+ / full |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"**FPT+'s peak memory is {measured} of full fine-tuning's; {verdict}.** About {mb(fixed)} MB of the FPT+ "
        f"process is there before training starts (the interpreter and PyTorch: {mb(torch_rss)} MB for `import torch`), "
        "and full fine-tuning carries the same; what training adds is "
        f"{added} of what full fine-tuning's adds"
        + "".join(f". At the paper's batch {b}, which does not fit in this machine's memory for full fine-tuning in "
                  f"float32, FPT+ measures {mb(fpt[b]['memory']['training_peak_rss_bytes'])} MB against an "
                  f"extrapolated {mb(intercept + slope * b)} MB (full fine-tuning's peak is linear in the batch: "
                  f"{slope / 2**20:,.0f} MB per image on top of {intercept / 2**20:,.0f} MB, fitted to the measured "
                  f"batches), {ratios[b][0]:.1%}" for b in extra)
        + f". The paper reports {PAPER['fpt+']:,} MB against {PAPER['full']:,} MB of GPU memory "
        f"({PAPER['fpt+'] / PAPER['full']:.1%}; ViT-B, batch 16, mixed precision): GPU memory and CPU RSS are different "
        "measures, compare ratios. Full fine-tuning keeps every layer's activations at "
        f"{arch['num_tokens']} tokens for the backward pass, so its memory grows with the batch; FPT+ holds one batch of "
        f"cached K/V ({pre['kv_bytes_per_image'] / 1e6:.2f} MB per image in {pre['kv_cache_dtype']}).",
        "",
        "Preloading (once per image, before training): backbone.onnx through ONNX Runtime on the CPU, "
        f"batch {pre['batch_size']}: {pre['seconds_per_image']:.2f} s per image, process peak "
        f"{mb(first['memory']['preload_peak_rss_bytes'])} MB (the backbone's inference; each further image in a "
        "preload batch adds about 0.9 GB). On disk per image: "
        f"{pre['kv_bytes_per_image'] / 1e6:.2f} MB of K/V ({pre['kv_cache_dtype']}; "
        f"{pre['kv_bytes_per_image'] * (2 if pre['kv_cache_dtype'] == 'float16' else 1) / 1e6:.2f} MB in float32) plus "
        f"{pre['pixel_bytes_per_image'] / 1e6:.2f} MB of resized pixels (backbone, side and augmentation inputs).",
        "",
        "Times come from a shared 2-core CPU. FPT+'s optimizer steps are short enough that other processes' load "
        "dominates them (its two PyTorch threads wait on each other), so its step times vary from run to run: read "
        "the time ratios as an order of magnitude, the memory ratios as measured.",
    ]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
