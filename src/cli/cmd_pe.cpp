// `grape pe logits`: causal pre-softmax logits of one sequence under an encoding, from and to .npy files,
// so that other implementations can be cross-checked against grape.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <stdexcept>

#include "cli/commands.hpp"
#include "cli/number_checks.hpp"
#include "grape/io.hpp"
#include "grape/pe.hpp"

namespace grape::cli {
namespace {

struct LogitsArgs {
  std::string encoding, q, k, x, weights, out;
  std::vector<std::string> sets;
  int64_t offset = 0;
  uint64_t seed = 0;
};

void load_weights(Encoding& enc, const std::string& path) {
  auto params = enc.named_parameters();
  std::vector<std::string> known;
  for (const auto& p : params) known.push_back(p.key());
  torch::NoGradGuard ng;
  for (const auto& [name, value] : io::read_safetensors(path)) {
    auto* p = params.find(name);
    if (!p)
      throw std::invalid_argument(
          fmt::format("{}: tensor '{}' is not a parameter of {} (its parameters: {})", path, name, enc.name(),
                      known.empty() ? "none" : fmt::format("{}", fmt::join(known, ", "))));
    if (!p->sizes().equals(value.sizes()))
      throw std::invalid_argument(fmt::format("{}: tensor '{}' has shape {}, {} expects {}", path, name,
                                              shape_string(value), enc.name(), shape_string(*p)));
    p->copy_(value);
  }
}

void run_logits(const LogitsArgs& a) {
  auto q = io::read_npy(a.q), k = io::read_npy(a.k);  // float64 converted
  if (q.dim() != 3)
    throw std::invalid_argument(fmt::format("{}: q must be [T,H,D], got {}", a.q, shape_string(q)));
  if (!q.sizes().equals(k.sizes()))
    throw std::invalid_argument(
        fmt::format("q {} and k {} must have the same shape [T,H,D]", shape_string(q), shape_string(k)));
  if (q.size(0) < 1) throw std::invalid_argument("q and k hold no tokens (T = 0)");
  torch::Tensor x;
  if (!a.x.empty()) {
    x = io::read_npy(a.x);
    if (x.dim() != 2 || x.size(0) != q.size(0))
      throw std::invalid_argument(
          fmt::format("{}: x must be [T={},C], got {}", a.x, q.size(0), shape_string(x)));
  }
  HeadShape shape{q.size(1), q.size(2), x.defined() ? x.size(1) : q.size(1) * q.size(2)};
  torch::manual_seed(a.seed);
  auto enc = make_encoding(a.encoding, shape, PeOptions::parse(a.sets));
  if (enc->properties().contextual && !x.defined())
    throw std::invalid_argument(
        fmt::format("{} is contextual: give the layer input with --x X.npy ([T,C])", a.encoding));
  if (!a.weights.empty()) load_weights(*enc, a.weights);
  torch::NoGradGuard ng;
  auto st = enc->initial_state(1, a.offset);
  auto tok = enc->encode(q.unsqueeze(0), k.unsqueeze(0), x.defined() ? x.unsqueeze(0) : x, st);
  auto logits = attention_logits(*enc, tok, KeyCache::from(tok)).squeeze(0).contiguous();
  // -inf marks the masked entries; any other non-finite logit is an overflow of finite inputs.
  const auto causal = torch::ones({q.size(0), q.size(0)}, torch::kBool).tril();
  if (!(torch::isfinite(logits) | causal.logical_not()).all().item<bool>())
    throw std::invalid_argument(fmt::format(
        "{}: the logits overflow to NaN/Inf: q and k ({}, {}) or the encoding's options are too large for "
        "float32 at positions {}..{}",
        a.encoding, a.q, a.k, a.offset, a.offset + q.size(0) - 1));
  io::write_npy(a.out, logits.to(torch::kFloat32));
  fmt::print("wrote {} logits {} ({} at positions {}..{})\n", a.out, shape_string(logits), a.encoding,
             a.offset, a.offset + q.size(0) - 1);
}

}  // namespace

void add_pe_command(CLI::App& app) {
  auto* pe = app.add_subcommand("pe", "apply one encoding to your own tensors");
  pe->require_subcommand(1);
  auto* cmd =
      pe->add_subcommand("logits", "causal pre-softmax logits [H,T,T] of q, k [T,H,D] as float32 .npy");
  auto a = std::make_shared<LogitsArgs>();
  cmd->add_option("--pe,-e,--encoding", a->encoding, "encoding name (see `grape encodings`)")->required();
  cmd->add_option("--pe-set,--set", a->sets, "encoding option key=value (repeatable)");
  cmd->add_option("--q", a->q, "queries, .npy [T,H,D] (float32; float64 is converted)")->required();
  cmd->add_option("--k", a->k, "keys, .npy [T,H,D] (float32; float64 is converted)")->required();
  cmd->add_option("--x", a->x, "layer input, .npy [T,C] (contextual encodings; float64 is converted)");
  cmd->add_option("--weights", a->weights, ".safetensors with parameters by name (others keep their init)");
  cmd->add_option("--offset", a->offset, "position of the first token")->check(grape::cli::kNonNegative);
  cmd->add_option("--seed", a->seed, "seed of the parameters' random init");
  cmd->add_option("--out", a->out, "output .npy [H,T,T], float32, -inf where masked")->required();
  cmd->callback([a] { run_logits(*a); });
}

}  // namespace grape::cli
