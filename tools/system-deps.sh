#!/usr/bin/env bash
# Installs the Debian packages fptserve needs beyond a Rust toolchain:
# - to build: cmake and a C++ compiler (the vendored CharLS and libjpeg-turbo 3 sources of
#   charls-sys and turbojpeg-sys build with cmake), nasm (libjpeg-turbo's SIMD; without it
#   the build still works, JPEG decoding is just slower);
# - for tests/dicom_syntaxes.rs: dcmtk (dcmconv, dcmcjpeg, dcmcrle, dcmcjpls), gdcm's
#   command-line tools (gdcmconv) and openjph (ojph_compress, for HTJ2K); the reference
#   decoders of the reduced-resolution tests: OpenJPEG's opj_compress/opj_decompress
#   (libopenjp2-tools), libjpeg-turbo's djpeg (libjpeg-turbo-progs), ojph_expand;
# - for tests/python/test_observability.py: promtool (Debian's prometheus package), which
#   checks the daemon's /metrics exposition (the server itself is never started);
# - for tests/python/test_orthanc.py: Orthanc and its Python plugin (orthanc-python), which
#   run the PACS gateway of deploy/orthanc/ (dcmtk's storescu and dsrdump send the images
#   and check the reports; openssl makes the certificates of its mutual TLS case).
#   Installing orthanc may start its system service where systemd runs; the test starts
#   its own Orthanc on free loopback ports and does not use it;
# - for tests/python/test_deploy.py: shellcheck (the container health-check script).
# Fast when they are already there: apt is only touched when a tool is missing.
set -euo pipefail

# tool -> Debian package that ships it.
declare -A wanted=(
  [cmake]=cmake
  [c++]=g++
  [nasm]=nasm
  [dcmconv]=dcmtk
  [gdcmconv]=libgdcm-tools
  [ojph_compress]=openjph-tools
  [opj_decompress]=libopenjp2-tools
  [djpeg]=libjpeg-turbo-progs
  [promtool]=prometheus
  [openssl]=openssl
  [shellcheck]=shellcheck
)

# Files of packages that ship no command on PATH -> Debian package that ships them
# (Orthanc's binary is in /usr/sbin, which a non-root PATH may lack).
declare -A wanted_files=(
  [/usr/sbin/Orthanc]=orthanc
  [/usr/share/orthanc/plugins/libOrthancPython.so]=orthanc-python
)

missing=()
for tool in "${!wanted[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing+=("${wanted[$tool]}")
  fi
done
for file in "${!wanted_files[@]}"; do
  if [ ! -e "$file" ]; then
    missing+=("${wanted_files[$file]}")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

# Root in CI and on developer machines here; fall back to sudo elsewhere.
as_root=()
if [ "$(id -u)" -ne 0 ]; then
  as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
