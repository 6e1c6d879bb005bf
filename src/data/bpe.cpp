// GPT-2 style byte-level BPE (the vocabulary of nanoGPT's and llm.c's GPT-2 token files), read from a
// Hugging Face tokenizer.json or from vocab.json + merges.txt. Decoding is exact (a token is a string of
// byte symbols); encoding applies the merges by rank to the words of GPT-2's pre-tokenizer.
//
// GPT-2 splits text with the regex 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
// ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+. It is implemented by hand over code points, exactly for ASCII; outside
// ASCII a code point counts as a letter unless it is Unicode white space (no Unicode tables here), so text in
// other scripts may split into words differently from GPT-2's encoder (the ids still decode to the same
// text).
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "grape/data.hpp"
#include "grape/io.hpp"

namespace grape::data {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kEndOfText = "<|endoftext|>";

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

// UTF-8 to code points; a byte that does not start a valid sequence stands for itself (as U+FFFD would,
// but keeping the byte, so every input encodes and decodes back to itself).
struct CodePoint {
  uint32_t cp;
  size_t begin, end;  // its bytes in the text
};
std::vector<CodePoint> code_points(std::string_view s) {
  std::vector<CodePoint> out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    bool ok = len > 0 && i + len <= s.size();
    for (size_t k = 1; ok && k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      ok = (cc >> 6) == 2;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (!ok) len = 1, cp = 0xDC00 + c;  // a stray byte: a private marker, classified as a letter
    out.push_back({cp, i, i + len});
    i += len;
  }
  return out;
}

bool is_space(uint32_t c) {
  return c == ' ' || (c >= 9 && c <= 13) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}
bool is_digit(uint32_t c) { return c >= '0' && c <= '9'; }
bool is_letter(uint32_t c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= 0x80 && !is_space(c));
}
bool is_other(uint32_t c) { return !is_space(c) && !is_letter(c) && !is_digit(c); }

// The words of GPT-2's pre-tokenizer, as byte ranges of the text.
std::vector<std::string_view> gpt2_words(std::string_view text) {
  const auto cps = code_points(text);
  const size_t n = cps.size();
  std::vector<std::string_view> words;
  auto emit = [&](size_t a, size_t b) {
    words.push_back(text.substr(cps[a].begin, cps[b - 1].end - cps[a].begin));
  };
  auto run = [&](size_t j, bool (*cls)(uint32_t)) {
    while (j < n && cls(cps[j].cp)) ++j;
    return j;
  };
  for (size_t i = 0; i < n;) {
    const uint32_t c = cps[i].cp;
    if (c == '\'' && i + 1 < n) {  // contractions, as GPT-2 writes them (lower case only)
      const uint32_t a = cps[i + 1].cp, b = i + 2 < n ? cps[i + 2].cp : 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        emit(i, i + 2), i += 2;
        continue;
      }
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
        emit(i, i + 3), i += 3;
        continue;
      }
    }
    const size_t s = (c == ' ' && i + 1 < n) ? i + 1 : i;  // the optional leading space
    bool done = false;
    for (auto cls : {is_letter, is_digit, is_other}) {
      if (cls(cps[s].cp)) {
        const size_t j = run(s, cls);
        emit(i, j), i = j, done = true;
        break;
      }
    }
    if (done) continue;
    // White space: \s+(?!\S) leaves the last space of a run to the word after it; a lone one stands alone.
    const size_t j = run(i, is_space);
    const size_t end = (j == n || j - i == 1) ? j : j - 1;
    emit(i, end), i = end;
  }
  return words;
}

