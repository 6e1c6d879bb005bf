// Issue 17: hostile files in the places grape reads (special files, files outside a checkpoint, damaged
// models and optimizer states, non-finite weights) give an error naming the file and the problem: never a
// crash, a hang, an out-of-memory, or a run that goes on with NaN.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "cli_runner.hpp"
#include "grape/data.hpp"
#include "grape/io.hpp"
#include "grape/train.hpp"
#include "plain/format_test_util.hpp"
#include "run_dir_fixture.hpp"
#include "train/run_files.hpp"

namespace {

namespace fs = std::filesystem;
using grape::testing::run_cli;

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

#define EXPECT_CONTAINS(text, needle)                          \
  EXPECT_NE(std::string(text).find(needle), std::string::npos) \
      << "\"" << (text) << "\" lacks \"" << (needle) << "\""

class RobustInputs : public grape::testing::TinyRunTest {
 protected:
  RobustInputs() : TinyRunTest("grape_robust_test_", 20000, 4, 1, 2, 1) {}
  // The CLI flags that give the same tiny model.
  std::string tiny_flags() const {
    return " --set n_layer=1 --set n_embd=32 --set n_head=2 --context 16 --batch 4 --warmup 1 --lr 3e-3"
           " --set eval_batches=1 --data " +
           path("text.txt");
  }
  void edit_state(const std::string& ck, const std::function<void(nlohmann::json&)>& edit) {
    auto state = nlohmann::json::parse(grape::io::read_file(ck + "/state.json"));
    edit(state);
    grape::io::write_file_atomic(ck + "/state.json", state.dump(2));
  }
};

TEST_F(RobustInputs, StateJsonNamesOnlyPlainFilesInsideItsCheckpoint) {
  train("run");
  const std::string ck = path("run/checkpoints/step_00000004");
  const std::string sums =
      nlohmann::json::parse(grape::io::read_file(ck + "/state.json"))["checksums"].dump();
  for (const std::string name : {"/proc/self/mem", "/dev/zero", "../../run.json", "sub/x", ".."}) {
    edit_state(ck, [&](nlohmann::json& s) { s["checksums"][name] = "0000000000000000"; });
    const auto e = error_of([&] { grape::train::detail::read_checkpoint(ck); });
    EXPECT_CONTAINS(e, ck + "/state.json: names the file '" + name + "', which is not a plain file name");
    edit_state(ck, [&](nlohmann::json& s) { s["checksums"] = nlohmann::json::parse(sums); });
  }
  // A symlink in place of a checkpoint file (here to a FIFO that would block a reader) is refused.
  ASSERT_EQ(::mkfifo(path("fifo").c_str(), 0600), 0);
  fs::rename(ck + "/optimizer.pt", path("optimizer.pt"));
  fs::create_symlink(path("fifo"), ck + "/optimizer.pt");
  EXPECT_CONTAINS(error_of([&] { grape::train::detail::read_checkpoint(ck); }),
                  ck + "/optimizer.pt: not a regular file");
  // Resuming passes over it to the previous checkpoint, saying why.
  auto point = grape::train::detail::find_resume_checkpoint(path("run"));
  ASSERT_TRUE(point.checkpoint.has_value());
  EXPECT_EQ(point.checkpoint->step, 2);
  ASSERT_EQ(point.skipped.size(), 1u);
  EXPECT_CONTAINS(point.skipped[0], "optimizer.pt: not a regular file");
}

TEST_F(RobustInputs, LatestMustBeARegularFileNamingACheckpoint) {
  train("run");
  const fs::path latest = dir / "run/checkpoints/latest";
  fs::remove(latest);
  fs::create_symlink("/dev/zero", latest);
  EXPECT_CONTAINS(error_of([&] { grape::train::latest_checkpoint(path("run")); }),
                  "cannot open '" + latest.string() + "': it is a character device, not a regular file");
  auto point = grape::train::detail::find_resume_checkpoint(path("run"));
  ASSERT_TRUE(point.checkpoint.has_value());  // the newest complete checkpoint instead
  EXPECT_EQ(point.checkpoint->step, 4);
  EXPECT_CONTAINS(point.skipped.at(0), "character device");
  fs::remove(latest);
  ASSERT_EQ(::mkfifo(latest.c_str(), 0600), 0);
  EXPECT_CONTAINS(error_of([&] { grape::train::latest_checkpoint(path("run")); }), "it is a FIFO");
  // An overlong name is quoted cut short, not passed to the file system (ENAMETOOLONG).
  fs::remove(latest);
  grape::io::write_file_atomic(latest.string(), "step_" + std::string(300, '9') + "\n");
  EXPECT_CONTAINS(error_of([&] { grape::train::latest_checkpoint(path("run")); }),
                  "points at 'step_99999999999999999999999999999999999999999999999999999999999... (305 "
                  "bytes)', which is not a checkpoint");
  point = grape::train::detail::find_resume_checkpoint(path("run"));
  ASSERT_TRUE(point.checkpoint.has_value());
  EXPECT_EQ(point.checkpoint->step, 4);
}

TEST_F(RobustInputs, SpecialFilesAsInputsAreRefusedByName) {
  // --data, --config, --q, --weights naming a device or a FIFO: an error at once (timeout: a hang fails).
  ASSERT_EQ(::mkfifo(path("fifo.toml").c_str(), 0600), 0);
  ASSERT_EQ(::mkfifo(path("fifo.bin").c_str(), 0600), 0);
  struct Case {
    std::string args, needle;
  };
  const Case cases[] = {
      {"train --steps 1 --data /dev/zero --out " + path("r1"),
       "cannot open '/dev/zero': it is a character device, not a regular file"},
      {"train --steps 1 --data " + path("fifo.bin") + " --out " + path("r2"),
       "'" + path("fifo.bin") + "': not a regular file"},
      {"train --steps 1 --config " + path("fifo.toml") + " --out " + path("r3"),
       "cannot open '" + path("fifo.toml") + "': it is a FIFO, not a regular file"},
      {"train --steps 1 --config /dev/zero --out " + path("r4"),
       "cannot open '/dev/zero': it is a character"},
      {"pe logits -e rope --q /dev/zero --k /dev/zero --out " + path("o.npy"),
       "cannot open '/dev/zero': it is a character"},
  };
  for (const auto& c : cases) {
    const auto r = run_cli(c.args, "timeout 60");
    EXPECT_EQ(r.code, 1) << c.args << "\n" << r.output;
    EXPECT_CONTAINS(r.output, c.needle);
  }
}

TEST_F(RobustInputs, SentencePieceModelWithADamagedCharsMapIsRefusedAtLoad) {
  // Issue 17: a garbage normalizer charsmap was accepted at load and segfaulted the first encode.
  grape::data::SentencePieceTraining s;
  s.inputs = {path("text.txt")};
  s.vocab_size = 300;
  s.out_path = path("good.model");
  grape::data::train_sentencepiece(s);
  const std::string good = grape::io::read_file(path("good.model"));
  // A well-formed map (merged into the model's normalizer settings) loads and encodes.
  grape::io::write_file_atomic(path("mapped.model"), good + grape::testing::sentencepiece_charsmap_field(
                                                                grape::testing::CharsMap().bytes()));
  auto tok = grape::data::load_sentencepiece(path("mapped.model"));
  EXPECT_FALSE(tok->encode("a lamb and a land").empty());
  // The same with the root's offset pointing far outside the trie.
  grape::testing::CharsMap bad;
  bad.units[0] = 0xFFFFFFFFu;
  grape::io::write_file_atomic(path("bad.model"),
                               good + grape::testing::sentencepiece_charsmap_field(bad.bytes()));
  EXPECT_CONTAINS(
      error_of([&] { grape::data::load_sentencepiece(path("bad.model")); }),
      "'" + path("bad.model") + "': the normalizer's character map is damaged: its trie leads outside");
  const auto r = run_cli("tokenizer encode -t " + path("bad.model") + " --text hello");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_CONTAINS(r.output, "character map is damaged");
  // Bytes that are no protobuf: the library's status has no sentence; ours says what is wrong.
  grape::io::write_file_atomic(path("x.model"), "x");
  EXPECT_CONTAINS(error_of([&] { grape::data::load_sentencepiece(path("x.model")); }),
                  "'" + path("x.model") +
                      "': not a SentencePiece model: its bytes do not parse as a SentencePiece ModelProto");
}

// FNV-1a 64, as checkpoint.cpp sums files: lets a test damage a file and keep its checksum valid.
std::string fnv1a(const std::string& bytes) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  char out[17];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

TEST_F(RobustInputs, DamagedOptimizerStateStopsTheRunKeepingTheLastGoodCheckpoint) {
  cfg.steps = 6;
  train("run", false, /*stop_after=*/4);
  const std::string ck = path("run/checkpoints/step_00000004");
  // Rewrites optimizer.pt with its moments edited, and its checksum to match: damage the sum cannot see.
  auto damage = [&](const std::function<void(torch::optim::AdamW&)>& edit) {
    auto loaded = grape::train::detail::read_checkpoint(ck);
    grape::train::Trainer trainer(grape::Transformer(model), cfg);
    grape::train::detail::load_optimizer(trainer.optimizer(), loaded);
    edit(trainer.optimizer());
    std::ostringstream bytes;
    torch::save(trainer.optimizer(), bytes);
    grape::io::write_file_atomic(ck + "/optimizer.pt", bytes.str());
    edit_state(ck, [&](nlohmann::json& s) { s["checksums"]["optimizer.pt"] = fnv1a(bytes.str()); });
  };
  auto each_moment = [](const std::function<void(torch::optim::AdamWParamState&)>& edit) {
    return [edit](torch::optim::AdamW& opt) {
      for (auto& [key, state] : opt.state()) edit(static_cast<torch::optim::AdamWParamState&>(*state));
    };
  };
  const std::string opt = grape::io::read_file(ck + "/optimizer.pt"),
                    state = grape::io::read_file(ck + "/state.json");
  auto restore = [&] {
    grape::io::write_file_atomic(ck + "/optimizer.pt", opt);
    grape::io::write_file_atomic(ck + "/state.json", state);
  };
  // Moments that cannot be: refused when loaded, naming the file.
  damage(each_moment([](torch::optim::AdamWParamState& s) { s.exp_avg_sq().fill_(-1.0); }));
  EXPECT_CONTAINS(error_of([&] { train("run", /*resume=*/true); }),
                  ck + "/optimizer.pt: the state of parameter 0 has a negative second moment");
  restore();
  damage(each_moment([](torch::optim::AdamWParamState& s) { s.exp_avg()[0] = std::nanf(""); }));
  EXPECT_CONTAINS(error_of([&] { train("run", /*resume=*/true); }),
                  ck + "/optimizer.pt: the state of parameter 0 is not finite");
  restore();
  // Finite moments that overflow float32 in the first step (a huge first moment over a second moment of 0):
  // the weights become Inf, and the run stops before any checkpoint holds them (the issue's resume exited 0
  // and wrote NaN weights).
  damage(each_moment([](torch::optim::AdamWParamState& s) {
    s.exp_avg().fill_(3e38);
    s.exp_avg_sq().fill_(0.0);
    s.step(0);
  }));
  const auto e = error_of([&] { train("run", /*resume=*/true); });
  EXPECT_CONTAINS(e, "step 5: parameter '");
  EXPECT_CONTAINS(e, "' is not finite after the optimizer step; stopped. The last good checkpoint is " + ck);
  EXPECT_FALSE(fs::exists(path("run/checkpoints/step_00000006")));
  EXPECT_EQ(grape::train::latest_checkpoint(path("run")), ck);
}

TEST_F(RobustInputs, NonFiniteValidationLossStopsTheRun) {
  ::setenv("GRAPE_FAULT", "nan-val-at-step:4", 1);
  const auto e = error_of([&] { train("run"); });
  ::unsetenv("GRAPE_FAULT");
  EXPECT_CONTAINS(e, "step 4: the validation loss is nan (diverged); stopped. The last good checkpoint is " +
                         path("run/checkpoints/step_00000002"));
  EXPECT_FALSE(fs::exists(path("run/checkpoints/step_00000004")));
}

TEST_F(RobustInputs, NonFiniteWeightsAreRefusedNamingFileAndTensor) {
  train("run");
  const std::string ck = path("run/checkpoints/step_00000004");
  std::map<std::string, std::string> meta;
  auto tensors = grape::io::read_safetensors(ck + "/model.safetensors", &meta);
  const std::string name = tensors.begin()->first;
  tensors.begin()->second.reshape(-1)[3] = std::numeric_limits<float>::infinity();
  grape::io::write_safetensors(ck + "/model.safetensors", tensors, meta);
  edit_state(ck, [&](nlohmann::json& s) {
    s["checksums"]["model.safetensors"] = fnv1a(grape::io::read_file(ck + "/model.safetensors"));
  });
  const std::string expected = ck + "/model.safetensors: tensor '" + name + "' holds inf at flat index 3";
  EXPECT_CONTAINS(error_of([&] { grape::train::load_model(grape::train::read_run(path("run"))); }), expected);
  const auto r = run_cli("eval --run " + path("run"));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_CONTAINS(r.output, expected);
  // The same rule for any .safetensors grape reads (pe logits --weights).
  EXPECT_CONTAINS(error_of([&] { grape::io::read_safetensors(ck + "/model.safetensors"); }),
                  "weights must be finite");
}

TEST_F(RobustInputs, ClearErrorsWhereLibTorchOrNlohmannSpoke) {
  train("run");
  const std::string ck = path("run/checkpoints/step_00000004");
  // state.json fields of the wrong JSON type: the key is named (was [json.exception.type_error.302]).
  const std::string state = grape::io::read_file(ck + "/state.json");
  edit_state(ck, [](nlohmann::json& s) { s["tokens"] = "many"; });
  EXPECT_CONTAINS(error_of([&] { grape::train::detail::read_checkpoint(ck); }),
                  ck + "/state.json: \"tokens\" is \"many\", not a number");
  grape::io::write_file_atomic(ck + "/state.json", state);
  // optimizer.pt whose TorchScript code does not parse (checksum updated): the parser's error is no
  // c10::Error and escaped as raw parser text; now it names the file.
  std::string opt = grape::io::read_file(ck + "/optimizer.pt");
  const size_t at = opt.find("class Module(Module):");
  ASSERT_NE(at, std::string::npos);
  opt[at + 20] = '!';
  grape::io::write_file_atomic(ck + "/optimizer.pt", opt);
  edit_state(ck, [&](nlohmann::json& s) { s["checksums"]["optimizer.pt"] = fnv1a(opt); });
  EXPECT_CONTAINS(error_of([&] { train("run", /*resume=*/true); }),
                  ck + "/optimizer.pt: cannot load the optimizer state (the file is damaged): expected : but "
                       "found '!' here:");
  // A damaged metrics.jsonl line: file and line named.
  grape::io::write_file_atomic(path("run/metrics.jsonl"),
                               "{\"step\": 1, \"loss\": 5.5}\n{\"step\": \"two\"}\n");
  EXPECT_CONTAINS(error_of([&] { grape::train::detail::read_metrics(path("run")); }),
                  path("run/metrics.jsonl") + ":2: the record has no integer \"step\"");
  grape::io::write_file_atomic(path("run/metrics.jsonl"), "{\"step\": 1, \"loss\": \"low\"}\n");
  EXPECT_CONTAINS(error_of([&] { grape::train::detail::read_metrics(path("run")); }),
                  path("run/metrics.jsonl") + ":1: \"loss\" is \"low\", not a number");
  // Resume's truncation stops at such a line instead of throwing nlohmann's type_error.
  grape::io::write_file_atomic(path("run/metrics.jsonl"),
                               "{\"step\": 1}\n{\"step\": \"x\"}\n{\"step\": 2}\n");
  grape::train::detail::truncate_metrics(path("run"), 4);
  EXPECT_EQ(grape::io::read_file(path("run/metrics.jsonl")), "{\"step\": 1}\n");

  // Sizes that would reach the allocator: refused with the memory they need.
  for (const std::string set : {"n_embd=1000000", "n_layer=100000"}) {
    const auto r = run_cli("train --set " + set + " --steps 1 --out " + path("huge"));
    EXPECT_EQ(r.code, 1) << r.output;
    EXPECT_CONTAINS(r.output, "GiB for the weights, more than this machine's");
    EXPECT_EQ(r.output.find("tried to allocate"), std::string::npos) << r.output;
  }
  // --lr -1 and other bounds: what the value must be, not a 309-digit DBL_MAX.
  auto r = run_cli("train --lr -1 --steps 1 --out " + path("neg"));
  EXPECT_NE(r.code, 0);
  EXPECT_CONTAINS(r.output, "--lr: must be a number > 0, got '-1'");
  EXPECT_LT(r.output.size(), 200u) << r.output;

  // --offset near the int64 limit; q and k near FLT_MAX; xpos with an extreme centre.
  grape::io::write_npy(path("q.npy"), torch::randn({4, 2, 8}));
  r = run_cli("pe logits -e rope --q " + path("q.npy") + " --k " + path("q.npy") +
              " --offset 9223372036854775800 --out " + path("o.npy"));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_CONTAINS(r.output, "rope: 4 tokens at offset 9223372036854775800 run past position 2^53");
  grape::io::write_npy(path("big.npy"), torch::full({4, 2, 8}, 3e38f));
  r = run_cli("pe logits -e alibi --q " + path("big.npy") + " --k " + path("big.npy") + " --out " +
              path("o.npy"));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_CONTAINS(r.output, "alibi: the logits overflow to NaN/Inf");
  r = run_cli("pe logits -e xpos --set center=-1e6 --set scale_base=1 --q " + path("q.npy") + " --k " +
              path("q.npy") + " --out " + path("o.npy"));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_CONTAINS(r.output, "xpos: the logits overflow to NaN/Inf");
  EXPECT_FALSE(fs::exists(path("o.npy")));
}

// ---- the fuzz test's part on LibTorch (issue 17) -------------------------------------------------------
//
// Mutations of every file a run directory holds, of a SentencePiece model, of llm.c/nanoGPT shards and of
// config files, each read the way grape reads it in a child process (fork) under a 10 s alarm and a memory
// cap. A case passes when the child accepts the file and its results are finite, or refuses it with an error
// naming the file; a crash, hang, out-of-memory or non-finite result fails the test. The torch-free readers'
// cases are in tests/plain/test_fuzz_formats.cpp; GRAPE_FUZZ_SCALE scales both.

struct NonFinite : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// splitmix64, and mutations as in tests/plain/test_fuzz_formats.cpp (a smaller set: bytes, ints, text).
struct FuzzRng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  size_t below(size_t n) { return n == 0 ? 0 : size_t(next() % n); }
};

