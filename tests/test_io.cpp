// Tests for grape/io.hpp: .npy and .safetensors byte layouts, refusals of malformed files, atomic writes.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "grape/io.hpp"

namespace fs = std::filesystem;
using grape::io::read_file;
using grape::io::read_npy;
using grape::io::read_safetensors;
using grape::io::write_file_atomic;
using grape::io::write_npy;
using grape::io::write_safetensors;

namespace {

// A fresh directory per test, removed afterwards; pid + time + counter keep parallel runs apart.
class IoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    dir_ = fs::temp_directory_path() / ("grape_io_test_" + std::to_string(::getpid()) + "_" +
                                        std::to_string(stamp) + "_" + std::to_string(counter++));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

// Asserts that `fn` throws a std::exception whose message contains `needle`.
void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message \"" << e.what() << "\" lacks \"" << needle << "\"";
    return;
  }
  ADD_FAILURE() << "no exception; expected one mentioning \"" << needle << "\"";
}

std::string le16(std::uint16_t v) { return {static_cast<char>(v & 0xFF), static_cast<char>(v >> 8)}; }

std::string le32(std::uint32_t v) {
  std::string out;
  for (int i = 0; i < 4; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
  return out;
}

std::string le64(std::uint64_t v) {
  std::string out;
  for (int i = 0; i < 8; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
  return out;
}

std::uint64_t read_le64(const std::string& s) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<std::uint64_t>(static_cast<unsigned char>(s[i])) << (8 * i);
  return v;
}

// Little-endian float32 bytes of the given values (tests run on little-endian hosts, but be explicit).
std::string f32_bytes(const std::vector<float>& values) {
  std::string out;
  for (const float f : values) {
    std::uint32_t u = 0;
    std::memcpy(&u, &f, 4);
    out += le32(u);
  }
  return out;
}

// A .npy file as numpy lays it out: magic, version, header length, header text, data.
std::string npy_v1(const std::string& header, const std::string& data) {
  return std::string("\x93NUMPY\x01\x00", 8) + le16(static_cast<std::uint16_t>(header.size())) + header +
         data;
}

std::string npy_v2(const std::string& header, const std::string& data) {
  return std::string("\x93NUMPY\x02\x00", 8) + le32(static_cast<std::uint32_t>(header.size())) + header +
         data;
}

// A .safetensors file from a header JSON text and a data section, without padding.
std::string safetensors_file(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

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

TEST_F(IoTest, NpyWriteMatchesPublishedLayout) {
  write_npy(file("x.npy"), arange_f32({2, 3}));
  const std::string bytes = read_file(file("x.npy"));
  ASSERT_GE(bytes.size(), 10u);
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const std::size_t header_len = static_cast<unsigned char>(bytes[8]) |
                                 (static_cast<std::size_t>(static_cast<unsigned char>(bytes[9])) << 8);
  const std::size_t total = 10 + header_len;
  EXPECT_EQ(total % 64, 0u);
  ASSERT_EQ(bytes.size(), total + 6 * 4);
  const std::string header = bytes.substr(10, header_len);
  EXPECT_NE(header.find("'descr': '<f4'"), std::string::npos) << header;
  EXPECT_NE(header.find("'fortran_order': False"), std::string::npos) << header;
  EXPECT_NE(header.find("'shape': (2, 3)"), std::string::npos) << header;
  EXPECT_EQ(header.back(), '\n');
  // The data is the tensor's float32 values in C order.
  const torch::Tensor t = arange_f32({2, 3});
  EXPECT_EQ(std::memcmp(bytes.data() + total, t.data_ptr<float>(), 24), 0);

  // Shapes render as Python tuples: a 1-tuple keeps its comma, a scalar is ().
  write_npy(file("v.npy"), arange_f32({5}));
  EXPECT_NE(read_file(file("v.npy")).find("'shape': (5,)"), std::string::npos);
  write_npy(file("s.npy"), torch::tensor(2.5f).reshape({}));
  EXPECT_NE(read_file(file("s.npy")).find("'shape': ()"), std::string::npos);
}

TEST_F(IoTest, NpyReadsOtherKeyOrderWithoutTrailingComma) {
  const std::string header = "{'shape': (2,2), 'fortran_order':False,'descr':'<f4'}  \n";
  write_file_atomic(file("k.npy"), npy_v1(header, f32_bytes({1.f, 2.f, 3.f, 4.f})));
  const torch::Tensor t = read_npy(file("k.npy"));
  expect_same(t, torch::tensor({1.f, 2.f, 3.f, 4.f}).reshape({2, 2}));
}

TEST_F(IoTest, NpyReadsVersion2Header) {
  const std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }\n";
  write_file_atomic(file("v2.npy"), npy_v2(header, f32_bytes({0.5f, -0.25f, 8.f})));
  expect_same(read_npy(file("v2.npy")), torch::tensor({0.5f, -0.25f, 8.f}));
}

TEST_F(IoTest, NpyReadsScalar) {
  const std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (), }\n";
  write_file_atomic(file("s.npy"), npy_v1(header, f32_bytes({7.f})));
  const torch::Tensor t = read_npy(file("s.npy"));
  EXPECT_EQ(t.dim(), 0);
  EXPECT_EQ(t.item<float>(), 7.f);
}

