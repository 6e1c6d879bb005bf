// Generation with the KV cache: every prompt gets its own cache, so prompts of different lengths decode
// together exactly as they would alone. Sampling uses our own rng so a seed gives the same text everywhere.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <stdexcept>

#include "grape/train.hpp"

namespace grape::train {

int32_t sample_token(const torch::Tensor& logits, const SamplingOptions& opts, std::mt19937_64& rng) {
  auto l = logits.to(torch::kFloat64).contiguous();
  if (l.dim() != 1)
    throw std::invalid_argument("sample_token: logits must be [V], got " + shape_string(logits));
  const int64_t V = l.size(0);
  const double* z = l.data_ptr<double>();
  if (opts.temperature <= 0) return int32_t(std::max_element(z, z + V) - z);  // greedy
  // Candidates sorted by logit (ties by id, so the order is deterministic), then top-k, top-p.
  std::vector<int32_t> ids(V);
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return z[a] > z[b]; });
  if (opts.top_k > 0 && opts.top_k < V) ids.resize(size_t(opts.top_k));
  std::vector<double> p(ids.size());
  double total = 0;
  for (size_t i = 0; i < ids.size(); ++i)
    total += p[i] = std::exp((z[ids[i]] - z[ids[0]]) / opts.temperature);
  if (opts.top_p < 1.0) {  // the smallest prefix whose mass reaches top_p
    double mass = 0;
    size_t keep = 0;
    while (keep < p.size() && mass < opts.top_p * total) mass += p[keep++];
    p.resize(std::max<size_t>(keep, 1));
    total = std::accumulate(p.begin(), p.end(), 0.0);
  }
  const double u = double(rng() >> 11) * 0x1.0p-53 * total;  // uniform in [0, total)
  double acc = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    acc += p[i];
    if (u < acc) return ids[i];
  }
  return ids[p.size() - 1];
}

std::vector<std::vector<int32_t>> generate(Transformer& model,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           const SamplingOptions& opts,
                                           const std::function<void(size_t, int32_t)>& on_token) {
  if (opts.max_tokens < 0) throw std::invalid_argument("generate: max_tokens must be >= 0");
  if (!(opts.top_p > 0 && opts.top_p <= 1)) throw std::invalid_argument("generate: top_p must be in (0, 1]");
  if (!std::isfinite(opts.temperature) || opts.temperature < 0)
    throw std::invalid_argument("generate: temperature must be a finite number >= 0");
  if (opts.crop < 0 || opts.crop == 1) throw std::invalid_argument("generate: crop must be 0 (off) or >= 2");
  torch::NoGradGuard no_grad;
  Decoder decoder(model, opts.decode, opts.weights);
  const size_t n = prompts.size();
  std::vector<DecodeCache> caches(n);
  std::vector<std::vector<int32_t>> out(n);
  std::vector<bool> done(n, false);
  std::mt19937_64 rng(opts.seed);
  std::vector<int32_t> next(n);
  std::vector<std::vector<int32_t>> history(prompts);  // with crop: what a rebuilt cache is made from
  std::vector<int64_t> cached(n, 0);                   // tokens in each cache
  // A fresh cache for row i holding `ids`; returns the logits of its last token.
  auto prefill = [&](size_t i, std::vector<int64_t> ids) {
    // Room made now for the tokens to come: the crop window, else max_tokens up to the training context
    // (an end-of-text may stop it early; past that the cache grows by doubling).
    const int64_t ahead = std::min(opts.max_tokens, model->config().context);
    caches[i] = decoder.new_cache(opts.crop > 0 ? opts.crop : int64_t(ids.size()) + ahead);
    std::vector<DecodeCache*> one = {&caches[i]};
    auto logits = decoder.forward(torch::tensor(ids, torch::kInt64).unsqueeze(0), one);
    cached[i] = int64_t(ids.size());
    return logits[0][int64_t(ids.size()) - 1];
  };
  // Prefill each prompt into its own cache (with crop, only its last `crop` tokens).
  for (size_t i = 0; i < n; ++i) {
    if (prompts[i].empty())
      throw std::invalid_argument("generate: an empty prompt (start it with end-of-text)");
    const size_t keep = opts.crop > 0 ? std::min(prompts[i].size(), size_t(opts.crop)) : prompts[i].size();
    next[i] = sample_token(prefill(i, {prompts[i].end() - int64_t(keep), prompts[i].end()}), opts, rng);
  }
  for (int64_t t = 0; t < opts.max_tokens; ++t) {
    std::vector<DecodeCache*> active;
    std::vector<int64_t> rows, tokens;
    for (size_t i = 0; i < n; ++i) {
      if (done[i]) continue;
      if (opts.eot >= 0 && next[i] == opts.eot) {
        done[i] = true;
        continue;
      }
      out[i].push_back(next[i]);
      if (on_token) on_token(i, next[i]);
      if (t + 1 == opts.max_tokens) continue;
      if (opts.crop > 0) {
        // The window is full: the next token is seen with the crop - 1 before it, at positions from 0.
        if (cached[i] >= opts.crop) prefill(i, {history[i].end() - int64_t(opts.crop - 1), history[i].end()});
        history[i].push_back(next[i]);
        ++cached[i];
      }
      active.push_back(&caches[i]);
      rows.push_back(int64_t(i));
      tokens.push_back(next[i]);
    }
    if (active.empty()) break;
    auto logits = decoder.forward(torch::tensor(tokens, torch::kInt64).unsqueeze(1), active);
    for (size_t r = 0; r < rows.size(); ++r)
      next[size_t(rows[r])] = sample_token(logits[int64_t(r)][0], opts, rng);
  }
  return out;
}

