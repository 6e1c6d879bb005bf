// grape: the command-line tool. Parses, calls the library, prints; every error is one clear line.
#include <fmt/format.h>
#include <malloc.h>
#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "cli/commands.hpp"
#include "cli/threads.hpp"
#include "grape/settings_text.hpp"
#include "grape/train.hpp"

namespace grape::cli {

namespace {
std::string g_invocation;

// A word as a POSIX shell reads it back: bare when it is plain, else single-quoted.
std::string shell_word(const std::string& s) {
  bool plain = !s.empty();
  for (char c : s)
    plain &= (std::isalnum(static_cast<unsigned char>(c)) != 0) ||
             std::string("-_./=:,+@%").find(c) != std::string::npos;
  if (plain) return s;
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

const CLI::App* find_subcommand(const CLI::App* app, const std::string& name) {
  for (const auto* sub : app->get_subcommands([](const CLI::App*) { return true; }))
    if (sub->check_name(name)) return sub;
  return nullptr;
}

// The deepest subcommand that argv names.
const CLI::App* named_command(const CLI::App& app, int argc, char** argv) {
  const CLI::App* at = &app;
  for (int i = 1; i < argc; ++i)
    if (const auto* sub = find_subcommand(at, argv[i])) at = sub;
  return at;
}

std::vector<std::string> names_of(const CLI::App* app, bool commands) {
  std::vector<std::string> out;
  if (commands) {
    for (const auto* sub : app->get_subcommands([](const CLI::App*) { return true; }))
      out.push_back(sub->get_name());
  } else {
    for (const CLI::App* a = app; a != nullptr; a = a->get_parent())
      for (const auto* opt : a->get_options())
        for (const auto& n : opt->get_lnames()) out.push_back("--" + n);
  }
  return out;
}

// CLI11's "The following arguments were not expected: trian" with what the user probably meant.
std::string suggestion(const CLI::App& app, int argc, char** argv) {
  const CLI::App* at = named_command(app, argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--", 0) == 0) {
      const std::string name = arg.substr(0, arg.find('='));
      const auto known = names_of(at, false);
      if (std::find(known.begin(), known.end(), name) == known.end())
        if (auto best = closest_name(name, known); !best.empty())
          return fmt::format("unknown option {} (did you mean {}?)", name, best);
    }
  }
  // The first word that is neither an option nor an option's value, where a command was expected.
  const auto commands = names_of(at, true);
  if (commands.empty()) return "";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.empty() || arg[0] == '-' || find_subcommand(at, arg) != nullptr) continue;
    if (i > 1 && std::string(argv[i - 1]).rfind("--", 0) == 0 &&
        std::string(argv[i - 1]).find('=') == std::string::npos)
      continue;  // an option's value (e.g. --threads 2)
    std::string list;
    for (const auto& c : commands) list += (list.empty() ? "" : ", ") + c;
    return fmt::format("unknown command '{}' ({}commands: {})", arg, did_you_mean(arg, commands), list);
  }
  return "";
}

}  // namespace

const std::string& invocation() { return g_invocation; }

}  // namespace grape::cli
#include "cli/number_checks.hpp"

// Keeps freed memory in the process for the next use: glibc returns big blocks to the system (munmap, or a
// trim of the heap's top) and every training step then page-faults its activations in again, ~10% of a
// `small` step in perf; measured +17% tokens/s on tiny, +7% on small (docs/performance.md). 32 MiB is the
// largest mmap threshold glibc accepts on 64-bit; larger blocks are still mapped and unmapped.
// Settings the user made (glibc's MALLOC_*_ variables or tunables) are theirs.
namespace {
void keep_freed_memory() {
  for (const char* user : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"})
    if (std::getenv(user) != nullptr) return;
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
}
}  // namespace

int main(int argc, char** argv) {
  keep_freed_memory();
  for (int i = 0; i < argc; ++i)
    grape::cli::g_invocation +=
        (i ? " " : "") + (i == 0 ? std::string("grape") : grape::cli::shell_word(argv[i]));
  CLI::App app{"grape: position encodings for transformer attention (GRAPE and its family)"};
  app.require_subcommand(1);
  app.fallthrough();  // --threads may also follow the subcommand
  app.set_version_flag("--version", "grape " + grape::train::version());
  int threads = 0;
  app.add_option("--threads", threads, grape::cli::threads_help())->check(grape::cli::kPositive);
  app.parse_complete_callback([&] {
    const std::string note = grape::cli::set_threads(threads);
    // Said where it matters: the commands that compute for long.
    for (const char* heavy : {"train", "eval", "generate", "compare", "bench"})
      if (!note.empty() && app.got_subcommand(heavy)) std::fprintf(stderr, "grape: %s\n", note.c_str());
  });
  grape::cli::add_encodings_command(app);
  grape::cli::add_check_command(app);
  grape::cli::add_pe_command(app);
  grape::cli::add_attn_command(app);
  grape::cli::add_tokenizer_command(app);
  grape::cli::add_data_command(app);
  grape::cli::add_train_command(app);
  grape::cli::add_eval_command(app);
  grape::cli::add_generate_command(app);
  grape::cli::add_compare_command(app);
  grape::cli::add_bench_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() != 0 && (dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr ||
                                   dynamic_cast<const CLI::RequiredError*>(&e) != nullptr)) {
      if (const auto hint = grape::cli::suggestion(app, argc, argv); !hint.empty()) {
        std::fprintf(stderr, "grape: error: %s\nRun with --help for more information.\n", hint.c_str());
        return e.get_exit_code();
      }
    }
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
