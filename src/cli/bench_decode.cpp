// `grape bench decode` (bench_decode.hpp).
#include "cli/bench_decode.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "grape/io.hpp"
#include "grape/train.hpp"

namespace grape::cli {
namespace {

struct DecodeArgs {
  std::vector<std::string> presets = {"tiny", "small"};
  std::vector<std::string> pes = {"rope"};
  std::vector<std::string> pe_sets;
  std::string attention = "fused";
  std::string decode = "fast";   // fast | reference | both
  std::string weights = "fp32";  // fp32 | bf16 | both (bf16 on the fast path only)
  int64_t batch = 1, tokens = 64, prompt = 16;
  bool ragged = false, profile = false;
  std::string json;
};

// Read + write bytes per second of copying `bytes` / 2 bytes into another buffer (so that `bytes` are
// touched), the best of 5 after one warm-up copy. 512 MB: from memory; the size of a step's reads: from
// wherever those bytes live (this machine's L3 holds small's weights).
double copy_bandwidth_gbps(double bytes) {
  const int64_t kFloats = std::max<int64_t>(1024, int64_t(bytes / 8));
  auto src = torch::rand({kFloats}), dst = torch::empty({kFloats});
  dst.copy_(src);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    dst.copy_(src);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 2.0 * double(kFloats) * 4 / best / 1e9;
}

// The matrices a decode step multiplies by: the blocks' projections and the tied embedding/head.
bool is_matrix(const std::string& n) {
  return n == "wte.weight" || n.ends_with(".wq.weight") || n.ends_with(".wk.weight") ||
         n.ends_with(".wv.weight") || n.ends_with(".wo.weight") || n.ends_with(".w1.weight") ||
         n.ends_with(".w2.weight") || n.ends_with(".w_out.weight");
}

// Bytes of the weights a decode step reads: the matrices at 2 bytes each with bf16 weights, every other
// parameter at 4.
double weight_bytes(const Transformer& model, DecodeWeights weights) {
  double bytes = 0;
  for (const auto& p : model->named_parameters(/*recurse=*/true))
    bytes += double(p.value().numel()) * (is_matrix(p.key()) && weights == DecodeWeights::bf16 ? 2 : 4);
  return bytes;
}

// Multiply-adds of one token through the matrices (each matrix entry once).
double matrix_entries(const Transformer& model) {
  double n = 0;
  for (const auto& p : model->named_parameters(/*recurse=*/true))
    if (is_matrix(p.key())) n += double(p.value().numel());
  return n;
}

void run(const DecodeArgs& a) {
  // Each (path, weights) asked for; with two or more, alternated twice and the best of each kept.
  std::vector<std::pair<DecodePath, DecodeWeights>> configs;
  for (auto path : a.decode == "both" ? std::vector<DecodePath>{DecodePath::reference, DecodePath::fast}
                                      : std::vector<DecodePath>{parse_decode_path(a.decode, "--decode")})
    for (auto w : a.weights == "both"
                      ? std::vector<DecodeWeights>{DecodeWeights::fp32, DecodeWeights::bf16}
                      : std::vector<DecodeWeights>{parse_decode_weights(a.weights, "--weights")})
      if (path == DecodePath::fast || w == DecodeWeights::fp32) configs.emplace_back(path, w);
  if (configs.empty())
    throw std::invalid_argument("--weights bf16 needs the fast decode path (--decode fast or both)");
  auto order = configs;
  if (configs.size() > 1) order.insert(order.end(), configs.begin(), configs.end());
  const double gbps = copy_bandwidth_gbps(512e6);
  std::string table = fmt::format(
      "threads: {}; copy bandwidth {:.2f} GB/s (read + write of 512 MB, measured now); batch {}{}, prompt {} "
      "tokens\n"
      "bound = batch x bandwidth / bytes a step reads (the weights once + each sequence's K and V cache);\n"
      "bound@L3 = the same at the copy bandwidth of a buffer of the step's size (cache-resident weights)\n",
      torch::get_num_threads(), gbps, a.batch,
      a.ragged ? " (ragged: prompt + floor(prompt b / batch) tokens)" : "", a.prompt);
  table += fmt::format("{:<7} {:<10} {:>11} {:>7} {:<10} {:<7} {:>11} {:>9} {:>9} {:>7} {:>9} {:>7}\n",
                       "preset", "pe", "parameters", "tokens", "path", "weights", "tokens/s", "MB/step",
                       "bound", "%bound", "bound@L3", "%");
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& preset : a.presets)
    for (const auto& pe : a.pes) {
      ModelConfig m = model_preset(preset);
      m.pe = pe;
      for (const auto& s : a.pe_sets) {
        auto [key, value] = split_key_value(s, "--pe-set");
        m.pe_options[key] = value;
      }
      m.attention = a.attention;
      m.validate();
      torch::manual_seed(0);
      Transformer model(m);
      // bf16 runs on the fast path only: a model that falls back to the reference path skips it, saying why.
      const std::string unsupported = fast_decode_unsupported(model);
      std::map<std::pair<DecodePath, DecodeWeights>, train::DecodeThroughput> best;
      for (auto [path, w] : order) {
        if (w == DecodeWeights::bf16 && !unsupported.empty()) continue;
        auto r = train::measure_decode(model, a.batch, a.prompt, a.tokens, path, a.ragged, w, a.profile);
        auto& b = best[{r.path, w}];
        if (r.tokens_per_s > b.tokens_per_s) b = r;
      }
      const double resident_gbps = copy_bandwidth_gbps(weight_bytes(model, DecodeWeights::fp32));
      for (const auto& [key, r] : best) {
        const auto [path, w] = key;
        const double kv = 2.0 * double(m.n_layer) * r.mean_cache * double(m.n_embd) * 4;
        const double step_bytes = weight_bytes(model, w) + double(a.batch) * kv;
        const double bound = double(a.batch) * gbps * 1e9 / step_bytes;
        const double bound_l3 = double(a.batch) * resident_gbps * 1e9 / step_bytes;
        table += fmt::format(
            "{:<7} {:<10} {:>11} {:>7} {:<10} {:<7} {:>11.1f} {:>9.2f} {:>9.1f} {:>6.1f}% {:>9.1f} "
            "{:>6.1f}%\n",
            preset, m.pe, model->num_parameters(), a.tokens, to_string(path), to_string(w), r.tokens_per_s,
            step_bytes / 1e6, bound, 100.0 * r.tokens_per_s / bound, bound_l3,
            100.0 * r.tokens_per_s / bound_l3);
        if (!r.fallback_reason.empty()) table += "  (fast path not used: " + r.fallback_reason + ")\n";
        if (!r.bf16_kernel.empty()) table += "  (bf16 products: the " + r.bf16_kernel + " kernel)\n";
        nlohmann::json profile = nullptr;
        if (a.profile && r.profile.passes > 0) {  // per step, in ms
          const double n = double(r.profile.passes), step_ms = 1e3 * double(a.batch) / r.tokens_per_s;
          const double products = 1e3 * r.profile.products_s / n, attention = 1e3 * r.profile.attention_s / n,
                       other = 1e3 * r.profile.other_s / n;
          const double gflops = 2.0 * matrix_entries(model) * double(a.batch) / (products * 1e-3) / 1e9;
          table += fmt::format(
              "  per step ({:.3f} ms): products {:.3f} ms ({:.1f} GFLOP/s), attention {:.3f} ms, rest {:.3f} "
              "ms\n",
              step_ms, products, gflops, attention, other);
          profile = {{"step_ms", step_ms},
                     {"products_ms", products},
                     {"products_gflops", gflops},
                     {"attention_ms", attention},
                     {"other_ms", other}};
        } else if (a.profile) {
          table += "  (no profile: only the fast path is profiled)\n";
        }
        rows.push_back({{"preset", preset},
                        {"pe", m.pe},
                        {"parameters", model->num_parameters()},
                        {"batch", a.batch},
                        {"ragged", a.ragged},
                        {"prompt", a.prompt},
                        {"prompt_lengths", train::bench_prompt_lengths(a.batch, a.prompt, a.ragged)},
                        {"tokens", a.tokens},
                        {"path", to_string(path)},
                        {"weights", to_string(w)},
                        {"bf16_kernel", r.bf16_kernel},
                        {"fallback_reason", r.fallback_reason},
                        {"tokens_per_s", r.tokens_per_s},
                        {"bytes_per_step", step_bytes},
                        {"copy_gbps", gbps},
                        {"copy_gbps_step_size", resident_gbps},
                        {"bound_l3_tokens_per_s", bound_l3},
                        {"bound_tokens_per_s", bound},
                        {"fraction_of_bound", r.tokens_per_s / bound},
                        {"attention", a.attention},
                        {"threads", torch::get_num_threads()},
                        {"profile", profile}});
      }
      const std::pair ref{DecodePath::reference, DecodeWeights::fp32},
          fast{DecodePath::fast, DecodeWeights::fp32}, bf16{DecodePath::fast, DecodeWeights::bf16};
      if (best.count(ref) && best.count(fast))
        table +=
            fmt::format("  fast / reference: {:.2f}x\n", best[fast].tokens_per_s / best[ref].tokens_per_s);
      if (best.count(fast) && best.count(bf16))
        table +=
            fmt::format("  bf16 / fp32 (fast): {:.2f}x\n", best[bf16].tokens_per_s / best[fast].tokens_per_s);
      if (std::any_of(configs.begin(), configs.end(),
                      [](auto c) { return c.second == DecodeWeights::bf16; }) &&
          !unsupported.empty())
        table += "  (bf16 not run: it needs the fast path, and " + unsupported + ")\n";
    }
  fmt::print("{}", table);
  if (!a.json.empty()) io::write_file_atomic(a.json, rows.dump(2) + "\n");
}

}  // namespace

