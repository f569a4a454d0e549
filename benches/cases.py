"""The benchmark cases of BENCHMARKS.md. Each case runs fptserve and its peer side by side in
this run, on this machine, and returns a `Section`: the markdown for the report and the raw
numbers for results.json.

Timing discipline: warm-up calls first, then a block of repetitions per contender, with a
pause between blocks: ONNX Runtime's worker threads spin for a while after a run, and on a
small machine a baseline's spinning threads in this process would slow the daemon's next call
(measured: 3x on 2 cores when calls alternated). Medians with min and max; ratios of medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pydicom

import data
import peer
import repos
from servers import BENCHES, Client, Fptserve, Peer

MiB = 1 << 20
FUSED_MAX = 8  # fused models held at once in case 2


@dataclass
class Settings:
    """What one mode runs: models, sizes and repetitions."""

    mode: str
    binary: Path
    work: Path
    stubs: tuple
    threads: int
    template: repos.Adapter  # the adapter every case serves (and clones)
    tiny_template: repos.Adapter  # the demo models, for the throughput case
    serving_size: int  # the serving cases' DICOM (uncompressed), pixels per side
    decode_size: int  # the decode case's DICOMs, pixels per side
    repeats: int  # timed repetitions per measurement
    warmup: int
    task_counts: tuple[int, ...] = (1, 4, 8, 32, 64)
    adapter_counts: tuple[int, ...] = (0, 10, 100)
    full_model_counts: tuple[int, ...] = (1, 2, 3)
    concurrency: tuple[int, ...] = (1, 16)
    # (models label, template, requests at concurrency 1, requests at the highest concurrency)
    throughput_models: list = field(default_factory=list)
    admin_stubs: tuple | None = None
    # hot swap: swaps timed, and requests per client in each latency phase
    swaps: int = 3
    swap_requests: int = 4
    memory_versions: int = 100


@dataclass
class Section:
    title: str
    markdown: str
    raw: dict


# --------------------------------------------------------------------------------------------
# numbers and tables
# --------------------------------------------------------------------------------------------


def stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def ms(s: dict, digits: int = 1) -> str:
    """'median (min–max)' of a stats dict in seconds, shown in milliseconds."""
    f = f"{{:.{digits}f}}"
    text = f.format(s["median"] * 1e3)
    if s["n"] > 1:
        text += f" ({f.format(s['min'] * 1e3)}–{f.format(s['max'] * 1e3)})"
    return text


def per_s(s: dict, digits: int = 2) -> str:
    """'median (min–max)' of a stats dict of rates."""
    f = f"{{:.{digits}f}}"
    text = f.format(s["median"])
    if s["n"] > 1:
        text += f" ({f.format(s['min'])}–{f.format(s['max'])})"
    return text


def mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


# --------------------------------------------------------------------------------------------
# the direct ONNX Runtime baseline
# --------------------------------------------------------------------------------------------


_GLOBAL_POOL_THREADS: int | None = None


def session(path: Path, threads: int) -> ort.InferenceSession:
    """A baseline session. Every one in this process shares one thread pool of `threads`, as the
    daemon's do: with a pool per session (ONNX Runtime's default) a side network took 17 ms
    instead of 3 when twenty sessions took turns (case 10), which would make the design's floor
    of case 2 no floor."""
    global _GLOBAL_POOL_THREADS
    if _GLOBAL_POOL_THREADS is None:
        ort.set_global_thread_pool_sizes(threads, 1)
        _GLOBAL_POOL_THREADS = threads
    if threads != _GLOBAL_POOL_THREADS:
        raise ValueError(f"one thread pool of {_GLOBAL_POOL_THREADS} serves this process; asked for {threads}")
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ready_tensors(dicom: bytes, template: repos.Adapter) -> tuple[np.ndarray, np.ndarray]:
    """The template's backbone and side inputs for a DICOM, made by the peer's pipeline."""
    pre = template.manifest["preprocessing"]
    rgb = peer.decode_display(dicom)
    pixels = peer.preprocess(rgb, pre["backbone_size"][0], pre["mean"], pre["std"])
    side = peer.preprocess(rgb, pre["side_size"][0], pre["mean"], pre["std"])
    return pixels, side


class Direct:
    """backbone.onnx + side.onnx run by ONNX Runtime from Python on ready tensors."""

    def __init__(self, template: repos.Adapter, threads: int, adapters: int = 1):
        self.backbone = session(template.backbone_onnx, threads)
        self.sides = [session(template.side_onnx, threads) for _ in range(adapters)]

    def run(self, pixels: np.ndarray, side_pixels: np.ndarray, adapters: int = 1) -> list[np.ndarray]:
        return self.timed(pixels, side_pixels, adapters)[0]

    def timed(self, pixels: np.ndarray, side_pixels: np.ndarray,
              adapters: int = 1) -> tuple[list[np.ndarray], float, float]:
        """Logits of the first `adapters` side networks, the backbone's seconds and the sides'."""
        start = time.perf_counter()
        outputs = self.backbone.run(None, {"pixel_values": pixels})
        backbone_done = time.perf_counter()
        names = [o.name for o in self.backbone.get_outputs()]
        kv = dict(zip(names, outputs))
        logits = [
            s.run(["logits"], {"side_pixel_values": side_pixels, "key_states": kv["key_states"],
                               "value_states": kv["value_states"]})[0]
            for s in self.sides[:adapters]
        ]
        return logits, backbone_done - start, time.perf_counter() - backbone_done


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64).ravel()
    e = np.exp(z - z.max())
    return e / e.sum()


def check_same_answer(response, logits: np.ndarray, what: str, tolerance: float = 2e-3) -> float:
    """fptserve's probabilities against the baseline's: both must have done the same work."""
    got = np.array([s.probability for s in response.results[0].scores])
    want = softmax(logits)
    diff = float(np.abs(got - want).max())
    if diff > tolerance:
        raise RuntimeError(f"{what}: fptserve and the baseline disagree by {diff:.3g} (> {tolerance})")
    return diff


def warm(fn, times: int) -> None:
    for _ in range(times):
        fn()


def block(fn, times: int) -> list:
    """`times` calls of `fn` after a pause that lets spinning threads of earlier work park."""
    time.sleep(0.5)
    return [fn() for _ in range(times)]


def elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# case 1: serving overhead
# --------------------------------------------------------------------------------------------


def serving_overhead(s: Settings) -> Section:
    t = s.template
    path = data.serving_dicom(s.work, s.serving_size)
    dicom = path.read_bytes()
    pixels, side = ready_tensors(dicom, t)
    direct = Direct(t, s.threads)
    calls, compute = [], []
    with Fptserve(s.binary, t.repository, s.threads) as server:
        client = Client(server.addr, s.stubs)
        _, response = client.timed(dicom, [t.spec])
        diff = check_same_answer(response, direct.run(pixels, side)[0], "serving overhead")
        warm(lambda: (client.classify(dicom, [t.spec]), direct.run(pixels, side)), s.warmup)

        def ours():
            calls.extend(block(lambda: client.timed(dicom, [t.spec]), 2))

        def theirs():
            compute.extend(block(lambda: direct.timed(pixels, side)[1:], 2))

        # rounds of two blocks, fptserve's and the baseline's, the order alternating, so that
        # a slow spell of this shared machine hits both alike
        for r in range(s.repeats):
            for run in ((ours, theirs) if r % 2 == 0 else (theirs, ours)):
                run()
        client.close()
    e2e = [seconds for seconds, _ in calls]
    stages = {k: [getattr(r.timings, k) / 1e3 for _, r in calls]
              for k in ("decode_ms", "preprocess_ms", "backbone_ms", "adapters_ms")}
    raw_backbone = [b for b, _ in compute]
    raw_total = [b + a for b, a in compute]
    e2e_s, compute_s, raw_backbone_s = stats(e2e), stats(raw_total), stats(raw_backbone)
    ratio = e2e_s["median"] / compute_s["median"]
    overhead = e2e_s["median"] - compute_s["median"]
    stage_s = {k: stats(v) for k, v in stages.items()}
    backbone_ratio = stage_s["backbone_ms"]["median"] / raw_backbone_s["median"]
    rows = [
        ["fptserve: Classify over gRPC (DICOM bytes in, probabilities out)", ms(e2e_s)],
        ["ONNX Runtime from Python: backbone + side network on ready tensors", ms(compute_s)],
        ["fptserve: backbone stage (from the response)", ms(stage_s["backbone_ms"])],
        ["ONNX Runtime from Python: backbone alone", ms(raw_backbone_s)],
    ]
    md = f"""\
