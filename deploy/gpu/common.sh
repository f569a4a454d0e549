# Shared by prepare.sh (here), receive.sh, export.sh and run.sh (on the GPU machine).
# Sourced, not run. Pins every downloaded artefact by SHA-256.
# shellcheck disable=SC2034  # the variables are for the scripts that source this file

# ONNX Runtime GPU build: PyPI onnxruntime-gpu 1.31.1, CPython 3.12, manylinux_2_28 x86-64.
# Built for CUDA 13 (NEEDED: libcublas.so.13, libcublasLt.so.13, libcudart.so.13,
# libcurand.so.10; dlopened: libcudnn.so.9, libcufft.so.12, libnvrtc.so.13); the wheel's
# [cuda,cudnn] extras ask for nvidia-cuda-runtime~=13.0, nvidia-cuda-nvrtc~=13.0,
# nvidia-cufft~=12.0, nvidia-curand~=10.0, nvidia-cudnn-cu13~=9.0.
ORT_GPU_VERSION=1.31.1
ORT_GPU_WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
ORT_GPU_WHEEL_SHA256=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7
ORT_MAIN_LIB=libonnxruntime.so.1.31.1
# the three files fptserve needs, with their SHA-256 inside that wheel (onnxruntime/capi/)
ORT_LIB_SUMS='5104254339ecadae808da771bd0b63b240f0dbd466514234905e54372435c303  libonnxruntime.so.1.31.1
8387867e857499e045caff5d13ac6a5de29571c801562fa2dde0e45f1f31de52  libonnxruntime_providers_cuda.so
086ec1d5388f64153d9c63470d126693db9a182c8ce236d3a1119068471b8a0d  libonnxruntime_providers_shared.so'

# Python packages the benchmark harness needs that the machine's image lacks (grpc_tools,
# pydicom) or may hold in another version (grpcio, protobuf: grpc_tools' generated code
# insists on grpcio >= its own version). The same versions as tests/python/requirements.txt
# and the test venv. Installed with --no-deps into $GPU_HOME/site, first on PYTHONPATH of
# the benchmark processes only (the exporter runs on the machine's own packages).
WHEEL_SUMS='a1a72d19c0ab84b4b73b6c47eeaade76d84b1973a51593ff1160a73df33d03d9  grpcio-1.85.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl
207e2e65147a744d7cb43949b0c8b898a6f290984d10f025409311563804163f  grpcio_tools-1.85.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl
89f23aa53c24553a2416fd4fd1ec06f74fa42b14b546d8883128813f775bbfd2  protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl
abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b  pydicom-3.0.2-py3-none-any.whl'
WHEEL_REQUIREMENTS=(grpcio==1.85.1 grpcio-tools==1.85.1 protobuf==7.36.2 pydicom==3.0.2)

# pip download for the machine's Python 3.12 on x86-64 (the device README's recipe).
PIP_TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# Staging folder here (git-ignored, carried folder by folder) and the persistent folder on
# the GPU machine, outside the repository copy (it survives between calls while the
# machine stays warm, and is gone once it is given back).
STAGE_REL=target/gpu
GPU_HOME=${FPTSERVE_GPU_HOME:-/tmp/fptserve-gpu}

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf '[%s] ERROR: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; exit 1; }

# xz -d to stdout; the python3 fallback covers an image without xz-utils.
xz_cat() {
  if command -v xz >/dev/null 2>&1; then
    xz -dc -T0 -- "$1"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer, 1 << 20)' "$1"
  fi
}

# Every folder of the machine's nvidia-* pip packages (CUDA 13 wheels put theirs under
# nvidia/cu13/lib, cuDNN under nvidia/cudnn/lib) that holds a shared library, one a line.
nvidia_lib_dirs() {
  python3 - <<'EOF'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
seen = []
for root in roots:
    for pattern in ("*/lib", "*/lib64", "*/*/lib", "*/*/lib64"):
        for d in sorted(glob.glob(os.path.join(root, pattern))):
            if os.path.isdir(d) and glob.glob(os.path.join(d, "lib*.so*")) and d not in seen:
                seen.append(d)
print("\n".join(seen))
EOF
}

# LD_LIBRARY_PATH for the CUDA provider: the nvidia-* packages, then the driver's folder.
cuda_library_path() {
  local dirs
  dirs=$(nvidia_lib_dirs | paste -sd: -)
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && dirs="${dirs:+$dirs:}$d"
  done
  printf '%s' "${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
