// `grape bench decode`: decoding tokens/s with the KV cache per preset, on the fast path (the LibTorch-free
// engine), the reference path (forward_cached) or both alternated, against the memory bound: the bytes a
// step reads (weights + KV cache) at the copy bandwidth measured in the same run (docs/performance.md).
#pragma once

#include <CLI/CLI.hpp>

namespace grape::cli {

// Adds the subcommand `decode` to the existing `bench` subcommand.
void add_bench_decode(CLI::App* bench);

}  // namespace grape::cli
