#!/usr/bin/env bash
# Runs THERE: exports the full-size model repositories with the machine's own PyTorch
# (models are 162-325 MB each: they cannot be carried):
#   $GPU_HOME/models/full        python -m fptserve_models full          (vit-b16-512, float32 K/V)
#                                + quantize-backbone --precision float16 (vit-b16-512-fp16: its float16
#                                  variant, float32 K/V; what --device cuda serves by default)
#   $GPU_HOME/models/full-fp16   python -m fptserve_models full --fp16   (vit-b16-512-fp16, float16 K/V)
# Both run at once, each on half the cores; the fp32 one is required (its float16 variant is
# optional), the fp16 one optional.
#
#   export.sh                 export now, in the foreground
#   export.sh --background    start it in its own process session (it outlives the call that
#                             started it while the machine stays warm) and return at once
#   export.sh --wait SECONDS  wait for a running export; if none ever ran, export now
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/gpu/common.sh
. deploy/gpu/common.sh

MODELS=$GPU_HOME/models
STATUS=$GPU_HOME/export.status
PIDFILE=$GPU_HOME/export.pid
LOG=$GPU_HOME/export.log
mkdir -p "$GPU_HOME"

exported() { [ -f "$MODELS/full/tasks/dr-grade/1/manifest.json" ] && grep -q '^ok' "$STATUS" 2>/dev/null; }
running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

export_now() {
  rm -f "$STATUS"
  echo $$ > "$PIDFILE"
  # a private copy of the exporter: the repository copy is rewritten by later calls
  rm -rf "$GPU_HOME/src"
  mkdir -p "$GPU_HOME/src" "$MODELS"
  cp -r models/src/fptserve_models "$GPU_HOME/src/"
  local threads=$(( $(nproc) / 2 )) start variant
  [ "$threads" -ge 1 ] || threads=1
  start=$(date +%s)
  log "exporting full (fp32) and full --fp16 with $(python3 -c 'import torch; print("torch", torch.__version__)' 2>&1), $threads threads each"
  declare -A pid rc
  for variant in full full-fp16; do
    rm -rf "$MODELS/$variant.tmp"
    local flags=()
    [ "$variant" = full-fp16 ] && flags=(--fp16)
    PYTHONPATH=$GPU_HOME/src OMP_NUM_THREADS=$threads PYTHONUNBUFFERED=1 \
      bash -c 'python3 -m fptserve_models full --out "$1" "${@:3}" && if [ "$2" = full ]; then
        python3 -m fptserve_models quantize-backbone --out "$1" --backbone vit-b16-512 --precision float16 \
          --calibration-images 2 --evaluation-images 2 || echo "float16 variant failed (exit $?): served without it"
      fi' _ "$MODELS/$variant.tmp" "$variant" "${flags[@]}" > "$GPU_HOME/export-$variant.log" 2>&1 &
    pid[$variant]=$!
  done
  for variant in full full-fp16; do
    rc[$variant]=0
    wait "${pid[$variant]}" || rc[$variant]=$?
    if [ "${rc[$variant]}" -eq 0 ]; then
      rm -rf "${MODELS:?}/$variant"
      mv "$MODELS/$variant.tmp" "$MODELS/$variant"
    fi
    echo "---- $variant (exit ${rc[$variant]})"
    cat "$GPU_HOME/export-$variant.log"
  done
  log "export took $(( $(date +%s) - start )) s"
  if [ "${rc[full]}" -ne 0 ]; then
    echo "failed: fp32 exit ${rc[full]}, fp16 exit ${rc[full-fp16]}" > "$STATUS"
  elif [ "${rc[full-fp16]}" -ne 0 ]; then
    echo "ok (fp32 only: the fp16 export failed with exit ${rc[full-fp16]})" > "$STATUS"
  else
    echo "ok (fp32 and fp16, $(( $(date +%s) - start )) s)" > "$STATUS"
  fi
  rm -f "$PIDFILE"
  log "export: $(cat "$STATUS")"
  grep -q '^ok' "$STATUS"
}

case ${1:-} in
  "")
    export_now 2>&1 | tee "$LOG"
    ;;
  --in-background)
    export_now > "$LOG" 2>&1
    ;;
  --background)
    if exported; then log "models already exported: $(cat "$STATUS")"; exit 0; fi
    if running; then log "the export is already running (pid $(cat "$PIDFILE"))"; exit 0; fi
    setsid nohup bash "$0" --in-background > /dev/null 2>&1 < /dev/null &
    sleep 1
    log "export started in the background (log: $LOG)"
    ;;
  --wait)
    limit=${2:-600}
    waited=0
    while running && [ "$waited" -lt "$limit" ]; do
      [ $((waited % 30)) -eq 0 ] && log "waiting for the model export ($waited s)"
      sleep 2
      waited=$((waited + 2))
    done
    if running; then die "the model export is still running after $limit s"; fi
    if exported; then log "models exported: $(cat "$STATUS")"; exit 0; fi
    if [ -f "$STATUS" ]; then
      tail -n 30 "$LOG" >&2 || true
      die "the model export failed: $(cat "$STATUS")"
    fi
    log "no export ran yet: exporting now"
    export_now 2>&1 | tee "$LOG"
    ;;
  *) die "usage: export.sh [--background | --wait SECONDS]";;
esac
