// The `grape` executable end to end: `pe logits` against the library and a hand-computed value, and
// clear one-line errors (exit code 1, never a signal) for bad input.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "cli_runner.hpp"
#include "grape/io.hpp"
#include "grape/pe.hpp"

namespace {

namespace fs = std::filesystem;

grape::testing::CliRun grape_cli(const std::string& args) { return grape::testing::run_cli(args); }

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = fs::temp_directory_path() / ("grape_cli_test_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    torch::manual_seed(21);
    q = torch::randn({7, 2, 8});
    k = torch::randn({7, 2, 8});
    x = torch::randn({7, 16});
    grape::io::write_npy(path("q.npy"), q);
    grape::io::write_npy(path("k.npy"), k);
    grape::io::write_npy(path("x.npy"), x);
  }
  void TearDown() override { fs::remove_all(dir); }
  std::string path(const std::string& name) const { return (dir / name).string(); }
  std::string qk() const { return " --q " + path("q.npy") + " --k " + path("k.npy"); }
  fs::path dir;
  torch::Tensor q, k, x;
};

TEST_F(Cli, AlibiLogitsMatchTheHandComputedValue) {
  auto r = grape_cli("pe logits -e alibi" + qk() + " --offset 100 --out " + path("out.npy"));
  ASSERT_EQ(r.code, 0) << r.output;
  auto l = grape::io::read_npy(path("out.npy"));
  ASSERT_EQ(l.sizes(), torch::IntArrayRef({2, 7, 7}));
  // head 1 of 2: slope 2^-8; query 5, key 2: q.k/sqrt(8) - (5 - 2)/256
  const double want = (q[5][1] * k[2][1]).sum().item<double>() / std::sqrt(8.0) - 3.0 / 256.0;
  EXPECT_NEAR(l[1][5][2].item<double>(), want, 1e-5);
  EXPECT_TRUE(std::isinf(l[0][2][5].item<float>()) && l[0][2][5].item<float>() < 0);  // masked future
}

TEST_F(Cli, LogitsEqualTheLibraryForEveryEncodingAndLoadWeights) {
  for (const auto& info : grape::encodings()) {
    // A weights file that sets every parameter of this encoding to a known tensor.
    torch::manual_seed(3);
    auto enc = grape::make_encoding(info.name, {2, 8, 16});
    std::map<std::string, torch::Tensor> weights;
    for (auto& p : enc->named_parameters()) weights[p.key()] = p.value().detach() + 0.01;
    std::string wflag;
    if (!weights.empty()) {
      grape::io::write_safetensors(path("w.safetensors"), weights);
      wflag = " --weights " + path("w.safetensors");
      torch::NoGradGuard ng;
      for (auto& p : enc->named_parameters()) p.value().copy_(weights[p.key()]);
    }
    auto r = grape_cli("pe logits -e " + info.name + qk() + " --x " + path("x.npy") + wflag +
                       " --offset 3 --out " + path("out.npy"));
    ASSERT_EQ(r.code, 0) << info.name << ": " << r.output;
    torch::NoGradGuard ng;
    auto st = enc->initial_state(1, 3);
    auto tok = enc->encode(q.unsqueeze(0), k.unsqueeze(0), x.unsqueeze(0), st);
    auto want = grape::attention_logits(*enc, tok, grape::KeyCache::from(tok)).squeeze(0);
    auto got = grape::io::read_npy(path("out.npy"));
    auto fin = torch::isfinite(want);
    ASSERT_TRUE(torch::equal(fin, torch::isfinite(got))) << info.name;
    EXPECT_LT((want - got).masked_fill(~fin, 0).abs().max().item<double>(), 1e-6) << info.name;
  }
}

void expect_error(const grape::testing::CliRun& r, const std::string& needle) {
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.output;
  EXPECT_EQ(r.output.find("frame #"), std::string::npos) << "no backtraces for users: " << r.output;
}

