// Context extension of RoPE-family spectra (docs/encodings.md, "Context extension"): the one place the
// methods' math lives. Every method is written per frequency index d on the encoding's own frequencies
// theta_d, so it applies unchanged to RoPE's fixed spectrum and to GRAPE-M's learned one:
//   pi           theta_d / s                                     (positions n -> n/s)
//   ntk          theta_d * s^(-2d/(r-2))                         (= base b' = b s^(r/(r-2)))
//   dynamic-ntk  ntk with s -> s l/L - (s-1) for the current length l > L; plain for l <= L
//   yarn         (1-g) theta_d/s + g theta_d, g = ramp(L theta_d / 2pi; alpha, beta); q, k times mscale
//   longrope     theta_d / lambda_d for positions >= n_hat, theta_d below
#include "pe/context_extension.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numbers>
#include <sstream>
#include <stdexcept>

#include "pe/laws.hpp"

namespace grape::detail {

namespace {

// s^(-2d/(r-2)) for d < r/2: 1 at d = 0, exactly s^(-1) at d = r/2 - 1 (the exponent is -1.0 exactly).
torch::Tensor ntk_multiplier(double s, int64_t P, int64_t rotated_dims) {
  auto d = torch::arange(P, torch::kFloat64);
  auto exponent = -(2.0 * d) / double(rotated_dims - 2);
  return torch::pow(c10::Scalar(s), exponent);
}

bool is_method(const std::string& m) {
  for (const auto& x : extension_methods())
    if (x == m) return true;
  return false;
}

}  // namespace

const std::vector<std::string>& extension_methods() {
  static const std::vector<std::string> m = {"none", "pi", "ntk", "dynamic-ntk", "yarn", "longrope"};
  return m;
}

double yarn_default_mscale(double s) { return s <= 1.0 ? 1.0 : 0.1 * std::log(s) + 1.0; }

torch::Tensor ContextExtension::spectrum(const torch::Tensor& theta, int64_t length) const {
  auto th = theta.to(torch::kFloat64);
  const int64_t P = th.size(-1);
  if (method == "none") return th;
  if (method == "pi") return th / factor;
  if (method == "ntk") return th * ntk_multiplier(factor, P, rotated_dims);
  if (method == "dynamic-ntk") {
    if (length <= original_context) return th;  // inside the training context: plain RoPE, bit for bit
    const double k = factor * double(length) / double(original_context) - (factor - 1.0);
    return th * ntk_multiplier(k, P, rotated_dims);
  }
  if (method == "yarn") {
    if (factor == 1.0) return th;  // (1-g) theta + g theta need not round back to theta
    // r(d) = L / lambda_d = L theta_d / 2pi: how many turns the pair makes within the training context.
    auto turns = th * (double(original_context) / (2.0 * std::numbers::pi));
    auto g = ((turns - yarn_alpha) / (yarn_beta - yarn_alpha)).clamp(0.0, 1.0);
    return (1.0 - g) * (th / factor) + g * th;
  }
  if (method == "longrope") return th / longrope_lambda;
  throw std::logic_error("context extension: unhandled method " + method);
}

torch::Tensor ContextExtension::angles(const torch::Tensor& theta, int64_t offset, int64_t T,
                                       int64_t length) const {
  auto pos = positions_f64(offset, T).view({1, T, 1, 1});
  if (method == "none") return pos * theta.to(torch::kFloat64).unsqueeze(0).unsqueeze(0);
  auto ext = pos * spectrum(theta, length).unsqueeze(0).unsqueeze(0);
  if (method != "longrope" || longrope_start <= 0) return ext;
  // LongRoPE's first n_hat positions keep the original rotation.
  auto plain = pos * theta.to(torch::kFloat64).unsqueeze(0).unsqueeze(0);
  return torch::where(pos < double(longrope_start), plain, ext);
}

std::string ContextExtension::describe() const {
  if (method == "none") return "none";
  if (method == "pi" || method == "ntk") return fmt::format("{} (s={})", method, factor);
  if (method == "dynamic-ntk") return fmt::format("dynamic-ntk (s={}, L={})", factor, original_context);
  if (method == "yarn")
    return fmt::format("yarn (s={}, L={}, alpha={}, beta={}, mscale={:.6g})", factor, original_context,
                       yarn_alpha, yarn_beta, yarn_mscale);
  return fmt::format("longrope ({}, n_hat={})",
                     longrope_file.empty() ? fmt::format("lambda=s={}", factor) : "factors " + longrope_file,
                     longrope_start);
}

std::vector<double> read_longrope_factors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument(fmt::format("longrope_factors: cannot read '{}'", path));
  std::stringstream buf;
  buf << in.rdbuf();
  const std::string text = buf.str();
  std::vector<double> out;
  const auto first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && (text[first] == '[' || text[first] == '{')) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw std::invalid_argument(
          fmt::format("longrope_factors: '{}' is not valid JSON ({})", path, e.what()));
    }
    if (!j.is_array())
      throw std::invalid_argument(
          fmt::format("longrope_factors: '{}' must hold a JSON array of numbers", path));
    for (size_t i = 0; i < j.size(); ++i) {
      if (!j[i].is_number())
        throw std::invalid_argument(
            fmt::format("longrope_factors: '{}': entry {} is {}, not a number", path, i, j[i].dump()));
      out.push_back(j[i].get<double>());
    }
  } else {  // plain text: numbers separated by white space and/or commas
    std::string t = text;
    for (auto& c : t)
      if (c == ',') c = ' ';
    std::istringstream words(t);
    std::string w;
    while (words >> w) {
      size_t used = 0;
      double v = 0;
      try {
        v = std::stod(w, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != w.size())
        throw std::invalid_argument(
            fmt::format("longrope_factors: '{}': entry {} '{}' is not a number", path, out.size(), w));
      out.push_back(v);
    }
  }
  if (out.empty()) throw std::invalid_argument(fmt::format("longrope_factors: '{}' holds no factors", path));
  for (size_t i = 0; i < out.size(); ++i)
    if (!std::isfinite(out[i]) || out[i] <= 0.0)
      throw std::invalid_argument(fmt::format(
          "longrope_factors: '{}': factor {} is {}; every factor must be finite and > 0", path, i, out[i]));
  return out;
}

