"""Writes fptserve-dashboard.json, the Grafana dashboard for fptserve's metrics (README.md,
Metrics). Edit this file rather than the JSON, then run it:

    python3 deploy/grafana/generate.py

tests/python/test_deploy.py checks that the JSON is what this script writes, and that every
metric and label its queries use exists in src/metrics.rs.
"""

import json
import sys
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
panels = []
y = 0
pid = 0

def nid():
    global pid
    pid += 1
    return pid

def row(title):
    global y
    panels.append({"type": "row", "id": nid(), "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1

def targets(exprs):
    out = []
    for i, (expr, legend) in enumerate(exprs):
        out.append({"datasource": DS, "refId": chr(ord("A") + i), "expr": expr,
                    "legendFormat": legend, "range": True, "instant": False})
    return out

def ts(title, desc, exprs, unit, x, w, h=8, stack=False, minv=None, maxv=None):
    fd = {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stack else 40,
                                   "showPoints": "never", "spanNulls": False,
                                   "stacking": {"mode": "normal" if stack else "none", "group": "A"}}}
    if minv is not None:
        fd["min"] = minv
    if maxv is not None:
        fd["max"] = maxv
    return {"type": "timeseries", "id": nid(), "title": title, "description": desc, "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": x, "y": y},
            "fieldConfig": {"defaults": fd, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"], "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": targets(exprs)}

def stat(title, desc, expr, unit, x, w, legend="", thresholds=None, decimals=None):
    fd = {"unit": unit, "color": {"mode": "thresholds"},
          "thresholds": {"mode": "absolute", "steps": thresholds or [{"color": "green", "value": None}]}}
    if decimals is not None:
        fd["decimals"] = decimals
    return {"type": "stat", "id": nid(), "title": title, "description": desc, "datasource": DS,
            "gridPos": {"h": 4, "w": w, "x": x, "y": y},
            "fieldConfig": {"defaults": fd, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "textMode": "auto",
                        "orientation": "auto"},
            "targets": targets([(expr, legend)])}

R = "[$__rate_interval]"

row("Overview")
panels.append(stat("Ready replicas", "Daemons whose inference listener takes calls (fptserve_ready: models loaded and warm, not draining) out of those scraped.",
                   f'sum(fptserve_ready{{{SEL}}})', "short", 0, 4,
                   thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]))
panels.append(stat("Requests / s", "gRPC calls answered per second (Classify, ListTasks, ModelInfer), every code.",
                   f'sum(rate(fptserve_requests_total{{{SEL}}}{R}))', "reqps", 4, 4))
panels.append(stat("Errors", "Share of answered calls whose status is not OK.",
                   f'sum(rate(fptserve_requests_total{{{SEL}, code!="Ok"}}{R})) / sum(rate(fptserve_requests_total{{{SEL}}}{R}))',
                   "percentunit", 8, 4,
                   thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.01}, {"color": "red", "value": 0.05}]))
panels.append(stat("p99 latency", "99th percentile of a classification's total time in the daemon (stage total).",
                   f'histogram_quantile(0.99, sum by (le) (rate(fptserve_stage_duration_seconds_bucket{{{SEL}, stage="total"}}{R})))',
                   "s", 12, 4))
panels.append(stat("In flight", "Classifications admitted and not finished, all replicas (what the autoscaler averages per pod).",
                   f'sum(fptserve_requests_in_flight{{{SEL}}})', "short", 16, 4))
panels.append(stat("Version", "fptserve_build_info: the versions running.",
                   f'count by (version) (fptserve_build_info{{{SEL}}})', "short", 20, 4, legend="{{version}}"))
y += 4

row("Requests")
panels.append(ts("Requests by method and code", "fptserve_requests_total: answered gRPC calls per second.",
                 [(f'sum by (method, code) (rate(fptserve_requests_total{{{SEL}}}{R}))', "{{method}} {{code}}")],
                 "reqps", 0, 12))
panels.append(ts("Errors by method and code", "Calls answered with a status other than OK (RESOURCE_EXHAUSTED: admission or queue full; DEADLINE_EXCEEDED; INVALID_ARGUMENT; ...).",
                 [(f'sum by (method, code) (rate(fptserve_requests_total{{{SEL}, code!="Ok"}}{R}))', "{{method}} {{code}}")],
                 "reqps", 12, 12))
y += 8
panels.append(ts("Tasks asked for, by task and code", "fptserve_task_requests_total: tasks named in Classify and ModelInfer calls, by the call's code (task \"unknown\" for names that are not loaded).",
                 [(f'sum by (task, code) (rate(fptserve_task_requests_total{{{SEL}}}{R}))', "{{task}} {{code}}")],
                 "reqps", 0, 12))
