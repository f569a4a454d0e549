"""INT8 backbone (issue 18): speed and fidelity against the float32 backbone at full size.

    .venv/bin/python benches/int8_backbone.py [--repo models/full] [--reps 10] [--outliers]

`make bench` runs it as case 9 (`--reuse --outliers`, variants kept in target/bench/int8).

1. Writes the INT8 variant of models/full's ViT-B/16 at 512 with `fptserve_models.quantize` (the
   shipped method unless --method), into a scratch repository under --work that links models/full's
   backbone and tasks (models/full itself is left as it is), and keeps its manifest's fidelity report.
2. Times float32 and INT8 seconds per image in ONE process, interleaved (the order alternates every
   round, so contention from other processes on the machine hits both alike), with the same session
   options: ORT_ENABLE_ALL, intra-op threads 2 (--threads), sequential execution, batch 1, on a
   preprocessed synthetic image. Reports medians, min-max and the ratio of medians (and the median
   of the per-round ratios).
3. --outliers: also makes a trained-ViT-like copy of the backbone (a few LayerNorm channels per
   block with gain and bias 20-50x, the following weight rows divided by 20-50x / U(1, 2)), links
   the adapters to it, and quantizes it with each of --compare (default: dynamic) and the shipped
   method: the fidelity table shows what the outlier channels do to naive quantization.

Prints a markdown section for BENCHMARKS.md on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "src"))

import numpy as np  # noqa: E402

from fptserve_models import quantize as Q  # noqa: E402
from fptserve_models.export import read_backbone, write_json  # noqa: E402
from fptserve_models.weights import sha256_file  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def scratch_repository(work: Path, source: Path, backbone: str) -> Path:
    """work/repo with backbones/<backbone> and tasks/* linked to ``source`` (nothing written there)."""
    repo = work / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    (repo / "backbones").mkdir(parents=True)
    (repo / "backbones" / backbone).symlink_to((source / "backbones" / backbone).resolve())
    if (source / "tasks").is_dir():
        (repo / "tasks").symlink_to((source / "tasks").resolve())
    return repo


def outlier_repository(work: Path, source: Path, backbone: str, channels: int, seed: int) -> tuple[Path, str, dict]:
    """A repository with a trained-ViT-like outlier copy of the backbone and the adapters re-pointed
    at it (their side.onnx are the same files; only the manifests' backbone identity changes)."""
    import onnx
    from onnx import numpy_helper

    manifest, path = read_backbone(source, backbone)
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    rng = np.random.default_rng(seed)
    injected = 0
    for ln, users in Q.layernorm_groups(m.graph):
        gamma = numpy_helper.to_array(inits[ln.input[1]]).copy()
        beta = numpy_helper.to_array(inits[ln.input[2]]).copy()
        idx = rng.choice(gamma.size, size=channels, replace=False)
        f = rng.uniform(20.0, 50.0, channels).astype(np.float32)
        u = rng.uniform(1.0, 2.0, channels).astype(np.float32)
        gamma[idx] *= f
        beta[idx] *= f
        inits[ln.input[1]].CopyFrom(numpy_helper.from_array(gamma, ln.input[1]))
        inits[ln.input[2]].CopyFrom(numpy_helper.from_array(beta, ln.input[2]))
        for mm in users:
            w = numpy_helper.to_array(inits[mm.input[1]]).copy()
            w[idx, :] /= (f / u)[:, None]
            inits[mm.input[1]].CopyFrom(numpy_helper.from_array(w, mm.input[1]))
        injected += 1
    name = f"{backbone}-outliers"
    repo = work / "outlier-repo"
    if repo.exists():
        shutil.rmtree(repo)
    folder = repo / "backbones" / name
    folder.mkdir(parents=True)
    data = m.SerializeToString()
    (folder / "backbone.onnx").write_bytes(data)
    om = dict(manifest)
    om.update(name=name, sha256=sha256_file(folder / "backbone.onnx"),
              source_weights=f"{manifest['source_weights']} + outlier channels ({channels} per LayerNorm, x20-50)")
    om.pop("parity", None)
    write_json(folder / "manifest.json", om)
    for mpath in sorted((source / "tasks").glob("*/*/manifest.json")):
        am = json.loads(mpath.read_text())
        if am.get("backbone", {}).get("sha256") != manifest["sha256"]:
            continue
        dst = repo / "tasks" / mpath.parent.parent.name / mpath.parent.name
        dst.mkdir(parents=True)
        (dst / am["file"]).symlink_to((mpath.parent / am["file"]).resolve())
        am["backbone"] = {"name": name, "sha256": om["sha256"]}
        write_json(dst / "manifest.json", am)
    info = {"layernorms": injected, "channels_per_layernorm": channels, "seed": seed}
    return repo, name, info


