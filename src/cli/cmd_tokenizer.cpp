// `grape tokenizer train|encode`: train a SentencePiece model on text files (or the Bible), show encodings.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>

#include "cli/commands.hpp"
#include "grape/data.hpp"

namespace grape::cli {

namespace {

void run_train(data::SentencePieceTraining settings) {
  // "bible" is the cached Bible text, so `--input bible` trains on the default data.
  for (auto& in : settings.inputs) {
    if (in != "bible") continue;
    (void)data::bible_text({});
    in = data::cache_dir({}) + "/bible-kjv.txt";
  }
  const auto start = std::chrono::steady_clock::now();
  data::train_sentencepiece(settings);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  auto tok = data::load_sentencepiece(settings.out_path);
  fmt::print("wrote {}: {} model, vocab {} (end-of-text id {}), trained on {} in {:.1f} s\n",
             settings.out_path, settings.model_type, tok->vocab_size(), tok->eot(),
             fmt::join(settings.inputs, ", "), seconds);
}

void run_encode(const std::string& spec, const std::string& text, bool pieces) {
  auto tok = data::make_tokenizer(spec);
  auto ids = tok->encode(text);
  fmt::print("{}\n", fmt::join(ids, " "));
  if (pieces) {
    std::vector<std::string> shown;
    for (int32_t id : ids) shown.push_back(fmt::format("{:?}", tok->piece(id)));
    fmt::print("{}\n", fmt::join(shown, " "));
  }
  fmt::print("{} bytes -> {} tokens ({}, vocab {})\n", text.size(), ids.size(), tok->kind(),
             tok->vocab_size());
}

}  // namespace

void add_tokenizer_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenizer", "train a SentencePiece tokenizer, or show how text is encoded");
  cmd->require_subcommand(1);

  auto settings = std::make_shared<data::SentencePieceTraining>();
  auto* train =
      cmd->add_subcommand("train", "train a SentencePiece model (byte fallback: every text encodes)");
  train
      ->add_option(
          "--input", settings->inputs,
          "text files, one sentence per line (\"bible\": the Bible text; comma-separated or repeated)")
      ->delimiter(',')
      ->required();
  train
      ->add_option("--vocab", settings->vocab_size,
                   "vocabulary size, end-of-text and 256 byte pieces included")
      ->required();
  train->add_option("--model-type", settings->model_type, "bpe or unigram")
      ->check(CLI::IsMember({"bpe", "unigram"}))
      ->capture_default_str();
  train->add_option("--max-sentences", settings->max_sentences, "input lines sampled for training")
      ->capture_default_str();
  train->add_option("--out", settings->out_path, "the .model file to write")->required();
  train->callback([settings] { run_train(*settings); });

  struct EncodeArgs {
    std::string tokenizer = "byte", text;
    bool pieces = false;
  };
  auto a = std::make_shared<EncodeArgs>();
  auto* encode = cmd->add_subcommand("encode", "print the token ids of a text");
  encode
      ->add_option("--tokenizer,-t", a->tokenizer,
                   "\"byte\", a SentencePiece .model, or a GPT-2 BPE tokenizer.json / vocab.json,merges.txt")
      ->capture_default_str();
  encode->add_option("--text", a->text, "the text to encode")->required();
  encode->add_flag("--pieces", a->pieces, "also print each token's text");
  encode->callback([a] { run_encode(a->tokenizer, a->text, a->pieces); });
}

}  // namespace grape::cli