One task ({t.spec}, backbone {t.backbone_name}) on a {s.serving_size}x{s.serving_size} DICOM, 16 bits
allocated, 12 stored, uncompressed ({len(dicom) / MiB:.1f} MiB), {len(e2e)} calls after {s.warmup} warm-up.
The baseline is the same two ONNX files run by ONNX Runtime from Python on tensors prepared in
advance, with the same intra-op threads ({s.threads}); it does no decoding, no resizing and no I/O,
so it is the floor. {s.repeats} rounds of 2 fptserve calls and 2 baseline runs, the order alternating
between rounds. fptserve's probabilities equal the baseline's (max difference {diff:.1e}).

{table(["", "latency, ms: median (min–max)"], rows)}

**fptserve / floor: {ratio:.3f}** (1.0 is the floor; goal <= 1.03); non-compute time {overhead * 1e3:.1f} ms per call.
**Backbone stage / ONNX Runtime's backbone alone: {backbone_ratio:.3f}** (goal <= 1.01).

fptserve's own stage timings (from the response), median ms: decode {ms(stage_s['decode_ms'])},
preprocess (window to 8 bits + both resizes) {ms(stage_s['preprocess_ms'])}, backbone
{ms(stage_s['backbone_ms'])}, side network {ms(stage_s['adapters_ms'])}.
"""
    raw = {"e2e": e2e, "direct": raw_total, "direct_backbone": raw_backbone, "stages": stages, "ratio": ratio,
           "backbone_ratio": backbone_ratio, "overhead_s": overhead, "max_probability_diff": diff}
    return Section("1. Serving overhead", md, raw)


# --------------------------------------------------------------------------------------------
# case 2: many tasks per image
# --------------------------------------------------------------------------------------------


def many_tasks(s: Settings) -> Section:
    t = s.template
    kmax = max(s.task_counts)
    repository = repos.cloned_repository(s.work, t, kmax)
    fused_path = repos.fused_model(s.work, t)
    dicom = data.serving_dicom(s.work, s.serving_size).read_bytes()
    pixels, side = ready_tensors(dicom, t)
    # K fused models are K full models in memory (case 3: over 0.6 GiB each when warm): past
    # FUSED_MAX they would not fit, so larger K are K times the per-model time at FUSED_MAX
    fused = [session(fused_path, s.threads) for _ in range(min(kmax, FUSED_MAX))]
    direct = Direct(t, s.threads, adapters=kmax)

    def run_fused(k: int) -> float:
        return elapsed(lambda: [f.run(["logits"], {"pixel_values": pixels, "side_pixel_values": side})
                                for f in fused[:k]])

    def run_direct(k: int) -> float:
        return elapsed(lambda: direct.run(pixels, side, k))

    raw, rows = {}, []
    per_fused_model = None
    with Fptserve(s.binary, repository, s.threads) as server:
        client = Client(server.addr, s.stubs)
        for k in s.task_counts:
            tasks = [repos.clone_name(i) for i in range(k)]
            _, response = client.timed(dicom, tasks)
            if response.backbone_runs != 1 or len(response.results) != k:
                raise RuntimeError(f"{k} tasks: expected 1 backbone run and {k} results, got "
                                   f"{response.backbone_runs} and {len(response.results)}")
            fused_logits = fused[0].run(["logits"], {"pixel_values": pixels, "side_pixel_values": side})[0]
            check_same_answer(response, fused_logits, f"{k} tasks vs the fused model")
            measured = k <= len(fused)

            def once():
                client.classify(dicom, tasks)
                if measured:
                    run_fused(k)
                run_direct(k)

            warm(once, s.warmup)
            ours, theirs, floor = [], [], []
            runs = [(ours, lambda: client.timed(dicom, tasks)[0]), (floor, lambda: run_direct(k))]
            if measured:
                runs.append((theirs, lambda: run_fused(k)))
            # rounds of one run each, the order reversed every other round: a slow spell of
            # this shared machine hits all three alike
            for r in range(s.repeats):
                for times, run in (runs if r % 2 == 0 else runs[::-1]):
                    times.append(run())
            if measured:
                per_fused_model = [x / k for x in theirs]
            else:
                theirs = [x * k for x in per_fused_model]
            o, f, d = stats(ours), stats(theirs), stats(floor)
            tput = {name: stats([1.0 / x for x in xs]) for name, xs in
                    (("fptserve", ours), ("fused", theirs), ("direct", floor))}
            ratio = tput["fptserve"]["median"] / tput["fused"]["median"]
            of_floor = d["median"] / o["median"]
            raw[k] = {"fptserve": ours, "fused": theirs, "fused_measured": measured, "direct_shared_backbone": floor,
                      "ratio": ratio, "of_floor": of_floor}
            mark = "" if measured else " (extrapolated)"
            rows.append([str(k), ms(o), per_s(tput["fptserve"], 3), ms(f) + mark, per_s(tput["fused"], 3) + mark,
                         f"**{ratio:.2f}**", ms(d), f"**{of_floor:.3f}**"])
        client.close()
    lowest = min(r["of_floor"] for r in raw.values())
    md = f"""\
