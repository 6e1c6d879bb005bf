// Data layer: tokenizers, token files (llm.c, nanoGPT), text/bin/Bible sources, synthetic tasks.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "grape/data.hpp"
#include "grape/io.hpp"

namespace fs = std::filesystem;
using namespace grape::data;

namespace {

// A fresh directory under the system temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name)
      : path(fs::temp_directory_path() / fmt::format("grape-test-data-{}-{}", ::getpid(), name)) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

// Runs f and returns the message of the exception of type E it throws ("" if none: the test then fails).
template <class E, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

std::vector<int64_t> row(const torch::Tensor& t, int64_t r) {
  auto c = t[r].contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

// The text of ids under the byte tokenizer, keeping eot visible as '#'.
std::string bytes_of(const std::vector<int64_t>& ids) {
  std::string s;
  for (auto id : ids) s += id == 256 ? '#' : static_cast<char>(id);
  return s;
}

std::string text_of(const Tokenizer& tok, const std::vector<int32_t>& ids) { return tok.decode(ids); }

// The Bible text from a cache shared by the tests of this process (the `bible` program runs once).
const std::string& bible() {
  static TempDir dir("bible-cache");
  static std::string text = bible_text({0.1, dir.path.string()});
  return text;
}

}  // namespace

// ---- tokenizers --------------------------------------------------------------------------------------

TEST(DataTokenizer, ByteRoundTripsUtf8) {
  auto tok = make_tokenizer("byte");
  EXPECT_EQ(tok->kind(), "byte");
  EXPECT_EQ(tok->vocab_size(), 257);
  EXPECT_EQ(tok->eot(), 256);
  EXPECT_EQ(tok->model_bytes(), "");
  const std::string text = "grape \xC3\xA9t\xC3\xA9 \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x8D\x87\n\t\x01";
  auto ids = tok->encode(text);
  ASSERT_EQ(ids.size(), text.size());
  EXPECT_EQ(ids[0], 'g');
  EXPECT_EQ(ids[6], 0xC3);  // raw bytes, not code points
  EXPECT_EQ(tok->decode(ids), text);
  ids.insert(ids.begin() + 3, 256);  // eot decodes to nothing
  EXPECT_EQ(tok->decode(ids), text);
  EXPECT_EQ(tok->piece(0xE4), "\xE4");
  EXPECT_EQ(tok->piece(256), "");
  EXPECT_THROW(tok->piece(257), std::out_of_range);
}

TEST(DataTokenizer, MissingModelFileIsAClearError) {
  auto msg = error_of<std::runtime_error>([] { make_tokenizer("/nonexistent/tok.model"); });
  EXPECT_NE(msg.find("/nonexistent/tok.model"), std::string::npos) << msg;
  EXPECT_NE(msg.find("no such file"), std::string::npos) << msg;
  msg = error_of<std::runtime_error>([] { sentencepiece_from_bytes("definitely not a protobuf"); });
  EXPECT_NE(msg.find("not a SentencePiece model"), std::string::npos) << msg;
}

TEST(DataTokenizer, SentencePieceTrainsEncodesDecodesAndReloads) {
  TempDir dir("sp");
  const std::string text = bible().substr(0, 200000);
  grape::io::write_file_atomic(dir / "in.txt", text);
  SentencePieceTraining s;
  s.inputs = {dir / "in.txt"};
  s.vocab_size = 400;
  s.out_path = dir / "tok.model";
  train_sentencepiece(s);
  // Only the model was written beside the input: no .vocab, no temporaries.
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir.path)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"in.txt", "tok.model"}));

  auto tok = make_tokenizer(dir / "tok.model");
  EXPECT_EQ(tok->kind(), "sentencepiece");
  EXPECT_EQ(tok->vocab_size(), 400);
  EXPECT_EQ(tok->eot(), 1);
  EXPECT_EQ(tok->model_bytes(), grape::io::read_file(dir / "tok.model"));

  // Round trip, including characters the training text never had (byte fallback) and odd whitespace.
  const std::string sample =
      "In the beginning God created\n  the heaven \xC3\xA9\xE2\x82\xAC and the earth.\n\n";
  auto ids = tok->encode(sample);
  EXPECT_EQ(tok->decode(ids), sample);
  for (int32_t id : ids) EXPECT_NE(id, tok->eot());
  ids.push_back(static_cast<int32_t>(tok->eot()));
  EXPECT_EQ(tok->decode(ids), sample);
  std::string pieces;
  for (int32_t id : tok->encode(sample)) pieces += tok->piece(id);
  EXPECT_EQ(pieces, sample);  // piece() by piece() also gives the text back (U+2581 shown as a space)

  // It compresses English: well under one token per byte on text it was trained on.
  const std::string chunk = text.substr(0, 150000);  // longer than one 64 KB encode chunk
  auto whole = tok->encode(chunk);
  EXPECT_LT(whole.size(), chunk.size() * 6 / 10);
  EXPECT_EQ(tok->decode(whole), chunk);
  // Encoding line by line gives the same ids: encode's chunking is invisible.
  std::vector<int32_t> by_line;
  for (size_t pos = 0; pos < chunk.size();) {
    size_t end = std::min(chunk.find('\n', pos), chunk.size() - 1) + 1;
    auto part = tok->encode(std::string_view(chunk).substr(pos, end - pos));
    by_line.insert(by_line.end(), part.begin(), part.end());
    pos = end;
  }
  EXPECT_EQ(by_line, whole);

  // From serialized bytes: the same tokenizer.
  auto again = sentencepiece_from_bytes(tok->model_bytes());
  EXPECT_EQ(again->vocab_size(), 400);
  EXPECT_EQ(again->encode(chunk), whole);
  EXPECT_EQ(again->model_bytes(), tok->model_bytes());

  // Synthetic tasks work with it too (the source keeps its own copy of the tokenizer).
  auto data = open_data("synthetic:addition:digits=2", *again);
  again.reset();
  auto ex = data->task_examples(5, 3);
  ASSERT_EQ(ex.size(), 5u);
  for (const auto& e : ex) {
    EXPECT_EQ(e.prompt[0], tok->eot());
    std::smatch m;
    std::string p = text_of(*tok, e.prompt), a = text_of(*tok, e.answer);
    ASSERT_TRUE(std::regex_match(p, m, std::regex(R"((\d+)\+(\d+)=)"))) << p;
    EXPECT_EQ(a, std::to_string(std::stoi(m[1]) + std::stoi(m[2])) + "\n");
  }
}

