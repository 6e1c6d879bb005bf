// Data-parallel training (suite Distributed) and crash-safe runs (suite CrashSafe), through the `grape`
// executable as a user runs it: several processes on 127.0.0.1, SIGKILLs at random moments, damaged
// checkpoints and a write failure while a checkpoint is written. A tiny model so that the file runs in
// well under a minute on two cores.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <thread>

#include "cli_runner.hpp"
#include "distributed_fixture.hpp"
#include "grape/distributed.hpp"
#include "grape/io.hpp"
#include "grape/train.hpp"

namespace {

namespace fs = std::filesystem;
using grape::testing::Clock;
using grape::testing::DistributedBase;
using grape::testing::Proc;
using grape::testing::Reaper;
using grape::testing::run_cli;
using grape::testing::start;
using grape::testing::wait_for;

class Distributed : public DistributedBase {};
class CrashSafe : public DistributedBase {};

// ---- data-parallel ------------------------------------------------------------------------------------

TEST_F(Distributed, TwoProcessesEqualOneProcessWithTheWholeBatch) {
  // Text (every target scored) with gradient accumulation; then a synthetic task whose loss mask scores a
  // different number of targets on each rank (the ranks' means are weighted by their share of targets).
  // adam_eps=1e-6: the two runs sum the same gradients in different orders (fp32 rounding ~1e-7 relative),
  // and with the default eps 1e-8 Adam's g/(|g|+eps) turns that noise in a gradient that is ~0 by
  // cancellation (the embedding row of a byte that never occurs) into a weight difference of up to ~lr
  // (we saw 3.6e-5 after 4 steps at lr 3e-3); eps 1e-6 keeps such near-zero gradients near-zero updates.
  for (const std::string data : {"text", "synthetic:copy"}) {
    SCOPED_TRACE(data);
    auto common = [&](const std::string& out) {
      auto a = tiny(out, 4);
      if (data != "text") {
        a[std::find(a.begin(), a.end(), "--data") - a.begin() + 1] = data;
        a[std::find(a.begin(), a.end(), "--context") - a.begin() + 1] = "32";
      }
      a.insert(a.end(), {"--accum", "2", "--ckpt-every", "2", "--eval-every", "2", "--set", "adam_eps=1e-6"});
      return join(a);
    };
    auto one = run_cli(common("one_" + data.substr(0, 4)) + " --batch 4");
    ASSERT_EQ(one.code, 0) << one.output;
    auto two = run_cli(common("two_" + data.substr(0, 4)) + " --batch 2 --nproc 2", "GRAPE_DIST_TIMEOUT=60");
    ASSERT_EQ(two.code, 0) << two.output;
    const auto ck = "/checkpoints/step_00000004";
    const double diff =
        max_weight_diff(path("one_" + data.substr(0, 4)) + ck, path("two_" + data.substr(0, 4)) + ck);
    EXPECT_LE(diff, 1e-5) << "max abs weight difference after 4 steps";
    std::printf("[          ] %s: max abs weight difference after 4 steps %.3g\n", data.c_str(), diff);
    EXPECT_GT(max_weight_diff(path("one_" + data.substr(0, 4)) + "/checkpoints/step_00000002",
                              path("one_" + data.substr(0, 4)) + ck),
              1e-3)
        << "the weights did not move";
    expect_same_curve("one_" + data.substr(0, 4), "two_" + data.substr(0, 4), 1e-5);
    auto state =
        nlohmann::json::parse(grape::io::read_file(path("two_" + data.substr(0, 4)) + ck + "/state.json"));
    EXPECT_EQ(state["world_size"], 2);
  }
}

TEST_F(Distributed, AWorkerWhosePeerDiesStopsWithAClearErrorInBoundedTime) {
  // Two ranks started by hand, as torchrun or a scheduler would (no --nproc launcher to clean up).
  auto args = tiny("run", 100000);
  args.insert(args.end(), {"--batch", "2", "--ckpt-every", "1000", "--eval-every", "0"});
  const std::string port = std::to_string(grape::dist::free_port());
  std::vector<Proc> ranks;
  for (int r = 0; r < 2; ++r)
    ranks.push_back(start(args, path("rank" + std::to_string(r) + ".log"),
                          {"RANK=" + std::to_string(r), "WORLD_SIZE=2", "LOCAL_RANK=" + std::to_string(r),
                           "MASTER_ADDR=127.0.0.1", "MASTER_PORT=" + port, "GRAPE_DIST_TIMEOUT=20"}));
  Reaper reaper{{ranks[0].pid, ranks[1].pid}};
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (step_records("run") < 3 && Clock::now() < deadline) {
    for (const auto& r : ranks)
      if (int st = wait_for(r, std::chrono::milliseconds(0)); st != -1)
        FAIL() << "a rank ended before training (status " << st << "): " << grape::io::read_file(r.log);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_GE(step_records("run"), 3u) << grape::io::read_file(ranks[0].log)
                                     << grape::io::read_file(ranks[1].log);
  kill(ranks[1].pid, SIGKILL);
  const auto killed = Clock::now();
  const int status = wait_for(ranks[0], std::chrono::seconds(30));
  const double waited = std::chrono::duration<double>(Clock::now() - killed).count();
  waitpid(ranks[1].pid, nullptr, 0);
  if (status == -1) {
    kill(ranks[0].pid, SIGKILL);
    waitpid(ranks[0].pid, nullptr, 0);
    FAIL() << "rank 0 still running 30 s after rank 1 died";
  }
  const auto log = grape::io::read_file(ranks[0].log);
  ASSERT_TRUE(WIFEXITED(status)) << log;
  EXPECT_EQ(WEXITSTATUS(status), 1) << log;
  EXPECT_NE(log.find("grape: error: rank 0:"), std::string::npos) << log;
  EXPECT_NE(log.find("with the other ranks failed"), std::string::npos) << log;
  EXPECT_LT(waited, 25.0) << log;  // a closed connection is noticed at once; 20 s is the timeout bound
  std::printf("[          ] rank 0 stopped %.2f s after rank 1 was killed\n", waited);
}

TEST_F(Distributed, LauncherStopsTheJobWhenAWorkerIsKilledAndResumeContinues) {
  auto args = tiny("run", 100000);
  args.insert(args.end(), {"--batch", "2", "--ckpt-every", "3", "--eval-every", "0", "--nproc", "2"});
  Proc launcher = start(args, path("launcher.log"), {"GRAPE_DIST_TIMEOUT=20"});
  Reaper reaper{{launcher.pid}};
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (step_records("run") < 7 && Clock::now() < deadline) {
    if (int st = wait_for(launcher, std::chrono::milliseconds(0)); st != -1)
      FAIL() << "the launcher ended before training (status " << st
             << "): " << grape::io::read_file(launcher.log);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const std::string early = grape::io::read_file(launcher.log);
  ASSERT_GE(step_records("run"), 7u) << early;
  std::smatch m, m0;
  ASSERT_TRUE(std::regex_search(early, m, std::regex("rank 1 pid (\\d+)"))) << early;
  ASSERT_TRUE(std::regex_search(early, m0, std::regex("rank 0 pid (\\d+)"))) << early;
  const pid_t worker = pid_t(std::stol(m[1])), other = pid_t(std::stol(m0[1]));
  ASSERT_EQ(kill(worker, SIGKILL), 0);
  const auto killed = Clock::now();
  const int status = wait_for(launcher, std::chrono::seconds(30));
  const double waited = std::chrono::duration<double>(Clock::now() - killed).count();
  if (status == -1) {
    kill(launcher.pid, SIGKILL);
    waitpid(launcher.pid, nullptr, 0);
    FAIL() << "the launcher still running 30 s after rank 1 died";
  }
  const auto log = grape::io::read_file(launcher.log);
  ASSERT_TRUE(WIFEXITED(status)) << log;
  EXPECT_EQ(WEXITSTATUS(status), 1) << log;
  EXPECT_NE(log.find("rank 1 (pid " + std::to_string(worker) + ") was killed by signal 9 (SIGKILL)"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("grape: the job failed:"), std::string::npos) << log;
  EXPECT_LT(waited, 25.0) << log;
  EXPECT_EQ(kill(worker, 0), -1);  // no worker is left behind
  EXPECT_EQ(kill(other, 0), -1);
  // Restarted with --resume: continues from the last checkpoint to a new budget.
  const auto ck = grape::train::latest_checkpoint(path("run"));
  const int64_t at = std::stoll(fs::path(ck).filename().string().substr(5));
  EXPECT_GE(at, 6);
  EXPECT_EQ(at % 3, 0);
  const int64_t target = at + 4;
  auto r = run_cli(
      "train --resume --nproc 2 --steps " + std::to_string(target) + " --out " + path("run") + " --quiet",
      "GRAPE_DIST_TIMEOUT=20");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(grape::train::latest_checkpoint(path("run")),
            path(fmt::format("run/checkpoints/step_{:08d}", target)));
  // One record per step 1..target, no repeats: the resumed rank 0 dropped the records after the checkpoint.
  int64_t expect = 1;
  for (const auto& rec : metrics("run"))
    if (rec.contains("loss")) EXPECT_EQ(rec["step"].get<int64_t>(), expect++);
  EXPECT_EQ(expect, target + 1);
}

TEST_F(Distributed, BadJobEnvironmentAndFlagsGetOneClearLine) {
  auto r = run_cli(join(tiny("run", 2)) + " --batch 2", "RANK=3 WORLD_SIZE=2");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("RANK='3' is not an integer in [0, 1]"), std::string::npos) << r.output;
  r = run_cli(join(tiny("run", 2)) + " --batch 2", "RANK=0 WORLD_SIZE=2 MASTER_ADDR= MASTER_PORT=1");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("MASTER_ADDR is not set"), std::string::npos) << r.output;
  r = run_cli(join(tiny("run", 2)) + " --batch 2 --nproc 2", "RANK=0 WORLD_SIZE=1");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("already a worker"), std::string::npos) << r.output;
  r = run_cli(join(tiny("run", 2)) + " --batch 2 --nproc 0");
  EXPECT_NE(r.code, 0) << r.output;
  // A rank that cannot reach rank 0 gives up after the timeout with an error naming the address.
  r = run_cli(join(tiny("run", 2)) + " --batch 2",
              "RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=9 GRAPE_DIST_TIMEOUT=2");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("rank 1: cannot join the job at 127.0.0.1:9"), std::string::npos) << r.output;
}