std::string mutate(std::string b, FuzzRng& rng) {
  static const char* kNumbers[] = {
      "99999999999999999999", "-1", "1e308", "4294967296", "0", "nan", "1.5", "\"x\""};
  const int edits = 1 + int(rng.below(3));
  for (int e = 0; e < edits; ++e) {
    const size_t at = rng.below(b.size() + 1);
    switch (rng.below(6)) {
      case 0:
        if (!b.empty()) b[rng.below(b.size())] ^= char(1u << rng.below(8));
        break;
      case 1:
        if (!b.empty()) b[rng.below(b.size())] = char(rng.next());
        break;
      case 2:
        for (size_t i = 0; i < 4 && at + i < b.size(); ++i) b[at + i] = char(0xFF);
        break;
      case 3:
        b.resize(at);
        break;
      case 4:
        b.erase(at, 1 + rng.below(16));
        break;
      default: {
        const size_t d = b.find_first_of("0123456789", at);
        if (d == std::string::npos) break;
        const size_t end = b.find_first_not_of("0123456789", d);
        b.replace(d, (end == std::string::npos ? b.size() : end) - d, kNumbers[rng.below(8)]);
      }
    }
  }
  return b;
}

int fuzz_scaled(int cases) {
  const char* env = std::getenv("GRAPE_FUZZ_SCALE");
  const double f = env != nullptr ? std::atof(env) : 1.0;
  return std::max(1, int(cases * (f > 0 ? f : 1.0)));
}

