"""Bound against host K/V path (`--io-binding`), one daemon of each, same machine, same run.

    .venv/bin/python benches/bound_vs_host.py [--repo models/full] [--binary target/release/fptserve]
        [--images 7] [--rounds 3]

The worst case for the bound path, which runs every adapter on every image of a backbone batch:
--images distinct 2048x2048 12-bit DICOMs (the ones `make bench` generates, else made here), sent
at once, each asking for one of the repository's tasks in turn, so the batch mixes them; the
feature cache is off (as in every bench server). Rounds alternate the two daemons. Reported per path: the daemon's median
adapter and backbone stage times (its own timings in the response), and the largest probability
difference between the paths over every call.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))

import data  # noqa: E402
from servers import Fptserve  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "models" / "full")
    p.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "fptserve")
    p.add_argument("--images", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=ROOT / "target" / "bench")
    args = p.parse_args()

    from grpc_tools import protoc

    stubs = Path(tempfile.mkdtemp())
    protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={stubs}", f"--grpc_python_out={stubs}",
                 str(ROOT / "proto" / "fptserve" / "v1" / "classifier.proto")])
    sys.path.insert(0, str(stubs))
    from fptserve.v1 import classifier_pb2 as pb
    from fptserve.v1 import classifier_pb2_grpc as pb_grpc

    args.work.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(args.images):
        path = args.work / f"picture-2048-{100 + i}.dcm"
        if not path.exists():
            data.write_native(path, data.picture(2048, 12, seed=100 + i), 12)
        images.append(path.read_bytes())
    tasks = sorted(d.name for d in (args.repo / "tasks").iterdir() if d.is_dir())

    timings: dict[str, list] = {"host": [], "bound": []}
    answers: dict[str, list] = {"host": [], "bound": []}
    threads = os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        daemons = {label: stack.enter_context(Fptserve(
            args.binary, args.repo, threads, ("--max-batch-size", str(args.images), "--max-batch-delay-ms", "4000",
                                              "--io-binding", flag)))
                   for label, flag in (("host", "false"), ("bound", "true"))}
        for _ in range(args.rounds):
            for label, daemon in daemons.items():
                with grpc.insecure_channel(daemon.addr) as channel:
                    stub = pb_grpc.ClassifierStub(channel)
                    calls = [stub.Classify.future(pb.ClassifyRequest(dicom=image, tasks=[tasks[i % len(tasks)]]),
                                                  timeout=600) for i, image in enumerate(images)]
                    responses = [c.result() for c in calls]
                batch = {r.results[0].backbone_batch_size for r in responses}
                timings[label].append((statistics.median(r.timings.adapters_ms for r in responses),
                                       statistics.median(r.timings.backbone_ms for r in responses), batch))
                answers[label].append([[s.probability for s in r.results[0].scores] for r in responses])

    diff = max(abs(a - b) for host, bound in zip(answers["host"], answers["bound"])
               for rh, rb in zip(host, bound) for a, b in zip(rh, rb))
    print(f"{args.images} images, tasks {', '.join(tasks)}, {args.rounds} rounds")
    print("| path | backbone batch | adapters ms (median of rounds) | backbone ms |")
    print("|---|---|---|---|")
    for label, rows in timings.items():
        print(f"| {label} | {sorted(set().union(*(b for _, _, b in rows)))} "
              f"| {statistics.median(a for a, _, _ in rows):.1f} | {statistics.median(b for _, b, _ in rows):.0f} |")
    print(f"max probability difference bound vs host: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
