"""fptserve gateway: an Orthanc Python plugin (orthanc-python) that classifies new images
with fptserve and stores the answer back into Orthanc as a DICOM Structured Report.

For each new instance (or each instance of a series once Orthanc sees it stable, see
"Trigger"), the plugin picks the tasks configured for its Modality / BodyPartExamined,
calls fptserve's Classify with structured_report=true and posts the returned Comprehensive
SR to Orthanc's /instances. The work runs on worker threads, never on Orthanc's callback
thread. Transient gRPC failures are retried with exponential backoff; permanent ones stop
at once. Logs name Orthanc instance ids only, never a patient attribute.

Configuration: the "Fptserve" section of Orthanc's configuration (see orthanc.json and
README.md beside this file). The fptserve stubs (generated from proto/ with
grpc_tools.protoc) and grpcio must be importable; "PythonPath" adds folders to sys.path
first, e.g. a virtual environment's site-packages built for the same Python version as
Orthanc's embedded interpreter.

REST API added to Orthanc:
  GET  /fptserve/status                  the gateway's configuration, queue and the state
                                         of the instances it has seen (most recent 10000)
  POST /fptserve/instances/{id}/classify classify that instance again (ignores the
                                         metadata that records a previous outcome)
"""

import collections
import json
import os
import queue
import sys
import threading
import time

try:
    import orthanc  # present only inside Orthanc
except ImportError:  # imported by tests without Orthanc
    orthanc = None

# gRPC status codes worth another try (the server was busy, restarting or slow).
TRANSIENT_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED")
# Any other code is permanent: the same request would fail the same way (INVALID_ARGUMENT,
# NOT_FOUND, UNIMPLEMENTED, FAILED_PRECONDITION, PERMISSION_DENIED, UNAUTHENTICATED, ...).

# Structured Report storage SOP classes (Basic/Enhanced/Comprehensive/3D SR, Key Object
# Selection, CAD SRs, ...): 1.2.840.10008.5.1.4.1.1.88.x. Never classified, whatever the
# configuration says, so that the gateway cannot feed on its own output.
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

DEFAULTS = {
    "Enabled": True,
    "Target": "127.0.0.1:50051",
    # "instance": on each new instance; "series": on each instance of a series when
    # Orthanc reports it stable (StableAge seconds without a new instance).
    "Trigger": "instance",
    # Tasks per Modality (0008,0060) and per BodyPartExamined (0018,0015); an instance
    # gets both lists (duplicates removed, in order); "Default" when neither matches.
    # Entries are task names or "name@version".
    "Tasks": {"ByModality": {}, "ByBodyPart": {}, "Default": []},
    # Modalities never classified (SR SOP classes never are, whatever this says).
    "SkipModalities": ["SR", "KO", "PR", "DOC"],
    # Attempts after the first one, for transient codes.
    "Retries": 4,
    # Backoff before retry n (1-based): min(MaxBackoffSeconds, BackoffSeconds * 2^(n-1)).
    "BackoffSeconds": 1.0,
    "MaxBackoffSeconds": 30.0,
    # gRPC deadline of one Classify call.
    "TimeoutSeconds": 60.0,
    "RetryCodes": list(TRANSIENT_CODES),
    # Worker threads (calls to fptserve in flight at once).
    "Workers": 2,
    # Folders put in front of sys.path before importing grpc and the fptserve stubs;
    # relative ones are taken from the folder of Orthanc's configuration file.
    "PythonPath": [],
    # User metadata (declared in Orthanc's "UserMetadata") recording, on the source
    # instance, the outcome: the SR's Orthanc id, or "error:CODE" after a permanent
    # failure. Instances that have it are not classified again (e.g. when their series
    # becomes stable again). Empty string: keep the outcome in memory only.
    "MetadataName": "FptserveSR",
    # Longest DICOM file sent / SR received, bytes.
    "MaxMessageBytes": 256 * 1024 * 1024,
    # null: plaintext. An object: TLS to fptserve, with "RootCertificates" (PEM CA file
    # that signs fptserve's certificate; absent: the system's roots), for mutual TLS
    # "ClientCertificate" and "ClientKey" (PEM), and optionally "ServerName" (the name
    # to check fptserve's certificate against, when it is not the Target's host). Paths
    # are read once, when Orthanc starts; relative ones are taken from the folder of
    # Orthanc's configuration file.
    "Tls": None,
}

