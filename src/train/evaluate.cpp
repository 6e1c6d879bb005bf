// Evaluation: validation loss at the training context and beyond (length extrapolation), and exact-match
// accuracy on synthetic tasks (teacher-forced argmax over the answer, which equals greedy decoding's answer).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "grape/train.hpp"

namespace grape::train {

ValidationWindows validation_windows(int64_t tokens, int64_t context) {
  ValidationWindows w;
  w.batch = std::max<int64_t>(1, std::min<int64_t>(8, tokens / context));
  w.batches = std::max<int64_t>(1, tokens / (w.batch * context));
  return w;
}

double validation_loss(Transformer& model, const data::DataSource& data, int64_t context, int64_t batch,
                       int64_t max_batches) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  double total = 0, weight = 0;
  for (const auto& b : data.val_batches(batch, context, max_batches)) {
    const double w = b.mask.defined() ? b.mask.sum().item<double>() : double(b.y.numel());
    if (w == 0) continue;
    total += model->loss(b.x, b.y, b.mask).item<double>() * w;
    weight += w;
  }
  if (was_training) model->train();
  if (weight == 0) throw std::runtime_error("validation: no scored tokens in the validation split");
  return total / weight;
}

double decode_validation_loss(Decoder& decoder, const data::DataSource& data, int64_t context, int64_t batch,
                              int64_t max_batches, int64_t chunk) {
  if (chunk < 0) throw std::invalid_argument(fmt::format("decode chunk must be >= 0 tokens, got {}", chunk));
  torch::NoGradGuard no_grad;
  double total = 0, weight = 0;
  for (const auto& b : data.val_batches(batch, context, max_batches)) {
    const int64_t B = b.x.size(0), T = b.x.size(1), step = chunk == 0 ? T : chunk;
    std::vector<DecodeCache> caches;
    for (int64_t i = 0; i < B; ++i) caches.push_back(decoder.new_cache(T));
    std::vector<DecodeCache*> ptrs;
    for (auto& c : caches) ptrs.push_back(&c);
    for (int64_t t0 = 0; t0 < T; t0 += step) {
      const int64_t n = std::min(step, T - t0);
      auto logp = decoder.forward(b.x.narrow(1, t0, n), ptrs).to(torch::kFloat64).log_softmax(-1);
      auto nll = -logp.gather(-1, b.y.narrow(1, t0, n).unsqueeze(-1)).squeeze(-1);  // [B, n]
      auto w = b.mask.defined() ? b.mask.narrow(1, t0, n).to(torch::kFloat64) : torch::ones_like(nll);
      total += (nll * w).sum().item<double>();
      weight += w.sum().item<double>();
    }
  }
  if (weight == 0) throw std::runtime_error("validation: no scored tokens in the validation split");
  return total / weight;
}

namespace {

// Exact match of each example's answer under teacher forcing, grouped by label.
std::vector<TaskResult> task_accuracy(Transformer& model, const std::vector<data::TaskExample>& examples) {
  torch::NoGradGuard no_grad;
  std::map<std::string, TaskResult> by_label;
  for (const auto& ex : examples) {
    std::vector<int64_t> ids(ex.prompt.begin(), ex.prompt.end());
    ids.insert(ids.end(), ex.answer.begin(), ex.answer.end());
    auto x = torch::tensor(ids, torch::kInt64).unsqueeze(0);
    auto pred = model->forward(x).argmax(-1).squeeze(0);  // prediction of token t+1 at t
    const int64_t p = int64_t(ex.prompt.size());
    bool ok = true;
    for (size_t i = 0; i < ex.answer.size() && ok; ++i)
      ok = pred[p - 1 + int64_t(i)].item<int64_t>() == ex.answer[i];
    auto& r = by_label[ex.label];
    r.label = ex.label;
    r.total += 1;
    r.correct += ok ? 1 : 0;
  }
  std::vector<TaskResult> out;
  for (auto& [label, r] : by_label) out.push_back(r);
  return out;
}

}  // namespace