TEST_F(IoTest, NpyRefusals) {
  const std::string data4 = f32_bytes({1.f, 2.f, 3.f, 4.f});
  auto put = [&](const std::string& name, const std::string& bytes) {
    write_file_atomic(file(name), bytes);
    return file(name);
  };
  auto read = [](const std::string& path) { return [path] { read_npy(path); }; };

  const std::string f8 =
      put("f8.npy", npy_v1("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }\n", data4));
  expect_error(read(f8), "unsupported dtype '<f8'");
  expect_error(read(f8), "f8.npy");

  expect_error(
      read(put("be.npy", npy_v1("{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }\n", data4))),
      "unsupported dtype '>f4'");
  expect_error(
      read(put("fo.npy", npy_v1("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }\n", data4))),
      "fortran_order True");
  expect_error(read(put("magic.npy", "\x93NUMPZ\x01\x00" + le16(2) + "{}" + data4)), "bad magic");
  expect_error(read(put("short.npy", "\x93NU")), "bad magic");
  expect_error(
      read(put("trunc.npy", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }\n", data4))),
      "expected 20 bytes for shape (5,), found 16");
  expect_error(
      read(put("extra.npy", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }\n", data4))),
      "unexpected trailing data: expected 12 bytes");
  expect_error(read(file("missing.npy")), "cannot open '" + file("missing.npy") + "'");
}

TEST_F(IoTest, NpyRefusesMalformedHeaders) {
  const std::string data = f32_bytes({1.f});
  auto check = [&](const std::string& header, const std::string& needle) {
    write_file_atomic(file("h.npy"), npy_v1(header, data));
    expect_error([&] { read_npy(file("h.npy")); }, needle);
  };
  check("{'descr': '<f4', 'fortran_order': False}\n", "missing key 'shape'");
  check("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}\n", "unexpected key 'x'");
  check("{'descr': '<f4', 'fortran_order': False, 'shape': (1), }\n", "1-tuple");
  check("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }\n", "non-negative integer");
  check("{'descr': '<f4', 'fortran_order': 0, 'shape': (1,), }\n", "True or False");
  check("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), \n", "malformed .npy header");
  // The element count overflows 64 bits: refused before any allocation.
  check("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }\n", "too large");
  check("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }\n", "too large");

  // Version 4 does not exist; a header length reaching past the end of the file is truncation.
  write_file_atomic(file("v4.npy"), std::string("\x93NUMPY\x04\x00", 8) + le16(0));
  expect_error([&] { read_npy(file("v4.npy")); }, "unsupported .npy format version 4.0");
  write_file_atomic(file("hl.npy"), std::string("\x93NUMPY\x01\x00", 8) + le16(500) + "{}");
  expect_error([&] { read_npy(file("hl.npy")); }, "truncated");
}

TEST_F(IoTest, NpyWriteRefusesOtherDtypes) {
  expect_error([&] { write_npy(file("d.npy"), torch::zeros({2}, torch::kFloat64)); }, "float32 only");
  expect_error([&] { write_npy(file("i.npy"), torch::zeros({2}, torch::kInt64)); }, "i.npy");
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

  // Without metadata there is no "__metadata__" entry, and reading reports an empty map.
  write_safetensors(file("n.safetensors"), tensors);
  EXPECT_EQ(read_file(file("n.safetensors")).find("__metadata__"), std::string::npos);
  meta_back = {{"stale", "x"}};
  read_safetensors(file("n.safetensors"), &meta_back);
  EXPECT_TRUE(meta_back.empty());
}

TEST_F(IoTest, SafetensorsByteLayout) {
  const torch::Tensor t = torch::tensor({1.f, -2.f, 0.5f, 4.f, 5.f, 6.f}).reshape({2, 3});
  write_safetensors(file("one.safetensors"), {{"w", t}});
  const std::string bytes = read_file(file("one.safetensors"));
  ASSERT_GE(bytes.size(), 8u);
  const std::uint64_t n = read_le64(bytes);
  EXPECT_EQ(n % 8, 0u);  // padded so that the data starts 8-byte aligned
  ASSERT_EQ(bytes.size(), 8 + n + 24);

  const std::string header = bytes.substr(8, n);
  const std::string expected_json = R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})";
  EXPECT_EQ(header.substr(0, expected_json.size()), expected_json);
  EXPECT_EQ(header.find_first_not_of(' ', expected_json.size()), std::string::npos)
      << "padding must be spaces";

  const auto j = nlohmann::json::parse(header);
  EXPECT_EQ(j.size(), 1u);
  EXPECT_EQ(j["w"]["dtype"], "F32");
  EXPECT_EQ(j["w"]["shape"], nlohmann::json::array({2, 3}));
  EXPECT_EQ(j["w"]["data_offsets"], nlohmann::json::array({0, 24}));
  EXPECT_EQ(bytes.substr(8 + n), f32_bytes({1.f, -2.f, 0.5f, 4.f, 5.f, 6.f}));
}