ContextExtension parse_context_extension(const PeOptions& o, const std::string& enc, int64_t rotated_dims,
                                         const std::string& fixed_method, double default_factor) {
  auto fail = [&](const std::string& msg) { throw std::invalid_argument(fmt::format("{}: {}", enc, msg)); };
  ContextExtension e;
  e.rotated_dims = rotated_dims;
  e.method = fixed_method.empty() ? o.get_choice("extend", "none", extension_methods()) : fixed_method;
  if (!is_method(e.method)) fail("unknown context-extension method " + e.method);
  e.factor = o.get_double("factor", default_factor);
  if (!(e.factor > 0.0)) fail(fmt::format("factor must be > 0, got {}", e.factor));
  e.original_context = o.get_int("original_context", 128);
  if (e.original_context < 1) fail(fmt::format("original_context must be >= 1, got {}", e.original_context));
  // A method's own options given with another method would be silently ignored: refuse them.
  for (const char* key : {"yarn_alpha", "yarn_beta", "yarn_mscale"})
    if (o.has(key) && e.method != "yarn")
      fail(fmt::format("option {} applies only to extend=yarn (the method here is {})", key, e.method));
  for (const char* key : {"longrope_factors", "longrope_start"})
    if (o.has(key) && e.method != "longrope")
      fail(fmt::format("option {} applies only to extend=longrope (the method here is {})", key, e.method));
  if (e.method == "none" && e.factor != 1.0)
    fail(fmt::format("factor {} needs a method: set extend=pi|ntk|dynamic-ntk|yarn|longrope", e.factor));
  if ((e.method == "ntk" || e.method == "dynamic-ntk") && rotated_dims < 4)
    fail(fmt::format(
        "{} needs at least 4 rotated dims (it keeps theta_0 and divides theta_(r/2-1) by s), got {}",
        e.method, rotated_dims));
  if (e.method == "yarn") {
    e.yarn_alpha = o.get_double("yarn_alpha", 1.0);
    e.yarn_beta = o.get_double("yarn_beta", 32.0);
    if (e.yarn_alpha < 0.0 || !(e.yarn_beta > e.yarn_alpha))
      fail(fmt::format("yarn needs 0 <= yarn_alpha < yarn_beta, got alpha {} and beta {}", e.yarn_alpha,
                       e.yarn_beta));
    const bool automatic = !o.has("yarn_mscale") || o.values().at("yarn_mscale") == "auto";
    e.yarn_mscale = automatic ? yarn_default_mscale(e.factor) : o.get_double("yarn_mscale", 1.0);
    if (!(e.yarn_mscale > 0.0)) fail(fmt::format("yarn_mscale must be > 0, got {}", e.yarn_mscale));
  }
  if (e.method == "longrope") {
    const int64_t P = rotated_dims / 2;
    e.longrope_start = o.get_int("longrope_start", 0);
    if (e.longrope_start < 0) fail(fmt::format("longrope_start must be >= 0, got {}", e.longrope_start));
    if (o.has("longrope_factors")) {
      if (o.has("factor"))
        fail(
            "give the longrope factors either as factor=S (the same for every frequency) or as "
            "longrope_factors=FILE, not both");
      e.longrope_file = o.values().at("longrope_factors");
      std::vector<double> f;
      try {
        f = read_longrope_factors(e.longrope_file);
      } catch (const std::invalid_argument& err) {
        fail(err.what());
      }
      if (int64_t(f.size()) != P)
        fail(fmt::format(
            "longrope_factors: '{}' has {} factors, expected {} (one per rotated pair, r/2 = {}/2)",
            e.longrope_file, f.size(), P, rotated_dims));
      e.longrope_lambda = torch::tensor(f, torch::kFloat64);
      e.factor = *std::max_element(f.begin(), f.end());
    } else {
      e.longrope_lambda = torch::full({P}, e.factor, torch::kFloat64);
    }
  }
  return e;
}