// ---- crash-safe runs ----------------------------------------------------------------------------------

TEST_F(CrashSafe, DamagedLatestCheckpointIsRefusedAndResumeFallsBack) {
  auto flags = join(tiny("ref", 8)) + " --batch 4 --ckpt-every 2 --eval-every 4 --set keep_last=3";
  ASSERT_EQ(run_cli(flags).code, 0);
  auto damaged = flags;
  damaged.replace(damaged.find(path("ref")), path("ref").size(), path("run"));
  ASSERT_EQ(run_cli(damaged).code, 0);
  const std::string ck8 = path("run/checkpoints/step_00000008"), ck6 = path("run/checkpoints/step_00000006");

  // One flipped byte in the latest weights: refused by name wherever it is loaded.
  std::string bytes = grape::io::read_file(ck8 + "/model.safetensors");
  bytes[bytes.size() / 2] ^= 0x10;
  grape::io::write_file_atomic(ck8 + "/model.safetensors", bytes);
  auto ev = run_cli("eval --run " + path("run"));
  EXPECT_EQ(ev.code, 1) << ev.output;
  EXPECT_NE(ev.output.find("step_00000008/model.safetensors: checksum mismatch"), std::string::npos)
      << ev.output;
  // And the one before it truncated: --resume passes over both, says so, and continues from step 4.
  const std::string opt = grape::io::read_file(ck6 + "/optimizer.pt");
  grape::io::write_file_atomic(ck6 + "/optimizer.pt", opt.substr(0, opt.size() / 3));
  auto r = run_cli("train --resume --out " + path("run") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("passed over: " + ck8 + "/model.safetensors: checksum mismatch"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("passed over: " + ck6 + "/optimizer.pt: checksum mismatch"), std::string::npos)
      << r.output;
  EXPECT_NE(
      r.output.find("falling back to the previous good checkpoint " + path("run/checkpoints/step_00000004")),
      std::string::npos)
      << r.output;
  expect_same_curve("ref", "run", 0);
  EXPECT_EQ(max_weight_diff(path("ref/checkpoints/step_00000008"), ck8), 0.0);

  // A truncated state.json and a `latest` naming a missing directory are passed over too.
  const std::string state = grape::io::read_file(ck8 + "/state.json");
  grape::io::write_file_atomic(ck8 + "/state.json", state.substr(0, state.size() / 2));
  r = run_cli("train --resume --out " + path("run") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("state.json: not valid JSON"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("falling back to the previous good checkpoint " + ck6), std::string::npos)
      << r.output;
  expect_same_curve("ref", "run", 0);

  // Every checkpoint damaged: a clear refusal that lists each one, not a silent restart.
  for (const auto& e : fs::directory_iterator(path("run/checkpoints")))
    if (e.is_directory()) fs::remove(e.path() / "state.json");
  r = run_cli("train --resume --out " + path("run") + " --quiet");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("no usable checkpoint; every one is damaged"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("step_00000006: not a checkpoint (no state.json)"), std::string::npos) << r.output;
}

TEST_F(CrashSafe, KilledAtRandomMomentsTwentyTimesTheRunResumesToTheSameCurve) {
  // Checkpoints every 2 steps (kept 2) and validation every 25: kills land in start-up, in steps, in
  // metrics appends and in checkpoint writes. Each time the run is continued with --resume (or started
  // again if it was killed before run.json existed); the finished run must equal an uninterrupted one.
  const int64_t steps = 300;
  auto base = tiny("ref", steps);
  base.insert(base.end(), {"--batch", "4", "--ckpt-every", "2", "--eval-every", "25"});
  const auto t0 = Clock::now();
  ASSERT_EQ(run_cli(join(base)).code, 0);
  const double total = std::chrono::duration<double>(Clock::now() - t0).count();
  double train_s = 0;
  for (const auto& rec : metrics("ref"))
    if (rec.contains("time_s")) train_s = rec["time_s"].get<double>();
  const double startup = std::max(0.05, total - train_s);
  // Half the kills (by a coin) come at a random time up to start-up + ~6 steps, mostly in start-up; the
  // others a random 0..1 step after the run has logged 1..6 steps beyond where the previous one stopped,
  // in steps, metrics appends and checkpoint writes. Either way a run is killed by then, so 20 kills cannot
  // finish the run (each gains at most 6 + 2 steps) however fast or loaded the machine is.
  const double per_step = train_s / double(steps);
  const double window = startup + 6.0 * per_step;
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<double> delay(0.0, window), jitter(0.0, per_step);
  std::uniform_int_distribution<int64_t> ahead(1, 6);
  std::bernoulli_distribution by_time(0.5);
  auto last_step = [&] {
    int64_t last = 0;
    for (const auto& rec : metrics("run"))
      if (rec.is_object() && rec.contains("loss")) last = rec["step"].get<int64_t>();
    return last;
  };

  auto fresh = base;
  fresh[std::find(fresh.begin(), fresh.end(), path("ref")) - fresh.begin()] = path("run");
  const std::vector<std::string> resume = {"train", "--resume", "--out", path("run"), "--quiet"};
  int kills = 0, cycles = 0, in_startup = 0;
  bool finished = false;
  while (!finished && cycles < 200) {
    ++cycles;
    const bool exists = fs::exists(path("run/run.json"));
    const int64_t before = last_step();
    const auto t_start = Clock::now();
    Proc p = start(exists ? resume : fresh, path("cycle.log"));
    int status = -1;
    if (kills < 20) {
      const auto kill_at = t_start + (by_time(rng) ? std::chrono::microseconds(int64_t(delay(rng) * 1e6))
                                                   : std::chrono::microseconds(60'000'000));
      const int64_t stop_at = before + ahead(rng);
      bool logged = false;
      while (Clock::now() < kill_at && status == -1) {
        status = wait_for(p, std::chrono::milliseconds(0));
        if (status == -1 && last_step() >= stop_at) {
          std::this_thread::sleep_for(std::chrono::microseconds(int64_t(jitter(rng) * 1e6)));
          logged = true;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      if (status == -1) status = wait_for(p, std::chrono::milliseconds(0));
      if (status == -1) {
        kill(p.pid, SIGKILL);
        waitpid(p.pid, nullptr, 0);
        ++kills;
        in_startup += (!logged && last_step() <= before) ? 1 : 0;
        continue;
      }
    } else {
      status = wait_for(p, std::chrono::seconds(120));
    }
    const auto log = grape::io::read_file(p.log);
    if (status == -1) {
      kill(p.pid, SIGKILL);
      waitpid(p.pid, nullptr, 0);
      FAIL() << "the last run did not finish in 120 s: " << log;
    }
    ASSERT_TRUE(WIFEXITED(status)) << log;
    ASSERT_EQ(WEXITSTATUS(status), 0) << "cycle " << cycles << " after " << kills << " kills: " << log;
    finished = kills >= 20;
    ASSERT_TRUE(finished) << "the run finished after only " << kills << " kills (window " << window << " s)";
  }
  std::printf("[          ] %d SIGKILLs (%d before a new step was logged), %d starts\n", kills, in_startup,
              cycles);
  EXPECT_GE(kills, 20);
  ASSERT_TRUE(finished);
  expect_same_curve("ref", "run", 0);
  const auto end = fmt::format("/checkpoints/step_{:08d}", steps);
  EXPECT_EQ(max_weight_diff(path("ref") + end, path("run") + end), 0.0);
}

TEST_F(CrashSafe, WriteFailureWhileCheckpointingLeavesThePreviousCheckpoint) {
  auto flags = tiny("run", 4);
  flags.insert(flags.end(), {"--batch", "4", "--ckpt-every", "2"});
  ASSERT_EQ(run_cli(join(flags)).code, 0);
  const auto before = grape::io::read_file(path("run/checkpoints/step_00000004/model.safetensors"));
  // Files may grow to 120 kB: the weights (~83 kB) fit, the optimizer state (~170 kB) does not.
  Proc p = start({"train", "--resume", "--steps", "6", "--out", path("run"), "--quiet"}, path("full.log"), {},
                 120000);
  const int status = wait_for(p, std::chrono::seconds(60));
  ASSERT_NE(status, -1);
  const auto log = grape::io::read_file(p.log);
  ASSERT_TRUE(WIFEXITED(status)) << log;
  EXPECT_EQ(WEXITSTATUS(status), 1) << log;
  EXPECT_NE(log.find("cannot write checkpoint step_00000006"), std::string::npos) << log;
  EXPECT_NE(log.find("File too large"), std::string::npos) << log;
  EXPECT_NE(log.find("the previous checkpoint " + path("run/checkpoints/step_00000004") + " is intact"),
            std::string::npos)
      << log;
  EXPECT_EQ(grape::train::latest_checkpoint(path("run")), path("run/checkpoints/step_00000004"));
  EXPECT_FALSE(fs::exists(path("run/checkpoints/step_00000006")));
  EXPECT_FALSE(fs::exists(path("run/checkpoints/.tmp.step_00000006")));
  EXPECT_EQ(grape::io::read_file(path("run/checkpoints/step_00000004/model.safetensors")), before);
  auto run = grape::train::read_run(path("run"));
  EXPECT_NO_THROW(grape::train::load_model(run));
  // With room again, the run continues from step 4.
  auto again = run_cli("train --resume --steps 6 --out " + path("run") + " --quiet");
  ASSERT_EQ(again.code, 0) << again.output;
  EXPECT_EQ(grape::train::latest_checkpoint(path("run")), path("run/checkpoints/step_00000006"));
}

}  // namespace
