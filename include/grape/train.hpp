// Training, evaluation, generation and comparison runs of the decoder LM (grape train|eval|generate|compare).
//
// A run directory holds everything needed to continue or use a run:
//   run.json          resolved model config, training config and tokenizer spec
//   tokenizer.model   the SentencePiece model (only for sentencepiece tokenizers)
//   metrics.jsonl     one JSON object per logged step / validation
//   checkpoints/step_NNNNNNNN/{model.safetensors, optimizer.pt, state.json}
//   checkpoints/latest   the name of the newest complete checkpoint
// Checkpoints are written into a temporary directory and renamed into place, then `latest` is replaced
// atomically: an interrupted write leaves the previous checkpoint as it was.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "grape/data.hpp"
#include "grape/decode.hpp"
#include "grape/model.hpp"

namespace grape::dist {
class Group;
class GradientSync;
}  // namespace grape::dist

namespace grape::train {

struct TrainConfig {
  int64_t steps = 1000;
  int64_t batch = 16;  // sequences per micro-batch
  int64_t accum = 1;   // micro-batches per optimizer step
  // Each micro-batch's sequences split into this many row shards, each its own forward and backward, the
  // gradients summed in shard order; with several threads the shards run at once, one thread each (or a
  // share of the threads). The sum does not depend on how many shards run at once (bit for bit on one
  // and two threads); 1: the micro-batch in one pass.
  int64_t shards = 2;
  double lr = 1e-3;           // peak learning rate
  double min_lr = 1e-4;       // end of the cosine decay
  int64_t warmup = 100;       // linear warmup steps
  double weight_decay = 0.1;  // on matrices (>= 2-D parameters) only
  double beta1 = 0.9, beta2 = 0.95, adam_eps = 1e-8;
  double grad_clip = 1.0;  // global norm; 0 turns clipping off
  // The step's tail (gradient norm, clipping, AdamW, finite check): "fused": one-pass CPU kernels;
  // "reference": LibTorch's clip_grad_norm_ and torch::optim::AdamW::step. Both keep AdamW's own state.
  std::string optimizer = "fused";
  int64_t eval_every = 100;  // validation every N steps (and at the end); 0: only at the end
  int64_t eval_batches = 8;
  int64_t ckpt_every = 100;  // checkpoint every N steps (and at the end); 0: only at the end
  int64_t keep_last = 2;     // checkpoints kept
  int64_t log_every = 10;
  uint64_t seed = 42;
  std::string data = "bible";
  std::string tokenizer = "byte";
  double val_fraction = 0.1;

  // As ModelConfig's (src/train/config.cpp holds the table of fields): errors start with `where` and name
  // the key, "train config: steps='12x' is not an integer"; unknown keys list the known ones.
  void validate() const;
  void set(const std::string& key, const std::string& value, const std::string& where = "train config");
  void set_section(const std::string& section_json, const std::string& where);  // a config file's [train]
  std::string to_json() const;
  static TrainConfig from_json(const std::string& text);  // validated; values of their own JSON types
  static const std::vector<ConfigField>& fields();
  static bool has_key(const std::string& key);
};

// Learning rate at `step` (0-based): linear warmup to lr over `warmup` steps, cosine to min_lr at `steps`.
double lr_at(const TrainConfig& cfg, int64_t step);

// The data of a training batch for `step`, micro-batch `micro`: a pure function of (seed, step, micro).
std::mt19937_64 batch_rng(uint64_t seed, int64_t step, int64_t micro);

// How many of a micro-batch's row shards run at once on `threads` threads (TrainConfig::shards; a
// data-parallel rank runs one shard).
int64_t shard_workers(int64_t shards, int64_t rows, int threads);

// A non-finite loss or gradient (the step was not applied), or non-finite weights after the step.
struct DivergedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class ShardThreads;  // the threads that run a step's shards beside the caller (trainer.cpp)

// AdamW with the decay on matrices only, one forward/backward per micro-batch, clipping, the schedule.
class Trainer {
 public:
  Trainer(Transformer model, const TrainConfig& cfg);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;
  struct StepStats {
    double loss = 0;       // mean over the micro-batches
    double grad_norm = 0;  // before clipping
    double lr = 0;
  };
  // One optimizer step. Throws DivergedError on a non-finite loss or gradient (the weights untouched) or
  // when the step made a weight non-finite (a damaged optimizer state); collective failures of a
  // data-parallel group are other std::runtime_errors.
  StepStats step(const std::vector<data::Batch>& micro_batches, int64_t step);
  Transformer& model() { return model_; }
  torch::optim::AdamW& optimizer() { return *optimizer_; }
  // Data-parallel (include grape/distributed.hpp): copies rank 0's weights to every rank, then each step
  // averages the gradients (bucketed all-reduce overlapping backward) and the loss over the group. Each
  // rank passes its own share of the step's batch.
  void set_group(std::shared_ptr<dist::Group> group);