std::vector<OptionSpec> context_extension_options(const std::string& fixed_method,
                                                  const std::string& default_factor) {
  std::vector<OptionSpec> out;
  if (fixed_method.empty())
    out.push_back({"extend", "none", "context extension: none|pi|ntk|dynamic-ntk|yarn|longrope"});
  out.push_back({"factor", default_factor, "s = L'/L, the extension factor"});
  out.push_back({"original_context", "128", "L, the training context (dynamic-ntk, yarn)"});
  const bool all = fixed_method.empty();
  if (all || fixed_method == "yarn") {
    out.push_back({"yarn_alpha", "1", "yarn: pairs turning fewer than alpha times within L get pure PI"});
    out.push_back({"yarn_beta", "32", "yarn: pairs turning more than beta times within L are not changed"});
    out.push_back(
        {"yarn_mscale", "auto", "yarn: factor on rotated q and k; auto: 0.1 ln s + 1 (1: NTK-by-parts)"});
  }
  if (all || fixed_method == "longrope") {
    out.push_back({"longrope_factors", "",
                   "longrope: file of r/2 factors lambda_d (JSON array or text); "
                   "default lambda_d = factor"});
    out.push_back({"longrope_start", "0", "longrope: n_hat, positions below it are not interpolated"});
  }
  return out;
}

