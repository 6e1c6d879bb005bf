// `grape bench attention`: time and peak memory of the fused CPU attention vs the LibTorch-composed
// reference, per encoding, forward and forward+backward, beside this machine's sgemm GFLOP/s and copy
// bandwidth measured in the same run; plus the encode pre-pass in GB/s and decode tokens/s against the
// cache-read bound. Google Benchmark does the timing (a collecting reporter, no output of its own); we print
// the tables.
#include "cli/bench_attention.hpp"

#include <benchmark/benchmark.h>
#include <fmt/format.h>
#include <malloc.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "grape/attention.hpp"
#include "grape/io.hpp"
#include "grape/train.hpp"

namespace grape::cli {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr int64_t kSgemmN = 2048;            // headline sgemm: 2048 x 2048 times 2048 x 2048, float32
constexpr int64_t kCopyFloats = 64LL << 20;  // 256 MB buffer: far beyond any cache
constexpr double kMB = 1024.0 * 1024.0;

struct Args {
  std::vector<std::string> pe = {"rope", "alibi", "fox", "grape-m", "grape-a-qk"};
  std::vector<int64_t> T = {512, 1024, 2048, 4096};
  std::vector<int64_t> D = {64, 128};
  int64_t H = 8, B = 1;
  std::vector<std::string> paths = {"fused", "reference"};
  std::vector<std::string> modes = {"fwd", "fwdbwd"};
  int64_t memory_t = 8192, decode_cache = 4096;
  double min_time = 0.2;
  std::string json;
  bool quick = false;

  bool has_path(const std::string& p) const { return std::count(paths.begin(), paths.end(), p) > 0; }
  bool has_mode(const std::string& m) const { return std::count(modes.begin(), modes.end(), m) > 0; }
};

// ---- peak memory: Linux resets VmHWM (peak RSS) to the current RSS when "5" is written to clear_refs ------

bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  f.flush();
  return bool(f);
}

// A "VmRSS:   1234 kB" field of /proc/self/status, in bytes (NaN when absent).
double status_bytes(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(field + ":", 0) != 0) continue;
    std::istringstream in(line.substr(field.size() + 1));
    double kb = kNaN;
    in >> kb;
    return kb * 1024.0;
  }
  return kNaN;
}

// MemAvailable of /proc/meminfo in bytes (infinity when unknown: then we do not refuse anything).
double mem_available_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  double kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024.0;
  return std::numeric_limits<double>::infinity();
}

// Peak resident bytes above the level before op(), or NaN when the peak counter cannot be reset here.
double peak_extra_bytes(const std::function<void()>& op) {
  malloc_trim(0);  // hand freed heap pages back first: reused resident pages would hide new allocations
  if (!reset_peak_rss()) {
    op();
    return kNaN;
  }
  const double before = status_bytes("VmRSS");
  op();
  return status_bytes("VmHWM") - before;
}

// ---- Google Benchmark as the timing engine ------------------------------------------------------------

// What we keep of one registered benchmark.
struct Measure {
  double sec = kNaN;   // real time per iteration
  double peak = kNaN;  // peak extra bytes of the untimed first call (when asked for)
  std::string error;   // why there is no time
  bool warmed = false;
};

// Collects real time per iteration by benchmark name instead of printing; a progress line on a terminal.
class CollectReporter : public benchmark::BenchmarkReporter {
 public:
  CollectReporter(std::map<std::string, Measure>& results, size_t total) : results_(results), total_(total) {}
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      if (r.run_type != Run::RT_Iteration) continue;
      auto& m = results_[r.run_name.function_name];
      if (r.error_occurred)
        m.error = r.error_message;
      else
        m.sec = r.real_accumulated_time / double(std::max<int64_t>(1, r.iterations));
      ++done_;
      if (isatty(STDERR_FILENO))
        fmt::print(stderr, "\r\033[K[{}/{}] {} {}", done_, total_, r.run_name.function_name,
                   m.error.empty() ? fmt::format("{:.3f} ms", m.sec * 1e3) : "error");
    }
  }
  void Finalize() override {
    if (isatty(STDERR_FILENO)) fmt::print(stderr, "\r\033[K");
  }

 private:
  std::map<std::string, Measure>& results_;
  size_t total_;
  size_t done_ = 0;
};

