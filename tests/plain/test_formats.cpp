// Tests for grape/formats.hpp on bytes: .npy and .safetensors byte layouts and round trips, refusals of
// malformed files with their messages, whole-file reads and atomic writes. No LibTorch here; the tensor
// adapters of grape/io.hpp are tested in tests/test_io.cpp.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "grape/formats.hpp"
#include "plain/format_test_util.hpp"

namespace fs = std::filesystem;
using grape::io::check_sentencepiece_model;
using grape::io::encode_npy;
using grape::io::encode_safetensors;
using grape::io::F32Array;
using grape::io::parse_npy;
using grape::io::parse_safetensors;
using grape::io::read_file;
using grape::io::write_file_atomic;
using grape::testing::expect_error;
using grape::testing::f32_bytes;
using grape::testing::le16;
using grape::testing::le64;
using grape::testing::names_in;
using grape::testing::npy_v1;
using grape::testing::npy_v2;
using grape::testing::read_le64;
using grape::testing::safetensors_file;
using grape::testing::sentencepiece_charsmap_field;

namespace {

using FormatsTest = grape::testing::ScratchDirTest;

// prod(shape) values, non-integer so that the round trips check every bit, not just small integers.
std::vector<float> values_for(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (const std::int64_t d : shape) n *= d;
  std::vector<float> out(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(i) * 0.37f - 1.5f;
  return out;
}

// ---- .npy -------------------------------------------------------------------------------------------

TEST_F(FormatsTest, NpyRoundTripShapes) {
  for (const std::vector<std::int64_t>& shape :
       {std::vector<std::int64_t>{}, std::vector<std::int64_t>{5}, std::vector<std::int64_t>{3, 4, 5},
        std::vector<std::int64_t>{0, 3}}) {
    const std::vector<float> values = values_for(shape);
    write_file_atomic(file("a.npy"), encode_npy({shape, values.data()}, file("a.npy")));
    const std::string bytes = read_file(file("a.npy"));
    const grape::io::NpyFile back = parse_npy(bytes, file("a.npy"));
    EXPECT_EQ(back.shape, shape);
    EXPECT_EQ(back.data, f32_bytes(values));
  }
}

TEST_F(FormatsTest, NpyEncodeMatchesPublishedLayout) {
  const std::vector<float> values = values_for({2, 3});
  const std::string bytes = encode_npy({{2, 3}, values.data()}, "x.npy");
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
  // The data is the float32 values in C order.
  EXPECT_EQ(std::memcmp(bytes.data() + total, values.data(), 24), 0);

  // Shapes render as Python tuples: a 1-tuple keeps its comma, a scalar is ().
  const std::vector<float> five = values_for({5});
  EXPECT_NE(encode_npy({{5}, five.data()}, "v.npy").find("'shape': (5,)"), std::string::npos);
  const float scalar = 2.5f;
  EXPECT_NE(encode_npy({{}, &scalar}, "s.npy").find("'shape': ()"), std::string::npos);
}

TEST_F(FormatsTest, NpyReadsOtherKeyOrderWithoutTrailingComma) {
  const std::string header = "{'shape': (2,2), 'fortran_order':False,'descr':'<f4'}  \n";
  const std::string bytes = npy_v1(header, f32_bytes({1.f, 2.f, 3.f, 4.f}));
  const grape::io::NpyFile npy = parse_npy(bytes, "k.npy");
  EXPECT_EQ(npy.shape, (std::vector<std::int64_t>{2, 2}));
  EXPECT_EQ(npy.data, f32_bytes({1.f, 2.f, 3.f, 4.f}));
}

TEST_F(FormatsTest, NpyReadsVersion2Header) {
  const std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }\n";
  const std::string bytes = npy_v2(header, f32_bytes({0.5f, -0.25f, 8.f}));
  const grape::io::NpyFile npy = parse_npy(bytes, "v2.npy");
  EXPECT_EQ(npy.shape, std::vector<std::int64_t>{3});
  EXPECT_EQ(npy.data, f32_bytes({0.5f, -0.25f, 8.f}));
}

TEST_F(FormatsTest, NpyReadsScalar) {
  const std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (), }\n";
  const std::string bytes = npy_v1(header, f32_bytes({7.f}));
  const grape::io::NpyFile npy = parse_npy(bytes, "s.npy");
  EXPECT_TRUE(npy.shape.empty());
  EXPECT_EQ(npy.data, f32_bytes({7.f}));
}

