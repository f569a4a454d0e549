"""fptserve gateway: an Orthanc Python plugin (orthanc-python) that classifies new images
with fptserve and stores the answer back into Orthanc as a DICOM Structured Report.

For each new instance (or each instance of a series once Orthanc sees it stable, see
"Trigger"), the plugin picks the tasks configured for its Modality / BodyPartExamined,
calls fptserve's Classify with structured_report=true and posts the returned Comprehensive
SR to Orthanc's /instances. The work runs on worker threads, never on Orthanc's callback
thread. Nothing is lost: what to classify is read from Orthanc's own change log, from a
position saved in Orthanc's database that moves only past finished work (see Gateway), so
fptserve outages of any length, Orthanc restarts and crashes of either mid-call delay the
work but never drop it, and no instance gets two reports. Transient gRPC failures are
retried without limit (capped exponential backoff); permanent ones stop at once. Logs name
Orthanc instance ids only, never a patient attribute.

Configuration: the "Fptserve" section of Orthanc's configuration (see orthanc.json and
README.md beside this file). The fptserve stubs (generated from proto/ with
grpc_tools.protoc) and grpcio must be importable; "PythonPath" adds folders to sys.path
first, e.g. a virtual environment's site-packages built for the same Python version as
Orthanc's embedded interpreter.

REST API added to Orthanc:
  GET  /fptserve/status                  the gateway's configuration, backlog (pending,
                                         retrying, failed by code, oldest pending age,
                                         change-log position), counters and the state of
                                         the instances it has seen (most recent 10000)
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

# gRPC status codes worth another try (the server was busy, restarting or slow; CANCELLED
# when the gateway itself is not stopping: a server or proxy gave up on the call, e.g.
# tonic when a deadline expires before the handler answers).
TRANSIENT_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED")
# Any other code is permanent: the same request would fail the same way (INVALID_ARGUMENT,
# NOT_FOUND, UNIMPLEMENTED, FAILED_PRECONDITION, PERMISSION_DENIED, UNAUTHENTICATED, ...).

# Structured Report storage SOP classes (Basic/Enhanced/Comprehensive/3D SR, Key Object
# Selection, CAD SRs, ...): 1.2.840.10008.5.1.4.1.1.88.x. Never classified, whatever the
# configuration says, so that the gateway cannot feed on its own output.
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
# Manufacturer (0008,0070) of the instances fptserve makes: never classified either.
OWN_MANUFACTURER = "fptserve"

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
    # Transient codes are retried without limit. Backoff before retry n (1-based):
    # min(MaxBackoffSeconds, BackoffSeconds * 2^(n-1)); a success ends every wait early.
    "BackoffSeconds": 1.0,
    "MaxBackoffSeconds": 30.0,
    # gRPC deadline of one Classify call.
    "TimeoutSeconds": 60.0,
    "RetryCodes": list(TRANSIENT_CODES),
    # Worker threads (calls to fptserve in flight at once).
    "Workers": 2,
    # Orthanc global property (>= 1024) holding the gateway's position in Orthanc's change
    # log: every change up to it is finished.
    "CursorProperty": 5473,
    # On the very first start (no saved position): also classify what Orthanc already holds
    # (false: only what arrives from then on).
    "ClassifyExisting": False,
    # Seconds between reads of the change log when Orthanc signals no new instance.
    "PollSeconds": 1.0,
    # Changes held in memory at once; the rest wait in Orthanc's change log.
    "MaxBacklog": 10000,
    # Seconds between backlog lines in Orthanc's log while work is pending.
    "BacklogLogSeconds": 60.0,
    # Folders put in front of sys.path before importing grpc and the fptserve stubs;
    # relative ones are taken from the folder of Orthanc's configuration file.
    "PythonPath": [],
    # User metadata (declared in Orthanc's "UserMetadata") recording, on the source
    # instance, the outcome: the SR's Orthanc id, or "error:CODE" after a permanent
    # failure. Instances that have it are not classified again (e.g. when their series
    # becomes stable again). Empty string: keep the outcome in memory only.
    "MetadataName": "FptserveSR",
    # Also store, before each SR, one saliency-map Secondary Capture per task (fptserve's
    # explain.secondary_capture: the map drawn over the image, in a new series of the same
    # study), which the SR references; any PACS viewer shows where the model looked.
    "SaliencyMaps": False,
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
        if key == "Retries":
            raise ValueError("Fptserve: Retries is gone: transient failures are retried without limit "
                             "(MaxBackoffSeconds caps the wait); remove it")
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
    if int(config["Workers"]) < 1 or int(config["MaxBacklog"]) < 1:
        raise ValueError("Fptserve: Workers and MaxBacklog must be >= 1")
    if int(config["CursorProperty"]) < 1024:
        raise ValueError("Fptserve: CursorProperty must be >= 1024 (lower ones are Orthanc's)")
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

    explain = classifier_pb2.Explain(secondary_capture=True) if config["SaliencyMaps"] else None

    def classify(dicom, tasks, request_id):
        return stub.Classify(classifier_pb2.ClassifyRequest(
            dicom=dicom, tasks=tasks, request_id=request_id, structured_report=True,
            explain=explain), timeout=timeout)

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
    """The plugin's state: the change-log feeder, a queue, worker threads, and what happened
    to each instance.

    Nothing to classify lives only in memory. Orthanc records every stored instance (and
    every stable series) in its change log, in the same database transaction as the
    instance; the feeder reads that log from a durable position (the cursor, an Orthanc
    global property) and the cursor only moves past a change once its work is finished:
    classified, refused for good, or skipped. An outage of fptserve of any length, an
    Orthanc restart, or a crash of either mid-call leaves the unfinished changes after the
    cursor, and the next start feeds them again. A change fed twice (finished, but the
    cursor not yet saved) finds the outcome recorded on the instance and is skipped; an SR
    stored whose outcome was not yet recorded is made again with the same request id, which
    gives the same SR identity (fptserve derives its UIDs from the request id), so Orthanc
    keeps one.

    `api` is the orthanc module (or a stand-in with RestApiGet/RestApiPost/RestApiPut,
    GetGlobalProperty/SetGlobalProperty, LogInfo/LogWarning/LogError and
    OrthancException), `classify` a function as made by grpc_client()."""

    def __init__(self, api, config, classify, clock=time.monotonic):
        self.api = api
        self.config = config
        self.classify = classify
        self.clock = clock
        self.queue = queue.Queue()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.workers = []
        self.feeder = None
        self.lock = threading.RLock()
        self.status = collections.OrderedDict()
        self.pending = set()
        self.counters = collections.Counter()
        # change-log position: every change up to `cursor` is finished (saved in Orthanc);
        # `fed` is the last change read; `inflight` the changes read and not finished
        self.cursor = None
        self.fed = None
        self.inflight = {}
        self.successes = 0
        self.last_backlog_log = clock()

    # --- Orthanc side -------------------------------------------------------------------

    def on_change(self, change_type, level, resource_id):
        """Orthanc's change callback: starts, stops, or wakes the feeder, nothing more (the
        change log, not this callback, says what to classify)."""
        ct = self.api.ChangeType
        if change_type == ct.ORTHANC_STARTED:
            self.start()
        elif change_type == ct.ORTHANC_STOPPED:
            self.stop()
        elif change_type in (ct.NEW_INSTANCE, ct.STABLE_SERIES):
            self.wake.set()

    def enqueue(self, kind, resource_id, force=False, seq=None):
        """Queues work; `seq` is its change's position in the log (None: asked for through
        the REST API, not tracked by the cursor)."""
        with self.lock:
            if seq is not None:
                self.inflight[seq] = {"kind": kind, "id": resource_id, "since": self.clock()}
            elif (kind, resource_id) in self.pending and not force:
                return
            self.pending.add((kind, resource_id))
            if kind == "instance":
                self._set(resource_id, state="queued")
        self.queue.put((kind, resource_id, force, seq))

    def start(self):
        if self.workers:
            return
        self.cursor = self._load_cursor()
        self.fed = self.cursor
        for n in range(int(self.config["Workers"])):
            worker = threading.Thread(target=self._work, name=f"fptserve-gateway-{n}", daemon=True)
            worker.start()
            self.workers.append(worker)
        self.feeder = threading.Thread(target=self._feed, name="fptserve-gateway-feeder", daemon=True)
        self.feeder.start()

    def stop(self, timeout=10.0):
        self.stopping.set()
        self.wake.set()
        for _ in self.workers:
            self.queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in [*self.workers, *([self.feeder] if self.feeder else [])]:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.workers = []
        self.feeder = None
        close = getattr(self.classify, "close", None)
        if close:
            close()

    # --- the change log -----------------------------------------------------------------

    def _load_cursor(self):
        saved = self.api.GetGlobalProperty(int(self.config["CursorProperty"]), "")
        if saved:
            self.api.LogWarning(f"fptserve gateway: resuming after change {saved} of Orthanc's change log")
            return int(saved)
        last = int(json.loads(self.api.RestApiGet("/changes?last")).get("Last", 0))
        start = 0 if self.config["ClassifyExisting"] else last
        self._save_cursor(start)
        self.api.LogWarning(
            "fptserve gateway: first start: classifying " +
            ("every instance Orthanc holds" if start == 0 else f"instances stored after change {last}"))
        return start

    def _save_cursor(self, seq):
        self.api.SetGlobalProperty(int(self.config["CursorProperty"]), str(seq))

    def _feed(self):
        while not self.stopping.is_set():
            try:
                more = self.feed_once()
            except Exception as error:  # Orthanc busy or stopping: read again later
                self.api.LogWarning(f"fptserve gateway: reading the change log: {type(error).__name__}")
                more = False
            self._log_backlog()
            if not more:
                self.wake.wait(float(self.config["PollSeconds"]))
                self.wake.clear()

    def feed_once(self):
        """Queues the relevant changes of one page of the change log; whether more may be
        read at once. Holds at most MaxBacklog changes in memory: the rest wait in the log."""
        with self.lock:
            room = int(self.config["MaxBacklog"]) - len(self.inflight)
            since = self.fed
        if room <= 0:
            return False
        page = json.loads(self.api.RestApiGet(f"/changes?since={since}&limit={min(room, 100)}"))
        wanted = "NewInstance" if self.config["Trigger"] == "instance" else "StableSeries"
        for change in page.get("Changes", []):
            if self.stopping.is_set():
                return False
            seq = int(change["Seq"])
            if change.get("ChangeType") == wanted:
                self.enqueue(self.config["Trigger"], change["ID"], seq=seq)
            with self.lock:
                self.fed = max(self.fed, seq)
        with self.lock:
            self._advance()
        return bool(page.get("Changes")) and not page.get("Done", True)

    def _finished(self, seq):
        with self.lock:
            self.inflight.pop(seq, None)
            self._advance()

    def _advance(self):
        """Moves the saved cursor up to the last change before the oldest unfinished one."""
        target = min(self.inflight) - 1 if self.inflight else self.fed
        if target > self.cursor:
            self._save_cursor(target)
            self.cursor = target

    # --- the work -----------------------------------------------------------------------

    def _work(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            kind, resource_id, force, seq = item
            with self.lock:
                self.pending.discard((kind, resource_id))
            try:
                if kind == "series":
                    finished = self.process_series(resource_id, force)
                else:
                    finished = self.process_instance(resource_id, force)
            except Exception as error:  # never let a worker die
                # unfinished: the change is fed again at the next start, and the backlog's
                # oldest age shows it meanwhile
                finished = False
                self.counters["errors"] += 1
                self.api.LogError(f"fptserve gateway: {kind} {resource_id}: unexpected "
                                  f"{type(error).__name__}: {error}")
                if kind == "instance":
                    self._set(resource_id, state="failed", code="GATEWAY_ERROR", permanent=False)
            if seq is not None and finished:
                self._finished(seq)

    def process_series(self, series_id, force=False):
        """Every instance of the series; False when cut short by Orthanc stopping."""
        try:
            series = json.loads(self.api.RestApiGet(f"/series/{series_id}"))
        except self.api.OrthancException:
            return True  # deleted since: nothing to do
        modality = series.get("MainDicomTags", {}).get("Modality", "").upper()
        if modality == "SR" or modality in self.config["SkipModalities"]:
            return True
        for instance_id in series.get("Instances", []):
            if self.stopping.is_set() or self.process_instance(instance_id, force) is False:
                return False
        return True

    def process_instance(self, instance_id, force=False):
        """Classifies one instance and stores its SR; False when Orthanc began stopping
        before the outcome was known (the change stays unfinished), else True."""
        try:
            tags = json.loads(self.api.RestApiGet(f"/instances/{instance_id}/tags?short"))
        except self.api.OrthancException:
            self._set(instance_id, state="skipped", reason="no longer in Orthanc")
            return True
        modality = str(tags.get("0008,0060") or "").upper()
        body_part = str(tags.get("0018,0015") or "")
        sop_class = str(tags.get("0008,0016") or "")
        if modality == "SR" or sop_class.startswith(SR_SOP_CLASS_PREFIX) \
                or modality in self.config["SkipModalities"]:
            self._set(instance_id, state="skipped", reason="modality")
            return True
        if str(tags.get("0008,0070") or "").strip() == OWN_MANUFACTURER:
            # fptserve's own output (a saliency Secondary Capture): never fed back
            self._set(instance_id, state="skipped", reason="made by fptserve")
            return True
        tasks = tasks_for(self.config, modality, body_part)
        if not tasks:
            self._set(instance_id, state="skipped", reason="no tasks configured")
            return True
        if not force:
            previous = self._recorded_outcome(instance_id)
            if previous:
                self._set(instance_id, state="skipped", reason="already classified", outcome=previous)
                return True
        # The request id names the report: the same id gives the same SR UIDs, so doing this
        # again after a crash stores nothing new. A forced run asks for a new report.
        request_id = f"orthanc-{instance_id}" + (f"-again-{time.time_ns()}" if force else "")
        self._set(instance_id, state="running", tasks=tasks, attempts=0, request_id=request_id)
        dicom = self.api.RestApiGet(f"/instances/{instance_id}/file")
        try:
            response = self._classify_with_retries(instance_id, dicom, tasks, request_id)
            if response is None:
                return False  # Orthanc is stopping
            sr = bytes(response.structured_report)
            if not sr:
                raise PermanentError("NO_STRUCTURED_REPORT",
                                     "fptserve answered without a structured report "
                                     "(a server without SR support?)")
            captures = self._store_saliency_maps(instance_id, response)
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
            return True
        sr_id = stored["ID"]
        again = stored.get("Status") == "AlreadyStored"
        self.counters["already_stored" if again else "classified"] += 1
        self._set(instance_id, state="done", sr=sr_id, sr_status=stored.get("Status"))
        self._record_outcome(instance_id, sr_id)
        self.api.LogInfo(f"fptserve gateway: instance {instance_id}: structured report "
                         f"{sr_id} {'was already stored' if again else 'stored'} ({', '.join(tasks)})"
                         + (f", {len(captures)} saliency map(s)" if captures else ""))
        return True

    def _store_saliency_maps(self, instance_id, response):
        """Stores each task's saliency Secondary Capture (before the SR that references
        them); their Orthanc ids. A task that could not be explained, or whose capture Orthanc
        refuses, is logged, not failed: its SR still carries its numbers."""
        if not self.config["SaliencyMaps"]:
            return []
        stored = []
        for result in response.results:
            saliency = result.saliency
            if saliency.unavailable:
                self.api.LogWarning(f"fptserve gateway: instance {instance_id}: no saliency map for "
                                    f"{result.task}: {saliency.unavailable}")
                continue
            if not saliency.secondary_capture:
                continue
            try:
                answer = json.loads(self.api.RestApiPost("/instances", bytes(saliency.secondary_capture)))
            except self.api.OrthancException as error:
                # the report (the numbers) matters more than the picture: it is still stored
                self.api.LogError(f"fptserve gateway: instance {instance_id}: Orthanc refused the saliency "
                                  f"map of {result.task} ({error}); storing the report without it")
                self.counters["saliency_refused"] += 1
                continue
            stored.append(answer["ID"])
        self._set(instance_id, saliency_maps=stored)
        return stored

    def _classify_with_retries(self, instance_id, dicom, tasks, request_id):
        """The reply, retrying transient codes without limit (capped exponential backoff;
        a success of any call ends every wait early); None when Orthanc is stopping."""
        attempt = 0
        while True:
            attempt += 1
            self._set(instance_id, attempts=attempt)
            seen = self.successes
            try:
                reply = self.classify(dicom, tasks, request_id)
                with self.lock:
                    self.successes += 1
                return reply
            except Exception as error:
                code = rpc_code(error)
                if code is None:
                    raise
                if self.stopping.is_set():
                    # Orthanc is stopping (and the channel closing): record nothing
                    self._set(instance_id, state="interrupted", code=code, permanent=False)
                    return None
                details = error.details() if hasattr(error, "details") else ""
                if code not in self.config["RetryCodes"]:
                    raise PermanentError(code, details or code)
                delay = backoff_seconds(self.config, attempt)
                self.counters["retries"] += 1
                if attempt & (attempt - 1) == 0:  # attempts 1, 2, 4, 8, ...: the log stays short
                    self.api.LogWarning(f"fptserve gateway: instance {instance_id}: {code} "
                                        f"(attempt {attempt}), retrying in {delay:g} s")
                self._set(instance_id, state="retrying", code=code)
                if not self._wait_retry(delay, seen):
                    self._set(instance_id, state="interrupted", code=code, permanent=False)
                    return None

    def _wait_retry(self, delay, seen):
        """Sleeps `delay` seconds, less when another call succeeds meanwhile (fptserve is
        back); False when Orthanc is stopping."""
        deadline = time.monotonic() + delay
        while not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self.successes != seen:
                return True
            self.stopping.wait(min(left, 0.2))
        return False

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

    def backlog(self):
        """What is not finished: changes read and pending (queued, running or retrying),
        the oldest one's age, failures by code, and the change-log position."""
        with self.lock:
            states = collections.Counter(e.get("state") for e in self.status.values())
            failed = collections.Counter(e.get("code") for e in self.status.values()
                                         if e.get("state") == "failed")
            oldest = min((w["since"] for w in self.inflight.values()), default=None)
            return {
                "pending": len(self.inflight),
                "queued": states["queued"],
                "running": states["running"],
                "retrying": states["retrying"],
                "failed": dict(failed),
                "oldest_pending_age_s": None if oldest is None else round(self.clock() - oldest, 1),
                "cursor": self.cursor,
                "last_change_read": self.fed,
            }

    def _log_backlog(self):
        """Every BacklogLogSeconds while work waits: one line, ids and counts only."""
        now = self.clock()
        if now - self.last_backlog_log < float(self.config["BacklogLogSeconds"]):
            return
        self.last_backlog_log = now
        b = self.backlog()
        if b["pending"]:
            self.api.LogWarning(
                f"fptserve gateway: backlog: {b['pending']} pending ({b['retrying']} retrying, "
                f"{b['running']} running), oldest {b['oldest_pending_age_s']:g} s; "
                f"failed {b['failed'] or 'none'}; change log at {b['last_change_read']}")

    def status_json(self):
        with self.lock:
            return json.dumps({
                "target": self.config["Target"],
                "trigger": self.config["Trigger"],
                "tls": self.config["Tls"] is not None,
                "queued": self.queue.qsize(),
                "workers": len(self.workers),
                "backlog": self.backlog(),
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
