"""The PACS loop with a real Orthanc: images sent with dcmtk's storescu, in several transfer
syntaxes, to a real Orthanc (Debian's orthanc 1.10 and orthanc-python) that runs the
gateway plugin of deploy/orthanc/; the plugin calls the real fptserve daemon and stores the
Structured Report it answers back into Orthanc.

Checked here: each configured image gets exactly one SR, in its study, referencing it; the
SR reads with pydicom and with dcmtk's dsrdump, and its numbers are those of a direct
Classify call on the same file; images of modalities with no task get none; an image
fptserve refuses (no pixel data, an unknown task) is given up at once; the gateway never
classifies its own reports; the series trigger classifies each instance once; logs name no
patient. Nothing is lost and nothing doubled: images that arrive while fptserve is down get
one report each when it returns, also across an Orthanc restart in between, and when
fptserve is killed (SIGKILL) during calls and restarted; work fed again after a crash
between storing a report and recording it stores no second report.

Needs Orthanc, its Python plugin and dcmtk (tools/system-deps.sh installs them) and the
debug binary (make test builds it).
"""

import importlib.util
import io
import json
import shutil
import signal
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pydicom
import pytest
from pydicom.uid import generate_uid

from test_daemon import FIXTURES, ROOT, Daemon, free_port, stubs  # noqa: F401 (fixture)

PLUGIN = ROOT / "deploy" / "orthanc" / "fptserve_gateway.py"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"

# Distinctive patient attributes: none of them may appear in a log.
PATIENT = {
    "PatientName": "Gateway^Orthanc^Loop",
    "PatientID": "PACS-LOOP-4711",
    "PatientBirthDate": "19610203",
    "PatientSex": "O",
    "StudyDate": "20240611",
    "StudyTime": "101500",
    "StudyID": "LOOP7",
    "AccessionNumber": "ACC-LOOP-4711",
    "ReferringPhysicianName": "Referrer^Rita",
    "StudyDescription": "Fundus and skin screening",
}
PHI = [PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["AccessionNumber"], "Referrer^Rita"]

TASKS = {
    "ByModality": {"OP": ["dr-grade"], "CR": ["chest-xray", "dr-grade@1"], "US": ["no-such-task"]},
    "ByBodyPart": {"SKIN": ["skin-lesion"]},
    "Default": [],
}

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"

# name: (fixture, modality, body part, dcmtk converter or None, transfer syntax, storescu
#        proposal, tasks the configuration gives it)
IMAGES = {
    "explicit_le": ("grey8_explicit_le.dcm", "OP", None, None, EXPLICIT_LE, "-xe", ["dr-grade"]),
    "jpeg_lossless": ("grey8_explicit_le.dcm", "OP", None, ["dcmcjpeg", "+e1"], JPEG_LOSSLESS_SV1, "-xs",
                      ["dr-grade"]),
    "jpeg_baseline": ("rgb8_rle.dcm", "CR", None, ["dcmcjpeg", "+eb"], JPEG_BASELINE, "-xy",
                      ["chest-xray", "dr-grade@1"]),
    "jpeg_ls": ("grey8_explicit_le.dcm", "XC", "SKIN", ["dcmcjpls", "+el"], JPEG_LS_LOSSLESS, "-xt",
                ["skin-lesion"]),
    "rle": ("rgb8_rle.dcm", "OP", "SKIN", ["dcmcrle"], RLE, "-xr", ["dr-grade", "skin-lesion"]),
}


# --- inputs -----------------------------------------------------------------------------


