#!/usr/bin/env bash
# Runs HERE (the development machine, which reaches PyPI), before a GPU session. Idempotent.
#
# Stages under target/gpu/ (git-ignored) everything the GPU machine needs but cannot fetch,
# in folders small enough to be carried one per `run` call (64 MiB per call, working tree
# included):
#   parts/part-NN/   the GPU ONNX Runtime (3 .so files from the onnxruntime-gpu wheel) as one
#                    tar.xz split into parts, each with SHA256SUMS (every part + the whole)
#   bin/             the release fptserve binary, stripped and xz-compressed, with SHA256SUMS
#   wheels/          Python wheels the benchmark harness needs there, with SHA256SUMS
#   PLAN             the run calls to make, in order, with their carry lists and sizes
#
# Environment: FPTSERVE_BINARY (default target/release/fptserve), MAX_PART_MIB (default 60),
# XZ_LEVEL (default 6).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
# shellcheck source=deploy/gpu/common.sh
. deploy/gpu/common.sh

STAGE=$ROOT/$STAGE_REL
BINARY=${FPTSERVE_BINARY:-target/release/fptserve}
MAX_PART_MIB=${MAX_PART_MIB:-60}
XZ_LEVEL=${XZ_LEVEL:-6}
CALL_LIMIT=$((64 << 20))
CALL_MARGIN=$((1 << 20))
ARCHIVE_NAME=ort-gpu-$ORT_GPU_VERSION.tar.xz

mkdir -p "$STAGE/download"

# ---------------------------------------------------------------- the binary first (cheap
# to check, and the most likely thing to be missing)
[ -x "$BINARY" ] || die "$BINARY is missing: build it first with  cargo build --release --locked  (or set FPTSERVE_BINARY)"

# ---------------------------------------------------------------- onnxruntime-gpu wheel
WHEEL=$STAGE/download/$ORT_GPU_WHEEL
if [ ! -f "$WHEEL" ] || [ "$(sha256sum "$WHEEL" | cut -d' ' -f1)" != "$ORT_GPU_WHEEL_SHA256" ]; then
  rm -f "$WHEEL"
  log "downloading onnxruntime-gpu==$ORT_GPU_VERSION (about 256 MB)"
  python3 -m pip download --quiet --disable-pip-version-check "${PIP_TARGET[@]}" \
    -d "$STAGE/download" "onnxruntime-gpu==$ORT_GPU_VERSION"
  [ -f "$WHEEL" ] || die "pip did not save $ORT_GPU_WHEEL (the file name or platform tag changed?)"
fi
echo "$ORT_GPU_WHEEL_SHA256  $WHEEL" | sha256sum -c --quiet - || die "$WHEEL does not match its pinned SHA-256"
log "wheel ok: $ORT_GPU_WHEEL"