uint64_t vm_size_bytes() {
  std::ifstream in("/proc/self/status");
  std::string key;
  uint64_t kib = 0;
  while (in >> key)
    if (key == "VmSize:" && (in >> kib)) break;
  return kib * 1024;
}

// How one case ended, as the parent sees it: "" when it passed, else what went wrong.
std::string run_case(const std::function<void()>& body, const std::string& file_name) {
  const uint64_t cap = vm_size_bytes() + (uint64_t(2) << 30);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::alarm(10);
    rlimit as{cap, cap};
    ::setrlimit(RLIMIT_AS, &as);
    int code = 0;
    try {
      body();
    } catch (const NonFinite& e) {
      std::fprintf(stderr, "%s\n", e.what());
      code = 12;
    } catch (const std::exception& e) {
      const std::string msg = e.what();
      code = msg.find(file_name) != std::string::npos ? 10 : 11;
      if (code == 11) std::fprintf(stderr, "%s\n", e.what());
    }
    std::fflush(stderr);
    ::_exit(code);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (WIFSIGNALED(status))
    return WTERMSIG(status) == SIGALRM ? "hung (over 10 s)"
                                       : "crashed (signal " + std::to_string(WTERMSIG(status)) + ")";
  switch (WEXITSTATUS(status)) {
    case 0:
    case 10:
      return "";
    case 11:
      return "refused without naming " + file_name + " (message above)";
    case 12:
      return "accepted with non-finite results (above)";
    default:
      return "exit status " + std::to_string(WEXITSTATUS(status));
  }
}

