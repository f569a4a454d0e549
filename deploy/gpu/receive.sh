#!/usr/bin/env bash
# Runs THERE (the GPU machine), one call per carried folder: receive.sh ITEM...
#   part-NN   target/gpu/parts/part-NN/ -> $GPU_HOME/parts/ (checked against its SHA256SUMS)
#   bin       target/gpu/bin/           -> $GPU_HOME/bin/fptserve (unpacked, checked, run once)
#   wheels    target/gpu/wheels/        -> installed into $GPU_HOME/site (checked first)
# $GPU_HOME (default /tmp/fptserve-gpu) lies outside the repository copy, so it stays while
# the machine stays warm. The first call also records a probe of the machine (GPU, Python,
# the CUDA libraries the provider needs). Prints what has arrived so far.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/gpu/common.sh
. deploy/gpu/common.sh
[ $# -gt 0 ] || die "usage: receive.sh part-NN|bin|wheels ..."
mkdir -p "$GPU_HOME/parts"

probe() {
  echo "== probe $(date -u +%FT%TZ)"
  nvidia-smi -L 2>&1 || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  echo "python3: $(command -v python3) $(python3 -V 2>&1)"
  echo "xz: $(command -v xz || echo 'none (python3 lzma is used)')  git: $(command -v git || echo none)"
  python3 - <<'EOF' 2>&1 || true
import importlib.metadata as md
for name in ("torch", "onnx", "onnxruntime", "grpcio", "protobuf", "numpy", "pillow", "pydicom", "grpcio-tools",
             "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-curand",
             "nvidia-cuda-nvrtc"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
EOF
  local lib found d dirs=()
  mapfile -t dirs < <(nvidia_lib_dirs)
  echo "nvidia library folders:"
  for d in "${dirs[@]}"; do echo "  $d"; done
  for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcufft.so.12 libcudnn.so.9 libnvrtc.so.13; do
    found=""
    for d in "${dirs[@]}"; do
      if [ -n "$d" ] && [ -e "$d/$lib" ]; then found="$d/$lib"; break; fi
    done
    echo "  $lib: ${found:-MISSING}"
  done
  for lib in /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1; do
    if [ -e "$lib" ]; then echo "  driver: $lib"; fi
  done
}

for item in "$@"; do
  case $item in
    part-[0-9][0-9])
      src=$STAGE_REL/parts/$item
      [ -d "$src" ] || die "$src was not carried: name it in this call's carry"
      cp "$src"/*.tar.xz.[0-9][0-9] "$GPU_HOME/parts/"
      cp "$src/SHA256SUMS" "$GPU_HOME/parts/SHA256SUMS"
      f=$(basename "$src"/*.tar.xz.[0-9][0-9])
      (cd "$GPU_HOME/parts" && awk -v f="$f" '$2 == f' SHA256SUMS | sha256sum -c -) || die "$item is damaged"
      ;;
    bin)
      src=$STAGE_REL/bin
      [ -d "$src" ] || die "$src was not carried"
      mkdir -p "$GPU_HOME/bin"
      cp "$src/fptserve.xz" "$src/SHA256SUMS" "$src/INFO" "$GPU_HOME/bin/"
      xz_cat "$GPU_HOME/bin/fptserve.xz" > "$GPU_HOME/bin/fptserve"
      chmod +x "$GPU_HOME/bin/fptserve"
      (cd "$GPU_HOME/bin" && sha256sum -c SHA256SUMS) || die "the binary is damaged"
      rm "$GPU_HOME/bin/fptserve.xz"
      sed 's/^/  /' "$GPU_HOME/bin/INFO"
      "$GPU_HOME/bin/fptserve" --version || die "the binary does not run on this machine"
      ;;
    wheels)
      src=$STAGE_REL/wheels
      [ -d "$src" ] || die "$src was not carried"
      (cd "$src" && echo "$WHEEL_SUMS" | sha256sum -c --quiet -) || die "the wheels are damaged"
      rm -rf "$GPU_HOME/site"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$GPU_HOME/site" "$src"/*.whl
      PYTHONPATH=$GPU_HOME/site${PYTHONPATH:+:$PYTHONPATH} python3 -c 'import grpc, grpc_tools.protoc, google.protobuf, pydicom; print("  wheels installed: grpcio", grpc.__version__, "protobuf", google.protobuf.__version__, "pydicom", pydicom.__version__)'
      ;;
    *) die "unknown item $item (part-NN, bin or wheels)";;
  esac
  log "received $item"
done

if [ ! -f "$GPU_HOME/probe.txt" ]; then
  probe | tee "$GPU_HOME/probe.txt"
fi

# what has arrived so far
expected=$(awk 'index($2, "ort-gpu-") == 1 && $2 ~ /\.[0-9][0-9]$/' "$GPU_HOME/parts/SHA256SUMS" 2>/dev/null | wc -l)
have=$(find "$GPU_HOME/parts" -maxdepth 1 -name '*.tar.xz.[0-9][0-9]' | wc -l)
state="parts $have of $expected"
[ -x "$GPU_HOME/bin/fptserve" ] && state="$state, binary" || state="$state, NO binary"
[ -d "$GPU_HOME/site" ] && state="$state, wheels" || state="$state, NO wheels"
if [ -f "$GPU_HOME/export.status" ]; then state="$state, export $(cat "$GPU_HOME/export.status")"
elif [ -f "$GPU_HOME/export.pid" ] && kill -0 "$(cat "$GPU_HOME/export.pid")" 2>/dev/null; then state="$state, export running"
fi
if [ -d "$GPU_HOME/ort" ]; then state="$state, runtime already unpacked"; fi
log "state: $state (in $GPU_HOME)"
if grep -q '^failed' "$GPU_HOME/export.status" 2>/dev/null; then
  log "the model export failed; the end of its log:"
  tail -n 25 "$GPU_HOME/export.log" || true
fi
if [ "$have" -lt "$expected" ] && [ ! -d "$GPU_HOME/ort" ]; then
  missing=$(cd "$GPU_HOME/parts" && awk '$2 ~ /\.[0-9][0-9]$/ {print $2}' SHA256SUMS | while read -r f; do [ -f "$f" ] || printf '%s ' "${f##*.}"; done)
  log "still to come: part(s) $missing(if an earlier one is listed, the machine was given back in between: start again from call 1)"
fi
