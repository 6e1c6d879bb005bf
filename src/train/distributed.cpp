// Data-parallel training on c10d: joining a job (TCPStore + ProcessGroupGloo), bucketed gradient averaging
// that overlaps backward, and the single-host launcher behind `grape train --nproc N`.
//
// Debian's libtorch is built with Gloo; its c10d header hides the Gloo process group unless USE_C10D_GLOO
// is defined, so this file (and only this file) defines it before including it.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include "grape/distributed.hpp"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "grape/io.hpp"

namespace grape::dist {

// ---- the job's environment ---------------------------------------------------------------------------

namespace {

std::optional<std::string> env_value(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

int env_int(const char* name, int lo, int hi) {
  const auto v = env_value(name);
  if (!v) throw std::invalid_argument(fmt::format("distributed job: {} is not set", name));
  try {
    size_t used = 0;
    const long long x = std::stoll(*v, &used);
    if (used != v->size() || x < lo || x > hi) throw std::out_of_range(*v);
    return int(x);
  } catch (const std::logic_error&) {
    throw std::invalid_argument(
        fmt::format("distributed job: {}='{}' is not an integer in [{}, {}]", name, *v, lo, hi));
  }
}

}  // namespace

std::optional<Env> env_from_environment() {
  if (!env_value("RANK") && !env_value("WORLD_SIZE")) return std::nullopt;
  Env e;
  e.world_size = env_int("WORLD_SIZE", 1, 1 << 20);
  e.rank = env_int("RANK", 0, e.world_size - 1);
  e.local_rank = env_value("LOCAL_RANK") ? env_int("LOCAL_RANK", 0, e.world_size - 1) : 0;
  if (e.world_size > 1) {
    const auto addr = env_value("MASTER_ADDR");
    if (!addr) throw std::invalid_argument("distributed job: MASTER_ADDR is not set (the host of rank 0)");
    e.master_addr = *addr;
    e.master_port = env_int("MASTER_PORT", 1, 65535);
  }
  return e;
}

std::chrono::milliseconds default_timeout() {
  double seconds = 300;
  if (const auto v = env_value("GRAPE_DIST_TIMEOUT")) {
    try {
      size_t used = 0;
      seconds = std::stod(*v, &used);
      if (used != v->size() || !(seconds > 0)) throw std::out_of_range(*v);
    } catch (const std::logic_error&) {
      throw std::invalid_argument(
          fmt::format("GRAPE_DIST_TIMEOUT='{}' is not a positive number of seconds", *v));
    }
  }
  return std::chrono::milliseconds(int64_t(seconds * 1000));
}

// ---- the process group -------------------------------------------------------------------------------

struct Group::Impl {
  Env env;
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;