// Logits of a few tokens: finite, or the case fails.
void require_finite_forward(grape::Transformer& m) {
  torch::NoGradGuard no_grad;
  auto tokens = torch::arange(0, 8, torch::kInt64).remainder(m->config().vocab_size).unsqueeze(0);
  if (!torch::isfinite(m->forward(tokens)).all().item<bool>()) throw NonFinite("non-finite logits");
}

TEST_F(RobustInputs, FuzzRunFilesTokenizersShardsAndConfigs) {
  const auto t0 = std::chrono::steady_clock::now();
  model.vocab_size = 300;
  cfg.tokenizer = path("tok.model");
  grape::data::SentencePieceTraining sp;
  sp.inputs = {path("text.txt")};
  sp.vocab_size = 300;
  sp.out_path = path("tok.model");
  grape::data::train_sentencepiece(sp);
  train("run");
  const std::string run = path("run"), ck = path("run/checkpoints/step_00000004");
  grape::data::write_token_shard(path("v1.bin"), {1, 2, 3, 500, 65535, 0, 7});
  grape::data::write_token_shard(path("v2.bin"), {1, 70000, 3});
  grape::io::write_file_atomic(path("nano.bin"), std::string("\x01\x00\x02\x00\x03\x00\xff\xff", 8));
  grape::io::write_file_atomic(path("c.toml"),
                               "[model]\nn_layer = 1\nn_embd = 32\nn_head = 2\npe = \"alibi\"\n"
                               "[train]\nsteps = 3\nlr = 0.001\nwarmup = 1\n");
  grape::io::write_file_atomic(path("c.json"),
                               R"({"model": {"n_layer": 1, "n_embd": 32, "pe_options": {"base": "500"}},)"
                               R"( "train": {"steps": 3, "batch": 2}})");

  struct Target {
    std::string file;   // the file mutated
    bool fix_checksum;  // update state.json so that the mutation reaches the parser
    int cases;
    std::function<void()> read;  // reads it as grape does; throws NonFinite on non-finite results
    std::string needle = {};     // what a refusal must name; default: the file's name
  };
  auto load_and_run = [&] {
    auto loaded = grape::train::detail::read_checkpoint(ck);
    grape::Transformer m(model);
    grape::train::detail::load_weights(m, loaded);
    grape::train::Trainer trainer(m, cfg);
    grape::train::detail::load_optimizer(trainer.optimizer(), loaded);
    require_finite_forward(m);
  };
  const std::vector<Target> targets = {
      {ck + "/state.json", false, 60, load_and_run, ck},  // may name the file whose checksum it no longer has
      {ck + "/model.safetensors", true, 60, load_and_run},
      {ck + "/model.safetensors", false, 10, load_and_run},
      {ck + "/optimizer.pt", true, 60, load_and_run},
      {run + "/checkpoints/latest", false, 30,
       [&] {
         auto m = grape::train::load_model(grape::train::read_run(run));
         require_finite_forward(m);
       }},
      {run + "/run.json", false, 60,
       [&] {
         const auto info = grape::train::read_run(run);
         auto tok = grape::train::run_tokenizer(info);
         auto m = grape::train::load_model(info);
         require_finite_forward(m);
       },
       run},  // a changed config may make another file the one refused
      {run + "/metrics.jsonl", false, 40,
       [&] {
         for (const auto& rec : grape::train::detail::read_metrics(run))
           for (const auto& [k, v] : rec.items())
             if (v.is_number() && !std::isfinite(v.get<double>())) throw NonFinite("metrics: " + k);
         grape::train::detail::truncate_metrics(run, 2);
       }},
      {run + "/tokenizer.model", false, 80,
       [&] {
         auto tok = grape::data::load_sentencepiece(run + "/tokenizer.model");
         std::string probe;
         for (int c = 1; c < 256; ++c) probe += char(c);
         probe += " the lord said unto moses \xE2\x82\xAC\xEF\xBC\xA1 ";
         tok->decode(tok->encode(probe));
       }},
  };
  FuzzRng rng{2026};
  int cases = 0;
  std::vector<std::string> failures;
  auto fuzz_file = [&](const std::string& file, bool fix_checksum, int n, const std::function<void()>& read,
                       const std::string& needle = "") {
    const std::string original = grape::io::read_file(file);
    const std::string state = grape::io::read_file(ck + "/state.json");
    const std::string base = fs::path(file).filename().string();
    const auto start = std::chrono::steady_clock::now();
    // Plain writes: no fsync per case (the atomic writer's), which would cost more than the case.
    auto put = [](const std::string& f, const std::string& bytes) {
      std::ofstream(f, std::ios::binary) << bytes;
    };
    for (int i = 0; i < fuzz_scaled(n); ++i, ++cases) {
      const std::string bytes = mutate(original, rng);
      put(file, bytes);
      if (fix_checksum) {
        auto j = nlohmann::json::parse(state);
        j["checksums"][base] = fnv1a(bytes);
        put(ck + "/state.json", j.dump(2));
      }
      const std::string what = run_case(read, needle.empty() ? base : needle);
      if (!what.empty()) failures.push_back(file + " case " + std::to_string(i) + ": " + what);
      put(file, original);
      put(ck + "/state.json", state);
    }
    std::printf("fuzz: %s: %.2f s\n", base.c_str(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  };
  for (const auto& t : targets) fuzz_file(t.file, t.fix_checksum, t.cases, t.read, t.needle);
  for (const auto& shard : {path("v1.bin"), path("v2.bin"), path("nano.bin")})
    fuzz_file(shard, false, 40, [shard] {
      grape::data::TokenFile f(shard);
      std::vector<int64_t> out(size_t(f.size()));
      f.copy(0, f.size(), out.data(), 100000);
    });
  for (const auto& npy_or_st : {std::string("q.npy"), std::string("w.safetensors")}) {
    const std::string file = path(npy_or_st);
    if (npy_or_st == "q.npy")
      grape::io::write_npy(file, torch::randn({3, 2, 4}));
    else
      grape::io::write_safetensors(file, {{"a", torch::randn({2, 3})}, {"b", torch::randn({4})}});
    // NaN in an .npy array is data here (pe logits refuses it in q, k or x); in .safetensors it is refused.
    fuzz_file(file, false, 40, [file] {
      if (file.ends_with(".npy"))
        grape::io::read_npy(file);
      else
        grape::io::read_safetensors(file);
    });
  }
  // Config files through the CLI (their parser lives there): a refusal names the file or the setting.
  for (const auto& config : {path("c.toml"), path("c.json")}) {
    const std::string original = grape::io::read_file(config);
    for (int i = 0; i < fuzz_scaled(10); ++i, ++cases) {
      grape::io::write_file_atomic(config, mutate(original, rng));
      const auto r = run_cli(
          "train --config " + config + " --data " + path("no_such_data") + " --out " + path("cfg_run"),
          "timeout 20");
      const bool named = r.output.find(config) != std::string::npos ||
                         r.output.find("no_such_data") != std::string::npos ||
                         r.output.find("model config") != std::string::npos ||
                         r.output.find("train config") != std::string::npos;
      if (r.code != 1 || !named || r.output.find("grape: error: ") == std::string::npos)
        failures.push_back(config + " case " + std::to_string(i) + ": exit " + std::to_string(r.code) + ": " +
                           r.output);
    }
    grape::io::write_file_atomic(config, original);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("fuzz: %d cases in %.1f s, %zu failures\n", cases, seconds, failures.size());
  for (const auto& f : failures) ADD_FAILURE() << f;
}

}  // namespace