TEST_F(IoTest, SafetensorsSortsByNameAndReadsHandBuiltFile) {
  write_safetensors(file("s.safetensors"), {{"b", torch::ones({1})}, {"a", torch::zeros({2})}});
  const std::string bytes = read_file(file("s.safetensors"));
  const auto j = nlohmann::json::parse(bytes.substr(8, read_le64(bytes)));
  EXPECT_EQ(j["a"]["data_offsets"], nlohmann::json::array({0, 8}));
  EXPECT_EQ(j["b"]["data_offsets"], nlohmann::json::array({8, 12}));

  // Written by hand in another order, unpadded, with whitespace: still read.
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

TEST_F(IoTest, SafetensorsRefusals) {
  const std::string data = f32_bytes({1.f, 2.f, 3.f, 4.f});
  auto check = [&](const std::string& name, const std::string& bytes, const std::string& needle) {
    write_file_atomic(file(name), bytes);
    expect_error([&] { read_safetensors(file(name)); }, needle);
    // Every message starts with the path.
    expect_error([&] { read_safetensors(file(name)); }, file(name) + ": ");
  };
  check("f16.safetensors",
        safetensors_file(R"({"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", data),
        "tensor 'h' has unsupported dtype 'F16'");
  check("trunc.safetensors",
        safetensors_file(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data.substr(0, 10)),
        "beyond the 10-byte data section");
  check("range.safetensors",
        safetensors_file(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}})", data),
        "data_offsets end 20 is beyond");
  check("rev.safetensors",
        safetensors_file(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", data),
        "end before they begin");
  check("size.safetensors",
        safetensors_file(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", data),
        "needs 12 bytes but data_offsets span 16");
  check("overlap.safetensors",
        safetensors_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                         data),
        "overlap");
  check("hlen.safetensors", le64(1000) + "{}", "header length 1000 is larger than");
  check("huge.safetensors", le64(std::uint64_t{1} << 40) + "{}", "100 MB");
  check("tiny.safetensors", std::string("\x02\x00\x00", 3), "shorter than the 8-byte header length");
  check("json.safetensors", safetensors_file(R"({"t":{"dtype":"F32",)", data), "not valid JSON");
  check("array.safetensors", safetensors_file("[1, 2]", data), "must be a JSON object");
  check("field.safetensors", safetensors_file(R"({"t":{"dtype":"F32","shape":[4]}})", data),
        "missing field 'data_offsets'");
  check("type.safetensors",
        safetensors_file(R"({"t":{"dtype":"F32","shape":"4","data_offsets":[0,16]}})", data),
        "'shape' must be an array");
  check("neg.safetensors",
        safetensors_file(R"({"t":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", data),
        "non-negative");
  check("offs.safetensors", safetensors_file(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0]}})", data),
        "two non-negative integers");
  check("meta.safetensors", safetensors_file(R"({"__metadata__":{"k":1}})", data), "must be a string");
  check("dup.safetensors",
        safetensors_file(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                         R"("t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                         data),
        "more than once");
  check("bigshape.safetensors",
        safetensors_file(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})",
                         data),
        "too many");

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
}

