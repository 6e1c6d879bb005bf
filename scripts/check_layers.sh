#!/usr/bin/env bash
# Checks that #includes follow the layers' one-way dependencies (docs/architecture.md):
#   cli, bench, python -> train -> nn, data, check -> pe -> kernels, io
# (check reads nn's reference attention; nn reads pe and the kernels). Each folder under src/ is a layer,
# and each public header in include/grape/ belongs to the layer that implements it. Run by ctest.
set -euo pipefail
cd "$(dirname "$0")/.."

# The layer of an included path, or nothing for system and third-party headers.
layer_of() {
  case "$1" in
    grape/pe.hpp | grape/law_result.hpp | pe/*) echo pe ;;
    grape/attention.hpp | grape/model.hpp | grape/decode.hpp | nn/*) echo nn ;;
    grape/check.hpp | check/*) echo check ;;
    grape/data.hpp | data/*) echo data ;;
    grape/train.hpp | grape/distributed.hpp | train/*) echo train ;;
    grape/io.hpp | grape/formats.hpp | grape/settings_text.hpp | io/*) echo io ;;
    kernels/*) echo kernels ;;
    cli/*) echo cli ;;
    bench/*) echo bench ;;
    grape/*) echo unknown ;;
  esac
}

# The layers a layer may include (itself always).
allowed() {
  case "$1" in
    kernels) echo "" ;;
    io) echo "" ;;
    pe) echo "kernels io" ;;
    nn) echo "pe kernels io" ;;
    check) echo "nn pe kernels io" ;;
    data) echo "io" ;;
    train) echo "nn data check pe kernels io" ;;
    bench | cli) echo "bench train nn data check pe kernels io" ;;
    python) echo "train nn data check pe kernels io" ;;
  esac
}

# The layer a file belongs to.
file_layer() {
  case "$1" in
    include/grape/*) layer_of "grape/${1#include/grape/}" ;;
    src/*) local rest=${1#src/}; echo "${rest%%/*}" ;;
    bench/*) echo bench ;;
  esac
}

bad=0
while IFS= read -r f; do
  from=$(file_layer "$f")
  [ -n "$from" ] || continue
  ok=" $from $(allowed "$from") "
  while IFS= read -r inc; do
    to=$(layer_of "$inc")
    [ -n "$to" ] || continue
    if [ "$to" = unknown ] || [[ "$ok" != *" $to "* ]]; then
      echo "check_layers: $f ($from) includes $inc ($to)" >&2
      bad=1
    fi
  done < <(sed -n 's/^#include "\([^"]*\)".*/\1/p' "$f")
done < <(git ls-files 'src/*.cpp' 'src/*.hpp' 'include/*.hpp' 'bench/*.cpp' 'bench/*.hpp')
if [ "$bad" -ne 0 ]; then
  echo "check_layers: includes against the layer order (docs/architecture.md)" >&2
  exit 1
fi
echo "check_layers: every include follows the layer order"
