// Data-parallel training on c10d: joining a job (TCPStore + ProcessGroupGloo) and bucketed gradient averaging
// that overlaps backward. The single-host launcher behind `grape train --nproc N` is in launcher.cpp.
//
// Debian's libtorch is built with Gloo; its c10d header hides the Gloo process group unless USE_C10D_GLOO
// is defined, so this file (and only this file) defines it before including it.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include "grape/distributed.hpp"

#include <fmt/format.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <csignal>
#include <cstdlib>
#include <mutex>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

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

// ---- agreeing on the job before the first collective -----------------------------------------------

namespace {

std::string store_text(c10d::Store& store, const std::string& key) {
  const auto bytes = store.get(key);
  return std::string(bytes.begin(), bytes.end());
}
void store_put(c10d::Store& store, const std::string& key, const std::string& text) {
  store.set(key, std::vector<uint8_t>(text.begin(), text.end()));
}

// The fields in which two JSON descriptions differ, as "field: A on rank a, B on rank b" (at most five).
std::string describe_difference(const std::string& mine, int my_rank, const std::string& theirs,
                                int their_rank) {
  using nlohmann::json;
  const auto a = json::parse(mine, nullptr, false), b = json::parse(theirs, nullptr, false);
  if (a.is_discarded() || b.is_discarded()) return "unreadable description";
  const auto fa = a.flatten(), fb = b.flatten();
  std::vector<std::string> keys;
  for (const auto& [k, v] : fa.items())
    if (!fb.contains(k) || fb[k] != v) keys.push_back(k);
  for (const auto& [k, v] : fb.items())
    if (!fa.contains(k)) keys.push_back(k);
  std::vector<std::string> parts;
  for (const auto& k : keys) {
    if (parts.size() == 5) {
      parts.push_back(fmt::format("{} more", keys.size() - 5));
      break;
    }
    auto shown = [&](const json& f) { return f.contains(k) ? f[k].dump() : std::string("(absent)"); };
    parts.push_back(fmt::format("{}: {} on rank {}, {} on rank {}", k.substr(1), shown(fa), my_rank,
                                shown(fb), their_rank));
  }
  return fmt::format("{}", fmt::join(parts, "; "));
}

// Every rank publishes `description` under grape/agree/WHAT/RANK. A rank other than 0 compares its own with
// rank 0's at once (so a rank outside rank 0's world is refused too), then waits for rank 0's verdict,
// which names the first rank that differs. Throws std::invalid_argument on any difference. Each rank
// other than 0 marks .../done/RANK when it has read what it needs, and a refusing rank 0 waits (up to
// 10 s) for those marks before it leaves: its exit takes the store down with it.
void agree_through_store(c10d::Store& store, const Env& env, const std::string& what,
                         const std::string& description) {
  const std::string prefix = "grape/agree/" + what + "/";
  store_put(store, prefix + std::to_string(env.rank), description);
  if (env.rank != 0) {
    const auto done = [&] { store_put(store, prefix + "done/" + std::to_string(env.rank), "1"); };
    const auto lead = store_text(store, prefix + "0");
    if (lead != description) {
      done();
      throw std::invalid_argument(fmt::format("rank {}: this rank's {} differs from rank 0's: {}", env.rank,
                                              what, describe_difference(description, env.rank, lead, 0)));
    }
    const auto verdict = store_text(store, prefix + "verdict");
    done();
    if (verdict != "ok") throw std::invalid_argument(fmt::format("rank {}: {}", env.rank, verdict));
    return;
  }
  std::string verdict = "ok";
  for (int r = 1; r < env.world_size && verdict == "ok"; ++r) {
    const auto theirs = store_text(store, prefix + std::to_string(r));
    if (theirs != description)
      verdict = fmt::format("rank {}'s {} differs from rank 0's: {}", r, what,
                            describe_difference(theirs, r, description, 0));
  }
  store_put(store, prefix + "verdict", verdict);
  if (verdict == "ok") return;
  std::vector<std::string> marks;
  for (int r = 1; r < env.world_size; ++r) marks.push_back(prefix + "done/" + std::to_string(r));
  try {
    store.wait(marks, std::chrono::seconds(10));
  } catch (const std::exception&) {  // a rank that never reads the verdict fails by its own timeout
  }
  throw std::invalid_argument(fmt::format("rank 0: {}", verdict));
}

// c10d reports a store that timed out as a c10::Error: one line naming what was awaited.
template <class F>
void with_store_errors(const Env& env, const std::string& what, F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    throw std::runtime_error(fmt::format(
        "rank {}: agreeing on the {} with the other ranks failed ({}); a rank is missing, died, or hung "
        "past GRAPE_DIST_TIMEOUT",
        env.rank, what, e.what_without_backtrace()));
  }
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
  // Store and Gloo failures (address in use, unreachable host, timeout) become one line naming the job.
  auto cannot_join = [&](const std::string& why) {
    return std::runtime_error(fmt::format(
        "rank {}: cannot join the job at {}:{} (world size {}, waited up to {:g} s, "
        "GRAPE_DIST_TIMEOUT): {}",
        env.rank, env.master_addr, env.master_port, env.world_size, double(timeout.count()) / 1000.0, why));
  };
  auto joining = [&](auto&& step) {
    try {
      step();
    } catch (const c10::Error& e) {
      throw cannot_join(e.what_without_backtrace());
    } catch (const std::invalid_argument&) {
      throw;
    } catch (const std::exception& e) {
      throw cannot_join(e.what());
    }
  };
  joining([&] {
    c10d::TCPStoreOptions so;
    so.port = uint16_t(env.master_port);
    so.isServer = env.rank == 0;
    so.numWorkers = size_t(env.world_size);
    so.waitWorkers = false;  // ProcessGroupGloo's own rendezvous waits for every rank, with the timeout
    so.timeout = timeout;
    impl->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    // Before Gloo's own rendezvous, which would wait for ranks that never come: every rank must have the
    // same world size as rank 0 (a difference throws std::invalid_argument, passed on as it is).
    agree_through_store(*impl->store, env, "world size",
                        nlohmann::json{{"WORLD_SIZE", env.world_size}}.dump());
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    opts->devices.push_back(gloo_device(env));
    impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, env.rank, env.world_size, opts);
  });
  return std::shared_ptr<Group>(new Group(std::move(impl)));
}

void Group::agree(const std::string& what, const std::string& description) {
  with_store_errors(impl_->env, what,
                    [&] { agree_through_store(*impl_->store, impl_->env, what, description); });
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

}  // namespace grape::dist
