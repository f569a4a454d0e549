"""Publish a task version into a running daemon through its admin API (fptserve.v1.Admin).

The package does not ship generated protobuf code: the three admin messages it needs are
encoded and decoded here by hand (protocol buffers wire format, proto/fptserve/v1/admin.proto
field numbers), and sent with grpcio's generic unary call. grpcio is imported only when
publishing."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADMIN_SERVICE = "/fptserve.v1.Admin/"
ADAPTER_STATES = {0: "UNSPECIFIED", 1: "LOADING", 2: "READY", 3: "FAILED", 4: "DRAINING", 5: "UNLOADED"}


class PublishError(RuntimeError):
    """The daemon refused the adapter, or could not be reached."""


# --------------------------------------------------------------------------------------------
# protobuf wire format (only what the admin messages use)
# --------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3 | 0) + _varint(value)


def encode(fields: list[tuple[int, Any]]) -> bytes:
    """Encode (field number, value) pairs: str/bytes as length-delimited, bool/int as varint;
    proto3 defaults (empty, 0, False) are left out, as protobuf encoders do."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, bool):
            if value:
                out += _field_varint(number, 1)
        elif isinstance(value, int):
            if value:
                out += _field_varint(number, value)
        elif isinstance(value, str):
            if value:
                out += _field_bytes(number, value.encode("utf-8"))
        elif isinstance(value, (bytes, bytearray)):
            if value:
                out += _field_bytes(number, bytes(value))
        else:
            raise TypeError(f"cannot encode field {number}: {type(value).__name__}")
    return bytes(out)


def decode(data: bytes) -> dict[int, list[Any]]:
    """Decode a message into {field number: [raw values]} (varints as int, length-delimited
    as bytes, fixed64/fixed32 as bytes); unknown fields are kept, like any reader."""
    fields: dict[int, list[Any]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= len(data):
                raise PublishError("truncated protobuf message from the daemon")
            b = data[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value: Any = varint()
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            n = varint()
            value, i = data[i:i + n], i + n
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise PublishError(f"unsupported protobuf wire type {wire} from the daemon")
        fields.setdefault(number, []).append(value)
    return fields


def _last(fields: dict[int, list[Any]], number: int, default: Any) -> Any:
    values = fields.get(number)
    return values[-1] if values else default


def decode_adapter_status(data: bytes) -> dict[str, Any]:
    f = decode(data)
    text = lambda n: _last(f, n, b"").decode("utf-8", "replace")  # noqa: E731
    load_ms = _last(f, 8, None)
    return {
        "task": text(1),
        "version": text(2),
        "state": ADAPTER_STATES.get(_last(f, 3, 0), str(_last(f, 3, 0))),
        "sha256": text(4),
        "backbone": text(5),
        "backbone_sha256": text(6),
        "bytes": _last(f, 7, 0),
        "load_ms": struct.unpack("<d", load_ms)[0] if load_ms else 0.0,
        "pinned": bool(_last(f, 12, 0)),
        "is_default": bool(_last(f, 13, 0)),
        "error": text(14),
        "path": text(15),
    }


def encode_load_adapter(path: str = "", manifest_json: str = "", onnx: bytes = b"", make_default: bool = False,
                        pin: bool = False, replace: bool = False) -> bytes:
    return encode([(1, path), (2, manifest_json), (3, onnx), (4, make_default), (5, pin), (6, replace)])


def decode_load_adapter_response(data: bytes) -> dict[str, Any]:
    f = decode(data)
    return {"adapter": decode_adapter_status(_last(f, 1, b"")), "replaced": bool(_last(f, 2, 0))}


def encode_set_default(task: str, version: str) -> bytes:
    return encode([(1, task), (2, version)])


def decode_set_default_response(data: bytes) -> dict[str, Any]:
    f = decode(data)
    return {"previous": _last(f, 1, b"").decode(), "adapter": decode_adapter_status(_last(f, 2, b""))}


# --------------------------------------------------------------------------------------------
# the call
# --------------------------------------------------------------------------------------------


@dataclass
class AdminTarget:
    address: str  # host:port (https:// or http:// prefix allowed)
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    timeout_s: float = 300.0


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise PublishError(f"{what} {path}: {e.strerror or e}") from None


def _channel(target: AdminTarget):
    import grpc

    address = target.address
    tls = bool(target.tls_ca or target.tls_cert or target.tls_key)
    if address.startswith("https://"):
        address, tls = address[len("https://"):], True
    elif address.startswith("http://"):
        address = address[len("http://"):]
    address = address.rstrip("/")
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    if not tls:
        return grpc.insecure_channel(address, options=options)
    if bool(target.tls_cert) != bool(target.tls_key):
        raise PublishError("--tls-cert and --tls-key go together (a client certificate and its key)")
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(target.tls_ca, "--tls-ca"),
        private_key=_read(target.tls_key, "--tls-key"),
        certificate_chain=_read(target.tls_cert, "--tls-cert"),
    )
    if target.tls_server_name:
        options.append(("grpc.ssl_target_name_override", target.tls_server_name))
    return grpc.secure_channel(address, creds, options=options)


def _metadata(target: AdminTarget) -> list[tuple[str, str]]:
    if target.token_file is None:
        return []
    raw = _read(target.token_file, "--admin-token-file")
    token = (raw or b"").decode("utf-8", "replace").strip()
    if not token:
        raise PublishError(f"--admin-token-file {target.token_file} is empty")
    return [("authorization", f"Bearer {token}")]


def _call(channel, method: str, request: bytes, metadata, timeout: float) -> bytes:
    import grpc

    stub = channel.unary_unary(ADMIN_SERVICE + method, request_serializer=None, response_deserializer=None)
    try:
        return stub(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as e:
        code = e.code().name if e.code() is not None else "UNKNOWN"
        raise PublishError(f"{method} failed: {code}: {e.details()}") from None


def publish_adapter(
    target: AdminTarget, folder: Path, task: str, version: str, mode: str = "upload", make_default: bool = False
) -> dict[str, Any]:
    """Load tasks/<task>/<version> into the daemon: ``upload`` sends manifest.json and the
    ONNX file it names (works whatever the daemon's repository is), ``path`` names the folder
    relative to the daemon's repository (the daemon reads it; signatures beside it apply).
    Returns the adapter's status; raises PublishError unless it is READY."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise PublishError("--publish needs the grpcio package (pip install grpcio)") from None
    folder = Path(folder)
    if mode == "upload":
        manifest_text = (folder / "manifest.json").read_text()
        import json

        onnx = (folder / json.loads(manifest_text)["file"]).read_bytes()
        request = encode_load_adapter(manifest_json=manifest_text, onnx=onnx, make_default=make_default)
    elif mode == "path":
        request = encode_load_adapter(path=f"tasks/{task}/{version}", make_default=make_default)
    else:
        raise PublishError(f"--publish-mode {mode!r}: use upload or path")
    metadata = _metadata(target)
    with _channel(target) as channel:
        answer = decode_load_adapter_response(_call(channel, "LoadAdapter", request, metadata, target.timeout_s))
        status = answer["adapter"]
        if status["state"] != "READY":
            raise PublishError(
                f"the daemon did not make {task}@{version} ready: state {status['state']}"
                + (f": {status['error']}" if status["error"] else "")
            )
        if make_default and not status["is_default"]:
            answer2 = decode_set_default_response(
                _call(channel, "SetDefaultVersion", encode_set_default(task, version), metadata, target.timeout_s)
            )
            status = answer2["adapter"]
    status["replaced"] = answer["replaced"]
    return status
