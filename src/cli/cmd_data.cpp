// `grape data [SPEC]`: what --data accepts (the synthetic tasks with their options), or what one spec holds.
#include <fmt/format.h>

#include "cli/commands.hpp"
#include "grape/data.hpp"

namespace grape::cli {

void add_data_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("data",
                                 "list what --data accepts (synthetic tasks and their options), or "
                                 "describe one data spec");
  struct Args {
    std::string spec, tokenizer = "byte";
    double val_fraction = 0.1;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("spec", a->spec, "a --data spec to open and describe");
  cmd->add_option("--tokenizer", a->tokenizer,
                  "byte | PATH.model | tokenizer.json or vocab.json,merges.txt | none (.bin ids only)")
      ->capture_default_str();
  cmd->add_option("--val-fraction", a->val_fraction, "share held out for validation (without *val* files)")
      ->capture_default_str();
  cmd->callback([a] {
    if (a->spec.empty()) {
      fmt::print(
          "--data accepts:\n"
          "  bible                      the King James Bible (Debian's bible-kjv), prepared once into the "
          "cache\n"
          "  FILE.txt | DIR             UTF-8 text (a directory: its files), documents separated by "
          "end-of-text\n"
          "  FILE.bin | DIR of .bin     nanoGPT uint16 arrays or llm.c shards (*train*/*val* names split "
          "them);\n"
          "                             GPT-2 token files: --tokenizer none --set vocab_size=50304, or a "
          "GPT-2\n"
          "                             tokenizer.json / vocab.json,merges.txt as --tokenizer\n"
          "  {}",
          data::synthetic_tasks_help());
      return;
    }
    std::unique_ptr<data::Tokenizer> tok;
    if (a->tokenizer == "none") {
      const int64_t max_id = data::max_token_id(a->spec);
      tok = data::make_id_tokenizer(max_id + 1);
      fmt::print("largest token id: {}\n", max_id);
    } else {
      tok = data::make_tokenizer(a->tokenizer);
    }
    data::DataOptions opts;
    opts.val_fraction = a->val_fraction;
    auto src = data::open_data(a->spec, *tok, opts);
    fmt::print("{}\nfingerprint: {}\n", src->describe(), src->fingerprint());
  });
}

}  // namespace grape::cli