// GPT-2's map from bytes to printable code points, so that every token is a string of printable symbols.
const std::array<uint32_t, 256>& byte_symbols() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    std::vector<bool> direct(256, false);
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) t[b] = direct[b] ? uint32_t(b) : next++;
    return t;
  }();
  return table;
}

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(std::map<std::string, int64_t> vocab, std::vector<std::pair<std::string, std::string>> merges,
               std::map<std::string, int64_t> added, const std::string& what)
      : vocab_(std::move(vocab)), merges_(std::move(merges)), added_(std::move(added)) {
    std::unordered_map<uint32_t, int> symbol_byte;
    for (int b = 0; b < 256; ++b) symbol_byte[byte_symbols()[b]] = b;
    for (int b = 0; b < 256; ++b) append_utf8(symbol_text_[b], byte_symbols()[b]);
    int64_t max_id = -1;
    for (const auto& [token, id] : vocab_) {
      if (id < 0 || id > (int64_t(1) << 31))
        throw std::runtime_error(fmt::format("{}: token '{}' has id {}, outside 0..2^31", what, token, id));
      max_id = std::max(max_id, id);
    }
    for (const auto& [token, id] : added_) max_id = std::max(max_id, id);
    if (max_id < 0) throw std::runtime_error(fmt::format("{}: the vocabulary is empty", what));
    vocab_size_ = max_id + 1;
    bytes_.assign(size_t(vocab_size_), std::string());
    known_.assign(size_t(vocab_size_), false);
    for (const auto& [token, id] : vocab_) {
      std::string bytes;
      for (const auto& cp : code_points(token)) {
        auto it = symbol_byte.find(cp.cp);
        if (it == symbol_byte.end()) {
          bytes.clear();
          if (!added_.count(token))
            throw std::runtime_error(fmt::format(
                "{}: token '{}' (id {}) is not made of GPT-2 byte symbols: not a byte-level BPE vocabulary",
                what, token, id));
          bytes = token;
          break;
        }
        bytes += char(it->second);
      }
      bytes_[size_t(id)] = bytes;
      known_[size_t(id)] = true;
    }
    for (const auto& [token, id] : added_) {
      bytes_[size_t(id)] = token;
      known_[size_t(id)] = true;
    }
    for (int b = 0; b < 256; ++b)
      if (!vocab_.count(symbol_text_[b]))
        throw std::runtime_error(fmt::format(
            "{}: byte {} has no token of its own: not a byte-level (GPT-2 style) BPE vocabulary", what, b));
    for (size_t r = 0; r < merges_.size(); ++r) rank_.emplace(merges_[r].first + " " + merges_[r].second, r);
    eot_ = added_.count(kEndOfText)   ? added_.at(kEndOfText)
           : vocab_.count(kEndOfText) ? vocab_.at(kEndOfText)
                                      : -1;
    if (eot_ >= 0)
      bytes_[size_t(eot_)].clear();  // end-of-text decodes to nothing, as with the other tokenizers
  }

  std::string kind() const override { return "bpe"; }
  int64_t vocab_size() const override { return vocab_size_; }
  int64_t eot() const override { return eot_; }

  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    std::lock_guard<std::mutex> lock(cache_mutex_);
    for (auto word : gpt2_words(text)) {
      auto it = cache_.find(std::string(word));
      if (it == cache_.end()) it = cache_.emplace(std::string(word), encode_word(word)).first;
      ids.insert(ids.end(), it->second.begin(), it->second.end());
    }
    if (cache_.size() > 200000) cache_.clear();  // bounded memory on a large corpus
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    for (int32_t id : ids) out += piece(id);
    return out;
  }

  std::string piece(int32_t id) const override {
    if (id < 0 || id >= vocab_size_ || !known_[size_t(id)])
      throw std::out_of_range(fmt::format("bpe tokenizer: id {} is not in the vocabulary", id));
    return bytes_[size_t(id)];
  }

  // A tokenizer.json that this reader loads back: the vocabulary, the merges and the added tokens.
  std::string model_bytes() const override {
    json j;
    j["model"]["type"] = "BPE";
    j["model"]["vocab"] = vocab_;
    json merges = json::array();
    for (const auto& [a, b] : merges_) merges.push_back(a + " " + b);
    j["model"]["merges"] = merges;
    j["added_tokens"] = json::array();
    for (const auto& [token, id] : added_) j["added_tokens"].push_back({{"id", id}, {"content", token}});
    j["pre_tokenizer"] = {{"type", "ByteLevel"}};
    return j.dump() + "\n";
  }

 private:
  // The merges applied by rank (lowest first) to one word's byte symbols, as GPT-2's encoder does.
  std::vector<int32_t> encode_word(std::string_view word) const {
    std::vector<std::string> parts;
    for (char c : word) parts.push_back(symbol_text_[static_cast<unsigned char>(c)]);
    while (parts.size() > 1) {
      size_t best = 0, best_rank = SIZE_MAX;
      for (size_t i = 0; i + 1 < parts.size(); ++i) {
        auto it = rank_.find(parts[i] + " " + parts[i + 1]);
        if (it != rank_.end() && it->second < best_rank) best_rank = it->second, best = i;
      }
      if (best_rank == SIZE_MAX) break;
      const std::string a = parts[best], b = parts[best + 1];
      std::vector<std::string> merged;
      for (size_t i = 0; i < parts.size(); ++i) {
        if (i + 1 < parts.size() && parts[i] == a && parts[i + 1] == b) {
          merged.push_back(a + b);
          ++i;
        } else {
          merged.push_back(parts[i]);
        }
      }
      parts = std::move(merged);
    }
    std::vector<int32_t> ids;
    for (const auto& p : parts) {
      auto it = vocab_.find(p);
      if (it == vocab_.end())
        throw std::runtime_error(
            fmt::format("bpe tokenizer: a merge made '{}', which the vocabulary lacks", p));
      ids.push_back(int32_t(it->second));
    }
    return ids;
  }

  std::map<std::string, int64_t> vocab_;
  std::vector<std::pair<std::string, std::string>> merges_;
  std::map<std::string, int64_t> added_;
  std::unordered_map<std::string, size_t> rank_;
  std::vector<std::string> bytes_;  // by id
  std::vector<bool> known_;
  std::string symbol_text_[256];
  int64_t vocab_size_ = 0, eot_ = -1;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

json parse_json_file(const std::string& path) {
  try {
    return json::parse(io::read_file(path));
  } catch (const json::exception& e) {
    throw std::runtime_error(fmt::format("'{}': not valid JSON ({})", path, e.what()));
  }
}

