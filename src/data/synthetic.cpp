// Synthetic tasks: text examples generated on demand from a seed, tokenized with the run's tokenizer.
//
// Spec: "synthetic:NAME[:key=value,...]". Each example is one line of text; the answer is the part after
// the prompt, ending with "\n" (so a model must also know where the answer stops):
//
//   copy      "copy: qwhbe|qwhbe\n"          prompt "copy: qwhbe|", answer "qwhbe\n"
//             length = letters to copy (default 16); letters are uniform over a-z.
//   addition  "391+845=1236\n"               prompt "391+845=", answer "1236\n"
//             digits = digits of each operand (default 3), no leading zeros, uniform.
//   mqar      "a:3 k:9 x:1 ?k 9 ?a 3\n"     multi-query associative recall: `pairs` distinct keys (a-z)
//             with digit values, then `queries` distinct keys asked in random order, each followed by its
//             value (defaults 8 and 4). TaskExample: prompt up to the last "?key ", answer "3\n".
//   needle    "qz mk [7319] wb ... lo|7319\n"  a haystack of random two-letter words with one 4-digit
//             number in brackets, `depth` of the way in (0 = first, 1 = last word; default: uniform
//             per training example, and 0, .25, .5, .75, 1 in turn for task examples); `length` = the
//             prompt's size in bytes, about (default 256). Prompt up to "|", answer "7319\n".
//
// Batches pack examples, each after an end-of-text, into rows of T+1 tokens (the last one cut off).
// Training batches have no mask: every token is trained (prompts are random, so their loss only teaches
// the format); with `loss=answer` (any task) they are masked like validation batches, so training sees only
// the answers: the random prompt tokens' gradient is pure noise, and without it retrieval is learned in far
// fewer steps (the extrapolation study trains its needle models this way). Validation batches mask the answer
// tokens only (all of MQAR's answers), so validation loss measures the task itself.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <stdexcept>

#include "grape/data.hpp"
#include "grape/settings_text.hpp"

