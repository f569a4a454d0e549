"""A corrupt or truncated model file at start-up gets a clear refusal, never a crash inside
ONNX Runtime: a bad backbone makes the daemon exit non-zero naming the file (nothing it could
serve), a bad adapter is skipped with its reason while the rest serve.

The corruptions: the file truncated (the manifest's SHA-256 then refuses it before ONNX Runtime
sees it), and, with the manifest's SHA-256 rewritten to match so that ONNX Runtime gets the
bytes, the file truncated, zero-filled, bit-flipped, a weight tensor cut short inside a valid
protobuf, a node reading a tensor that does not exist, and an operator that does not exist.
"""

import hashlib
import json
import shutil
import subprocess

import grpc
import onnx
import pytest

from test_daemon import BINARY, ROOT, Daemon, stubs  # noqa: F401 (fixture)

DEMO = ROOT / "models" / "demo"


def truncated(data):
    return data[: len(data) // 3]


def zero_filled(data):
    return bytes(len(data))


def bit_flipped(data):
    out = bytearray(data)
    for i in range(0, len(out), 997):
        out[i] ^= 0x55
    return bytes(out)


def short_weight(data):
    model = onnx.load_from_string(data)
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    big.raw_data = big.raw_data[: len(big.raw_data) // 2]
    return model.SerializeToString()


def dangling_input(data):
    model = onnx.load_from_string(data)
    node = next(n for n in model.graph.node if n.op_type == "MatMul")
    node.input[1] = "no_such_tensor"
    return model.SerializeToString()


def unknown_operator(data):
    model = onnx.load_from_string(data)
    next(n for n in model.graph.node if n.op_type == "Softmax").op_type = "NoSuchOperator"
    return model.SerializeToString()


CORRUPTIONS = [truncated, zero_filled, bit_flipped, short_weight, dangling_input, unknown_operator]


def corrupt(repo, folder, how, keep_digest):
    manifest_path = repo / folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    path = repo / folder / manifest["file"]
    path.write_bytes(how(path.read_bytes()))
    if not keep_digest:
        manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest_path.write_text(json.dumps(manifest))
    return path


CASES = [(truncated, True)] + [(how, False) for how in CORRUPTIONS]
IDS = [f"{how.__name__}{'-digest-mismatch' if keep else ''}" for how, keep in CASES]


@pytest.mark.parametrize("how,keep_digest", CASES, ids=IDS)
def test_a_corrupt_backbone_stops_the_daemon_naming_the_file(tmp_path, how, keep_digest):
    repo = tmp_path / "repo"
    shutil.copytree(DEMO, repo)
    path = corrupt(repo, "backbones/vit-tiny-demo", how, keep_digest)
    done = subprocess.run([str(BINARY), "serve", "--repository", str(repo), "--grpc-listen", "127.0.0.1:0",
                           "--metrics-listen", "off", "--admin-listen", "off"],
                          capture_output=True, text=True, timeout=120, env={"RUST_BACKTRACE": "0"})
    log = done.stdout + done.stderr
    assert done.returncode == 1, (done.returncode, log[-3000:])  # an error exit, not a signal
    assert str(path) in log and "backbone skipped" in log, log[-3000:]
    assert "nothing to serve" in log
    assert ("SHA-256" in log) == keep_digest, log[-3000:]
    assert "panicked" not in log


@pytest.mark.parametrize("how,keep_digest", CASES, ids=IDS)
def test_a_corrupt_adapter_is_skipped_with_its_reason_and_the_rest_serve(tmp_path, stubs, how, keep_digest):
    pb, pb_grpc = stubs
    repo = tmp_path / "repo"
    shutil.copytree(DEMO, repo)
    path = corrupt(repo, "tasks/dr-grade/2", how, keep_digest)
    d = Daemon(repository=repo)
    try:
        log = d.log()
        refused = [line for line in log.splitlines() if "adapter refused" in line]
        assert len(refused) == 1 and str(path.parent) in refused[0], log
        with grpc.insecure_channel(d.addr) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            versions = {(t.name, v.version) for t in stub.ListTasks(pb.ListTasksRequest()).tasks for v in t.versions}
            assert ("dr-grade", "2") not in versions and ("dr-grade", "1") in versions, versions
            png = (ROOT / "models" / "fixtures" / "images" / "rgb8.png").read_bytes()
            reply = stub.Classify(pb.ClassifyRequest(image=png, tasks=["dr-grade@1", "skin-lesion"]), timeout=60)
            assert len(reply.results) == 2
            with pytest.raises(grpc.RpcError) as missing:
                stub.Classify(pb.ClassifyRequest(image=png, tasks=["dr-grade@2"]), timeout=60)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "panicked" not in d.log()
    finally:
        d.proc.kill()
        d.proc.wait(timeout=30)