std::pair<std::string, std::string> split_merge(const std::string& line, const std::string& what) {
  const auto sp = line.find(' ');
  if (sp == std::string::npos || sp == 0 || sp + 1 >= line.size() ||
      line.find(' ', sp + 1) != std::string::npos)
    throw std::runtime_error(
        fmt::format("{}: merge '{}' is not two symbols separated by one space", what, line));
  return {line.substr(0, sp), line.substr(sp + 1)};
}

std::map<std::string, int64_t> read_vocab(const json& v, const std::string& what) {
  if (!v.is_object())
    throw std::runtime_error(fmt::format("{}: the vocabulary is not an object of token: id", what));
  std::map<std::string, int64_t> vocab;
  for (const auto& [token, id] : v.items()) {
    if (!id.is_number_integer())
      throw std::runtime_error(
          fmt::format("{}: token '{}' has id {}, not an integer", what, token, id.dump()));
    vocab[token] = id.get<int64_t>();
  }
  return vocab;
}

// A Hugging Face tokenizer.json (or the one a grape run stores), `what` naming it in errors.
std::unique_ptr<Tokenizer> from_tokenizer_json(const json& j, const std::string& what) {
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
    throw std::runtime_error(fmt::format("{}: not a tokenizer.json (no \"model\" object)", what));
  const json& m = j["model"];
  if (m.contains("type") && m["type"] != "BPE")
    throw std::runtime_error(fmt::format("{}: model type {} is not BPE", what, m["type"].dump()));
  if (!m.contains("vocab") || !m.contains("merges") || !m["merges"].is_array())
    throw std::runtime_error(fmt::format("{}: model lacks its vocab or merges", what));
  std::vector<std::pair<std::string, std::string>> merges;
  for (const auto& e : m["merges"]) {
    if (e.is_string())
      merges.push_back(split_merge(e.get<std::string>(), what));
    else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string())
      merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
    else
      throw std::runtime_error(
          fmt::format("{}: merge {} is neither \"a b\" nor [\"a\", \"b\"]", what, e.dump()));
  }
  std::map<std::string, int64_t> added;
  if (j.contains("added_tokens") && j["added_tokens"].is_array())
    for (const auto& t : j["added_tokens"])
      if (t.is_object() && t.contains("id") && t["id"].is_number_integer() && t.contains("content") &&
          t["content"].is_string())
        added[t["content"].get<std::string>()] = t["id"].get<int64_t>();
  return std::make_unique<BpeTokenizer>(read_vocab(m["vocab"], what), std::move(merges), std::move(added),
                                        what);
}

std::unique_ptr<Tokenizer> from_vocab_and_merges(const std::string& vocab_path,
                                                 const std::string& merges_path) {
  const std::string what = fmt::format("'{}' + '{}'", vocab_path, merges_path);
  auto vocab = read_vocab(parse_json_file(vocab_path), "'" + vocab_path + "'");
  std::vector<std::pair<std::string, std::string>> merges;
  std::istringstream in(io::read_file(merges_path));
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line.rfind("#version", 0) == 0) continue;
    merges.push_back(split_merge(line, "'" + merges_path + "'"));
  }
  return std::make_unique<BpeTokenizer>(std::move(vocab), std::move(merges), std::map<std::string, int64_t>{},
                                        what);
}

}  // namespace

bool is_bpe_spec(const std::string& spec) {
  if (spec.find(',') != std::string::npos) return true;  // VOCAB.json,MERGES.txt
  const fs::path p(spec);
  if (p.extension() == ".json") return true;
  std::error_code ec;
  return fs::is_directory(p, ec) && (fs::exists(p / "tokenizer.json", ec) ||
                                     (fs::exists(p / "vocab.json", ec) && fs::exists(p / "merges.txt", ec)));
}

std::unique_ptr<Tokenizer> load_bpe(const std::string& spec) {
  auto need = [](const std::string& path) {
    if (!fs::is_regular_file(path))
      throw std::runtime_error(fmt::format("tokenizer '{}': no such file", path));
    return path;
  };
  if (const auto comma = spec.find(','); comma != std::string::npos)
    return from_vocab_and_merges(need(spec.substr(0, comma)), need(spec.substr(comma + 1)));
  const fs::path p(spec);
  std::error_code ec;
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / "tokenizer.json", ec)) return load_bpe((p / "tokenizer.json").string());
    return from_vocab_and_merges(need((p / "vocab.json").string()), need((p / "merges.txt").string()));
  }
  if (p.filename() == "vocab.json" && fs::exists(p.parent_path() / "merges.txt", ec))
    return from_vocab_and_merges(need(spec), (p.parent_path() / "merges.txt").string());
  return from_tokenizer_json(parse_json_file(need(spec)), "'" + spec + "'");
}

std::unique_ptr<Tokenizer> bpe_from_bytes(const std::string& bytes) {
  json j;
  try {
    j = json::parse(bytes);
  } catch (const json::exception& e) {
    throw std::runtime_error(fmt::format("stored BPE tokenizer: not valid JSON ({})", e.what()));
  }
  return from_tokenizer_json(j, "stored BPE tokenizer");
}

}  // namespace grape::data
