// Shared by the tests that train small runs: a scratch directory per test holding a small text corpus.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>

#include "grape/io.hpp"
#include "grape/model.hpp"
#include "grape/train.hpp"

namespace grape::testing {

// A small deterministic "language": sentences of words from a 40-word vocabulary (a tiny model starts to
// learn it in a few steps).
inline std::string word_text(size_t bytes) {
  static const char* words[] = {
      "the",  "lord",         "said",      "unto",   "moses",   "and",   "aaron", "in",
      "land", "of",           "egypt",     "saying", "this",    "month", "shall", "be",
      "you",  "beginning",    "months",    "it",     "first",   "year",  "speak", "ye",
      "all",  "congregation", "israel",    "tenth",  "day",     "they",  "take",  "every",
      "man",  "lamb",         "according", "house",  "fathers", "for",   "an",    "light"};
  std::string s;
  uint64_t z = 7;
  while (s.size() < bytes) {
    z = z * 6364136223846793005ull + 1442695040888963407ull;
    s += words[(z >> 33) % 40];
    s += ((z >> 20) % 9 == 0) ? ".\n" : " ";
  }
  return s;
}

// A fresh directory per test (named by suite prefix, pid and test) with `text.txt` of `text_bytes` bytes.
class RunDirTest : public ::testing::Test {
 protected:
  RunDirTest(std::string prefix, size_t text_bytes) : prefix_(std::move(prefix)), text_bytes_(text_bytes) {}
  void SetUp() override {
    dir = std::filesystem::temp_directory_path() /
          (prefix_ + std::to_string(::getpid()) + "_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    io::write_file_atomic(path("text.txt"), word_text(text_bytes_));
  }
  void TearDown() override { std::filesystem::remove_all(dir); }
  std::string path(const std::string& name) const { return (dir / name).string(); }

  std::filesystem::path dir;

 private:
  std::string prefix_;
  size_t text_bytes_;
};

// A RunDirTest with a 1-layer, width-32, context-16 model and a short schedule on `text.txt` (checkpoints
// and validation every `every` steps), trained in-process by train().
class TinyRunTest : public RunDirTest {
 protected:
  TinyRunTest(std::string prefix, size_t text_bytes, int64_t steps, int64_t warmup, int64_t every,
              int64_t eval_batches)
      : RunDirTest(std::move(prefix), text_bytes) {
    model = model_preset("tiny");
    model.n_layer = 1;
    model.n_embd = 32;
    model.n_head = 2;
    model.context = 16;
    cfg.steps = steps;
    cfg.batch = 4;
    cfg.warmup = warmup;
    cfg.lr = 3e-3;
    cfg.eval_every = every;
    cfg.eval_batches = eval_batches;
    cfg.ckpt_every = every;
    cfg.keep_last = 2;
  }
  void SetUp() override {
    RunDirTest::SetUp();
    cfg.data = path("text.txt");
  }
  train::TrainSummary train(const std::string& run, bool resume = false, int64_t stop_after = 0) {
    train::TrainOptions o;
    o.run_dir = path(run);
    o.quiet = true;
    o.resume = resume;
    o.stop_after = stop_after;
    return train::run_training(model, cfg, o);
  }

  ModelConfig model;
  train::TrainConfig cfg;
};

}  // namespace grape::testing