namespace grape::data {

namespace {

// A piece of an example's text; answer parts are scored in validation. The last part is the answer a
// TaskExample asks for. Parts are tokenized separately so answer tokens are known exactly.
struct Part {
  std::string text;
  bool answer = false;
};
struct Sample {
  std::vector<Part> parts;
  std::string label;
};

struct Task {
  std::string name;
  int64_t length = 0;              // copy: letters; needle: prompt bytes
  int64_t digits = 3;              // addition
  int64_t pairs = 8, queries = 4;  // mqar
  double depth = -1;               // needle: fixed depth in [0,1]; < 0: uniform per example
  bool answer_loss = false;        // loss=answer: training batches score the answer tokens only
};

constexpr uint64_t kValSeed = 0x76616c5f73656564ULL;      // "val_seed": validation rows
constexpr uint64_t kExampleSalt = 0x7461736b5f657861ULL;  // mixed into task_examples' seed
constexpr double kEvalDepths[] = {0.0, 0.25, 0.5, 0.75, 1.0};

// rng() % n, not a std distribution: those differ between standard libraries.
uint64_t draw(std::mt19937_64& rng, uint64_t n) { return rng() % n; }
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }
char letter(std::mt19937_64& rng) { return static_cast<char>('a' + draw(rng, 26)); }

Sample make_copy(const Task& t, std::mt19937_64& rng) {
  std::string s;
  for (int64_t i = 0; i < t.length; ++i) s += letter(rng);
  return {{{"copy: " + s + "|", false}, {s + "\n", true}}, fmt::format("len={}", t.length)};
}

Sample make_addition(const Task& t, std::mt19937_64& rng) {
  const uint64_t low = t.digits == 1 ? 0 : static_cast<uint64_t>(std::pow(10.0, t.digits - 1));
  const uint64_t high = static_cast<uint64_t>(std::pow(10.0, t.digits));  // exact: digits <= 18
  const uint64_t a = low + draw(rng, high - low), b = low + draw(rng, high - low);
  return {{{fmt::format("{}+{}=", a, b), false}, {fmt::format("{}\n", a + b), true}},
          fmt::format("digits={}", t.digits)};
}

Sample make_mqar(const Task& t, std::mt19937_64& rng) {
  std::string keys = "abcdefghijklmnopqrstuvwxyz";
  for (int i = 25; i > 0; --i) std::swap(keys[i], keys[draw(rng, i + 1)]);  // Fisher-Yates
  std::map<char, char> value;
  std::string text;
  for (int64_t i = 0; i < t.pairs; ++i) {
    value[keys[i]] = static_cast<char>('0' + draw(rng, 10));
    text += fmt::format("{}:{} ", keys[i], value[keys[i]]);
  }
  std::string asked = keys.substr(0, t.pairs);
  for (int64_t i = t.pairs - 1; i > 0; --i) std::swap(asked[i], asked[draw(rng, i + 1)]);
  Sample s{{}, fmt::format("pairs={}", t.pairs)};
  for (int64_t q = 0; q < t.queries; ++q) {
    text += fmt::format("{}?{} ", q == 0 ? "" : " ", asked[q]);
    s.parts.push_back({text, false});
    s.parts.push_back({std::string(1, value[asked[q]]) + (q + 1 == t.queries ? "\n" : ""), true});
    text.clear();
  }
  return s;
}

Sample make_needle(const Task& t, std::mt19937_64& rng) {
  // Prompt bytes = 3 per word (two letters and a space) + "[dddd] " + "|" = 3 n + 8 - 1.
  const int64_t n = std::max<int64_t>(1, (t.length - 7) / 3);
  const double depth = t.depth >= 0 ? t.depth : uniform01(rng);
  const int64_t at = std::llround(depth * static_cast<double>(n));  // words before the needle
  const uint64_t number = 1000 + draw(rng, 9000);
  std::string text;
  for (int64_t i = 0; i <= n; ++i) {
    if (i > 0) text += ' ';
    if (i == at) text += fmt::format("[{}] ", number);
    if (i < n) text += std::string{letter(rng), letter(rng)};
  }
  text.back() = '|';  // the separator after the last word (or needle) becomes the question mark
  return {{{text, false}, {fmt::format("{}\n", number), true}},
          fmt::format("depth={:.2f} len={}", depth, t.length)};
}

Sample make_sample(const Task& t, std::mt19937_64& rng) {
  if (t.name == "copy") return make_copy(t, rng);
  if (t.name == "addition") return make_addition(t, rng);
  if (t.name == "mqar") return make_mqar(t, rng);
  return make_needle(t, rng);
}

// ---- the spec -------------------------------------------------------------------------------------------

const std::map<std::string, std::vector<std::string>>& task_keys() {
  static const std::map<std::string, std::vector<std::string>> keys = {
      {"copy", {"length", "loss"}},
      {"mqar", {"pairs", "queries", "loss"}},
      {"needle", {"depth", "length", "loss"}},
      {"addition", {"digits", "loss"}}};
  return keys;
}

int64_t parse_int(const std::string& task, const std::string& key, const std::string& v, int64_t lo,
                  int64_t hi) {
  int64_t out = 0;
  auto [ptr, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || ptr != v.data() + v.size() || out < lo || out > hi)
    throw std::invalid_argument(
        fmt::format("synthetic:{}: {}='{}' must be an integer in [{}, {}]", task, key, v, lo, hi));
  return out;
}

double parse_unit(const std::string& task, const std::string& key, const std::string& v) {
  double d = -1;
  try {
    size_t used = 0;
    d = std::stod(v, &used);
    if (used != v.size()) d = -1;
  } catch (const std::exception&) {
  }
  if (!(d >= 0.0 && d <= 1.0))
    throw std::invalid_argument(
        fmt::format("synthetic:{}: {}='{}' must be a number in [0, 1]", task, key, v));
  return d;
}

Task parse_task(const std::string& spec) {
  const std::string rest = spec.size() > 10 ? spec.substr(10) : "";  // after "synthetic:"
  const std::string name = rest.substr(0, rest.find(':'));
  const std::string options = rest.find(':') == std::string::npos ? "" : rest.substr(rest.find(':') + 1);
  auto it = task_keys().find(name);
  if (it == task_keys().end())
    throw std::invalid_argument(fmt::format(
        "unknown synthetic task '{}' in '{}'; {}valid tasks: {} "
        "(synthetic:NAME[:key=value,...]; `grape data` lists their options)",
        name, spec, did_you_mean(name, synthetic_task_names()), fmt::join(synthetic_task_names(), ", ")));
  Task t;
  t.name = name;
  t.length = name == "copy" ? 16 : 256;
  std::map<std::string, std::string> given;
  for (size_t pos = 0; pos < options.size();) {
    size_t end = std::min(options.find(',', pos), options.size());
    const std::string kv = options.substr(pos, end - pos);
    pos = end + 1;
    if (kv.empty()) continue;
    const std::string key =
        kv.substr(0, kv.find('='));  // named first: an unknown option lists the valid ones
    if (std::find(it->second.begin(), it->second.end(), key) == it->second.end())
      throw std::invalid_argument(fmt::format("synthetic task '{}' has no option '{}'; {}valid options: {}",
                                              name, key, did_you_mean(key, it->second),
                                              fmt::join(it->second, ", ")));
    given[key] = split_key_value(kv, fmt::format("synthetic:{}: option", name)).second;
  }
  for (const auto& [key, v] : given) {
    if (key == "length")
      t.length = parse_int(name, key, v, name == "copy" ? 1 : 16, name == "copy" ? 4096 : 1 << 20);
    if (key == "digits") t.digits = parse_int(name, key, v, 1, 18);
    if (key == "pairs") t.pairs = parse_int(name, key, v, 1, 26);
    if (key == "depth") t.depth = parse_unit(name, key, v);
    if (key == "loss" && v != "all" && v != "answer")
      throw std::invalid_argument(fmt::format("synthetic:{}: loss='{}' must be all or answer", name, v));
    if (key == "loss") t.answer_loss = v == "answer";
  }
  t.queries = std::min<int64_t>(4, t.pairs);
  if (given.count("queries")) t.queries = parse_int(name, "queries", given["queries"], 1, t.pairs);
  return t;
}

// ---- the source -----------------------------------------------------------------------------------------

class SyntheticSource final : public DataSource {
 public:
  SyntheticSource(std::string spec, Task task, std::unique_ptr<Tokenizer> tok)
      : spec_(std::move(spec)), task_(std::move(task)), tok_(std::move(tok)) {}