K tasks for one image ({s.serving_size}x{s.serving_size} uncompressed DICOM). fptserve answers all K in
one Classify call over gRPC: one backbone run (checked: `backbone_runs` = 1) and K side networks.
The peer is what a one-model-per-task server runs: K separate fine-tuned models, each the backbone
and side network fused into one ONNX graph (onnx.compose of the same two files), run by ONNX
Runtime from Python on ready tensors, one after the other; it pays no decoding and no gRPC, so the
comparison favours it. Up to K = {len(fused)} it is measured with K sessions; beyond, K fused models would
not fit in this machine's memory (over 0.6 GiB each when warm, case 3), so its time is K times the
per-model time measured at K = {len(fused)} (marked extrapolated). The floor is the design's: one backbone
run and K side networks by ONNX Runtime from Python on ready tensors; the last column is the floor's
time over fptserve's (goal >= 0.95 at every K). Every session in the Python process shares one thread
pool, as the daemon's do (a pool per session makes each side network about 5x slower: case 10).
{s.repeats} rounds after {s.warmup} warm-up, each one fptserve call, one floor run and one run of the fused
models, the order reversed every other round; threads {s.threads}.

{table(["K", "fptserve ms/image", "fptserve images/s", "K fused models ms/image", "fused images/s",
        "throughput ratio", "floor ms/image (1 backbone + K sides, no serving)", "floor / fptserve"], rows)}

The paper's design predicts a ratio close to K, less the serving overhead of case 1 and the side
networks' own cost. **fptserve reaches {lowest:.3f} of the floor at worst** (goal >= 0.95).
"""
    return Section("2. Many tasks per image", md, raw)


# --------------------------------------------------------------------------------------------
# case 3: memory
# --------------------------------------------------------------------------------------------


def _warm_every_task(client: Client, dicom: bytes, count: int) -> None:
    names = [repos.clone_name(i) for i in range(count)]
    for start in range(0, count, 64):
        client.classify(dicom, names[start:start + 64])


def memory(s: Settings) -> Section:
    t = s.template
    dicom = data.serving_dicom(s.work, s.serving_size).read_bytes()
    side_bytes = t.side_onnx.stat().st_size
    backbone_bytes = t.backbone_onnx.stat().st_size
    ours = {}
    for n in s.adapter_counts:
        repository = repos.cloned_repository(s.work, t, n)
        with Fptserve(s.binary, repository, s.threads) as server:
            loaded = server.rss()
            if n:
                client = Client(server.addr, s.stubs)
                _warm_every_task(client, dicom, n)
                client.close()
            ours[n] = {"loaded": loaded, "warm": server.rss()}
    fused_path = repos.fused_model(s.work, t)
    theirs = {}
    for n in s.full_model_counts:
        out = subprocess.run(
            [sys.executable, str(BENCHES / "fused_rss.py"), "--model", str(fused_path), "--count", str(n),
             "--threads", str(s.threads)],
            capture_output=True, text=True, check=True, cwd=BENCHES,
        )
        theirs[n] = json.loads(out.stdout.strip().splitlines()[-1])

    # slope between the two largest counts: with no adapter nothing runs, so the backbone's
    # own first-run memory would otherwise be charged to the adapters
    lo, hi = sorted(s.adapter_counts)[-2:]
    per_adapter = {k: (ours[hi][k] - ours[lo][k]) / (hi - lo) for k in ("loaded", "warm")}
    flo, fhi = min(s.full_model_counts), max(s.full_model_counts)
    per_model = {k: (theirs[fhi][k] - theirs[flo][k]) / (fhi - flo) for k in ("loaded", "warm")}
    rows = [[f"fptserve: backbone + {n} adapters", mib(ours[n]["loaded"]), mib(ours[n]["warm"])]
            for n in s.adapter_counts]
    rows += [[f"one model per task: {n} fused models", mib(theirs[n]["loaded"]), mib(theirs[n]["warm"])]
             for n in s.full_model_counts]
    tasks = hi
    fused_at = {k: theirs[flo][k] + (tasks - flo) * per_model[k] for k in ("loaded", "warm")}
    md = f"""\
Resident set size (VmRSS) of the serving process: fptserve with {t.backbone_name} and N copies of
the {t.task} adapter (each its own ONNX Runtime session), against a Python process holding N fused
models (one ONNX Runtime session each) as a one-model-per-task server would. "Loaded" is after
start-up; "warm" after every task has answered once (working memory is allocated on first run;
with no adapter nothing has run).
Files: backbone.onnx {mib(backbone_bytes)} MiB, side.onnx {side_bytes / 1024:.0f} KiB.

{table(["process", "loaded, MiB", "warm, MiB"], rows)}

- Per added adapter (fptserve, slope from {lo} to {hi}): **{per_adapter['loaded'] / 1024:.0f} KiB loaded,
  {per_adapter['warm'] / 1024:.0f} KiB warm**, against {side_bytes / 1024:.0f} KiB of side.onnx
  (**{per_adapter['warm'] / side_bytes:.2f}x the file**; goal <= 1.5x).
