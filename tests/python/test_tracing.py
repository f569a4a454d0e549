"""OpenTelemetry trace export (`--otlp-endpoint`): the real daemon sends its spans over
OTLP/gRPC to a collector built here from the OpenTelemetry project's own protocol
package (opentelemetry-proto on PyPI), and the spans say what a call did: one span per
call carrying its request id, with its decode and preprocess stages as children. No
patient attribute of the DICOM it classified appears anywhere in what was exported.
"""

import signal
from concurrent import futures

import grpc
import pydicom
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from test_daemon import FIXTURES, Daemon, free_port, stubs  # noqa: F401 (fixture)

PATIENT_NAME = "Vantablack^Orsolya"
PATIENT_ID = "PID-TRACE-90210"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.requests = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def attributes(span):
    return {a.key: a.value.string_value for a in span.attributes}


def test_spans_of_a_call_reach_an_otlp_collector_with_its_request_id_and_no_patient_data(stubs, tmp_path):
    pb, pb_grpc = stubs
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()

    ds = pydicom.dcmread(FIXTURES / "dicom" / "grey8_explicit_le.dcm")
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    dicom = tmp_path / "patient.dcm"
    ds.save_as(dicom)

    daemon = Daemon("--otlp-endpoint", f"http://127.0.0.1:{port}")
    try:
        with grpc.insecure_channel(daemon.addr) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            stub.Classify(pb.ClassifyRequest(
                dicom=dicom.read_bytes(), tasks=["dr-grade"], request_id="trace-me-123"))
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0, daemon.log()
        server.stop(1)

    # the exporter flushes at exit: everything is here now
    spans = []
    for request in collector.requests:
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert service.get("service.name") == "fptserve"
            for scope in resource_spans.scope_spans:
                spans.extend(scope.spans)
        assert PATIENT_NAME.split("^")[0].encode() not in request.SerializeToString()
        assert PATIENT_ID.encode() not in request.SerializeToString()
    calls = [s for s in spans if s.name == "classify"]
    assert len(calls) == 1, [s.name for s in spans]
    call = calls[0]
    assert attributes(call)["request_id"] == "trace-me-123"
    children = {s.name: s for s in spans if s.parent_span_id == call.span_id}
    assert {"decode", "preprocess"} <= set(children), [s.name for s in spans]
    for child in children.values():
        assert child.trace_id == call.trace_id
        assert call.start_time_unix_nano <= child.start_time_unix_nano
        assert child.end_time_unix_nano <= call.end_time_unix_nano