  std::string describe() const override {
    std::mt19937_64 rng(kValSeed);
    std::string text;
    for (const auto& p : make_sample(task_, rng).parts) text += p.text;
    if (text.size() > 48) text = text.substr(0, 40) + "..." + text.substr(text.size() - 8);
    text.pop_back();  // the "\n"
    return fmt::format("{}: generated on demand ({}), e.g. \"{}\\n\"; validation scores answer tokens only",
                       spec_, tok_->kind(), text);
  }
  int64_t train_tokens() const override { return kGeneratedTokens; }
  int64_t val_tokens() const override { return kGeneratedTokens; }
  std::string fingerprint() const override { return spec_ + " (" + tok_->kind() + ")"; }

  Batch train_batch(int64_t batch, int64_t T, std::mt19937_64& rng) const override {
    check_shape(batch, T);
    auto w = torch::empty({batch, T + 1}, torch::kInt64);
    torch::Tensor m = task_.answer_loss ? torch::empty({batch, T + 1}, torch::kFloat32) : torch::Tensor();
    for (int64_t b = 0; b < batch; ++b)
      fill_row(rng, T + 1, w.data_ptr<int64_t>() + b * (T + 1),
               m.defined() ? m.data_ptr<float>() + b * (T + 1) : nullptr);
    return {w.narrow(1, 0, T).contiguous(), w.narrow(1, 1, T).contiguous(),
            m.defined() ? m.narrow(1, 1, T).contiguous() : torch::Tensor()};
  }

