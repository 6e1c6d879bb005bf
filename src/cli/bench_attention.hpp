// `grape bench attention`: fused vs LibTorch-composed attention per encoding, beside this machine's sgemm
// GFLOP/s and copy bandwidth measured in the same run.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace grape::cli {

// Adds the subcommand `attention` to the existing `bench` subcommand.
void add_bench_attention(CLI::App* bench);

}  // namespace grape::cli
