"""What an operator's tooling sees of the daemon: the Open Inference Protocol (KServe v2)
called by Triton's own client, gRPC health and readiness while models load, server
reflection (v1 and v1alpha), the Prometheus exposition checked by promtool, and logs that
never carry a patient's identity.

Everything runs against the real `fptserve serve` binary (target/debug/fptserve) on the
demo repository, stopped with SIGTERM. The independent references:
- probabilities and labels: models/fixtures/reference.json (PyTorch + PIL), and the
  daemon's own fptserve.v1.Classifier answer for the same file (the two protocols must
  agree to float32 precision);
- the wire format: tritonclient's bundled compiled grpc_service.proto (NVIDIA's), which
  both serves as the client and is compared field by field with proto/inference/;
- models and versions: the manifests on disk; the version: Cargo.toml;
- the exposition format: promtool (Debian's prometheus package, tools/system-deps.sh);
- reflection: grpcio-reflection's standard v1alpha client, the same messages under the
  grpc.reflection.v1 package for v1 (the two protos differ only in their package), and
  grpcurl.
"""

import importlib.util
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as reflection_v1alpha_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_tools import protoc
from tritonclient.grpc import service_pb2 as kserve_pb2
from tritonclient.grpc import service_pb2_grpc as kserve_pb2_grpc
from tritonclient.utils import InferenceServerException

from test_daemon import BINARY, FIXTURES, GRPCURL, ROOT, free_port, reference_cases, stubs  # noqa: F401

DEMO = ROOT / "models" / "demo"
OUR_PROTO = ROOT / "proto" / "inference" / "grpc_service.proto"
CRATE_VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
SERVICES = ["", "fptserve.v1.Classifier", "inference.GRPCInferenceService"]
PNG = FIXTURES / "images" / "rgb8.png"
DICOM = FIXTURES / "dicom" / "grey8_explicit_le.dcm"
TOKEN = "obs-test-token-5f1c"
AUTH = {"authorization": f"Bearer {TOKEN}"}


# --- the daemon ----------------------------------------------------------------------------

class Server:
    """`fptserve serve` on 127.0.0.1:0 with every stderr line kept. Unlike test_daemon's
    Daemon it takes either log format and extra environment, and can hand back the
    address as soon as the port is bound ("listening"), before the models are loaded."""

    def __init__(self, *extra, repository=DEMO, log_format="json", env=None,
                 admin_token_file=None, wait_for="serving", timeout=120):
        assert BINARY.exists(), f"{BINARY} is missing: build it with cargo build (make test does)"
        self.metrics_port = free_port()
        args = [str(BINARY), "--log-format", log_format, "serve",
                "--repository", str(repository),
                "--grpc-listen", "127.0.0.1:0",
                "--admin-listen", "127.0.0.1:0",
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}"]
        if admin_token_file:
            args += ["--admin-token-file", str(admin_token_file)]
        environment = {k: v for k, v in os.environ.items() if k != "FPTSERVE_LOG"}
        environment.update(env or {})
        self.proc = subprocess.Popen([*args, *extra], stderr=subprocess.PIPE, text=True, env=environment)
        self.lines = []
        self.addr = None
        self.events = {"listening": threading.Event(), "serving": threading.Event()}
        self.line_of = {}  # "listening"/"serving": index of its line in self.lines
        self.exited = threading.Event()
        self.reader = threading.Thread(target=self._read, args=(log_format,), daemon=True)
        self.reader.start()
        until = time.monotonic() + timeout
        while not (self.events[wait_for].is_set() or self.events["serving"].is_set() or self.exited.is_set()):
            assert time.monotonic() < until, f"no {wait_for!r} line in {timeout} s:\n" + self.log()
            time.sleep(0.02)
        assert self.addr, "daemon exited:\n" + self.log()
        assert self.events[wait_for].is_set(), f"no {wait_for!r} line before 'serving':\n" + self.log()

    def _read(self, log_format):
        for line in self.proc.stderr:
            self.lines.append(line)
            if log_format == "json":
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                message, addr = event.get("message"), event.get("addr")
            else:
                # human: `... INFO fptserve::cli::serve: serving addr=127.0.0.1:1234 adapters=4`
                found = re.search(r": (listening|serving) (?=.*\baddr=(\S+))", line)
                message, addr = (found.group(1), found.group(2)) if found else (None, None)
            if message in self.events and addr and message not in self.line_of:
                self.line_of[message] = len(self.lines) - 1
                self.addr = self.addr or addr
                self.events[message].set()
        self.exited.set()

    def log(self):
        return "".join(self.lines)

    def scrape(self):
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    def stop(self):
        """SIGTERM, as an orchestrator stops it; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def daemon():
    """The demo repository, admin API on but no admin token: no repository extension."""
    d = Server()
    yield d
    d.kill()


@pytest.fixture(scope="module")
def client(daemon):
    c = triton.InferenceServerClient(url=daemon.addr)
    yield c
    c.close()


# --- references ------------------------------------------------------------------------------

def demo_models():
    """{task: {version: manifest}} from the manifests on disk."""
    models = {}
    for path in sorted((DEMO / "tasks").glob("*/*/manifest.json")):
        manifest = json.loads(path.read_text())
        models.setdefault(manifest["task"], {})[manifest["version"]] = manifest
    return models


def newest(versions):
    return max(versions, key=lambda v: [int(p) for p in v.split(".")])


def classify(stubs, addr, data, tasks, request_id=""):
    """The daemon's own protocol, for comparison."""
    pb, pb_grpc = stubs
    kind = {"dicom": data} if data[128:132] == b"DICM" else {"image": data}
    with grpc.insecure_channel(addr) as channel:
        return pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(tasks=tasks, request_id=request_id, **kind), timeout=60)