panels.append(ts("Task errors", "Tasks in calls that did not answer OK, by task and code.",
                 [(f'sum by (task, code) (rate(fptserve_task_requests_total{{{SEL}, code!="Ok"}}{R}))', "{{task}} {{code}}")],
                 "reqps", 12, 12))
y += 8

row("Latency")
panels.append(ts("p50 by stage", "Median time per request stage: decode, preprocess, queue (waiting for a backbone batch), backbone, adapter, total.",
                 [(f'histogram_quantile(0.5, sum by (le, stage) (rate(fptserve_stage_duration_seconds_bucket{{{SEL}}}{R})))', "{{stage}}")],
                 "s", 0, 8))
panels.append(ts("p99 by stage", "99th percentile per stage.",
                 [(f'histogram_quantile(0.99, sum by (le, stage) (rate(fptserve_stage_duration_seconds_bucket{{{SEL}}}{R})))', "{{stage}}")],
                 "s", 8, 8))
panels.append(ts("Mean by stage", "Mean time per stage (sum / count).",
                 [(f'sum by (stage) (rate(fptserve_stage_duration_seconds_sum{{{SEL}}}{R})) / sum by (stage) (rate(fptserve_stage_duration_seconds_count{{{SEL}}}{R}))', "{{stage}}")],
                 "s", 16, 8))
y += 8

row("Backbone")
panels.append(ts("Backbone batch size", "Images per backbone run: mean and 90th percentile (fptserve_backbone_batch_size). 1 on a CPU unless FPTSERVE_MAX_BATCH_SIZE says otherwise.",
                 [(f'sum(rate(fptserve_backbone_batch_size_sum{{{SEL}}}{R})) / sum(rate(fptserve_backbone_batch_size_count{{{SEL}}}{R}))', "mean"),
                  (f'histogram_quantile(0.9, sum by (le) (rate(fptserve_backbone_batch_size_bucket{{{SEL}}}{R})))', "p90")],
                 "short", 0, 6))
panels.append(ts("Backbone runs / s", "Backbone runs per second (the batch size histogram's count), per replica.",
                 [(f'sum by (instance) (rate(fptserve_backbone_batch_size_count{{{SEL}}}{R}))', "{{instance}}")],
                 "ops", 6, 6))
panels.append(ts("Queue depth and in flight", "Images waiting for a backbone batch (bounded by FPTSERVE_MAX_QUEUE) and classifications admitted (bounded by FPTSERVE_MAX_IN_FLIGHT), per replica.",
                 [(f'sum by (instance) (fptserve_backbone_queue_depth{{{SEL}}})', "queued {{instance}}"),
                  (f'sum by (instance) (fptserve_requests_in_flight{{{SEL}}})', "in flight {{instance}}")],
                 "short", 12, 6))
panels.append(ts("Backbone jobs dropped", "Images dropped before their backbone run: the call's deadline passed while queued, or the call was cancelled.",
                 [(f'sum by (reason) (rate(fptserve_backbone_jobs_dropped_total{{{SEL}}}{R}))', "{{reason}}")],
                 "ops", 18, 6))
y += 8

row("Feature cache")
panels.append(ts("Feature cache hit ratio", "Backbone passes answered from the feature cache (same image for another task, or a retry) among all lookups.",
                 [(f'sum(rate(fptserve_feature_cache_lookups_total{{{SEL}, result="hit"}}{R})) / sum(rate(fptserve_feature_cache_lookups_total{{{SEL}}}{R}))', "hit ratio")],
                 "percentunit", 0, 8, minv=0, maxv=1))
panels.append(ts("Feature cache lookups", "Lookups per second by result.",
                 [(f'sum by (result) (rate(fptserve_feature_cache_lookups_total{{{SEL}}}{R}))', "{{result}}")],
                 "ops", 8, 8))
panels.append(ts("Feature cache size", "Bytes of backbone K/V held (bounded by FPTSERVE_FEATURE_CACHE_BYTES) and images held, per replica.",
                 [(f'sum by (instance) (fptserve_feature_cache_bytes{{{SEL}}})', "bytes {{instance}}")],
                 "bytes", 16, 4))
panels.append(ts("Feature cache entries", "Images held in the feature cache, per replica.",
                 [(f'sum by (instance) (fptserve_feature_cache_entries{{{SEL}}})', "{{instance}}")],
                 "short", 20, 4))
