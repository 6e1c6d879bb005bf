// Data for language-model training: tokenizers, token arrays on disk, and the sources that cut them into
// batches (raw text, nanoGPT .bin arrays, llm.c shards, the default Bible text, synthetic tasks).
// Every reader validates what it reads and throws std::runtime_error (bad files) or std::invalid_argument
// (bad settings) with a message naming the file or setting and the problem. Never a crash or a hang.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace grape::data {

// ---- tokenizers ---------------------------------------------------------------------------------------

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string kind() const = 0;    // "byte", "sentencepiece", "bpe" or "none"
  virtual int64_t vocab_size() const = 0;  // ids are 0..vocab_size-1, end-of-text included
  virtual int64_t eot() const = 0;  // the end-of-text id, placed between documents; -1: none (kind "none")
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;   // never emits eot
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;  // eot decodes to ""
  // The text of one token, for printing generated tokens as they come (byte: one raw byte).
  virtual std::string piece(int32_t id) const = 0;
  // The serialized tokenizer (empty for "byte"): a run directory stores it so checkpoints stand alone.
  virtual std::string model_bytes() const = 0;
};

// "byte": 256 byte values plus end-of-text = 256 (vocab 257), no training needed.
std::unique_ptr<Tokenizer> make_byte_tokenizer();
// A SentencePiece model file (.model); its end-of-text id is the model's </s> (eos) id.
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path);
// From a serialized SentencePiece model (Tokenizer::model_bytes of a run directory).
std::unique_ptr<Tokenizer> sentencepiece_from_bytes(const std::string& model_bytes);
// "none": the ids of pre-tokenized .bin data, 0..vocab_size-1, without text (encode and decode throw).
std::unique_ptr<Tokenizer> make_id_tokenizer(int64_t vocab_size);
// A GPT-2 style byte-level BPE vocabulary (what nanoGPT's and llm.c's GPT-2 .bin files were tokenized with):
// a Hugging Face tokenizer.json, "VOCAB.json,MERGES.txt", or a directory holding either. Its end-of-text is
// the token <|endoftext|> (-1 when the vocabulary has none). Kind "bpe"; model_bytes() is a tokenizer.json.
std::unique_ptr<Tokenizer> load_bpe(const std::string& spec);
std::unique_ptr<Tokenizer> bpe_from_bytes(const std::string& tokenizer_json);
// Whether a --tokenizer spec names a BPE vocabulary (.json, "a,b", or a directory with those files).
bool is_bpe_spec(const std::string& spec);
// "byte", a BPE vocabulary (is_bpe_spec) or a SentencePiece .model file ("none" needs make_id_tokenizer).
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec);
// An independent copy of any tokenizer (its model bytes loaded again).
std::unique_ptr<Tokenizer> copy_tokenizer(const Tokenizer& tok);

struct SentencePieceTraining {
  std::vector<std::string> inputs;  // text files
  int64_t vocab_size = 4096;
  std::string model_type = "bpe";   // "bpe" or "unigram"
  std::string out_path;             // writes <out_path> (the .model), atomically
  int64_t max_sentences = 2000000;  // input lines sampled for training
};
void train_sentencepiece(const SentencePieceTraining& settings);

// ---- token arrays ------------------------------------------------------------------------------------

// A read-only array of token ids from a file, memory-mapped (a 10 GB shard does not need 10 GB of RAM).
// Formats, detected from the content:
//   llm.c shard:   256 little-endian int32 header, header[0] = 20240520, header[1] = version
//                  (1: uint16 tokens, 2: uint32 tokens), header[2] = token count; then the tokens.
//   nanoGPT .bin:  a bare array of little-endian uint16 tokens (any file without the llm.c magic).
// Refused with a clear error: missing/empty files, a wrong version, a count that disagrees with the size,
// an odd byte size for uint16.
class TokenFile {
 public:
  explicit TokenFile(const std::string& path);
  ~TokenFile();
  TokenFile(TokenFile&&) noexcept;
  TokenFile& operator=(TokenFile&&) noexcept;
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  const std::string& path() const { return path_; }
  int64_t size() const { return count_; }
  int bytes_per_token() const { return width_; }
  std::string format() const;  // "llm.c v1", "llm.c v2" or "nanoGPT uint16"
  int64_t at(int64_t i) const;
  int64_t max_id() const;  // the largest id in the file (reads it all)
  // Copies tokens [start, start+n) into out; throws naming the file and index if one is >= vocab.
  void copy(int64_t start, int64_t n, int64_t* out, int64_t vocab) const;