EvalReport evaluate(Transformer& model, const data::DataSource& data, const std::vector<int64_t>& factors,
                    int64_t tokens, int64_t task_examples, bool byte_tokens) {
  const bool was_training = model->is_training();
  model->eval();
  EvalReport report;
  const int64_t base = model->config().context;
  for (int64_t f : factors) {
    if (f <= 0) throw std::invalid_argument(fmt::format("eval: context factor must be positive, got {}", f));
    LengthResult r;
    r.factor = f;
    r.context = base * f;
    const auto windows = validation_windows(tokens, r.context);
    try {
      r.loss = validation_loss(model, data, r.context, windows.batch, windows.batches);
      r.perplexity = std::exp(r.loss);
      r.tokens = windows.tokens(r.context);
      if (byte_tokens) r.bits_per_byte = r.loss / std::log(2.0);
    } catch (const std::exception& e) {  // e.g. a learned table shorter than the length, or too little data
      r.loss = r.perplexity = std::numeric_limits<double>::quiet_NaN();
      r.error = e.what();
    }
    report.lengths.push_back(r);
  }
  auto examples = data.task_examples(task_examples, /*seed=*/20251123);
  if (!examples.empty()) report.tasks = task_accuracy(model, examples);
  if (was_training) model->train();
  return report;
}

std::string eval_table(const EvalReport& report) {
  bool bpb = false;
  for (const auto& r : report.lengths) bpb |= r.bits_per_byte >= 0;
  const std::string bpb_head = bpb ? fmt::format(" {:>10}", "bits/byte") : "";
  std::string out = fmt::format("{:>8} {:>8} {:>10} {:>12}{} {:>10}\n", "factor", "context", "val loss",
                                "perplexity", bpb_head, "tokens");
  for (const auto& r : report.lengths) {
    if (!r.error.empty())
      out += fmt::format("{:>7}x {:>8} {:>10} {:>12}{} {:>10}  ({})\n", r.factor, r.context, "n/a", "n/a",
                         bpb ? fmt::format(" {:>10}", "n/a") : "", 0, r.error);
    else
      out += fmt::format("{:>7}x {:>8} {:>10.4f} {:>12.3f}{} {:>10}\n", r.factor, r.context, r.loss,
                         r.perplexity, bpb ? fmt::format(" {:>10.4f}", r.bits_per_byte) : "", r.tokens);
  }
  out += "(val loss in nats per token";
  out += bpb ? "; bits/byte = val loss / ln 2, each token one byte)\n" : ")\n";
  if (!report.tasks.empty()) {
    out += fmt::format("\n{:<28} {:>10} {:>8}\n", "task", "accuracy", "n");
    for (const auto& t : report.tasks)
      out += fmt::format("{:<28} {:>9.1f}% {:>8}\n", t.label, 100.0 * double(t.correct) / double(t.total),
                         t.total);
  }
  return out;
}

std::string eval_json(const EvalReport& report) {
  nlohmann::json j;
  j["lengths"] = nlohmann::json::array();
  for (const auto& r : report.lengths) {
    nlohmann::json e = {{"factor", r.factor}, {"context", r.context}, {"tokens", r.tokens}};
    if (r.error.empty()) {
      e["loss"] = r.loss;
      e["perplexity"] = r.perplexity;
      if (r.bits_per_byte >= 0) e["bits_per_byte"] = r.bits_per_byte;
    } else {
      e["error"] = r.error;
    }
    j["lengths"].push_back(e);
  }
  j["tasks"] = nlohmann::json::array();
  for (const auto& t : report.tasks)
    j["tasks"].push_back({{"label", t.label},
                          {"correct", t.correct},
                          {"total", t.total},
                          {"accuracy", double(t.correct) / double(t.total)}});
  return j.dump(2);
}

}  // namespace grape::train