std::vector<torch::Tensor> greedy_decode(Decoder& decoder, const std::vector<std::vector<int64_t>>& prompts,
                                         int64_t tokens, double* step_seconds,
                                         Decoder::Profile* step_profile) {
  if (prompts.empty()) throw std::invalid_argument("greedy_decode: no prompts");
  for (const auto& p : prompts)
    if (p.empty()) throw std::invalid_argument("greedy_decode: an empty prompt");
  torch::NoGradGuard no_grad;
  const int64_t B = int64_t(prompts.size());
  std::vector<DecodeCache> caches;
  for (int64_t b = 0; b < B; ++b)  // room for the prompt and every token to come
    caches.push_back(decoder.new_cache(int64_t(prompts[size_t(b)].size()) + tokens));
  std::vector<DecodeCache*> ptrs;
  for (auto& c : caches) ptrs.push_back(&c);
  auto row_tensor = [](const std::vector<int64_t>& p) {
    return torch::tensor(p, torch::kInt64).unsqueeze(0);
  };
  std::vector<torch::Tensor> last(static_cast<size_t>(B));  // each row's logits after its prompt [V]
  const bool same = std::all_of(prompts.begin(), prompts.end(), [&](auto& p) { return p == prompts[0]; });
  if (same) {  // one batched prefill (the rows are identical)
    std::vector<torch::Tensor> rows(size_t(B), row_tensor(prompts[0]));
    auto logits = decoder.forward(torch::cat(rows, 0), ptrs);
    for (int64_t b = 0; b < B; ++b) last[size_t(b)] = logits[b][int64_t(prompts[0].size()) - 1];
  } else {  // each row alone: its prompt has its own length
    for (int64_t b = 0; b < B; ++b) {
      std::vector<DecodeCache*> one = {ptrs[size_t(b)]};
      last[size_t(b)] = decoder.forward(row_tensor(prompts[size_t(b)]), one)[0].select(0, -1);
    }
  }
  auto next = torch::stack(last).argmax(-1, true);  // [B,1]
  std::vector<torch::Tensor> steps;
  if (step_profile) decoder.set_profiling(true);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t t = 0; t < tokens; ++t) {
    auto logits = decoder.forward(next, ptrs).select(1, 0);  // [B,V]
    steps.push_back(logits);
    next = logits.argmax(-1, true);
  }
  if (step_seconds)
    *step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (step_profile) {
    *step_profile = decoder.profile();
    decoder.set_profiling(false);
  }
  std::vector<torch::Tensor> out;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<torch::Tensor> rows;
    for (const auto& s : steps) rows.push_back(s[b]);
    out.push_back(rows.empty() ? torch::empty({0, decoder.model()->config().vocab_size})
                               : torch::stack(rows));
  }
  return out;
}

std::vector<int64_t> bench_prompt_lengths(int64_t batch, int64_t prompt_len, bool ragged) {
  std::vector<int64_t> out;
  for (int64_t b = 0; b < batch; ++b) out.push_back(prompt_len + (ragged ? b * prompt_len / batch : 0));
  return out;
}

DecodeThroughput measure_decode(Transformer& model, int64_t batch, int64_t prompt_len, int64_t tokens,
                                DecodePath path, bool ragged, DecodeWeights weights, bool profile) {
  if (batch < 1 || prompt_len < 1 || tokens < 1)
    throw std::invalid_argument("measure_decode: batch, prompt_len and tokens must be >= 1");
  Decoder decoder(model, path, weights);
  decoder.prepare_batch(batch);  // the panel copy is made once, before the timed steps
  const int64_t V = model->config().vocab_size;
  std::vector<std::vector<int64_t>> prompts;
  double cached = 0;
  for (int64_t len : bench_prompt_lengths(batch, prompt_len, ragged)) {
    prompts.emplace_back(size_t(len));
    for (int64_t i = 0; i < len; ++i) prompts.back()[size_t(i)] = i % V;
    cached += double(len) + double(tokens - 1) / 2;
  }
  double s = 0;
  Decoder::Profile phases;
  greedy_decode(decoder, prompts, tokens, &s, profile ? &phases : nullptr);
  return {double(batch * tokens) / std::max(s, 1e-9),
          decoder.path(),
          decoder.fallback_reason(),
          cached / double(batch),
          decoder.bf16_kernel(),
          phases};
}

double decode_tokens_per_s(Transformer& model, int64_t batch, int64_t prompt_len, int64_t tokens) {
  return measure_decode(model, batch, prompt_len, tokens).tokens_per_s;
}

}  // namespace grape::train