def image_input(blobs, name="image", datatype="BYTES"):
    tensor = triton.InferInput(name, [len(blobs)], datatype)
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    return tensor


def triton_status(call):
    """The gRPC status a tritonclient call failed with, e.g. "StatusCode.NOT_FOUND"."""
    with pytest.raises(InferenceServerException) as failed:
        call()
    return failed.value.status()


def raw_bytes_tensor(blobs):
    """The protocol's raw layout of a BYTES tensor: 4-byte little-endian length, bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def parse_raw_bytes_tensor(raw):
    out, at = [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4:at + 4 + n])
        at += 4 + n
    assert at == len(raw), "trailing bytes in a BYTES tensor"
    return out


# --- 1. wire compatibility (no daemon) ---------------------------------------------------------

def message_types(file_proto):
    """{".package.Message.Nested": DescriptorProto} of a FileDescriptorProto, nested included."""
    found = {}

    def walk(prefix, message):
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk(name, nested)

    for message in file_proto.message_type:
        walk("." + file_proto.package, message)
    return found


def test_our_inference_proto_is_wire_compatible_with_tritons(tmp_path):
    """proto/inference/grpc_service.proto, compiled by protoc, against the compiled proto
    tritonclient ships (NVIDIA's, written independently from the same specification): every
    message of ours exists under the same full name, every field has the same number, name,
    type, label, referenced type and oneof, and every RPC of ours is one of Triton's
    GRPCInferenceService with the same request and response types and streaming. Any client
    of the protocol then encodes and decodes our messages as we do."""
    descriptors = tmp_path / "ours.pb"
    assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--descriptor_set_out={descriptors}",
                        str(OUR_PROTO)]) == 0, "protoc failed"
    ours = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file[0]
    theirs = descriptor_pb2.FileDescriptorProto()
    kserve_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"

    our_messages, their_messages = message_types(ours), message_types(theirs)
    problems = []
    for name, message in our_messages.items():
        if name not in their_messages:
            problems.append(f"{name}: not in Triton's proto")
            continue
        other = their_messages[name]
        if message.options.map_entry != other.options.map_entry:
            problems.append(f"{name}: map entry {message.options.map_entry} vs {other.options.map_entry}")
        their_fields = {f.number: f for f in other.field}
        for field in message.field:
            match = their_fields.get(field.number)
            if match is None:
                problems.append(f"{name}.{field.name} = {field.number}: no field with that number")
                continue
            for attribute in ["name", "type", "label", "type_name"]:
                if getattr(field, attribute) != getattr(match, attribute):
                    problems.append(f"{name}.{field.name} = {field.number}: {attribute} "
                                    f"{getattr(field, attribute)!r} vs Triton's {getattr(match, attribute)!r}")
            oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
            their_oneof = other.oneof_decl[match.oneof_index].name if match.HasField("oneof_index") else None
            if oneof != their_oneof:
                problems.append(f"{name}.{field.name}: oneof {oneof!r} vs Triton's {their_oneof!r}")

    (service,) = ours.service
    assert service.name == "GRPCInferenceService"
    their_methods = {m.name: m for s in theirs.service if s.name == service.name for m in s.method}
    for method in service.method:
        match = their_methods.get(method.name)
        shape = lambda m: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)  # noqa: E731
        if match is None:
            problems.append(f"rpc {method.name}: not in Triton's GRPCInferenceService")
        elif shape(method) != shape(match):
            problems.append(f"rpc {method.name}: {shape(method)} vs Triton's {shape(match)}")
    assert not problems, "\n".join(problems)
    # and the comparison did compare something: every RPC the daemon documents
    assert {m.name for m in service.method} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}


# --- 2. the Open Inference Protocol through tritonclient ----------------------------------------

def test_server_liveness_readiness_and_metadata(client):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    metadata = client.get_server_metadata()
    assert metadata.name == "fptserve"
    assert metadata.version == CRATE_VERSION
    # no admin token configured: the repository extension is not offered
    assert list(metadata.extensions) == []


def test_model_readiness_and_metadata_match_the_repository(client):
    models = demo_models()
    assert models, "no demo models on disk"
    for task, versions in models.items():
        assert client.is_model_ready(task) is True, task
        for version in versions:
            assert client.is_model_ready(task, version) is True, (task, version)
        classes = next(iter(versions.values()))["classes"]
        metadata = client.get_model_metadata(task)
        assert metadata.name == task
        assert sorted(metadata.versions) == sorted(versions)
        assert metadata.platform == "fptserve"
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "BYTES", [-1])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("probabilities", "FP32", [-1, len(classes)]), ("label", "BYTES", [-1])]
    # an unknown model, or version, is not ready (false, or NOT_FOUND)
    for name, version in [("no-such-task", ""), ("dr-grade", "99")]:
        try:
            assert client.is_model_ready(name, version) is False
        except InferenceServerException as e:
            assert e.status() == "StatusCode.NOT_FOUND", e


@pytest.mark.parametrize("input_name", ["dicom/grey8_explicit_le.dcm", "images/rgb8.png"])
def test_infer_gives_the_classifier_and_pytorch_answers(daemon, client, stubs, input_name):
    """ModelInfer's probabilities are Classify's (same daemon, same file, same adapter) to
    float32 precision and PyTorch's within the reference tolerance; labels agree."""
    cases, tolerance = reference_cases(input_name)
    assert cases
    data = (FIXTURES / input_name).read_bytes()
    expected = classify(stubs, daemon.addr, data, [f"{c['task']}@{c['version']}" for c in cases])
    for case, theirs in zip(cases, expected.results):
        result = client.infer(case["task"], [image_input([data])], model_version=case["version"],
                              request_id=f"ref-{case['task']}-{case['version']}")
        response = result.get_response()
        assert response.id == f"ref-{case['task']}-{case['version']}"
        assert response.model_name == case["task"]
        probabilities = result.as_numpy("probabilities")
        assert probabilities.dtype == np.float32 and probabilities.shape == (1, len(case["classes"]))
        assert probabilities[0] == pytest.approx([s.probability for s in theirs.scores], abs=1e-6)
        assert probabilities[0] == pytest.approx(case["probabilities"], abs=tolerance)
        labels = result.as_numpy("label")
        assert labels.shape == (1,)
        assert labels[0].decode() == theirs.label == case["label"]


def test_infer_on_two_images_and_the_default_version(daemon, client, stubs):
    """N=2 in one call: one row per image, in order. No version asks for the task's
    default, which is the adapter Classify picks for an unpinned task."""
    dicom, png = DICOM.read_bytes(), PNG.read_bytes()
    result = client.infer("dr-grade", [image_input([dicom, png])])
    probabilities, labels = result.as_numpy("probabilities"), result.as_numpy("label")
    versions = demo_models()["dr-grade"]
    assert probabilities.shape == (2, len(versions[newest(versions)]["classes"]))
    assert labels.shape == (2,)
    for row, data, name in [(0, dicom, "dicom/grey8_explicit_le.dcm"), (1, png, "images/rgb8.png")]:
        (theirs,) = classify(stubs, daemon.addr, data, ["dr-grade"]).results
        assert probabilities[row] == pytest.approx([s.probability for s in theirs.scores], abs=1e-6)
        assert labels[row].decode() == theirs.label
        cases, tolerance = reference_cases(name)
        (case,) = [c for c in cases if c["task"] == "dr-grade" and c["version"] == theirs.adapter_version]
        assert probabilities[row] == pytest.approx(case["probabilities"], abs=tolerance)


def test_raw_protocol_shapes_contents_and_output_selection(daemon):
    """The protocol below tritonclient (its generated stubs, our own encoding): shape [N,1],
    elements in `contents` instead of raw_input_contents, `outputs` choosing what comes back,
    and the raw output layout (FP32 little-endian rows, length-prefixed BYTES)."""
    dicom, png = DICOM.read_bytes(), PNG.read_bytes()
    with grpc.insecure_channel(daemon.addr) as channel:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)

        def request(shape, raw=True, outputs=()):
            r = kserve_pb2.ModelInferRequest(model_name="skin-lesion", id="raw-call")
            tensor = r.inputs.add(name="image", datatype="BYTES", shape=shape)
            if raw:
                r.raw_input_contents.append(raw_bytes_tensor([dicom, png]))
            else:
                tensor.contents.bytes_contents.extend([dicom, png])
            for name in outputs:
                r.outputs.add(name=name)
            return r

        flat = stub.ModelInfer(request([2]), timeout=60)
        assert flat.id == "raw-call" and flat.model_name == "skin-lesion"
        outputs = {o.name: (o, raw) for o, raw in zip(flat.outputs, flat.raw_output_contents)}
        assert sorted(outputs) == ["label", "probabilities"]
        tensor, raw = outputs["probabilities"]
        classes = len(demo_models()["skin-lesion"]["1"]["classes"])
        assert (tensor.datatype, list(tensor.shape)) == ("FP32", [2, classes])
        probabilities = np.frombuffer(raw, dtype="<f4").reshape(2, classes)
        tensor, raw = outputs["label"]
        assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [2])
        labels = parse_raw_bytes_tensor(raw)
        for row, name in enumerate(["dicom/grey8_explicit_le.dcm", "images/rgb8.png"]):
            cases, tolerance = reference_cases(name)
            (case,) = [c for c in cases if c["task"] == "skin-lesion"]
            assert probabilities[row] == pytest.approx(case["probabilities"], abs=tolerance)
            assert labels[row].decode() == case["label"]

        column = stub.ModelInfer(request([2, 1]), timeout=60)
        assert np.frombuffer(column.raw_output_contents[0], "<f4").tolist() == probabilities.ravel().tolist()

        contents = stub.ModelInfer(request([2], raw=False), timeout=60)
        answered = dict(zip([o.name for o in contents.outputs], contents.raw_output_contents))
        assert np.frombuffer(answered["probabilities"], "<f4").tolist() == probabilities.ravel().tolist()

        only_label = stub.ModelInfer(request([2], outputs=["label"]), timeout=60)
        assert [o.name for o in only_label.outputs] == ["label"]
        assert parse_raw_bytes_tensor(only_label.raw_output_contents[0]) == labels


