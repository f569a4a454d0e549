#!/usr/bin/env bash
# Runs THERE, in the last call (after receive.sh has brought every part), within about
# RUN_BUDGET_S seconds (default 360; give the call a timeout_s 60 more):
#   1. reassembles the GPU ONNX Runtime from the parts and checks every byte against the
#      pinned SHA-256 of the wheel's libraries
#   2. points LD_LIBRARY_PATH at the machine's nvidia-* pip packages; every library the CUDA
#      provider needs must resolve (else it stops here: the daemon would only fall back to CPU)
#   3. waits for the model export (export.sh, started in call 1; run now if it never ran)
#   4. smoke.py: fptserve --device cuda (fp32, the float16 variant, its host K/V path, the
#      fp16-K/V backbone) against --device cpu: CUDA provider started (log), answers, latency,
#      throughput, GPU memory
#   5. benches/run.py --full, case by case (BENCH_CASES, default 1,5), with the daemon on
#      CUDA through FPTSERVE_DEVICE / FPTSERVE_ONNXRUNTIME_LIB; its baselines and peers
#      stay on the CPU (they use the machine's CPU onnxruntime)
#   6. nvidia-smi; everything into $OUT (run.log, smoke.json, daemons.log,
#      BENCHMARKS-gpu.md, results-gpu.json, nvidia-smi.txt, export.log)
#
#   run.sh                  all of it
#   run.sh --stage runtime  step 1 only (used to test the reassembly off the GPU machine)
# Environment: BENCH_CASES (default 1,5; "none" skips the harness; 3 and 6 also run there,
# 4 needs dcmtk/gdcm/openjph, which the machine lacks), BENCH_REPEATS (3), RUN_BUDGET_S
# (360), SMOKE_SEQUENTIAL (20), SMOKE_BURST (64), SKIP_SMOKE (1: not again after it passed),
# FPTSERVE_GPU_HOME, OUT, RUN_SELFTEST.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/gpu/common.sh
. deploy/gpu/common.sh

T0=$(date +%s)
BUDGET=${RUN_BUDGET_S:-360}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# seconds left less $1, at least $2 (timeout 0 would mean no limit at all)
limit() { local n=$(( $(left) - $1 )); [ "$n" -ge "$2" ] || n=$2; echo "$n"; }
STAGE=all
if [ "${1:-}" = "--stage" ]; then STAGE=${2:?--stage runtime}; fi
OUT=${OUT:-$GPU_HOME/out}
mkdir -p "$OUT" "$GPU_HOME"
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null || true' EXIT   # the whole log before the call returns
log "run.sh: stage $STAGE, budget $BUDGET s, GPU_HOME $GPU_HOME, OUT $OUT"

