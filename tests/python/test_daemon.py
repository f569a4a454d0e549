"""The daemon as a new user meets it: the real `fptserve serve` binary on the demo
repository, called by real clients (grpcio stubs generated from proto/, grpcurl through
server reflection, the standard gRPC health client), stopped with SIGTERM.

Expected numbers come from models/fixtures/reference.json (PyTorch + PIL), not from the
daemon.
"""

import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pydicom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "models" / "fixtures"
BINARY = Path(os.environ.get("FPTSERVE_BIN", ROOT / "target" / "debug" / "fptserve"))
GRPCURL = Path(sys.executable).parent / "grpcurl"


def free_port():
    """A port for a server that must be told its port before it starts (the metrics listener,
    Orthanc). Chosen below the kernel's ephemeral range: a port the kernel handed out (bind to
    0) is free only until some client connection takes it as its source port, which made a
    daemon fail to start with "Address already in use" while other tests' connections came
    and went; below the range only explicit binds compete."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low // 2), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below the ephemeral range ({low})")


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubs")
    rc = protoc.main([
        "protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}",
        str(ROOT / "proto" / "fptserve" / "v1" / "classifier.proto"),
    ])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    from fptserve.v1 import classifier_pb2, classifier_pb2_grpc
    return classifier_pb2, classifier_pb2_grpc


class Daemon:
    def __init__(self, *extra, repository=ROOT / "models" / "demo", grpc_listen="127.0.0.1:0"):
        assert BINARY.exists(), f"{BINARY} is missing: build it with cargo build (make test does)"
        self.metrics_port = free_port()
        self.proc = subprocess.Popen(
            [str(BINARY), "--log-format", "json", "serve",
             "--repository", str(repository),
             "--grpc-listen", grpc_listen,
             "--admin-listen", "127.0.0.1:0",
             "--metrics-listen", f"127.0.0.1:{self.metrics_port}", *extra],
            stderr=subprocess.PIPE, text=True,
        )
        self.lines = []
        self.addr = None
        self.admin_addr = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("message") == "admin API listening":
                    self.admin_addr = event["addr"]
                if event.get("message") == "serving":
                    self.addr = event["addr"]
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        assert ready.wait(120), "daemon did not start"
        assert self.addr, "daemon exited:\n" + "".join(self.lines)

    def log(self):
        return "".join(self.lines)

    def metrics(self):
        """The /metrics exposition as {name{labels}: value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values


@pytest.fixture(scope="module")
def daemon():
    d = Daemon()
    yield d
    if d.proc.poll() is None:
        d.proc.kill()


def reference_cases(input_name):
    ref = json.loads((FIXTURES / "reference.json").read_text())
    return [c for c in ref["cases"] if c["input"] == input_name], ref["tolerance"]


@pytest.mark.parametrize("input_name", ["images/rgb8.png", "dicom/grey8_explicit_le.dcm"])
def test_python_client_gets_the_reference_probabilities(daemon, stubs, input_name):
    pb, pb_grpc = stubs
    cases, tol = reference_cases(input_name)
    data = (FIXTURES / input_name).read_bytes()
    with grpc.insecure_channel(daemon.addr) as channel:
        client = pb_grpc.ClassifierStub(channel)
        tasks = [f"{c['task']}@{c['version']}" for c in cases]
        kind = {"dicom": data} if input_name.endswith(".dcm") else {"image": data}
        response = client.Classify(pb.ClassifyRequest(tasks=tasks, request_id="py-1", **kind))
    assert response.request_id == "py-1"
    assert len(response.results) == len(cases)
    for result, case in zip(response.results, cases):
        assert result.task == case["task"] and result.adapter_version == case["version"]
        assert [s.name for s in result.scores] == case["classes"]
        for score, p in zip(result.scores, case["probabilities"]):
            assert abs(score.probability - p) <= tol
        assert result.label == case["label"]
    if input_name.endswith(".dcm"):
        assert response.dicom.sop_instance_uid == cases[0]["sop_instance_uid"]


def test_grpcurl_works_through_reflection(daemon):
    listed = subprocess.run([str(GRPCURL), "-plaintext", daemon.addr, "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "fptserve.v1.Classifier" in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()

    png = base64.b64encode((FIXTURES / "images" / "grey8.png").read_bytes()).decode()
    body = json.dumps({"image": png, "tasks": ["skin-lesion@1"]})
    called = subprocess.run([str(GRPCURL), "-plaintext", "-d", body, daemon.addr,
                             "fptserve.v1.Classifier/Classify"],
                            capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    answer = json.loads(called.stdout)
    case = next(c for c in reference_cases("images/grey8.png")[0] if c["task"] == "skin-lesion")
    probabilities = [s["probability"] for s in answer["results"][0]["scores"]]
    assert probabilities == pytest.approx(case["probabilities"], abs=1e-4)

    missing = subprocess.run([str(GRPCURL), "-plaintext", "-d",
                              json.dumps({"image": png, "tasks": ["nope"]}), daemon.addr,
                              "fptserve.v1.Classifier/Classify"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0
    assert "NotFound" in missing.stderr and "nope" in missing.stderr


def test_health_reports_serving(daemon):
    with grpc.insecure_channel(daemon.addr) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "fptserve.v1.Classifier", "inference.GRPCInferenceService"]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_count_requests(daemon, stubs):
    pb, pb_grpc = stubs
    with grpc.insecure_channel(daemon.addr) as channel:
        client = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            client.Classify(pb.ClassifyRequest(image=b"garbage", tasks=["dr-grade"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10).read().decode()
    assert 'fptserve_requests_total{method="Classify",code="InvalidArgument"}' in text
    assert "fptserve_stage_duration_seconds_bucket" in text
    assert 'fptserve_adapters{state="loaded"} 4' in text


def test_admin_api_through_grpcurl(daemon):
    """An operator's view: the admin listener answers grpcurl through reflection."""
    assert daemon.admin_addr, "no admin listener in the log"
    listed = subprocess.run([str(GRPCURL), "-plaintext", daemon.admin_addr, "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "fptserve.v1.Admin" in listed.stdout.split()
    called = subprocess.run([str(GRPCURL), "-plaintext", "-d", "{}", daemon.admin_addr,
                             "fptserve.v1.Admin/ListAdapters"],
                            capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    adapters = json.loads(called.stdout)["adapters"]
    ready = sorted(f"{a['task']}@{a['version']}" for a in adapters if a["state"] == "ADAPTER_STATE_READY")
    assert ready == ["chest-xray@1", "dr-grade@1", "dr-grade@2", "skin-lesion@1"]
    # the classification listener does not serve it
    wrong = subprocess.run([str(GRPCURL), "-plaintext", "-d", "{}", daemon.addr,
                            "fptserve.v1.Admin/ListAdapters"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0


def test_logs_carry_no_patient_data_and_sigterm_exits_cleanly(daemon, stubs):
    pb, pb_grpc = stubs
    path = FIXTURES / "dicom" / "grey8_explicit_le.dcm"
    ds = pydicom.dcmread(path)
    with grpc.insecure_channel(daemon.addr) as channel:
        pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(dicom=path.read_bytes(), tasks=["dr-grade"], request_id="phi-check"))
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    daemon.reader.join(timeout=10)
    log = daemon.log()
    assert "phi-check" in log, "the request id is on the call's log lines"
    for value in [str(ds.PatientName), str(ds.PatientID)]:
        assert value and value not in log
