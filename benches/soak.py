"""Soak: the daemon under mixed traffic for a set time, its resources sampled.

    .venv/bin/python benches/soak.py [--binary target/release/fptserve] [--duration 1200]
        [--out target/soak] [--concurrency 6] [--seed 0]

`make soak` runs it on the release build for 20 minutes; `make test` runs a two-minute version
(tests/python/test_soak.py). The daemon serves a copy of models/demo with the admin API, the
repository watch (1 s) and a feature cache of 96 KiB (about nine demo images: hits and
evictions both happen). Client threads send, at random (seeded):

  classify   one task, a random file of the corpus that decodes (every transfer syntax
             pydicom's test files and the fixtures hold), half of them from a hot set of 4
             (feature-cache hits)
  multi      2-4 tasks, some pinned to a version (task@1)
  sr         Classify with structured_report on a DICOM file
  explain    Classify with saliency maps on a DICOM file (1-2 tasks, sometimes a named
             class, an overlay PNG, Secondary Captures and a report): every task must come
             back with a map (and what was asked for), else the call counts as WRONG_ANSWER
  infer      KServe ModelInfer with 1-3 files (BYTES)
  bad        a corpus file the daemon refuses, random bytes, an unknown task, no task, a PNG
             with structured_report, an out-of-range frame
  cancelled  a Classify the client cancels after 0-20 ms
  deadline   a Classify with a 10-40 ms deadline (about the demo models' latency, so some
             answer in time; the daemon answers DEADLINE_EXCEEDED 20 ms before a deadline,
             before tonic's own timer would answer CANCELLED)
  list       ListTasks

while an admin thread loads a new adapter version as the default through the admin API,
then restores the default and unloads it, and a watch thread adds a version folder to the
repository and removes the previous one (the watch loads and unloads them).

Expected codes: OK for classify/multi/sr/infer/list and every admin call; for bad inputs the
code the same input got when the corpus was probed at start (or the stated one); CANCELLED
or OK for cancelled calls; DEADLINE_EXCEEDED or OK for deadline calls. Anything else is
unexpected. Every few seconds the daemon's RSS, open file descriptors and threads are read
from /proc. The bounds (after a warm-up, --warmup of the run, a quarter by default, comparing
the median of the last fifth of the samples with the median of the first fifth after
warm-up): RSS may grow by at most 5% + --rss-bound MiB (8 by default), descriptors by 8,
threads by 8 (tokio's blocking pool and gRPC connections come and go). The allocator warms
up for minutes: in a 20-minute run the RSS rose to its level in about 200 s and then stayed
within a few MiB of it, so a short run needs a wider RSS bound (tests/python/test_soak.py
says which). Writes soak.md and soak.json to --out; exit 0 when every call had an expected
code and no resource grew past its bound.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))

import peer  # noqa: E402
import servers  # noqa: E402

CACHE_BYTES = 96 * 1024
RSS_RELATIVE = 0.05
FD_BOUND = 8
THREAD_BOUND = 8
WEIGHTS = {"classify": 30, "multi": 14, "sr": 8, "explain": 6, "infer": 10, "bad": 12, "cancelled": 8,
           "deadline": 8, "list": 3}


class WrongAnswer(Exception):
    """An OK reply that does not hold what the call asked for."""


def proc_sample(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in status if ":" in line}
    return {"rss": int(fields["VmRSS"][0]) * 1024, "threads": int(fields["Threads"][0]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def corpus_files() -> list[Path]:
    """The fixtures and pydicom's DICOM test files under 2 MB (every transfer syntax)."""
    pydicom_files = ROOT / ".venv/lib/python3.11/site-packages/pydicom/data/test_files"
    out = sorted((ROOT / "models" / "fixtures" / "dicom").glob("*.dcm"))
    out += sorted((ROOT / "models" / "fixtures" / "images").glob("*.png"))
    out += sorted(p for p in pydicom_files.rglob("*.dcm") if p.stat().st_size < 2 << 20)
    return out