  // Rows from a fixed seed, so every call (and every run) sees the same validation examples.
  std::vector<Batch> val_batches(int64_t batch, int64_t T, int64_t max_batches) const override {
    check_shape(batch, T);
    if (max_batches < 1)
      throw std::invalid_argument(fmt::format("max validation batches {} < 1", max_batches));
    std::mt19937_64 rng(kValSeed);
    std::vector<Batch> out;
    for (int64_t k = 0; k < max_batches; ++k) {
      auto w = torch::empty({batch, T + 1}, torch::kInt64);
      auto m = torch::empty({batch, T + 1}, torch::kFloat32);
      for (int64_t b = 0; b < batch; ++b)
        fill_row(rng, T + 1, w.data_ptr<int64_t>() + b * (T + 1), m.data_ptr<float>() + b * (T + 1));
      out.push_back(
          {w.narrow(1, 0, T).contiguous(), w.narrow(1, 1, T).contiguous(), m.narrow(1, 1, T).contiguous()});
    }
    return out;
  }

  std::vector<TaskExample> task_examples(int64_t n, uint64_t seed) const override {
    std::mt19937_64 rng(seed ^ kExampleSalt);
    std::vector<TaskExample> out;
    for (int64_t i = 0; i < n; ++i) {
      Task t = task_;
      if (t.name == "needle" && t.depth < 0) t.depth = kEvalDepths[i % 5];
      Sample s = make_sample(t, rng);
      TaskExample ex{{static_cast<int32_t>(tok_->eot())}, tok_->encode(s.parts.back().text), s.label};
      for (size_t p = 0; p + 1 < s.parts.size(); ++p) {
        auto ids = tok_->encode(s.parts[p].text);
        ex.prompt.insert(ex.prompt.end(), ids.begin(), ids.end());
      }
      out.push_back(std::move(ex));
    }
    return out;
  }

 private:
  static void check_shape(int64_t batch, int64_t T) {
    if (batch < 1 || T < 1)
      throw std::invalid_argument(fmt::format("batch size {} and context {} must both be >= 1", batch, T));
  }

  // n tokens of examples, each after an end-of-text; mask (when given) is 1 on answer tokens.
  void fill_row(std::mt19937_64& rng, int64_t n, int64_t* tokens, float* mask) const {
    int64_t i = 0;
    auto put = [&](int64_t id, bool answer) {
      if (i == n) return;
      tokens[i] = id;
      if (mask != nullptr) mask[i] = answer ? 1.0f : 0.0f;
      ++i;
    };
    while (i < n) {
      put(tok_->eot(), false);
      for (const auto& part : make_sample(task_, rng).parts)
        for (int32_t id : tok_->encode(part.text)) put(id, part.answer);
    }
  }

  std::string spec_;
  Task task_;
  std::unique_ptr<Tokenizer> tok_;  // a copy: the source outlives the caller's tokenizer
};

}  // namespace

std::vector<std::string> synthetic_task_names() { return {"copy", "mqar", "needle", "addition"}; }

std::string synthetic_tasks_help() {
  return "synthetic:NAME[:key=value,...], each example one line of text; exact-match accuracy in `grape "
         "eval`\n"
         "  copy       copy: qwhbe|qwhbe          length=16 letters to copy (1..4096)\n"
         "  addition   391+845=1236               digits=3 digits per operand (1..18)\n"
         "  mqar       a:3 k:9 x:1 ?k 9 ?a 3      pairs=8 key-value pairs (1..26), queries=min(4,pairs) "
         "asked\n"
         "  needle     qz mk [7319] wb ... lo|7319  length=256 prompt bytes (16..1048576), depth=uniform\n"
         "                                        (0 = first word .. 1 = last; task examples: "
         "0,.25,.5,.75,1)\n"
         "  every task: loss=all (train on every token, default) or loss=answer (train on the answers only)\n"
         "  e.g. --data synthetic:needle:length=512,depth=0.5  or  --data "
         "synthetic:copy:length=32,loss=answer\n";
}

namespace detail {

std::unique_ptr<DataSource> open_synthetic(const std::string& spec, const Tokenizer& tok) {
  Task task = parse_task(spec);
  if (tok.kind() == "none" || tok.eot() < 0)
    throw std::invalid_argument(fmt::format(
        "synthetic data is text: tokenizer '{}' cannot encode it (use byte, SentencePiece or a BPE "
        "vocabulary with <|endoftext|>)",
        tok.kind()));
  return std::make_unique<SyntheticSource>(spec, std::move(task), copy_tokenizer(tok));
}

}  // namespace detail

}  // namespace grape::data