TEST_F(Cli, BadInputGivesAClearError) {
  const std::string out = " --out " + path("out.npy");
  expect_error(grape_cli("pe logits -e nosuch" + qk() + out), "unknown encoding 'nosuch'");
  expect_error(grape_cli("pe logits -e rope --set bogus=1" + qk() + out), "unknown parameter 'bogus'");
  expect_error(grape_cli("pe logits -e rope --set base=abc" + qk() + out),
               "option base: 'abc' is not a finite number");
  expect_error(grape_cli("pe logits -e rope --q " + path("missing.npy") + " --k " + path("k.npy") + out),
               "cannot open");
  expect_error(grape_cli("pe logits -e fox" + qk() + out), "give the layer input with --x");
  // Odd head_dim for a rotation.
  grape::io::write_npy(path("odd.npy"), torch::randn({7, 2, 7}));
  expect_error(grape_cli("pe logits -e rope --q " + path("odd.npy") + " --k " + path("odd.npy") + out),
               "head_dim must be even");
  // NaN in q.
  auto bad = q.clone();
  bad[3][0][1] = std::nanf("");
  grape::io::write_npy(path("nan.npy"), bad);
  expect_error(grape_cli("pe logits -e rope --q " + path("nan.npy") + " --k " + path("k.npy") + out),
               "q contains NaN or Inf");
  // q and k of different shapes.
  grape::io::write_npy(path("short.npy"), torch::randn({5, 2, 8}));
  expect_error(grape_cli("pe logits -e rope --q " + path("q.npy") + " --k " + path("short.npy") + out),
               "must have the same shape");
  // A truncated .npy file.
  {
    auto bytes = grape::io::read_file(path("q.npy"));
    std::ofstream(path("cut.npy"), std::ios::binary) << bytes.substr(0, bytes.size() - 10);
  }
  expect_error(grape_cli("pe logits -e rope --q " + path("cut.npy") + " --k " + path("k.npy") + out),
               "cut.npy");
  // Weights: an unknown tensor name, and a wrong shape.
  grape::io::write_safetensors(path("w1.safetensors"), {{"nope", torch::zeros({2})}});
  expect_error(grape_cli("pe logits -e grape-m" + qk() + " --weights " + path("w1.safetensors") + out),
               "tensor 'nope' is not a parameter of grape-m");
  grape::io::write_safetensors(path("w2.safetensors"), {{"lambda", torch::zeros({3})}});
  expect_error(grape_cli("pe logits -e grape-m" + qk() + " --weights " + path("w2.safetensors") + out),
               "tensor 'lambda' has shape [3], grape-m expects [1,4]");
  expect_error(grape_cli("encodings nosuch"), "unknown encoding 'nosuch'");
  expect_error(grape_cli("check -e nosuch"), "unknown encoding 'nosuch'");
  EXPECT_FALSE(fs::exists(path("out.npy"))) << "no output is written on error";
}

TEST_F(Cli, EncodingsListsEveryEncodingWithItsParameters) {
  auto r = grape_cli("encodings");
  ASSERT_EQ(r.code, 0);
  for (const auto& info : grape::encodings())
    EXPECT_NE(r.output.find(info.name), std::string::npos) << info.name;
  auto one = grape_cli("encodings grape-ap");
  ASSERT_EQ(one.code, 0);
  EXPECT_NE(one.output.find("w_p [64,512]"), std::string::npos) << one.output;  // H*P = 8*8 rows at C = 512
  EXPECT_NE(one.output.find("probe_dim"), std::string::npos);
}

}  // namespace

// A .npy of float64 numbers, as numpy writes them by default (grape writes float32 only).
void write_npy_f64(const std::string& path, const torch::Tensor& t) {
  std::string header = "{'descr': '<f8', 'fortran_order': False, 'shape': (";
  for (int64_t d : t.sizes()) header += std::to_string(d) + ", ";
  header += "), }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::string bytes =
      std::string("\x93NUMPY\x01\x00", 8) + char(header.size() & 255) + char(header.size() >> 8) + header;
  auto d = t.to(torch::kFloat64).contiguous();
  bytes.append(reinterpret_cast<const char*>(d.data_ptr<double>()), size_t(d.numel()) * 8);
  std::ofstream(path, std::ios::binary) << bytes;
}

TEST_F(Cli, Float64InputsAreConvertedAndFlagsMatchTrain) {
  // float64 .npy (numpy's default) gives the same logits as float32; --pe/--pe-set as in train.
  write_npy_f64(path("q64.npy"), q);
  write_npy_f64(path("k64.npy"), k);
  auto a = grape_cli("pe logits --pe rope --pe-set base=500" + qk() + " --out " + path("a.npy"));
  ASSERT_EQ(a.code, 0) << a.output;
  auto b = grape_cli("pe logits --pe rope --pe-set base=500 --q " + path("q64.npy") + " --k " +
                     path("k64.npy") + " --out " + path("b.npy"));
  ASSERT_EQ(b.code, 0) << b.output;
  EXPECT_TRUE(
      torch::allclose(grape::io::read_npy(path("a.npy")), grape::io::read_npy(path("b.npy")), 1e-5, 1e-5));
  std::string qi = grape::io::read_file(path("q64.npy"));
  qi.replace(qi.find("<f8"), 3, "<i8");  // the same bytes as int64
  std::ofstream(path("qi.npy"), std::ios::binary) << qi;
  auto c = grape_cli("pe logits --pe rope --q " + path("qi.npy") + " --k " + path("k.npy") + " --out " +
                     path("c.npy"));
  EXPECT_EQ(c.code, 1);
  EXPECT_NE(c.output.find(path("qi.npy") +
                          ": unsupported dtype '<i8' (grape reads little-endian float32 '<f4', and "
                          "float64 '<f8' converted to float32)"),
            std::string::npos)
      << c.output;
}
