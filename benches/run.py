"""fptserve against its peers, side by side in one run; writes BENCHMARKS.md.

    python benches/run.py --full  --binary target/release/fptserve   (make bench)
    python benches/run.py --quick --binary target/debug/fptserve     (CI: each case once, tiny models)

Full mode serves the full-size models (models/full: ViT-B/16 at 512, side network at 128, made
by `make full-models`); quick mode the demo models (models/demo). Generated inputs, cloned
repositories, fused models and INT8 variants are kept in --work between runs. Machines are noisy:
every number is a median with min and max over repetitions, and every claim is a ratio to a peer
measured in the same run.

`--cases` reruns some cases: the report keeps the other sections of the --out file as they were,
and its header names them as kept from an earlier run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import peer  # noqa: E402
import repos  # noqa: E402
import servers  # noqa: E402
from servers import ROOT  # noqa: E402


def machine(binary: Path) -> list[tuple[str, str]]:
    import grpc
    import numpy
    import onnxruntime
    import PIL
    import pydicom

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    return [
        ("date (UTC)", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")),
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores"),
        ("memory", f"{int(mem) / (1 << 20):.1f} GiB"),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("fptserve", f"{version} ({binary.relative_to(ROOT) if binary.is_relative_to(ROOT) else binary}, "
                     f"commit {commit})"),
        ("ONNX Runtime", f"{onnxruntime.__version__} (the daemon loads the same release's library)"),
        ("Python peer", f"Python {platform.python_version()}, grpcio {grpc.__version__}, pydicom {pydicom.__version__}, "
                        f"numpy {numpy.__version__}, Pillow {PIL.__version__}"),
    ]


def settings(args, stubs) -> cases.Settings:
    demo = repos.adapter(ROOT / "models" / "demo", "dr-grade", "1")
    threads = args.threads or os.cpu_count()
    if args.quick:
        return cases.Settings(
            mode="quick", binary=args.binary, work=args.work, stubs=stubs, threads=threads, template=demo,
            tiny_template=demo, serving_size=2048, decode_size=1024, repeats=1, warmup=1,
            throughput_models=[("tiny (demo), N = 2 / 16", demo, 2, 16)],
        )
    full_repository = ROOT / "models" / "full"
    if not (full_repository / "tasks" / "dr-grade" / "1" / "manifest.json").exists():
        raise SystemExit("models/full is missing: run `make full-models` first (make bench does)")
    full = repos.adapter(full_repository, "dr-grade", "1")
    return cases.Settings(
        mode="full", binary=args.binary, work=args.work, stubs=stubs, threads=threads, template=full,
        tiny_template=demo, serving_size=2048, decode_size=3000, repeats=args.repeats or 5, warmup=2,
        throughput_models=[("tiny (demo), N = 40 / 160", demo, 40, 160), ("full, N = 4 / 16", full, 4, 16)],
    )


def earlier_sections(path: Path) -> dict[str, str]:
    """The sections of an earlier report by case number ("## 3. Memory ..." is case 3)."""
    sections: dict[str, list[str]] = {}
    number = None
    if path.exists():
        for line in path.read_text().splitlines():
            heading = re.match(r"## (\d+)\. ", line)
            if heading:
                number = heading.group(1)
                sections[number] = []
            if number:
                sections[number].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items()}


def report(s: cases.Settings, sections: dict[str, cases.Section], kept: dict[str, str],
           info: list[tuple[str, str]], seconds: float, command: str) -> str:
    ran = ", ".join(sorted(sections, key=int))
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` ({s.mode} mode; cases {ran}) in {seconds / 60:.1f} min. fptserve and each peer",
        "ran side by side in this one run on this machine; ratios are of medians. Rerun it rather than",
        "compare numbers across machines or runs.",
        "",
    ]
    if kept:
        lines += [f"Kept from an earlier report, not rerun by this one (each says when and how it was measured): "
                  f"{', '.join(sorted(kept, key=int))}.", ""]
    lines += [
        cases.table(["", ""], [[k, v] for k, v in info]),
        "",
        f"Models: backbone `{s.template.backbone_name}`, task adapter `{s.template.spec}` "
        f"(backbone input {s.template.manifest['preprocessing']['backbone_size'][0]}, side input "
        f"{s.template.manifest['preprocessing']['side_size'][0]}); ONNX Runtime on the CPU, "
        f"{s.threads} intra-op threads in every process.",
        "",
    ]
    for number in sorted({*sections, *kept}, key=int):
        if number in sections:
            lines += [f"## {sections[number].title}", "", sections[number].markdown.rstrip(), ""]
        else:
            lines += [kept[number], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="each case once on the demo models (CI)")
    mode.add_argument("--full", action="store_true", help="full-size models, repeated runs (people)")
    p.add_argument("--binary", type=Path, required=True, help="the fptserve binary to measure")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="report to write")
    p.add_argument("--work", type=Path, default=ROOT / "target" / "bench", help="generated inputs and models")
    p.add_argument("--cases", default=",".join(cases.CASES), help="comma-separated case numbers (default all)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads everywhere (default: all cores)")
    p.add_argument("--repeats", type=int, default=0, help="repetitions per measurement (full mode default 5)")
    args = p.parse_args(argv)
    args.binary = args.binary.resolve()
    args.work = args.work.resolve()
    if not args.binary.exists():
        raise SystemExit(f"{args.binary} does not exist: build it first")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as stubs_dir:
        stubs = peer.load_stubs(Path(stubs_dir))
        s = settings(args, stubs)
        s.admin_stubs = servers.admin_stubs(Path(stubs_dir))
        sections = {}
        for number in (n.strip() for n in args.cases.split(",")):
            case = cases.CASES[number]
            t = time.perf_counter()
            print(f"case {number}: {case.__name__} ...", flush=True)
            sections[number] = case(s)
            print(f"case {number}: done in {time.perf_counter() - t:.0f} s", flush=True)
    seconds = time.perf_counter() - started
    command = "make bench" if args.full else "make bench-quick"
    if set(sections) != set(cases.CASES):
        command = f"python benches/run.py --{s.mode} --cases {args.cases}"
    kept = {k: v for k, v in earlier_sections(args.out).items() if k not in sections}
    args.out.write_text(report(s, sections, kept, machine(args.binary), seconds, command))
    raw = {section.title: section.raw for section in sections.values()}
    results = args.work / f"results-{s.mode}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(raw, indent=1, default=str))
    print(f"wrote {args.out} and {results} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
