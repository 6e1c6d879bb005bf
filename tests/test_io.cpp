// Tests for the tensor adapters of grape/io.hpp: tensors round trip through .npy and .safetensors files,
// the files written are exactly grape/formats.hpp's bytes, and the adapters' own refusals. The byte layouts,
// the refusals of malformed files and the atomic writes are tested without LibTorch in
// tests/plain/test_formats.cpp.
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "grape/io.hpp"
#include "plain/format_test_util.hpp"

namespace fs = std::filesystem;
using grape::io::encode_npy;
using grape::io::encode_safetensors;
using grape::io::read_file;
using grape::io::read_npy;
using grape::io::read_safetensors;
using grape::io::write_file_atomic;
using grape::io::write_npy;
using grape::io::write_safetensors;
using grape::testing::expect_error;
using grape::testing::f32_bytes;
using grape::testing::npy_v1;
using grape::testing::npy_v2;
using grape::testing::safetensors_file;

namespace {

using IoTest = grape::testing::ScratchDirTest;

torch::Tensor arange_f32(std::vector<std::int64_t> shape) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  // Non-integer values so that the round trip checks every bit, not just small integers.
  return (torch::arange(n, torch::kFloat32) * 0.37f - 1.5f).reshape(shape);
}

void expect_same(const torch::Tensor& a, const torch::Tensor& b) {
  ASSERT_EQ(a.scalar_type(), torch::kFloat32);
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_TRUE(torch::equal(a, b));
}

// ---- .npy -------------------------------------------------------------------------------------------

TEST_F(IoTest, NpyRoundTripShapes) {
  for (const std::vector<std::int64_t>& shape :
       {std::vector<std::int64_t>{}, std::vector<std::int64_t>{5}, std::vector<std::int64_t>{3, 4, 5}}) {
    const torch::Tensor t = arange_f32(shape);
    write_npy(file("a.npy"), t);
    const torch::Tensor back = read_npy(file("a.npy"));
    EXPECT_TRUE(back.is_contiguous());
    expect_same(back, t);
  }
}

TEST_F(IoTest, NpyRoundTripNonContiguousAndEmpty) {
  const torch::Tensor t = arange_f32({3, 4}).t();  // transposed: not contiguous
  write_npy(file("t.npy"), t);
  expect_same(read_npy(file("t.npy")), t);

  const torch::Tensor empty = torch::zeros({0, 3});
  write_npy(file("e.npy"), empty);
  expect_same(read_npy(file("e.npy")), empty);
}

// The F32Array of a contiguous float32 tensor, to compare with the bytes the adapters write.
grape::io::F32Array array_of(const torch::Tensor& t) { return {t.sizes().vec(), t.data_ptr<float>()}; }

TEST_F(IoTest, NpyWriteIsTheEncodedBytes) {
  // Shapes as torch gives them, down to the scalar's (): the file holds exactly encode_npy's bytes.
  for (const torch::Tensor& t : {arange_f32({2, 3}), arange_f32({5}), torch::tensor(2.5f).reshape({})}) {
    write_npy(file("x.npy"), t);
    EXPECT_EQ(read_file(file("x.npy")), encode_npy(array_of(t), file("x.npy")));
  }
}

TEST_F(IoTest, NpyReadsHandBuiltFiles) {
  const std::string header = "{'shape': (2,2), 'fortran_order':False,'descr':'<f4'}  \n";
  write_file_atomic(file("k.npy"), npy_v1(header, f32_bytes({1.f, 2.f, 3.f, 4.f})));
  expect_same(read_npy(file("k.npy")), torch::tensor({1.f, 2.f, 3.f, 4.f}).reshape({2, 2}));

  const std::string header2 = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }\n";
  write_file_atomic(file("v2.npy"), npy_v2(header2, f32_bytes({0.5f, -0.25f, 8.f})));
  expect_same(read_npy(file("v2.npy")), torch::tensor({0.5f, -0.25f, 8.f}));

  const std::string scalar = "{'descr': '<f4', 'fortran_order': False, 'shape': (), }\n";
  write_file_atomic(file("s.npy"), npy_v1(scalar, f32_bytes({7.f})));
  const torch::Tensor t = read_npy(file("s.npy"));
  EXPECT_EQ(t.dim(), 0);
  EXPECT_EQ(t.item<float>(), 7.f);
}

TEST_F(IoTest, NpyReadRefusalsNameTheFile) {
  // float64 (numpy's default) is read as float32; integers are refused.
  const std::string f8 = file("f8.npy");
  const double values[2] = {1.5, -2.25};
  write_file_atomic(f8, npy_v1("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }\n",
                               std::string(reinterpret_cast<const char*>(values), 16)));
  const torch::Tensor t = read_npy(f8);
  EXPECT_EQ(t.scalar_type(), torch::kFloat32);
  EXPECT_EQ(t[0].item<float>(), 1.5f);
  EXPECT_EQ(t[1].item<float>(), -2.25f);
  const std::string i4 = file("i4.npy");
  write_file_atomic(
      i4, npy_v1("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }\n", f32_bytes({1.f, 2.f})));
  expect_error([&] { read_npy(i4); }, i4 + ": unsupported dtype '<i4'");
  expect_error([&] { read_npy(file("missing.npy")); }, "cannot open '" + file("missing.npy") + "'");
}

