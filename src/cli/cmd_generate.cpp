// `grape generate`: text from a trained run, printed token by token as it is sampled (KV cache).
#include <fmt/format.h>

#include <chrono>
#include <cstdio>

#include "cli/commands.hpp"
#include "grape/data.hpp"
#include "grape/train.hpp"

namespace grape::cli {

void add_generate_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "generate text from a trained run");
  struct Args {
    std::string run, checkpoint, tokenizer;
    std::vector<std::string> prompts;
    train::SamplingOptions sampling;
    bool crop = false;
    std::string decode = "fast";
    std::string weights = "fp32";
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
  cmd->add_flag("--crop", a->crop,
                "let the model see only the last <training context> tokens, as nanoGPT crops to its block "
                "size (default: the cache keeps every token, which goes beyond the training length)");
  cmd->add_option("--decode", a->decode,
                  "fast: the LibTorch-free decode engine where it supports the model (else the reference "
                  "path, saying why); reference: the LibTorch forward with the KV cache (the oracle)")
      ->check(CLI::IsMember({"fast", "reference"}))
      ->capture_default_str();
  cmd->add_option("--decode-weights", a->weights,
                  "fp32: the model's weights; bf16: the fast path with its matrices rounded to bf16 (fp32 "
                  "sums; docs/decode.md)")
      ->capture_default_str();
  cmd->add_option("--tokenizer", a->tokenizer,
                  "for a run trained on token ids (tokenizer none): the GPT-2 BPE vocabulary to decode and "
                  "encode with, tokenizer.json or vocab.json,merges.txt");
  cmd->callback([a] {
    auto run = train::read_run(a->run);
    auto model = train::load_model(run, a->checkpoint);
    auto tok = train::run_tokenizer(run);
    if (!a->tokenizer.empty()) {
      if (run.tokenizer != "none")
        throw std::invalid_argument(fmt::format(
            "--tokenizer: the run has its own tokenizer ({}); leave the flag out", run.tokenizer));
      tok = data::make_tokenizer(a->tokenizer);
      if (tok->vocab_size() > run.model.vocab_size)
        throw std::invalid_argument(fmt::format("--tokenizer {}: {} ids, more than the model's vocab_size {}",
                                                a->tokenizer, tok->vocab_size(), run.model.vocab_size));
    } else if (run.tokenizer == "none") {
      throw std::invalid_argument(
          "the run was trained on token ids without a tokenizer (--tokenizer none): give the vocabulary the "
          "data was tokenized with, e.g. --tokenizer gpt2/tokenizer.json (or vocab.json,merges.txt)");
    }
    if (tok->eot() < 0)
      throw std::invalid_argument(
          fmt::format("the tokenizer has no end-of-text token (<|endoftext|>) to start a document with"));
    if (a->prompts.empty()) a->prompts.push_back("");
    std::vector<std::vector<int32_t>> ids;
    size_t longest = 0;
    for (const auto& p : a->prompts) {
      std::vector<int32_t> t = {int32_t(tok->eot())};  // every document starts after an end-of-text
      auto body = tok->encode(p);
      t.insert(t.end(), body.begin(), body.end());
      longest = std::max(longest, t.size());
      ids.push_back(t);
    }
    a->sampling.eot = tok->eot();
    if (a->crop) a->sampling.crop = run.model.context;
    a->sampling.decode = parse_decode_path(a->decode, "--decode");
    a->sampling.weights = parse_decode_weights(a->weights, "--decode-weights");
    if (a->sampling.weights == DecodeWeights::bf16 && a->sampling.decode == DecodePath::reference)
      throw std::invalid_argument("--decode-weights bf16 needs --decode fast (the reference path is fp32)");
    const std::string unsupported =
        a->sampling.decode == DecodePath::fast ? fast_decode_unsupported(model) : "";
    const auto t0 = std::chrono::steady_clock::now();
    size_t generated = 0;
    if (a->prompts.size() == 1) {  // one prompt: stream it
      std::fwrite(a->prompts[0].data(), 1, a->prompts[0].size(), stdout);
      train::generate(model, ids, a->sampling, [&](size_t, int32_t id) {
        auto s = tok->piece(id);
        std::fwrite(s.data(), 1, s.size(), stdout);
        std::fflush(stdout);
        ++generated;
      });
      std::fputc('\n', stdout);
    } else {
      auto outs = train::generate(model, ids, a->sampling);
      for (size_t i = 0; i < outs.size(); ++i) {
        fmt::print("--- {} ---\n{}{}\n", i + 1, a->prompts[i], tok->decode(outs[i]));
        generated += outs[i].size();
      }
    }
    std::fflush(stdout);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // On stderr, so that stdout is the text alone.
    fmt::print(stderr,
               "{} tokens in {:.2f} s: {:.1f} tokens/s (prompt{} of up to {} tokens included), decode: {}{}, "
               "weights {}\n",
               generated, s, double(generated) / std::max(s, 1e-9), a->prompts.size() > 1 ? "s" : "", longest,
               unsupported.empty() ? a->decode : "reference",
               unsupported.empty() ? "" : " (" + unsupported + ")", a->weights);
    if (!a->crop && int64_t(longest + generated / a->prompts.size()) > run.model.context)
      fmt::print(stderr,
                 "note: past {} tokens the model read more than its training context (--crop keeps the last "
                 "{})\n",
                 run.model.context, run.model.context);
  });
}

}  // namespace grape::cli
