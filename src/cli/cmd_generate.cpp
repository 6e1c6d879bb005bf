// `grape generate`: text from a trained run, printed token by token as it is sampled (KV cache).
#include <fmt/format.h>

#include <cstdio>

#include "cli/commands.hpp"
#include "grape/train.hpp"

namespace grape::cli {

void add_generate_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "generate text from a trained run");
  struct Args {
    std::string run, checkpoint;
    std::vector<std::string> prompts;
    train::SamplingOptions sampling;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--run", a->run, "run directory")->required();
  cmd->add_option("--checkpoint", a->checkpoint, "checkpoint directory (default: the run's latest)");
  cmd->add_option("--prompt", a->prompts, "prompt text (repeat for a batch; default: start of a document)");
  cmd->add_option("--max-tokens", a->sampling.max_tokens, "tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", a->sampling.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", a->sampling.top_k, "keep the k most likely tokens (0: all)")
      ->capture_default_str();
  cmd->add_option("--top-p", a->sampling.top_p, "nucleus sampling mass (1: off)")->capture_default_str();
  cmd->add_option("--seed", a->sampling.seed, "sampling seed")->capture_default_str();
  cmd->callback([a] {
    auto run = train::read_run(a->run);
    auto model = train::load_model(run, a->checkpoint);
    auto tok = train::run_tokenizer(run);
    if (a->prompts.empty()) a->prompts.push_back("");
    std::vector<std::vector<int32_t>> ids;
    for (const auto& p : a->prompts) {
      std::vector<int32_t> t = {int32_t(tok->eot())};  // every document starts after an end-of-text
      auto body = tok->encode(p);
      t.insert(t.end(), body.begin(), body.end());
      ids.push_back(t);
    }
    a->sampling.eot = tok->eot();
    if (a->prompts.size() == 1) {  // one prompt: stream it
      std::fwrite(a->prompts[0].data(), 1, a->prompts[0].size(), stdout);
      train::generate(model, ids, a->sampling, [&](size_t, int32_t id) {
        auto s = tok->piece(id);
        std::fwrite(s.data(), 1, s.size(), stdout);
        std::fflush(stdout);
      });
      std::fputc('\n', stdout);
      return;
    }
    auto outs = train::generate(model, ids, a->sampling);
    for (size_t i = 0; i < outs.size(); ++i)
      fmt::print("--- {} ---\n{}{}\n", i + 1, a->prompts[i], tok->decode(outs[i]));
  });
}

}  // namespace grape::cli
