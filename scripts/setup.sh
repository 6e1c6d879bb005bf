#!/usr/bin/env bash
# Installs the Debian packages grape needs. A quick no-op when they are all present.
set -euo pipefail

PACKAGES=(
  cmake g++ make ccache pkg-config
  clang-format                        # the formatting check of `make test` (.clang-format)
  libtorch-dev libopenblas0-openmp    # tensors/autograd; OpenBLAS on LibTorch's OpenMP threads (see CMakeLists)
  libgtest-dev libgmock-dev           # tests
  libbenchmark-dev                    # benchmarks
  libcli11-dev nlohmann-json3-dev     # CLI parsing, JSON (safetensors headers, reports, configs)
  libtomlplusplus-dev                 # TOML config files
  libfmt-dev                          # formatting
  libsentencepiece-dev                # subword tokenizers
  gnuplot-nox                         # plots in reports
  bible-kjv                           # the default training text
  libgloo-dev                         # headers of the Gloo collectives under c10d (grape train --nproc)
  python3-torch python3-numpy         # the Python package grape (docs/python.md): the same LibTorch, from Python
  pybind11-dev python3-dev python3-pytest   # its extension grape._C, and its tests
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi

echo "setup: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup: error: need root (or sudo) to install: ${missing[*]}" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; }; then
  echo "setup: error: apt-get could not install: ${missing[*]}" >&2
  echo "setup: check the network access to Debian's archive, or install them by hand" >&2
  exit 1
fi
echo "setup: done"