TLS_KEYS = ("RootCertificates", "ClientCertificate", "ClientKey", "ServerName")

STATUS_KEEP = 10000


class PermanentError(Exception):
    """A failure that another attempt would not fix; code names it (a gRPC code or a
    gateway reason such as NO_STRUCTURED_REPORT)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def load_config(full_configuration):
    """The "Fptserve" section with defaults filled in."""
    section = dict(full_configuration.get("Fptserve", {}))
    config = json.loads(json.dumps(DEFAULTS))
    for key, value in section.items():
        if key not in DEFAULTS:
            raise ValueError(f"Fptserve: unknown configuration key {key!r}")
        config[key] = value
    tasks = {"ByModality": {}, "ByBodyPart": {}, "Default": []}
    for key, value in section.get("Tasks", {}).items():
        if key not in tasks:
            raise ValueError(f"Fptserve.Tasks: unknown key {key!r} (ByModality, ByBodyPart, Default)")
        tasks[key] = value
    tasks["ByModality"] = {k.upper(): list(v) for k, v in tasks["ByModality"].items()}
    tasks["ByBodyPart"] = {k.upper(): list(v) for k, v in tasks["ByBodyPart"].items()}
    tasks["Default"] = list(tasks["Default"])
    config["Tasks"] = tasks
    if config["Trigger"] not in ("instance", "series"):
        raise ValueError("Fptserve.Trigger must be \"instance\" or \"series\"")
    config["SkipModalities"] = [m.upper() for m in config["SkipModalities"]]
    config["RetryCodes"] = [c.upper() for c in config["RetryCodes"]]
    if int(config["Workers"]) < 1 or int(config["Retries"]) < 0:
        raise ValueError("Fptserve: Workers must be >= 1 and Retries >= 0")
    if config["Tls"] is not None:
        if not isinstance(config["Tls"], dict):
            raise ValueError("Fptserve.Tls must be null or an object")
        for key in config["Tls"]:
            if key not in TLS_KEYS:
                raise ValueError(f"Fptserve.Tls: unknown key {key!r} ({', '.join(TLS_KEYS)})")
        if ("ClientCertificate" in config["Tls"]) != ("ClientKey" in config["Tls"]):
            raise ValueError("Fptserve.Tls: ClientCertificate and ClientKey go together")
    return config


def tasks_for(config, modality, body_part):
    """The tasks configured for an instance (empty: none)."""
    rules = config["Tasks"]
    chosen = list(rules["ByModality"].get((modality or "").upper(), []))
    chosen += rules["ByBodyPart"].get((body_part or "").upper(), [])
    if not chosen:
        chosen = list(rules["Default"])
    seen = set()
    return [t for t in chosen if not (t in seen or seen.add(t))]


def backoff_seconds(config, retry):
    """Delay before retry number `retry` (1 = the first retry)."""
    return min(float(config["MaxBackoffSeconds"]), float(config["BackoffSeconds"]) * 2 ** (retry - 1))


def grpc_client(config):
    """A Classify function over one grpcio channel: (dicom, tasks, request_id) ->
    ClassifyResponse, raising grpc.RpcError."""
    import grpc
    from fptserve.v1 import classifier_pb2, classifier_pb2_grpc

    limit = int(config["MaxMessageBytes"])
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    tls = config["Tls"]
    if tls is None:
        channel = grpc.insecure_channel(config["Target"], options=options)
    else:
        def read(key):
            if key not in tls:
                return None
            with open(tls[key], "rb") as f:
                return f.read()

        credentials = grpc.ssl_channel_credentials(
            root_certificates=read("RootCertificates"), private_key=read("ClientKey"),
            certificate_chain=read("ClientCertificate"))
        if tls.get("ServerName"):
            options.append(("grpc.ssl_target_name_override", tls["ServerName"]))
        channel = grpc.secure_channel(config["Target"], credentials, options=options)
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    timeout = float(config["TimeoutSeconds"])

    def classify(dicom, tasks, request_id):
        return stub.Classify(classifier_pb2.ClassifyRequest(
            dicom=dicom, tasks=tasks, request_id=request_id, structured_report=True),
            timeout=timeout)

    classify.close = channel.close
    return classify


def rpc_code(error):
    """The gRPC status code name of an exception from a Classify call, or None when it is
    not a gRPC error."""
    code = getattr(error, "code", None)
    if not callable(code):
        return None
    try:
        value = code()
    except Exception:
        return None
    return getattr(value, "name", None)


class Gateway:
    """The plugin's state: a queue, worker threads, and what happened to each instance.

    `api` is the orthanc module (or a stand-in with RestApiGet/RestApiPost/RestApiPut,
    LogInfo/LogWarning/LogError and OrthancException), `classify` a function as made by
    grpc_client()."""

    def __init__(self, api, config, classify):
        self.api = api
        self.config = config
        self.classify = classify
        self.queue = queue.Queue()
        self.stopping = threading.Event()
        self.workers = []
        self.lock = threading.RLock()
        self.status = collections.OrderedDict()
        self.pending = set()
        self.counters = collections.Counter()

    # --- Orthanc side -------------------------------------------------------------------

    def on_change(self, change_type, level, resource_id):
        """Orthanc's change callback: only enqueues; the workers do the work."""
        ct = self.api.ChangeType
        if change_type == ct.ORTHANC_STARTED:
            self.start()
        elif change_type == ct.ORTHANC_STOPPED:
            self.stop()
        elif change_type == ct.NEW_INSTANCE and self.config["Trigger"] == "instance":
            self.enqueue("instance", resource_id)
        elif change_type == ct.STABLE_SERIES and self.config["Trigger"] == "series":
            self.enqueue("series", resource_id)

    def enqueue(self, kind, resource_id, force=False):
        with self.lock:
            if (kind, resource_id) in self.pending and not force:
                return
            self.pending.add((kind, resource_id))
            if kind == "instance":
                self._set(resource_id, state="queued")
        self.queue.put((kind, resource_id, force))

    def start(self):
        if self.workers:
            return
        for n in range(int(self.config["Workers"])):
            worker = threading.Thread(target=self._work, name=f"fptserve-gateway-{n}", daemon=True)
            worker.start()
            self.workers.append(worker)

    def stop(self, timeout=10.0):
        self.stopping.set()
        for _ in self.workers:
            self.queue.put(None)
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self.workers = []
        close = getattr(self.classify, "close", None)
        if close:
            close()

    def _work(self):
        while not self.stopping.is_set():
            item = self.queue.get()
            if item is None:
                return
            kind, resource_id, force = item
            with self.lock:
                self.pending.discard((kind, resource_id))
            try:
                if kind == "series":
                    self.process_series(resource_id, force)
                else:
                    self.process_instance(resource_id, force)
            except Exception as error:  # never let a worker die
                self.counters["errors"] += 1
                self.api.LogError(f"fptserve gateway: {kind} {resource_id}: unexpected "
                                  f"{type(error).__name__}")
                if kind == "instance":
                    self._set(resource_id, state="failed", code="GATEWAY_ERROR")

    # --- the work -----------------------------------------------------------------------

    def process_series(self, series_id, force=False):
        series = json.loads(self.api.RestApiGet(f"/series/{series_id}"))
        modality = series.get("MainDicomTags", {}).get("Modality", "").upper()
        if modality == "SR" or modality in self.config["SkipModalities"]:
            return
        for instance_id in series.get("Instances", []):
            if self.stopping.is_set():
                return
            self.process_instance(instance_id, force)

    def process_instance(self, instance_id, force=False):
        tags = json.loads(self.api.RestApiGet(f"/instances/{instance_id}/tags?short"))
        modality = str(tags.get("0008,0060") or "").upper()
        body_part = str(tags.get("0018,0015") or "")
        sop_class = str(tags.get("0008,0016") or "")
        if modality == "SR" or sop_class.startswith(SR_SOP_CLASS_PREFIX) \
                or modality in self.config["SkipModalities"]:
            self._set(instance_id, state="skipped", reason="modality")
            return
        tasks = tasks_for(self.config, modality, body_part)
        if not tasks:
            self._set(instance_id, state="skipped", reason="no tasks configured")
            return
        if not force:
            previous = self._recorded_outcome(instance_id)
            if previous:
                self._set(instance_id, state="skipped", reason="already classified", outcome=previous)
                return
        self._set(instance_id, state="running", tasks=tasks, attempts=0)
        dicom = self.api.RestApiGet(f"/instances/{instance_id}/file")
        try:
            response = self._classify_with_retries(instance_id, dicom, tasks)
            if response is None:
                return  # gave up on a transient failure, or stopping
            sr = bytes(response.structured_report)
            if not sr:
                raise PermanentError("NO_STRUCTURED_REPORT",
                                     "fptserve answered without a structured report "
                                     "(a server without SR support?)")
            try:
                stored = json.loads(self.api.RestApiPost("/instances", sr))
            except self.api.OrthancException as error:
                raise PermanentError("SR_REJECTED", f"Orthanc refused the SR ({error})")
        except PermanentError as error:
            self.counters["failed"] += 1
            self.api.LogError(f"fptserve gateway: instance {instance_id}: giving up, "
                              f"{error.code}: {error}")
            self._set(instance_id, state="failed", code=error.code, permanent=True)
            self._record_outcome(instance_id, f"error:{error.code}")
            return
        sr_id = stored["ID"]
        self.counters["classified"] += 1
        self._set(instance_id, state="done", sr=sr_id, sr_status=stored.get("Status"))
        self._record_outcome(instance_id, sr_id)
        self.api.LogInfo(f"fptserve gateway: instance {instance_id}: structured report "
                         f"{sr_id} stored ({', '.join(tasks)})")

    def _classify_with_retries(self, instance_id, dicom, tasks):
        retries = int(self.config["Retries"])
        attempt = 0
        while True:
            attempt += 1
            self._set(instance_id, attempts=attempt)
            try:
                return self.classify(dicom, tasks, f"orthanc-{instance_id}-{attempt}")
            except Exception as error:
                code = rpc_code(error)
                if code is None:
                    raise
                if self.stopping.is_set():
                    # Orthanc is stopping (and the channel closing): record nothing
                    self._set(instance_id, state="failed", code=code, permanent=False)
                    return None
                details = error.details() if hasattr(error, "details") else ""
                if code not in self.config["RetryCodes"]:
                    raise PermanentError(code, details or code)
                if attempt > retries:
                    self.counters["gave_up"] += 1
                    self.api.LogError(f"fptserve gateway: instance {instance_id}: giving up "
                                      f"after {attempt} attempts, last {code}: {details}")
                    self._set(instance_id, state="failed", code=code, permanent=False)
                    return None
                delay = backoff_seconds(self.config, attempt)
                self.counters["retries"] += 1
                self.api.LogWarning(f"fptserve gateway: instance {instance_id}: {code} "
                                    f"(attempt {attempt}), retrying in {delay:g} s")
                self._set(instance_id, state="retrying", code=code)
                if self.stopping.wait(delay):
                    return None

    # --- bookkeeping --------------------------------------------------------------------

    def _set(self, instance_id, **fields):
        with self.lock:
            entry = self.status.pop(instance_id, {})
            entry.update(fields)
            self.status[instance_id] = entry
            while len(self.status) > STATUS_KEEP:
                self.status.popitem(last=False)

    def _recorded_outcome(self, instance_id):
        name = self.config["MetadataName"]
        if not name:
            with self.lock:
                entry = dict(self.status.get(instance_id, {}))
            return entry.get("sr") or (entry.get("permanent") and f"error:{entry.get('code')}")
        try:
            value = self.api.RestApiGet(f"/instances/{instance_id}/metadata/{name}")
        except self.api.OrthancException:
            return None
        return value.decode() if isinstance(value, bytes) else value

    def _record_outcome(self, instance_id, value):
        name = self.config["MetadataName"]
        if not name:
            return
        try:
            self.api.RestApiPut(f"/instances/{instance_id}/metadata/{name}", value.encode())
        except self.api.OrthancException as error:
            self.api.LogWarning(f"fptserve gateway: instance {instance_id}: cannot set "
                                f"metadata {name} ({error}); declare it in UserMetadata")

    def status_json(self):
        with self.lock:
            return json.dumps({
                "target": self.config["Target"],
                "trigger": self.config["Trigger"],
                "tls": self.config["Tls"] is not None,
                "queued": self.queue.qsize(),
                "workers": len(self.workers),
                "counters": dict(self.counters),
                "instances": dict(self.status),
            })


