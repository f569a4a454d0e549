#!/usr/bin/env bash
# Puts ONNX Runtime's shared library under .ort/<version>/, where fptserve finds it
# without any environment variable. The library comes from the PyPI onnxruntime wheel
# (the only registry this project may download from), pinned by version and SHA-256.
# Idempotent: returns at once when the library is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.32.0
LIB=libonnxruntime.so.$VERSION
DEST=.ort/$VERSION

case "$(uname -m)" in
  x86_64)
    WHEEL=onnxruntime-$VERSION-cp311-cp311-manylinux_2_28_x86_64.whl
    PLATFORM=manylinux_2_28_x86_64
    SHA256=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d ;;
  *)
    echo "fetch-onnxruntime: no pinned wheel for $(uname -m); install ONNX Runtime $VERSION and pass --onnxruntime-lib" >&2
    exit 1 ;;
esac

if [ -f "$DEST/$LIB" ] && [ -f "$DEST/.wheel-sha256" ] && [ "$(cat "$DEST/.wheel-sha256")" = "$SHA256" ]; then
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-onnxruntime: downloading $WHEEL from PyPI" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --platform "$PLATFORM" --python-version 3.11 --implementation cp \
  --dest "$tmp" "onnxruntime==$VERSION"
actual=$(sha256sum "$tmp/$WHEEL" | cut -d' ' -f1)
if [ "$actual" != "$SHA256" ]; then
  echo "fetch-onnxruntime: $WHEEL has SHA-256 $actual, expected $SHA256; refusing it" >&2
  exit 1
fi
mkdir -p "$DEST"
python3 - "$tmp/$WHEEL" "$DEST" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime"):
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
PY
echo "$SHA256" > "$DEST/.wheel-sha256"
echo "fetch-onnxruntime: $DEST/$LIB ready" >&2
