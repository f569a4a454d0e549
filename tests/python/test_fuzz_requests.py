"""Fuzzing the gRPC surface: mutated protobuf requests for Classify, ModelInfer and the admin
API, sent as raw bytes to the real daemon.

Seeds are valid requests of every method; each iteration either builds a hostile request on
purpose (thousands of tasks, huge or repeated task names, malformed name@version, a request id
of a megabyte, both members of a oneof on the wire, frame 2^32-1, nonsense pixel policies,
tensors whose shape or datatype lie, admin loads of garbage manifests and ONNX bytes, paths
out of the repository) or mutates a seed's bytes (bit flips, overwrites, deletions,
duplications, truncation). Every call must end with a status a client can act on: never
INTERNAL or UNKNOWN (a malformed message is INVALID_ARGUMENT, src/grpc/codec.rs), and never
UNAVAILABLE (the daemon died); afterwards the daemon
still answers a valid call with the reference numbers, its log has no panic, and its RSS stays
below a bound.

CI runs FPTSERVE_FUZZ_REQUESTS=10000 (the default, ~10 s); a longer run:
    FPTSERVE_FUZZ_REQUESTS=200000 FPTSERVE_FUZZ_SEED=7 .venv/bin/python -m pytest -q \
        tests/python/test_fuzz_requests.py
"""

import os
import random
import shutil
import struct

import grpc
import pytest

from test_daemon import FIXTURES, ROOT, Daemon, stubs  # noqa: F401 (fixture)

REFUSED = {"INTERNAL", "UNKNOWN", "UNAVAILABLE"}
RSS_BOUND = 1 << 30  # a demo daemon holds ~150 MB; no request may make it hold a gigabyte


def admin_stubs(stubs):
    import sys

    sys.path.insert(0, str(ROOT / "benches"))
    import servers

    from pathlib import Path

    return servers.admin_stubs(Path(stubs[0].__file__).resolve().parents[2])


def seeds(pb, kpb, apb, manifest_json, onnx):
    """(method, serialized request) pairs: a valid request of every kind."""
    dicom = (FIXTURES / "dicom" / "grey8_explicit_le.dcm").read_bytes()
    png = (FIXTURES / "images" / "rgb8.png").read_bytes()
    infer = kpb.ModelInferRequest(model_name="dr-grade", id="x")
    infer.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png)
    raw = kpb.ModelInferRequest(model_name="skin-lesion")
    raw.inputs.add(name="image", datatype="BYTES", shape=[1])
    raw.raw_input_contents.append(struct.pack("<I", len(png)) + png)
    classify = "/fptserve.v1.Classifier/Classify"
    admin = "/fptserve.v1.Admin/"
    return [
        (classify, pb.ClassifyRequest(dicom=dicom, tasks=["dr-grade"]).SerializeToString()),
        (classify, pb.ClassifyRequest(image=png, tasks=["skin-lesion", "dr-grade@1"], request_id="r").SerializeToString()),
        (classify, pb.ClassifyRequest(dicom=dicom, tasks=["chest-xray"], structured_report=True,
                                      pixel_policy=pb.PixelPolicy(voi="window", window_center=100,
                                                                  window_width=50)).SerializeToString()),
        ("/fptserve.v1.Classifier/ListTasks", pb.ListTasksRequest().SerializeToString()),
        ("/inference.GRPCInferenceService/ModelInfer", infer.SerializeToString()),
        ("/inference.GRPCInferenceService/ModelInfer", raw.SerializeToString()),
        ("/inference.GRPCInferenceService/ModelMetadata", kpb.ModelMetadataRequest(name="dr-grade").SerializeToString()),
        (admin + "LoadAdapter", apb.LoadAdapterRequest(manifest_json=manifest_json, onnx=onnx).SerializeToString()),
        (admin + "LoadAdapter", apb.LoadAdapterRequest(path="tasks/dr-grade/2").SerializeToString()),
        (admin + "SetDefaultVersion", apb.SetDefaultVersionRequest(task="dr-grade", version="2").SerializeToString()),
        (admin + "UnloadAdapter", apb.UnloadAdapterRequest(task="dr-grade", version="fuzz").SerializeToString()),
        (admin + "ListAdapters", apb.ListAdaptersRequest().SerializeToString()),
    ], dicom, png


