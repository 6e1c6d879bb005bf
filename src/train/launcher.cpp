// The single-host launcher behind `grape train --nproc N`: N copies of this executable (fork + exec of
// /proc/self/exe) with torchrun's variables set, watched until they all end; the first to fail stops the
// others. Separate from distributed.cpp because it needs no c10d: it only starts and watches processes.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "grape/distributed.hpp"
#include "grape/io.hpp"

namespace grape::dist {

std::vector<std::string> own_arguments_without(const std::string& name) {
  const std::string bytes = io::read_file("/proc/self/cmdline");
  std::vector<std::string> all;
  size_t start = 0;
  for (size_t i = 0; i < bytes.size(); ++i)
    if (bytes[i] == '\0') {
      all.push_back(bytes.substr(start, i - start));
      start = i + 1;
    }
  std::vector<std::string> out;
  for (size_t i = 0; i < all.size(); ++i) {
    if (i > 0 && all[i] == name) {
      ++i;  // and its value
      continue;
    }
    if (i > 0 && all[i].rfind(name + "=", 0) == 0) continue;
    out.push_back(all[i]);
  }
  return out;
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    throw std::runtime_error(fmt::format("cannot find a free port: socket: {}", std::strerror(errno)));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const int err = errno;
    ::close(fd);
    throw std::runtime_error(fmt::format("cannot find a free port: {}", std::strerror(err)));
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

namespace {

volatile std::sig_atomic_t g_forward_signal = 0;
extern "C" void remember_signal(int sig) { g_forward_signal = sig; }

std::string fate(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const char* name = sigabbrev_np(WTERMSIG(status));
    return fmt::format("was killed by signal {} (SIG{})", WTERMSIG(status), name ? name : "?");
  }
  return "ended";
}

}  // namespace

int launch_local(int nproc, const std::vector<std::string>& args,
                 const std::vector<std::pair<std::string, std::string>>& extra_env) {
  if (nproc < 1) throw std::invalid_argument(fmt::format("--nproc must be >= 1, got {}", nproc));
  if (const char* rank = std::getenv("RANK"); rank != nullptr && *rank != '\0')
    throw std::invalid_argument(
        "--nproc starts its own workers; this process is already a worker (RANK is set)");
  const int port = free_port();
  // Everything the children need is built before fork: between fork and exec only system calls.
  std::vector<std::string> argv_s(args.begin(), args.end());
  if (argv_s.empty()) argv_s.push_back("grape");
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const size_t n = static_cast<size_t>(nproc);
  std::vector<std::vector<std::string>> envs(n);
  for (int r = 0; r < nproc; ++r) {
    auto& e = envs[size_t(r)];
    for (char** p = environ; *p != nullptr; ++p) {
      const std::string kv(*p);
      const std::string key = kv.substr(0, kv.find('='));
      if (key == "RANK" || key == "LOCAL_RANK" || key == "WORLD_SIZE" || key == "LOCAL_WORLD_SIZE" ||
          key == "MASTER_ADDR" || key == "MASTER_PORT")
        continue;
      e.push_back(kv);
    }
    e.push_back(fmt::format("RANK={}", r));
    e.push_back(fmt::format("LOCAL_RANK={}", r));
    e.push_back(fmt::format("WORLD_SIZE={}", nproc));
    e.push_back(fmt::format("LOCAL_WORLD_SIZE={}", nproc));
    e.push_back("MASTER_ADDR=127.0.0.1");
    e.push_back(fmt::format("MASTER_PORT={}", port));
    for (const auto& [k, v] : extra_env) e.push_back(k + "=" + v);
  }
  std::vector<std::vector<char*>> envp(n);
  for (int r = 0; r < nproc; ++r) {
    for (auto& kv : envs[size_t(r)]) envp[size_t(r)].push_back(kv.data());
    envp[size_t(r)].push_back(nullptr);
  }

  g_forward_signal = 0;
  auto old_int = std::signal(SIGINT, remember_signal);
  auto old_term = std::signal(SIGTERM, remember_signal);
  const pid_t launcher = ::getpid();
  std::vector<pid_t> pids(size_t(nproc), -1);
  std::fflush(stdout);
  std::fflush(stderr);
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      for (pid_t p : pids)
        if (p > 0) ::kill(p, SIGKILL);
      throw std::runtime_error(fmt::format("cannot start worker {}: fork: {}", r, std::strerror(errno)));
    }
    if (pid == 0) {
      // Own process group: a terminal's Ctrl-C reaches the launcher only, which passes it on once.
      ::setpgid(0, 0);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // no orphaned workers if the launcher is killed
      if (::getppid() != launcher) ::_exit(127);
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM, SIG_DFL);
      ::execve("/proc/self/exe", argv.data(), envp[size_t(r)].data());
      ::_exit(127);
    }
    pids[size_t(r)] = pid;
  }
  std::fprintf(stderr, "grape: started %d workers on 127.0.0.1:%d:", nproc, port);
  for (int r = 0; r < nproc; ++r)
    std::fprintf(stderr, " rank %d pid %d%s", r, int(pids[size_t(r)]), r + 1 < nproc ? "," : "\n");
  std::fflush(stderr);

  std::vector<int> status(size_t(nproc), 0);
  std::vector<bool> done(size_t(nproc), false), stopped_by_us(size_t(nproc), false);
  int first_failed = -1, running = nproc;
  std::chrono::steady_clock::time_point kill_at{};
  bool stopping = false;
  auto stop_others = [&](int sig) {
    for (int r = 0; r < nproc; ++r)
      if (!done[size_t(r)]) {
        ::kill(pids[size_t(r)], sig);
        stopped_by_us[size_t(r)] = true;
      }
  };
  while (running > 0) {
    if (g_forward_signal != 0) {
      const int sig = g_forward_signal;
      g_forward_signal = 0;
      for (int r = 0; r < nproc; ++r)
        if (!done[size_t(r)]) ::kill(pids[size_t(r)], sig);
    }
    int st = 0;
    const pid_t pid = ::waitpid(-1, &st, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < nproc; ++r) {
        if (pids[size_t(r)] != pid || done[size_t(r)]) continue;
        done[size_t(r)] = true;
        status[size_t(r)] = st;
        --running;
        const bool ok = WIFEXITED(st) && (WEXITSTATUS(st) == 0 || WEXITSTATUS(st) == 130);
        if (!ok && first_failed < 0 && !stopped_by_us[size_t(r)]) {
          first_failed = r;
          std::fprintf(stderr, "grape: rank %d (pid %d) %s; stopping the other workers\n", r, int(pid),
                       fate(st).c_str());
          std::fflush(stderr);
          stop_others(SIGTERM);
          stopping = true;
          kill_at = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        }
      }
      continue;
    }
    if (pid < 0 && errno != EINTR) break;  // no children left
    if (stopping && std::chrono::steady_clock::now() > kill_at) {
      stop_others(SIGKILL);
      stopping = false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);

  bool all_zero = true, all_interrupted = true;
  for (int r = 0; r < nproc; ++r) {
    const int st = status[size_t(r)];
    all_zero = all_zero && WIFEXITED(st) && WEXITSTATUS(st) == 0;
    all_interrupted = all_interrupted && WIFEXITED(st) && WEXITSTATUS(st) == 130;
  }
  if (all_zero) return 0;
  if (all_interrupted) return 130;
  std::string report = "grape: the job failed:";
  for (int r = 0; r < nproc; ++r)
    report += fmt::format(" rank {} {}{};", r, fate(status[size_t(r)]),
                          r == first_failed          ? " (first)"
                          : stopped_by_us[size_t(r)] ? " (stopped by the launcher)"
                                                     : "");
  report.back() = '\n';
  std::fputs(report.c_str(), stderr);
  return 1;
}

}  // namespace grape::dist