y += 8

row("K/V path")
panels.append(ts("Bound backbone batches / s", "Backbone batches whose K/V stayed where they were computed (GPU memory under CUDA) for the side networks (FPTSERVE_IO_BINDING), by K/V element type.",
                 [(f'sum by (kv_dtype) (rate(fptserve_backbone_bound_batches_total{{{SEL}}}{R}))', "{{kv_dtype}}")],
                 "ops", 0, 12))
panels.append(ts("K/V copied to host / s", "Images whose K/V were copied into host buffers: every image when not bound, only those the feature cache keeps when bound.",
                 [(f'sum by (instance) (rate(fptserve_kv_host_copies_total{{{SEL}}}{R}))', "{{instance}}")],
                 "ops", 12, 12))
y += 8

row("Models")
panels.append(ts("Adapters by state", "Task adapter versions per replica: loaded (serving), evicted (under FPTSERVE_MAX_ADAPTERS, reloaded on demand), failed (refused at their last load).",
                 [(f'sum by (instance, state) (fptserve_adapters{{{SEL}}})', "{{state}} {{instance}}")],
                 "short", 0, 6))
panels.append(ts("Model memory", "Size of the loaded ONNX models by kind, per replica (weights; ONNX Runtime's buffers come on top, see resident memory).",
                 [(f'sum by (instance, kind) (fptserve_model_memory_bytes{{{SEL}}})', "{{kind}} {{instance}}")],
                 "bytes", 6, 6))
panels.append(ts("Adapter load duration", "Loading one adapter (manifest, SHA-256, ONNX Runtime session, interface checks): median and 99th percentile over the loads in the window.",
                 [(f'histogram_quantile(0.5, sum by (le) (rate(fptserve_adapter_load_duration_seconds_bucket{{{SEL}}}{R})))', "p50"),
                  (f'histogram_quantile(0.99, sum by (le) (rate(fptserve_adapter_load_duration_seconds_bucket{{{SEL}}}{R})))', "p99")],
                 "s", 12, 6))
panels.append(ts("Model load failures and cold runs", "Refused loads of a backbone or an adapter (at start, admin API, repository watch, repository extension, reload after eviction) in each interval; and requests that ran a model nothing had warmed (should stay 0: every load warms first).",
                 [(f'sum by (kind) (increase(fptserve_model_load_failures_total{{{SEL}}}{R}))', "refused {{kind}}"),
                  (f'sum by (kind) (increase(fptserve_model_cold_runs_total{{{SEL}}}{R}))', "cold {{kind}}")],
                 "short", 18, 6))
y += 8

row("Process")
panels.append(ts("Resident memory", "Resident memory of each fptserve process (fptserve_process_resident_memory_bytes).",
                 [(f'sum by (instance) (fptserve_process_resident_memory_bytes{{{SEL}}})', "{{instance}}")],
                 "bytes", 0, 12))
panels.append(ts("Ready", "fptserve_ready per replica: 0 while the models load and while draining, 1 when it takes calls.",
                 [(f'max by (instance) (fptserve_ready{{{SEL}}})', "{{instance}}")],
                 "short", 12, 12, minv=0, maxv=1))
y += 8

def var_query(name, label, query):
    return {"type": "query", "name": name, "label": label, "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1, "hide": 0, "options": [], "regex": "", "skipUrlSync": False}

dashboard = {
    "__requires": [
        {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
        {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
    ],
    "id": None,
    "uid": "fptserve",
    "title": "fptserve",
    "description": "fptserve: requests, latency per stage, backbone batching, feature cache, adapters and memory (metrics: README.md, Metrics).",
    "tags": ["fptserve", "inference"],
    "timezone": "browser",
    "editable": True,
    "graphTooltip": 1,
    "fiscalYearStartMonth": 0,
    "liveNow": False,
    "refresh": "30s",
    "schemaVersion": 39,
    "version": 1,
    "time": {"from": "now-1h", "to": "now"},
    "timepicker": {},
    "links": [],
    "annotations": {"list": [{
        "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
        "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]},
    "templating": {"list": [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
         "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
         "regex": "", "skipUrlSync": False},
        var_query("job", "Job", "label_values(fptserve_build_info, job)"),
        var_query("instance", "Instance", 'label_values(fptserve_build_info{job=~"$job"}, instance)'),
    ]},
    "panels": panels,
}


def render():
    return json.dumps(dashboard, indent=2) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("fptserve-dashboard.json")
    out.write_text(render())
    print(f"{out}: {sum(p['type'] != 'row' for p in panels)} panels")