def make_source(out, fixture, modality, body_part=None, converter=None, study_uid=None,
                series_uid=None, drop_pixels=False):
    """A copy of a fixture with the test's patient and study, new series and instance UIDs
    (Orthanc keys instances by them), then converted by a dcmtk tool when given. Returns
    the path of the file to send."""
    ds = pydicom.dcmread(FIXTURES / "dicom" / fixture)
    if converter and "rle" in fixture:
        ds.decompress()  # the dcmtk encoders take uncompressed input
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_uid or ds.StudyInstanceUID
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if drop_pixels:
        del ds.PixelData
    plain = out / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(plain, enforce_file_format=True)
    if not converter:
        return plain
    converted = out / f"{ds.SOPInstanceUID}.{converter[0]}.dcm"
    done = subprocess.run([*converter, str(plain), str(converted)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return converted


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom")
    study = generate_uid()
    made = {}
    for name, (fixture, modality, body_part, converter, syntax, proposal, tasks) in IMAGES.items():
        path = make_source(out, fixture, modality, body_part, converter, study_uid=study)
        assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
        made[name] = (path, proposal, tasks)
    made["unconfigured"] = (make_source(out, "grey8_explicit_le.dcm", "MR", study_uid=study), "-xe", [])
    made["no_pixels"] = (make_source(out, "grey8_explicit_le.dcm", "OP", study_uid=study, drop_pixels=True),
                         "-xe", ["dr-grade"])
    made["unknown_task"] = (make_source(out, "grey8_explicit_le.dcm", "US", study_uid=study), "-xe",
                            ["no-such-task"])
    return made


# --- the processes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fptserve():
    d = Daemon()
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(timeout=30)


def stub_dir(stubs):
    """The folder the stubs fixture generated the fptserve package into."""
    return str(Path(stubs[0].__file__).resolve().parents[2])


class Orthanc:
    """A real Orthanc on loopback with the gateway plugin, its storage in a temp folder."""

    def __init__(self, workdir, gateway_config, stubs):
        assert Path(ORTHANC).exists(), "Orthanc is missing: run tools/system-deps.sh"
        assert PYTHON_PLUGIN.exists(), "orthanc-python is missing: run tools/system-deps.sh"
        self.http_port, self.dicom_port = free_port(), free_port()
        # grpcio and protobuf from this virtual environment (the same CPython minor version
        # as Orthanc's embedded interpreter), the stubs from the fixture.
        site = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
        gateway = {"PythonPath": [stub_dir(stubs), *site], **gateway_config}
        config = {
            "Name": "fptserve-test",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpThreadsCount": 8,
            "SaveJobs": False,
            "StableAge": 1,
            "Plugins": [str(PYTHON_PLUGIN)],
            "PythonScript": str(PLUGIN),
            "PythonVerbose": False,
            "UserMetadata": {"FptserveSR": 4500},
            "Fptserve": gateway,
        }
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"
        self.log_path.write_text("")
        self._launch()

    def _launch(self):
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.log_file = open(self.log_path, "a")
        self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], cwd=self.workdir,
                                     stdout=self.log_file, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def restart(self, kill=False, **gateway_changes):
        """Stopped as a service manager does (SIGTERM; SIGKILL with `kill`, a crash) and
        started again on the same database, as after an upgrade or a reboot; its exit code."""
        if kill:
            self.proc.kill()
            self.proc.wait(timeout=30)
        code = self.stop()
        self.config["Fptserve"].update(gateway_changes)
        self._launch()
        return code

    def _wait_ready(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "Orthanc exited:\n" + self.log()
            try:
                self.get("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        else:
            raise AssertionError("Orthanc did not start:\n" + self.log())
        try:
            self.status()
        except urllib.error.HTTPError as error:
            # e.g. grpcio from a virtual environment of another Python version than the
            # libpython3.X Orthanc's plugin embeds: the log says so
            raise AssertionError(f"the gateway plugin is not running ({error}):\n" + self.log())

    def url(self, uri):
        return f"http://127.0.0.1:{self.http_port}{uri}"

    def get(self, uri):
        with urllib.request.urlopen(self.url(uri), timeout=30) as reply:
            return reply.read()

    def get_json(self, uri):
        return json.loads(self.get(uri))

    def post_json(self, uri, body):
        request = urllib.request.Request(self.url(uri), data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def status(self):
        return self.get_json("/fptserve/status")

    def metadata(self, instance_id, name):
        try:
            return self.get(f"/instances/{instance_id}/metadata/{name}").decode()
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def store(self, path, proposal):
        """Sends one file with storescu; returns its Orthanc instance id."""
        sent = subprocess.run(["storescu", "-aet", "FPTTEST", "-aec", "ORTHANC", "-to", "30", proposal,
                               "127.0.0.1", str(self.dicom_port), str(path)],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0 and "E:" not in sent.stderr, sent.stderr
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        return self.lookup(uid)

    def lookup(self, sop_instance_uid):
        request = urllib.request.Request(self.url("/tools/lookup"), data=sop_instance_uid.encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=30) as reply:
            found = [r["ID"] for r in json.loads(reply.read()) if r["Type"] == "Instance"]
        assert len(found) == 1, f"{sop_instance_uid} not stored in Orthanc"
        return found[0]

    def reports(self):
        """Orthanc ids of the SR instances stored."""
        return self.post_json("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}})

    def wait_state(self, instance_ids, state, timeout=30):
        """Waits until every instance is in `state`; returns the status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if all(status["instances"].get(i, {}).get("state") == state for i in instance_ids):
                return status
            assert time.monotonic() < deadline, f"not all {state}: {status}\n{self.log()}"
            time.sleep(0.1)

    def wait_settled(self, instance_ids, timeout=60):
        """Waits until the gateway has finished with every instance; returns its status."""
        final = {"done", "failed", "skipped"}
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            states = {i: status["instances"].get(i, {}).get("state") for i in instance_ids}
            if all(s in final for s in states.values()) and status["queued"] == 0:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway did not finish: {states}\n{self.log()}")
            time.sleep(0.2)

    def log(self):
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        """SIGTERM, as a service manager stops it; its exit code, or None when it had to be
        killed (the plugin held up the shutdown)."""
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self.log_file.closed:
            self.log_file.close()
        return code


@pytest.fixture
def start_orthanc(tmp_path, stubs):
    started = []

    def start(gateway_config, name="orthanc"):
        workdir = tmp_path / name
        workdir.mkdir()
        orthanc = Orthanc(workdir, gateway_config, stubs)
        started.append(orthanc)
        return orthanc

    yield start
    for orthanc in started:
        orthanc.stop()


# --- checking a report ------------------------------------------------------------------


def concept(item):
    return item.ConceptNameCodeSequence[0].CodeMeaning


def code(item):
    name = item.ConceptNameCodeSequence[0]
    return name.CodeValue, name.CodingSchemeDesignator


def read_strictly(data):
    """pydicom, raising on any value that breaks its VR's rules."""
    old = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        for element in ds.iterall():
            element.value  # noqa: B018 (decodes and validates every value)
        return ds
    finally:
        pydicom.config.settings.reading_validation_mode = old


def check_report(sr, source, reply, tasks):
    """The SR is a Comprehensive SR of `source` in its study that says what `reply` (a
    direct Classify call on the same file) said."""
    assert sr.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert sr.SOPClassUID == COMPREHENSIVE_SR == sr.file_meta.MediaStorageSOPClassUID
    assert sr.Modality == "SR" and sr.Manufacturer == "fptserve"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    for keyword in PATIENT:
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID != source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == source.StudyInstanceUID
    series = evidence[0].ReferencedSeriesSequence
    assert len(series) == 1 and series[0].SeriesInstanceUID == source.SeriesInstanceUID
    referenced = series[0].ReferencedSOPSequence
    assert len(referenced) == 1
    assert referenced[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert referenced[0].ReferencedSOPClassUID == source.SOPClassUID

    assert sr.ValueType == "CONTAINER" and concept(sr) == "Imaging Measurement Report"
    assert code(sr) == ("126000", "DCM")
    groups = sr.ContentSequence
    assert len(groups) == len(tasks) == len(reply.results)
    for group, result, task in zip(groups, reply.results, tasks):
        assert (group.RelationshipType, group.ValueType, concept(group)) == \
            ("CONTAINS", "CONTAINER", "Measurement Group")
        assert code(group) == ("125007", "DCM")
        items = {concept(i): i for i in group.ContentSequence if i.ValueType != "NUM"}
        assert {name: (i.RelationshipType, i.ValueType, code(i)) for name, i in items.items()} == {
            "Algorithm Name": ("CONTAINS", "TEXT", ("111001", "DCM")),
            "Algorithm Version": ("CONTAINS", "TEXT", ("111003", "DCM")),
            "Finding": ("CONTAINS", "CODE", ("121071", "DCM")),
            "Source of Measurement": ("CONTAINS", "IMAGE", ("121112", "DCM")),
        }
        assert items["Algorithm Name"].TextValue == result.task == task.split("@")[0]
        assert items["Algorithm Version"].TextValue == result.adapter_version
        finding = items["Finding"].ConceptCodeSequence[0]
        assert finding.CodeMeaning == result.label
        assert finding.CodingSchemeDesignator == "99FPTSERVE"
        assert finding.CodeValue == str([s.name for s in result.scores].index(result.label))
        image = items["Source of Measurement"].ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        numbers = [i for i in group.ContentSequence if i.ValueType == "NUM"]
        assert [concept(n) for n in numbers] == [s.name for s in result.scores]
        for index, (number, score) in enumerate(zip(numbers, result.scores)):
            assert code(number) == (str(index), "99FPTSERVE")
            value = number.MeasuredValueSequence[0]
            assert abs(value.FloatingPointValue - score.probability) <= 1e-6
            assert abs(float(value.NumericValue) - score.probability) <= 1e-6
            units = value.MeasurementUnitsCodeSequence[0]
            assert (units.CodeValue, units.CodingSchemeDesignator, units.CodeMeaning) == \
                ("1", "UCUM", "no units")


def dsrdump(data, tmp_path):
    path = tmp_path / f"sr-{time.monotonic_ns()}.dcm"
    path.write_bytes(data)
    dumped = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0 and dumped.stderr.strip() == "", \
        f"dsrdump rc={dumped.returncode}\n{dumped.stderr}"
    assert "Comprehensive SR Document" in dumped.stdout
    return dumped.stdout


# --- the loop ---------------------------------------------------------------------------


def gateway_config(target, **extra):
    # SkipModalities empty: the reports are kept from the loop by the plugin's own SR guard
    return {"Target": target, "Trigger": "instance", "Tasks": TASKS, "BackoffSeconds": 0.2,
            "MaxBackoffSeconds": 1.0, "TimeoutSeconds": 30, "Workers": 2, "SkipModalities": [],
            "PollSeconds": 0.2, "BacklogLogSeconds": 1.0, **extra}


def test_each_image_sent_gets_one_report_with_the_numbers_of_a_direct_call(
        fptserve, stubs, sources, start_orthanc, tmp_path):
    orthanc = start_orthanc(gateway_config(fptserve.addr))
    ids = {name: orthanc.store(path, proposal) for name, (path, proposal, _) in sources.items()}
    status = orthanc.wait_settled(ids.values())

    # every syntax arrived as sent (storescu proposed it, Orthanc kept it)
    for name in IMAGES:
        assert orthanc.metadata(ids[name], "TransferSyntax") == IMAGES[name][4], name

    states = {name: status["instances"][ids[name]] for name in ids}
    for name in IMAGES:
        assert states[name]["state"] == "done", (name, states[name], orthanc.log())
        assert states[name]["attempts"] == 1 and states[name]["tasks"] == sources[name][2]
    assert states["unconfigured"] == {"state": "skipped", "reason": "no tasks configured"}
    # refused by fptserve: given up after one call, the outcome recorded, an error logged
    for name, code in [("no_pixels", "INVALID_ARGUMENT"), ("unknown_task", "NOT_FOUND")]:
        assert states[name]["state"] == "failed" and states[name]["permanent"] is True, states[name]
        assert states[name]["code"] == code and states[name]["attempts"] == 1, states[name]
        assert orthanc.metadata(ids[name], "FptserveSR") == f"error:{code}"
        assert f"instance {ids[name]}: giving up, {code}" in orthanc.log()
        assert f"orthanc-{ids[name]}" in fptserve.log()

    # exactly one report per classified image, none for the others, and no report of a report
    one_report_each(orthanc, fptserve, stubs, {name: sources[name] for name in IMAGES}, ids, tmp_path)

    # sending an image again stores nothing new, so nothing is classified again
    orthanc.store(*sources["explicit_le"][:2])
    time.sleep(1.0)
    assert len(orthanc.reports()) == len(IMAGES)

    # no patient attribute in any log line, Orthanc's or fptserve's
    for log in (orthanc.log(), fptserve.log()):
        for value in PHI:
            assert value not in log


def one_report_each(orthanc, fptserve, stubs, sent, ids, tmp_path):
    """Every image of `sent` (name: (path, proposal, tasks)) has exactly one report, recorded
    on it, in its study, saying what a direct Classify of the same file says; Orthanc holds
    no other report, and the gateway classified none of the reports."""
    pb, pb_grpc = stubs
    time.sleep(1.0)  # let the gateway see the reports it stored
    reports = orthanc.reports()
    assert len(reports) == len(sent), (reports, orthanc.log())
    deadline = time.monotonic() + 30
    while (status := orthanc.status())["backlog"]["pending"]:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    for report_id in reports:
        # seen by the gateway (a report stored before a crash may lie behind the saved position)
        assert status["instances"].get(report_id, {"state": "skipped", "reason": "modality"}) == \
            {"state": "skipped", "reason": "modality"}
    by_source = {}
    for report_id in reports:
        data = orthanc.get(f"/instances/{report_id}/file")
        sr = read_strictly(data)
        source_uid = sr.CurrentRequestedProcedureEvidenceSequence[0] \
            .ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        by_source.setdefault(source_uid, []).append((report_id, sr, data))

    with grpc.insecure_channel(fptserve.addr) as channel:
        client = pb_grpc.ClassifierStub(channel)
        for name, (path, _, tasks) in sent.items():
            source = pydicom.dcmread(path, stop_before_pixels=True)
            found = by_source.pop(source.SOPInstanceUID, [])
            assert len(found) == 1, f"{name}: {len(found)} reports"
            report_id, sr, data = found[0]
            assert orthanc.metadata(ids[name], "FptserveSR") == report_id
            # Orthanc filed it under the source's study
            report_study = orthanc.get_json(f"/instances/{report_id}/study")
            source_study = orthanc.get_json(f"/instances/{ids[name]}/study")
            assert report_study["ID"] == source_study["ID"]
            reply = client.Classify(pb.ClassifyRequest(dicom=path.read_bytes(), tasks=tasks))
            check_report(sr, source, reply, tasks)
            dsrdump(data, tmp_path)
    assert not by_source, f"reports for unknown sources: {list(by_source)}"
    return reports


def test_series_trigger_classifies_each_instance_of_a_stable_series_once(
        fptserve, stubs, start_orthanc, tmp_path):
    # every modality has a task here, SR included if the plugin's SR guard let it through
    orthanc = start_orthanc(gateway_config(fptserve.addr, Trigger="series",
                                           Tasks={**TASKS, "Default": ["dr-grade"]}))
    series = generate_uid()
    first = [make_source(tmp_path, "grey8_explicit_le.dcm", "OP", series_uid=series) for _ in range(2)]
    ids = [orthanc.store(path, "-xe") for path in first]
    status = orthanc.wait_settled(ids, timeout=30)  # StableAge is 1 s
    assert [status["instances"][i]["state"] for i in ids] == ["done", "done"], status
    # a late instance makes the series stable again: only the new one is classified
    late = orthanc.store(make_source(tmp_path, "grey8_explicit_le.dcm", "OP", series_uid=series), "-xe")

    def settled_again(status):
        states = [status["instances"].get(i, {}) for i in ids]
        return status["instances"].get(late, {}).get("state") == "done" and \
            all(s.get("reason") == "already classified" for s in states)

    deadline = time.monotonic() + 30
    while not settled_again(status := orthanc.status()):
        assert time.monotonic() < deadline, (status, orthanc.log())
        time.sleep(0.2)
    for i in ids:
        assert status["instances"][i]["state"] == "skipped", status["instances"][i]
    time.sleep(2.5)  # the reports' own series become stable too: they are not classified
    reports = orthanc.reports()
    assert len(reports) == 3
    status = orthanc.status()
    assert all(status["instances"].get(r, {}).get("state") in (None, "skipped") for r in reports), status
    assert status["counters"] == {"classified": 3}, status
    assert sorted(orthanc.metadata(i, "FptserveSR") for i in [*ids, late]) == sorted(reports)


# --- nothing lost, nothing doubled ------------------------------------------------------

DURABLE = ("explicit_le", "rle")  # two images, three tasks between them


def wait_retrying(orthanc, ids):
    """Both images retrying against a fptserve that is down, visible as backlog, logged
    without patient data, and nothing recorded on them."""
    status = orthanc.wait_state(ids, "retrying")
    backlog = status["backlog"]
    assert backlog["pending"] == len(ids) and backlog["retrying"] == len(ids), backlog
    assert backlog["oldest_pending_age_s"] >= 0 and backlog["failed"] == {}, backlog
    for i in ids:
        assert status["instances"][i]["code"] == "UNAVAILABLE"
        assert orthanc.metadata(i, "FptserveSR") is None
    deadline = time.monotonic() + 10
    while f"fptserve gateway: backlog: {len(ids)} pending" not in orthanc.log():
        assert time.monotonic() < deadline, orthanc.log()
        time.sleep(0.2)
    assert orthanc.reports() == []
    return status


def test_images_sent_while_fptserve_is_down_each_get_one_report_when_it_returns(
        stubs, sources, start_orthanc, tmp_path):
    listen = f"127.0.0.1:{free_port()}"  # nothing listens there yet
    orthanc = start_orthanc(gateway_config(listen))
    ids = {name: orthanc.store(*sources[name][:2]) for name in DURABLE}
    wait_retrying(orthanc, list(ids.values()))
    time.sleep(2)  # retried for a while, far past the old fixed retry limit
    daemon = Daemon(grpc_listen=listen)
    try:
        status = orthanc.wait_settled(ids.values())
        assert all(status["instances"][i]["state"] == "done" for i in ids.values()), status
        reports = one_report_each(orthanc, daemon, stubs, {n: sources[n] for n in DURABLE}, ids, tmp_path)
        assert orthanc.status()["backlog"]["pending"] == 0

        # A crash between storing a report and recording it on the image (then the position
        # in the change log not saved either): the work is fed again, made again with the
        # same request id, and Orthanc keeps the one report it has.
        lost = ids["rle"]
        request = urllib.request.Request(orthanc.url(f"/instances/{lost}/metadata/FptserveSR"), method="DELETE")
        urllib.request.urlopen(request, timeout=30).close()
        orthanc.restart(CursorProperty=5474, ClassifyExisting=True)  # a position never saved: from change 0
        status = orthanc.wait_settled(ids.values())
        assert status["instances"][lost]["state"] == "done", status["instances"][lost]
        assert status["instances"][lost]["sr_status"] == "AlreadyStored"
        assert status["instances"][ids["explicit_le"]]["reason"] == "already classified"
        assert status["counters"].get("already_stored") == 1 and "classified" not in status["counters"]
        assert orthanc.metadata(lost, "FptserveSR") in reports
        assert sorted(orthanc.reports()) == sorted(reports)
    finally:
        daemon.proc.kill()
        daemon.proc.wait(timeout=30)
    for value in PHI:
        assert value not in orthanc.log()


def test_an_orthanc_restart_while_fptserve_is_down_loses_nothing(stubs, sources, start_orthanc, tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    orthanc = start_orthanc(gateway_config(listen))
    ids = {name: orthanc.store(*sources[name][:2]) for name in DURABLE}
    wait_retrying(orthanc, list(ids.values()))
    # an upgrade or a reboot: the in-memory queue is gone; the plugin lets Orthanc stop cleanly
    assert orthanc.restart() == 0, orthanc.log()
    assert "resuming after change" in orthanc.log()
    wait_retrying(orthanc, list(ids.values()))
    daemon = Daemon(grpc_listen=listen)
    try:
        status = orthanc.wait_settled(ids.values())
        assert all(status["instances"][i]["state"] == "done" for i in ids.values()), status
        one_report_each(orthanc, daemon, stubs, {n: sources[n] for n in DURABLE}, ids, tmp_path)
    finally:
        daemon.proc.kill()
        daemon.proc.wait(timeout=30)


def test_orthanc_killed_during_calls_and_restarted_gives_every_image_one_report(stubs, start_orthanc, tmp_path):
    # calls wait up to 0.4 s for their batch: Orthanc dies with calls in flight
    daemon = Daemon("--max-batch-size", "8", "--max-batch-delay-ms", "400")
    try:
        orthanc = start_orthanc(gateway_config(daemon.addr, Workers=4))
        sent = {f"image{n}": (make_source(tmp_path, "grey8_explicit_le.dcm", "OP"), "-xe", ["dr-grade"])
                for n in range(5)}

        def running(ids, seconds):
            deadline = time.monotonic() + seconds
            while not any(orthanc.status()["instances"].get(i, {}).get("state") == "running" for i in ids.values()):
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            return True

        # kill as soon as a call is in flight (on a slow machine, storing all five first can
        # outlast every call); what was not stored yet is stored after the restart
        ids = {}
        for name, (path, proposal, _) in sent.items():
            ids[name] = orthanc.store(path, proposal)
            if running(ids, 2):
                break
        assert running(ids, 10), orthanc.status()
        assert orthanc.restart(kill=True) == -signal.SIGKILL
        for name, (path, proposal, _) in sent.items():
            if name not in ids:
                ids[name] = orthanc.store(path, proposal)
        # what finished before the crash is behind the saved position and not seen again;
        # the rest is read again from the change log
        deadline = time.monotonic() + 60
        while not (all(orthanc.metadata(i, "FptserveSR") for i in ids.values())
                   and orthanc.status()["backlog"]["pending"] == 0):
            assert time.monotonic() < deadline, (orthanc.status(), orthanc.log())
            time.sleep(0.2)
        one_report_each(orthanc, daemon, stubs, sent, ids, tmp_path)
    finally:
        daemon.proc.kill()
        daemon.proc.wait(timeout=30)


def test_fptserve_killed_during_calls_and_restarted_gives_every_image_one_report(
        stubs, start_orthanc, tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    # calls wait up to 0.4 s for their batch to fill, so some are in flight when the kill lands
    slow = ("--max-batch-size", "8", "--max-batch-delay-ms", "400")
    daemon = Daemon(*slow, grpc_listen=listen)
    orthanc = start_orthanc(gateway_config(listen, Workers=4))
    sent = {f"image{n}": (make_source(tmp_path, "grey8_explicit_le.dcm", "OP"), "-xe", ["dr-grade"])
            for n in range(6)}
    ids = {}
    try:
        for name, (path, proposal, _) in sent.items():
            ids[name] = orthanc.store(path, proposal)
            if len(ids) == 3:
                deadline = time.monotonic() + 10
                while not any(orthanc.status()["instances"].get(i, {}).get("state") == "running"
                              for i in ids.values()):
                    assert time.monotonic() < deadline, orthanc.status()
                    time.sleep(0.05)
                daemon.proc.kill()  # SIGKILL: calls in flight are cut
                daemon.proc.wait(timeout=30)
        status = orthanc.status()
        assert any(status["instances"].get(i, {}).get("state") == "retrying" for i in ids.values()), status
        daemon = Daemon(*slow, grpc_listen=listen)
        status = orthanc.wait_settled(ids.values())
        assert all(status["instances"][i]["state"] == "done" for i in ids.values()), status
        assert status["counters"]["retries"] >= 1
        one_report_each(orthanc, daemon, stubs, sent, ids, tmp_path)
    finally:
        daemon.proc.kill()
        daemon.proc.wait(timeout=30)


def make_certificates(out):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with openssl."""
    def run(*args):
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60, cwd=out)
        assert done.returncode == 0, done.stderr

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA")
    for name, extensions in [("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                             ("client", "extendedKeyUsage=clientAuth")]:
        (out / f"{name}.ext").write_text(extensions + "\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=fptserve {name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: str(out / name) for name in
            ["ca.pem", "server.pem", "server.key", "client.pem", "client.key"]}


def test_the_gateway_reaches_fptserve_over_mutual_tls(stubs, sources, start_orthanc, tmp_path):
    certs = make_certificates(tmp_path)
    secured = Daemon("--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"],
                     "--tls-client-ca", certs["ca.pem"])
    try:
        tls = {"RootCertificates": certs["ca.pem"], "ClientCertificate": certs["client.pem"],
               "ClientKey": certs["client.key"]}
        orthanc = start_orthanc(gateway_config(secured.addr, Tls=tls))
        assert orthanc.status()["tls"] is True
        instance = orthanc.store(*sources["explicit_le"][:2])
        state = orthanc.wait_settled([instance])["instances"][instance]
        assert state["state"] == "done" and state["attempts"] == 1, (state, orthanc.log())
        assert orthanc.reports() == [state["sr"]]
    finally:
        secured.proc.kill()
        secured.proc.wait(timeout=30)


# --- the plugin's retry policy, without Orthanc -----------------------------------------


def load_plugin():
    spec = importlib.util.spec_from_file_location("fptserve_gateway_under_test", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeOrthanc:
    """Orthanc's plugin API as the gateway uses it: instances with `tags`, a change log of
    NewInstance changes for `changes` instance ids (Seq 1, 2, ...), metadata and global
    properties kept in dicts (pass `properties` to start again on the same "database")."""

    class OrthancException(Exception):
        pass

    def __init__(self, tags, changes=(), properties=None, metadata=None):
        self.tags = tags
        self.changes = [{"Seq": n + 1, "ChangeType": "NewInstance", "ID": i} for n, i in enumerate(changes)]
        self.properties = {} if properties is None else properties
        self.posted, self.logs = [], []
        self.metadata = {} if metadata is None else metadata

    def GetGlobalProperty(self, key, default):
        return self.properties.get(key, default)

    def SetGlobalProperty(self, key, value):
        self.properties[key] = value

    def RestApiGet(self, uri):
        if uri == "/changes?last":
            return json.dumps({"Last": len(self.changes)}).encode()
        if uri.startswith("/changes?since="):
            since, limit = (int(v.split("=")[1]) for v in uri.split("?")[1].split("&"))
            page = [c for c in self.changes if c["Seq"] > since][:limit]
            done = not page or page[-1]["Seq"] == len(self.changes)
            return json.dumps({"Changes": page, "Done": done, "Last": page[-1]["Seq"] if page else since}).encode()
        if uri.endswith("/tags?short"):
            return json.dumps(self.tags).encode()
        if uri.endswith("/file"):
            return b"DICM-bytes"
        if "/metadata/" in uri:
            if uri in self.metadata:
                return self.metadata[uri]
            raise self.OrthancException("Unknown resource")
        raise AssertionError(uri)

    def RestApiPost(self, uri, body):
        assert uri == "/instances"
        self.posted.append(body)
        return json.dumps({"ID": f"sr-{len(self.posted)}", "Status": "Success"}).encode()

    def RestApiPut(self, uri, body):
        self.metadata[uri] = body

    def LogInfo(self, message):
        self.logs.append(("I", message))

    def LogWarning(self, message):
        self.logs.append(("W", message))

    def LogError(self, message):
        self.logs.append(("E", message))


class FakeRpcError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"fake {self._code.name}"


class FakeReply:
    structured_report = b"SR-bytes"


OP_TAGS = {"0008,0060": "OP", "0008,0016": "1.2.840.10008.5.1.4.1.1.7",
           "0010,0010": PATIENT["PatientName"], "0010,0020": PATIENT["PatientID"]}


def run_gateway(failures):
    """One instance through a Gateway whose Classify fails with `failures` first."""
    plugin = load_plugin()
    api = FakeOrthanc(OP_TAGS)
    config = plugin.load_config({"Fptserve": {"Tasks": TASKS, "BackoffSeconds": 0.001, "MaxBackoffSeconds": 0.002}})
    calls = []

    def classify(dicom, tasks, request_id):
        calls.append((dicom, tasks, request_id))
        if len(calls) <= len(failures):
            raise FakeRpcError(failures[len(calls) - 1])
        return FakeReply()

    gateway = plugin.Gateway(api, config, classify)
    gateway.process_instance("inst-1")
    for _, message in api.logs:
        for value in PHI:
            assert value not in message
    return gateway.status["inst-1"], api, calls


@pytest.mark.parametrize("code", ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED"])
def test_plugin_retries_transient_codes_without_limit(code):
    state, api, calls = run_gateway([grpc.StatusCode[code]] * 2)
    assert state["state"] == "done" and state["attempts"] == 3 and state["sr"] == "sr-1"
    # one request id for every attempt: it names the report (a retry makes the same one)
    assert [c[2] for c in calls] == ["orthanc-inst-1"] * 3
    assert all(c[:2] == (b"DICM-bytes", ["dr-grade"]) for c in calls)
    assert api.posted == [b"SR-bytes"]
    assert api.metadata == {"/instances/inst-1/metadata/FptserveSR": b"sr-1"}
    assert [level for level, _ in api.logs] == ["W", "W", "I"]

    # 40 failures: still retried, logged at attempts 1, 2, 4, 8, 16 and 32 only
    state, api, calls = run_gateway([grpc.StatusCode[code]] * 40)
    assert state["state"] == "done" and state["attempts"] == 41 and len(calls) == 41
    assert api.posted == [b"SR-bytes"]
    assert [level for level, _ in api.logs] == ["W"] * 6 + ["I"]


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "NOT_FOUND", "UNIMPLEMENTED", "FAILED_PRECONDITION",
                                  "PERMISSION_DENIED", "UNAUTHENTICATED", "INTERNAL"])
def test_plugin_stops_at_once_on_permanent_codes(code):
    state, api, calls = run_gateway([grpc.StatusCode[code]])
    assert state["state"] == "failed" and state["code"] == code and state["permanent"] is True
    assert len(calls) == 1 and api.posted == []
    assert api.metadata == {"/instances/inst-1/metadata/FptserveSR": f"error:{code}".encode()}
    assert [level for level, _ in api.logs] == ["E"]


def test_the_example_configuration_is_valid_for_the_plugin():
    plugin = load_plugin()
    example = json.loads((PLUGIN.parent / "orthanc.json").read_text())
    config = plugin.load_config(example)
    assert example["UserMetadata"][config["MetadataName"]] >= 1024
    assert (ROOT / example["PythonScript"]).resolve() == PLUGIN  # Orthanc started in the repository root
    demo = {p.name for p in (ROOT / "models" / "demo" / "tasks").iterdir()}
    rules = config["Tasks"]
    named = [*rules["Default"], *(t for ts in rules["ByModality"].values() for t in ts),
             *(t for ts in rules["ByBodyPart"].values() for t in ts)]
    assert named and {t.split("@")[0] for t in named} <= demo


def test_plugin_backoff_is_exponential_and_capped():
    plugin = load_plugin()
    config = plugin.load_config({"Fptserve": {"BackoffSeconds": 0.5, "MaxBackoffSeconds": 3}})
    assert [plugin.backoff_seconds(config, n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3, 3]
    assert plugin.tasks_for(plugin.load_config({"Fptserve": {"Tasks": TASKS}}), "op", "skin") == \
        ["dr-grade", "skin-lesion"]
    with pytest.raises(ValueError):
        plugin.load_config({"Fptserve": {"Trigger": "study"}})


def test_plugin_records_nothing_for_a_call_cut_by_orthanc_stopping():
    plugin = load_plugin()
    api = FakeOrthanc({"0008,0060": "OP"})
    config = plugin.load_config({"Fptserve": {"Tasks": TASKS}})

    def classify(dicom, tasks, request_id):
        gateway.stopping.set()  # as Orthanc's ORTHANC_STOPPED does; the channel then closes
        raise FakeRpcError(grpc.StatusCode.CANCELLED)

    gateway = plugin.Gateway(api, config, classify)
    assert gateway.process_instance("inst-1") is False  # unfinished: fed again at the next start
    assert gateway.status["inst-1"]["state"] == "interrupted"
    assert gateway.status["inst-1"]["permanent"] is False
    assert api.metadata == {} and api.posted == []


def test_the_change_log_position_moves_only_past_finished_work():
    """inst-3 cannot be classified (fptserve down for it) while the others can: the saved
    position stops before it; a gateway started again on the same database feeds inst-3 to
    inst-5 again, classifies inst-3 and skips the others by their recorded outcome: one
    report each, and the position reaches the end."""
    plugin = load_plugin()
    ids = [f"inst-{n}" for n in range(1, 6)]
    config = plugin.load_config({"Fptserve": {"Tasks": TASKS, "BackoffSeconds": 0.001, "MaxBackoffSeconds": 0.01,
                                              "Workers": 2, "ClassifyExisting": True, "PollSeconds": 0.01}})
    prop = config["CursorProperty"]
    api = FakeOrthanc(OP_TAGS, changes=ids)

    def down_for_inst_3(dicom, tasks, request_id):
        if request_id == "orthanc-inst-3":
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
        return FakeReply()

    gateway = plugin.Gateway(api, config, down_for_inst_3)
    gateway.start()
    deadline = time.monotonic() + 10
    while not (gateway.backlog()["pending"] == 1 and gateway.backlog()["last_change_read"] == 5
               and len(api.posted) == 4):
        assert time.monotonic() < deadline, (gateway.backlog(), api.posted)
        time.sleep(0.01)
    backlog = gateway.backlog()
    assert backlog["cursor"] == 2 and api.properties[prop] == "2", backlog
    assert backlog["retrying"] == 1 and backlog["oldest_pending_age_s"] >= 0
    gateway.stop()
    assert api.properties[prop] == "2"

    again = FakeOrthanc(OP_TAGS, changes=ids, properties=api.properties, metadata=api.metadata)
    gateway = plugin.Gateway(again, config, lambda dicom, tasks, request_id: FakeReply())
    gateway.start()
    deadline = time.monotonic() + 10
    while again.properties[prop] != "5":
        assert time.monotonic() < deadline, (gateway.backlog(), gateway.status)
        time.sleep(0.01)
    gateway.stop()
    assert len(again.posted) == 1 and gateway.status["inst-3"]["state"] == "done"
    assert [gateway.status[i]["reason"] for i in ("inst-4", "inst-5")] == ["already classified"] * 2
    assert "inst-1" not in gateway.status  # before the saved position: never fed again
    assert sorted(again.metadata) == [f"/instances/{i}/metadata/FptserveSR" for i in ids]


def test_a_first_start_classifies_only_what_arrives_unless_asked_for_the_archive():
    plugin = load_plugin()
    for existing, expected in [(False, "3"), (True, "0")]:
        config = plugin.load_config({"Fptserve": {"Tasks": TASKS, "ClassifyExisting": existing}})
        api = FakeOrthanc(OP_TAGS, changes=["a", "b", "c"])
        gateway = plugin.Gateway(api, config, lambda *a: FakeReply())
        assert gateway._load_cursor() == int(expected)
        assert api.properties[config["CursorProperty"]] == expected
    with pytest.raises(ValueError, match="Retries is gone"):
        plugin.load_config({"Fptserve": {"Retries": 4}})
    with pytest.raises(ValueError, match="CursorProperty"):
        plugin.load_config({"Fptserve": {"CursorProperty": 12}})


def test_saliency_maps_are_stored_with_the_report_and_never_classified(
        fptserve, stubs, sources, start_orthanc, tmp_path):
    """SaliencyMaps: each task's saliency Secondary Capture is stored in the source's study
    before the report, which references it; the gateway sees the captures arrive and leaves
    them alone (fptserve's own output), so Orthanc holds one report and no report of a map."""
    orthanc = start_orthanc(gateway_config(fptserve.addr, SaliencyMaps=True))
    path, proposal, tasks = sources["explicit_le"]
    source_id = orthanc.store(path, proposal)
    status = orthanc.wait_settled([source_id])
    entry = status["instances"][source_id]
    assert entry["state"] == "done", (entry, orthanc.log())
    captures = entry["saliency_maps"]
    assert len(captures) == len(tasks) >= 1
    time.sleep(1.0)  # let the gateway see what it stored
    deadline = time.monotonic() + 30
    while (status := orthanc.status())["backlog"]["pending"]:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert len(orthanc.reports()) == 1
    sr = read_strictly(orthanc.get(f"/instances/{entry['sr']}/file"))
    source = pydicom.dcmread(path, stop_before_pixels=True)
    source_study = orthanc.get_json(f"/instances/{source_id}/study")["ID"]
    for capture_id, group, task in zip(captures, sr.ContentSequence, tasks):
        sc = read_strictly(orthanc.get(f"/instances/{capture_id}/file"))
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.Manufacturer == "fptserve"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert task.split("@")[0] in sc.SeriesDescription
        assert orthanc.get_json(f"/instances/{capture_id}/study")["ID"] == source_study
        saliency = [i for i in group.ContentSequence if concept(i) == "Saliency map"]
        assert saliency[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID
        assert status["instances"][capture_id] == {"state": "skipped", "reason": "made by fptserve"}
    for value in PHI:
        assert value not in orthanc.log() and value not in fptserve.log()
