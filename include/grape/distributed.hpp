// Data-parallel training across processes on LibTorch's distributed engine (c10d): a TCPStore for the
// rendezvous and ProcessGroupGloo for the collectives. Nothing here opens a socket itself.
//
// A job is described the way torchrun describes it, by environment variables in every worker:
//   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
// Rank 0 serves the TCPStore on MASTER_ADDR:MASTER_PORT; every rank then connects Gloo pairs to every other.
// `grape train --nproc N` (launch_local) starts N workers on this host with exactly these variables set, so
// the same binary also joins a multi-host job started by torchrun, a scheduler or by hand.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace grape::dist {

// Where this process sits in a job.
struct Env {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;
};

// The job described by the environment, or nullopt when RANK and WORLD_SIZE are both unset (one process).
// Partial or malformed settings throw std::invalid_argument naming the variable.
std::optional<Env> env_from_environment();

// How long the rendezvous and every collective may wait for the other ranks before failing with an error:
// GRAPE_DIST_TIMEOUT seconds (default 300; rank 0 writes checkpoints while the others wait, so keep it above
// the time one checkpoint takes). A rank that dies is noticed at once (its sockets close); the timeout
// bounds the wait for a rank that hangs.
std::chrono::milliseconds default_timeout();

// One process's membership of a job (a c10d ProcessGroupGloo). All ranks must call the same collectives
// in the same order. A collective that fails (a rank died, the network failed, the timeout passed) throws
// std::runtime_error naming this rank and the operation.
class Group {
 public:
  static std::shared_ptr<Group> join(const Env& env, std::chrono::milliseconds timeout = default_timeout());
  ~Group();
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  int rank() const;
  int size() const;
  // Checks that every rank describes the job alike before any collective runs: `description` is a JSON
  // object (e.g. the resolved configs); each rank publishes its own through the store and rank 0 compares
  // them. A rank that differs from rank 0 makes every rank throw std::invalid_argument naming the rank and
  // the differing fields (up to five, "lr: 0.001 on rank 1, 0.003 on rank 0"); bounded by the timeout.
  void agree(const std::string& what, const std::string& description);
  // Copies root's tensors into every rank's (in place; CPU tensors of the same shapes on all ranks).
  void broadcast(const std::vector<torch::Tensor>& tensors, int root = 0);
  // Element-wise sum over the ranks, in place (a contiguous CPU tensor).
  void all_reduce_sum(torch::Tensor& t);
  // True on every rank when `flag` is true on any rank.
  bool any(bool flag);
  void barrier();

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  explicit Group(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Averages the gradients of `params` over a group, in buckets: the parameters (in reverse order, the order
// backward usually finishes them) are packed into contiguous buffers of about bucket_bytes, and each
// buffer is all-reduced as one message. After arm(), the next backward pass launches a bucket's all-reduce
// from the autograd engine as soon as all its gradients are accumulated, so communication overlaps the
// rest of backward; finish() launches any bucket that did not complete (unused parameters), waits, and
// writes the averaged gradients back. Buckets are launched in index order on every rank (a collective
// order that differs between ranks would pair the wrong messages).
class GradientSync {
 public:
  GradientSync(std::shared_ptr<Group> group, std::vector<torch::Tensor> params,
               int64_t bucket_bytes = 1 << 20);
  ~GradientSync();
  void arm();
  void finish();
  size_t bucket_count() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// ---- the single-host launcher -----------------------------------------------------------------------

// This process's command line (argv, from /proc/self/cmdline) with `--name VALUE` / `--name=VALUE` removed.
std::vector<std::string> own_arguments_without(const std::string& name);
// A TCP port that was free on 127.0.0.1 a moment ago (bound to port 0 and closed).
int free_port();

// Starts `nproc` copies of this executable (fork + exec of /proc/self/exe) with `args` (args[0] is ignored)
// and RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT=free_port() and
// `extra_env` set, each in its own process group and killed if the launcher dies. SIGINT and SIGTERM sent
// to the launcher are passed on to the workers. When a worker fails (non-zero exit or a signal) the others
// are stopped (SIGTERM, SIGKILL after 10 s) and a report naming each rank's fate goes to stderr.
// Returns 0 when every worker exited 0, 130 when all stopped on Ctrl-C, else 1.
int launch_local(int nproc, const std::vector<std::string>& args,
                 const std::vector<std::pair<std::string, std::string>>& extra_env = {});

}  // namespace grape::dist