def time_interleaved(paths: dict[str, Path], pixels: np.ndarray, reps: int, threads: int, warmup: int = 2) -> dict:
    sessions = {k: session(p, threads) for k, p in paths.items()}
    feed = {"pixel_values": pixels}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for r in range(reps):
        order = keys if r % 2 == 0 else keys[::-1]
        for k in order:
            t = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t)
        log(f"  round {r + 1}/{reps}: " + ", ".join(f"{k} {times[k][-1]:.3f} s" for k in keys))
    return times


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e4:
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def fidelity_rows(label: str, manifest: dict) -> list[str]:
    fid = manifest["fidelity"]
    s = fid["summary"]
    rows = []
    for split in ("calibration", "evaluation"):
        sp = fid["splits"][split]
        kv, ts = sp["kv"], sp["token_sets"]
        agree = ", ".join(f"{a['task']} {a[split]['label_agreement']:.3f}" for a in fid["adapters"])
        dp = max((a[split]["max_abs_prob_change"] for a in fid["adapters"]), default=None)
        rows.append(
            f"| {label} | {split} ({sp['images']}) | {fmt(kv['keys']['relative_error'])} / {fmt(kv['values']['relative_error'])} "
            f"| {fmt(kv['keys']['max_abs_diff'])} / {fmt(kv['values']['max_abs_diff'])} "
            f"| {ts['jaccard_mean']:.3f} (min {ts['jaccard_min']:.3f}) | {ts['identical_fraction']:.3f} "
            f"| {agree} | {fmt(dp)} |"
        )
    del s
    return rows


