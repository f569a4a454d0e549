"""TLS and mutual TLS on the gRPC listeners, seen by grpcio (gRPC's own C core TLS
stack) with certificates made here by the PyPI `cryptography` package: the right
certificates connect, wrong ones and plaintext do not, replaced certificate files apply
to new connections without a restart, and an admin API off loopback is refused unless it
authenticates its callers.
"""

import datetime
import ipaddress
import shutil
import subprocess

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from test_daemon import BINARY, ROOT, Daemon, stubs  # noqa: F401 (fixture)

PNG = ROOT / "models" / "fixtures" / "images" / "rgb8.png"
HOST = "localhost"


class Authority:
    """A CA that signs server and client certificates."""

    def __init__(self, name):
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def pem(self):
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name, server):
        """(certificate PEM, key PEM) for a server (localhost, 127.0.0.1) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(HOST), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = Authority("fptserve test CA"), Authority("another CA")
    files = {"ca.pem": ca.pem(), "other-ca.pem": other_ca.pem()}
    for prefix, authority, server in [("server", ca, True), ("client", ca, False),
                                      ("stranger", other_ca, False), ("server2", other_ca, True)]:
        cert, key = authority.issue(prefix, server)
        files[f"{prefix}.pem"], files[f"{prefix}.key"] = cert, key
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def secure_call(addr, pki, root="ca.pem", client=None):
    """Classify the PNG over TLS trusting `root`, presenting `client`'s certificate."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / root).read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.pem").read_bytes() if client else None,
    )
    options = [("grpc.ssl_target_name_override", HOST)]
    with grpc.secure_channel(addr, credentials, options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def refused(call):
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.code()


def test_tls_serves_trusting_clients_and_reloads_certificates_without_restart(pki, tmp_path, stubs):
    pb, pb_grpc = stubs
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    shutil.copy(pki / "server.pem", cert)
    shutil.copy(pki / "server.key", key)
    d = Daemon("--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert secure_call(d.addr, pki) == health_pb2.HealthCheckResponse.SERVING
        # a real classification over TLS
        credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
        with grpc.secure_channel(d.addr, credentials, options=[("grpc.ssl_target_name_override", HOST)]) as ch:
            reply = pb_grpc.ClassifierStub(ch).Classify(
                pb.ClassifyRequest(image=PNG.read_bytes(), tasks=["dr-grade"]), timeout=30)
            assert reply.results[0].task == "dr-grade"
        # plaintext, and a client that trusts another CA, get nowhere
        with grpc.insecure_channel(d.addr) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert refused(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)) \
                == grpc.StatusCode.UNAVAILABLE
        assert refused(lambda: secure_call(d.addr, pki, root="other-ca.pem")) == grpc.StatusCode.UNAVAILABLE

        # the operator replaces the files (a renewed certificate from another CA): new
        # connections get it, no restart
        shutil.copy(pki / "server2.key", key)
        shutil.copy(pki / "server2.pem", cert)
        assert secure_call(d.addr, pki, root="other-ca.pem") == health_pb2.HealthCheckResponse.SERVING
        assert refused(lambda: secure_call(d.addr, pki)) == grpc.StatusCode.UNAVAILABLE
        # a broken replacement keeps the last good certificate
        cert.write_text("not a certificate")
        assert secure_call(d.addr, pki, root="other-ca.pem") == health_pb2.HealthCheckResponse.SERVING
        assert "TLS files changed but do not load" in d.log()
        assert d.proc.poll() is None
    finally:
        d.proc.kill()


def test_mutual_tls_takes_only_client_certificates_from_the_client_ca(pki):
    d = Daemon("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
               "--tls-client-ca", str(pki / "ca.pem"))
    try:
        assert secure_call(d.addr, pki, client="client") == health_pb2.HealthCheckResponse.SERVING
        assert refused(lambda: secure_call(d.addr, pki)) == grpc.StatusCode.UNAVAILABLE
        assert refused(lambda: secure_call(d.addr, pki, client="stranger")) == grpc.StatusCode.UNAVAILABLE
        # the admin listener is under the same mutual TLS: with the client certificate
        # the call reaches it (it serves no health service), without it does not
        assert d.admin_addr
        assert refused(lambda: secure_call(d.admin_addr, pki, client="client")) == grpc.StatusCode.UNIMPLEMENTED
        assert refused(lambda: secure_call(d.admin_addr, pki)) == grpc.StatusCode.UNAVAILABLE
    finally:
        d.proc.kill()


def run_briefly(*args):
    """Starts the daemon: (None, log) once it serves, or (exit code, log) if it exits."""
    proc = subprocess.Popen([str(BINARY), "serve", "--grpc-listen", "127.0.0.1:0",
                             "--metrics-listen", "off", *args],
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if " serving" in line:
                return None, "".join(lines)
        return proc.wait(20), "".join(lines)
    finally:
        proc.kill()
        proc.wait()


def test_an_admin_api_off_loopback_must_authenticate_its_callers(pki, tmp_path):
    code, err = run_briefly("--admin-listen", "0.0.0.0:0")
    assert code not in (None, 0)
    assert "not a loopback address" in err and "admin_token_file" in err
    # TLS alone authenticates the server, not the callers
    code, err = run_briefly("--admin-listen", "0.0.0.0:0",
                            "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    assert code not in (None, 0) and "not a loopback address" in err
    # a token, or client certificates, make it acceptable: the daemon serves
    token = tmp_path / "token"
    token.write_text("s3cret-admin-token\n")
    for extra in (["--admin-token-file", str(token)],
                  ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                   "--tls-client-ca", str(pki / "ca.pem")]):
        code, err = run_briefly("--admin-listen", "0.0.0.0:0", *extra)
        assert code is None, f"exited {code}: {err}"
