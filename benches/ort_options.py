"""ONNX Runtime session options: speed and resident memory of the backbone and of an adapter.

    .venv/bin/python benches/ort_options.py [--repo models/full] [--rounds 2] [--runs 3] [--out FILE]

`make bench` runs it as case 10. Why the daemon's sessions are set up as they are (src/runtime.rs),
measured rather than guessed: each candidate is one set of session options, run in a fresh
process of its own (so that its resident set is its own). The process creates the sessions
(one backbone, or --count adapters), runs each twice to warm it, then times --runs runs on one
random input. Rounds run every candidate once, the order reversed every other round, so that a
slow spell of a shared machine hits all alike. Reported: median seconds per run over all rounds,
its ratio to the first candidate (ONNX Runtime's Python defaults), and the resident set (VmRSS)
the sessions added, after their runs: weights, kernels and the working memory they keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> what it changes against ONNX Runtime's Python defaults: a per-session pool of
# --threads that spins, the CPU arena (grows by powers of two, kept at its peak), the memory
# pattern (planned on the first run, one block from the second), prepacked weights, ORT_ENABLE_ALL
DAEMON_BACKBONE = {"global_pool": True, "memory_pattern": False}
DAEMON_ADAPTER = {"global_pool": True, "memory_pattern": False, "arena": "off"}
CANDIDATES = {
    "Python defaults": {},
    "the daemon's backbone: one global pool, no memory pattern": DAEMON_BACKBONE,
    "the daemon's adapters: one global pool, no arena, no memory pattern": DAEMON_ADAPTER,
    "no memory pattern": {"memory_pattern": False},
    "one global pool": {"global_pool": True},
    "no spinning": {"spinning": False},
    "denormals as zero": {"denormal_as_zero": True},
    "no prepacking": {"prepacking": False},
    "arena grows as requested, no memory pattern": {"arena": "same-as-requested", "memory_pattern": False},
    "no arena, no memory pattern": {"arena": "off", "memory_pattern": False},
    "no arena, glibc keeps large blocks": {"arena": "off", "memory_pattern": False, "malloc_keeps": True},
    "the daemon's adapters, extended optimisation only": dict(DAEMON_ADAPTER, level="extended"),
    "the daemon's adapters, malloc_trim after warming": dict(DAEMON_ADAPTER, trim=True),
}
BACKBONE_CANDIDATES = [n for n in CANDIDATES if "adapters" not in n]
ADAPTER_CANDIDATES = ["Python defaults", "the daemon's adapters: one global pool, no arena, no memory pattern",
                      "no prepacking", "no arena, no memory pattern",
                      "the daemon's adapters, extended optimisation only",
                      "the daemon's adapters, malloc_trim after warming"]


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def child(model: str, threads: int, runs: int, options: dict, count: int) -> dict:
    """Runs in the candidate's own process: `count` sessions of `model`."""
    import ctypes

    import numpy as np
    import onnxruntime as ort

    libc = ctypes.CDLL("libc.so.6")
    if options.get("malloc_keeps"):
        # glibc: large blocks from the heap, not a fresh mmap each (which the kernel
        # zero-fills on every run), and no trimming of the heap's top
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        assert libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    if options.get("global_pool"):
        ort.set_global_thread_pool_sizes(threads, 1)
    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[
        options.get("level", "all")]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if options.get("global_pool"):
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.enable_mem_pattern = options.get("memory_pattern", True)
    if not options.get("spinning", True):
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if options.get("denormal_as_zero"):
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if not options.get("prepacking", True):
        so.add_session_config_entry("session.disable_prepacking", "1")
    arena = options.get("arena", "default")
    if arena == "off":
        so.enable_cpu_mem_arena = False
    elif arena == "same-as-requested":
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # max_mem 0 = no limit, extend strategy 1 = kSameAsRequested, initial chunk and
        # dead bytes per chunk -1 = defaults
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        so.add_session_config_entry("session.use_env_allocators", "1")
    rng = np.random.default_rng(0)
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

    feeds = []  # one input for every session: the inputs' memory is counted once, in the first

    def warm_session():
        session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        if not feeds:
            feeds.append({i.name: rng.standard_normal([1 if isinstance(d, str) else d for d in i.shape])
                          .astype(dtypes[i.type]) for i in session.get_inputs()})
        for _ in range(2):
            session.run(None, feeds[0])
        if options.get("trim"):
            libc.malloc_trim(0)
        return session, feeds[0]

    # with several sessions, the first one's RSS holds what the process sets up once (the
    # library's own state): the others' slope is what one more session costs
    before = vm_rss()
    sessions = [warm_session()]
    if count > 1:
        before = vm_rss()
        sessions += [warm_session() for _ in range(count - 1)]
    added = (vm_rss() - before) / max(count - 1, 1)
    times = []
    for _ in range(runs):
        for session, feed in sessions:
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
    return {"times": times, "rss_bytes": added}