TEST_F(FormatsTest, NpyRefusals) {
  const std::string data4 = f32_bytes({1.f, 2.f, 3.f, 4.f});
  auto parse = [](const std::string& name, const std::string& bytes) {
    return [name, bytes] { parse_npy(bytes, name); };
  };

  const auto i4 =
      parse("i4.npy", npy_v1("{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }\n", data4));
  expect_error(i4, "unsupported dtype '<i4'");
  expect_error(i4, "i4.npy");
  // float64 takes 8 bytes an element: 16 bytes are 2 of them, not 4.
  expect_error(parse("f8.npy", npy_v1("{'descr': '<f8', 'fortran_order': False, 'shape': (4,), }\n", data4)),
               "truncated data: expected 32 bytes for shape (4,), found 16");

  expect_error(parse("be.npy", npy_v1("{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }\n", data4)),
               "unsupported dtype '>f4'");
  expect_error(parse("fo.npy", npy_v1("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }\n", data4)),
               "fortran_order True");
  expect_error(parse("magic.npy", "\x93NUMPZ\x01\x00" + le16(2) + "{}" + data4), "bad magic");
  expect_error(parse("short.npy", "\x93NU"), "bad magic");
  expect_error(
      parse("trunc.npy", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }\n", data4)),
      "expected 20 bytes for shape (5,), found 16");
  expect_error(
      parse("extra.npy", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }\n", data4)),
      "unexpected trailing data: expected 12 bytes");
}

TEST_F(FormatsTest, NpyRefusesMalformedHeaders) {
  const std::string data = f32_bytes({1.f});
  auto check = [&](const std::string& header, const std::string& needle) {
    expect_error([&] { parse_npy(npy_v1(header, data), "h.npy"); }, needle);
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
  expect_error([&] { parse_npy(std::string("\x93NUMPY\x04\x00", 8) + le16(0), "v4.npy"); },
               "unsupported .npy format version 4.0");
  expect_error([&] { parse_npy(std::string("\x93NUMPY\x01\x00", 8) + le16(500) + "{}", "hl.npy"); },
               "truncated");
}

TEST_F(FormatsTest, NpyEncodeRefusesHeaderBeyondVersion1) {
  // Each dimension "1, " takes 3 bytes of header text: 30000 of them overflow the 2-byte header length.
  const float one = 1.f;
  expect_error(
      [&] {
        encode_npy({std::vector<std::int64_t>(30000, 1), &one}, "d.npy");
      },
      "d.npy: too many dimensions for a version 1.0 .npy header");
}

// ---- .safetensors -----------------------------------------------------------------------------------

TEST_F(FormatsTest, SafetensorsRoundTripWithMetadata) {
  const std::vector<float> weight = values_for({4, 3}), bias = values_for({3});
  const float scalar = 3.25f;
  const std::map<std::string, F32Array> arrays = {
      {"layer.weight", {{4, 3}, weight.data()}},
      {"bias", {{3}, bias.data()}},
      {"scalar", {{}, &scalar}},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "grape test \xc3\xa9"}};
  write_file_atomic(file("m.safetensors"), encode_safetensors(arrays, meta, file("m.safetensors")));

  const std::string bytes = read_file(file("m.safetensors"));
  const grape::io::SafetensorsFile back = parse_safetensors(bytes, file("m.safetensors"));
  ASSERT_EQ(back.entries.size(), arrays.size());
  for (const grape::io::SafetensorsEntry& e : back.entries) {
    ASSERT_TRUE(arrays.count(e.name)) << e.name;
    const F32Array& a = arrays.at(e.name);
    EXPECT_EQ(e.shape, a.shape) << e.name;
    EXPECT_EQ(back.data.substr(e.begin, e.end - e.begin),
              std::string_view(reinterpret_cast<const char*>(a.data), a.nbytes()))
        << e.name;
  }
  EXPECT_EQ(back.metadata, meta);

  // Without metadata there is no "__metadata__" entry, and parsing reports an empty map.
  const std::string plain = encode_safetensors(arrays, {}, "n.safetensors");
  EXPECT_EQ(plain.find("__metadata__"), std::string::npos);
  EXPECT_TRUE(parse_safetensors(plain, "n.safetensors").metadata.empty());
}