def transfer_syntax(data: bytes) -> str | None:
    import io

    import pydicom

    try:
        return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 (not a readable DICOM file)
        return None


class Soak:
    def __init__(self, args, daemon, stubs, kserve, admin, repo: Path):
        self.args = args
        self.daemon = daemon
        self.pb, pb_grpc = stubs
        self.kpb, kpb_grpc = kserve
        self.apb, apb_grpc = admin
        options = [("grpc.max_send_message_length", servers.MAX_MESSAGE),
                   ("grpc.max_receive_message_length", servers.MAX_MESSAGE)]
        self.channel = grpc.insecure_channel(daemon.addr, options=options)
        self.classifier = pb_grpc.ClassifierStub(self.channel)
        self.kserve = kpb_grpc.GRPCInferenceServiceStub(self.channel)
        self.admin = apb_grpc.AdminStub(grpc.insecure_channel(daemon.admin_addr))
        self.repo = repo
        self.lock = threading.Lock()
        self.calls: list[tuple[float, str, str, float]] = []  # (t, kind, code, seconds)
        self.unexpected: list[str] = []  # the first 50
        self.unexpected_calls = 0
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.tasks = ["dr-grade", "skin-lesion", "chest-xray"]

    # --- the corpus -----------------------------------------------------------------------

    def probe(self):
        """Each corpus file once: the ones that classify, and the code of the others; each
        DICOM that classifies once more with a structured report (a file without the Study
        and Series UIDs a report must reference is refused that)."""
        self.good, self.bad, self.syntaxes = [], [], collections.Counter()
        self.dicoms, self.no_report = [], []
        for path in corpus_files():
            data = path.read_bytes()
            field = "image" if path.suffix == ".png" else "dicom"
            try:
                self.classifier.Classify(self.pb.ClassifyRequest(**{field: data}, tasks=["dr-grade"]), timeout=60)
            except grpc.RpcError as error:
                self.bad.append((path.name, field, data, error.code().name))
                continue
            self.good.append((path.name, field, data))
            if field == "dicom":
                self.syntaxes[transfer_syntax(data)] += 1
                try:
                    self.classifier.Classify(self.pb.ClassifyRequest(dicom=data, tasks=["dr-grade"],
                                                                     structured_report=True), timeout=60)
                    self.dicoms.append((path.name, field, data))
                except grpc.RpcError as error:
                    self.no_report.append((path.name, field, data, error.code().name))
        self.hot = self.good[:4]

    # --- calls ----------------------------------------------------------------------------

    def record(self, kind: str, code: str, seconds: float, allowed: set[str], what: str = ""):
        with self.lock:
            self.calls.append((time.monotonic() - self.t0, kind, code, seconds))
            if code not in allowed:
                self.unexpected_calls += 1
                if len(self.unexpected) < 50:
                    self.unexpected.append(f"{kind} {what}: {code} (expected {sorted(allowed)})")

    def call(self, kind: str, allowed: set[str], fn, what: str = ""):
        t = time.perf_counter()
        try:
            fn()
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        except grpc.FutureCancelledError:
            code = "CANCELLED"
        except WrongAnswer as error:
            code = "WRONG_ANSWER"
            what = f"{what}: {error}"
        self.record(kind, code, time.perf_counter() - t, allowed, what)

    def classify_request(self, entry, tasks, **extra):
        name, field, data = entry[:3]
        return self.pb.ClassifyRequest(**{field: data}, tasks=tasks, **extra)

    def one(self, rng: random.Random):
        kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        ok = {"OK"}
        if kind == "classify":
            entry = rng.choice(self.hot if rng.random() < 0.5 else self.good)
            request = self.classify_request(entry, [rng.choice(self.tasks)])
            self.call(kind, ok, lambda: self.classifier.Classify(request, timeout=60), entry[0])
        elif kind == "multi":
            entry = rng.choice(self.good)
            tasks = rng.sample(["dr-grade", "dr-grade@1", "dr-grade@2", "skin-lesion", "chest-xray@1"], rng.randint(2, 4))
            tasks = list(dict.fromkeys(t.split("@")[0] if t.startswith("dr-grade") and rng.random() < 0.3 else t
                                       for t in tasks))
            request = self.classify_request(entry, tasks)
            self.call(kind, ok, lambda: self.classifier.Classify(request, timeout=60), f"{entry[0]} {tasks}")
        elif kind == "sr":
            entry = rng.choice(self.dicoms)
            request = self.classify_request(entry, ["dr-grade", "skin-lesion"], structured_report=True,
                                            request_id=f"soak-{rng.getrandbits(32)}")
            self.call(kind, ok, lambda: self.classifier.Classify(request, timeout=60), entry[0])
        elif kind == "explain":
            entry = rng.choice(self.dicoms)
            tasks = rng.sample(["dr-grade", "skin-lesion", "chest-xray"], rng.randint(1, 2))
            explain = self.pb.Explain(overlay=rng.random() < 0.5, secondary_capture=rng.random() < 0.5,
                                      class_name="malignant" if rng.random() < 0.2 else "")
            report = rng.random() < 0.5
            request = self.classify_request(entry, tasks, explain=explain, structured_report=report,
                                            request_id=f"soak-{rng.getrandbits(32)}")

            def explained():
                reply = self.classifier.Classify(request, timeout=60)
                for result in reply.results:
                    saliency = result.saliency
                    named_elsewhere = explain.class_name and explain.class_name not in [c.name for c in result.scores]
                    if named_elsewhere:
                        if "not one of this task's classes" not in saliency.unavailable:
                            raise WrongAnswer(f"{result.task}: {saliency.unavailable!r}")
                        continue
                    if saliency.unavailable or saliency.rows == 0 or len(saliency.values) != saliency.rows ** 2:
                        raise WrongAnswer(f"{result.task}: no map ({saliency.unavailable!r})")
                    if explain.overlay != bool(saliency.overlay_png) or \
                            explain.secondary_capture != bool(saliency.secondary_capture):
                        raise WrongAnswer(f"{result.task}: overlay/capture not as asked")
                if report != bool(reply.structured_report):
                    raise WrongAnswer("report not as asked")

            self.call(kind, ok, explained, f"{entry[0]} {tasks}")
        elif kind == "infer":
            entries = rng.sample(self.good, rng.randint(1, 3))
            request = self.kpb.ModelInferRequest(model_name=rng.choice(self.tasks))
            tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(entries)])
            tensor.contents.bytes_contents.extend(e[2] for e in entries)
            self.call(kind, ok, lambda: self.kserve.ModelInfer(request, timeout=60), str([e[0] for e in entries]))
        elif kind == "bad":
            self.bad_call(rng)
        elif kind == "cancelled":
            entry = rng.choice(self.good)
            request = self.classify_request(entry, [rng.choice(self.tasks)])

            def cancelled():
                future = self.classifier.Classify.future(request, timeout=60)
                time.sleep(rng.uniform(0, 0.02))
                future.cancel()
                future.result()

            self.call(kind, {"CANCELLED", "OK"}, cancelled, entry[0])
        elif kind == "deadline":
            entry = rng.choice(self.good)
            request = self.classify_request(entry, [rng.choice(self.tasks)])
            timeout = rng.uniform(0.010, 0.040)
            self.call(kind, {"DEADLINE_EXCEEDED", "OK"}, lambda: self.classifier.Classify(request, timeout=timeout),
                      entry[0])
        else:
            self.call(kind, ok, lambda: self.classifier.ListTasks(self.pb.ListTasksRequest(), timeout=30))

    def bad_call(self, rng: random.Random):
        choice = rng.randrange(7)
        good = rng.choice(self.good)
        if choice == 0 and self.bad:
            name, field, data, code = rng.choice(self.bad)
            request = self.pb.ClassifyRequest(**{field: data}, tasks=["dr-grade"])
            allowed, what = {code}, name
        elif choice == 6 and self.no_report:
            name, field, data, code = rng.choice(self.no_report)
            request = self.pb.ClassifyRequest(dicom=data, tasks=["dr-grade"], structured_report=True)
            allowed, what = {code}, f"{name} with structured_report"
        elif choice == 1:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 4096)))
            request = self.pb.ClassifyRequest(dicom=data, tasks=["dr-grade"])
            allowed, what = {"INVALID_ARGUMENT"}, "random bytes"
        elif choice == 2:
            request = self.classify_request(good, ["no-such-task"])
            allowed, what = {"NOT_FOUND"}, "unknown task"
        elif choice == 3:
            request = self.classify_request(good, [])
            allowed, what = {"INVALID_ARGUMENT"}, "no task"
        elif choice == 4:
            png = next(g for g in self.good if g[1] == "image")
            request = self.classify_request(png, ["dr-grade"], structured_report=True)
            allowed, what = {"INVALID_ARGUMENT"}, "PNG with structured_report"
        else:
            request = self.classify_request(good, ["dr-grade"], frame=100000)
            allowed, what = {"INVALID_ARGUMENT", "OUT_OF_RANGE"}, f"{good[0]} frame 100000"
        self.call("bad", allowed, lambda: self.classifier.Classify(request, timeout=60), what)

    def client(self, seed: int):
        rng = random.Random(seed)
        while not self.stop.is_set():
            self.one(rng)

    # --- model changes --------------------------------------------------------------------

    def adapter_swaps(self):
        """LoadAdapter (bytes, new version, made default), then the old default back and
        the new version unloaded: each change through the admin API."""
        n = 0
        folder = self.repo / "tasks" / "skin-lesion" / "1"
        manifest = json.loads((folder / "manifest.json").read_text())
        onnx = (folder / manifest["file"]).read_bytes()
        while not self.stop.wait(2.0):
            n += 1
            version = f"soak-{n}"
            text = json.dumps({**manifest, "version": version})
            self.call("admin", {"OK"}, lambda: self.admin.LoadAdapter(
                self.apb.LoadAdapterRequest(manifest_json=text, onnx=onnx, make_default=True), timeout=60), version)
            if self.stop.wait(2.0):
                return
            self.call("admin", {"OK"}, lambda: self.admin.SetDefaultVersion(
                self.apb.SetDefaultVersionRequest(task="skin-lesion", version="1"), timeout=60), "default 1")
            self.call("admin", {"OK"}, lambda: self.admin.UnloadAdapter(
                self.apb.UnloadAdapterRequest(task="skin-lesion", version=version), timeout=60), version)

    def watch_changes(self):
        """A version folder added to the repository (renamed into place, as a publisher
        does) and the previous one removed; counts the versions the watch made visible."""
        n, previous = 0, None
        source = self.repo / "tasks" / "chest-xray" / "1"
        self.watch_seen = 0
        while not self.stop.wait(3.0):
            n += 1
            version = f"w{n}"
            tmp = self.repo / "tasks" / "chest-xray" / f".{version}.tmp"
            shutil.copytree(source, tmp)
            manifest = json.loads((tmp / "manifest.json").read_text())
            (tmp / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
            tmp.rename(self.repo / "tasks" / "chest-xray" / version)
            if previous:
                shutil.rmtree(self.repo / "tasks" / "chest-xray" / previous)
            previous = version
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline and not self.stop.is_set():
                tasks = self.classifier.ListTasks(self.pb.ListTasksRequest(), timeout=30).tasks
                if any(v.version == version for t in tasks for v in t.versions):
                    self.watch_seen += 1
                    break
                time.sleep(0.2)

    def sampler(self, every: float):
        while True:
            self.samples.append({"t": time.monotonic() - self.t0, **proc_sample(self.daemon.proc.pid)})
            if self.stop.wait(every):
                return

    # --- the run --------------------------------------------------------------------------

    def run(self) -> dict:
        self.probe()
        self.t0 = time.monotonic()
        every = max(1.0, self.args.duration / 240)
        threads = [threading.Thread(target=self.sampler, args=(every,), daemon=True),
                   threading.Thread(target=self.adapter_swaps, daemon=True),
                   threading.Thread(target=self.watch_changes, daemon=True)]
        threads += [threading.Thread(target=self.client, args=(self.args.seed * 1000 + i,), daemon=True)
                    for i in range(self.args.concurrency)]
        for t in threads:
            t.start()
        self.stop.wait(self.args.duration)
        self.stop.set()
        for t in threads:
            t.join(120)
        return self.report()

    def report(self) -> dict:
        codes = collections.Counter((kind, code) for _, kind, code, _ in self.calls)
        windows = 8
        span = self.args.duration / windows
        latency = []
        for w in range(windows):
            xs = sorted(s for t, kind, code, s in self.calls
                        if w * span <= t < (w + 1) * span and code == "OK" and kind in ("classify", "multi", "sr", "infer"))
            if xs:
                latency.append({"window_s": [round(w * span), round((w + 1) * span)], "calls": len(xs),
                                "p50_ms": xs[len(xs) // 2] * 1e3, "p95_ms": xs[int(len(xs) * 0.95)] * 1e3,
                                "p99_ms": xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e3})
        warm = [s for s in self.samples if s["t"] >= self.args.duration * self.args.warmup]
        fifth = max(1, len(warm) // 5)
        growth = {}
        bounds = (("rss", (RSS_RELATIVE, self.args.rss_bound * (1 << 20))), ("fds", (0, FD_BOUND)),
                  ("threads", (0, THREAD_BOUND)))
        for key, bound in bounds:
            early = statistics.median(s[key] for s in warm[:fifth])
            late = statistics.median(s[key] for s in warm[-fifth:])
            limit = early * bound[0] + bound[1]
            growth[key] = {"early_median": early, "late_median": late, "growth": late - early, "bound": limit,
                           "max": max(s[key] for s in self.samples), "ok": late - early <= limit}
        metrics = self.metrics()
        result = {
            "duration_s": self.args.duration, "concurrency": self.args.concurrency, "seed": self.args.seed,
            "warmup_fraction": self.args.warmup,
            "binary": str(self.args.binary), "calls": len(self.calls),
            "calls_by_kind_and_code": {f"{k} {c}": n for (k, c), n in sorted(codes.items())},
            "unexpected_calls": self.unexpected_calls, "unexpected": self.unexpected,
            "corpus": {"decoding": len(self.good), "refused": len(self.bad), "without_report": len(self.no_report),
                       "refused_by_code": dict(collections.Counter(b[3] for b in self.bad)),
                       "transfer_syntaxes": dict(self.syntaxes)},
            "watch_versions_seen": getattr(self, "watch_seen", 0),
            "feature_cache": metrics,
            "latency": latency, "growth": growth, "samples": self.samples,
        }
        failures = [f"{self.unexpected_calls} calls with an unexpected code"] if self.unexpected_calls else []
        failures += [f"{key} grew by {g['growth']:.0f}, over its bound {g['bound']:.0f}"
                     for key, g in growth.items() if not g["ok"]]
        if self.daemon.proc.poll() is not None:
            failures.append(f"the daemon exited ({self.daemon.proc.returncode})")
        result["failures"] = failures
        result["passed"] = not failures
        return result

    def metrics(self) -> dict:
        text = urllib.request.urlopen(f"http://{self.daemon.metrics_addr}/metrics", timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            for name, key in (('fptserve_feature_cache_lookups_total{result="hit"}', "hits"),
                              ('fptserve_feature_cache_lookups_total{result="miss"}', "misses"),
                              ("fptserve_feature_cache_entries", "entries"), ("fptserve_feature_cache_bytes", "bytes")):
                if line.startswith(name + " "):
                    out[key] = float(line.split()[-1])
        out["budget_bytes"] = CACHE_BYTES
        return out


def markdown(r: dict) -> str:
    mib = 1 << 20
    lines = [f"# Soak: {r['duration_s']:.0f} s, {r['concurrency']} client threads, seed {r['seed']}", "",
             f"Binary `{r['binary']}`. **{'PASSED' if r['passed'] else 'FAILED: ' + '; '.join(r['failures'])}**: "
             f"{r['calls']} calls, "
             f"{r['unexpected_calls']} with an unexpected code.", "",
             f"Corpus: {r['corpus']['decoding']} files that classify, over transfer syntaxes "
             f"{', '.join(f'{k} ({v})' for k, v in r['corpus']['transfer_syntaxes'].items())}; "
             f"{r['corpus']['refused']} refused ({r['corpus']['refused_by_code']}), "
             f"{r['corpus']['without_report']} classify but cannot have a report. Watch: "
             f"{r['watch_versions_seen']} versions seen. Feature cache: {r['feature_cache']}.", "",
             "| calls | code | n |", "|---|---|---|"]
    lines += [f"| {k.split()[0]} | {k.split()[1]} | {n} |" for k, n in r["calls_by_kind_and_code"].items()]
    lines += ["", "Latency of answered classify/multi/sr/infer calls over time:", "",
              "| window s | calls | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|"]
    lines += [f"| {w['window_s'][0]}-{w['window_s'][1]} | {w['calls']} | {w['p50_ms']:.1f} | {w['p95_ms']:.1f} "
              f"| {w['p99_ms']:.1f} |" for w in r["latency"]]
    lines += ["", f"Resources after warm-up ({r['warmup_fraction']:.0%} of the run; median of the first and last "
              "fifth of the later samples):", "",
              "| resource | early | late | growth | bound | max | ok |", "|---|---|---|---|---|---|---|"]
    for key, g in r["growth"].items():
        scale, unit = (mib, " MiB") if key == "rss" else (1, "")
        lines.append(f"| {key} | {g['early_median'] / scale:.1f}{unit} | {g['late_median'] / scale:.1f}{unit} "
                     f"| {g['growth'] / scale:+.1f}{unit} | {g['bound'] / scale:.1f}{unit} "
                     f"| {g['max'] / scale:.1f}{unit} | {'yes' if g['ok'] else 'NO'} |")
    step = max(1, len(r["samples"]) // 12)
    lines += ["", "Resource curve (every sample, thinned):", "", "| t s | RSS MiB | fds | threads |",
              "|---|---|---|---|"]
    lines += [f"| {s['t']:.0f} | {s['rss'] / mib:.1f} | {s['fds']} | {s['threads']} |" for s in r["samples"][::step]]
    if r["unexpected"]:
        lines += ["", "Unexpected:", ""] + [f"- {u}" for u in r["unexpected"]]
    return "\n".join(lines) + "\n"


class Daemon(servers.Fptserve):
    """fptserve with a metrics listener, the watch and a small feature cache."""

    def __init__(self, binary: Path, repository: Path):
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        servers.Server.__init__(self, [
            str(binary), "--log-format", "json", "serve", "--repository", str(repository),
            "--grpc-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--metrics-listen", self.metrics_addr,
            "--watch-interval", "1", "--feature-cache-bytes", str(CACHE_BYTES), "--max-in-flight", "64",
        ])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "fptserve")
    p.add_argument("--duration", type=float, default=1200.0, help="seconds of traffic (default 1200)")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=float, default=0.25, help="fraction of the run before growth is measured")
    p.add_argument("--rss-bound", type=float, default=8.0, help="MiB of RSS growth allowed on top of 5%% (default 8)")
    p.add_argument("--out", type=Path, default=ROOT / "target" / "soak")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(ROOT / "models" / "demo", repo)
        stubs = peer.load_stubs(Path(tmp) / "stubs")
        admin = servers.admin_stubs(Path(tmp) / "stubs")
        daemon = Daemon(args.binary, repo)
        try:
            result = Soak(args, daemon, stubs, (service_pb2, service_pb2_grpc), admin, repo).run()
            crashed = daemon.proc.poll()
        finally:
            daemon.stop()
        result["daemon_exit"] = crashed
        result["daemon_stop_exit"] = daemon.proc.returncode
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    (args.out / "soak.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
