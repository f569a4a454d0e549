# The two commands a new machine needs (see README.md):
#   make serve   run the daemon on the demo models (models/demo)
#   make test    run every test (Rust and Python)
# Each installs what it needs first, idempotently: Debian build tools and DICOM test tools
# (tools/system-deps.sh), ONNX Runtime from its PyPI wheel into .ort/, and (for tests) the
# Python environment into .venv/.

CARGO ?= cargo
ARGS ?=

.PHONY: serve test system-deps runtime python-env demo-models full-models dicom-parity bench bench-quick bench-train soak

serve: system-deps runtime
	$(CARGO) run --release --locked -- serve $(ARGS)

test: system-deps runtime python-env
	$(CARGO) nextest run --locked --no-fail-fast
	.venv/bin/python -m pytest -q models/tests tests/python

system-deps:
	@tools/system-deps.sh

runtime:
	@tools/fetch-onnxruntime.sh

python-env:
	@tools/python-env.sh

# Regenerates the committed demo repository and reference fixtures.
demo-models: python-env
	.venv/bin/python -m fptserve_models demo

# Writes full-size models (ViT-B/16 at 512, random weights) to models/full for benchmarks.
full-models: python-env
	.venv/bin/python -m fptserve_models full --out models/full

models/full/tasks/dr-grade/1/manifest.json:
	$(MAKE) full-models

# fptserve against its peers, side by side, every case; writes BENCHMARKS.md (about 35 minutes on 2 cores,
# up to 16 GB of memory for case 8).
bench: system-deps runtime python-env models/full/tasks/dr-grade/1/manifest.json
	$(CARGO) build --release --locked
	.venv/bin/python benches/run.py --full --binary target/release/fptserve --out BENCHMARKS.md

# Every benchmark case once on the demo models (make test runs it too, in tests/python).
bench-quick: system-deps runtime python-env
	$(CARGO) build --locked
	.venv/bin/python benches/run.py --quick --binary target/debug/fptserve --out target/bench/BENCHMARKS-quick.md

# Training memory and time (BENCHMARKS.md case 8): FPT+ (`train`, K/V preloaded) against full
# fine-tuning of the same ViT-B/16 at 512, batch 4 and 8 (16 extrapolated); about 12 minutes and
# up to 16 GB of memory on 2 cores. Writes the section to target/bench/train-memory.md.
bench-train: python-env models/full/tasks/dr-grade/1/manifest.json
	.venv/bin/python benches/train_memory.py --backbone models/full/backbones/vit-b16-512 --out target/bench/train-memory.md

# Decodes every DICOM file pydicom and pydicom-data ship, with fptserve and with pydicom,
# and writes the comparison to tests/python/DICOM_PARITY.md.
dicom-parity: system-deps runtime python-env
	$(CARGO) build --locked
	.venv/bin/python tools/dicom_parity.py --binary target/debug/fptserve --out tests/python/DICOM_PARITY.md

# The daemon (release build) under mixed traffic for SOAK_SECONDS (default 20 minutes): calls by
# code, latency over time, RSS / descriptors / threads against stated bounds, in target/soak/.
# make test runs a two-minute version (tests/python/test_soak.py).
SOAK_SECONDS ?= 1200
soak: system-deps runtime python-env
	$(CARGO) build --release --locked
	.venv/bin/python benches/soak.py --binary target/release/fptserve --duration $(SOAK_SECONDS) --out target/soak