TEST_F(FormatsTest, SafetensorsByteLayout) {
  const std::vector<float> values = {1.f, -2.f, 0.5f, 4.f, 5.f, 6.f};
  const std::string bytes = encode_safetensors({{"w", {{2, 3}, values.data()}}}, {}, "one.safetensors");
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
  EXPECT_EQ(bytes.substr(8 + n), f32_bytes(values));
}

TEST_F(FormatsTest, SafetensorsSortsByNameAndReadsHandBuiltFile) {
  const float one = 1.f, zeros[2] = {0.f, 0.f};
  const std::string bytes =
      encode_safetensors({{"b", {{1}, &one}}, {"a", {{2}, zeros}}}, {}, "s.safetensors");
  const auto j = nlohmann::json::parse(bytes.substr(8, read_le64(bytes)));
  EXPECT_EQ(j["a"]["data_offsets"], nlohmann::json::array({0, 8}));
  EXPECT_EQ(j["b"]["data_offsets"], nlohmann::json::array({8, 12}));

  // Written by hand in another order, unpadded, with whitespace: still read, entries sorted by name.
  const std::string header =
      R"({ "y": {"shape": [2], "dtype": "F32", "data_offsets": [0, 8]}, "__metadata__": {"k": "v"},)"
      R"( "x": {"data_offsets": [8, 12], "shape": [], "dtype": "F32"} })";
  const std::string hand = safetensors_file(header, f32_bytes({1.f, 2.f, 3.f}));
  const grape::io::SafetensorsFile st = parse_safetensors(hand, "h.safetensors");
  ASSERT_EQ(st.entries.size(), 2u);
  const grape::io::SafetensorsEntry &x = st.entries[0], &y = st.entries[1];
  EXPECT_EQ(x.name, "x");
  EXPECT_TRUE(x.shape.empty());
  EXPECT_EQ(st.data.substr(x.begin, x.end - x.begin), f32_bytes({3.f}));
  EXPECT_EQ(y.name, "y");
  EXPECT_EQ(y.shape, std::vector<std::int64_t>{2});
  EXPECT_EQ(st.data.substr(y.begin, y.end - y.begin), f32_bytes({1.f, 2.f}));
  EXPECT_EQ(st.metadata.at("k"), "v");
}

TEST_F(FormatsTest, SafetensorsRefusals) {
  const std::string data = f32_bytes({1.f, 2.f, 3.f, 4.f});
  auto check = [&](const std::string& name, const std::string& bytes, const std::string& needle) {
    expect_error([&] { parse_safetensors(bytes, name); }, needle);
    // Every message starts with the path.
    expect_error([&] { parse_safetensors(bytes, name); }, name + ": ");
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
}

TEST_F(FormatsTest, SafetensorsRefusesBytesNoTensorCovers) {
  // Issue 17: trailing junk, or a header length one short (every tensor shifted by a byte), was accepted.
  const std::vector<float> values = {1.f, 2.f, 3.f, 4.f};
  const std::string good = encode_safetensors({{"t", {{4}, values.data()}}}, {}, "g.safetensors");
  ASSERT_EQ(good.size() - 8 - read_le64(good), 16u);
  EXPECT_EQ(parse_safetensors(good, "g.safetensors").entries.size(), 1u);
  expect_error(
      [&] { parse_safetensors(good + "junk", "j.safetensors"); },
      "j.safetensors: data section bytes 16..20 belong to no tensor (trailing bytes, or a header length "
      "that is off)");
  std::string shifted = good;
  ASSERT_EQ(shifted[8 + read_le64(good) - 1], ' ');  // the header's padding: still valid JSON one byte short
  shifted.replace(0, 8, le64(read_le64(good) - 1));
  expect_error([&] { parse_safetensors(shifted, "s.safetensors"); },
               "data section bytes 16..17 belong to no tensor");
  const std::string data = f32_bytes({1.f, 2.f, 3.f, 4.f});
  expect_error(
      [&] {
        parse_safetensors(safetensors_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                           R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                           data),
                          "gap.safetensors");
      },
      "gap.safetensors: data section bytes 4..8 belong to no tensor (before 'b')");
}

TEST_F(FormatsTest, SafetensorsEncodeRefusals) {
  const float one = 1.f;
  expect_error(
      [&] {
        encode_safetensors({{"__metadata__", {{1}, &one}}}, {}, "r.safetensors");
      },
      "r.safetensors: '__metadata__' is reserved and cannot name a tensor");
  // JSON text must be UTF-8: a name that is not is refused with the encoder's reason.
  expect_error(
      [&] {
        encode_safetensors({{"\xff", {{1}, &one}}}, {}, "u.safetensors");
      },
      "u.safetensors: cannot encode header: ");
}