  // Waits for one collective; a failure becomes one clear line naming this rank and the operation.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) const {
    try {
      work->wait();
    } catch (const c10::Error& e) {
      throw std::runtime_error(
          fmt::format("rank {}: {} with the other ranks failed ({}); another rank died, "
                      "hung past GRAPE_DIST_TIMEOUT or the network failed",
                      env.rank, what, e.what_without_backtrace()));
    } catch (const std::exception& e) {
      throw std::runtime_error(
          fmt::format("rank {}: {} with the other ranks failed ({}); another rank died, "
                      "hung past GRAPE_DIST_TIMEOUT or the network failed",
                      env.rank, what, e.what()));
    }
  }
};

namespace {

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

// The network device Gloo binds: loopback for a single-host job, GLOO_SOCKET_IFNAME when set (as in
// PyTorch), else the address this host's name resolves to.
std::shared_ptr<::gloo::transport::Device> gloo_device(const Env& env) {
  if (const auto ifname = env_value("GLOO_SOCKET_IFNAME"))
    return c10d::ProcessGroupGloo::createDeviceForInterface(*ifname);
  if (is_loopback(env.master_addr)) return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

}  // namespace

Group::Group(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Group::~Group() = default;

std::shared_ptr<Group> Group::join(const Env& env, std::chrono::milliseconds timeout) {
  if (env.world_size < 1 || env.rank < 0 || env.rank >= env.world_size)
    throw std::invalid_argument(
        fmt::format("distributed job: rank {} is outside world size {}", env.rank, env.world_size));
  // Writing to a peer that died raises SIGPIPE, whose default action kills this process before Gloo can
  // report the error; Python ignores SIGPIPE, which is why PyTorch's workers never see it.
  std::signal(SIGPIPE, SIG_IGN);
  auto impl = std::make_unique<Impl>();
  impl->env = env;
  try {
    c10d::TCPStoreOptions so;
    so.port = uint16_t(env.master_port);
    so.isServer = env.rank == 0;
    so.numWorkers = size_t(env.world_size);
    so.waitWorkers = false;  // ProcessGroupGloo's own rendezvous waits for every rank, with the timeout
    so.timeout = timeout;
    impl->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    opts->devices.push_back(gloo_device(env));
    impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, env.rank, env.world_size, opts);
  } catch (const c10::Error& e) {
    throw std::runtime_error(fmt::format("rank {}: cannot join the job at {}:{} (world size {}): {}",
                                         env.rank, env.master_addr, env.master_port, env.world_size,
                                         e.what_without_backtrace()));
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("rank {}: cannot join the job at {}:{} (world size {}): {}",
                                         env.rank, env.master_addr, env.master_port, env.world_size,
                                         e.what()));
  }
  return std::shared_ptr<Group>(new Group(std::move(impl)));
}

int Group::rank() const { return impl_->env.rank; }
int Group::size() const { return impl_->env.world_size; }

void Group::broadcast(const std::vector<torch::Tensor>& tensors, int root) {
  torch::NoGradGuard no_grad;
  for (const auto& t : tensors) {
    // Gloo needs contiguous tensors; a parameter is, but copy through a buffer in case a view is passed.
    std::vector<torch::Tensor> one = {t.is_contiguous() ? t.detach() : t.detach().contiguous()};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    impl_->wait(impl_->pg->broadcast(one, o), "broadcast");
    if (!t.is_contiguous()) t.detach().copy_(one[0]);
  }
}

void Group::all_reduce_sum(torch::Tensor& t) {
  if (!t.is_contiguous()) throw std::invalid_argument("all_reduce_sum: the tensor must be contiguous");
  std::vector<torch::Tensor> one = {t};
  impl_->wait(impl_->pg->allreduce(one), "all-reduce");
}

bool Group::any(bool flag) {
  auto t = torch::tensor({flag ? 1.0f : 0.0f});
  all_reduce_sum(t);
  return t.item<float>() > 0;
}

void Group::barrier() { impl_->wait(impl_->pg->barrier(), "barrier"); }

// ---- bucketed gradient averaging ---------------------------------------------------------------------

struct GradientSync::Impl {
  struct Bucket {
    std::vector<size_t> params;  // indices into `params`
    std::vector<int64_t> offsets;
    torch::Tensor buffer;  // flat fp32
    size_t pending = 0;    // gradients not yet accumulated in this backward
    bool ready = false, launched = false;
    std::vector<bool> had_grad;  // per member: was its gradient defined on this rank
    c10::intrusive_ptr<c10d::Work> work;
  };
  std::shared_ptr<Group> group;
  std::vector<torch::Tensor> params;
  std::vector<size_t> bucket_of;  // param index -> bucket
  std::vector<Bucket> buckets;
  // The AccumulateGrad nodes must outlive each backward: a variable only holds them weakly, and a node
  // recreated for the next pass would have lost our hook.
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  std::mutex mu;
  bool armed = false;
  size_t next_launch = 0;

