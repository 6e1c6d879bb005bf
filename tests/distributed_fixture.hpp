// Shared by the tests that run several `grape train` processes (test_distributed.cpp on 127.0.0.1,
// test_multihost.cpp across network namespaces): starting a process directly (optionally inside a network
// namespace), reaping it, and a fixture with a tiny model, the run's metrics and checkpoint comparisons.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "cli_runner.hpp"
#include "grape/io.hpp"
#include "run_dir_fixture.hpp"

namespace grape::testing {

using Clock = std::chrono::steady_clock;

// A `grape` process started directly (fork + exec, so that a signal reaches grape itself), its output in
// a log file.
struct Proc {
  pid_t pid = -1;
  std::string log;
};

// Starts GRAPE_CLI_PATH --threads 1 ARGS with `env` added to this process's environment. `netns`: the
// name of a network namespace (/var/run/netns/NAME) the process runs in, as `ip netns exec` would do.
inline Proc start(const std::vector<std::string>& args, const std::string& log,
                  const std::vector<std::string>& env = {}, long file_size_limit = 0,
                  const std::string& netns = "") {
  std::vector<std::string> argv_s = {GRAPE_CLI_PATH, "--threads", "1"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char** p = environ; *p != nullptr; ++p) env_s.push_back(*p);
  env_s.insert(env_s.end(), env.begin(), env.end());
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  const std::string ns_path = "/var/run/netns/" + netns;
  std::fflush(stdout);  // else the child would write our buffered output a second time
  const pid_t pid = fork();
  if (pid == 0) {
    FILE* out = std::freopen(log.c_str(), "w", stdout);
    if (out == nullptr || dup2(fileno(stdout), 2) < 0) _exit(126);
    if (!netns.empty()) {
      const int fd = open(ns_path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
        std::perror(("setns " + ns_path).c_str());
        _exit(125);
      }
    }
    if (file_size_limit > 0) {
      // A write past the limit fails with EFBIG (the signal it would raise is ignored): a write failure
      // from the kernel, as a full disk gives, for a process that is not allowed to mount a small tmpfs.
      rlimit r{rlim_t(file_size_limit), rlim_t(file_size_limit)};
      setrlimit(RLIMIT_FSIZE, &r);
      signal(SIGXFSZ, SIG_IGN);
    }
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  return {pid, log};
}

// Kills (SIGKILL) and reaps the processes still running when a test ends early.
struct Reaper {
  std::vector<pid_t> pids;
  ~Reaper() {
    for (pid_t p : pids)
      if (waitpid(p, nullptr, WNOHANG) == 0) {
        kill(p, SIGKILL);
        waitpid(p, nullptr, 0);
      }
  }
};

// Waits up to `limit` for the process; returns its wait status, or -1 when it is still running.
inline int wait_for(const Proc& p, std::chrono::milliseconds limit) {
  const auto deadline = Clock::now() + limit;
  for (;;) {
    int status = 0;
    if (waitpid(p.pid, &status, WNOHANG) == p.pid) return status;
    if (Clock::now() > deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

class DistributedBase : public RunDirTest {
 protected:
  explicit DistributedBase(std::string prefix = "grape_dist_test_") : RunDirTest(std::move(prefix), 40000) {}
  // The model and schedule every test uses (the batch is added per test).
  std::vector<std::string> tiny(const std::string& out, int64_t steps) const {
    return {"train",
            "--set",
            "n_layer=1",
            "--set",
            "n_embd=32",
            "--set",
            "n_head=2",
            "--context",
            "16",
            "--warmup",
            "2",
            "--lr",
            "3e-3",
            "--data",
            path("text.txt"),
            "--set",
            "eval_batches=2",
            "--steps",
            std::to_string(steps),
            "--out",
            path(out),
            "--quiet"};
  }
  static std::string join(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& a : v) s += " " + a;
    return s;
  }
  std::vector<nlohmann::json> metrics(const std::string& run) const {
    std::vector<nlohmann::json> out;
    std::ifstream in(path(run) + "/metrics.jsonl");
    std::string line;
    while (std::getline(in, line))
      if (!line.empty()) out.push_back(nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false));
    return out;
  }
  size_t step_records(const std::string& run) const {
    size_t n = 0;
    for (const auto& r : metrics(run)) n += r.is_object() && r.contains("loss") ? 1 : 0;
    return n;
  }
  // Every per-step record equal: step, loss, lr, gradient norm, validation loss (not the timings).
  void expect_same_curve(const std::string& a_run, const std::string& b_run, double tol) const {
    auto a = metrics(a_run), b = metrics(b_run);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(a[i]["step"], b[i]["step"]) << "record " << i;
      for (const char* key : {"loss", "val_loss", "grad_norm", "lr"}) {
        ASSERT_EQ(a[i].contains(key), b[i].contains(key)) << key << " at " << a[i]["step"];
        if (!a[i].contains(key)) continue;
        if (tol == 0)
          EXPECT_EQ(a[i][key].get<double>(), b[i][key].get<double>()) << key << " at " << a[i]["step"];
        else
          EXPECT_NEAR(a[i][key].get<double>(), b[i][key].get<double>(), tol) << key << " at " << a[i]["step"];
      }
    }
  }
  static double max_weight_diff(const std::string& ck_a, const std::string& ck_b) {
    auto wa = io::read_safetensors(ck_a + "/model.safetensors");
    auto wb = io::read_safetensors(ck_b + "/model.safetensors");
    EXPECT_EQ(wa.size(), wb.size());
    double diff = 0;
    for (const auto& [name, t] : wa) diff = std::max(diff, (t - wb.at(name)).abs().max().item<double>());
    return diff;
  }
};

}  // namespace grape::testing
