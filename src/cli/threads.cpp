// The default thread pool on a busy machine.
//
// LibTorch's intra-op threads, OpenBLAS (its OpenMP build) and our kernels share one OpenMP pool (libgomp).
// After each parallel region libgomp's idle workers spin for GOMP_SPINCOUNT iterations (300,000 by default,
// about 0.1-1 ms) before they sleep. On a machine where another process keeps a core busy, a spinning worker
// takes the time slice the thread that has work needs: with one of the 2 cores busy, training with 2 threads
// was 2x slower than with 1, and under heavier load 40-95x slower (docs/performance.md). Two measures:
//
// 1. A short spin. libgomp reads GOMP_SPINCOUNT once, when it is loaded, before main and before any code
//    of ours could set it (a setenv from .preinit_array was tried and measured: it comes too late), so
//    `grape` sets it by starting itself again: a function in .preinit_array (run by the dynamic loader
//    before main) execs /proc/self/exe with the variable added; it costs one more load of the libraries
//    (about 0.25 s on the loaded 2-core machine). A value the user set (GOMP_SPINCOUNT or OMP_WAIT_POLICY)
//    is left alone, and so is everything when the exec fails.
// 2. A smaller default pool: the cores this process may use minus those other processes keep busy, counted
//    as the runnable tasks of /proc/loadavg (an instantaneous count, not the 1-minute average, which lags a
//    newly started job by minutes), the least of a few samples, so that a compiler flickering through
//    does not count. --threads N sets the pool and skips the count.
#include "cli/threads.hpp"

#include <fmt/format.h>
#include <sched.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

namespace grape::cli {

namespace {

// libgomp's spin count for grape (see above): a third of its default. Measured on the quiet machine, 10,000
// made batch-1 decode 24% slower than the default (workers slept between its many small parallel regions,
// and even 1 thread was faster), 100,000 is level with it; on a loaded machine the smaller pool is what
// protects (docs/performance.md).
constexpr const char* kSpinCount = "GOMP_SPINCOUNT=100000";

extern "C" void grape_short_spin(int /*argc*/, char** argv, char** envp) {
  if (argv == nullptr || envp == nullptr) return;
  size_t n = 0;
  for (; envp[n] != nullptr; ++n)
    if (std::strncmp(envp[n], "GOMP_SPINCOUNT=", 15) == 0 ||
        std::strncmp(envp[n], "OMP_WAIT_POLICY=", 16) == 0)
      return;  // the user's choice
  auto** env = static_cast<char**>(std::malloc((n + 2) * sizeof(char*)));
  if (env == nullptr) return;
  std::memcpy(env, envp, n * sizeof(char*));
  env[n] = const_cast<char*>(kSpinCount);
  env[n + 1] = nullptr;
  ::execve("/proc/self/exe", argv, env);
  std::free(env);  // the exec failed: run as we are
}

__attribute__((section(".preinit_array"), used)) void (*const grape_preinit)(int, char**,
                                                                             char**) = grape_short_spin;

int usable_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return int(std::max(1u, std::thread::hardware_concurrency()));
}

// Runnable tasks on the machine other than this one: /proc/loadavg's "R/T" field counts the reader too.
int busy_now() {
  std::FILE* f = std::fopen("/proc/loadavg", "r");
  if (f == nullptr) return 0;
  double a, b, c;
  int running = 0, total = 0;
  const int got = std::fscanf(f, "%lf %lf %lf %d/%d", &a, &b, &c, &running, &total);
  std::fclose(f);
  return got == 5 ? std::max(0, running - 1) : 0;
}

}  // namespace

int default_threads() {
  const int cores = usable_cores();
  if (cores == 1) return 1;
  int busy = busy_now();
  for (int i = 0; i < 4 && busy > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    busy = std::min(busy, busy_now());
  }
  return std::max(1, cores - busy);
}

std::string set_threads(int requested) {
  if (requested > 0) {
    torch::set_num_threads(requested);
    return "";
  }
  const int cores = usable_cores(), n = default_threads();
  torch::set_num_threads(n);
  if (n == cores) return "";
  return fmt::format(
      "{} of {} cores are busy with other processes: using {} thread{} (--threads N to choose)", cores - n,
      cores, n, n == 1 ? "" : "s");
}

std::string threads_help() {
  return fmt::format(
      "intra-op threads (default: the {} usable cores minus those other processes keep busy when grape "
      "starts, at least 1)",
      usable_cores());
}

}  // namespace grape::cli