def hostile(rng, pb, kpb, apb, dicom, png, manifest_json, onnx):
    """A request made hostile on purpose: (method, bytes, what)."""
    classify = "/fptserve.v1.Classifier/Classify"
    names = ["", "@", "dr-grade@", "@1", "dr-grade@1@2", "dr-grade@\x00", "DR-GRADE", "dr grade", "../dr-grade",
             "dr-grade@" + "9" * 40, "é@ü", "x" * 100_000, "dr-grade@latest", "dr-grade@-1"]
    kind = rng.randrange(12)
    if kind == 0:
        tasks = [rng.choice(["dr-grade", "skin-lesion@1"])] * rng.choice([2, 100, 10_000])
        return classify, pb.ClassifyRequest(image=png, tasks=tasks).SerializeToString(), f"{len(tasks)} tasks"
    if kind == 1:
        return classify, pb.ClassifyRequest(image=png, tasks=[rng.choice(names)]).SerializeToString(), "task name"
    if kind == 2:
        rid = "r" * rng.choice([1 << 10, 1 << 20]) if rng.random() < 0.5 else "\u202e\n\x00"
        return classify, pb.ClassifyRequest(dicom=dicom, tasks=["dr-grade"], request_id=rid,
                                            structured_report=True).SerializeToString(), "request id"
    if kind == 3:  # both oneof members on the wire, in either order
        a = pb.ClassifyRequest(dicom=dicom, tasks=["dr-grade"]).SerializeToString()
        b = pb.ClassifyRequest(image=png).SerializeToString()
        return classify, (a + b if rng.random() < 0.5 else b + a), "both oneof members"
    if kind == 4:
        return classify, pb.ClassifyRequest(dicom=dicom, tasks=["dr-grade"],
                                            frame=rng.choice([1, 2**31, 2**32 - 1])).SerializeToString(), "frame"
    if kind == 5:
        policy = pb.PixelPolicy(voi=rng.choice(["", "window", "lut", "none", "x" * 1000, "window\x00"]),
                                window_center=rng.choice([0.0, -1e308, float("nan"), float("inf")]),
                                window_width=rng.choice([0.0, -1.0, float("nan"), 1e-300, float("inf")]),
                                voi_function=rng.choice(["", "LINEAR", "SIGMOID", "LINEAR_EXACT", "bogus"]))
        return classify, pb.ClassifyRequest(dicom=dicom, tasks=["dr-grade"], pixel_policy=policy).SerializeToString(), \
            "pixel policy"
    if kind == 6:
        r = kpb.ModelInferRequest(model_name=rng.choice(["dr-grade", "skin-lesion", "", "nope"]),
                                  model_version=rng.choice(["", "1", "99", "x" * 1000]))
        t = r.inputs.add(name=rng.choice(["image", "", "pixels"]), datatype=rng.choice(["BYTES", "FP32", "", "UINT8"]),
                         shape=rng.choice([[1], [2], [0], [-1], [1, 1], [10**12], [1, 2, 3, 4, 5, 6, 7, 8, 9]]))
        if rng.random() < 0.5:
            t.contents.bytes_contents.extend([png] * rng.randrange(3))
        else:
            r.raw_input_contents.append(rng.choice([b"", b"\xff\xff\xff\xff", struct.pack("<I", 10**9) + png, png]))
        if rng.random() < 0.3:
            r.outputs.add(name=rng.choice(["probabilities", "label", "nope", ""]))
        if rng.random() < 0.3:
            r.inputs.add(name="image", datatype="BYTES", shape=[1])
        return "/inference.GRPCInferenceService/ModelInfer", r.SerializeToString(), "infer tensors"
    if kind == 7:
        garbage = rng.choice([manifest_json[: rng.randrange(len(manifest_json))], "{}", "[]", "null", "x" * 100_000,
                              manifest_json.replace('"dr-grade"', '"' + rng.choice(names) + '"'),
                              manifest_json.replace('"version": "1"', '"version": "' + rng.choice(names) + '"')])
        body = rng.choice([onnx, onnx[: rng.randrange(len(onnx))], bytes(rng.getrandbits(8) for _ in range(512)), b""])
        return "/fptserve.v1.Admin/LoadAdapter", apb.LoadAdapterRequest(manifest_json=garbage, onnx=body)\
            .SerializeToString(), "admin load bytes"
    if kind == 8:
        path = rng.choice(["../../etc", "/etc/passwd", "tasks/../../..", "tasks/dr-grade", "", "\x00",
                           "tasks/dr-grade/1/side.onnx", "x" * 5000, "tasks/dr-grade/1"])
        return "/fptserve.v1.Admin/LoadAdapter", apb.LoadAdapterRequest(path=path, make_default=rng.random() < 0.5,
                                                                      replace=rng.random() < 0.5).SerializeToString(), \
            "admin load path"
    if kind == 9:
        method = rng.choice(["SetDefaultVersion", "UnloadAdapter"])
        message = apb.SetDefaultVersionRequest if method == "SetDefaultVersion" else apb.UnloadAdapterRequest
        # never the demo's own versions: the rest of the run needs them
        return f"/fptserve.v1.Admin/{method}", message(task=rng.choice(names + ["dr-grade", "nope"]),
                                                       version=rng.choice(["", "0", "99", "x" * 1000])) \
            .SerializeToString(), "admin change"
    if kind == 10:  # a length-delimited field that claims more bytes than follow
        return classify, b"\x0a" + bytes([0xff, 0xff, 0xff, 0xff, 0x0f]) + dicom[:100], "lying length"
    return classify, bytes(rng.getrandbits(8) for _ in range(rng.randrange(64))), "random bytes"