// ---- atomic writes ----------------------------------------------------------------------------------

TEST_F(IoTest, AtomicWriteReplacesExistingFile) {
  write_file_atomic(file("f.txt"), "old contents that are longer");
  write_file_atomic(file("f.txt"), "new");
  EXPECT_EQ(read_file(file("f.txt")), "new");
  write_file_atomic(file("f.txt"), "");
  EXPECT_EQ(read_file(file("f.txt")), "");
  const std::string binary("a\0b\xff", 4);
  write_file_atomic(file("f.txt"), binary);
  EXPECT_EQ(read_file(file("f.txt")), binary);
}

TEST_F(IoTest, AtomicWriteLeavesNoTemporaries) {
  write_file_atomic(file("a.bin"), "1");
  write_file_atomic(file("a.bin"), "2");
  write_file_atomic(file("b.bin"), "3");
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"a.bin", "b.bin"}));
}

TEST_F(IoTest, AtomicWriteIntoMissingDirectoryFails) {
  const fs::path missing = dir_ / "no_such_dir";
  const std::string target = (missing / "f.txt").string();
  expect_error([&] { write_file_atomic(target, "x"); }, target);
  expect_error([&] { write_file_atomic(target, "x"); }, std::strerror(ENOENT));
  EXPECT_FALSE(fs::exists(missing));
  EXPECT_TRUE(fs::is_empty(dir_));
}

TEST_F(IoTest, AtomicWriteFailureKeepsOldFile) {
  // Renaming a file over a non-empty directory fails after the temporary was written:
  // the error is reported and the temporary is cleaned up.
  fs::create_directories(dir_ / "d" / "child");
  expect_error([&] { write_file_atomic(file("d"), "x"); }, "rename failed");
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename().string());
  EXPECT_EQ(names, std::vector<std::string>{"d"});
  EXPECT_TRUE(fs::is_directory(dir_ / "d" / "child"));
}

TEST_F(IoTest, AtomicWriteErrorMidWriteKeepsOldFileAndRemovesTemporary) {
  write_file_atomic(file("keep.txt"), "old");
  // Make the data write itself fail, even when running as root: cap the file size this process may
  // write (RLIMIT_FSIZE) and ignore SIGXFSZ so that write() reports EFBIG instead of killing us.
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  rlimit small = saved;
  small.rlim_cur = 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  std::string message;
  try {
    write_file_atomic(file("keep.txt"), std::string(1 << 20, 'x'));
  } catch (const std::exception& e) {
    message = e.what();
  }
  std::signal(SIGXFSZ, old_handler);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &saved), 0);

  EXPECT_NE(message.find("cannot write '" + file("keep.txt") + "'"), std::string::npos) << message;
  EXPECT_NE(message.find(std::strerror(EFBIG)), std::string::npos) << message;
  EXPECT_EQ(read_file(file("keep.txt")), "old");
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename().string());
  EXPECT_EQ(names, std::vector<std::string>{"keep.txt"});
}

TEST_F(IoTest, ReadFileErrors) {
  expect_error([&] { read_file(file("nope")); },
               "cannot open '" + file("nope") + "': " + std::strerror(ENOENT));
  expect_error([&] { read_file(dir_.string()); }, "cannot open '" + dir_.string() + "'");
}

}  // namespace