# ---------------------------------------------------------------- runtime parts
PARTS=$STAGE/parts
stamp="$ORT_GPU_WHEEL_SHA256 max=$MAX_PART_MIB xz=$XZ_LEVEL"
parts_ok() {
  [ "$(cat "$PARTS/.stamp" 2>/dev/null)" = "$stamp" ] || return 1
  local d f n=0 want
  want=$(awk -v a="$ARCHIVE_NAME" 'index($2, a ".") == 1' "$PARTS/part-00/SHA256SUMS" 2>/dev/null | wc -l)
  [ "$want" -gt 0 ] || return 1
  for d in "$PARTS"/part-*; do
    f=$ARCHIVE_NAME.${d##*-}
    [ -f "$d/$f" ] || return 1
    (cd "$d" && awk -v f="$f" '$2 == f' SHA256SUMS | sha256sum -c --quiet -) || return 1
    n=$((n + 1))
  done
  [ "$n" -eq "$want" ]
}
if parts_ok; then
  log "runtime parts up to date"
else
  log "extracting the three libraries from the wheel"
  WORK=$STAGE/work
  rm -rf "$WORK" "$PARTS"
  mkdir -p "$WORK/ort" "$PARTS"
  python3 - "$WHEEL" "$WORK/ort" <<'EOF'
import sys, zipfile, os
wheel, out = sys.argv[1:]
want = {"libonnxruntime.so.1.31.1", "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_shared.so"}
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = os.path.basename(info.filename)
        if info.filename.startswith("onnxruntime/capi/") and name in want:
            with z.open(info) as src, open(os.path.join(out, name), "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.chmod(os.path.join(out, name), 0o755)
            want.discard(name)
if want:
    sys.exit(f"not in the wheel: {sorted(want)}")
EOF
  (cd "$WORK/ort" && echo "$ORT_LIB_SUMS" | sha256sum -c --quiet -) || die "the extracted libraries do not match their pinned SHA-256"
  log "compressing (xz -$XZ_LEVEL; about 2 minutes on 2 cores)"
  tar -C "$WORK/ort" --owner=0 --group=0 --numeric-owner --sort=name -cf - \
      libonnxruntime.so.1.31.1 libonnxruntime_providers_cuda.so libonnxruntime_providers_shared.so \
    | nice -n 10 xz -"$XZ_LEVEL" -T0 > "$WORK/$ARCHIVE_NAME"
  size=$(stat -c %s "$WORK/$ARCHIVE_NAME")
  max=$((MAX_PART_MIB << 20))
  count=$(( (size + max - 1) / max ))
  chunk=$(( (size + count - 1) / count ))      # balanced parts leave room for bin/ and wheels/
  (cd "$WORK" && split -b "$chunk" -d -a 2 "$ARCHIVE_NAME" "$ARCHIVE_NAME.")
  sums=$( (cd "$WORK" && sha256sum "$ARCHIVE_NAME" "$ARCHIVE_NAME".[0-9]*) )
  for f in "$WORK/$ARCHIVE_NAME".[0-9]*; do
    n=${f##*.}
    mkdir -p "$PARTS/part-$n"
    mv "$f" "$PARTS/part-$n/"
    printf '%s\n' "$sums" > "$PARTS/part-$n/SHA256SUMS"
  done
  rm -rf "$WORK"
  echo "$stamp" > "$PARTS/.stamp"
  parts_ok || die "the parts just written do not verify"
  log "runtime: $ARCHIVE_NAME, $size bytes, in $count parts"
fi

# ---------------------------------------------------------------- the binary
BIN=$STAGE/bin
bin_sha=$(sha256sum "$BINARY" | cut -d' ' -f1)
if [ "$(cat "$BIN/.stamp" 2>/dev/null)" = "$bin_sha" ] && (cd "$BIN" && sha256sum -c --quiet SHA256SUMS) >/dev/null 2>&1; then
  log "binary up to date"
else
  rm -rf "$BIN"
  mkdir -p "$BIN"
  cp "$BINARY" "$BIN/fptserve"
  if command -v strip >/dev/null 2>&1; then strip --strip-debug "$BIN/fptserve"; fi
  "$BIN/fptserve" --version >/dev/null || die "$BINARY does not run here"
  xz -6 -T0 -c "$BIN/fptserve" > "$BIN/fptserve.xz"
  (cd "$BIN" && sha256sum fptserve fptserve.xz > SHA256SUMS)
  {
    echo "source: $BINARY (sha256 $bin_sha, $(stat -c %s "$BINARY") bytes, built $(date -u -r "$BINARY" +%Y-%m-%dT%H:%MZ))"
    echo "version: $("$BIN/fptserve" --version)"
    echo "commit: $(git describe --always --dirty 2>/dev/null || echo unknown)"
    echo "needs: $(objdump -T "$BIN/fptserve" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1) (the GPU machine has Ubuntu 24.04's 2.39)"
  } > "$BIN/INFO"
  rm "$BIN/fptserve"
  echo "$bin_sha" > "$BIN/.stamp"
  log "binary staged: $(stat -c %s "$BIN/fptserve.xz") bytes compressed"
fi
newer=$(find src proto build.rs Cargo.toml Cargo.lock -newer "$BINARY" -type f 2>/dev/null | head -5)
if [ -n "$newer" ]; then
  log "WARNING: $BINARY is older than some sources (e.g. $(echo "$newer" | head -1)); rebuild with  cargo build --release --locked  and rerun this script to measure the current code"
fi
glibc=$(objdump -T "$BINARY" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
case $glibc in GLIBC_2.4[0-9]*|GLIBC_2.[5-9][0-9]*) log "WARNING: $BINARY needs $glibc; the GPU machine has 2.39";; esac

# ---------------------------------------------------------------- wheels
WHL=$STAGE/wheels
mkdir -p "$WHL"
if ! (cd "$WHL" && echo "$WHEEL_SUMS" | sha256sum -c --quiet -) >/dev/null 2>&1; then
  log "downloading wheels: ${WHEEL_REQUIREMENTS[*]}"
  rm -f "$WHL"/*.whl
  python3 -m pip download --quiet --disable-pip-version-check "${PIP_TARGET[@]}" -d "$WHL" "${WHEEL_REQUIREMENTS[@]}"
  (cd "$WHL" && echo "$WHEEL_SUMS" | sha256sum -c --quiet -) || die "the wheels do not match their pinned SHA-256"
fi
echo "$WHEEL_SUMS" > "$WHL/SHA256SUMS"
wheels=("$WHL"/*.whl)
log "wheels ok: ${#wheels[@]} files"

# ---------------------------------------------------------------- sizes and the call plan
tree=$(python3 - <<'EOF'
import os, subprocess
names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.split(b"\0")
total = sum(os.lstat(n).st_size for n in names if n and os.path.lexists(n))
if os.path.isdir("shared") and not subprocess.run(["git", "check-ignore", "-q", "shared"]).returncode:
    total += sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk("shared") for f in fs)
print(total)
EOF
)
size_of() { du -sb "$1" | cut -f1; }
part_dirs=("$PARTS"/part-*)
count=${#part_dirs[@]}
plan=$STAGE/PLAN
{
  echo "# fptserve GPU check: $count runtime parts; working tree $tree bytes"
  echo "# each line: call number | carry (JSON) | bytes carried incl. working tree | command"
  for i in $(seq 0 $((count - 1))); do
    n=$(printf '%02d' "$i")
    carry=("$STAGE_REL/parts/part-$n")
    items=("part-$n")
    if [ "$i" -eq 0 ]; then carry+=("$STAGE_REL/bin"); items+=(bin); fi
    if [ "$i" -eq 1 ] || { [ "$count" -eq 1 ] && [ "$i" -eq 0 ]; }; then carry+=("$STAGE_REL/wheels"); items+=(wheels); fi
    bytes=$tree
    for c in "${carry[@]}"; do bytes=$((bytes + $(size_of "$c"))); done
    [ "$bytes" -le $((CALL_LIMIT - CALL_MARGIN)) ] || die "call $((i + 1)) would carry $bytes bytes (limit 64 MiB less 1 MiB margin): lower MAX_PART_MIB"
    cmd="bash deploy/gpu/receive.sh ${items[*]}"
    [ "$i" -eq 0 ] && cmd="$cmd && bash deploy/gpu/export.sh --background"
    [ "$i" -eq $((count - 1)) ] && cmd="$cmd && bash deploy/gpu/run.sh"
    json=$(printf '"%s",' "${carry[@]}")
    printf '%d | [%s] | %d | %s\n' $((i + 1)) "${json%,}" "$bytes" "$cmd"
  done
  echo "# a rerun on the same warm machine: carry [] | bash deploy/gpu/run.sh"
} > "$plan"
log "staged in $STAGE_REL:"
(cd "$STAGE" && du -sb parts/part-* bin wheels | sed 's/^/    /')
echo
cat "$plan"
