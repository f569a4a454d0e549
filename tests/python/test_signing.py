"""Adapter signatures (--trusted-keys, --require-signatures): manifests signed here with
ed25519 by the PyPI `cryptography` package are accepted by the real daemon; an unsigned,
tampered or untrusted-signer adapter is refused at start-up and through the admin API,
with the reason, while the rest serve.
"""

import json
import shutil
import subprocess

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from test_daemon import GRPCURL, ROOT, Daemon, stubs  # noqa: F401 (fixture)

DEMO = ROOT / "models" / "demo"


def raw_public(key):
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(folder, key):
    (folder / "manifest.sig").write_text(key.sign((folder / "manifest.json").read_bytes()).hex() + "\n")


def repository_with_signatures(tmp_path):
    """The demo repository with: dr-grade 1 and 2 signed by the trusted key, chest-xray
    signed and then its manifest changed, skin-lesion unsigned; and dr-grade 1 signed by a
    stranger in a second copy (returned as the folder to upload later)."""
    trusted, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    repo = tmp_path / "repo"
    shutil.copytree(DEMO, repo)
    tasks = repo / "tasks"
    sign(tasks / "dr-grade" / "1", trusted)
    sign(tasks / "dr-grade" / "2", trusted)
    sign(tasks / "chest-xray" / "1", trusted)
    manifest = tasks / "chest-xray" / "1" / "manifest.json"
    changed = json.loads(manifest.read_text())
    changed["classes"] = list(reversed(changed["classes"]))  # still a valid manifest
    manifest.write_text(json.dumps(changed, indent=2))
    foreign = tmp_path / "foreign"
    shutil.copytree(tasks / "skin-lesion" / "1", foreign)
    sign(foreign, stranger)
    keys = tmp_path / "trusted.keys"
    keys.write_text(f"# release signing key\n{raw_public(trusted).hex()}  # 2026\n")
    return repo, keys, foreign, trusted


def tasks_served(daemon, stubs):
    pb, pb_grpc = stubs
    with grpc.insecure_channel(daemon.addr) as channel:
        reply = pb_grpc.ClassifierStub(channel).ListTasks(pb.ListTasksRequest())
    return {t.name: sorted(v.version for v in t.versions) for t in reply.tasks}


def load_adapter(daemon, path):
    return subprocess.run([str(GRPCURL), "-plaintext", "-d", json.dumps({"path": str(path)}),
                           daemon.admin_addr, "fptserve.v1.Admin/LoadAdapter"],
                          capture_output=True, text=True, timeout=60)


def test_required_signatures_admit_only_adapters_signed_by_a_trusted_key(tmp_path, stubs):
    repo, keys, foreign, trusted = repository_with_signatures(tmp_path)
    d = Daemon("--trusted-keys", str(keys), "--require-signatures",
               "--admin-allow-root", str(tmp_path), repository=repo)
    try:
        assert tasks_served(d, stubs) == {"dr-grade": ["1", "2"]}
        log = d.log()
        assert "chest-xray" in log and "does not verify against any trusted key" in log
        assert "unsigned, and signatures are required" in log
        metrics = d.metrics()
        assert metrics['fptserve_adapters{state="failed"}'] == 2
        assert metrics['fptserve_model_load_failures_total{kind="adapter"}'] == 2
        # through the admin API: the stranger's signature and an unsigned folder are refused
        for folder in [foreign, repo / "tasks" / "skin-lesion" / "1"]:
            loaded = load_adapter(d, folder)
            assert loaded.returncode != 0
            assert "PermissionDenied" in loaded.stderr, loaded.stderr
        # signing the unsigned one with the trusted key makes it loadable, without a restart
        sign(repo / "tasks" / "skin-lesion" / "1", trusted)
        loaded = load_adapter(d, repo / "tasks" / "skin-lesion" / "1")
        assert loaded.returncode == 0, loaded.stderr
        assert tasks_served(d, stubs) == {"dr-grade": ["1", "2"], "skin-lesion": ["1"]}
    finally:
        d.proc.kill()


def test_without_requiring_them_unsigned_adapters_load_but_bad_signatures_do_not(tmp_path, stubs):
    repo, keys, _, _ = repository_with_signatures(tmp_path)
    d = Daemon("--trusted-keys", str(keys), repository=repo)
    try:
        assert tasks_served(d, stubs) == {"dr-grade": ["1", "2"], "skin-lesion": ["1"]}
    finally:
        d.proc.kill()
