"""Results as a DICOM Structured Report (ClassifyRequest.structured_report): the report the
real daemon returns is read by two independent DICOM toolkits, pydicom and dcmtk's
dsrdump (which checks the SR document against the Comprehensive SR IOD), and says what
the call said: per task the probabilities, the label and the adapter's name and version,
for the classified instance, in its patient and study.
"""

import datetime
import io
import subprocess

import grpc
import pydicom
import pytest

from test_daemon import FIXTURES, daemon, stubs  # noqa: F401 (fixtures)

DICOM = FIXTURES / "dicom" / "grey8_explicit_le.dcm"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def concept(item):
    return item.ConceptNameCodeSequence[0].CodeMeaning


def report(stub, pb, data, tasks, request_id=""):
    reply = stub.Classify(pb.ClassifyRequest(dicom=data, tasks=tasks, structured_report=True,
                                             request_id=request_id))
    assert reply.structured_report, "no report returned"
    return reply, reply.structured_report


def test_the_report_says_what_classify_said_for_the_source_instance(daemon, stubs, tmp_path):
    pb, pb_grpc = stubs
    data = DICOM.read_bytes()
    source = pydicom.dcmread(DICOM)
    with grpc.insecure_channel(daemon.addr) as channel:
        reply, sr_bytes = report(pb_grpc.ClassifierStub(channel), pb, data, ["dr-grade", "skin-lesion"])
    sr = pydicom.dcmread(io.BytesIO(sr_bytes))

    assert sr.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert sr.SOPClassUID == COMPREHENSIVE_SR == sr.file_meta.MediaStorageSOPClassUID
    assert sr.Modality == "SR"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    # made now (UTC); a call around midnight may see either day
    today = datetime.datetime.now(datetime.timezone.utc).date()
    made = datetime.datetime.strptime(sr.ContentDate, "%Y%m%d").date()
    assert abs((made - today).days) <= 1 and sr.InstanceCreationDate == sr.ContentDate
    # same patient and study, new series and instance
    for keyword in ["PatientName", "PatientID", "StudyInstanceUID"]:
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID not in (source.SOPInstanceUID, sr.SeriesInstanceUID)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == source.SOPClassUID

    assert concept(sr) == "Imaging Measurement Report"
    groups = sr.ContentSequence
    assert len(groups) == len(reply.results)
    for group, result in zip(groups, reply.results):
        assert (group.ValueType, concept(group)) == ("CONTAINER", "Measurement Group")
        items = {concept(i): i for i in group.ContentSequence if i.ValueType != "NUM"}
        assert items["Algorithm Name"].TextValue == result.task
        assert items["Algorithm Version"].TextValue == result.adapter_version
        assert items["Finding"].ConceptCodeSequence[0].CodeMeaning == result.label
        image = items["Source of Measurement"].ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        numbers = [i for i in group.ContentSequence if i.ValueType == "NUM"]
        assert [concept(n) for n in numbers] == [s.name for s in result.scores]
        for n, score in zip(numbers, result.scores):
            value = n.MeasuredValueSequence[0]
            # the exact float32 probability, and its decimal string to 12 places
            assert value.FloatingPointValue == pytest.approx(score.probability, abs=1e-7)
            assert float(value.NumericValue) == pytest.approx(score.probability, abs=1e-9)
            assert value.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"

    # dcmtk reads it as an SR document and finds nothing wrong with it
    path = tmp_path / "report.dcm"
    path.write_bytes(sr_bytes)
    dumped = subprocess.run(["dsrdump", "-v", str(path)], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0, dumped.stderr
    assert "Comprehensive SR Document" in dumped.stdout
    assert not dumped.stderr.strip(), dumped.stderr
    assert f'="{reply.results[0].task}"' in dumped.stdout


def test_each_report_is_a_new_instance_and_images_get_none(daemon, stubs):
    pb, pb_grpc = stubs
    data = DICOM.read_bytes()
    with grpc.insecure_channel(daemon.addr) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        first = pydicom.dcmread(io.BytesIO(report(stub, pb, data, ["dr-grade"])[1]))
        second = pydicom.dcmread(io.BytesIO(report(stub, pb, data, ["dr-grade"])[1]))
        assert first.SOPInstanceUID != second.SOPInstanceUID
        assert first.SeriesInstanceUID != second.SeriesInstanceUID
        # not asked for: no report
        plain = stub.Classify(pb.ClassifyRequest(dicom=data, tasks=["dr-grade"]))
        assert plain.structured_report == b""
        # an image has no patient or study to file a report in
        png = (FIXTURES / "images" / "rgb8.png").read_bytes()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(pb.ClassifyRequest(image=png, tasks=["dr-grade"], structured_report=True))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "DICOM" in refused.value.details()


def test_a_repeated_request_id_repeats_the_report_identity(daemon, stubs):
    """A retry (same request id, frame and tasks) names the same report, so a PACS keeps one;
    any other request id, task list or source gives another."""
    pb, pb_grpc = stubs
    data = DICOM.read_bytes()
    other = pydicom.dcmread(DICOM)
    other.SOPInstanceUID = pydicom.uid.generate_uid()
    buffer = io.BytesIO()
    other.save_as(buffer, enforce_file_format=True)

    def identity(source, tasks, request_id):
        with grpc.insecure_channel(daemon.addr) as channel:
            sr = pydicom.dcmread(io.BytesIO(report(pb_grpc.ClassifierStub(channel), pb, source, tasks,
                                                   request_id)[1]))
        assert sr.SOPInstanceUID.startswith("2.25.") and len(sr.SOPInstanceUID) <= 64
        return sr.SeriesInstanceUID, sr.SOPInstanceUID

    first = identity(data, ["dr-grade"], "orthanc-abc")
    assert identity(data, ["dr-grade"], "orthanc-abc") == first
    assert first[0] != first[1]
    others = [identity(data, ["dr-grade"], "orthanc-abd"), identity(data, ["dr-grade", "skin-lesion"], "orthanc-abc"),
              identity(buffer.getvalue(), ["dr-grade"], "orthanc-abc")]
    for series, sop in others:
        assert series != first[0] and sop != first[1]