def mutate(rng, data):
    out = bytearray(data)
    for _ in range(1 + rng.randrange(6)):
        if not out:
            break
        at = rng.randrange(len(out))
        op = rng.randrange(5)
        if op == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at] = rng.getrandbits(8)
        elif op == 2:
            del out[at:at + 1 + rng.randrange(32)]
        elif op == 3:
            chunk = out[at:at + 1 + rng.randrange(64)]
            to = rng.randrange(len(out))
            out[to:to] = chunk
        else:
            del out[at:]
    return bytes(out)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, stubs):
    repo = tmp_path_factory.mktemp("fuzz") / "repo"
    shutil.copytree(ROOT / "models" / "demo", repo)
    d = Daemon("--max-in-flight", "64", repository=repo)
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(timeout=30)


def test_mutated_requests_get_a_clear_status_and_the_daemon_goes_on(fuzzed, stubs):
    from tritonclient.grpc import service_pb2 as kpb

    pb, pb_grpc = stubs
    apb, _ = admin_stubs(stubs)
    folder = ROOT / "models" / "demo" / "tasks" / "dr-grade" / "1"
    manifest_json = (folder / "manifest.json").read_text().replace('"version": "1"', '"version": "fuzz"')
    onnx = (folder / "side.onnx").read_bytes()
    assert '"version": "fuzz"' in manifest_json
    seeded, dicom, png = seeds(pb, kpb, apb, manifest_json, onnx)
    iterations = int(os.environ.get("FPTSERVE_FUZZ_REQUESTS", "10000"))
    rng = random.Random(int(os.environ.get("FPTSERVE_FUZZ_SEED", "1")))
    options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
    codes, by_method, bad, largest_rss = {}, {}, [], 0
    with grpc.insecure_channel(fuzzed.addr, options=options) as channel, \
            grpc.insecure_channel(fuzzed.admin_addr, options=options) as admin_channel:
        for i in range(iterations):
            if rng.random() < 0.4:
                method, data, what = hostile(rng, pb, kpb, apb, dicom, png, manifest_json, onnx)
            else:
                method, data = rng.choice(seeded)
                data, what = mutate(rng, data), "mutated seed"
            target = admin_channel if ".Admin/" in method else channel
            call = target.unary_unary(method, request_serializer=None, response_deserializer=None)
            try:
                call(data, timeout=30)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
                if code in REFUSED:
                    bad.append(f"{i} {method} {what}: {code} {error.details()[:300]}")
            codes[code] = codes.get(code, 0) + 1
            by_method[(method.rsplit("/", 1)[1], code)] = by_method.get((method.rsplit("/", 1)[1], code), 0) + 1
            if i % 250 == 0:
                largest_rss = max(largest_rss, rss(fuzzed.proc.pid))
            if code == "UNAVAILABLE" and fuzzed.proc.poll() is not None:
                break
        # still serving, with the reference numbers
        reply = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(image=png, tasks=["dr-grade@1"]), timeout=60)
    print(f"{iterations} requests: {codes}; largest RSS {largest_rss >> 20} MiB")
    print("by method and code:", dict(sorted(by_method.items())))
    assert fuzzed.proc.poll() is None, "the daemon died:\n" + fuzzed.log()[-5000:]
    assert not bad, "\n".join(bad[:20])
    assert "panicked" not in fuzzed.log()
    assert codes.get("OK", 0) > 0 and codes.get("INVALID_ARGUMENT", 0) > 0, codes
    assert largest_rss < RSS_BOUND, largest_rss
    expected = reference_probabilities("images/rgb8.png", "dr-grade", "1")
    got = [s.probability for s in reply.results[0].scores]
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-4


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reference_probabilities(input_name, task, version):
    import json

    reference = json.loads((FIXTURES / "reference.json").read_text())
    for case in reference["cases"]:
        if (case["input"], case["task"], case["version"]) == (input_name, task, version):
            return case["probabilities"]
    raise KeyError((input_name, task, version))