def test_protocol_errors_and_the_server_keeps_serving(daemon, client):
    png = PNG.read_bytes()
    assert triton_status(lambda: client.infer("no-such-task", [image_input([png])])) == "StatusCode.NOT_FOUND"
    # wrong input name, wrong datatype
    assert triton_status(lambda: client.infer("dr-grade", [image_input([png], name="pixels")])) \
        == "StatusCode.INVALID_ARGUMENT"
    wrong_type = triton.InferInput("image", [4], "UINT8")
    wrong_type.set_data_from_numpy(np.array([1, 2, 3, 4], dtype=np.uint8))
    assert triton_status(lambda: client.infer("dr-grade", [wrong_type])) == "StatusCode.INVALID_ARGUMENT"
    # bytes that are no image: refused, and the next call is answered
    for garbage in [b"garbage", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, b"\0" * 128 + b"DICM" + b"garbage"]:
        assert triton_status(lambda: client.infer("dr-grade", [image_input([garbage])])) \
            == "StatusCode.INVALID_ARGUMENT", garbage
    assert client.infer("dr-grade", [image_input([png])]).as_numpy("probabilities").shape[0] == 1
    # shape and element count that disagree, two inputs, a shape of rank 3
    with grpc.insecure_channel(daemon.addr) as channel:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        for shape, inputs in [([2], 1), ([1], 2), ([1, 1, 1], 1)]:
            r = kserve_pb2.ModelInferRequest(model_name="dr-grade")
            for i in range(inputs):
                r.inputs.add(name="image" if i == 0 else f"image{i}", datatype="BYTES", shape=shape)
                r.raw_input_contents.append(raw_bytes_tensor([png]))
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(r, timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, inputs)
    # RPCs of Triton's service that fptserve does not declare
    assert triton_status(lambda: client.get_model_config("dr-grade")) == "StatusCode.UNIMPLEMENTED"
    assert triton_status(lambda: client.get_inference_statistics("dr-grade")) == "StatusCode.UNIMPLEMENTED"
    assert client.is_server_ready() is True


