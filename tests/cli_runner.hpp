// Runs the `grape` executable built beside the tests and captures its exit code and output.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <string>

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

}  // namespace grape::testing
