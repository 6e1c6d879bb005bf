// Where results come from: the version and git commit the binary was built at, the host, the BLAS and the
// thread count, recorded with each run (run.json) and each report (results.json, report.md).
#include <dlfcn.h>
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <nlohmann/json.hpp>

#include "grape/train.hpp"
#include "train/build_info.hpp"

namespace grape::train {

std::string git_commit() { return detail::kGitCommit; }

std::string version() { return fmt::format("{} (git {})", detail::kVersion, detail::kGitCommit); }

std::string blas_description() {
  // OpenBLAS's own entry points, looked up at run time: the BLAS is whatever libblas.so.3 resolved to.
  using config_fn = char* (*)();
  using parallel_fn = int (*)();
  auto config = reinterpret_cast<config_fn>(dlsym(RTLD_DEFAULT, "openblas_get_config"));
  auto parallel = reinterpret_cast<parallel_fn>(dlsym(RTLD_DEFAULT, "openblas_get_parallel"));
  if (!config) return "not OpenBLAS (libblas.so.3 has no openblas_get_config)";
  const int mode = parallel ? parallel() : -1;
  const char* threads = mode == 0 ? "sequential" : mode == 1 ? "pthreads" : mode == 2 ? "OpenMP" : "unknown";
  return fmt::format("{} ({} threads)", config(), threads);
}

std::string provenance_json(const std::string& command) {
  char host[256] = {0};
  if (::gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm utc{};
  gmtime_r(&now, &utc);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &utc);
  const char* spin =
      std::getenv("GOMP_SPINCOUNT");  // how long idle OpenMP workers spin (src/cli/threads.cpp)
  nlohmann::json j = {{"command", command},
                      {"version", detail::kVersion},
                      {"git_commit", detail::kGitCommit},
                      {"host", host},
                      {"blas", blas_description()},
                      {"threads", torch::get_num_threads()},
                      {"gomp_spincount", spin ? spin : ""},
                      {"time", when}};
  return j.dump();
}

}  // namespace grape::train