  // Copies the bucket's gradients into its buffer and starts the all-reduce (sum).
  void launch(Bucket& b) {
    torch::NoGradGuard no_grad;
    b.had_grad.assign(b.params.size(), false);
    for (size_t j = 0; j < b.params.size(); ++j) {
      const auto& p = params[b.params[j]];
      auto slot = b.buffer.narrow(0, b.offsets[j], p.numel());
      if (p.grad().defined()) {
        slot.copy_(p.grad().reshape({-1}));
        b.had_grad[j] = true;
      } else {
        slot.zero_();  // an unused parameter contributes nothing
      }
    }
    std::vector<torch::Tensor> one = {b.buffer};
    b.work = group->impl().pg->allreduce(one);
    b.launched = true;
  }
  // Launches the ready buckets in index order (the same order on every rank).
  void launch_ready_in_order() {
    while (next_launch < buckets.size() && buckets[next_launch].ready) launch(buckets[next_launch++]);
  }
  void on_accumulated(size_t param) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed) return;
    auto& b = buckets[bucket_of[param]];
    if (b.pending == 0) return;
    if (--b.pending == 0) {
      b.ready = true;
      launch_ready_in_order();
    }
  }
};

GradientSync::GradientSync(std::shared_ptr<Group> group, std::vector<torch::Tensor> params,
                           int64_t bucket_bytes)
    : impl_(std::make_unique<Impl>()) {
  if (!group) throw std::invalid_argument("GradientSync: no process group");
  auto& s = *impl_;
  s.group = std::move(group);
  s.params = std::move(params);
  s.bucket_of.assign(s.params.size(), 0);
  const int64_t cap = std::max<int64_t>(bucket_bytes / int64_t(sizeof(float)), 1);
  // Reverse order: the last layers' gradients are finished first in backward, so their bucket goes first.
  std::vector<int64_t> fill;
  for (size_t r = s.params.size(); r-- > 0;) {
    const auto& p = s.params[r];
    if (p.scalar_type() != torch::kFloat32 || !p.device().is_cpu())
      throw std::invalid_argument("GradientSync: parameters must be float32 CPU tensors");
    if (s.buckets.empty() || (fill.back() > 0 && fill.back() + p.numel() > cap)) {
      s.buckets.emplace_back();
      fill.push_back(0);
    }
    s.buckets.back().params.push_back(r);
    s.buckets.back().offsets.push_back(fill.back());
    fill.back() += p.numel();
    s.bucket_of[r] = s.buckets.size() - 1;
  }
  for (size_t i = 0; i < s.buckets.size(); ++i)
    s.buckets[i].buffer = torch::zeros({fill[i]}, torch::kFloat32);
  Impl* self = impl_.get();
  for (size_t i = 0; i < s.params.size(); ++i) {
    auto acc = torch::autograd::impl::grad_accumulator(s.params[i]);
    if (!acc) throw std::invalid_argument("GradientSync: a parameter does not require gradients");
    acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [self, i](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          self->on_accumulated(i);
          return outputs;
        }));
    s.accumulators.push_back(std::move(acc));
  }
}

GradientSync::~GradientSync() = default;

size_t GradientSync::bucket_count() const { return impl_->buckets.size(); }

void GradientSync::arm() {
  auto& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  for (auto& b : s.buckets) {
    b.pending = b.params.size();
    b.ready = b.launched = false;
    b.work.reset();
  }
  s.next_launch = 0;
  s.armed = true;
}

void GradientSync::finish() {
  auto& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.armed) throw std::logic_error("GradientSync::finish without arm");
    s.armed = false;
    for (auto& b : s.buckets) b.ready = true;  // what backward did not reach is complete as it is
    s.launch_ready_in_order();
  }
  torch::NoGradGuard no_grad;
  const double world = double(s.group->size());
  for (auto& b : s.buckets) {
    s.group->impl().wait(b.work, "the gradient all-reduce");
    b.buffer.div_(world);
    for (size_t j = 0; j < b.params.size(); ++j) {
      if (!b.had_grad[j]) continue;  // unused on every rank (same graph): stays undefined, as in one process
      auto& p = s.params[b.params[j]];
      p.mutable_grad().copy_(b.buffer.narrow(0, b.offsets[j], p.numel()).view_as(p));
    }
    b.work.reset();
  }
}

// ---- the launcher ------------------------------------------------------------------------------------

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
  if (env_value("RANK"))
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