- Backbone + {hi} warm adapters: **{mib(ours[hi]['warm'])} MiB** (goal <= 1024 MiB).
- Per added fused model (slope from {flo} to {fhi}): {mib(per_model['loaded'])} MiB loaded, {mib(per_model['warm'])} MiB warm.
- {tasks} tasks, extrapolated for one model per task: {mib(fused_at['warm'])} MiB warm, against fptserve's
  measured {mib(ours[hi]['warm'])} MiB: **{fused_at['warm'] / ours[hi]['warm']:.1f}x less memory** for fptserve.
"""
    raw = {"fptserve": ours, "fused": theirs, "per_adapter_bytes": per_adapter, "per_fused_model_bytes": per_model,
           "side_onnx_bytes": side_bytes, "backbone_onnx_bytes": backbone_bytes}
    return Section("3. Memory", md, raw)


# --------------------------------------------------------------------------------------------
# case 4: decode and preprocess per transfer syntax
# --------------------------------------------------------------------------------------------


def decode_preprocess(s: Settings) -> Section:
    t = s.template
    pre = t.manifest["preprocessing"]
    sizes = sorted({pre["backbone_size"][0], pre["side_size"][0]}, reverse=True)
    # the same models, each task also as a copy that opts into reduced-resolution decoding
    repository = repos.reduced_repository(s.work, t.repository)
    reduced_spec = f"{t.task}{repos.REDUCED_SUFFIX}@{t.version}"

    def python_path(blob: bytes) -> tuple[float, float]:
        start = time.perf_counter()
        rgb = peer.decode_display(blob)
        decoded = time.perf_counter()
        for size in sizes:
            peer.preprocess(rgb, size, pre["mean"], pre["std"])
        return decoded - start, time.perf_counter() - decoded

    def stages(responses) -> tuple[list[float], list[float]]:
        return ([r.timings.decode_ms / 1e3 for r in responses], [r.timings.preprocess_ms / 1e3 for r in responses])

    rows, reduced_rows, raw, benchmark_inputs = [], [], {}, []
    with Fptserve(s.binary, repository, s.threads) as server:
        client = Client(server.addr, s.stubs)
        for syntax in data.SYNTAXES:
            blob = data.dicom_file(s.work, s.decode_size, syntax).read_bytes()
            reduced = syntax.uid in data.REDUCED_UIDS
            warm(lambda: (client.classify(blob, [t.spec]), python_path(blob)), s.warmup)
            if reduced:
                warm(lambda: client.classify(blob, [reduced_spec]), s.warmup)
                benchmark_inputs.append((f"benchmark {syntax.name}", blob, 0))
            ours_d, ours_p = stages(block(lambda: client.classify(blob, [t.spec]), s.repeats))
            python = block(lambda: python_path(blob), s.repeats)
            py_d = [d for d, _ in python]
            py_p = [p for _, p in python]
            ours_total = stats([a + b for a, b in zip(ours_d, ours_p)])
            py_total = stats([a + b for a, b in zip(py_d, py_p)])
            speedup = py_total["median"] / ours_total["median"]
            raw[syntax.name] = {"uid": syntax.uid, "bytes": len(blob), "fptserve_decode": ours_d,
                                "fptserve_preprocess": ours_p, "python_decode": py_d, "python_preprocess": py_p,
                                "speedup": speedup}
            rows.append([syntax.name, f"{len(blob) / MiB:.1f}", ms(stats(ours_d)), ms(stats(ours_p)), ms(ours_total),
                         ms(stats(py_d)), ms(stats(py_p)), ms(py_total), f"**{speedup:.2f}**"])
            if reduced:
                responses = block(lambda: client.classify(blob, [reduced_spec]), s.repeats)
                red_d, red_p = stages(responses)
                red_total = stats([a + b for a, b in zip(red_d, red_p)])
                red_speedup = py_total["median"] / red_total["median"]
                at = responses[0].input
                raw[syntax.name].update(reduced_decode=red_d, reduced_preprocess=red_p, reduced_speedup=red_speedup,
                                        decoded_at=[at.decoded_width, at.decoded_height])
                reduced_rows.append([syntax.name, f"{at.decoded_width}x{at.decoded_height}", ms(stats(red_d)),
                                     ms(stats(red_p)), ms(red_total), ms(py_total), f"**{red_speedup:.2f}**",
                                     f"{ours_total['median'] / red_total['median']:.1f}"])
        fidelity = reduced_fidelity(client, repository, benchmark_inputs + data.pydicom_reduced_inputs())
        client.close()
    raw["reduced_fidelity"] = fidelity
    md = f"""\
{s.decode_size}x{s.decode_size} MONOCHROME2 images (12 bits stored; the JPEG Baseline file 8 bits), made
by dcmtk, GDCM and OpenJPH, decoded and prepared for {t.spec}: window from the header to 8 bits, RGB,
resizes to {" and ".join(f"{x}x{x}" for x in sizes)}, normalised. fptserve's times are its own stage
timings from the Classify response (decode = parse and decompress; preprocess = window, resizes,
normalisation). The peer is pydicom {pydicom.__version__} with its pylibjpeg / GDCM plugins, numpy and PIL
in this process, starting from the same bytes (decode = dcmread, pixel_array, window; preprocess =
PIL resizes, normalisation). {s.repeats} repetitions after {s.warmup} warm-up; ms, median (min–max).

{table(["transfer syntax", "MiB", "fptserve decode", "fptserve preprocess", "fptserve total",
        "pydicom decode", "numpy+PIL preprocess", "Python total", "speed-up"], rows)}

