#!/usr/bin/env bash
# CI (issue 14): the tests without LibTorch (the fused kernels, the file formats) built with AddressSanitizer
# and UndefinedBehaviorSanitizer, in their own build directory; only grape_plain_tests is built there.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-sanitize}
SECONDS=0
# RelWithDebInfo: -O2 -g. Under Debug the tests' double-precision reference loops, unoptimised and instrumented,
# take over 300 s for one test (measured); the kernels keep their -O3 either way, and use no assert().
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGRAPE_SANITIZE=ON >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target grape_plain_tests
# -L plain: the other targets' tests are configured there too but not built.
ctest --test-dir "$BUILD" -L plain -j "$(nproc)" --output-on-failure
echo "scripts/sanitize.sh: ${SECONDS} s wall"