FIDELITY_HEADER = [
    "| backbone / method | images | K / V relative error | K / V max abs diff | token-set Jaccard, mean (min) "
    "| identical sets | label agreement per adapter | max abs prob change |",
    "|---|---|---|---|---|---|---|---|",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(ROOT / "models" / "full"), help="repository with the fp32 backbone and its adapters")
    p.add_argument("--backbone", default="vit-b16-512")
    p.add_argument("--work", default="/tmp/fptserve-int8-bench", help="scratch folder (default /tmp/fptserve-int8-bench)")
    p.add_argument("--method", default=Q.DEFAULT_METHOD, choices=Q.METHODS)
    p.add_argument("--reps", type=int, default=10, help="timed rounds (each runs every model once; default 10)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--images", type=int, default=16, help="synthetic evaluation images (default 16)")
    p.add_argument("--calibration-images", type=int, default=Q.DEFAULT_CALIBRATION_IMAGES,
                   help=f"synthetic calibration images (default {Q.DEFAULT_CALIBRATION_IMAGES})")
    p.add_argument("--outliers", action="store_true", help="also compare methods on an outlier-channel copy of the backbone")
    p.add_argument("--outlier-channels", type=int, default=6, help="outlier channels per LayerNorm (default 6 of 768)")
    p.add_argument("--compare", default="dynamic", help="methods to compare with the shipped one under --outliers (comma list)")
    p.add_argument("--time-methods", default="dynamic",
                   help="other methods to build (same calibration, no report) and time alongside (comma list; default dynamic)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the variants written by an earlier run in --work (timing and tables only)")
    p.add_argument("--out", help="also write the markdown section here (default: --work/int8_backbone.md only)")
    p.add_argument("--fused-attention", action="store_true",
                   help="also time the shipped method with the MultiHeadAttention rewrite of the unused layers")
    args = p.parse_args()

    started = time.time()
    source = Path(args.repo)
    if not (source / "backbones" / args.backbone / "manifest.json").is_file():
        if source.resolve() == (ROOT / "models" / "full").resolve():
            log("models/full is missing: writing it (python -m fptserve_models full, ~2 min)")
            from fptserve_models.demo import generate_full

            generate_full(source, log=log)
        else:
            raise SystemExit(f"{source} has no backbone {args.backbone}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    previous = work / "repo" / "backbones" / f"{args.backbone}-int8" / "manifest.json"
    # a variant is reused only while it was made from the float32 backbone there now
    current = json.loads((source / "backbones" / args.backbone / "manifest.json").read_text())["sha256"]
    reuse = (args.reuse and previous.is_file()
             and json.loads(previous.read_text()).get("quantized_from", {}).get("sha256") == current)
    repo = work / "repo" if reuse else scratch_repository(work, source, args.backbone)
    fp32_manifest, fp32_path = read_backbone(repo, args.backbone)
    size = fp32_manifest["architecture"]["image_size"]

    t0 = time.time()
    if reuse:
        log(f"reusing {previous.parent}")
        shipped = json.loads(previous.read_text())
        read_backbone(repo, shipped["name"])  # digest checked
    else:
        log(f"quantizing {args.backbone} with {args.method} ({args.calibration_images} + {args.images} synthetic images)")
        shipped = Q.quantize_backbone(repo, args.backbone, method=args.method, calibration_images=args.calibration_images,
                                      evaluation_images=args.images, log=log)
    quantize_seconds = shipped["quantization"]["build_seconds"] if reuse else time.time() - t0
    int8_path = repo / "backbones" / shipped["name"] / "backbone.onnx"

    paths = {"fp32": fp32_path, "int8": int8_path}  # "int8": the shipped variant, with its report
    extra = [(m, False) for m in args.time_methods.split(",") if m and m != args.method]
    if args.fused_attention:
        extra.append((args.method, True))
    if extra:
        import onnx

        cal = Q.synthetic_images("calibration", args.calibration_images, 0, size)
        norms = (shipped["quantization"]["calibration"] or shipped["quantization"]["fidelity_images"])["normalizations"]
        px = np.concatenate([Q.preprocess_set(cal.images, [size, size], n["mean"], n["std"]) for n in norms])
        fp32_model = onnx.load(str(fp32_path)) if not reuse else None
        for method, fused in extra:
            label = f"int8 {method}" + (" + fused attention" if fused else "")
            path = work / (label.replace(" ", "_").replace("+", "") + ".onnx")
            if not (reuse and path.is_file()):
                log(f"building {method}{' (fused attention)' if fused else ''} for timing")
                built = Q.build_int8(fp32_model, method, px, fp32_manifest["architecture"]["num_heads"],
                                     fuse_attention=fused, log=log)
                onnx.save(built.model, str(path))
            paths[label] = path
        del fp32_model

    image = Q.synthetic_images("timing", 1, 1234, size).images
    pre = shipped["fidelity"]["normalization"]
    pixels = Q.preprocess_set(image, [size, size], pre["mean"], pre["std"])
    log(f"timing {', '.join(paths)}: {args.reps} interleaved rounds, {args.threads} intra-op threads, batch 1")
    times = time_interleaved(paths, pixels, args.reps, args.threads)

    outlier_results = []
    outlier_info = None
    if args.outliers:
        oname = f"{args.backbone}-outliers"
        methods = [m for m in args.compare.split(",") if m] + [args.method]
        done = [work / "outlier-repo" / "backbones" / f"{oname}-{m}" / "manifest.json" for m in methods]
        if reuse and all(p.is_file() for p in done):
            outlier_results = [(m, json.loads(p.read_text())) for m, p in zip(methods, done)]
            info_file = work / "outlier-info.json"
            outlier_info = json.loads(info_file.read_text()) if info_file.is_file() else {
                "layernorms": outlier_results[-1][1]["quantization"]["smoothing"]["layernorms_eligible"],
                "channels_per_layernorm": args.outlier_channels, "seed": 18}
        else:
            orepo, oname, outlier_info = outlier_repository(work, source, args.backbone, args.outlier_channels, seed=18)
            write_json(work / "outlier-info.json", outlier_info)
            for method in methods:
                log(f"outlier backbone: quantizing with {method}")
                om = Q.quantize_backbone(orepo, oname, f"{oname}-{method}", method=method,
                                         calibration_images=args.calibration_images, evaluation_images=args.images, log=log)
                outlier_results.append((method, om))

    # ---------------------------------------------------------------- markdown
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    med = {k: statistics.median(v) for k, v in times.items()}
    out = []
    out.append("## INT8 backbone (CPU)")
    out.append("")
    out.append(
        f"Written by `benches/int8_backbone.py` in {(time.time() - started) / 60:.1f} min on {cpu} "
        f"({os.cpu_count()} logical cores; {', '.join(isa) or 'no AVX2'}), Linux {platform.release()}, "
        f"ONNX Runtime {onnxruntime.__version__}. Backbone `{args.backbone}` (ViT, {fp32_manifest['architecture']['num_layers']} layers of width "
        f"{fp32_manifest['architecture']['hidden_size']}, patch {fp32_manifest['architecture']['patch_size']}, at {size}; random weights) "
        f"and its INT8 variant `{shipped['name']}`, method `{shipped['quantization']['method']}` "
        f"({shipped['quantization']['quantized']}; " + ("reused from an earlier run" if reuse else
        f"written in {quantize_seconds:.0f} s including its fidelity report") + ")."
    )
    out.append("")
    out.append(
        f"Seconds per image, batch 1, one process, {args.reps} interleaved rounds (order alternating) after 2 warm-up "
        f"runs each; same session options (ORT_ENABLE_ALL, {args.threads} intra-op threads, sequential). "
        "Other processes on the machine hit every model alike; compare ratios, not seconds."
    )
    out.append("")
    out.append("| backbone | file | s/image: median (min-max) | fp32 / this (ratio of medians) | median of per-round ratios |")
    out.append("|---|---|---|---|---|")
    for k, v in times.items():
        size_mb = Path(paths[k]).stat().st_size / 1e6
        per_round = statistics.median(a / b for a, b in zip(times["fp32"], v))
        out.append(f"| {k} | {size_mb:.0f} MB | {med[k]:.3f} ({min(v):.3f}-{max(v):.3f}) | {med['fp32'] / med[k]:.2f}x | {per_round:.2f}x |")
    out.append("")
    ratio = med["fp32"] / med["int8"]
    goal = "meets" if ratio >= 2.5 else "does NOT meet"
    out.append(f"**INT8 / fp32 speed-up: {ratio:.2f}x** (ratio of medians; {goal} the issue's 2.5x goal on this machine).")
    out.append("")
    cal = shipped["quantization"]["calibration"] or shipped["quantization"]["fidelity_images"]
    out.append(
        f"Fidelity (from the variant's manifest, computed at export against the fp32 backbone): "
        f"{shipped['fidelity']['splits']['calibration']['images']} calibration + "
        f"{shipped['fidelity']['splits']['evaluation']['images']} evaluation images, {cal['source'].split(':')[0]}; "
        f"K/V compared on the tokens both select; each adapter with its own normalisation."
    )
    out.append("")
    out.extend(FIDELITY_HEADER)
    out.extend(fidelity_rows(f"{args.backbone} / {shipped['quantization']['method']}", shipped))
    if outlier_results:
        out.append("")
        out.append(
            f"With trained-ViT-like outlier channels: a copy of the backbone with {outlier_info['channels_per_layernorm']} "
            f"channels in each of its {outlier_info['layernorms']} LayerNorms (those feeding Q/K/V and the MLP) given "
            "20-50x gain and bias, the following weight rows divided by 20-50x / U(1, 2) (seed 18); the same adapters "
            "(side.onnx unchanged), each method against this copy's fp32 outputs:"
        )
        out.append("")
        out.extend(FIDELITY_HEADER)
        for method, om in outlier_results:
            out.extend(fidelity_rows(f"outliers / {method}", om))
    out.append("")
    text = "\n".join(out)
    print(text)
    (work / "int8_backbone.md").write_text(text + "\n")
    if args.out:
        Path(args.out).write_text(text + "\n")
    write_json(work / "int8_backbone.json", {
        "times": times, "medians": med, "ratio": ratio, "manifest": shipped,
        "outliers": {m: om["fidelity"] for m, om in outlier_results},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