Where the speed-up stays small, both sides run the same decoder library: OpenJPEG for JPEG 2000 and
HTJ2K (pylibjpeg-openjpeg), CharLS for JPEG-LS (inside GDCM), zlib's format for deflate; a profile
(`perf record target/release/fptserve decode FILE --npy out.npy`) puts most of fptserve's decode inside
those libraries' entropy decoders (OpenJPEG's T1 passes, CharLS's `decode_lines`, the inflate loop), so
fptserve's margin is what pydicom does around them. The one faster decoder available offline, OpenJPH for
HTJ2K (Debian's libopenjph 0.9.0), aborts the process on some malformed codestreams and is not used.

**Reduced-resolution path** (the task's copy with `decode_resolution: reduced`, same files, same run): the
frame decodes at the coarsest JPEG 2000 level / JPEG DCT scale whose sides are at least
{max(sizes)}, then resizes as usual. "vs exact" is fptserve's exact total over its reduced total; the
speed-up is against the same pydicom + PIL path as above (which decodes every pixel).

{table(["transfer syntax", "decoded at", "decode", "preprocess", "total", "Python total",
        "speed-up vs pydicom", "vs exact"], reduced_rows)}

{fidelity_text(fidelity)}
"""
    return Section("4. Decode and preprocess per transfer syntax", md, raw)


def reduced_fidelity(client: Client, repository: Path, inputs: list[tuple[str, bytes, int]]) -> dict:
    """Every task of `repository` on every input, exact and reduced: the largest probability
    change and how often the label agrees, over the inputs the reduced path decoded smaller."""
    pairs = repos.reduced_pairs(repository)
    exact, reduced = [a for a, _ in pairs], [b for _, b in pairs]
    worst, agree, compared, unchanged, refused, cases = 0.0, 0, 0, 0, [], []
    for name, blob, frame in inputs:
        try:
            a = client.classify(blob, exact, frame)
            b = client.classify(blob, reduced, frame)
        except grpc.RpcError as e:
            refused.append(f"{name} frame {frame}: {e.code().name}")
            continue
        info = b.input
        if (info.decoded_width, info.decoded_height) == (info.width, info.height):
            unchanged += 1
            continue
        changes = []
        for ra, rb in zip(a.results, b.results):
            pa = np.array([x.probability for x in ra.scores])
            pb = np.array([x.probability for x in rb.scores])
            changes.append(float(np.abs(pa - pb).max()))
            agree += ra.label == rb.label
            compared += 1
        worst = max(worst, *changes)
        cases.append({"input": name, "frame": frame, "size": [info.width, info.height],
                      "decoded_at": [info.decoded_width, info.decoded_height], "color": info.color,
                      "max_probability_change": max(changes)})
    return {"tasks": exact, "inputs": len(cases), "unchanged": unchanged, "refused": refused,
            "max_probability_change": worst, "label_agreement": agree / compared if compared else None,
            "comparisons": compared, "cases": cases}


def fidelity_text(f: dict) -> str:
    if not f["inputs"]:
        return "Fidelity: no input was decoded smaller, nothing to compare."
    worst = sorted(f["cases"], key=lambda c: -c["max_probability_change"])[:5]
    rows = [[c["input"], str(c["frame"]), f"{c['size'][0]}x{c['size'][1]}",
             f"{c['decoded_at'][0]}x{c['decoded_at'][1]}", c["color"], f"{c['max_probability_change']:.4f}"]
            for c in worst]
    return f"""\
Fidelity of the reduced path against the exact path, every task of the repository ({", ".join(f["tasks"])})
on the benchmark's files above and every pydicom / pydicom-data file in a JPEG 2000, HTJ2K or DCT JPEG
syntax (first and last frame; colour, multi-frame and MONOCHROME1 among them), {f["inputs"]} inputs that
decoded smaller ({f["unchanged"]} more were already small enough to decode whole, {len(f["refused"])} are refused
by both paths): **max |probability change| {f["max_probability_change"]:.4f}**, **label agreement
{f["label_agreement"]:.3f}** over {f["comparisons"]} (input, task) pairs. The five largest changes:

{table(["input", "frame", "size", "decoded at", "colour", "max change"], rows)}"""


# --------------------------------------------------------------------------------------------
# case 11: decode-bound throughput
# --------------------------------------------------------------------------------------------


def decode_bound_throughput(s: Settings) -> Section:
    t = s.tiny_template
    repository = repos.reduced_repository(s.work, t.repository)
    specs = (("exact", t.spec), ("reduced", f"{t.task}{repos.REDUCED_SUFFIX}@{t.version}"))
    count = 8
    images = [p.read_bytes() for p in data.distinct_j2k(s.work, s.decode_size, count)]
    per_concurrency = {1: count, 8: 4 * count} if s.mode == "full" else {1: 2, 8: 8}
    rows, raw = [], {}
    with Fptserve(s.binary, repository, s.threads) as server:
        client = Client(server.addr, s.stubs)
        decoded_at = client.classify(images[0], [specs[1][1]]).input
        for c, requests in per_concurrency.items():
            cell = {}
            for label, spec in specs:
                client.load(images, [spec], c, max(c, s.warmup))
            # rounds alternate the two paths so that drift affects both alike
            for _ in range(s.repeats):
                for label, spec in specs:
                    wall, latencies = client.load(images, [spec], c, requests)
                    entry = cell.setdefault(label, {"rates": [], "latencies": []})
                    entry["rates"].append(requests / wall)
                    entry["latencies"] += latencies
            exact, reduced = (stats(cell[label]["rates"]) for label, _ in specs)
            rows.append([str(c), str(requests), per_s(exact), per_s(reduced),
                         f"**{reduced['median'] / exact['median']:.1f}**",
                         f"{percentile(cell['exact']['latencies'], 50) * 1e3:.0f} / "
                         f"{percentile(cell['reduced']['latencies'], 50) * 1e3:.0f}"])
            raw[str(c)] = {label: {"rate": stats(v["rates"]), "p50": percentile(v["latencies"], 50)}
                           for label, v in cell.items()}
        client.close()
    md = f"""\
Requests per second for {t.spec} (the demo models: a {t.manifest["preprocessing"]["backbone_size"][0]}x{t.manifest["preprocessing"]["backbone_size"][0]}
backbone that costs little, so decoding is the bottleneck) on {count} different {s.decode_size}x{s.decode_size}
12-bit JPEG 2000 lossless DICOMs (GDCM; request i sends picture i mod {count}), from C client threads
each calling in a loop; {s.repeats} rounds alternating the exact task and its copy with
`decode_resolution: reduced` (decoded at {decoded_at.decoded_width}x{decoded_at.decoded_height}); N requests per round.

{table(["C", "N", "exact req/s", "reduced req/s", "reduced / exact", "p50 ms exact / reduced"], rows)}
"""
    return Section("11. Decode-bound throughput: exact vs reduced-resolution decoding", md, raw)


# --------------------------------------------------------------------------------------------
# case 5: throughput under concurrency
# --------------------------------------------------------------------------------------------


def distinct_pictures(s: Settings, count: int, seed: int) -> list[bytes]:
    """`count` different uncompressed DICOMs of the serving size."""
    images = []
    for i in range(count):
        path = s.work / f"picture-{s.serving_size}-{seed + i}.dcm"
        if not path.exists():
            data.write_native(path, data.picture(s.serving_size, 12, seed=seed + i), 12)
        images.append(path.read_bytes())
    return images


def throughput(s: Settings) -> Section:
    # a different picture per request in flight: identical concurrent inputs would be computed
    # once (fptserve coalesces them), which is not what batching is measured for
    dicoms = distinct_pictures(s, max(s.concurrency), seed=200)
    dicom = dicoms[0]
    rows, raw = [], {}
    for label, t, few, many in s.throughput_models:
        results = {}
        servers = (("fptserve, batches of up to 8",
                    lambda: Fptserve(s.binary, t.repository, s.threads, ("--max-batch-size", "8"))),
                   ("fptserve, no batching",
                    lambda: Fptserve(s.binary, t.repository, s.threads, ("--max-batch-size", "1"))),
                   ("python peer", lambda: Peer(t.repository, s.threads, workers=max(s.concurrency))))
        for name, start in servers:
            with start() as server:
                client = Client(server.addr, s.stubs)
                first = client.classify(dicom, [t.spec])
                results.setdefault("answers", []).append([x.probability for x in first.results[0].scores])
                for c in s.concurrency:
                    requests = few if c == 1 else many
                    client.load(dicoms, [t.spec], c, max(c, s.warmup))
                    rates, latencies = [], []
                    for _ in range(s.repeats):
                        wall, lat = client.load(dicoms, [t.spec], c, requests)
                        rates.append(requests / wall)
                        latencies += lat
                    results[(name, c)] = {"rate": stats(rates), "p50": percentile(latencies, 50),
                                          "p99": percentile(latencies, 99), "requests": requests}
                client.close()
        answers = [np.array(x) for x in results.pop("answers")]
        for other in answers[1:]:
            if np.abs(answers[0] - other).max() > 2e-3:
                raise RuntimeError(f"{label}: the servers disagree: {answers}")
        for c in s.concurrency:
            batched, unbatched, theirs = (results[(n, c)] for n, _ in servers)
            best = max(batched, unbatched, key=lambda r: r["rate"]["median"])
            ratio = best["rate"]["median"] / theirs["rate"]["median"]
            gain = batched["rate"]["median"] / unbatched["rate"]["median"]
            rows.append([label, str(c), per_s(batched["rate"]), per_s(unbatched["rate"]), f"{gain:.2f}",
                         per_s(theirs["rate"]), f"**{ratio:.2f}**",
                         f"{batched['p50'] * 1e3:.0f} / {batched['p99'] * 1e3:.0f}",
                         f"{unbatched['p50'] * 1e3:.0f} / {unbatched['p99'] * 1e3:.0f}",
                         f"{theirs['p50'] * 1e3:.0f} / {theirs['p99'] * 1e3:.0f}"])
        raw[label] = {f"{k[0]}@{k[1]}": v for k, v in results.items()}
    md = f"""\
Requests per second for one task on {len(dicoms)} different {s.serving_size}x{s.serving_size} uncompressed DICOMs
(request i sends picture i mod {len(dicoms)}), from one
Python gRPC client with C threads each calling in a loop; {s.repeats} runs per cell after warm-up,
each run N requests (the table's models name N). fptserve runs twice: with dynamic batching of up
to 8 images per backbone run (`--max-batch-size 8`, no added delay: a batch is what queued while
the previous run went) and without (`--max-batch-size 1`, the CPU default); its feature cache is
off in both. "fptserve / peer" takes the faster of the two. The peer (benches/peer.py) is the server a typical
team writes: grpcio with a thread pool of {max(s.concurrency)}, pydicom + plugins, numpy, PIL and ONNX Runtime,
the same models and intra-op threads ({s.threads}); all three answer with equal probabilities (checked).

{table(["models", "C", "batches of 8 req/s", "no batching req/s", "batching gain", "Python peer req/s",
        "fptserve / peer", "batches of 8 p50 / p99 ms", "no batching p50 / p99 ms", "peer p50 / p99 ms"], rows)}
"""
    return Section("5. Throughput under concurrency", md, raw)


# --------------------------------------------------------------------------------------------
# case 6: adapter hot swap
# --------------------------------------------------------------------------------------------


def hot_swap(s: Settings) -> Section:
    t = s.template
    repository = repos.cloned_repository(s.work, t, 1)
    # version 2 of task-000: the same network in its own folder, loaded and unloaded
    staged = repos.staged_version(repository, repos.clone_name(0), "2")
    dicom = data.serving_dicom(s.work, s.serving_size).read_bytes()
    apb, apb_grpc = s.admin_stubs
    task = repos.clone_name(0)
    clients = 4

    with Fptserve(s.binary, repository, s.threads) as server:
        client = Client(server.addr, s.stubs)
        admin_channel = grpc.insecure_channel(server.admin_addr)
        admin = apb_grpc.AdminStub(admin_channel)
        client.classify(dicom, [task])

        def swap_in() -> tuple[float, float, float]:
            """LoadAdapter(v2, default) -> first answer by v2; the load call alone; load_ms."""
            start = time.perf_counter()
            loaded = admin.LoadAdapter(apb.LoadAdapterRequest(path=str(staged), make_default=True))
            called = time.perf_counter() - start
            while client.classify(dicom, [task]).results[0].adapter_version != "2":
                pass
            return time.perf_counter() - start, called, loaded.adapter.load_ms / 1e3

        def swap_out() -> None:
            admin.SetDefaultVersion(apb.SetDefaultVersionRequest(task=task, version="1"))
            admin.UnloadAdapter(apb.UnloadAdapterRequest(task=task, version="2"))

        first, calls, load_ms = [], [], []
        for _ in range(s.swaps):
            a, b, c = swap_in()
            first.append(a)
            calls.append(b)
            load_ms.append(c)
            swap_out()

        def phase(swapping: bool) -> tuple[list[float], int]:
            stop = threading.Event()
            swaps = 0

            def swapper():
                nonlocal swaps
                while not stop.is_set():
                    swap_in()
                    swap_out()
                    swaps += 1

            thread = threading.Thread(target=swapper) if swapping else None
            if thread:
                thread.start()
            _, latencies = client.load(dicom, [task], clients, clients * s.swap_requests)
            stop.set()
            if thread:
                thread.join()
            return latencies, swaps

        steady, _ = phase(False)
        during, swaps = phase(True)

        # memory comes back: load 100 more versions, serve each once, unload them all
        extra = [repos.staged_version(repository, task, str(v)) for v in range(3, 3 + s.memory_versions)]
        rss = {"before": server.rss()}
        for folder in extra:
            admin.LoadAdapter(apb.LoadAdapterRequest(path=str(folder)))
        versions = [f"{task}@{v}" for v in range(3, 3 + s.memory_versions)]
        for start in range(0, len(versions), 64):
            client.classify(dicom, versions[start:start + 64])
        rss["loaded"] = server.rss()
        for v in range(3, 3 + s.memory_versions):
            admin.UnloadAdapter(apb.UnloadAdapterRequest(task=task, version=str(v)))
        time.sleep(0.5)
        rss["unloaded"] = server.rss()
        admin_channel.close()
        client.close()

    first_s, calls_s, load_s = stats(first), stats(calls), stats(load_ms)
    rows = [
        ["steady state", str(len(steady)), f"{percentile(steady, 50) * 1e3:.0f}",
         f"{percentile(steady, 99) * 1e3:.0f}", "0"],
        [f"during {swaps} swaps (load v2 + default, back to v1, unload v2)", str(len(during)),
         f"{percentile(during, 50) * 1e3:.0f}", f"{percentile(during, 99) * 1e3:.0f}", "0"],
    ]
    md = f"""\
{t.spec}'s network as task-000 versions 1 and 2, the {s.serving_size}x{s.serving_size} DICOM; the admin
API over gRPC from this process. A swap is LoadAdapter(version 2, make_default) from its folder,
then Classify until an answer names version 2; back is SetDefaultVersion(1) + UnloadAdapter(2).

- LoadAdapter to the first answer by the new version: **{ms(first_s)} ms** (median (min–max) of {s.swaps});
  the LoadAdapter call itself {ms(calls_s)} ms, of which loading, checking and the warm-up run
  {ms(load_s)} ms; the rest is one Classify. The first load after start-up also runs the
  backbone once on a blank image (its features warm every later load): the max.

{clients} clients calling Classify in a loop, every call checked (a failed call stops the run).
During swaps the swapper's own Classify calls (waiting for version 2) make a fifth client:

{table(["phase", "calls", "p50 ms", "p99 ms", "failed"], rows)}

Memory given back: RSS {mib(rss['before'])} MiB before loading {s.memory_versions} more versions through the admin
API, {mib(rss['loaded'])} MiB with them loaded and each used once, **{mib(rss['unloaded'])} MiB after unloading
them** ({(rss['unloaded'] - rss['before']) / MiB:+.1f} MiB against before).
"""
    raw = {"first_answer": first, "load_call": calls, "load_ms": load_ms, "steady": steady, "during": during,
           "swaps": swaps, "rss": rss}
    return Section("6. Adapter hot swap", md, raw)


# --------------------------------------------------------------------------------------------
# case 7: feature cache
# --------------------------------------------------------------------------------------------


def feature_cache(s: Settings) -> Section:
    """A gateway sends one image for two tasks in two calls: the second call's backbone pass
    comes from the cache. Each repetition uses a new picture."""
    t = s.template
    repository = repos.cloned_repository(s.work, t, 2)
    first, second = (repos.clone_name(i) for i in range(2))
    misses, hits = [], []
    with Fptserve(s.binary, repository, s.threads, cache=True) as server:
        client = Client(server.addr, s.stubs)
        for i, image in enumerate(distinct_pictures(s, s.warmup + s.repeats, seed=100)):
            miss_s, miss = client.timed(image, [first])
            hit_s, hit = client.timed(image, [second])
            if (miss.backbone_runs, miss.backbone_cache_hits, hit.backbone_runs, hit.backbone_cache_hits) != (1, 0, 0, 1):
                raise RuntimeError(f"feature cache: expected a miss then a hit, got {miss} / {hit}")
            if i >= s.warmup:
                misses.append(miss_s)
                hits.append(hit_s)
        client.close()
    miss_s, hit_s = stats(misses), stats(hits)
    raw = {"miss": miss_s, "hit": hit_s}
    md = f"""\
Two calls per image, each for one task: the first computes the backbone's features, the second
(another task with the same preprocessing) takes them from the feature cache (256 MiB by default).
{s.repeats} images after {s.warmup} warm-up, {s.serving_size}x{s.serving_size} uncompressed DICOM.

{table(["call", "latency ms"], [["first task (backbone run)", ms(miss_s)], ["second task (cache hit)", ms(hit_s)]])}

The second call costs **{hit_s["median"] / miss_s["median"]:.3f}x** the first: decode, preprocess and
a SHA-256 of the backbone input, then the side network.
"""
    return Section("7. Feature cache", md, raw)


# --------------------------------------------------------------------------------------------
# cases 8, 9 and 10: measured by their own scripts
# --------------------------------------------------------------------------------------------


def script_case(title: str, script: str, args: list[str], out: Path) -> Section:
    """A case measured by its own script, in processes of its own (training and quantising need
    PyTorch and their own peak memory); the section it writes is embedded as it is."""
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(BENCHES / script), *args, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    lines = out.read_text().strip().splitlines()
    body = lines[1:] if lines and lines[0].startswith("## ") else lines
    return Section(title, "\n".join(body).strip(), {"script": script, "args": args})


def training_memory(s: Settings) -> Section:
    backbone = s.template.repository / "backbones" / s.template.backbone_name
    size = [] if s.mode == "full" else ["--images", "12", "--image-size", "96", "--batch-sizes", "2,4",
                                       "--full-steps", "2", "--extrapolate", "8"]
    return script_case("8. Training memory: FPT+ with preloaded K/V against full fine-tuning", "train_memory.py",
                       ["--backbone", str(backbone), "--work", str(s.work / "train"), *size],
                       s.work / "train-memory.md")


def int8_backbone(s: Settings) -> Section:
    # the variants are kept in --work like the fused models (quantising ViT-B/16 takes minutes)
    # and rebuilt when the float32 backbone changed
    size = ["--reps", str(3 * s.repeats)] if s.mode == "full" else [
        "--reps", "2", "--images", "4", "--calibration-images", "8", "--outlier-channels", "2"]
    return script_case("9. INT8 backbone (CPU)", "int8_backbone.py",
                       ["--repo", str(s.template.repository), "--backbone", s.template.backbone_name,
                        "--work", str(s.work / "int8"), "--threads", str(s.threads), "--reuse", "--outliers", *size],
                       s.work / "int8-backbone.md")


def session_options(s: Settings) -> Section:
    size = [] if s.mode == "full" else ["--rounds", "1", "--runs", "1", "--count", "4"]
    return script_case("10. ONNX Runtime session options", "ort_options.py",
                       ["--repo", str(s.template.repository), "--backbone", s.template.backbone_name,
                        "--task", s.template.task, "--threads", str(s.threads), *size],
                       s.work / "ort-options.md")


# --------------------------------------------------------------------------------------------
# case 12: saliency maps
# --------------------------------------------------------------------------------------------


def side_without_explanation(side_onnx: Path, out: Path) -> Path:
    """The same side network with only its `logits` output: ONNX Runtime computes every graph
    output whatever a run asks for, so this is what an adapter exported without explanation
    outputs costs."""
    import onnx.utils

    onnx.utils.extract_model(str(side_onnx), str(out), ["side_pixel_values", "key_states", "value_states"],
                             ["logits"], check_model=False)
    return out


def explain_cost(s: Settings) -> Section:
    """What `explain` costs: whole calls with a backbone run (a new picture each), calls whose
    features come from the feature cache (so the rest of the call stands out), and the side
    network with and without its explanation outputs."""
    t = s.template
    pb = s.stubs[0]
    variants = {
        "off": {},
        "map": {"explain": pb.Explain()},
        "map + overlay PNG": {"explain": pb.Explain(overlay=True)},
        "map + Secondary Capture + SR": {"explain": pb.Explain(secondary_capture=True), "structured_report": True},
    }
    path = data.serving_dicom(s.work, s.serving_size)
    dicom = path.read_bytes()
    pictures = distinct_pictures(s, 2 * (s.warmup + s.repeats), seed=300)
    hit = {name: [] for name in variants}
    run = {"off": [], "map + overlay PNG": []}
    with Fptserve(s.binary, t.repository, s.threads, cache=True) as server:
        client = Client(server.addr, s.stubs)

        def call(image, name):
            t0 = time.perf_counter()
            reply = client.stub.Classify(pb.ClassifyRequest(dicom=image, tasks=[t.spec], **variants[name]),
                                         timeout=600)
            seconds = time.perf_counter() - t0
            if name != "off" and reply.results[0].saliency.unavailable:
                raise RuntimeError(f"{t.spec} cannot explain: {reply.results[0].saliency.unavailable} "
                                   "(models exported before explanation outputs? export them again)")
            return seconds, reply

        for name in variants:
            warm(lambda: call(dicom, name), s.warmup)
        for r in range(s.repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                seconds, reply = call(dicom, name)
                if reply.backbone_cache_hits != 1:
                    raise RuntimeError(f"explain cost: expected a feature-cache hit, got {reply}")
                hit[name].append(seconds)
        fresh = iter(pictures)
        for r in range(s.warmup + s.repeats):
            for name in (("off", "map + overlay PNG") if r % 2 == 0 else ("map + overlay PNG", "off")):
                seconds, reply = call(next(fresh), name)
                if r >= s.warmup:
                    run[name].append(seconds)
        client.close()
    # the side network alone, as ONNX Runtime runs it, with and without explanation outputs
    pixels, side = ready_tensors(dicom, t)
    backbone = session(t.repository / "backbones" / t.manifest["backbone"]["name"] / "backbone.onnx", s.threads)
    keys, values = backbone.run(["key_states", "value_states"], {"pixel_values": pixels})
    feeds = {"side_pixel_values": side, "key_states": keys, "value_states": values}
    with_outputs = session(t.side_onnx, s.threads)
    logits_only = session(side_without_explanation(t.side_onnx, s.work / "side-logits-only.onnx"), s.threads)
    sides = {"with explanation outputs": [], "logits only": []}
    for sess in (with_outputs, logits_only):
        warm(lambda: sess.run(["logits"], feeds), s.warmup)
    for r in range(s.repeats):
        for name, sess in ((("with explanation outputs", with_outputs), ("logits only", logits_only))
                           if r % 2 == 0 else (("logits only", logits_only), ("with explanation outputs", with_outputs))):
            sides[name].extend(block(lambda: elapsed(lambda: sess.run(["logits"], feeds)), 5))

    hit_s = {k: stats(v) for k, v in hit.items()}
    run_s = {k: stats(v) for k, v in run.items()}
    side_s = {k: stats(v) for k, v in sides.items()}
    base = hit_s["off"]["median"]
    rows = [[name, ms(v), f"{v['median'] / base:.2f}x"] for name, v in hit_s.items()]
    md = f"""\
`explain` on {t.spec}, {s.serving_size}x{s.serving_size} uncompressed DICOM. Calls whose
features come from the feature cache (the same image, so the backbone does not run and the rest
of the call stands out), {s.repeats} rounds after {s.warmup} warm-up, the variants alternating:

{table(["explain", "latency ms", "vs off"], rows)}

Whole calls with a backbone run (a new picture each call, {s.repeats} each): off
{ms(run_s["off"])} ms, map + overlay PNG {ms(run_s["map + overlay PNG"])} ms:
**{run_s["map + overlay PNG"]["median"] / run_s["off"]["median"]:.3f}x**.

The side network alone in ONNX Runtime (batch 1, {5 * s.repeats} runs each): with its explanation
outputs {ms(side_s["with explanation outputs"], 2)} ms, logits only {ms(side_s["logits only"], 2)} ms
(**{side_s["with explanation outputs"]["median"] / side_s["logits only"]["median"]:.2f}x**). ONNX Runtime
computes every output of a graph whatever a run asks for, so an adapter exported with explanation
outputs pays this on every call, asked to explain or not; `--no-explain-outputs` exports one without.
"""
    return Section("12. Saliency maps: the cost of explain", md,
                   {"cache_hit": hit_s, "backbone_run": run_s, "side_network": side_s})


CASES = {
    "1": serving_overhead,
    "2": many_tasks,
    "3": memory,
    "4": decode_preprocess,
    "5": throughput,
    "6": hot_swap,
    "7": feature_cache,
    "8": training_memory,
    "9": int8_backbone,
    "10": session_options,
    "11": decode_bound_throughput,
    "12": explain_cost,
}