 private:
  std::string path_;
  const unsigned char* data_ = nullptr;  // first token
  void* map_ = nullptr;
  size_t map_size_ = 0;
  int64_t count_ = 0;
  int width_ = 2;
};

// Writes tokens as an llm.c shard (version 1 when every id < 65536, else 2), atomically.
void write_token_shard(const std::string& path, const std::vector<int32_t>& tokens);

// ---- batches -----------------------------------------------------------------------------------------

struct Batch {
  torch::Tensor x;     // [B,T] int64 inputs
  torch::Tensor y;     // [B,T] int64 targets (x shifted by one)
  torch::Tensor mask;  // [B,T] float32 weight of each target in the loss (1 = scored); undefined: all 1
};

// A synthetic task example for exact-match accuracy: the model reads `prompt` and must produce `answer`.
struct TaskExample {
  std::vector<int32_t> prompt;
  std::vector<int32_t> answer;
  std::string label;  // e.g. "depth=0.25 len=512" for grouping results
};

struct DataOptions {
  double val_fraction = 0.1;  // the last fraction of the token stream is validation (when no val files)
  std::string cache_dir;      // where prepared data is kept; empty: $GRAPE_CACHE or ~/.cache/grape
};

// Where training and validation batches come from.
class DataSource {
 public:
  virtual ~DataSource() = default;
  virtual std::string describe() const = 0;  // one line: what, how many tokens per split
  virtual int64_t train_tokens() const = 0;
  virtual int64_t val_tokens() const = 0;
  // Random training windows of T+1 tokens; the same rng state gives the same batch.
  virtual Batch train_batch(int64_t batch, int64_t T, std::mt19937_64& rng) const = 0;
  // Deterministic validation windows of T+1 tokens, in order from the start of the validation split,
  // at most max_batches batches (fewer when the split is short; throws if not even one window fits).
  virtual std::vector<Batch> val_batches(int64_t batch, int64_t T, int64_t max_batches) const = 0;
  // Synthetic sources only: n held-out examples with answers (empty for text sources).
  virtual std::vector<TaskExample> task_examples(int64_t n, uint64_t seed) const { return {}; }
  // Identifies the tokens (not the path): split sizes and a hash of tokens sampled across both splits; the
  // same data under another name gives the same fingerprint (resume checks a moved --data with it).
  virtual std::string fingerprint() const = 0;
};

// Opens a data spec:
//   "bible"               the King James Bible (Debian bible-kjv), prepared once into the cache dir
//   PATH.txt | a dir of text files   raw UTF-8 text, documents separated by end-of-text
//   PATH.bin | a dir of .bin shards  nanoGPT/llm.c token arrays; files named *train*/*val* give the split
//   "synthetic:NAME[:key=value,...]" NAME in copy, mqar, needle, addition (see synthetic_task_names)
// Throws with a clear message for a missing path, an empty or too-short source, an unknown synthetic task.
// Text is tokenized into memory; .bin files are memory-mapped and their ids checked against tok's vocab
// as they are read. A synthetic source keeps its own copy of tok; its text formats and keys are described
// in src/data/synthetic.cpp. val_batches' window i starts at token i*T (each target scored once).
std::unique_ptr<DataSource> open_data(const std::string& spec, const Tokenizer& tok,
                                      const DataOptions& options = {});

// The largest token id in the .bin files of a data spec (a file or a directory of them; reads every file):
// the vocabulary pre-tokenized data needs when there is no tokenizer to say it.
int64_t max_token_id(const std::string& spec);
// A path spec as an absolute, lexically normal path (a run then finds its data from any directory);
// "bible", "synthetic:..." and paths that do not exist are returned unchanged.
std::string absolute_spec(const std::string& spec);

std::vector<std::string> synthetic_task_names();
// The tasks with an example and their options with defaults and ranges (`grape data`, --data's help).
std::string synthetic_tasks_help();

// train_tokens() and val_tokens() of a synthetic source: examples are generated on demand, without end.
inline constexpr int64_t kGeneratedTokens = int64_t{1} << 40;

// The cache directory (created if needed): options.cache_dir, else $GRAPE_CACHE, else ~/.cache/grape.
std::string cache_dir(const DataOptions& options);

// The full text of the King James Bible from `bible 'Gen1:1-Rev22:21'`, cached as <cache>/bible-kjv.txt.
// Throws naming the package when the `bible` program is not installed.
std::string bible_text(const DataOptions& options);

}  // namespace grape::data
