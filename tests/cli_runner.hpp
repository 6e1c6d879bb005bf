// Runs the `grape` executable built beside the tests and captures its exit code and output.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>

#include "grape/io.hpp"

namespace grape::testing {

struct CliRun {
  int code;            // exit code; -1 when killed by a signal (which also fails the test)
  std::string output;  // stdout and stderr together
};

// `env` is prepended to the command line (e.g. "GRAPE_FAULT=checkpoint").
inline CliRun run_cli(const std::string& args, const std::string& env = "") {
  std::string cmd =
      env + (env.empty() ? "" : " ") + std::string(GRAPE_CLI_PATH) + " --threads 1 " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, pipe)) out.append(buf, n);
  int status = pclose(pipe);
  EXPECT_TRUE(WIFEXITED(status)) << "killed by a signal: " << cmd;
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// A 3-step rope run (1 layer, width 32, context 16) trained by `grape train` on a small text, in `dir`
// (made afresh); returns the run directory. Throws with grape's output when training fails.
inline std::string train_tiny_rope_run(const std::filesystem::path& dir) {
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::string text;
  for (int i = 0; i < 600; ++i) text += (i % 7 ? "the lord said unto moses " : "and aaron in the land.\n");
  io::write_file_atomic((dir / "text.txt").string(), text);
  const std::string run = (dir / "run").string();
  auto t = run_cli(
      "train --set n_layer=1 --set n_embd=32 --set n_head=2 --context 16 --batch 4 --warmup 1 --steps 3 "
      "--eval-every 0 --data " +
      (dir / "text.txt").string() + " --out " + run + " --quiet");
  if (t.code != 0) throw std::runtime_error("training the tiny run failed: " + t.output);
  return run;
}

}  // namespace grape::testing
