"""The benchmark harness in quick mode (benches/run.py --quick): every case runs once against
its peer on the demo models. Timings are not judged here (they belong in BENCHMARKS.md, as
ratios); what must hold is that every case runs, that fptserve and each peer gave the same
answers (the harness stops with an error otherwise) and that the report names every case."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("FPTSERVE_BIN", ROOT / "target" / "debug" / "fptserve"))


def test_quick_benchmarks_run_every_case(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    work = ROOT / "target" / "bench-quick"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "run.py"), "--quick", "--binary", str(BINARY),
         "--out", str(out), "--work", str(work)],
        capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    for title in ("1. Serving overhead", "2. Many tasks per image", "3. Memory",
                  "4. Decode and preprocess per transfer syntax", "5. Throughput under concurrency",
                  "6. Adapter hot swap", "7. Feature cache",
                  "8. Training memory: FPT+ with preloaded K/V against full fine-tuning", "9. INT8 backbone (CPU)",
                  "10. ONNX Runtime session options",
                  "11. Decode-bound throughput: exact vs reduced-resolution decoding",
                  "12. Saliency maps: the cost of explain"):
        assert f"## {title}" in report
    assert re.search(r"fptserve / floor: (\d+\.\d+)", report)
    raw = json.loads((work / "results-quick.json").read_text())
    # one backbone run serves K tasks: the harness checked backbone_runs == 1 for every K
    many = raw["2. Many tasks per image"]
    assert sorted(many, key=int) == ["1", "4", "8", "32", "64"]
    # the fused models were measured up to FUSED_MAX and extrapolated beyond, and said so
    assert [many[k]["fused_measured"] for k in ("1", "8", "32", "64")] == [True, True, False, False]
    # every transfer syntax of the decode case was decoded by both sides
    decoded = dict(raw["4. Decode and preprocess per transfer syntax"])
    fidelity = decoded.pop("reduced_fidelity")
    assert len(decoded) == 10 and all(v["fptserve_decode"] and v["python_decode"] for v in decoded.values())
    # the reduced path decoded J2K, HTJ2K and DCT JPEG smaller (1024 -> 64 for the demo's 64 x 64 backbone)
    # and was compared with the exact path for every task, on pydicom's files too
    reduced = {k: v["decoded_at"] for k, v in decoded.items() if "decoded_at" in v}
    assert len(reduced) == 5 and all(w < 1024 and h < 1024 for w, h in reduced.values()), reduced
    assert fidelity["inputs"] > len(reduced) and fidelity["label_agreement"] is not None
    assert len(fidelity["tasks"]) == 4  # every task version of models/demo
    # decode-bound throughput: both paths at concurrency 1 and 8
    bound = raw["11. Decode-bound throughput: exact vs reduced-resolution decoding"]
    assert set(bound) == {"1", "8"} and all(set(v) == {"exact", "reduced"} for v in bound.values())
    # explain: every variant on cache hits, a backbone run with and without, the side network alone
    explain = raw["12. Saliency maps: the cost of explain"]
    assert set(explain["cache_hit"]) == {"off", "map", "map + overlay PNG", "map + Secondary Capture + SR"}
    assert set(explain["backbone_run"]) == {"off", "map + overlay PNG"} and len(explain["side_network"]) == 2
    # memory grows with adapters, and by less per adapter than per fused model
    memory = raw["3. Memory"]
    assert memory["per_adapter_bytes"]["warm"] < memory["per_fused_model_bytes"]["warm"]
    # throughput was measured with batching on and off (the harness checked equal answers)
    throughput = next(iter(raw["5. Throughput under concurrency"].values()))
    assert {"fptserve, batches of up to 8@16", "fptserve, no batching@16", "python peer@16"} <= set(throughput)
    # the feature cache case saw a miss then a hit per image (the harness checks it)
    assert raw["7. Feature cache"]["hit"]["n"] >= 1
