#!/usr/bin/env bash
# Installs the Debian packages that building, testing and running moelora need.
# Idempotent: does nothing when every package is present; runs `apt-get update` once before
# installing anything that is missing.
set -euo pipefail

packages=(
  build-essential cmake make pkg-config clang-format
  libtorch-dev
  # libtorch's BLAS: without OpenBLAS, libblas.so.3 is the reference BLAS, ~7x slower on CPU.
  libopenblas0-pthread
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libsentencepiece-dev
  prometheus yamllint
  python3  # demo and end-to-end scripts (stdlib only)
)

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
