"""GPU smoke check and first figures: fptserve on the CUDA execution provider.

Starts the daemon up to five times, one after the other, on the full-size models:

  cpu-fp32        --device cpu   (the reference answers; same GPU ONNX Runtime library)
  cuda-fp32       --device cuda  --onnxruntime-lib LIB --backbone-precision float32  (flags)
  cuda-fp16       FPTSERVE_DEVICE=cuda FPTSERVE_ONNXRUNTIME_LIB  (environment, the GPU default:
                  the float16 variant of the fp32 repository's backbone, float32 K/V; or, in a
                  repository without one, the fp16 repository)
  cuda-fp16-host  the same with --io-binding false: K/V to host memory between backbone and
                  side networks (the GPU default keeps them on the device), to compare
  cuda-fp16kv     the fp16 repository (`full --fp16`: float16 K/V into float16 side networks)

and for each: reads its log (the "ONNX Runtime ready" line must name cuda:0 for the CUDA
runs, and no "falling back to CPU" warning may appear), classifies a 2048x2048 12-bit
DICOM and a fixture for three tasks (two backbone passes), times sequential calls (end to
end and the daemon's own stage timings) and a burst of concurrent ones, and reads the GPU
memory the daemon holds. Answers are compared with cpu-fp32.

Exit status: 0 when both CUDA runs served on CUDA, 2 when one fell back to the CPU or did
not start, 1 on any other failure. Writes --json and --logs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benches"))

import data  # noqa: E402
import peer  # noqa: E402
import servers  # noqa: E402

TASKS = ["dr-grade", "skin-lesion", "chest-xray"]


class Daemon(servers.Server):
    name = "fptserve"

    def __init__(self, argv: list[str], env: dict):
        super().__init__(argv, env)

    def parse_addr(self, line: str) -> str | None:
        try:
            event = json.loads(line)
        except ValueError:
            return None
        return event.get("addr") if event.get("message") == "serving" else None


def serve_flags(binary: str) -> str:
    return subprocess.run([binary, "serve", "--help"], capture_output=True, text=True).stdout


def start(binary: str, repository: Path, device: str, lib: str, via_env: bool, extra: list[str]) -> Daemon:
    """The daemon on `device`, its ONNX Runtime and device given as flags or (`via_env`) in the
    environment; `extra`: more serve flags."""
    argv = [binary, "--log-format", "json", "serve", "--repository", str(repository), "--grpc-listen", "127.0.0.1:0",
            "--metrics-listen", "off", "--admin-listen", "off", "--max-in-flight", "256", *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("FPTSERVE_DEVICE", "FPTSERVE_ONNXRUNTIME_LIB", "FPTSERVE_BACKBONE_PRECISION")}
    if via_env:
        env.update(FPTSERVE_DEVICE=device, FPTSERVE_ONNXRUNTIME_LIB=lib)
    else:
        argv += ["--device", device, "--onnxruntime-lib", lib]
    return Daemon(argv, env)


def log_facts(lines: list[str]) -> dict:
    ready, engine, warnings = None, None, []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            event = {"message": line.strip()}
        if event.get("message") == "ONNX Runtime ready":
            ready = {k: event.get(k) for k in ("library", "requested", "device")}
        if event.get("message") == "engine":
            engine = {k: event.get(k) for k in ("io_binding", "max_batch_size", "max_batch_delay_ms")}
        if event.get("level") in ("WARN", "ERROR") or "falling back to CPU" in line:
            text = f"{event.get('level', '?')} {event.get('message', '')}"
            extra = {k: v for k, v in event.items() if k not in ("timestamp", "level", "message", "target")}
            if "error" in extra:  # ONNX Runtime's reason is at the end of a long message
                extra["error"] = "..." + str(extra["error"])[-300:]
            warnings.append(f"{text} {json.dumps(extra)}"[:600])
    fallback = any("falling back to CPU" in w for w in warnings)
    return {"ready": ready, "engine": engine, "fallback_warning": fallback, "warnings": warnings[:20]}


def gpu_memory_mib(pid: int) -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for row in out.splitlines():
        parts = [p.strip() for p in row.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def probabilities(response) -> list[list[float]]:
    return [[s.probability for s in r.scores] for r in response.results]


def measure(name: str, daemon: Daemon, stubs, inputs: dict[str, bytes], sequential: int, burst: int) -> dict:
    client = servers.Client(daemon.addr, stubs)
    result: dict = {"answers": {}}
    t = time.perf_counter()
    client.classify(inputs["serving"], TASKS)
    result["first_call_s"] = time.perf_counter() - t
    for key, blob in inputs.items():
        response = client.classify(blob, TASKS)
        result["answers"][key] = {"probabilities": probabilities(response),
                                  "labels": [r.label for r in response.results],
                                  "backbones": sorted({r.backbone for r in response.results}),
                                  "backbone_runs": response.backbone_runs}
    for _ in range(3):
        client.classify(inputs["serving"], TASKS)
    e2e, stages = [], {k: [] for k in ("decode_ms", "preprocess_ms", "backbone_ms", "adapters_ms", "total_ms",
                                        "queue_ms")}
    cache_hits = 0
    for _ in range(sequential):
        seconds, response = client.timed(inputs["serving"], TASKS)
        e2e.append(seconds)
        for k in stages:
            if hasattr(response.timings, k):
                stages[k].append(getattr(response.timings, k))
        cache_hits += getattr(response, "backbone_cache_hits", 0)
    result["sequential"] = {"calls": sequential, "tasks": len(TASKS), "e2e_s": summary(e2e),
                            "stages_ms": {k: summary(v) for k, v in stages.items() if v},
                            "backbone_cache_hits": cache_hits}
    # concurrency: one task, `burst` calls from 16 threads (a warm-up burst first)
    client.load(inputs["serving"], ["dr-grade"], 16, 16)
    wall, latencies = client.load(inputs["serving"], ["dr-grade"], 16, burst)
    latencies.sort()
    result["concurrent16"] = {"requests": burst, "req_per_s": burst / wall,
                              "p50_ms": latencies[len(latencies) // 2] * 1e3,
                              "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3}
    result["gpu_memory_mib"] = gpu_memory_mib(daemon.proc.pid)
    result["rss_mib"] = daemon.rss() / (1 << 20)
    client.close()
    print(f"  {name}: first call {result['first_call_s'] * 1e3:.0f} ms, "
          f"{len(TASKS)} tasks e2e median {result['sequential']['e2e_s']['median'] * 1e3:.1f} ms, "
          f"16 threads {result['concurrent16']['req_per_s']:.1f} req/s", flush=True)
    return result


def max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for key in a:
        for pa, pb in zip(a[key]["probabilities"], b[key]["probabilities"]):
            worst = max(worst, max(abs(x - y) for x, y in zip(pa, pb)))
    return worst


def table(runs: dict) -> str:
    head = ("| run | device (log) | backbone | K/V bound | first call ms | 3 tasks e2e ms | backbone ms | adapters ms | decode+pre ms "
            "| 1 task @16 req/s | p50 / p99 ms | GPU MiB | RSS MiB | max prob diff vs cpu-fp32 |")
    rows = [head, "|" + "---|" * 14]
    for name, r in runs.items():
        if "error" in r:
            device = ((r.get("log") or {}).get("ready") or {}).get("device")
            rows.append(f"| {name} | {device} | | | failed: see below |" + " |" * 9)
            continue
        st = r["sequential"]["stages_ms"]

        def med(k):
            return st[k]["median"] if k in st else float("nan")

        rows.append(
            f"| {name} | {(r['log']['ready'] or {}).get('device')} "
            f"| {', '.join(r['answers']['serving']['backbones'])} | {(r['log']['engine'] or {}).get('io_binding')} "
            f"| {r['first_call_s'] * 1e3:.0f} "
            f"| {r['sequential']['e2e_s']['median'] * 1e3:.1f} ({r['sequential']['e2e_s']['min'] * 1e3:.1f}–"
            f"{r['sequential']['e2e_s']['max'] * 1e3:.1f}) | {med('backbone_ms'):.1f} | {med('adapters_ms'):.1f} "
            f"| {med('decode_ms') + med('preprocess_ms'):.1f} | {r['concurrent16']['req_per_s']:.1f} "
            f"| {r['concurrent16']['p50_ms']:.0f} / {r['concurrent16']['p99_ms']:.0f} "
            f"| {r['gpu_memory_mib'] if r['gpu_memory_mib'] is not None else '-'} | {r['rss_mib']:.0f} "
            f"| {r.get('max_prob_diff_vs_cpu', float('nan')):.2e} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", required=True)
    p.add_argument("--lib", required=True, help="the GPU libonnxruntime.so")
    p.add_argument("--fp32", type=Path, required=True, help="repository of `fptserve_models full`")
    p.add_argument("--fp16", type=Path, help="repository of `fptserve_models full --fp16` (optional)")
    p.add_argument("--work", type=Path, required=True, help="generated inputs")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--logs", type=Path, required=True)
    p.add_argument("--cpu-only", action="store_true", help="only the cpu-fp32 run (to test this script)")
    p.add_argument("--sequential", type=int, default=20)
    p.add_argument("--burst", type=int, default=64)
    args = p.parse_args(argv)

    help_text = serve_flags(args.binary)
    extra = []
    if "--feature-cache-bytes" in help_text:
        extra += ["--feature-cache-bytes", "0"]  # every call runs the backbone: measure it, not the cache
    inputs = {"serving": data.serving_dicom(args.work, 2048).read_bytes(),
              "fixture": (ROOT / "models" / "fixtures" / "dicom" / "rgb8_rle.dcm").read_bytes()}
    # (name, repository, device, via environment, sequential calls, burst, more flags)
    plan = [("cpu-fp32", args.fp32, "cpu", False, max(3, args.sequential // 4), max(16, args.burst // 4), [])]
    precision = "--backbone-precision" in help_text
    fp16_repo = args.fp16 if args.fp16 and (args.fp16 / "tasks" / "dr-grade" / "1" / "manifest.json").exists() else None
    variant = precision and any(p.name.endswith("-fp16") for p in (args.fp32 / "backbones").iterdir())
    if not args.cpu_only:
        plan.append(("cuda-fp32", args.fp32, "cuda", False, args.sequential, args.burst,
                     ["--backbone-precision", "float32"] if precision else []))
        half = args.fp32 if variant else fp16_repo
        if half is not None:
            plan.append(("cuda-fp16", half, "cuda", True, args.sequential, args.burst, []))
            if "--io-binding" in help_text:
                plan.append(("cuda-fp16-host", half, "cuda", True, args.sequential, args.burst, ["--io-binding", "false"]))
        else:
            print("  no float16 variant and no fp16 repository: cuda-fp16 skipped", flush=True)
        if variant and fp16_repo is not None:
            plan.append(("cuda-fp16kv", fp16_repo, "cuda", True, args.sequential, args.burst, []))

    runs: dict = {}
    logs: list[str] = []
    with tempfile.TemporaryDirectory() as stubs_dir:
        stubs = peer.load_stubs(Path(stubs_dir))
        for name, repository, device, via_env, sequential, burst, flags in plan:
            print(f"smoke: {name} ({repository.name}, --device {device}{' via environment' if via_env else ''})",
                  flush=True)
            started = time.perf_counter()
            daemon = None
            try:
                daemon = start(args.binary, repository, device, args.lib, via_env, extra + flags)
                startup = time.perf_counter() - started
                facts = log_facts(daemon.lines)
                if device == "cuda" and (facts["fallback_warning"]
                                         or not ((facts["ready"] or {}).get("device") or "").startswith("cuda")):
                    raise RuntimeError("not on CUDA: " + ("; ".join(facts["warnings"][:2]) or str(facts["ready"])))
                r = measure(name, daemon, stubs, inputs, sequential, burst)
                r["startup_s"] = startup
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {e}"}
                print(f"  {name}: FAILED: {r['error'][:2000]}", flush=True)
            finally:
                if daemon is not None:
                    daemon.stop()
                    r["log"] = log_facts(daemon.lines)
                    logs += [f"==== {name}: {' '.join(daemon.argv)}\n", *daemon.lines]
            runs[name] = r

    reference = runs.get("cpu-fp32", {}).get("answers")
    for name, r in runs.items():
        if reference and "answers" in r:
            r["max_prob_diff_vs_cpu"] = max_diff(reference, r["answers"])
            r["labels_agree_with_cpu"] = all(reference[k]["labels"] == r["answers"][k]["labels"] for k in reference)
    cuda_ok = {name: ("error" not in r and (r["log"]["ready"] or {}).get("device", "").startswith("cuda")
                      and not r["log"]["fallback_warning"])
               for name, r in runs.items() if name.startswith("cuda")}
    report = {"runs": runs, "cuda_ok": cuda_ok, "tasks": TASKS, "extra_flags": extra,
              "inputs": {k: len(v) for k, v in inputs.items()}}
    args.json.write_text(json.dumps(report, indent=1, default=str))
    args.logs.write_text("".join(logs))
    print()
    print(table(runs))
    print()
    for name, r in runs.items():
        if "error" in r:
            print(f"{name} FAILED: {r['error'][:1500]}")
        if r.get("log", {}).get("warnings"):
            print(f"{name} warnings:")
            for w in r["log"]["warnings"][:8]:
                print(f"  {w}")
    print(f"CUDA execution provider in use: {cuda_ok}")
    if args.cpu_only:
        return 0 if "error" not in runs["cpu-fp32"] else 1
    if "cuda-fp32" not in runs or not all(cuda_ok.values()):
        return 2
    return 1 if any("error" in r for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