// The body of every benchmark. One untimed call first warms up and, when `peak` is set, measures peak memory;
// a throw skips the benchmark with its message (the table shows "error", the errors list says why).
void run_benchmark(benchmark::State& st, Measure* m, const std::function<void()>& op, bool peak) {
  try {
    if (!m->warmed) {
      m->warmed = true;
      if (peak)
        m->peak = peak_extra_bytes(op);
      else
        op();
    }
    for (auto _ : st) op();
  } catch (const c10::Error& e) {
    st.SkipWithError(e.what_without_backtrace());
  } catch (const std::exception& e) {
    st.SkipWithError(e.what());
  }
}

struct Bench {
  double min_time = 0.2;
  std::map<std::string, Measure> results;  // std::map: the benchmark lambdas keep pointers into it
  size_t registered = 0;

  // Registers `op`, one call of the measured operation, under `name`.
  void add(const std::string& name, std::function<void()> op, bool peak = false) {
    Measure* m = &results[name];
    ++registered;
    auto body = [m, op = std::move(op), peak](benchmark::State& st) { run_benchmark(st, m, op, peak); };
    benchmark::RegisterBenchmark(name.c_str(), std::move(body))
        ->MinTime(min_time)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  const Measure* get(const std::string& name) const {
    auto it = results.find(name);
    return it == results.end() ? nullptr : &it->second;
  }
  double sec(const std::string& name) const {
    const Measure* m = get(name);
    return m ? m->sec : kNaN;
  }
  double peak(const std::string& name) const {
    const Measure* m = get(name);
    return m ? m->peak : kNaN;
  }
};

// ---- the BLAS in use -----------------------------------------------------------------------------------

}  // namespace

