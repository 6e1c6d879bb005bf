// Shared by the tests that train small runs: a scratch directory per test holding a small text corpus.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>

#include "grape/io.hpp"

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

}  // namespace grape::testing
