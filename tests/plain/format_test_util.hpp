// Shared by the file-format tests (tests/plain/test_formats.cpp on bytes, tests/test_io.cpp on tensors):
// a scratch directory per test, an error-message matcher, and hand-built .npy / .safetensors files.
// No LibTorch here.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <system_error>
#include <vector>

namespace grape::testing {

// A fresh directory per test, removed afterwards; pid + time + counter keep parallel runs apart.
class ScratchDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    dir_ = std::filesystem::temp_directory_path() / ("grape_io_test_" + std::to_string(::getpid()) + "_" +
                                                     std::to_string(stamp) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }

  std::filesystem::path dir_;
};

// Asserts that `fn` throws a std::exception whose message contains `needle`.
inline void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message \"" << e.what() << "\" lacks \"" << needle << "\"";
    return;
  }
  ADD_FAILURE() << "no exception; expected one mentioning \"" << needle << "\"";
}

inline std::string le16(std::uint16_t v) { return {static_cast<char>(v & 0xFF), static_cast<char>(v >> 8)}; }

inline std::string le32(std::uint32_t v) {
  std::string out;
  for (int i = 0; i < 4; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
  return out;
}

inline std::string le64(std::uint64_t v) {
  std::string out;
  for (int i = 0; i < 8; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
  return out;
}

inline std::uint64_t read_le64(const std::string& s) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<std::uint64_t>(static_cast<unsigned char>(s[i])) << (8 * i);
  return v;
}

// Little-endian float32 bytes of the given values (tests run on little-endian hosts, but be explicit).
inline std::string f32_bytes(const std::vector<float>& values) {
  std::string out;
  for (const float f : values) {
    std::uint32_t u = 0;
    std::memcpy(&u, &f, 4);
    out += le32(u);
  }
  return out;
}

// A .npy file as numpy lays it out: magic, version, header length, header text, data.
inline std::string npy_v1(const std::string& header, const std::string& data) {
  return std::string("\x93NUMPY\x01\x00", 8) + le16(static_cast<std::uint16_t>(header.size())) + header +
         data;
}

inline std::string npy_v2(const std::string& header, const std::string& data) {
  return std::string("\x93NUMPY\x02\x00", 8) + le32(static_cast<std::uint32_t>(header.size())) + header +
         data;
}

// A .safetensors file from a header JSON text and a data section, without padding.
inline std::string safetensors_file(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

// A length-delimited protobuf field: key (field, wire type 2), length, payload.
inline std::string protobuf_field(std::uint32_t field, const std::string& payload) {
  std::string out;
  auto varint = [&out](std::uint64_t v) {
    for (; v >= 0x80; v >>= 7) out += static_cast<char>((v & 0x7F) | 0x80);
    out += static_cast<char>(v);
  };
  varint((std::uint64_t{field} << 3) | 2);
  varint(payload.size());
  return out + payload;
}

// ModelProto bytes setting normalizer_spec (3) .precompiled_charsmap (2); appended to a serialized model,
// protobuf merges it into the model's own normalizer settings.
inline std::string sentencepiece_charsmap_field(const std::string& charsmap, std::uint32_t spec = 3) {
  return protobuf_field(spec, protobuf_field(2, charsmap));
}

// A precompiled charsmap whose darts-clone trie (512 units) maps "a" to "b", as sentencepiece lays it out:
// uint32 trie size, the units, the NUL-ended normalized strings. `units` may be edited before `finish`.
struct CharsMap {
  std::vector<std::uint32_t> units = std::vector<std::uint32_t>(512, 0);
  std::string normalized = std::string("b\0", 2);
  CharsMap() {
    units[0] = 256u << 10;                              // root: its children's base is 256
    units[256 ^ 'a'] = (225u << 10) | (1u << 8) | 'a';  // 'a', with a rule; its base 353 ^ 225 = 384
    units[384] = (1u << 31) | 0u;                       // the rule's value: normalized[0] = "b"
  }
  std::string bytes() const {
    std::string out = le32(static_cast<std::uint32_t>(units.size() * 4));
    for (const std::uint32_t u : units) out += le32(u);
    return out + normalized;
  }
};

// The names in a directory, sorted.
inline std::vector<std::string> names_in(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace grape::testing