namespace {

// ---- inputs and operations ----------------------------------------------------------------------------

// q, k, v [B,T,H,D] and x [B,T,C] of one (T, D); the *g copies require grad for forward+backward.
struct Inputs {
  torch::Tensor q, k, v, x, g, qg, kg, vg;
};

std::shared_ptr<Inputs> make_inputs(int64_t B, int64_t T, int64_t H, int64_t D) {
  auto in = std::make_shared<Inputs>();
  in->q = torch::randn({B, T, H, D});
  in->k = torch::randn({B, T, H, D});
  in->v = torch::randn({B, T, H, D});
  in->x = torch::randn({B, T, H * D});
  in->g = torch::randn({B, T, H, D});  // upstream gradient of y
  in->qg = in->q.detach().requires_grad_(true);
  in->kg = in->k.detach().requires_grad_(true);
  in->vg = in->v.detach().requires_grad_(true);
  return in;
}

EncodingPtr build(const std::string& pe, int64_t H, int64_t D) {
  torch::manual_seed(0);  // the same parameters for every (path, mode)
  return make_encoding(pe, HeadShape{H, D, H * D});
}

torch::Tensor attend(Encoding& enc, bool fused, const torch::Tensor& q, const torch::Tensor& k,
                     const torch::Tensor& v, const torch::Tensor& x) {
  auto state = enc.initial_state(q.size(0));  // fresh: every call is the first chunk of a sequence
  return fused ? fused_attention(enc, q, k, v, x, state) : reference_attention(enc, q, k, v, x, state);
}

std::function<void()> forward_op(EncodingPtr enc, bool fused, std::shared_ptr<Inputs> in) {
  return [enc, fused, in] {
    torch::NoGradGuard no_grad;
    auto y = attend(*enc, fused, in->q, in->k, in->v, in->x);
    benchmark::DoNotOptimize(y.data_ptr());
  };
}

// The fused kernel alone: q, k encoded once beforehand, so the time is the attention itself (with the
// binding's per-call work: the encoding's per-token bias terms, checks); the encode pre-pass is measured on
// its own.
std::function<void()> kernel_op(EncodingPtr enc, std::shared_ptr<Inputs> in) {
  torch::NoGradGuard no_grad;
  auto state = enc->initial_state(in->q.size(0));
  auto tokens = std::make_shared<PeTokens>(enc->encode(in->q, in->k, in->x, state));
  auto cache = std::make_shared<KeyCache>(KeyCache::from(*tokens, in->v));
  return [enc, tokens, cache] {
    torch::NoGradGuard no_grad;
    auto y = fused_attend(*enc, *tokens, *cache);
    benchmark::DoNotOptimize(y.data_ptr());
  };
}

std::function<void()> forward_backward_op(EncodingPtr enc, bool fused, std::shared_ptr<Inputs> in) {
  return [enc, fused, in] {
    auto y = attend(*enc, fused, in->qg, in->kg, in->vg, in->x);
    (y * in->g).sum().backward();
    for (auto* t : {&in->qg, &in->kg, &in->vg}) t->mutable_grad().reset();  // no accumulation across calls
    enc->zero_grad(/*set_to_none=*/true);
  };
}

// Bytes the encode pre-pass moves: q, k read and q~, k~ written when it rotates or scales, x read when
// contextual, and every per-token bias quantity it writes.
double prepass_bytes(Encoding& enc, const Inputs& in) {
  torch::NoGradGuard no_grad;
  auto state = enc.initial_state(in.q.size(0));
  auto tok = enc.encode(in.q, in.k, in.x, state);
  const auto p = enc.properties();
  double bytes = 0;
  if (p.rotates || p.scales) bytes += 4.0 * double(in.q.numel()) * 4;
  if (p.contextual) bytes += double(in.x.numel()) * 4;
  for (const auto* m : {&tok.query, &tok.key})
    for (const auto& [name, t] : *m)
      if (t.defined()) bytes += double(t.numel()) * double(t.element_size());
  return bytes;
}

// The decode setup: a cache of `cache_len` encoded keys whose last token is the one query.
struct DecodeInputs {
  PeTokens one;
  KeyCache cache;
};

std::shared_ptr<DecodeInputs> make_decode(Encoding& enc, int64_t B, int64_t cache_len, int64_t H, int64_t D) {
  torch::NoGradGuard no_grad;
  auto d = std::make_shared<DecodeInputs>();
  auto state = enc.initial_state(B);
  auto chunk = [&](int64_t T) {
    return enc.encode(torch::randn({B, T, H, D}), torch::randn({B, T, H, D}), torch::randn({B, T, H * D}),
                      state);
  };
  d->cache = KeyCache::from(chunk(cache_len - 1), torch::randn({B, cache_len - 1, H, D}));
  d->one = chunk(1);  // continues the state: position cache_len - 1
  d->cache.append(d->one, torch::randn({B, 1, H, D}));
  return d;
}

// ---- formatting --------------------------------------------------------------------------------------

std::string num(double v, int prec) { return std::isfinite(v) ? fmt::format("{:.{}f}", v, prec) : "-"; }
std::string pct(double v) { return std::isfinite(v) ? fmt::format("{:.0f}%", 100 * v) : "-"; }
std::string times(double v) { return std::isfinite(v) ? fmt::format("{:.1f}x", v) : "-"; }
// A time cell: "n/a" when the fused kernel does not support the encoding, "error" when the run failed.
std::string ms_cell(const Bench& b, const std::string& name, bool supported) {
  if (!supported) return "n/a";
  const Measure* m = b.get(name);
  if (!m) return "-";
  return m->error.empty() ? num(m->sec * 1e3, 2) : "error";
}
std::string mb_cell(double bytes, bool supported) { return supported ? num(bytes / kMB, 1) : "n/a"; }
double ratio(double num, double den) { return num / den; }  // NaN propagates to "-"
nlohmann::json jnum(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

std::string cell_name(int64_t T, int64_t D, const std::string& pe) {
  return fmt::format("T{}/D{}/{}", T, D, pe);
}

void validate(const Args& a) {
  if (a.pe.empty()) throw std::invalid_argument("--pe: give at least one encoding");
  for (const auto& pe : a.pe) (void)encoding_info(pe);  // throws, listing the known names
  if (a.T.empty() || a.D.empty()) throw std::invalid_argument("--T and --D need at least one value each");
  for (auto t : a.T)
    if (t < 1) throw std::invalid_argument(fmt::format("--T: sequence lengths must be positive, got {}", t));
  for (auto d : a.D)
    if (d < 2 || d % 2)
      throw std::invalid_argument(fmt::format("--D: head dims must be even and >= 2, got {}", d));
  if (a.H < 1 || a.B < 1) throw std::invalid_argument("--H and --B must be positive");
  if (a.memory_t < 0) throw std::invalid_argument("--memory-t must be >= 0 (0 skips the memory test)");
  if (a.decode_cache != 0 && a.decode_cache < 2)
    throw std::invalid_argument("--decode-cache must be 0 (skip) or >= 2");
  if (!(a.min_time > 0)) throw std::invalid_argument("--min-time must be positive");
}

// The cell the per-cell targets are read at: T=2048, D=64 when measured, else the largest T at D=64 (or the
// first D).
std::pair<int64_t, int64_t> target_cell(const Args& a) {
  const bool has2048 = std::count(a.T.begin(), a.T.end(), 2048) > 0;
  const bool has64 = std::count(a.D.begin(), a.D.end(), 64) > 0;
  return {has2048 ? 2048 : *std::max_element(a.T.begin(), a.T.end()), has64 ? 64 : a.D.front()};
}

// One target: the worst encoding's value against the threshold.
struct Target {
  Target(std::string what, std::string at, double threshold, bool percent)
      : what(std::move(what)), at(std::move(at)), threshold(threshold), percent(percent) {}
  std::string what, at;
  double threshold;
  bool percent;
  double worst = kNaN;
  std::string worst_pe;
  void see(const std::string& pe, double v) {
    if (std::isfinite(v) && !(v >= worst)) worst = v, worst_pe = pe;
  }
  std::string show(double v) const { return percent ? pct(v) : times(v); }
  std::string status() const { return std::isfinite(worst) ? (worst >= threshold ? "pass" : "miss") : "n/a"; }
};

void run(const Args& a) {
  validate(a);
  const int64_t H = a.H, B = a.B;
  const bool do_fused = a.has_path("fused"), do_ref = a.has_path("reference");
  const bool do_fwd = a.has_mode("fwd"), do_fb = a.has_mode("fwdbwd");

  // Only the program name: our own flags must not reach Google Benchmark's parser.
  static char prog[] = "grape";
  char* argv[] = {prog, nullptr};
  int argc = 1;
  benchmark::Initialize(&argc, argv);
  benchmark::ClearRegisteredBenchmarks();

  Bench bench;
  bench.min_time = a.min_time;

  // Machine baselines in the same run: OpenBLAS sgemm and a plain copy of a 256 MB buffer.
  {
    auto x = torch::randn({kSgemmN, kSgemmN}), y = torch::randn({kSgemmN, kSgemmN});
    auto z = torch::empty({kSgemmN, kSgemmN});
    bench.add("sgemm", [x, y, z]() mutable { torch::mm_out(z, x, y); });
    auto src = torch::rand({kCopyFloats}), dst = torch::empty({kCopyFloats});
    bench.add("copy", [src, dst]() mutable { dst.copy_(src); });
  }

  // Encodings per (D, pe) and whether the fused kernel supports them.
  std::map<std::pair<int64_t, std::string>, EncodingPtr> encs;
  std::map<std::pair<int64_t, std::string>, bool> supported;
  std::vector<int64_t> decode_D;
  for (auto D : a.D)
    for (const auto& pe : a.pe) {
      encs[{D, pe}] = build(pe, H, D);
      supported[{D, pe}] = fused_supported(*encs[{D, pe}]);
    }

  // Attention cells: forward and forward+backward per path, and the encode pre-pass alone.
  std::map<std::string, double> pre_bytes;
  for (auto T : a.T)
    for (auto D : a.D) {
      auto in = make_inputs(B, T, H, D);
      for (const auto& pe : a.pe) {
        auto enc = encs[{D, pe}];
        const std::string c = cell_name(T, D, pe);
        for (bool fused : {true, false}) {
          if (fused ? !do_fused || !supported[{D, pe}] : !do_ref) continue;
          const std::string path = fused ? "fused" : "reference";
          if (do_fwd) bench.add(c + "/" + path + "/fwd", forward_op(enc, fused, in), /*peak=*/true);
          if (do_fwd && fused) bench.add(c + "/fused/kernel", kernel_op(enc, in));
          if (do_fb)
            bench.add(c + "/" + path + "/fwdbwd", forward_backward_op(enc, fused, in), /*peak=*/true);
        }
        pre_bytes[c] = prepass_bytes(*enc, *in);
        bench.add(c + "/prepass", [enc, in] {
          torch::NoGradGuard no_grad;
          auto state = enc->initial_state(in->q.size(0));
          auto tok = enc->encode(in->q, in->k, in->x, state);
          benchmark::DoNotOptimize(tok.q.data_ptr());
        });
      }
    }

  // Decode: one query against a cache of decode_cache keys.
  if (a.decode_cache > 0)
    for (auto D : a.D)
      for (const auto& pe : a.pe) {
        auto enc = encs[{D, pe}];
        auto d = make_decode(*enc, B, a.decode_cache, H, D);
        const std::string c = fmt::format("decode/D{}/{}", D, pe);
        if (do_fused && supported[{D, pe}])
          bench.add(c + "/fused", [enc, d] {
            torch::NoGradGuard no_grad;
            auto y = fused_attend(*enc, d->one, d->cache);
            benchmark::DoNotOptimize(y.data_ptr());
          });
        if (do_ref)
          bench.add(c + "/reference", [enc, d] {
            torch::NoGradGuard no_grad;
            auto p = torch::softmax(attention_logits(*enc, d->one, d->cache), -1);
            auto y = torch::einsum("bhij,bjhd->bihd", {p, d->cache.v});
            benchmark::DoNotOptimize(y.data_ptr());
          });
      }

  CollectReporter reporter(bench.results, bench.registered);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::ClearRegisteredBenchmarks();  // the lambdas hold the inputs: free them now

  const double sgemm_gflops = 2.0 * std::pow(double(kSgemmN), 3) / bench.sec("sgemm") / 1e9;
  const double copy_gbps = 2.0 * double(kCopyFloats) * 4 / bench.sec("copy") / 1e9;  // read + write

  // Peak memory of one forward at --memory-t, outside the timing (composed at 8192 needs gigabytes).
  struct MemRow {
    std::string pe;
    double fused = kNaN, ref = kNaN;
    bool supported = true;
    std::string note;
  };
  std::vector<MemRow> mem_rows;
  const int64_t mem_D = a.D.front();
  if (a.memory_t > 0) {
    auto in = make_inputs(B, a.memory_t, H, mem_D);
    for (const auto& pe : a.pe) {
      MemRow r;
      r.pe = pe;
      auto enc = encs[{mem_D, pe}];
      r.supported = supported[{mem_D, pe}];
      auto guarded = [&](bool fused) {
        try {
          return peak_extra_bytes(forward_op(enc, fused, in));
        } catch (const c10::Error& e) {
          r.note += (fused ? "fused: " : "composed: ") + std::string(e.what_without_backtrace()) + " ";
        } catch (const std::exception& e) {
          r.note += (fused ? "fused: " : "composed: ") + std::string(e.what()) + " ";
        }
        return kNaN;
      };
      if (isatty(STDERR_FILENO)) fmt::print(stderr, "\r\033[Kmemory T={} {}", a.memory_t, pe);
      if (r.supported && do_fused) r.fused = guarded(true);
      // The composed forward keeps four or five [B,H,T,T] float32 arrays alive at once (fox: 8.2 GB at 8192).
      const double need = 5.0 * double(B * H) * double(a.memory_t) * double(a.memory_t) * 4;
      const double avail = mem_available_bytes();
      if (do_ref && need > 0.9 * avail)
        r.note +=
            fmt::format("composed skipped: needs ~{:.1f} GB, {:.1f} GB available", need / 1e9, avail / 1e9);
      else if (do_ref)
        r.ref = guarded(false);
      mem_rows.push_back(r);
    }
    if (isatty(STDERR_FILENO)) fmt::print(stderr, "\r\033[K");
  }

  // ---- tables -------------------------------------------------------------------------------------------
  nlohmann::json out;
  out["machine"] = {{"threads", torch::get_num_threads()},
                    {"blas", train::blas_description()},
                    {"sgemm_n", kSgemmN},
                    {"sgemm_gflops", jnum(sgemm_gflops)},
                    {"copy_bytes", kCopyFloats * 4},
                    {"copy_gbps", jnum(copy_gbps)}};
  out["options"] = {{"pe", a.pe},
                    {"T", a.T},
                    {"D", a.D},
                    {"H", H},
                    {"B", B},
                    {"paths", a.paths},
                    {"modes", a.modes},
                    {"memory_t", a.memory_t},
                    {"decode_cache", a.decode_cache},
                    {"min_time", a.min_time}};
  fmt::print("BLAS: {}\n", train::blas_description());
  fmt::print("machine: {0} threads, sgemm {1}x{1}x{1} {2:.1f} GFLOP/s, copy bandwidth {3:.2f} GB/s\n",
             torch::get_num_threads(), kSgemmN, sgemm_gflops, copy_gbps);
  fmt::print(
      "times in ms per call (forwards include the encode pre-pass); x = reference / fused; kernel = the "
      "fused\n"
      "forward on already encoded q, k; GFLOP/s = 2*B*H*T^2*D / kernel time (w/ enc: / fused forward time);\n"
      "pre GB/s = bytes the encode pre-pass moves / its time; % against sgemm and copy above\n");

  const auto [tT, tD] = target_cell(a);
  Target t_speed{"fwd+bwd speedup, fused vs composed", fmt::format("T={} D={}", tT, tD), 5.0, false};
  Target t_gemm{"kernel fwd GFLOP/s / sgemm GFLOP/s", fmt::format("T={} D={}", tT, tD), 0.5, true};
  Target t_mem{"peak memory, composed / fused fwd", fmt::format("T={} D={}", a.memory_t, mem_D), 10.0, false};
  Target t_dec{"decode tokens/s / bandwidth bound", fmt::format("cache={} D={}", a.decode_cache, tD), 0.5,
               true};

  nlohmann::json cells = nlohmann::json::array();
  std::string mem_table;
  for (auto T : a.T)
    for (auto D : a.D) {
      fmt::print("\nT={} D={} H={} B={}\n", T, D, H, B);
      fmt::print("{:<14}{:>10}{:>10}{:>7}{:>11}{:>11}{:>7}{:>8}{:>9}{:>8}{:>8}{:>10}{:>7}\n", "encoding",
                 "fwd fused", "fwd ref", "x", "f+b fused", "f+b ref", "x", "kernel", "GFLOP/s", "%sgemm",
                 "w/ enc", "pre GB/s", "%copy");
      for (const auto& pe : a.pe) {
        const std::string c = cell_name(T, D, pe);
        const bool sup = supported[{D, pe}];
        const double ff = bench.sec(c + "/fused/fwd"), rf = bench.sec(c + "/reference/fwd");
        const double fb = bench.sec(c + "/fused/fwdbwd"), rb = bench.sec(c + "/reference/fwdbwd");
        const double flops = 2.0 * double(B * H) * double(T) * double(T) * double(D);
        const double fk = bench.sec(c + "/fused/kernel");
        const double gflops = flops / fk / 1e9, enc_gflops = flops / ff / 1e9, ref_gflops = flops / rf / 1e9;
        const double pre_s = bench.sec(c + "/prepass");
        const double pre_gbps = pre_bytes[c] > 0 ? pre_bytes[c] / pre_s / 1e9 : kNaN;
        fmt::print("{:<14}{:>10}{:>10}{:>7}{:>11}{:>11}{:>7}{:>8}{:>9}{:>8}{:>8}{:>10}{:>7}\n", pe,
                   ms_cell(bench, c + "/fused/fwd", sup), ms_cell(bench, c + "/reference/fwd", true),
                   times(ratio(rf, ff)), ms_cell(bench, c + "/fused/fwdbwd", sup),
                   ms_cell(bench, c + "/reference/fwdbwd", true), times(ratio(rb, fb)),
                   ms_cell(bench, c + "/fused/kernel", sup), sup ? num(gflops, 1) : "n/a",
                   pct(gflops / sgemm_gflops), pct(enc_gflops / sgemm_gflops), num(pre_gbps, 2),
                   pct(pre_gbps / copy_gbps));
        const double pff = bench.peak(c + "/fused/fwd"), prf = bench.peak(c + "/reference/fwd");
        const double pfb = bench.peak(c + "/fused/fwdbwd"), prb = bench.peak(c + "/reference/fwdbwd");
        mem_table += fmt::format("{:>6}{:>5}  {:<14}{:>10}{:>10}{:>7}{:>11}{:>11}{:>7}\n", T, D, pe,
                                 mb_cell(pff, sup), mb_cell(prf, true), times(ratio(prf, pff)),
                                 mb_cell(pfb, sup), mb_cell(prb, true), times(ratio(prb, pfb)));
        if (sup && T == tT && D == tD) {
          t_speed.see(pe, ratio(rb, fb));
          t_gemm.see(pe, gflops / sgemm_gflops);
        }
        auto mode = [&](double f, double r, double pf, double pr) {
          return nlohmann::json{{"fused_ms", jnum(f * 1e3)},           {"reference_ms", jnum(r * 1e3)},
                                {"speedup", jnum(ratio(r, f))},        {"fused_peak_mb", jnum(pf / kMB)},
                                {"reference_peak_mb", jnum(pr / kMB)}, {"memory_ratio", jnum(ratio(pr, pf))}};
        };
        cells.push_back({{"T", T},
                         {"D", D},
                         {"H", H},
                         {"B", B},
                         {"pe", pe},
                         {"fused_supported", sup},
                         {"fwd", mode(ff, rf, pff, prf)},
                         {"fwdbwd", mode(fb, rb, pfb, prb)},
                         {"fused_kernel_ms", jnum(fk * 1e3)},
                         {"fused_fwd_gflops", jnum(gflops)},
                         {"fused_fwd_with_encode_gflops", jnum(enc_gflops)},
                         {"reference_fwd_gflops", jnum(ref_gflops)},
                         {"fused_fwd_sgemm_fraction", jnum(gflops / sgemm_gflops)},
                         {"prepass",
                          {{"ms", jnum(pre_s * 1e3)},
                           {"bytes", pre_bytes[c]},
                           {"gbps", jnum(pre_gbps)},
                           {"copy_fraction", jnum(pre_gbps / copy_gbps)}}}});
      }
    }
  out["cells"] = cells;

  fmt::print("\npeak extra memory, MB above the resident set before one call (x = reference / fused)\n");
  fmt::print("{:>6}{:>5}  {:<14}{:>10}{:>10}{:>7}{:>11}{:>11}{:>7}\n{}", "T", "D", "encoding", "fwd fused",
             "fwd ref", "x", "f+b fused", "f+b ref", "x", mem_table);
  if (!std::isfinite(status_bytes("VmHWM")) || !reset_peak_rss())
    fmt::print("(peak memory n/a: /proc/self/clear_refs is not writable here)\n");

  nlohmann::json mem_json = nlohmann::json::array();
  if (a.memory_t > 0) {
    fmt::print("\npeak extra memory of one forward at T={} D={} H={} B={}, MB\n", a.memory_t, mem_D, H, B);
    fmt::print("{:<14}{:>10}{:>12}{:>9}  {}\n", "encoding", "fused", "composed", "x", "");
    for (const auto& r : mem_rows) {
      fmt::print("{:<14}{:>10}{:>12}{:>9}  {}\n", r.pe, mb_cell(r.fused, r.supported), mb_cell(r.ref, true),
                 times(ratio(r.ref, r.fused)), r.note);
      if (r.supported) t_mem.see(r.pe, ratio(r.ref, r.fused));
      mem_json.push_back({{"pe", r.pe},
                          {"T", a.memory_t},
                          {"D", mem_D},
                          {"fused_supported", r.supported},
                          {"fused_peak_mb", jnum(r.fused / kMB)},
                          {"reference_peak_mb", jnum(r.ref / kMB)},
                          {"ratio", jnum(ratio(r.ref, r.fused))},
                          {"note", r.note}});
    }
  }
  out["memory"] = mem_json;

  nlohmann::json dec_json = nlohmann::json::array();
  if (a.decode_cache > 0) {
    fmt::print(
        "\ndecode: one query per sequence against {} cached keys, B={} H={}; bound = copy bandwidth / "
        "bytes of K and V read per step\n",
        a.decode_cache, B, H);
    fmt::print("{:>5}  {:<14}{:>12}{:>12}{:>7}{:>12}{:>9}\n", "D", "encoding", "fused tok/s", "ref tok/s",
               "x", "bound tok/s", "% bound");
    for (auto D : a.D)
      for (const auto& pe : a.pe) {
        const std::string c = fmt::format("decode/D{}/{}", D, pe);
        const bool sup = supported[{D, pe}];
        const double bytes = 2.0 * double(a.decode_cache * H * D) * 4 * double(B);  // K and V, every head
        const double f = double(B) / bench.sec(c + "/fused"), r = double(B) / bench.sec(c + "/reference");
        const double bound = double(B) * copy_gbps * 1e9 / bytes;
        fmt::print("{:>5}  {:<14}{:>12}{:>12}{:>7}{:>12}{:>9}\n", D, pe, sup ? num(f, 0) : "n/a", num(r, 0),
                   times(f / r), num(bound, 0), sup ? pct(f / bound) : "n/a");
        if (sup && D == tD) t_dec.see(pe, f / bound);
        dec_json.push_back({{"D", D},
                            {"pe", pe},
                            {"cache", a.decode_cache},
                            {"B", B},
                            {"H", H},
                            {"fused_supported", sup},
                            {"fused_tokens_per_s", jnum(f)},
                            {"reference_tokens_per_s", jnum(r)},
                            {"bytes_per_step", bytes},
                            {"bound_tokens_per_s", jnum(bound)},
                            {"fused_bound_fraction", jnum(f / bound)}});
      }
  }
  out["decode"] = dec_json;

  fmt::print("\ntargets (worst fused-supported encoding)\n");
  nlohmann::json tj = nlohmann::json::array();
  for (const auto* t : {&t_speed, &t_gemm, &t_mem, &t_dec}) {
    fmt::print("  {:<36} {:<18} >= {:<5} measured {:>7} {:<12} {}\n", t->what, t->at, t->show(t->threshold),
               t->show(t->worst), t->worst_pe.empty() ? "" : "(" + t->worst_pe + ")", t->status());
    tj.push_back({{"target", t->what},
                  {"at", t->at},
                  {"threshold", t->threshold},
                  {"measured", jnum(t->worst)},
                  {"worst_pe", t->worst_pe},
                  {"status", t->status()}});
  }
  out["targets"] = tj;

  nlohmann::json errors = nlohmann::json::object();
  for (const auto& [name, m] : bench.results)
    if (!m.error.empty()) errors[name] = m.error;
  out["errors"] = errors;
  if (!errors.empty()) {
    fmt::print("\nerrors\n");
    for (const auto& [name, msg] : errors.items()) fmt::print("  {}: {}\n", name, msg.get<std::string>());
  }
  if (!a.json.empty()) io::write_file_atomic(a.json, out.dump(2) + "\n");
}

}  // namespace

void add_bench_attention(CLI::App* bench) {
  auto a = std::make_shared<Args>();
  auto* cmd = bench->add_subcommand(
      "attention", "fused vs composed attention per encoding: time, peak memory, GFLOP/s, decode, targets");
  cmd->add_option("--pe", a->pe, "encodings (comma-separated)")->delimiter(',')->capture_default_str();
  auto* T = cmd->add_option("--T", a->T, "sequence lengths")->delimiter(',')->capture_default_str();
  auto* D = cmd->add_option("--D", a->D, "head dims")->delimiter(',')->capture_default_str();
  cmd->add_option("--H", a->H, "heads")->capture_default_str();
  cmd->add_option("--B", a->B, "batch")->capture_default_str();
  cmd->add_option("--paths", a->paths, "fused and/or reference")
      ->delimiter(',')
      ->check(CLI::IsMember({"fused", "reference"}))
      ->capture_default_str();
  cmd->add_option("--modes", a->modes, "fwd and/or fwdbwd")
      ->delimiter(',')
      ->check(CLI::IsMember({"fwd", "fwdbwd"}))
      ->capture_default_str();
  auto* mt = cmd->add_option("--memory-t", a->memory_t, "peak memory of one forward at this length (0: skip)")
                 ->capture_default_str();
  cmd->add_option("--decode-cache", a->decode_cache, "cached keys for the decode test (0: skip)")
      ->capture_default_str();
  cmd->add_option("--min-time", a->min_time, "seconds per measurement")->capture_default_str();
  cmd->add_option("--json", a->json, "also write the results as JSON here");
  cmd->add_flag("--quick", a->quick, "T=512,1024, D=64, first encoding, memory-t 2048: for tests and CI");
  cmd->callback([a, T, D, mt] {
    Args run_args = *a;
    if (a->quick) {  // explicit flags still win
      if (T->count() == 0) run_args.T = {512, 1024};
      if (D->count() == 0) run_args.D = {64};
      if (!run_args.pe.empty()) run_args.pe.resize(1);
      if (mt->count() == 0) run_args.memory_t = 2048;
    }
    run(run_args);
  });
}

}  // namespace grape::cli
