// grape: the command-line tool. Parses, calls the library, prints; every error is one clear line.
#include <torch/torch.h>

#include <cstdio>
#include <exception>
#include <thread>

#include "cli/commands.hpp"
#include "cli/number_checks.hpp"

int main(int argc, char** argv) {
  CLI::App app{"grape: position encodings for transformer attention (GRAPE and its family)"};
  app.require_subcommand(1);
  app.fallthrough();  // --threads may also follow the subcommand
  int threads = int(std::max(1u, std::thread::hardware_concurrency()));
  app.add_option("--threads", threads, "intra-op threads for LibTorch (default: number of cores)")
      ->check(grape::cli::kPositive);
  app.parse_complete_callback([&] { torch::set_num_threads(threads); });
  grape::cli::add_encodings_command(app);
  grape::cli::add_check_command(app);
  grape::cli::add_pe_command(app);
  grape::cli::add_tokenizer_command(app);
  grape::cli::add_train_command(app);
  grape::cli::add_eval_command(app);
  grape::cli::add_generate_command(app);
  grape::cli::add_compare_command(app);
  grape::cli::add_bench_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const c10::Error& e) {  // LibTorch's own checks: the message without its C++ backtrace
    std::fprintf(stderr, "grape: error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "grape: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