void add_bench_decode(CLI::App* bench) {
  auto a = std::make_shared<DecodeArgs>();
  auto* cmd = bench->add_subcommand("decode", "decoding tokens/s with the KV cache per preset");
  cmd->add_option("--preset", a->presets, "presets to measure (comma-separated)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--pe", a->pes, "position encodings (comma-separated)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--pe-set", a->pe_sets, "encoding option key=value (applied to each encoding)");
  cmd->add_option("--attention", a->attention, "fused or reference (the reference decode path's attention)")
      ->check(CLI::IsMember({"fused", "reference"}))
      ->capture_default_str();
  cmd->add_option("--decode", a->decode,
                  "fast (the LibTorch-free engine where it supports the model), reference (forward_cached) "
                  "or both, alternated")
      ->check(CLI::IsMember({"fast", "reference", "both"}))
      ->capture_default_str();
  cmd->add_option("--weights", a->weights,
                  "the fast path's matrices: fp32, bf16 (rounded once, fp32 sums) or both, alternated")
      ->check(CLI::IsMember({"fp32", "bf16", "both"}))
      ->capture_default_str();
  cmd->add_option("--batch", a->batch, "sequences decoded together")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  cmd->add_option("--tokens", a->tokens, "tokens generated per sequence")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--prompt", a->prompt, "prompt tokens per sequence")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_flag("--ragged", a->ragged,
                "prompts of different lengths (prompt + floor(prompt b / batch) tokens for sequence b)");
  cmd->add_flag("--profile", a->profile,
                "also time the fast path's steps by phase: matrix products (with their GFLOP/s), attention "
                "and the rest (docs/performance.md)");
  cmd->add_option("--json", a->json, "also write the results as JSON here");
  cmd->callback([a] { run(*a); });
}

}  // namespace grape::cli