def test_without_an_admin_token_the_repository_extension_is_off(client):
    assert list(client.get_server_metadata().extensions) == []
    for call in [lambda h: client.load_model("dr-grade", headers=h),
                 lambda h: client.unload_model("dr-grade", headers=h),
                 lambda h: client.get_model_repository_index(headers=h)]:
        for headers in [None, AUTH]:
            assert triton_status(lambda: call(headers)) == "StatusCode.UNIMPLEMENTED"
    assert client.is_model_ready("dr-grade") is True


# --- 3. the model repository extension -------------------------------------------------------

@pytest.fixture(scope="module")
def repository_daemon(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("admin") / "token"
    token_file.write_text(TOKEN + "\n")
    d = Server(admin_token_file=token_file)
    yield d
    d.kill()


def test_repository_extension_unloads_and_loads_a_task(repository_daemon):
    models = demo_models()
    png = PNG.read_bytes()
    client = triton.InferenceServerClient(url=repository_daemon.addr)
    try:
        assert list(client.get_server_metadata().extensions) == ["model_repository"]
        index = client.get_model_repository_index(headers=AUTH)
        assert sorted((m.name, m.version, m.state) for m in index.models) == sorted(
            (task, version, "READY") for task, versions in models.items() for version in versions)

        # the bearer token guards all three, and only them
        for headers in [None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}]:
            for call in [lambda: client.load_model("dr-grade", headers=headers),
                         lambda: client.unload_model("dr-grade", headers=headers),
                         lambda: client.get_model_repository_index(headers=headers)]:
                assert triton_status(call) == "StatusCode.UNAUTHENTICATED", headers
        before = client.infer("dr-grade", [image_input([png])])
        pinned = client.infer("dr-grade", [image_input([png])], model_version="1")

        client.unload_model("dr-grade", headers=AUTH)
        assert client.is_model_ready("dr-grade") is False
        for version in models["dr-grade"]:
            assert client.is_model_ready("dr-grade", version) is False
        assert client.is_model_ready("skin-lesion") is True
        assert triton_status(lambda: client.infer("dr-grade", [image_input([png])])) == "StatusCode.NOT_FOUND"
        assert triton_status(lambda: client.unload_model("dr-grade", headers=AUTH)) == "StatusCode.NOT_FOUND"
        states = {(m.name, m.version): m.state for m in client.get_model_repository_index(headers=AUTH).models}
        for version in models["dr-grade"]:
            assert states[("dr-grade", version)] == "UNAVAILABLE"
        assert states[("skin-lesion", "1")] == "READY"
        with grpc.insecure_channel(repository_daemon.addr) as channel:
            ready_only = kserve_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                kserve_pb2.RepositoryIndexRequest(ready=True), metadata=list(AUTH.items()), timeout=30)
        assert "dr-grade" not in {m.name for m in ready_only.models}
        assert all(m.state == "READY" for m in ready_only.models) and ready_only.models

        assert triton_status(lambda: client.load_model("no-such-task", headers=AUTH)) == "StatusCode.NOT_FOUND"
        client.load_model("dr-grade", headers=AUTH)
        for version in models["dr-grade"]:
            assert client.is_model_ready("dr-grade", version) is True
        after = client.infer("dr-grade", [image_input([png])])
        assert after.as_numpy("probabilities")[0] == pytest.approx(before.as_numpy("probabilities")[0], abs=1e-6)
        assert after.as_numpy("label").tolist() == before.as_numpy("label").tolist()
        again = client.infer("dr-grade", [image_input([png])], model_version="1")
        assert again.as_numpy("probabilities")[0] == pytest.approx(pinned.as_numpy("probabilities")[0], abs=1e-6)
        assert sorted((m.name, m.version, m.state) for m in client.get_model_repository_index(headers=AUTH).models) \
            == sorted((task, version, "READY") for task, versions in models.items() for version in versions)
    finally:
        client.close()