// ---- SentencePiece models: the character maps libsentencepiece walks unchecked -----------------------

TEST_F(FormatsTest, SentencePieceCharsMapChecks) {
  using grape::testing::CharsMap;
  const std::string other_fields = grape::testing::protobuf_field(1, "piece");  // kept as they are
  check_sentencepiece_model(other_fields + sentencepiece_charsmap_field(CharsMap().bytes()), "ok.model");
  check_sentencepiece_model(other_fields, "none.model");  // no map: identity normalization

  auto refused = [&](const CharsMap& map, const std::string& needle, std::uint32_t spec = 3) {
    expect_error(
        [&] {
          check_sentencepiece_model(other_fields + sentencepiece_charsmap_field(map.bytes(), spec),
                                    "m.model");
        },
        needle);
  };
  CharsMap root_out;  // issue 17's crash: the root's offset leads far outside the trie
  root_out.units[0] = 0xFFFFFFFFu;
  refused(root_out, "m.model: the normalizer's character map is damaged: its trie leads outside itself");
  refused(root_out, "m.model: the denormalizer's character map is damaged", 5);
  CharsMap value_out;  // a rule's value beyond the normalized strings (strlen would run off the blob)
  value_out.units[384] = (1u << 31) | 7u;
  refused(value_out, "a rule points outside its normalized strings");
  CharsMap no_nul;
  no_nul.normalized = "b";
  refused(no_nul, "a rule points outside its normalized strings");
  CharsMap leaf_out;  // the rule's value unit itself outside the trie
  leaf_out.units[256 ^ 'a'] = (0x1FFFFu << 10) | (1u << 8) | 'a';
  refused(leaf_out, "outside");
  CharsMap cycle;  // "a" leads back to the root's base, with a rule each time: "aaaa..." overflows
  cycle.units[256 ^ 'a'] = (97u << 10) | (1u << 8) | 'a';
  cycle.units[256] = (1u << 31) | 0u;
  refused(cycle, "a path of its trie matches too many rules");
  CharsMap empty_trie;
  empty_trie.units.clear();
  refused(empty_trie, "its trie is empty");
  std::string long_size = CharsMap().bytes();
  long_size[1] = '\x7f';  // the trie size field larger than the map
  expect_error([&] { check_sentencepiece_model(sentencepiece_charsmap_field(long_size), "s.model"); },
               "s.model: the normalizer's character map is damaged: its trie size exceeds the map");
  // The protobuf itself: a length running past the end.
  const std::string cut = other_fields + sentencepiece_charsmap_field(CharsMap().bytes());
  expect_error([&] { check_sentencepiece_model(cut.substr(0, cut.size() - 3), "cut.model"); },
               "cut.model: not a SentencePiece model: damaged protobuf at byte 7");
}

// ---- atomic writes ----------------------------------------------------------------------------------

TEST_F(FormatsTest, AtomicWriteReplacesExistingFile) {
  write_file_atomic(file("f.txt"), "old contents that are longer");
  write_file_atomic(file("f.txt"), "new");
  EXPECT_EQ(read_file(file("f.txt")), "new");
  write_file_atomic(file("f.txt"), "");
  EXPECT_EQ(read_file(file("f.txt")), "");
  const std::string binary("a\0b\xff", 4);
  write_file_atomic(file("f.txt"), binary);
  EXPECT_EQ(read_file(file("f.txt")), binary);
}

TEST_F(FormatsTest, AtomicWriteLeavesNoTemporaries) {
  write_file_atomic(file("a.bin"), "1");
  write_file_atomic(file("a.bin"), "2");
  write_file_atomic(file("b.bin"), "3");
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"a.bin", "b.bin"}));
}

TEST_F(FormatsTest, AtomicWriteIntoMissingDirectoryFails) {
  const fs::path missing = dir_ / "no_such_dir";
  const std::string target = (missing / "f.txt").string();
  expect_error([&] { write_file_atomic(target, "x"); }, target);
  expect_error([&] { write_file_atomic(target, "x"); }, std::strerror(ENOENT));
  EXPECT_FALSE(fs::exists(missing));
  EXPECT_TRUE(fs::is_empty(dir_));
}