def config_relative(folders):
    """Folders relative to the folder of Orthanc's configuration file (like Orthanc's own
    StorageDirectory), when Orthanc was started with a file; absolute ones unchanged."""
    base = os.getcwd()
    try:
        where = orthanc.GetConfigurationPath()
        base = os.path.dirname(where) if os.path.isfile(where) else where
    except Exception:
        pass
    return [os.path.normpath(os.path.join(base, f)) for f in folders]


def install():
    """Runs when Orthanc loads this script."""
    try:
        config = load_config(json.loads(orthanc.GetConfiguration()))
    except (ValueError, TypeError, AttributeError) as error:
        orthanc.LogError(f"fptserve gateway: bad configuration, disabled: {error}")
        return None
    if not config["Enabled"]:
        orthanc.LogWarning("fptserve gateway: disabled by configuration")
        return None
    for folder in reversed(config_relative(config["PythonPath"])):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    if config["Tls"]:
        config["Tls"] = {k: (v if k == "ServerName" else config_relative([v])[0])
                         for k, v in config["Tls"].items()}
    try:
        classify = grpc_client(config)
    except ImportError as error:
        orthanc.LogError(f"fptserve gateway: cannot import grpc or the fptserve stubs ({error}); "
                         "set Fptserve.PythonPath. Disabled.")
        return None
    except OSError as error:
        orthanc.LogError(f"fptserve gateway: cannot read a Tls file ({error}). Disabled.")
        return None
    gateway = Gateway(orthanc, config, classify)
    orthanc.RegisterOnChangeCallback(gateway.on_change)

    def rest_status(output, uri, **request):
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
            return
        output.AnswerBuffer(gateway.status_json().encode(), "application/json")

    def rest_classify(output, uri, **request):
        if request["method"] != "POST":
            output.SendMethodNotAllowed("POST")
            return
        instance_id = request["groups"][0]
        gateway.enqueue("instance", instance_id, force=True)
        output.AnswerBuffer(json.dumps({"queued": instance_id}).encode(), "application/json")

    orthanc.RegisterRestCallback("/fptserve/status", rest_status)
    orthanc.RegisterRestCallback("/fptserve/instances/([^/]+)/classify", rest_classify)
    orthanc.LogWarning(f"fptserve gateway: classifying with {config['Target']} "
                       f"({'TLS' if config['Tls'] is not None else 'plaintext'}), "
                       f"trigger {config['Trigger']}, {config['Workers']} worker(s)")
    return gateway


if orthanc is not None:
    GATEWAY = install()