# --- 4. health and readiness while the models load ----------------------------------------------

@pytest.fixture(scope="module")
def many_adapters(tmp_path_factory):
    """The demo backbone and 200 copies of skin-lesion under task-000..task-199: loading
    them takes seconds, long enough to call the daemon before it is ready."""
    spec = importlib.util.spec_from_file_location("bench_repos", ROOT / "benches" / "repos.py")
    repos = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repos)
    template = repos.adapter(DEMO, "skin-lesion", "1")
    return repos.cloned_repository(tmp_path_factory.mktemp("many"), template, 200)


def test_port_is_bound_before_loading_and_nothing_is_served_until_ready(many_adapters, stubs):
    pb, pb_grpc = stubs
    d = Server(repository=many_adapters, wait_for="listening")
    try:
        with grpc.insecure_channel(d.addr) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(service=s)) for s in SERVICES]
            first = [next(w).status for w in watches]
            inference = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
            checks = [health.Check(health_pb2.HealthCheckRequest(service=s), timeout=10).status
                      for s in SERVICES]
            live = inference.ServerLive(kserve_pb2.ServerLiveRequest(), timeout=10).live
            ready = inference.ServerReady(kserve_pb2.ServerReadyRequest(), timeout=10).ready
            with pytest.raises(grpc.RpcError) as classify_refused:
                pb_grpc.ClassifierStub(channel).Classify(
                    pb.ClassifyRequest(image=PNG.read_bytes(), tasks=["task-000"]), timeout=30)
            request = kserve_pb2.ModelInferRequest(model_name="task-000")
            request.inputs.add(name="image", datatype="BYTES", shape=[1])
            request.raw_input_contents.append(raw_bytes_tensor([PNG.read_bytes()]))
            with pytest.raises(grpc.RpcError) as infer_refused:
                inference.ModelInfer(request, timeout=30)
            # all of that happened before the daemon said it was serving
            assert not d.events["serving"].is_set(), "loading finished before the checks: use more adapters"

            assert first == [health_pb2.HealthCheckResponse.NOT_SERVING] * len(SERVICES)
            assert checks == [health_pb2.HealthCheckResponse.NOT_SERVING] * len(SERVICES)
            assert live is True and ready is False
            assert classify_refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert infer_refused.value.code() == grpc.StatusCode.UNAVAILABLE

            # then every service turns SERVING, and calls are answered
            for watch in watches:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
                deadline = time.monotonic() + 120
                while status != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                    status = next(watch).status
                assert status == health_pb2.HealthCheckResponse.SERVING
                watch.cancel()
            assert d.events["serving"].wait(30)
            assert inference.ServerReady(kserve_pb2.ServerReadyRequest(), timeout=10).ready is True
            answer = pb_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(image=PNG.read_bytes(), tasks=["task-199"]), timeout=60)
            (case,) = [c for c in reference_cases("images/rgb8.png")[0] if c["task"] == "skin-lesion"]
            assert [s.probability for s in answer.results[0].scores] == pytest.approx(case["probabilities"], abs=1e-4)
            assert inference.ModelInfer(request, timeout=60).model_name == "task-000"
        assert d.line_of["listening"] < d.line_of["serving"]
        assert d.stop() == 0
    finally:
        d.kill()


def test_health_of_every_service_on_a_ready_daemon(daemon):
    with grpc.insecure_channel(daemon.addr) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in SERVICES:
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status \
                == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


# --- 5. server reflection ---------------------------------------------------------------------