namespace {

void context_extension_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  const std::string& n = t.encoding;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  // Context extension, invariants E-1..E-5 (docs/encodings.md, "Invariant labels"). encode_of: q~ of `e` for
  // q at positions offset..
  auto encode_of = [&](const EncodingPtr& e, const torch::Tensor& q, int64_t offset) {
    auto st = e->initial_state(q.size(0), offset);
    return e->encode(q, q, torch::Tensor(), st).q;
  };
  // The extended frequencies theta'_d, read back by atan2 from the turn of unit vectors at position 1.
  auto spectrum_of = [&](const EncodingPtr& e) {
    const int64_t P = kShape.head_dim / 2;
    auto unit = torch::zeros({1, 1, kShape.heads, kShape.head_dim}, f64);
    unit.narrow(-1, 0, P).fill_(1.0);
    auto r = encode_of(e, unit, 1)[0][0][0];
    return torch::atan2(r.narrow(0, P, P), r.narrow(0, 0, P));
  };
  auto theta = torch::exp(-(2.0 * torch::arange(kShape.head_dim / 2, f64) / double(kShape.head_dim)) *
                          std::log(10000.0));
  const int64_t P = kShape.head_dim / 2;
  if (n == "pi") {
    t.add("E-1: factor=1 == rope", logits_gap(fresh("pi", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5),
          0.0);
    // PI at s = 2, position 2m == RoPE at position m.
    auto even = torch::arange(0, kLen, 2);
    t.add("E-1: s=2 at 2m == rope at m",
          max_diff(encode_of(fresh("pi"), in.q, 0).index_select(1, even),
                   encode_of(fresh("rope"), in.q.index_select(1, even), 0)),
          1e-12);
  } else if (n == "ntk") {
    t.add("E-2: factor=1 == rope", logits_gap(fresh("ntk", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5),
          0.0);
    auto th = spectrum_of(fresh("ntk", PeOptions{{"factor", "3"}}));
    t.add("E-2: theta'_0 == theta_0", std::abs(th[0].item<double>() - theta[0].item<double>()), 1e-12);
    t.add("E-2: theta'_(D/2-1) == theta_(D/2-1)/s",
          std::abs(th[P - 1].item<double>() - theta[P - 1].item<double>() / 3.0), 1e-12);
  } else if (n == "dynamic-ntk") {
    t.add("E-3: l <= L == rope (bit-exact)",
          logits_gap(fresh("dynamic-ntk", PeOptions{{"original_context", std::to_string(kLen)}}),
                     fresh("rope"), in),
          0.0);
    // Past L the spectrum is NTK's with s -> s l/L - (s-1): here 2*13/5 - 1 = 4.2.
    t.add("E-3: l > L == ntk(s l/L - (s-1))",
          logits_gap(fresh("dynamic-ntk", PeOptions{{"original_context", "5"}}),
                     fresh("ntk", PeOptions{{"factor", "4.2"}}), in),
          1e-12);
    // A decode crossing L (cache of unrotated keys) equals a full recompute of each prefix.
    auto e = fresh("dynamic-ntk", PeOptions{{"original_context", "5"}});
    auto st = e->initial_state(kBatch, 0);
    KeyCache cache;
    double err = 0.0;
    int64_t start = 0;
    for (int64_t len : {3, 1, 1, 1, 4, 1, 2}) {
      auto sl = [&](const torch::Tensor& x, int64_t n0, int64_t n1) { return x.narrow(1, n0, n1); };
      auto tok = e->encode(sl(in.q, start, len), sl(in.k, start, len), torch::Tensor(), st);
      cache.append(tok);
      Inputs prefix{sl(in.q, 0, start + len), sl(in.k, 0, start + len), in.v, in.x};
      auto full = logits_at(*e, prefix, 0);
      err = std::max(err, max_diff(attention_logits(*e, tok, cache), full.narrow(2, start, len)));
      start += len;
    }
    t.add("E-3: decode across L == prefix recompute", err, 1e-10);
  } else if (n == "yarn") {
    t.add("E-4: factor=1 == rope",
          logits_gap(fresh("yarn", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5), 0.0);
    const double m = 0.1 * std::log(4.0) + 1.0;
    auto yarn = fresh("yarn", PeOptions{{"factor", "4"}});
    auto parts = fresh("yarn", PeOptions{{"factor", "4"}, {"yarn_mscale", "1"}});
    t.add("E-4: logits == by-parts logits * mscale^2",
          max_diff(logits_at(*yarn, in, 3), logits_at(*parts, in, 3) * (m * m)), 1e-12);
    t.add("E-4: |q~| == (0.1 ln s + 1) |q|",
          max_diff(encode_of(yarn, in.q, 3).norm(2, -1), in.q.norm(2, -1) * m), 1e-12);
    // L = 1000, D = 12: pairs 0, 1 turn > 32 times within L (kept), pairs 4, 5 < 1 time (theta/s).
    auto th = spectrum_of(fresh("yarn", PeOptions{{"factor", "4"}, {"original_context", "1000"}}));
    t.add("E-4: r(d) > beta unchanged", max_diff(th.narrow(0, 0, 2), theta.narrow(0, 0, 2)), 1e-12);
    t.add("E-4: r(d) < alpha == theta/s", max_diff(th.narrow(0, 4, 2), theta.narrow(0, 4, 2) / 4.0), 1e-12);
  } else if (n == "longrope") {
    t.add("E-5: lambda = s, n_hat = 0 == pi",
          logits_gap(fresh("longrope", PeOptions{{"factor", "3"}}), fresh("pi", PeOptions{{"factor", "3"}}),
                     in, 5),
          0.0);
    t.add("E-5: lambda = 1 == rope",
          logits_gap(fresh("longrope", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5), 0.0);
    // n_hat = 5: positions 0..4 as rope, 5.. as pi.
    auto lr = encode_of(fresh("longrope", PeOptions{{"factor", "3"}, {"longrope_start", "5"}}), in.q, 0);
    t.add("E-5: positions < n_hat unscaled",
          max_diff(lr.narrow(1, 0, 5), encode_of(fresh("rope"), in.q, 0).narrow(1, 0, 5)), 0.0);
    t.add("E-5: positions >= n_hat interpolated",
          max_diff(lr.narrow(1, 5, kLen - 5),
                   encode_of(fresh("pi", PeOptions{{"factor", "3"}}), in.q, 0).narrow(1, 5, kLen - 5)),
          0.0);
  }
}

void add_context_extension(std::vector<EncodingInfo>& out) {
  struct Named {
    const char* name;
    const char* summary;
  };
  const Named named[] = {
      {"pi", "RoPE with Position Interpolation: theta_d / s (positions n -> n/s)"},
      {"ntk", "RoPE with NTK-aware scaling: base b' = b s^(D/(D-2)); theta_0 kept, theta_(D/2-1) / s"},
      {"dynamic-ntk",
       "RoPE with dynamic NTK: NTK with s -> s l/L - (s-1) at length l > L; caches unrotated keys"},
      {"yarn", "RoPE with YaRN: NTK-by-parts ramp between PI and RoPE per frequency, q,k times 0.1 ln s + 1"},
      {"longrope",
       "RoPE with LongRoPE: per-frequency factors lambda_d from a file, first n_hat positions kept"},
  };
  auto layout = rotary_layout_options();
  for (const auto& n : named) {
    const std::string method = n.name;
    std::vector<OptionSpec> opts = context_extension_options(method, "2");
    opts.push_back({"base", "10000", "frequency base"});
    opts.push_back({"fraction", "1", "partial rotary: rotate only the first fraction*D dims"});
    opts.insert(opts.end(), layout.begin(), layout.end());
    out.push_back({method,
                   "context extension",
                   n.summary,
                   opts,
                   {},
                   [method](const HeadShape& s, const PeOptions& o) {
                     return make_extended_rope(s, o, method, method, 2.0);
                   },
                   context_extension_laws});
  }
}

const Registration registration(add_context_extension);

}  // namespace
}  // namespace grape::detail
