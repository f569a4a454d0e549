#!/usr/bin/env bash
# Creates .venv with the exporter (models/) and its test dependencies: PyTorch, ONNX,
# ONNX Runtime, transformers (reference ViT), pydicom, Pillow, pytest; and the gRPC
# clients (grpcio, grpcurl) the daemon's end-to-end tests use.
# Idempotent: returns at once when .venv already matches what these files ask for.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
want=$(cat models/pyproject.toml tests/python/requirements.txt tools/python-env.sh | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.fptserve-stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "python-env: installing the Python environment into $VENV (PyTorch is large: a few minutes the first time)" >&2
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e 'models[test]' -r tests/python/requirements.txt
echo "$want" > "$VENV/.fptserve-stamp"