REFLECTED = {"fptserve.v1.Classifier", "inference.GRPCInferenceService", "grpc.health.v1.Health",
             "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}


def our_inference_service(tmp_path):
    out = tmp_path / "ours.pb"
    assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--descriptor_set_out={out}", str(OUR_PROTO)]) == 0
    (service,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0].service
    return {m.name: (m.input_type.lstrip("."), m.output_type.lstrip(".")) for m in service.method}


def reflection_v1_messages():
    """grpc.reflection.v1's request and response classes. The v1 proto is the v1alpha one
    under another package (same messages, fields and numbers), so they are built from
    grpcio-reflection's v1alpha descriptor with the package renamed."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(reflection_v1alpha_pb2.DESCRIPTOR.serialized_pb)
    assert proto.package == "grpc.reflection.v1alpha"
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.package, proto.name = "grpc.reflection.v1", "grpc/reflection/v1/reflection.proto"
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type, method.output_type = (method.input_type.replace(old, new),
                                                 method.output_type.replace(old, new))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return [message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{n}"))
            for n in ["ServerReflectionRequest", "ServerReflectionResponse"]]


def test_reflection_v1alpha_lists_and_describes_every_service(daemon, tmp_path):
    with grpc.insecure_channel(daemon.addr) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert REFLECTED <= set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        described = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
        assert described == our_inference_service(tmp_path)
        assert pool.FindServiceByName("fptserve.v1.Classifier").FindMethodByName("Classify")
        # the raw stub too: a host-less request answers with the list
        stub = reflection_v1alpha_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_v1alpha_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=30)
        assert REFLECTED <= {s.name for s in reply.list_services_response.service}


def test_reflection_v1_lists_and_describes_every_service(daemon, tmp_path):
    Request, Response = reflection_v1_messages()
    with grpc.insecure_channel(daemon.addr) as channel:
        info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=Request.SerializeToString,
                                     response_deserializer=Response.FromString)
        listed, described = info(iter([
            Request(list_services=""),
            Request(file_containing_symbol="inference.GRPCInferenceService"),
        ]), timeout=30)
    assert not listed.HasField("error_response"), listed.error_response
    assert REFLECTED <= {s.name for s in listed.list_services_response.service}
    assert not described.HasField("error_response"), described.error_response
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    services = {f"{f.package}.{s.name}": s for f in files for s in f.service}
    methods = {m.name: (m.input_type.lstrip("."), m.output_type.lstrip("."))
               for m in services["inference.GRPCInferenceService"].method}
    assert methods == our_inference_service(tmp_path)


def test_grpcurl_lists_and_describes_the_inference_service(daemon, tmp_path):
    listed = subprocess.run([str(GRPCURL), "-plaintext", daemon.addr, "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert REFLECTED - {"grpc.reflection.v1.ServerReflection"} <= set(listed.stdout.split())
    described = subprocess.run([str(GRPCURL), "-plaintext", daemon.addr, "describe",
                                "inference.GRPCInferenceService"], capture_output=True, text=True, timeout=60)
    assert described.returncode == 0, described.stderr
    for name, (request, response) in our_inference_service(tmp_path).items():
        pattern = rf"rpc {name} \( \.{re.escape(request)} \) returns \( \.{re.escape(response)} \)"
        assert re.search(pattern, described.stdout), (name, described.stdout)


# --- 6. Prometheus ------------------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text):
    """[(name, {label: value}, value)] of a text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        found = SAMPLE.match(line)
        assert found, f"unparsable sample line: {line!r}"
        out.append((found.group(1), dict(LABEL.findall(found.group(3) or "")), float(found.group(4))))
    return out


def value(parsed, name, **labels):
    """The sample's value; 0 when the series does not exist (yet)."""
    matching = [v for n, ls, v in parsed if n == name and ls == labels]
    assert len(matching) <= 1, (name, labels)
    return matching[0] if matching else 0.0


def promtool_check(text):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: tools/system-deps.sh installs it (Debian's prometheus)"
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def test_metrics_pass_promtool_and_count_the_calls(daemon, client, stubs):
    """After one Classify, one ModelInfer of the same new image (for another task sharing
    its normalisation) and one failing ModelInfer, the counters moved by exactly those
    calls, the stage histograms by at least them, and promtool finds nothing to say."""
    models = demo_models()
    # a DICOM carrying the distinctive patient attributes, with pixels no other test sends
    dicom = dicom_with_identity(noise_seed=20260101)
    identity = identity_strings()
    before = samples(daemon.scrape())

    assert classify(stubs, daemon.addr, dicom, ["dr-grade"]).results[0].task == "dr-grade"
    assert client.infer("skin-lesion", [image_input([dicom])]).as_numpy("probabilities").shape[0] == 1
    assert triton_status(lambda: client.infer("no-such-task", [image_input([dicom])])) == "StatusCode.NOT_FOUND"
    text = daemon.scrape()
    after = samples(text)

    checked = promtool_check(text)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "fptserve_requests_total"
    assert moved(requests, method="Classify", code="Ok") == 1
    assert moved(requests, method="ModelInfer", code="Ok") == 1
    assert moved(requests, method="ModelInfer", code="NotFound") == 1
    tasks = "fptserve_task_requests_total"
    assert moved(tasks, task="dr-grade", code="Ok") == 1
    assert moved(tasks, task="skin-lesion", code="Ok") == 1
    assert moved(tasks, task="unknown", code="NotFound") == 1
    for stage in ["decode", "preprocess", "adapter", "total"]:
        assert moved("fptserve_stage_duration_seconds_count", stage=stage) >= 2, stage
    for stage in ["queue", "backbone"]:
        assert moved("fptserve_stage_duration_seconds_count", stage=stage) >= 1, stage
    # one new image, one normalisation: one backbone run of one image, then the cache
    assert moved("fptserve_backbone_batch_size_count") == 1
    assert moved("fptserve_backbone_batch_size_sum") == 1
    assert moved("fptserve_feature_cache_lookups_total", result="miss") >= 1
    assert moved("fptserve_feature_cache_lookups_total", result="hit") >= 1
    assert value(after, "fptserve_feature_cache_bytes") > 0

    # gauges at rest and the models that are loaded
    assert value(after, "fptserve_requests_in_flight") == 0
    assert value(after, "fptserve_backbone_queue_depth") == 0
    loaded = sum(len(versions) for versions in models.values())
    assert value(after, "fptserve_adapters", state="loaded") == loaded
    assert value(after, "fptserve_adapters", state="evicted") == 0
    assert value(after, "fptserve_adapters", state="failed") == 0
    assert value(after, "fptserve_adapter_load_duration_seconds_count") >= loaded
    for kind in ["backbone", "adapter"]:
        assert value(after, "fptserve_model_memory_bytes", kind=kind) > 0, kind
        assert ("fptserve_model_load_failures_total", {"kind": kind}) in [(n, ls) for n, ls, _ in after]
    vm_rss = next(int(line.split()[1]) for line in open(f"/proc/{daemon.proc.pid}/status")
                  if line.startswith("VmRSS:")) * 1024
    resident = value(after, "fptserve_process_resident_memory_bytes")
    assert vm_rss / 2 < resident < vm_rss * 2, (resident, vm_rss)
    assert value(after, "fptserve_build_info", version=CRATE_VERSION) == 1

    # labels come from small fixed sets: never from the image
    task_labels = {ls["task"] for n, ls, _ in after if "task" in ls}
    assert task_labels <= set(models) | {"unknown"}, task_labels
    ds = pydicom.dcmread(io.BytesIO(dicom))
    forbidden = identity + [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    for name, labels, _ in after:
        for label_value in labels.values():
            for secret in forbidden:
                assert secret.lower() not in label_value.lower(), (name, labels)
    assert leaks(text, identity) == []


# --- 7. no patient identity in the logs ------------------------------------------------------------

IDENTITY = {
    "PatientName": "Quixotic^Zebulon",
    "PatientID": "PID-7731-XQ",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACC-55219",
    "InstitutionName": "Saint Quibble Hospital",
    "InstitutionAddress": "4 Marrowbone Row, Glimmerdale",
    "ReferringPhysicianName": "Drzewiecki^Ottoline",
    "PerformingPhysicianName": "Vantongeren^Isolde",
    "OperatorsName": "Pemberthwaite^Cuthbert",
    "StudyDescription": "Fundus review ZQXSTUDYTOKEN",
    "SeriesDescription": "Left eye ZQXSERIESTOKEN",
    "OtherPatientIDs": "OPID-48213-ZQ",
    "PatientAddress": "17 Wobblewick Lane, Frobisham",
    "PatientTelephoneNumbers": "+44 7700 913377",
    "StudyID": "SID-90417",
    "PatientComments": "allergic to ZQXCOMMENTTOKEN",
}


# Parts of the values above that nothing else would write: a log holding any of them
# holds (part of) the identity.
DISTINCTIVE = ["Quixotic", "Zebulon", "Drzewiecki", "Ottoline", "Vantongeren", "Isolde",
               "Pemberthwaite", "Cuthbert", "Quibble", "Marrowbone", "Glimmerdale", "Wobblewick",
               "Frobisham", "ZQXSTUDYTOKEN", "ZQXSERIESTOKEN", "ZQXCOMMENTTOKEN", "PID-7731",
               "ACC-55219", "OPID-48213", "SID-90417", "7700 913377", "19230417",
               "1923-04-17", "17/04/1923", "04/17/1923"]


def identity_strings():
    """Every form in which the identifying values could show up in a text log."""
    forms = set(DISTINCTIVE)
    for text in IDENTITY.values():
        forms |= {text, text.replace("^", " "), text.replace("^", ", ")}
    # Rust's Debug of a byte buffer: [81, 117, 105, ...]
    forms |= {", ".join(str(b) for b in text.encode()) for text in IDENTITY.values()}
    return sorted(forms)


def leaks(text, forms):
    """Which forms occur in the text, ignoring case."""
    lowered = text.lower()
    return [form for form in forms if form.lower() in lowered]


def dicom_with_identity(noise_seed=None):
    """The demo DICOM (Explicit VR Little Endian) with the distinctive identity above, and,
    when asked, seeded noise instead of its pixels (an image no other call sent)."""
    ds = pydicom.dcmread(DICOM)
    for keyword, text in IDENTITY.items():
        setattr(ds, keyword, text)
    if noise_seed is not None:
        shape = (ds.Rows, ds.Columns)
        ds.PixelData = np.random.default_rng(noise_seed).integers(0, 256, shape, dtype=np.uint8).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    assert b"Quixotic^Zebulon" in data and data[128:132] == b"DICM"
    return data


@pytest.mark.parametrize("log_format", ["json", "human"])
def test_logs_and_metrics_carry_no_patient_identity(stubs, log_format):
    """At the most verbose level (FPTSERVE_LOG=trace), through both protocols, on success
    and on failure (pixel data cut short, an unknown task), no identifying attribute of the
    DICOM reaches stderr or /metrics; and the log lines of the calls carry their ids."""
    pb, pb_grpc = stubs
    dicom = dicom_with_identity()
    truncated = dicom[:len(dicom) - 20000]  # inside the 66000 bytes of pixel data at the end
    cut_in_identity = dicom[:dicom.index(b"Wobblewick") + 6]  # inside PatientAddress's value
    forms = identity_strings()
    d = Server(log_format=log_format, env={"FPTSERVE_LOG": "trace"})
    try:
        first_call_line = len(d.lines)
        ids = {}

        def call_classify(data, tasks, code):
            request_id = f"obs-{log_format}-classify-{len(ids)}"
            ids[request_id] = code
            with grpc.insecure_channel(d.addr) as channel:
                stub = pb_grpc.ClassifierStub(channel)
                request = pb.ClassifyRequest(dicom=data, tasks=tasks, request_id=request_id)
                if code == grpc.StatusCode.OK:
                    assert stub.Classify(request, timeout=60).request_id == request_id
                else:
                    with pytest.raises(grpc.RpcError) as failed:
                        stub.Classify(request, timeout=60)
                    assert failed.value.code() == code, failed.value

        def call_infer(data, model, code):
            request_id = f"obs-{log_format}-infer-{len(ids)}"
            ids[request_id] = code
            client = triton.InferenceServerClient(url=d.addr)
            try:
                if code == grpc.StatusCode.OK:
                    assert client.infer(model, [image_input([data])], request_id=request_id) \
                        .get_response().id == request_id
                else:
                    assert triton_status(lambda: client.infer(model, [image_input([data])], request_id=request_id)) \
                        == str(code)
            finally:
                client.close()

        call_classify(dicom, ["dr-grade", "chest-xray"], grpc.StatusCode.OK)
        call_infer(dicom, "skin-lesion", grpc.StatusCode.OK)
        call_classify(truncated, ["dr-grade"], grpc.StatusCode.INVALID_ARGUMENT)
        call_infer(truncated, "dr-grade", grpc.StatusCode.INVALID_ARGUMENT)
        call_classify(cut_in_identity, ["dr-grade"], grpc.StatusCode.INVALID_ARGUMENT)
        call_classify(dicom, ["no-such-task"], grpc.StatusCode.NOT_FOUND)
        call_infer(dicom, "no-such-task", grpc.StatusCode.NOT_FOUND)
        metrics = d.scrape()
        time.sleep(0.5)  # lines written as the calls finished
        last_call_line = len(d.lines)
        assert d.stop() == 0
    finally:
        d.kill()

    log = d.log()
    assert re.search(r'"level":"TRACE"|\bTRACE\b', log), "FPTSERVE_LOG=trace did not raise the log level"
    assert leaks(log, forms) == [], f"patient identity in the {log_format} log"
    assert leaks(metrics, forms) == [], "patient identity in /metrics"

    # every call left lines carrying its id; every line about classifying or inferring
    # written during the calls (fptserve's at any level, any library's at info or above)
    # carries one of them
    call_lines = d.lines[first_call_line:last_call_line]
    for request_id in ids:
        assert any(request_id in line for line in call_lines), f"no log line carries {request_id}"
    untagged, checked = [], 0
    for line in call_lines:
        if log_format == "json":
            try:
                event = json.loads(line)
            except ValueError:
                continue
            level, target = event.get("level", ""), event.get("target", "")
            about = f"{event.get('message', '')} {target}".lower()
            tags = json.dumps([event.get("span"), event.get("spans")])
        else:  # `<time> <LEVEL> <spans>: <target>: <message> <fields>`
            found = re.search(r"\b(TRACE|DEBUG|INFO|WARN|ERROR)\b", line)
            level = found.group(1) if found else ""
            target = "fptserve" if re.search(r"\sfptserve(::\w+)*: ", line) else ""
            about, tags = line.lower(), line
        ours = target.startswith("fptserve") or level in {"INFO", "WARN", "ERROR"}
        if ours and ("classif" in about or "infer" in about):
            checked += 1
            if not any(request_id in tags for request_id in ids):
                untagged.append(line)
    assert not untagged, "lines of a call without its request id:\n" + "".join(untagged[:10])
    assert checked >= len(ids), f"only {checked} lines about the {len(ids)} calls"