TEST_F(FormatsTest, AtomicWriteRefusesToReplaceWhatIsNotARegularFile) {
  // Issue 17: rename() over a FIFO, a symlink or a device node silently made it a regular file.
  fs::create_directories(dir_ / "d" / "child");
  expect_error(
      [&] { write_file_atomic(file("d"), "x"); },
      "cannot write '" + file("d") + "': it is a directory, not a regular file; refusing to replace it");
  EXPECT_TRUE(fs::is_directory(dir_ / "d" / "child"));
  ASSERT_EQ(::mkfifo(file("fifo").c_str(), 0600), 0);
  expect_error([&] { write_file_atomic(file("fifo"), "x"); }, "'" + file("fifo") + "': it is a FIFO");
  EXPECT_TRUE(fs::is_fifo(fs::symlink_status(dir_ / "fifo")));
  write_file_atomic(file("target.txt"), "kept");
  fs::create_symlink(dir_ / "target.txt", dir_ / "link");
  expect_error([&] { write_file_atomic(file("link"), "x"); },
               "'" + file("link") + "': it is a symbolic link");
  EXPECT_TRUE(fs::is_symlink(dir_ / "link"));
  EXPECT_EQ(read_file(file("target.txt")), "kept");
  // A dangling symlink is not "absent" either.
  fs::create_symlink(dir_ / "nowhere", dir_ / "dangling");
  expect_error([&] { write_file_atomic(file("dangling"), "x"); }, "it is a symbolic link");
  EXPECT_FALSE(fs::exists(dir_ / "nowhere"));
  // No temporaries were left behind by any refusal.
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"d", "dangling", "fifo", "link", "target.txt"}));
}

TEST_F(FormatsTest, AtomicWriteErrorMidWriteKeepsOldFileAndRemovesTemporary) {
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
  EXPECT_EQ(names_in(dir_), std::vector<std::string>{"keep.txt"});
}

TEST_F(FormatsTest, ReadFileErrors) {
  expect_error([&] { read_file(file("nope")); },
               "cannot open '" + file("nope") + "': " + std::strerror(ENOENT));
  expect_error([&] { read_file(dir_.string()); },
               "cannot open '" + dir_.string() + "': it is a directory, not a regular file");
}

TEST_F(FormatsTest, ReadFileRefusesSpecialFilesWithoutBlocking) {
  // Issue 17: /dev/zero grew to GBs until bad_alloc; a FIFO with no writer blocked forever.
  expect_error([&] { read_file("/dev/zero"); }, "cannot open '/dev/zero': it is a character device");
  ASSERT_EQ(::mkfifo(file("fifo").c_str(), 0600), 0);
  expect_error([&] { read_file(file("fifo")); }, "cannot open '" + file("fifo") + "': it is a FIFO");
  // Through a symlink, too: what is read is what the link leads to.
  fs::create_symlink("/dev/zero", dir_ / "zero");
  expect_error([&] { read_file(file("zero")); }, "it is a character device");
  // /proc files say they hold 0 bytes; they are read to their end all the same.
  EXPECT_NE(read_file("/proc/self/cmdline"), "");
}

TEST_F(FormatsTest, ReadFileCapsTheSize) {
  write_file_atomic(file("big"), std::string(100, 'x'));
  EXPECT_EQ(read_file(file("big"), 100).size(), 100u);
  expect_error([&] { read_file(file("big"), 99); },
               "cannot read '" + file("big") + "': 100 bytes, more than the 99 bytes such a file may hold");
  write_file_atomic(file("two_mib"), std::string(2 << 20, 'x'));
  ASSERT_EQ(::setenv("GRAPE_MAX_FILE_MB", "1", 1), 0);
  expect_error([&] { read_file(file("two_mib")); },
               "2 MiB, more than the 1 MiB such a file may hold (GRAPE_MAX_FILE_MB raises the cap)");
  ASSERT_EQ(::setenv("GRAPE_MAX_FILE_MB", "2", 1), 0);
  EXPECT_EQ(read_file(file("two_mib")).size(), std::size_t{2} << 20);
  ASSERT_EQ(::setenv("GRAPE_MAX_FILE_MB", "lots", 1), 0);
  expect_error([&] { read_file(file("big")); }, "GRAPE_MAX_FILE_MB='lots' is not a positive whole number");
  ASSERT_EQ(::unsetenv("GRAPE_MAX_FILE_MB"), 0);
  EXPECT_EQ(grape::io::max_data_bytes(), std::uint64_t{16} << 30);
}

}  // namespace