TEST_F(IoTest, NpyWriteRefusesOtherDtypes) {
  expect_error([&] { write_npy(file("d.npy"), torch::zeros({2}, torch::kFloat64)); }, "float32 only");
  expect_error([&] { write_npy(file("i.npy"), torch::zeros({2}, torch::kInt64)); }, "i.npy");
  expect_error([&] { write_npy(file("u.npy"), torch::Tensor()); },
               file("u.npy") + ": cannot write an undefined tensor as .npy");
  EXPECT_FALSE(fs::exists(file("d.npy")));
}

// ---- .safetensors -----------------------------------------------------------------------------------

TEST_F(IoTest, SafetensorsRoundTripWithMetadata) {
  const std::map<std::string, torch::Tensor> tensors = {
      {"layer.weight", arange_f32({4, 3})},
      {"bias", arange_f32({3})},
      {"scalar", torch::tensor(3.25f).reshape({})},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "grape test \xc3\xa9"}};
  write_safetensors(file("m.safetensors"), tensors, meta);

  std::map<std::string, std::string> meta_back;
  const auto back = read_safetensors(file("m.safetensors"), &meta_back);
  ASSERT_EQ(back.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(back.count(name)) << name;
    expect_same(back.at(name), t);
  }
  EXPECT_EQ(meta_back, meta);

  // Without metadata, reading reports an empty map (replacing what the caller's map held).
  write_safetensors(file("n.safetensors"), tensors);
  meta_back = {{"stale", "x"}};
  read_safetensors(file("n.safetensors"), &meta_back);
  EXPECT_TRUE(meta_back.empty());
}

TEST_F(IoTest, SafetensorsWriteIsTheEncodedBytes) {
  // A non-contiguous tensor is written in C order; the file holds exactly encode_safetensors's bytes.
  const torch::Tensor w = arange_f32({3, 2}).t(), s = torch::tensor(3.25f).reshape({});
  const std::map<std::string, std::string> meta = {{"k", "v"}};
  write_safetensors(file("e.safetensors"), {{"w", w}, {"s", s}}, meta);
  const torch::Tensor wc = w.contiguous();
  EXPECT_EQ(read_file(file("e.safetensors")),
            encode_safetensors({{"w", array_of(wc)}, {"s", array_of(s)}}, meta, file("e.safetensors")));
}

TEST_F(IoTest, SafetensorsReadsHandBuiltFile) {
  // Written by hand in another order, unpadded, with whitespace: each tensor from its own offsets.
  const std::string header =
      R"({ "y": {"shape": [2], "dtype": "F32", "data_offsets": [0, 8]}, "__metadata__": {"k": "v"},)"
      R"( "x": {"data_offsets": [8, 12], "shape": [], "dtype": "F32"} })";
  write_file_atomic(file("h.safetensors"), safetensors_file(header, f32_bytes({1.f, 2.f, 3.f})));
  std::map<std::string, std::string> meta;
  const auto back = read_safetensors(file("h.safetensors"), &meta);
  expect_same(back.at("y"), torch::tensor({1.f, 2.f}));
  expect_same(back.at("x"), torch::tensor(3.f).reshape({}));
  EXPECT_EQ(meta.at("k"), "v");
}

TEST_F(IoTest, SafetensorsReadRefusalsNameTheFile) {
  const std::string f16 = file("f16.safetensors");
  write_file_atomic(f16, safetensors_file(R"({"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})",
                                          f32_bytes({1.f, 2.f, 3.f, 4.f})));
  expect_error([&] { read_safetensors(f16); }, f16 + ": tensor 'h' has unsupported dtype 'F16'");
  expect_error([&] { read_safetensors(file("missing.safetensors")); },
               "cannot open '" + file("missing.safetensors") + "'");
}

TEST_F(IoTest, SafetensorsWriteRefusesOtherDtypes) {
  expect_error(
      [&] {
        write_safetensors(file("d.safetensors"), {{"half", torch::zeros({2}, torch::kFloat16)}});
      },
      "tensor 'half' has dtype Half");
  EXPECT_FALSE(fs::exists(file("d.safetensors")));
  expect_error(
      [&] {
        write_safetensors(file("u.safetensors"), {{"u", torch::Tensor()}});
      },
      file("u.safetensors") + ": tensor 'u' is undefined");
  // The name check of the encoder reaches the caller unchanged.
  expect_error(
      [&] {
        write_safetensors(file("r.safetensors"), {{"__metadata__", torch::ones({1})}});
      },
      file("r.safetensors") + ": '__metadata__' is reserved and cannot name a tensor");
}

}  // namespace