# ------------------------------------------------------------------ 1. the runtime
ORT=$GPU_HOME/ort
LIB=$ORT/$ORT_MAIN_LIB
unpack_runtime() {
  if [ -d "$ORT" ] && (cd "$ORT" && echo "$ORT_LIB_SUMS" | sha256sum -c --quiet -) >/dev/null 2>&1; then
    log "runtime already unpacked and verified in $ORT"
    return
  fi
  local parts=$GPU_HOME/parts sums archive names=() f missing=""
  sums=$parts/SHA256SUMS
  [ -f "$sums" ] || die "no runtime part has arrived: run receive.sh part-00 ... first (in calls that carry them)"
  archive=$(awk '$2 !~ /\.[0-9][0-9]$/ {print $2}' "$sums")
  mapfile -t names < <(awk '$2 ~ /\.[0-9][0-9]$/ {print $2}' "$sums" | sort)
  [ "${#names[@]}" -gt 0 ] || die "$sums lists no parts"
  for f in "${names[@]}"; do [ -f "$parts/$f" ] || missing="$missing ${f##*.}"; done
  [ -z "$missing" ] || die "runtime part(s)$missing missing from $parts: the machine was given back between calls? Start again from call 1"
  (cd "$parts" && awk '$2 ~ /\.[0-9][0-9]$/' SHA256SUMS | sha256sum -c --quiet -) || die "a runtime part is damaged"
  (cd "$parts" && cat -- "${names[@]}") > "$GPU_HOME/$archive"
  (cd "$GPU_HOME" && awk -v a="$archive" '$2 == a' "$sums" | sha256sum -c -) || die "the reassembled $archive does not match"
  rm -rf "$ORT.tmp"
  mkdir -p "$ORT.tmp"
  xz_cat "$GPU_HOME/$archive" | tar -x -C "$ORT.tmp"
  (cd "$ORT.tmp" && echo "$ORT_LIB_SUMS" | sha256sum -c -) || die "the unpacked libraries do not match the wheel's"
  rm -rf "$ORT"
  mv "$ORT.tmp" "$ORT"
  rm -f "$GPU_HOME/$archive" "$parts"/*.tar.xz.[0-9][0-9]
  log "runtime unpacked: $(du -sh "$ORT" | cut -f1) in $ORT"
}
unpack_runtime
if [ "$STAGE" = runtime ]; then log "stage runtime done"; exit 0; fi

# ------------------------------------------------------------------ 2. CUDA libraries
LD_LIBRARY_PATH=$(cuda_library_path)
export LD_LIBRARY_PATH
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
# RUN_SELFTEST=1 (off the GPU machine, to test this script): these checks only warn, and
# smoke.py runs its CPU part alone
need() { if [ "${RUN_SELFTEST:-0}" = 1 ]; then log "selftest, ignored: $*"; else die "$*"; fi; }
unresolved=$(ldd "$ORT/libonnxruntime_providers_cuda.so" | grep 'not found' || true)
[ -z "$unresolved" ] || need "the CUDA provider cannot load: $(echo "$unresolved" | tr -s ' \t\n' ' ')"
for lib in libcudnn.so.9 libcufft.so.12 libnvrtc.so.13; do   # dlopened, so ldd does not show them
  found=$(IFS=:; for d in $LD_LIBRARY_PATH; do [ -e "$d/$lib" ] && echo "$d/$lib" && break; done || true)
  if [ -n "$found" ]; then log "  $lib -> $found"
  else need "$lib is not in any nvidia-* package folder (cuDNN 9 / cuFFT 12 / NVRTC 13 for CUDA 13)"; fi
done

# ------------------------------------------------------------------ binary and wheels
BIN=$GPU_HOME/bin/fptserve
if [ ! -x "$BIN" ]; then
  [ -d "$STAGE_REL/bin" ] || die "no binary: carry $STAGE_REL/bin (receive.sh bin)"
  bash deploy/gpu/receive.sh bin
fi
if [ ! -d "$GPU_HOME/site" ]; then
  [ -d "$STAGE_REL/wheels" ] || die "no wheels: carry $STAGE_REL/wheels (receive.sh wheels)"
  bash deploy/gpu/receive.sh wheels
fi
export PYTHONPATH=$GPU_HOME/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if ! command -v git >/dev/null 2>&1; then     # benches/run.py asks git for the commit
  mkdir -p "$GPU_HOME/shim"
  printf '#!/bin/sh\necho unknown\n' > "$GPU_HOME/shim/git"
  chmod +x "$GPU_HOME/shim/git"
  PATH=$GPU_HOME/shim:$PATH
fi
"$BIN" --version

# ------------------------------------------------------------------ 3. models
bash deploy/gpu/export.sh --wait "$(limit 180 30)"
cp "$GPU_HOME/export.log" "$OUT/export.log" 2>/dev/null || true
# benches/run.py --full reads models/full of this repository copy
if [ -L models/full ] || [ ! -e models/full ]; then
  ln -sfn "$GPU_HOME/models/full" models/full
else
  mv models/full "models/full.before-gpu-$$"
  ln -s "$GPU_HOME/models/full" models/full
fi
FP16=$GPU_HOME/models/full-fp16

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# ------------------------------------------------------------------ 4. smoke
log "smoke: fptserve on CUDA ($(left) s left)"
smoke_rc=0
smoke_extra=()
if [ "${RUN_SELFTEST:-0}" = 1 ]; then smoke_extra=(--cpu-only); fi
if [ "${SKIP_SMOKE:-0}" = 1 ] && [ -f "$GPU_HOME/smoke.ok" ]; then
  log "smoke skipped (SKIP_SMOKE=1; it passed earlier on this machine)"
else
  rm -f "$GPU_HOME/smoke.ok"
  timeout --kill-after=15 "$(limit 60 60)" python3 deploy/gpu/smoke.py --binary "$BIN" --lib "$LIB" \
    --fp32 "$GPU_HOME/models/full" --fp16 "$FP16" --work "$GPU_HOME/bench" \
    --json "$OUT/smoke.json" --logs "$OUT/daemons.log" \
    --sequential "${SMOKE_SEQUENTIAL:-20}" --burst "${SMOKE_BURST:-64}" "${smoke_extra[@]}" || smoke_rc=$?
  log "smoke exit $smoke_rc (0: CUDA in use; 2: CUDA did not start or fell back to CPU)"
  if [ "$smoke_rc" -eq 0 ]; then touch "$GPU_HOME/smoke.ok"; fi
fi

# ------------------------------------------------------------------ 5. the harness
CASES=${BENCH_CASES:-1,5}
REPEATS=${BENCH_REPEATS:-3}
bench_rc=0
ran=()
if [ "$smoke_rc" -ne 0 ]; then
  log "harness skipped: the daemon is not on CUDA (its figures would be CPU figures)"
  bench_rc=3
elif [ "$CASES" != none ]; then
  # (the harness itself turns fptserve's feature cache off where a case must measure the backbone;
  # float32 backbone: the harness checks answers against float32 references to 2e-3)
  export FPTSERVE_DEVICE=cuda FPTSERVE_ONNXRUNTIME_LIB=$LIB FPTSERVE_BACKBONE_PRECISION=float32
  mkdir -p "$GPU_HOME/bench"
  for c in ${CASES//,/ }; do
    remaining=$(( $(left) - 25 ))
    if [ "$remaining" -lt 45 ]; then log "case $c skipped: $remaining s left"; continue; fi
    log "harness case $c (limit $remaining s)"
    rc=0
    timeout --kill-after=15 "$remaining" python3 benches/run.py --full --binary "$BIN" --work "$GPU_HOME/bench" \
      --cases "$c" --repeats "$REPEATS" --out "$GPU_HOME/bench/case-$c.md" || rc=$?
    if [ "$rc" -eq 0 ]; then
      cp "$GPU_HOME/bench/results-full.json" "$GPU_HOME/bench/case-$c.json"
      ran+=("$c")
    else
      if [ "$rc" -eq 124 ]; then log "case $c ran out of time"; else log "case $c failed (exit $rc)"; fi
      bench_rc=$rc
    fi
  done
  python3 - "$GPU_HOME/bench" "$OUT" "$CASES" "${ran[@]}" <<'EOF'
import json, sys
from pathlib import Path
work, out, asked, ran = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
head, sections, raw = None, [], {}
for c in ran:
    text = (work / f"case-{c}.md").read_text()
    cut = text.find("\n## ")
    if head is None:
        head = text[:cut]
    sections.append(text[cut + 1:].rstrip() + "\n")
    raw[c] = json.loads((work / f"case-{c}.json").read_text())
note = (f"\n\n**GPU run** (deploy/gpu/run.sh): fptserve served on the CUDA execution provider "
        f"(FPTSERVE_DEVICE=cuda, onnxruntime-gpu library); the ONNX Runtime baselines, fused models and the "
        f"Python peer ran on the CPU (the machine's CPU onnxruntime), so ratios compare GPU against CPU. "
        f"Cases asked: {asked}; finished: {', '.join(ran) or 'none'}.\n\n")
(out / "BENCHMARKS-gpu.md").write_text((head or "# Benchmarks (GPU)") + note + "\n".join(sections))
(out / "results-gpu.json").write_text(json.dumps(raw, indent=1))
EOF
fi

# ------------------------------------------------------------------ 6. report
nvidia-smi >> "$OUT/nvidia-smi.txt" 2>&1 || true
echo
log "==== summary ($(( $(date +%s) - T0 )) s)"
head -n 15 "$OUT/nvidia-smi.txt" || true
echo
if [ -f "$OUT/smoke.json" ]; then
  python3 - "$OUT/smoke.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("CUDA in use:", r["cuda_ok"])
for name, run in r["runs"].items():
    if "error" in run:
        print(f"{name}: FAILED {run['error'][:300]}")
        continue
    s = run["sequential"]
    st = {k: v["median"] for k, v in s["stages_ms"].items()}
    print(f"{name}: start {run['startup_s']:.1f} s, first call {run['first_call_s'] * 1e3:.0f} ms; "
          f"3 tasks e2e {s['e2e_s']['median'] * 1e3:.1f} ms (stages ms {st}); "
          f"1 task @16: {run['concurrent16']['req_per_s']:.1f} req/s p50 {run['concurrent16']['p50_ms']:.0f} ms; "
          f"GPU {run['gpu_memory_mib']} MiB; max prob diff vs cpu {run.get('max_prob_diff_vs_cpu', 0):.2e}")
EOF
fi
if [ -f "$OUT/BENCHMARKS-gpu.md" ]; then
  echo
  grep -E '^\| |\*\*' "$OUT/BENCHMARKS-gpu.md" | grep -v '^|---' | head -n 60 || true
fi
log "done: smoke exit $smoke_rc, harness exit $bench_rc, cases finished: ${ran[*]:-none}; files in $OUT: $(cd "$OUT" && echo *)"
[ "$smoke_rc" -eq 0 ] || exit "$smoke_rc"
exit "$bench_rc"