def measure(model: Path, names: list[str], count: int, args) -> dict[str, dict]:
    results: dict[str, dict] = {n: {"times": [], "rss": []} for n in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            out = subprocess.run([sys.executable, __file__, "--model", str(model), "--threads", str(args.threads),
                                  "--runs", str(args.runs), "--count", str(count),
                                  "--child", json.dumps(CANDIDATES[name])],
                                 capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            results[name]["times"] += got["times"]
            results[name]["rss"].append(got["rss_bytes"])
            print(f"round {r + 1}, {model.name}, {name}: {statistics.median(got['times']) * 1e3:.1f} ms, "
                  f"{got['rss_bytes'] / 2**20:.2f} MiB", file=sys.stderr, flush=True)
    return results


def table(results: dict[str, dict], size: int) -> list[str]:
    """One row per candidate: times in ms, the first candidate as the time baseline."""
    base = statistics.median(next(iter(results.values()))["times"]) * 1e3
    lines = ["| options | ms per run: median (min-max) | time / Python defaults | RSS per session, MiB (median) "
             "| RSS / file |", "|---|---|---|---|---|"]
    for name, r in results.items():
        t, rss = [x * 1e3 for x in r["times"]], statistics.median(r["rss"])
        lines.append(f"| {name} | {statistics.median(t):.1f} ({min(t):.1f}-{max(t):.1f}) | "
                     f"{statistics.median(t) / base:.3f} | {rss / 2**20:.1f} | {rss / size:.2f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=str(ROOT / "models" / "full"), help="model repository (default models/full)")
    p.add_argument("--backbone", default="vit-b16-512", help="backbone name in --repo")
    p.add_argument("--task", default="dr-grade", help="task whose version 1 is the adapter measured")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="timed runs per candidate and round")
    p.add_argument("--count", type=int, default=20, help="adapter sessions per process (default 20)")
    p.add_argument("--out", help="also write the markdown section here")
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.threads, args.runs, json.loads(args.child), args.count)))
        return 0
    import onnxruntime

    started = time.time()
    repo = Path(args.repo)
    backbone_dir = repo / "backbones" / args.backbone
    backbone = backbone_dir / json.loads((backbone_dir / "manifest.json").read_text())["file"]
    adapter_dir = repo / "tasks" / args.task / "1"
    adapter = adapter_dir / json.loads((adapter_dir / "manifest.json").read_text())["file"]
    backbone_results = measure(backbone, BACKBONE_CANDIDATES, 1, args)
    adapter_results = measure(adapter, ADAPTER_CANDIDATES, args.count, args)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    out = [
        "## 10. ONNX Runtime session options",
        "",
        f"Written by `benches/ort_options.py` in {(time.time() - started) / 60:.1f} min on {cpu} ({os.cpu_count()} "
        f"logical cores), ONNX Runtime {onnxruntime.__version__} from Python, {args.threads} intra-op threads. "
        "Each candidate runs in a process of its own: it creates the sessions, runs each twice, then times "
        f"{args.runs} runs per session; {args.rounds} rounds, the order reversed every other round. RSS is what "
        "one session added to the process, warm (for adapters, the slope from the first session to the last).",
        "",
        f"Backbone `{args.backbone}` ({backbone.stat().st_size / 2**20:.0f} MiB file), one session, one image:",
        "",
        *table(backbone_results, backbone.stat().st_size),
        "",
        f"Adapter `{args.task}@1` ({adapter.stat().st_size / 2**10:.0f} KiB file), {args.count} sessions in one "
        "process:",
        "",
        *table(adapter_results, adapter.stat().st_size),
    ]
    text = "\n".join(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
