// `grape attn forward`: one attention sublayer of the model (projections, KV-shift, QK-norm, the encoding,
// attention, output projection) on your own input and weights, from and to .npy / .safetensors files, so that
// other implementations can be checked against grape without Python. It runs the model's own
// AttentionSublayer (src/nn/model.cpp).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <set>
#include <stdexcept>

#include "cli/commands.hpp"
#include "grape/io.hpp"
#include "grape/model.hpp"

namespace grape::cli {
namespace {

struct AttnArgs {
  std::string x, weights, out, logits, encoding = "rope", qk_norm = "before_rotation", attention = "fused";
  std::vector<std::string> sets;
  int64_t n_head = 0;
  bool kv_shift = false;
};

// The sublayer's modules registered under their checkpoint names (wq.weight, pe.lambda, ...).
struct Sublayer : torch::nn::Module {
  Sublayer(const ModelConfig& c, EncodingPtr pe) : attn(*this, c, std::move(pe)) {}
  AttentionSublayer attn;
};

// Copies every tensor of `path` into the parameter of that name; each parameter must be given exactly once.
void load_weights(Sublayer& layer, const std::string& path, const ModelConfig& c) {
  auto params = layer.named_parameters();
  std::vector<std::string> known;
  for (const auto& p : params) known.push_back(p.key());
  const auto setting = fmt::format("pe={}, n_head={}, C={}, kv_shift={}, qk_norm={}", c.pe, c.n_head,
                                   c.n_embd, c.kv_shift, c.qk_norm);
  std::set<std::string> given;
  torch::NoGradGuard ng;
  for (const auto& [name, value] : io::read_safetensors(path)) {
    auto* p = params.find(name);
    if (!p)
      throw std::invalid_argument(
          fmt::format("{}: tensor '{}' is not a weight of the sublayer ({}; its weights: {})", path, name,
                      setting, fmt::join(known, ", ")));
    if (!p->sizes().equals(value.sizes()))
      throw std::invalid_argument(fmt::format("{}: tensor '{}' has shape {}, the sublayer ({}) expects {}",
                                              path, name, shape_string(value), setting, shape_string(*p)));
    p->copy_(value);
    given.insert(name);
  }
  std::vector<std::string> missing;
  for (const auto& k : known)
    if (!given.count(k)) missing.push_back(k);
  if (!missing.empty())
    throw std::invalid_argument(fmt::format("{}: missing weight{} {} of the sublayer ({})", path,
                                            missing.size() > 1 ? "s" : "", fmt::join(missing, ", "),
                                            setting));
}

void run_forward(const AttnArgs& a) {
  auto x = io::read_npy(a.x);  // float64 converted
  const bool batched = x.dim() == 3;
  if (x.dim() == 2) x = x.unsqueeze(0);
  if (x.dim() != 3 || x.size(0) < 1 || x.size(1) < 1 || x.size(2) < 1)
    throw std::invalid_argument(fmt::format("{}: x must be [B,T,C] or [T,C], got {}", a.x, shape_string(x)));
  ModelConfig c;
  c.n_embd = x.size(2);
  c.n_head = a.n_head;
  c.pe = a.encoding;
  c.pe_options = PeOptions::parse(a.sets).values();
  c.kv_shift = a.kv_shift;
  c.set("qk_norm", a.qk_norm, "--qk-norm");  // also takes the once-boolean true/false
  c.set("attention", a.attention, "--attention");
  c.validate();  // C divisible by n_head, the encoding and its options, qk_norm for this encoding
  Sublayer layer(c, make_encoding(c.pe, c.head_shape(), PeOptions(c.pe_options)));
  load_weights(layer, a.weights, c);
  torch::NoGradGuard ng;
  const auto& pe = layer.attn.pe();
  const int64_t B = x.size(0), T = x.size(1);
  PeState state = pe->initial_state(B, 0);
  KeyCache keys;
  KVShiftState shift;
  auto stream = pe->initial_stream(B, 0, T, x.scalar_type());  // TAPE's layer-0 state, else undefined
  std::vector<torch::Tensor> logits;
  auto y =
      layer.attn
          .forward(x, {RowGroup{0, B, &state, &keys, &shift}}, stream.defined() ? &stream : nullptr, &logits)
          .y;
  if (!torch::isfinite(y).all().item<bool>())
    throw std::invalid_argument(
        fmt::format("the sublayer's output overflows to NaN/Inf: {} or {} hold values too large for float32",
                    a.x, a.weights));
  if (!batched) y = y.squeeze(0), logits[0] = logits[0].squeeze(0);  // shaped as x: [T,C], [H,T,T]
  io::write_npy(a.out, y);
  if (!a.logits.empty()) io::write_npy(a.logits, logits[0]);
  fmt::print("wrote {} {}{} ({}, n_head={}, kv_shift={}, qk_norm={})\n", a.out, shape_string(y),
             a.logits.empty() ? "" : fmt::format(" and {} {}", a.logits, shape_string(logits[0])), c.pe,
             c.n_head, c.kv_shift, c.qk_norm);
}

}  // namespace

void add_attn_command(CLI::App& app) {
  auto* attn = app.add_subcommand("attn", "run one attention sublayer of the model on your own tensors");
  attn->require_subcommand(1);
  auto* cmd = attn->add_subcommand(
      "forward", "x [B,T,C] and the sublayer's weights -> its output [B,T,C] and logits [B,H,T,T] as .npy");
  auto a = std::make_shared<AttnArgs>();
  cmd->add_option("--x", a->x, "the sublayer's input (the block's normalised x), .npy [B,T,C] or [T,C]")
      ->required();
  cmd->add_option("--weights", a->weights,
                  ".safetensors (F32) with every weight by its checkpoint name: wq.weight, wk.weight, "
                  "wv.weight, wo.weight [C,C]; q_norm.weight, k_norm.weight [C/n_head] (unless "
                  "--qk-norm off); kv_shift.w_k, kv_shift.w_v [H,C] (--kv-shift); pe.NAME (the "
                  "encoding's, see `grape encodings NAME`)")
      ->required();
  cmd->add_option("--n-head", a->n_head, "attention heads H (head_dim = C / H)")->required();
  cmd->add_option("--pe,-e,--encoding", a->encoding, "encoding name (see `grape encodings`)")
      ->capture_default_str();
  cmd->add_option("--pe-set,--set", a->sets, "encoding option key=value (repeatable)");
  cmd->add_flag("--kv-shift", a->kv_shift, "KV-shift on the raw keys and values (weights kv_shift.w_k, w_v)");
  cmd->add_option("--qk-norm", a->qk_norm, "before_rotation|after_rotation|off (see docs/training.md)")
      ->capture_default_str();
  cmd->add_option("--attention", a->attention, "fused|reference")->capture_default_str();
  cmd->add_option("--out", a->out, "output .npy, the sublayer output (shaped as x), float32")->required();
  cmd->add_option(
      "--logits", a->logits,
      "also write the pre-softmax logits q~.k~/sqrt(D) + bias, .npy [B,H,T,T] ([H,T,T] for a 2-D x), "
      "float32, -inf where masked (key after query)");
  cmd->callback([a] { run_forward(*a); });
}

}  // namespace grape::cli
