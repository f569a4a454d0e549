"""The servers under test as child processes (fptserve and the Python peer), a gRPC client
that can call either, and process memory readings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
MAX_MESSAGE = 256 << 20


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    """A child process that prints its address when it serves."""

    name = "server"

    def __init__(self, argv: list[str], env: dict | None = None):
        self.argv = argv
        self.lines: list[str] = []
        self.addr: str | None = None
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                addr = self.parse_addr(line)
                if addr and not self.addr:
                    self.addr = addr
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(600) or not self.addr:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n" + "".join(self.lines[-40:]))

    def parse_addr(self, line: str) -> str | None:
        raise NotImplementedError

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Fptserve(Server):
    name = "fptserve"

    def __init__(self, binary: Path, repository: Path, threads: int, extra: tuple[str, ...] = (),
                 cache: bool = False):
        """The feature cache is off unless `cache`: the cases send one image over and over, and
        each call must measure a backbone run (case 7 measures the cache itself)."""
        self.admin_addr: str | None = None
        super().__init__([
            str(binary), "--log-format", "json", "serve", "--repository", str(repository),
            "--grpc-listen", "127.0.0.1:0", "--metrics-listen", "off", "--admin-listen", "127.0.0.1:0",
            "--intra-op-threads", str(threads), "--max-in-flight", "256", "--max-queue", "256",
            *(() if cache else ("--feature-cache-bytes", "0")), *extra,
        ])

    def parse_addr(self, line: str) -> str | None:
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if event.get("message") == "admin API listening":
            self.admin_addr = event.get("addr")
        return event.get("addr") if event.get("message") == "serving" else None


class Peer(Server):
    name = "python peer"

    def __init__(self, repository: Path, threads: int, workers: int = 16):
        super().__init__([
            sys.executable, str(BENCHES / "peer.py"), "--repository", str(repository), "--listen", "127.0.0.1:0",
            "--workers", str(workers), "--intra-op-threads", str(threads),
        ], env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def parse_addr(self, line: str) -> str | None:
        return line.split()[1] if line.startswith("serving ") else None


def admin_stubs(out_dir: Path):
    """admin_pb2 / admin_pb2_grpc next to the classifier stubs peer.load_stubs made there."""
    import importlib

    from grpc_tools import protoc

    proto = ROOT / "proto"
    rc = protoc.main(["grpc_tools.protoc", f"-I{proto}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                      str(proto / "fptserve" / "v1" / "admin.proto")])
    if rc != 0:
        raise RuntimeError("protoc failed on admin.proto")
    importlib.invalidate_caches()
    return importlib.import_module("fptserve.v1.admin_pb2"), importlib.import_module("fptserve.v1.admin_pb2_grpc")


class Client:
    """Classify calls to one server; the same client code for every server under test."""

    def __init__(self, addr: str, stubs):
        self.pb, pb_grpc = stubs
        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        self.channel = grpc.insecure_channel(addr, options=options)
        grpc.channel_ready_future(self.channel).result(timeout=60)
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def classify(self, dicom: bytes, tasks: list[str], frame: int = 0):
        return self.stub.Classify(self.pb.ClassifyRequest(dicom=dicom, tasks=tasks, frame=frame), timeout=600)

    def timed(self, dicom: bytes, tasks: list[str]):
        t = time.perf_counter()
        response = self.classify(dicom, tasks)
        return time.perf_counter() - t, response

    def load(self, dicom: bytes | list[bytes], tasks: list[str], concurrency: int,
             requests: int) -> tuple[float, list[float]]:
        """`requests` calls from `concurrency` threads at once, call i sending image
        i mod len(dicom): wall seconds and each call's latency."""
        images = dicom if isinstance(dicom, list) else [dicom]
        latencies: list[float] = []
        lock = threading.Lock()
        counter = iter(range(requests))

        def worker():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                seconds, _ = self.timed(images[i % len(images)], tasks)
                with lock:
                    latencies.append(seconds)

        t = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(worker) for _ in range(concurrency)]:
                f.result()
        return time.perf_counter() - t, latencies

    def close(self) -> None:
        self.channel.close()
