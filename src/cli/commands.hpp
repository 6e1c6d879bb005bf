// The `grape` subcommands: each adds itself to the CLI11 app; the callbacks do the work.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace grape::cli {

void add_encodings_command(CLI::App& app);
void add_check_command(CLI::App& app);
void add_pe_command(CLI::App& app);
void add_attn_command(CLI::App& app);
void add_tokenizer_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_eval_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_compare_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_data_command(CLI::App& app);

// The command line this process was started with, as a shell would read it back ("grape train --pe rope
// ..."): recorded in run.json and reports.
const std::string& invocation();

}  // namespace grape::cli