 private:
  Transformer model_;
  TrainConfig cfg_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  std::shared_ptr<dist::Group> group_;
  std::shared_ptr<dist::GradientSync> sync_;
  std::unique_ptr<ShardThreads> shard_threads_;  // made on the first step whose shards run in parallel
};

// ---- run directories and checkpoints -------------------------------------------------------------

struct RunInfo {
  std::string dir;
  ModelConfig model;
  TrainConfig train;
  std::string tokenizer;         // its kind: byte, sentencepiece, bpe or none
  std::string data_fingerprint;  // DataSource::fingerprint() when the run started ("" for older runs)
  std::string json;              // run.json as written (provenance: command, git commit, host, BLAS, resumes)
};

// Reads <dir>/run.json; clear errors for a missing or corrupt file.
RunInfo read_run(const std::string& dir);
// The tokenizer of a run: byte, its own tokenizer.model (SentencePiece) or tokenizer.json (BPE), or for
// tokenizer "none" the bare ids of its vocabulary.
std::unique_ptr<data::Tokenizer> run_tokenizer(const RunInfo& run);
// The newest complete checkpoint directory of a run; throws when there is none.
std::string latest_checkpoint(const std::string& run_dir);
// Loads weights into `model`; a missing, unexpected or differently shaped tensor, or a checkpoint made
// for another encoding, is refused with an error naming the mismatch.
void load_weights(Transformer& model, const std::string& checkpoint_dir);
// A model built from a run's config with the weights of `checkpoint_dir` (default: the latest).
Transformer load_model(const RunInfo& run, const std::string& checkpoint_dir = "");

// ---- the commands' work ---------------------------------------------------------------------------

struct TrainOptions {
  bool resume = false;       // continue the run in `dir` from its latest checkpoint
  bool quiet = false;        // no progress output
  int64_t stop_after = 0;    // stop as Ctrl-C would (checkpoint, `interrupted`) after this step; 0: never
  int64_t resume_steps = 0;  // with resume: a new step budget (changes the lr schedule); 0: the run's own
  // With resume: the settings asked for (the run's own with the command line's flags applied, as
  // run_training's model_cfg and cfg). Any that differs from the run's is refused with an error naming it,
  // except the step budget, when to validate, log and checkpoint (eval_every, eval_batches, log_every,
  // ckpt_every, keep_last), and data: another path to the same tokens (by fingerprint) is taken quietly,
  // other tokens with a warning.
  bool resume_with_settings = false;
  // vocab_size was given (--set, a config file): kept, and refused when smaller than the tokenizer's.
  // Otherwise it comes from the tokenizer, or for tokenizer "none" from the data's largest id.
  bool vocab_size_given = false;
  std::string command;  // the command line, recorded in run.json
  std::string run_dir;
  // Data-parallel group (null: one process). Each rank trains on its share of a batch of batch x ranks;
  // rank 0 writes run.json, metrics and checkpoints, every rank resumes from them.
  std::shared_ptr<dist::Group> group;
};
struct TrainSummary {
  int64_t steps = 0;
  // The last training and validation loss (NaN when the run has none yet); a run that was already
  // finished reports those of its log.
  double final_loss = 0, val_loss = 0;
  std::string tokenizer;    // the run's tokenizer kind ("byte": loss / ln 2 is bits per byte)
  double tokens_per_s = 0;  // training throughput over the run (this process)
  int64_t parameters = 0;
  double seconds = 0;
  std::string checkpoint;    // the final checkpoint directory
  bool interrupted = false;  // stopped by Ctrl-C (a checkpoint was written)
};
// Trains (or resumes) the run in opts.run_dir. Stops cleanly on Ctrl-C with a checkpoint.
TrainSummary run_training(const ModelConfig& model_cfg, const TrainConfig& cfg, const TrainOptions& opts);
// The configs a new run with these settings records in run.json (what --print-config shows): data and
// tokenizer paths made absolute, vocab_size from the tokenizer (see TrainOptions::vocab_size_given). `note`
// receives a line to print when the vocabulary was read from the data.
std::pair<ModelConfig, TrainConfig> resolve_new_run(const ModelConfig& model_cfg, const TrainConfig& cfg,
                                                    bool vocab_size_given, std::string* note = nullptr);
// Train fields a resumed run may change (the budget, when to validate, log and checkpoint, the optimizer's
// implementation, data); every other setting stays the run's.
bool may_change_on_resume(const std::string& key);
// With resume_with_settings: the settings of `asked` that differ from the run's and may not change, as
// "pe=rope (asked: alibi)"; empty when none does.
std::vector<std::string> resume_conflicts(const RunInfo& run, const ModelConfig& asked_model,
                                          const TrainConfig& asked_train);

// ---- where results come from ----------------------------------------------------------------------

std::string version();     // "0.1.0 (git 0123456789ab)": the project version and the commit it was built at
std::string git_commit();  // the commit at build time ("...-dirty" with uncommitted changes; "unknown")
// The BLAS behind LibTorch's matmuls, e.g. "OpenBLAS 0.3.21 ... (OpenMP threads)": its threading decides how
// it shares the cores with LibTorch's OpenMP threads.
std::string blas_description();
// {"command", "version", "git_commit", "host", "blas", "threads", "gomp_spincount", "time"} as JSON text:
// recorded in run.json, results.json and reports.
std::string provenance_json(const std::string& command);

// How eval spends a budget of about `tokens` validation tokens at `context`: up to 8 windows per batch, the
// same number of tokens at every length (fewer, longer windows).
struct ValidationWindows {
  int64_t batch = 1, batches = 1;
  int64_t tokens(int64_t context) const { return batch * batches * context; }
};
ValidationWindows validation_windows(int64_t tokens, int64_t context);

// Mean validation loss over up to max_batches windows of `context` tokens (no gradients).
double validation_loss(Transformer& model, const data::DataSource& data, int64_t context, int64_t batch,
                       int64_t max_batches);

// The same through a Decoder (its path and weights, e.g. bf16): each window teacher-forced through fresh
// caches, `chunk` tokens per forward call (0: the whole window in one call; 1: token by token, as decoding
// steps). Throws std::invalid_argument for a negative chunk.
double decode_validation_loss(Decoder& decoder, const data::DataSource& data, int64_t context, int64_t batch,
                              int64_t max_batches, int64_t chunk = 0);

struct LengthResult {
  int64_t factor = 1, context = 0, tokens = 0;
  double loss = 0, perplexity = 0;
  double bits_per_byte = -1;  // loss / ln 2 when every token is one byte (byte tokenizer); -1: not known
  std::string error;          // set when this length cannot be evaluated (e.g. a learned table too short)
};
struct TaskResult {
  std::string label;
  int64_t correct = 0, total = 0;
};
struct EvalReport {
  std::vector<LengthResult> lengths;
  std::vector<TaskResult> tasks;  // synthetic data only
};
// Validation loss at context x each factor, with about `tokens` validation tokens per length. With
// byte_tokens (a byte-tokenizer run) each length also reports bits per byte.
EvalReport evaluate(Transformer& model, const data::DataSource& data, const std::vector<int64_t>& factors,
                    int64_t tokens, int64_t task_examples = 200, bool byte_tokens = false);
std::string eval_table(const EvalReport& report);  // the table `grape eval` prints
std::string eval_json(const EvalReport& report);

struct SamplingOptions {
  double temperature = 0.8;  // 0: greedy
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
  int64_t max_tokens = 256;
  uint64_t seed = 0;
  int64_t eot = -1;  // stop when this token is drawn (the tokenizer's end-of-text); -1: never
  // > 0: the model sees at most the last `crop` tokens (as nanoGPT crops to its block size): when a
  // sequence reaches it, its cache is rebuilt from its last crop - 1 tokens before each new one. 0: the
  // cache keeps every token (positions beyond the training context are extrapolation).
  int64_t crop = 0;
  // fast: the LibTorch-free engine where it supports the model (else the reference path, exactly as
  // fast_decode_unsupported says); reference: forward_cached, the oracle.
  DecodePath decode = DecodePath::fast;
  DecodeWeights weights = DecodeWeights::fp32;  // bf16: the fast path's bf16 weights (DecodeWeights)
};
// Samples continuations of each prompt (batched, each with its own KV cache). on_token(row, id) is called
// for every generated token as it comes. Returns the generated ids per prompt (eot not included).
std::vector<std::vector<int32_t>> generate(Transformer& model,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           const SamplingOptions& opts,
                                           const std::function<void(size_t, int32_t)>& on_token = {});
// Picks the next token from logits [V] with the options (deterministic in rng).
int32_t sample_token(const torch::Tensor& logits, const SamplingOptions& opts, std::mt19937_64& rng);

// Greedy decoding of every prompt together on `decoder`'s path, each row with its own KV cache (prompts may
// differ in length: equal ones are prefilled in one call, others one row at a time). Returns per row the
// logits [tokens, V] of the batched one-token steps; *step_seconds (if given) is the time those steps took,
// prefill excluded; *step_profile (if given) their Decoder::Profile (profiling is on for those steps only).
std::vector<torch::Tensor> greedy_decode(Decoder& decoder, const std::vector<std::vector<int64_t>>& prompts,
                                         int64_t tokens, double* step_seconds = nullptr,
                                         Decoder::Profile* step_profile = nullptr);
// The prompt lengths of `bench decode`: `prompt_len` for every row, or with ragged, prompt_len +
// floor(b * prompt_len / batch) for row b (16..31 for 16 rows of 16), so rows sit at different positions.
std::vector<int64_t> bench_prompt_lengths(int64_t batch, int64_t prompt_len, bool ragged);
// Decode throughput with the KV cache: tokens/s generating `tokens` greedy tokens (greedy_decode) for
// `batch` sequences whose prompts (token ids 0, 1, 2, ... mod V) have the lengths of bench_prompt_lengths.
struct DecodeThroughput {
  double tokens_per_s = 0;
  DecodePath path = DecodePath::fast;  // the path that ran
  std::string fallback_reason;         // why fast was asked for but not taken ("" otherwise)
  double mean_cache = 0;               // mean cached tokens per sequence over the timed steps
  std::string bf16_kernel;             // with bf16 weights: the kernel of their products
  Decoder::Profile profile;            // with `profile`: the timed steps' phases (fast path; else zeros)
};
DecodeThroughput measure_decode(Transformer& model, int64_t batch, int64_t prompt_len, int64_t tokens,
                                DecodePath path = DecodePath::fast, bool ragged = false,
                                DecodeWeights weights = DecodeWeights::fp32, bool profile = false);
double decode_tokens_per_s(Transformer& model, int64_t batch, int64_t prompt_len, int64_t tokens);

struct CompareOptions {
  std::vector<std::string> pes;  // encodings, each with its default options
  ModelConfig model;             // pe is replaced per run
  TrainConfig train;
  // Seeds per encoding: train.seed, train.seed + 1, ... (runs/PE, then runs/PE-seedS). With more than one,
  // the report gives mean +- standard deviation over the seeds and marks which differences exceed it.
  int64_t seeds = 1;
  std::string command;  // the command line, recorded in results.json and report.md
  std::string out_dir = "grape-compare";
  std::vector<int64_t> factors = {1, 2, 4, 8};
  int64_t eval_tokens = 16384;
  int64_t decode_tokens = 64;
  bool quiet = false;
};
// Trains and evaluates each encoding on the same data, seed and budget; writes results.json, report.md,
// loss.png and perplexity.png into out_dir. Returns the report's markdown.
std::string run_comparison(const CompareOptions& opts);

// `grape compare --study extrapolation`: how each encoding behaves beyond its training length.
// Per encoding, two runs with the same model, seed and budget: a language model on `train.data`
// (perplexity at context x factors, plus every context-extension method an encoding offers through its
// `extend` option, applied at evaluation with factor = the length factor), and a model trained on the
// needle task at the training context (exact-match retrieval over depths x length factors).
struct StudyOptions {
  std::vector<std::string> pes;  // encodings (unknown names throw, listing the known ones)
  ModelConfig model;             // pe is replaced per run; context = the short training context
  TrainConfig train;             // the language-model runs (data, steps, batch, lr, seed, ...)
  int64_t needle_steps = 0;      // steps of the needle runs; 0: train.steps
  std::vector<int64_t> factors = {1, 2, 4, 8, 16};
  std::vector<std::string> extend = {"pi", "ntk", "dynamic-ntk", "yarn"};  // for encodings with `extend`
  bool needle_extend = true;  // also measure the needle grid with each extension method
  std::vector<double> depths = {0, 0.25, 0.5, 0.75, 1};
  int64_t eval_tokens = 8192;    // validation tokens per length
  int64_t needle_examples = 20;  // per (depth, length) cell
  std::string out_dir = "grape-study";
  std::string command;  // the command line, recorded in report.md
  bool quiet = false;
};
// Runs (or continues) the study into out_dir: runs/lm/PE, runs/needle/PE, results.json, report.md,
// perplexity.png, perplexity_extension.png (when an encoding has extensions), needle.png. Returns report.md.
std::string run_extrapolation_study(const StudyOptions& opts);

}  // namespace grape::train