TEST(DataTokenizer, UnigramTrains) {
  TempDir dir("unigram");
  grape::io::write_file_atomic(dir / "in.txt", bible().substr(0, 60000));
  train_sentencepiece({{dir / "in.txt"}, 350, "unigram", dir / "u.model"});
  auto tok = load_sentencepiece(dir / "u.model");
  EXPECT_EQ(tok->vocab_size(), 350);
  EXPECT_EQ(tok->decode(tok->encode("And God said, Let there be light\n")),
            "And God said, Let there be light\n");
}

TEST(DataTokenizer, TrainingErrorsAreClear) {
  TempDir dir("sp-errors");
  grape::io::write_file_atomic(dir / "in.txt", bible().substr(0, 30000));
  auto msg = error_of<std::runtime_error>([&] {
    train_sentencepiece({{dir / "missing.txt"}, 400, "bpe", dir / "x.model"});
  });
  EXPECT_NE(msg.find("missing.txt"), std::string::npos) << msg;
  msg = error_of<std::runtime_error>([&] {
    train_sentencepiece({{dir / "in.txt"}, 100000, "bpe", dir / "x.model"});
  });
  EXPECT_NE(msg.find("Vocabulary size too high (100000)"), std::string::npos) << msg;
  msg = error_of<std::runtime_error>([&] {
    train_sentencepiece({{dir / "in.txt"}, 100, "bpe", dir / "x.model"});
  });
  EXPECT_NE(msg.find("Vocabulary size is smaller than required_chars"), std::string::npos) << msg;
  msg = error_of<std::invalid_argument>([&] {
    train_sentencepiece({{dir / "in.txt"}, 400, "wordpiece", dir / "x.model"});
  });
  EXPECT_NE(msg.find("wordpiece"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(dir / "x.model"));
}

// ---- token files -------------------------------------------------------------------------------------

namespace {
void write_bytes(const std::string& path, const std::string& bytes) {
  grape::io::write_file_atomic(path, bytes);
}
std::string le32(uint32_t v) {
  return {char(v & 255), char((v >> 8) & 255), char((v >> 16) & 255), char(v >> 24)};
}
std::string le16(uint16_t v) { return {char(v & 255), char(v >> 8)}; }
}  // namespace

TEST(DataTokenFile, LlmcVersion1And2RoundTrip) {
  TempDir dir("shards");
  std::vector<int32_t> small = {0, 1, 256, 50256, 65535, 7};
  write_token_shard(dir / "v1.bin", small);
  EXPECT_EQ(fs::file_size(dir / "v1.bin"), 1024u + 2 * small.size());
  TokenFile f1(dir / "v1.bin");
  EXPECT_EQ(f1.format(), "llm.c v1");
  EXPECT_EQ(f1.bytes_per_token(), 2);
  ASSERT_EQ(f1.size(), 6);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(f1.at(i), small[i]);
  std::string raw = grape::io::read_file(dir / "v1.bin");
  EXPECT_EQ(raw.substr(0, 12), le32(20240520) + le32(1) + le32(6));  // the header, byte for byte
  EXPECT_EQ(raw.substr(1024, 4), le16(0) + le16(1));

  std::vector<int32_t> big = {3, 70000, 100277, 0};
  write_token_shard(dir / "v2.bin", big);
  EXPECT_EQ(fs::file_size(dir / "v2.bin"), 1024u + 4 * big.size());
  TokenFile f2(dir / "v2.bin");
  EXPECT_EQ(f2.format(), "llm.c v2");
  EXPECT_EQ(f2.bytes_per_token(), 4);
  std::vector<int64_t> out(3);
  f2.copy(1, 3, out.data(), 200000);
  EXPECT_EQ(out, (std::vector<int64_t>{70000, 100277, 0}));
  EXPECT_THROW(f2.at(4), std::out_of_range);

  TokenFile moved(std::move(f2));  // a moved mapping keeps working
  EXPECT_EQ(moved.at(1), 70000);
  EXPECT_EQ(moved.path(), dir / "v2.bin");
}

TEST(DataTokenFile, NanoGptUint16) {
  TempDir dir("nanogpt");
  write_bytes(dir / "train.bin", le16(5) + le16(300) + le16(65535));
  TokenFile f(dir / "train.bin");
  EXPECT_EQ(f.format(), "nanoGPT uint16");
  ASSERT_EQ(f.size(), 3);
  EXPECT_EQ(f.at(1), 300);
  EXPECT_EQ(f.at(2), 65535);
}

TEST(DataTokenFile, BadFilesAreRefusedWithClearErrors) {
  TempDir dir("bad-shards");
  std::string header = le32(20240520) + le32(3) + le32(2);
  header.resize(1024, '\0');
  write_bytes(dir / "v3.bin", header + le16(1) + le16(2));
  auto msg = error_of<std::runtime_error>([&] { TokenFile f(dir / "v3.bin"); });
  EXPECT_NE(msg.find("version 3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("v3.bin"), std::string::npos) << msg;

  write_token_shard(dir / "t.bin", {1, 2, 3, 4, 5});  // 1034 bytes
  std::string raw = grape::io::read_file(dir / "t.bin");
  write_bytes(dir / "truncated.bin", raw.substr(0, raw.size() - 2));
  msg = error_of<std::runtime_error>([&] { TokenFile f(dir / "truncated.bin"); });
  EXPECT_NE(msg.find("5 tokens (1034 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("has 1032 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  write_bytes(dir / "long.bin", raw + "xx");
  msg = error_of<std::runtime_error>([&] { TokenFile f(dir / "long.bin"); });
  EXPECT_NE(msg.find("has 1036 bytes"), std::string::npos) << msg;
  write_bytes(dir / "header.bin", raw.substr(0, 100));
  msg = error_of<std::runtime_error>([&] { TokenFile f(dir / "header.bin"); });
  EXPECT_NE(msg.find("header is truncated"), std::string::npos) << msg;

  write_bytes(dir / "odd.bin", "abcde");
  msg = error_of<std::runtime_error>([&] { TokenFile f(dir / "odd.bin"); });
  EXPECT_NE(msg.find("5 bytes"), std::string::npos) << msg;
  write_bytes(dir / "empty.bin", "");
  msg = error_of<std::runtime_error>([&] { TokenFile f(dir / "empty.bin"); });
  EXPECT_NE(msg.find("empty"), std::string::npos) << msg;
  msg = error_of<std::runtime_error>([&] { TokenFile f(dir / "none.bin"); });
  EXPECT_NE(msg.find("none.bin"), std::string::npos) << msg;
  msg = error_of<std::runtime_error>([&] { TokenFile f(dir.path.string()); });
  EXPECT_NE(msg.find("not a regular file"), std::string::npos) << msg;
}

TEST(DataTokenFile, TokenAboveVocabNamesFileAndIndex) {
  TempDir dir("vocab");
  write_token_shard(dir / "s.bin", {1, 2, 300, 4});
  TokenFile f(dir / "s.bin");
  std::vector<int64_t> out(4);
  auto msg = error_of<std::runtime_error>([&] { f.copy(0, 4, out.data(), 257); });
  EXPECT_NE(msg.find("s.bin"), std::string::npos) << msg;
  EXPECT_NE(msg.find("token ID 300 at index 2 is >= vocab size 257"), std::string::npos) << msg;
  f.copy(0, 2, out.data(), 257);  // the ids before it are fine
  EXPECT_EQ(out[1], 2);
  EXPECT_THROW(write_token_shard(dir / "neg.bin", {1, -1}), std::invalid_argument);
}

// ---- text and token sources --------------------------------------------------------------------------

namespace {
// 10,000 bytes of varied text; the source's stream is eot followed by these bytes.
std::string sample_text() {
  std::string s;
  for (int i = 0; s.size() < 10000; ++i) s += fmt::format("line {} of the sample: {}\n", i, i * 7919 % 1000);
  s.resize(10000);
  return s;
}
std::vector<int64_t> stream_of(const std::string& text) {
  std::vector<int64_t> s = {256};
  for (unsigned char c : text) s.push_back(c);
  return s;
}
}  // namespace

TEST(DataSource, TextFileSplitAndDescribe) {
  TempDir dir("text");
  write_bytes(dir / "a.txt", sample_text());
  auto tok = make_byte_tokenizer();
  auto data = open_data(dir / "a.txt", *tok, {0.1, dir / "cache"});
  EXPECT_EQ(data->train_tokens() + data->val_tokens(), 10001);
  EXPECT_EQ(data->val_tokens(), 1000);  // floor(10001 * 0.1)
  EXPECT_EQ(data->describe(), (dir / "a.txt") + ": 10,001 tokens (byte), train 9,001 / val 1,000");
  EXPECT_EQ(data->task_examples(3, 1).size(), 0u);
}

TEST(DataSource, TrainBatchIsDeterministicShiftedAndFromTheTrainSplit) {
  TempDir dir("batches");
  const std::string text = sample_text();
  write_bytes(dir / "a.txt", text);
  auto tok = make_byte_tokenizer();
  auto data = open_data(dir / "a.txt", *tok, {0.1, dir / "cache"});
  const int64_t B = 6, T = 32;
  std::mt19937_64 r1(7), r2(7), r3(8);
  auto b1 = data->train_batch(B, T, r1), b2 = data->train_batch(B, T, r2), b3 = data->train_batch(B, T, r3);
  ASSERT_EQ(b1.x.sizes(), (torch::IntArrayRef{B, T}));
  EXPECT_EQ(b1.x.dtype(), torch::kInt64);
  EXPECT_FALSE(b1.mask.defined());
  EXPECT_TRUE(torch::equal(b1.x, b2.x) && torch::equal(b1.y, b2.y));
  EXPECT_FALSE(torch::equal(b1.x, b3.x));
  EXPECT_TRUE(torch::equal(b1.x.narrow(1, 1, T - 1), b1.y.narrow(1, 0, T - 1)));
  // The rng alone decides the batch: the next batch from r1 equals the next from r2.
  EXPECT_TRUE(torch::equal(data->train_batch(B, T, r1).x, data->train_batch(B, T, r2).x));

  // Every window is T+1 consecutive stream tokens that lie wholly in the training split.
  auto stream = stream_of(text);
  const int64_t n_train = data->train_tokens();
  for (int64_t r = 0; r < B; ++r) {
    auto w = row(b1.x, r);
    w.push_back(row(b1.y, r).back());
    int64_t found = -1;
    for (int64_t s = 0; s + T + 1 <= int64_t(stream.size()) && found < 0; ++s)
      if (std::equal(w.begin(), w.end(), stream.begin() + s)) found = s;
    ASSERT_GE(found, 0) << "window " << r << " is not in the text";
    EXPECT_LE(found + T + 1, n_train);
  }
}

TEST(DataSource, ValWindowsAreConsecutiveAndInOrder) {
  TempDir dir("val");
  const std::string text = sample_text();
  write_bytes(dir / "a.txt", text);
  auto tok = make_byte_tokenizer();
  auto data = open_data(dir / "a.txt", *tok, {0.1, dir / "cache"});
  auto stream = stream_of(text);
  const int64_t n_train = data->train_tokens(), T = 10;
  auto val = data->val_batches(2, T, 100);
  ASSERT_EQ(val.size(), 49u);  // (1000 - 1) / 10 = 99 windows, 49 full batches of 2
  for (size_t k = 0; k < val.size(); ++k) {
    EXPECT_FALSE(val[k].mask.defined());
    for (int64_t r = 0; r < 2; ++r) {
      const int64_t start = n_train + (int64_t(k) * 2 + r) * T;
      EXPECT_EQ(row(val[k].x, r), std::vector<int64_t>(stream.begin() + start, stream.begin() + start + T));
      EXPECT_EQ(row(val[k].y, r),
                std::vector<int64_t>(stream.begin() + start + 1, stream.begin() + start + T + 1));
    }
  }
  EXPECT_EQ(data->val_batches(2, T, 3).size(), 3u);
  auto short_split = data->val_batches(200, T, 5);  // not one full batch: one batch of every window
  ASSERT_EQ(short_split.size(), 1u);
  EXPECT_EQ(short_split[0].x.size(0), 99);
  EXPECT_TRUE(torch::equal(data->val_batches(2, T, 5)[4].x, val[4].x));  // the same every call
}

TEST(DataSource, TooShortSplitsAreClearErrors) {
  TempDir dir("short");
  write_bytes(dir / "a.txt", sample_text());
  auto tok = make_byte_tokenizer();
  auto data = open_data(dir / "a.txt", *tok, {0.1, dir / "cache"});
  auto msg = error_of<std::runtime_error>([&] { data->val_batches(1, 2000, 1); });
  EXPECT_NE(msg.find("validation split has 1,000 tokens, fewer than context+1 = 2,001"), std::string::npos)
      << msg;
  std::mt19937_64 rng(1);
  msg = error_of<std::runtime_error>([&] { data->train_batch(1, 9001, rng); });
  EXPECT_NE(msg.find("training split has 9,001 tokens, fewer than context+1 = 9,002"), std::string::npos)
      << msg;
  data->train_batch(1, 9000, rng);  // exactly one window fits
  EXPECT_THROW(data->train_batch(0, 8, rng), std::invalid_argument);
  auto no_val = open_data(dir / "a.txt", *tok, {0.0, dir / "cache"});
  EXPECT_EQ(no_val->val_tokens(), 0);
  EXPECT_THROW(no_val->val_batches(1, 8, 1), std::runtime_error);
  EXPECT_THROW(open_data(dir / "a.txt", *tok, {1.0, dir / "cache"}), std::invalid_argument);
}

TEST(DataSource, MissingAndEmptyInputsAreClearErrors) {
  TempDir dir("missing");
  auto tok = make_byte_tokenizer();
  auto msg = error_of<std::runtime_error>([&] { open_data(dir / "nope.txt", *tok, {0.1, dir / "cache"}); });
  EXPECT_NE(msg.find("nope.txt': no such file or directory"), std::string::npos) << msg;
  write_bytes(dir / "empty.txt", "");
  msg = error_of<std::runtime_error>([&] { open_data(dir / "empty.txt", *tok, {0.1, dir / "cache"}); });
  EXPECT_NE(msg.find("no text"), std::string::npos) << msg;
  fs::create_directories(dir.path / "void");
  msg = error_of<std::runtime_error>([&] { open_data(dir / "void", *tok, {0.1, dir / "cache"}); });
  EXPECT_NE(msg.find("has no files"), std::string::npos) << msg;
}

TEST(DataSource, DirectoryOfTextFilesInNameOrder) {
  TempDir dir("textdir");
  fs::create_directories(dir.path / "d" / "sub");
  write_bytes(dir / "d/b.txt", "bbbb");
  write_bytes(dir / "d/a.txt", "aaa");
  write_bytes(dir / "d/sub/c.md", "cc");
  write_bytes(dir / "d/.hidden", "zz");
  write_bytes(dir / "d/empty.txt", "");
  auto tok = make_byte_tokenizer();
  auto data = open_data(dir / "d", *tok, {0.0, dir / "cache"});
  EXPECT_EQ(data->train_tokens(), 12);
  std::mt19937_64 rng(3);
  auto b = data->train_batch(1, 11, rng);  // the only window: the whole stream
  auto w = row(b.x, 0);
  w.push_back(row(b.y, 0).back());
  EXPECT_EQ(bytes_of(w), "#aaa#bbbb#cc");
  EXPECT_NE(data->describe().find("(4 text files): 12 tokens"), std::string::npos) << data->describe();
}

TEST(DataSource, BinShardsSplitByName) {
  TempDir dir("bins");
  fs::create_directories(dir.path / "d");
  std::vector<int32_t> train(1000), val(200);
  for (int i = 0; i < 1000; ++i) train[i] = i % 250;
  for (int i = 0; i < 200; ++i) val[i] = 255 - i % 7;
  write_token_shard(dir / "d/tiny_train_000001.bin", train);
  write_token_shard(dir / "d/tiny_val_000000.bin", val);
  write_bytes(dir / "d/README", "not a shard");  // other files beside .bin shards are ignored
  auto tok = make_byte_tokenizer();
  auto data = open_data(dir / "d", *tok, {0.1, dir / "cache"});
  EXPECT_EQ(data->train_tokens(), 1000);
  EXPECT_EQ(data->val_tokens(), 200);
  EXPECT_NE(data->describe().find("split by file name"), std::string::npos) << data->describe();
  auto v = data->val_batches(1, 50, 1);
  EXPECT_EQ(row(v[0].x, 0), std::vector<int64_t>(val.begin(), val.begin() + 50));

  // nanoGPT: train.bin and val.bin, bare uint16.
  fs::create_directories(dir.path / "n");
  std::string t, w;
  for (int i = 0; i < 300; ++i) t += le16(i % 256);
  for (int i = 0; i < 40; ++i) w += le16(7);
  write_bytes(dir / "n/train.bin", t);
  write_bytes(dir / "n/val.bin", w);
  auto nano = open_data(dir / "n", *tok, {0.1, dir / "cache"});
  EXPECT_EQ(nano->train_tokens(), 300);
  EXPECT_EQ(nano->val_tokens(), 40);
  EXPECT_NE(nano->describe().find("nanoGPT uint16"), std::string::npos) << nano->describe();
}

TEST(DataSource, BinShardsWithoutNamesAreOneStream) {
  TempDir dir("concat");
  fs::create_directories(dir.path / "d");
  std::vector<int32_t> a(500), b(500), all;
  for (int i = 0; i < 500; ++i) a[i] = i % 200, b[i] = 200 + i % 50;
  all = a;
  all.insert(all.end(), b.begin(), b.end());
  write_token_shard(dir / "d/part1.bin", a);
  write_token_shard(dir / "d/part2.bin", b);
  auto tok = make_byte_tokenizer();
  auto data = open_data(dir / "d", *tok, {0.1, dir / "cache"});
  EXPECT_EQ(data->train_tokens(), 900);
  EXPECT_EQ(data->val_tokens(), 100);
  std::mt19937_64 rng(5);
  auto x = row(data->train_batch(1, 899, rng).x, 0);  // one window, across both files
  EXPECT_EQ(x, std::vector<int64_t>(all.begin(), all.begin() + 899));
  auto v = data->val_batches(1, 99, 1);
  EXPECT_EQ(row(v[0].y, 0), std::vector<int64_t>(all.begin() + 901, all.end()));
  // A single file works the same way.
  auto one = open_data(dir / "d/part1.bin", *tok, {0.2, dir / "cache"});
  EXPECT_EQ(one->train_tokens(), 400);
}

TEST(DataSource, TokenIdsAboveVocabAreFound) {
  TempDir dir("badids");
  auto tok = make_byte_tokenizer();
  write_token_shard(dir / "early.bin", {1, 2, 3, 4, 5, 300, 6});
  auto msg = error_of<std::runtime_error>([&] { open_data(dir / "early.bin", *tok, {0.1, dir / "cache"}); });
  EXPECT_NE(msg.find("token ID 300 at index 5 is >= vocab size 257"), std::string::npos) << msg;
  // Past the part checked at open: found when a batch reads it.
  std::vector<int32_t> ids(100000, 1);
  ids[99990] = 400;
  write_token_shard(dir / "late.bin", ids);
  auto data = open_data(dir / "late.bin", *tok, {0.1, dir / "cache"});
  msg = error_of<std::runtime_error>([&] { data->val_batches(1, 9999, 1); });
  EXPECT_NE(msg.find("late.bin': token ID 400 at index 99990"), std::string::npos) << msg;
}

// ---- the Bible ---------------------------------------------------------------------------------------

TEST(DataBible, TextIsCachedAndReused) {
  TempDir dir("bible");
  DataOptions opt{0.1, dir / "cache"};
  const std::string text = bible_text(opt);
  EXPECT_GT(text.size(), 4000000u);
  EXPECT_NE(text.find("In the beginning God created the heaven and the earth."), std::string::npos);
  EXPECT_NE(text.find("Amen."), std::string::npos);
  EXPECT_EQ(grape::io::read_file(dir / "cache/bible-kjv.txt"), text);
  EXPECT_EQ(cache_dir(opt), dir / "cache");

  auto tok = make_byte_tokenizer();
  auto data = open_data("bible", *tok, opt);
  EXPECT_EQ(data->train_tokens() + data->val_tokens(), int64_t(text.size()) + 1);
  EXPECT_EQ(data->describe().substr(0, 7), "bible: ");

  write_bytes(dir / "cache/bible-kjv.txt", "cached text");  // the cache is what later calls read
  EXPECT_EQ(bible_text(opt), "cached text");
}

// ---- synthetic tasks ---------------------------------------------------------------------------------

namespace {
std::unique_ptr<DataSource> synthetic(const std::string& spec) {
  static auto tok = make_byte_tokenizer();
  return open_data(spec, *tok);
}
// The prompt's text; the end-of-text it starts with (as examples do in training) decodes to nothing.
std::string prompt_text(const TaskExample& e) {
  EXPECT_EQ(e.prompt.at(0), 256);
  return make_byte_tokenizer()->decode(e.prompt);
}
std::string answer_text(const TaskExample& e) { return make_byte_tokenizer()->decode(e.answer); }
}  // namespace

TEST(DataSynthetic, AdditionAnswersAreSums) {
  auto data = synthetic("synthetic:addition:digits=4");
  EXPECT_EQ(data->train_tokens(), kGeneratedTokens);
  auto ex = data->task_examples(50, 1);
  ASSERT_EQ(ex.size(), 50u);
  std::set<std::string> distinct;
  for (const auto& e : ex) {
    std::smatch m;
    const std::string p = prompt_text(e);
    ASSERT_TRUE(std::regex_match(p, m, std::regex(R"(([1-9]\d{3})\+([1-9]\d{3})=)"))) << p;
    EXPECT_EQ(answer_text(e), std::to_string(std::stoll(m[1]) + std::stoll(m[2])) + "\n");
    EXPECT_EQ(e.label, "digits=4");
    distinct.insert(p);
  }
  EXPECT_GT(distinct.size(), 45u);
  // Same seed, same examples; another seed, others.
  EXPECT_EQ(data->task_examples(5, 1)[3].prompt, ex[3].prompt);
  EXPECT_NE(data->task_examples(5, 2)[3].prompt, ex[3].prompt);
}

TEST(DataSynthetic, CopyAnswersRepeatTheSource) {
  auto data = synthetic("synthetic:copy:length=7");
  for (const auto& e : data->task_examples(30, 9)) {
    std::smatch m;
    const std::string p = prompt_text(e);
    ASSERT_TRUE(std::regex_match(p, m, std::regex(R"(copy: ([a-z]{7})\|)"))) << p;
    EXPECT_EQ(answer_text(e), m[1].str() + "\n");
    EXPECT_EQ(e.label, "len=7");
  }
}

TEST(DataSynthetic, MqarAnswersAreTheQueriedValues) {
  auto data = synthetic("synthetic:mqar:pairs=6,queries=3");
  for (const auto& e : data->task_examples(30, 4)) {
    const std::string p = prompt_text(e);
    std::smatch m;
    ASSERT_TRUE(
        std::regex_match(p, m, std::regex(R"(((?:[a-z]:\d ){6})\?([a-z]) (\d) \?([a-z]) (\d) \?([a-z]) )")))
        << p;
    std::map<char, char> value;
    const std::string pairs = m[1];
    for (size_t i = 0; i < pairs.size(); i += 4) value[pairs[i]] = pairs[i + 2];
    EXPECT_EQ(value.size(), 6u);  // distinct keys
    EXPECT_EQ(value.at(m[2].str()[0]), m[3].str()[0]);
    EXPECT_EQ(value.at(m[4].str()[0]), m[5].str()[0]);
    EXPECT_EQ(answer_text(e), std::string(1, value.at(m[6].str()[0])) + "\n");
    EXPECT_EQ(std::set<std::string>({m[2], m[4], m[6]}).size(), 3u);  // distinct queries
    EXPECT_EQ(e.label, "pairs=6");
  }
}

TEST(DataSynthetic, NeedleSitsAtTheRequestedDepth) {
  for (double depth : {0.0, 0.3, 0.5, 1.0}) {
    auto data = synthetic(fmt::format("synthetic:needle:length=200,depth={}", depth));
    for (const auto& e : data->task_examples(10, 5)) {
      std::string p = prompt_text(e);
      EXPECT_NEAR(double(p.size()), 200.0, 3.0);
      ASSERT_EQ(p.back(), '|');
      p.pop_back();
      std::vector<std::string> words;
      std::istringstream in(p);
      for (std::string w; in >> w;) words.push_back(w);
      int64_t at = -1, needles = 0;
      for (size_t i = 0; i < words.size(); ++i) {
        if (words[i].front() == '[') {
          at = int64_t(i), ++needles;
        } else {
          EXPECT_TRUE(std::regex_match(words[i], std::regex("[a-z]{2}"))) << words[i];
        }
      }
      ASSERT_EQ(needles, 1) << p;
      const double filler = double(words.size() - 1);
      EXPECT_NEAR(double(at), depth * filler, 1.0) << p;
      EXPECT_EQ(answer_text(e), words[at].substr(1, 4) + "\n");
      EXPECT_EQ(words[at].size(), 6u);
      EXPECT_EQ(e.label, fmt::format("depth={:.2f} len=200", depth));
    }
  }
  // Without a depth, task examples sweep 0, .25, .5, .75, 1.
  auto ex = synthetic("synthetic:needle:length=100")->task_examples(5, 1);
  EXPECT_EQ(ex[0].label, "depth=0.00 len=100");
  EXPECT_EQ(ex[4].label, "depth=1.00 len=100");
  EXPECT_EQ(prompt_text(ex[0])[0], '[');  // depth 0: the needle comes first
}

TEST(DataSynthetic, BatchesPackExamplesAndValMasksAnswers) {
  auto data = synthetic("synthetic:addition:digits=3");
  const int64_t B = 4, T = 100;
  std::mt19937_64 r1(11), r2(11), r3(12);
  auto b1 = data->train_batch(B, T, r1), b2 = data->train_batch(B, T, r2), b3 = data->train_batch(B, T, r3);
  EXPECT_TRUE(torch::equal(b1.x, b2.x));
  EXPECT_FALSE(torch::equal(b1.x, b3.x));
  EXPECT_FALSE(b1.mask.defined());  // training scores every token
  EXPECT_TRUE(torch::equal(b1.x.narrow(1, 1, T - 1), b1.y.narrow(1, 0, T - 1)));
  for (int64_t r = 0; r < B; ++r) {
    auto w = row(b1.x, r);
    w.push_back(row(b1.y, r).back());
    const std::string s = bytes_of(w);
    ASSERT_EQ(s[0], '#');
    // Every complete example is a correct sum.
    std::regex line(R"(#(\d+)\+(\d+)=(\d+)\n)");
    int complete = 0;
    for (auto it = std::sregex_iterator(s.begin(), s.end(), line); it != std::sregex_iterator();
         ++it, ++complete)
      EXPECT_EQ(std::stoll((*it)[3]), std::stoll((*it)[1]) + std::stoll((*it)[2])) << s;
    EXPECT_GE(complete, 5);
  }

  auto val = data->val_batches(B, T, 3);
  ASSERT_EQ(val.size(), 3u);
  EXPECT_TRUE(torch::equal(val[2].x, data->val_batches(B, T, 3)[2].x));  // fixed seed
  EXPECT_FALSE(torch::equal(val[0].x, b1.x));
  for (const auto& v : val) {
    ASSERT_TRUE(v.mask.defined());
    ASSERT_EQ(v.mask.sizes(), (torch::IntArrayRef{B, T}));
    for (int64_t r = 0; r < B; ++r) {
      auto x = row(v.x, r), y = row(v.y, r);
      auto m = v.mask[r].contiguous();
      // A target is scored exactly when it lies between '=' and the end of its line.
      bool in_answer = x[0] == '=';
      for (int64_t t = 0; t < T; ++t) {
        if (x[t] == '=') in_answer = true;
        EXPECT_EQ(m[t].item<float>(), in_answer ? 1.0f : 0.0f) << "row " << r << " t " << t;
        if (y[t] == '\n') in_answer = false;
      }
    }
    EXPECT_GT(v.mask.sum().item<float>(), 0.2f * B * T);
  }
}

TEST(DataSynthetic, MqarValidationScoresEveryQueryAnswer) {
  auto data = synthetic("synthetic:mqar:pairs=4,queries=2");
  auto v = data->val_batches(1, 60, 1)[0];
  auto x = row(v.x, 0), y = row(v.y, 0);
  auto m = v.mask[0].contiguous();
  std::string scored;
  for (int64_t t = 0; t < 60; ++t)
    if (m[t].item<float>() == 1.0f) scored += char(y[t]);
  // Each example "k:v k:v k:v k:v ?a A ?b B\n" scores "A", "B\n".
  EXPECT_TRUE(std::regex_match(scored, std::regex(R"((\d\d\n)+\d?\d?\n?)"))) << scored;
  EXPECT_GE(scored.size(), 6u);
}

TEST(DataSynthetic, BadSpecsListTheValidChoices) {
  auto msg = error_of<std::invalid_argument>([] { synthetic("synthetic:sorting"); });
  EXPECT_NE(msg.find("unknown synthetic task 'sorting'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("copy, mqar, needle, addition"), std::string::npos) << msg;
  msg = error_of<std::invalid_argument>([] { synthetic("synthetic"); });
  EXPECT_NE(msg.find("copy, mqar, needle, addition"), std::string::npos) << msg;
  msg = error_of<std::invalid_argument>([] { synthetic("synthetic:addition:length=3"); });
  EXPECT_NE(msg.find("has no option 'length'; valid options: digits"), std::string::npos) << msg;
  msg = error_of<std::invalid_argument>([] { synthetic("synthetic:addition:digits=0"); });
  EXPECT_NE(msg.find("digits='0' must be an integer in [1, 18]"), std::string::npos) << msg;
  msg = error_of<std::invalid_argument>([] { synthetic("synthetic:needle:depth=1.5"); });
  EXPECT_NE(msg.find("depth='1.5'"), std::string::npos) << msg;
  msg = error_of<std::invalid_argument>([] { synthetic("synthetic:mqar:pairs=3,queries=4"); });
  EXPECT_NE(msg.find("queries='4' must be an integer in [1, 3]"), std::string::npos) << msg;
  msg = error_of<std::invalid_argument>([] { synthetic("synthetic:copy:length"); });
  EXPECT_NE(msg.find("key=value"), std::string::npos) << msg;
  EXPECT_EQ(synthetic_task_names(), (std::vector<std::string>{"copy", "mqar", "needle", "addition"}));
}

// ---- GPT-2 style BPE and pre-tokenized ids (issue 17) ------------------------------------------------

namespace {
// A GPT-2 style vocabulary: the 256 byte symbols (space is "Ġ"), merges "t h", "Ġ th", "Ġth e" and
// <|endoftext|> last. Ids: bytes in GPT-2's symbol order, then th, Ġth, Ġthe, eot.
struct TinyGpt2 {
  std::string vocab_json, merges_txt, tokenizer_json;
  std::map<std::string, int> ids;
};
std::string symbol_of(int b) {  // GPT-2's printable stand-in for byte b, as UTF-8
  static std::vector<int> table = [] {
    std::vector<int> t(256);
    int next = 256;
    for (int c = 0; c < 256; ++c) {
      const bool direct = (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF);
      t[c] = direct ? c : next++;
    }
    return t;
  }();
  const int cp = table[b];
  std::string s;
  if (cp < 0x80)
    s += char(cp);
  else
    s += char(0xC0 | (cp >> 6)), s += char(0x80 | (cp & 0x3F));
  return s;
}
TinyGpt2 tiny_gpt2() {
  TinyGpt2 t;
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[symbol_of(b)] = b;
  const std::string sp = symbol_of(' ');
  vocab["th"] = 256;
  vocab[sp + "th"] = 257;
  vocab[sp + "the"] = 258;
  vocab["<|endoftext|>"] = 259;
  t.vocab_json = vocab.dump();
  t.merges_txt = "#version: 0.2\nt h\n" + sp + " th\n" + sp + "th e\n";
  nlohmann::json tj;
  tj["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"t h", sp + " th", sp + "th e"}}};
  tj["added_tokens"] = {{{"id", 259}, {"content", "<|endoftext|>"}, {"special", true}}};
  t.tokenizer_json = tj.dump();
  return t;
}
}  // namespace

TEST(DataTokenizer, Gpt2BpeFromTokenizerJsonOrVocabAndMerges) {
  TempDir dir("bpe");
  const auto g = tiny_gpt2();
  write_bytes(dir / "vocab.json", g.vocab_json);
  write_bytes(dir / "merges.txt", g.merges_txt);
  write_bytes(dir / "tokenizer.json", g.tokenizer_json);
  for (const std::string& spec : {dir / "tokenizer.json", dir / "vocab.json" + "," + dir / "merges.txt"}) {
    ASSERT_TRUE(is_bpe_spec(spec)) << spec;
    auto tok = make_tokenizer(spec);
    EXPECT_EQ(tok->kind(), "bpe");
    EXPECT_EQ(tok->vocab_size(), 260);
    EXPECT_EQ(tok->eot(), 259);
    // " the" merges to one token, " this" to Ġth + i + s (a word keeps its leading space); every byte of
    // other text stands alone.
    EXPECT_EQ(tok->encode(" the this"), (std::vector<int32_t>{258, 257, 'i', 's'})) << spec;
    EXPECT_EQ(tok->encode("this"), (std::vector<int32_t>{256, 'i', 's'})) << spec;
    EXPECT_EQ(tok->encode("a\n"), (std::vector<int32_t>{'a', '\n'}));
    for (const char* text : {" the this", "héllo\n  world's", "x\xff\xfe"})
      EXPECT_EQ(tok->decode(tok->encode(text)), text);
    EXPECT_EQ(tok->decode({258, 259, 256}), " theth");  // end-of-text decodes to nothing
    // Stored in a run as tokenizer.json, and read back the same.
    auto again = copy_tokenizer(*tok);
    EXPECT_EQ(again->encode(" the this"), tok->encode(" the this"));
  }
  write_bytes(dir / "bad.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})");
  EXPECT_NE(
      error_of<std::runtime_error>([&] { make_tokenizer(dir / "bad.json"); }).find("byte 0 has no token"),
      std::string::npos);
}

TEST(DataSource, Gpt2ShardsReadWithTheirOwnVocabulary) {
  TempDir dir("gpt2bins");
  fs::create_directories(dir.path / "d");
  std::vector<int32_t> train(600), val(100);
  for (int i = 0; i < 600; ++i) train[i] = (i * 7919) % 50000;
  for (int i = 0; i < 100; ++i) val[i] = 50256 - i;
  write_token_shard(dir / "d/gpt2_train_000001.bin", train);
  write_token_shard(dir / "d/gpt2_val_000000.bin", val);
  EXPECT_EQ(max_token_id(dir / "d"), 50256);
  EXPECT_NE(error_of<std::invalid_argument>([&] {
              max_token_id(dir / "missing.txt");
            }).find("not .bin token files"),
            std::string::npos);
  // The byte tokenizer's 257 ids are too few; the ids' own vocabulary reads them.
  auto byte = make_byte_tokenizer();
  EXPECT_THROW(open_data(dir / "d", *byte, {0.1, dir / "cache"})->val_batches(1, 50, 1), std::exception);
  auto ids = make_id_tokenizer(50304);
  EXPECT_EQ(ids->kind(), "none");
  auto data = open_data(dir / "d", *ids, {0.1, dir / "cache"});
  auto v = data->val_batches(1, 50, 1);
  EXPECT_EQ(row(v[0].x, 0)[0], 50256);
  EXPECT_THROW(ids->encode("text"), std::invalid_argument);
  // The fingerprint follows the tokens, not the path.
  fs::copy(dir.path / "d", dir.path / "e");
  EXPECT_EQ(open_data(dir / "e", *ids, {0.1, dir / "cache"})->fingerprint(), data->fingerprint());
  val[3] = 1;
  write_token_shard(dir / "e/gpt2_val_000000.bin", val);
  EXPECT_NE(open_data(dir / "e", *ids, {0.1, dir / "cache"})->fingerprint(), data->fingerprint());
}
