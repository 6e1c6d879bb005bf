// Data sources from text and token files: the Bible, .txt files or directories, nanoGPT/llm.c .bin arrays.
// Every source is a token stream cut into a training and a validation split; batches are windows of T+1
// consecutive tokens (x = the first T, y = the last T).
#include <fmt/format.h>
#include <sys/wait.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <tuple>

#include "grape/data.hpp"
#include "grape/io.hpp"

namespace grape::data {

namespace detail {
// "synthetic:NAME[:key=value,...]", defined in synthetic.cpp.
std::unique_ptr<DataSource> open_synthetic(const std::string& spec, const Tokenizer& tok);
}  // namespace detail

namespace {

namespace fs = std::filesystem;

std::string with_commas(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

// A run of tokens in one array: a memory-mapped file, or (file == nullptr) the source's in-memory tokens.
struct Segment {
  const TokenFile* file = nullptr;
  const int32_t* memory = nullptr;
  int64_t begin = 0, size = 0;
};

// One split: segments read end to end as a single stream (windows may cross from one file to the next,
// as they cross from one document to the next inside a file).
class Stream {
 public:
  void add(const Segment& s) {
    if (s.size <= 0) return;
    segments_.push_back(s);
    size_ += s.size;
  }
  int64_t size() const { return size_; }

  // Tokens [start, start+n) into out; ids read from files are checked against vocab.
  void copy(int64_t start, int64_t n, int64_t* out, int64_t vocab) const {
    for (const auto& s : segments_) {
      if (n == 0) return;
      if (start >= s.size) {
        start -= s.size;
        continue;
      }
      const int64_t take = std::min(n, s.size - start);
      if (s.file != nullptr) {
        s.file->copy(s.begin + start, take, out, vocab);
      } else {
        for (int64_t i = 0; i < take; ++i) out[i] = s.memory[s.begin + start + i];
      }
      out += take;
      n -= take;
      start = 0;
    }
    if (n != 0) throw std::logic_error("Stream::copy past the end");
  }

  // The first `cut` tokens and the rest.
  std::pair<Stream, Stream> split(int64_t cut) const {
    Stream head, tail;
    for (Segment s : segments_) {
      const int64_t h = std::clamp<int64_t>(cut, 0, s.size);
      head.add({s.file, s.memory, s.begin, h});
      tail.add({s.file, s.memory, s.begin + h, s.size - h});
      cut -= h;
    }
    return {head, tail};
  }

 private:
  std::vector<Segment> segments_;
  int64_t size_ = 0;
};

void check_shape(int64_t batch, int64_t T) {
  if (batch < 1 || T < 1)
    throw std::invalid_argument(fmt::format("batch size {} and context {} must both be >= 1", batch, T));
}

// Text and token-file sources. The streams point into `memory` and `files`, so a source is built in place
// (open_* below) and never copied or moved.
class TokenSource final : public DataSource {
 public:
  TokenSource(std::string name, const Tokenizer& tok)
      : name_(std::move(name)), tok_kind_(tok.kind()), vocab_(tok.vocab_size()) {}
  TokenSource(const TokenSource&) = delete;
  TokenSource& operator=(const TokenSource&) = delete;

  std::vector<int32_t> memory;   // text tokens
  std::vector<TokenFile> files;  // .bin arrays
  Stream train, val;
  std::string split_note;  // how the split was made, for describe()

  std::string describe() const override {
    return fmt::format("{}: {} tokens ({}), train {} / val {}{}", name_,
                       with_commas(train.size() + val.size()), tok_kind_, with_commas(train.size()),
                       with_commas(val.size()), split_note);
  }
  int64_t train_tokens() const override { return train.size(); }
  int64_t val_tokens() const override { return val.size(); }

  std::string fingerprint() const override {
    // FNV-1a over up to 4096 tokens at the start, middle and end of each split, after their sizes.
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](uint64_t v) {
      for (int b = 0; b < 8; ++b) h = (h ^ ((v >> (8 * b)) & 0xFF)) * 1099511628211ull;
    };
    std::vector<int64_t> buf;
    for (const Stream* s : {&train, &val}) {
      mix(uint64_t(s->size()));
      const int64_t n = std::min<int64_t>(4096, s->size());
      for (int64_t start : {int64_t(0), (s->size() - n) / 2, s->size() - n}) {
        buf.resize(size_t(n));
        s->copy(start, n, buf.data(), std::numeric_limits<int64_t>::max());
        for (int64_t t : buf) mix(uint64_t(t));
      }
    }
    return fmt::format("{} train + {} val tokens, {:016x}", train.size(), val.size(), h);
  }

  Batch train_batch(int64_t batch, int64_t T, std::mt19937_64& rng) const override {
    check_shape(batch, T);
    require(train, "training", T);
    auto w = torch::empty({batch, T + 1}, torch::kInt64);
    auto* p = w.data_ptr<int64_t>();
    // rng() % range rather than a std distribution: those differ between standard libraries.
    const uint64_t starts = static_cast<uint64_t>(train.size() - T);
    for (int64_t b = 0; b < batch; ++b)
      train.copy(static_cast<int64_t>(rng() % starts), T + 1, p + b * (T + 1), vocab_);
    return {w.narrow(1, 0, T).contiguous(), w.narrow(1, 1, T).contiguous(), {}};
  }

  // Window i covers tokens [i*T, i*T + T]: consecutive windows share one token, so every validation
  // token after the first is a target exactly once. Only full batches are returned, except that a split
  // too short for one full batch gives a single smaller batch.
  std::vector<Batch> val_batches(int64_t batch, int64_t T, int64_t max_batches) const override {
    check_shape(batch, T);
    if (max_batches < 1)
      throw std::invalid_argument(fmt::format("max validation batches {} < 1", max_batches));
    require(val, "validation", T);
    const int64_t windows = (val.size() - 1) / T;
    const int64_t full = windows / batch;
    const int64_t n_batches = full == 0 ? 1 : std::min(full, max_batches);
    const int64_t rows = full == 0 ? windows : batch;
    std::vector<Batch> out;
    for (int64_t k = 0; k < n_batches; ++k) {
      auto w = torch::empty({rows, T + 1}, torch::kInt64);
      auto* p = w.data_ptr<int64_t>();
      for (int64_t r = 0; r < rows; ++r) val.copy((k * batch + r) * T, T + 1, p + r * (T + 1), vocab_);
      out.push_back({w.narrow(1, 0, T).contiguous(), w.narrow(1, 1, T).contiguous(), {}});
    }
    return out;
  }

 private:
  static void require(const Stream& s, const char* split, int64_t T) {
    if (s.size() < T + 1)
      throw std::runtime_error(
          fmt::format("{} split has {} tokens, fewer than context+1 = {}; use more data or a "
                      "smaller context",
                      split, with_commas(s.size()), with_commas(T + 1)));
  }

  std::string name_, tok_kind_;
  int64_t vocab_;
};

void check_val_fraction(double f) {
  if (!(f >= 0.0 && f < 1.0))
    throw std::invalid_argument(fmt::format("val_fraction {} must be in [0, 1)", f));
}

// The last val_fraction of the stream is validation.
void split_by_fraction(TokenSource& src, const Stream& all, double val_fraction) {
  const int64_t n_val = static_cast<int64_t>(static_cast<double>(all.size()) * val_fraction);
  std::tie(src.train, src.val) = all.split(all.size() - n_val);
}

// Documents (the Bible, files) as one token stream, end-of-text before each, as GPT-2/nanoGPT data prep does.
std::unique_ptr<DataSource> open_text(const std::string& name, const std::vector<std::string>& documents,
                                      const Tokenizer& tok, const DataOptions& options) {
  if (tok.kind() == "none")
    throw std::invalid_argument(fmt::format(
        "data '{}' is text, and tokenizer 'none' reads token ids only: give .bin token files, or a tokenizer "
        "(byte, a SentencePiece .model, a BPE tokenizer.json)",
        name));
  if (tok.eot() < 0)
    throw std::invalid_argument(
        fmt::format("data '{}': the tokenizer has no end-of-text token to separate documents with", name));
  auto src = std::make_unique<TokenSource>(name, tok);
  for (const auto& doc : documents) {
    if (doc.empty()) continue;
    src->memory.push_back(static_cast<int32_t>(tok.eot()));
    auto ids = tok.encode(doc);
    src->memory.insert(src->memory.end(), ids.begin(), ids.end());
  }
  if (src->memory.empty()) throw std::runtime_error(fmt::format("data '{}': no text (empty)", name));
  Stream all;
  all.add({nullptr, src->memory.data(), 0, static_cast<int64_t>(src->memory.size())});
  split_by_fraction(*src, all, options.val_fraction);
  return src;
}

// The split a shard's name asks for, by its words ("fineweb_val_000000.bin", "train.bin"): val, train or
// neither ("" ).
std::string named_split(const fs::path& path) {
  std::string stem = path.stem().string(), word;
  std::vector<std::string> words;
  for (char c : stem + ".") {
    if (std::isalnum(static_cast<unsigned char>(c))) {
      word += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    } else if (!word.empty()) {
      words.push_back(word);
      word.clear();
    }
  }
  for (const auto& w : words)
    if (w == "val" || w == "valid" || w == "validation") return "val";
  for (const auto& w : words)
    if (w == "train") return "train";
  return "";
}

std::unique_ptr<DataSource> open_bins(const std::string& name, const std::vector<fs::path>& paths,
                                      const Tokenizer& tok, const DataOptions& options) {
  auto src = std::make_unique<TokenSource>(name, tok);
  src->files.reserve(paths.size());  // the streams keep pointers into `files`
  bool any_val = false, any_other = false;
  for (const auto& p : paths) {
    src->files.emplace_back(p.string());
    (named_split(p) == "val" ? any_val : any_other) = true;
  }
  // Bad shards (another tokenizer's ids) are found now rather than hours into a run.
  std::vector<int64_t> probe(1 << 16);
  for (const auto& f : src->files)
    f.copy(0, std::min<int64_t>(f.size(), probe.size()), probe.data(), tok.vocab_size());

  if (any_val && any_other) {
    for (size_t i = 0; i < paths.size(); ++i)
      (named_split(paths[i]) == "val" ? src->val : src->train)
          .add({&src->files[i], nullptr, 0, src->files[i].size()});
    src->split_note = " (split by file name)";
  } else {
    Stream all;
    for (const auto& f : src->files) all.add({&f, nullptr, 0, f.size()});
    split_by_fraction(*src, all, options.val_fraction);
  }
  if (src->train.size() + src->val.size() == 0)
    throw std::runtime_error(fmt::format("data '{}': no tokens", name));
  src->split_note +=
      fmt::format(", {} file{}, {}", paths.size(), paths.size() == 1 ? "" : "s", src->files[0].format());
  return src;
}

// Regular files under a directory, recursively, sorted by path; hidden files and directories are skipped
// (they include half-written temporaries).
std::vector<fs::path> list_files(const fs::path& dir) {
  std::vector<fs::path> out;
  for (auto it = fs::recursive_directory_iterator(dir); it != fs::recursive_directory_iterator(); ++it) {
    if (it->path().filename().string().starts_with(".")) {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file()) out.push_back(it->path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

std::string cache_dir(const DataOptions& options) {
  std::string dir = options.cache_dir;
  if (dir.empty()) {
    const char* env = std::getenv("GRAPE_CACHE");
    const char* home = std::getenv("HOME");
    if (env != nullptr && *env != '\0') {
      dir = env;
    } else if (home != nullptr && *home != '\0') {
      dir = std::string(home) + "/.cache/grape";
    } else {
      throw std::runtime_error("no cache directory: set GRAPE_CACHE (or HOME)");
    }
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw std::runtime_error(fmt::format("cannot create cache directory '{}': {}", dir, ec.message()));
  return dir;
}

std::string bible_text(const DataOptions& options) {
  const std::string path = cache_dir(options) + "/bible-kjv.txt";
  std::error_code ec;
  if (fs::is_regular_file(path, ec) && fs::file_size(path, ec) > 0) return io::read_file(path);

  std::FILE* pipe = ::popen("bible 'Gen1:1-Rev22:21' 2>/dev/null", "r");
  if (pipe == nullptr) throw std::runtime_error("cannot run the `bible` program (popen failed)");
  std::string text;
  char buf[1 << 16];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) text.append(buf, n);
  const int status = ::pclose(pipe);
  const int code = (status != -1 && WIFEXITED(status)) ? WEXITSTATUS(status) : -1;
  if (code == 127)
    throw std::runtime_error(
        "the `bible` program is not installed: install the Debian package bible-kjv "
        "(apt-get install bible-kjv)");
  // The whole text is 4.3 MB; anything much shorter is a broken installation, not the Bible.
  if (code != 0 || text.size() < 1000000)
    throw std::runtime_error(
        fmt::format("`bible 'Gen1:1-Rev22:21'` failed (exit status {}, {} bytes of output); "
                    "reinstall the Debian package bible-kjv",
                    code, text.size()));
  io::write_file_atomic(path, text);
  return text;
}

int64_t max_token_id(const std::string& spec) {
  std::error_code ec;
  const fs::path path(spec);
  std::vector<fs::path> bins;
  if (fs::is_directory(path, ec)) {
    for (const auto& f : list_files(path))
      if (f.extension() == ".bin") bins.push_back(f);
  } else if (path.extension() == ".bin" && fs::exists(path, ec)) {
    bins.push_back(path);
  }
  if (bins.empty())
    throw std::invalid_argument(fmt::format(
        "data '{}' is not .bin token files: only those can be read without a tokenizer (--tokenizer none)",
        spec));
  int64_t best = 0;
  for (const auto& b : bins) best = std::max(best, TokenFile(b.string()).max_id());
  return best;
}

std::string absolute_spec(const std::string& spec) {
  if (spec.empty() || spec == "bible" || spec == "byte" || spec == "none" || spec.starts_with("synthetic"))
    return spec;
  if (spec.find(',') != std::string::npos) {  // VOCAB.json,MERGES.txt
    const auto comma = spec.find(',');
    return absolute_spec(spec.substr(0, comma)) + "," + absolute_spec(spec.substr(comma + 1));
  }
  std::error_code ec;
  if (!fs::exists(spec, ec)) return spec;
  const fs::path abs = fs::absolute(spec, ec);
  return ec ? spec : abs.lexically_normal().string();
}

std::unique_ptr<DataSource> open_data(const std::string& spec, const Tokenizer& tok,
                                      const DataOptions& options) {
  check_val_fraction(options.val_fraction);
  if (spec == "synthetic" || spec.starts_with("synthetic:")) return detail::open_synthetic(spec, tok);
  if (spec == "bible") return open_text("bible", {bible_text(options)}, tok, options);

  std::error_code ec;
  const fs::path path(spec);
  if (spec.empty() || !fs::exists(path, ec))
    throw std::runtime_error(
        fmt::format("data '{}': no such file or directory (expected \"bible\", "
                    "\"synthetic:TASK\", a .txt or .bin file, or a directory of them)",
                    spec));
  std::vector<fs::path> files;
  if (fs::is_directory(path, ec)) {
    files = list_files(path);
    if (files.empty()) throw std::runtime_error(fmt::format("data '{}': the directory has no files", spec));
    std::vector<fs::path> bins;
    for (const auto& f : files)
      if (f.extension() == ".bin") bins.push_back(f);
    if (!bins.empty()) return open_bins(spec, bins, tok, options);
  } else if (path.extension() == ".bin") {
    return open_bins(spec, {path}, tok, options);
  } else {
    files.push_back(path);
  }
  std::vector<std::string> documents;
  for (const auto& f : files) documents.push_back(io::read_file(f.string()));
  auto name =
      files.size() == 1 && files[0] == path ? spec : fmt::format("{} ({} text files)", spec, files.size());
  return open_text(name, documents, tok, options);
}

}  // namespace grape::data
