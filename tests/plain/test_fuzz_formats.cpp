// Issue 17: a deterministic mutation test of the torch-free readers (.npy, .safetensors, SentencePiece
// models' character maps). Each mutated file must be accepted whole (its invariants hold) or refused with a
// std::runtime_error that names the file; no case may crash (scripts/sanitize.sh runs this under ASan and
// UBSan), take more than a second, or grow the process by more than 256 MiB. GRAPE_FUZZ_SCALE (a factor,
// default 1) scales the number of cases; the checkpoint, tokenizer and config paths that need LibTorch are
// fuzzed in tests/test_robust_inputs.cpp.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "grape/formats.hpp"
#include "plain/format_test_util.hpp"

namespace {

using grape::io::F32Array;

// splitmix64: the same cases on every machine and every run.
struct Rng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  std::size_t below(std::size_t n) { return n == 0 ? 0 : static_cast<std::size_t>(next() % n); }
};

// One to four edits of the kinds that break parsers: bit flips, boundary bytes and integers, numbers in text
// made huge or negative, truncation, insertion, deletion and duplication of a range.
std::string mutate(std::string b, Rng& rng) {
  static const char kBytes[] = {0,
                                1,
                                0x7F,
                                static_cast<char>(0x80),
                                static_cast<char>(0xFF),
                                '9',
                                '-',
                                '"',
                                '{',
                                '}',
                                ',',
                                ' ',
                                '\n',
                                '[',
                                ']',
                                ':',
                                'e',
                                '.'};
  static const std::uint64_t kInts[] = {0, 1, 0x7FFFFFFFull, 0xFFFFFFFFull, 0x80000000ull, ~0ull, 1ull << 40};
  static const char* kNumbers[] = {
      "99999999999999999999", "-1", "1e308", "4294967296", "0", "-0", "nan", "1.5"};
  const int edits = 1 + static_cast<int>(rng.below(4));
  for (int e = 0; e < edits; ++e) {
    const std::size_t at = rng.below(b.size() + 1);
    switch (rng.below(8)) {
      case 0:
        if (!b.empty()) b[rng.below(b.size())] ^= static_cast<char>(1u << rng.below(8));
        break;
      case 1:
        if (!b.empty()) b[rng.below(b.size())] = kBytes[rng.below(sizeof kBytes)];
        break;
      case 2: {
        const std::uint64_t v = kInts[rng.below(std::size(kInts))];
        const std::size_t width = rng.below(2) ? 8 : 4;
        for (std::size_t i = 0; i < width && at + i < b.size(); ++i)
          b[at + i] = static_cast<char>(v >> (8 * i));
        break;
      }
      case 3:
        b.resize(at);
        break;
      case 4:
        for (std::size_t n = 1 + rng.below(16); n > 0; --n)
          b.insert(b.begin() + static_cast<std::ptrdiff_t>(at), static_cast<char>(rng.next()));
        break;
      case 5:
        b.erase(at, 1 + rng.below(32));
        break;
      case 6:
        if (!b.empty()) {
          const std::size_t from = rng.below(b.size());
          b.insert(at, b.substr(from, 1 + rng.below(64)));
        }
        break;
      default: {  // a run of digits replaced by another number
        const std::size_t d = b.find_first_of("0123456789", at);
        if (d == std::string::npos) break;
        const std::size_t end = b.find_first_not_of("0123456789", d);
        b.replace(d, (end == std::string::npos ? b.size() : end) - d,
                  kNumbers[rng.below(std::size(kNumbers))]);
      }
    }
  }
  return b;
}

// GRAPE_FUZZ_SCALE x `cases`, at least 1.
int scaled(int cases) {
  const char* env = std::getenv("GRAPE_FUZZ_SCALE");
  const double f = env != nullptr ? std::atof(env) : 1.0;
  return std::max(1, static_cast<int>(cases * (f > 0 ? f : 1.0)));
}

long max_rss_kib() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

struct Tally {
  int accepted = 0, refused = 0;
};

// Runs `cases` mutations of the seeds through `parse` (which also checks what it accepted).
Tally fuzz(const std::string& kind, const std::vector<std::string>& seeds, int cases, std::uint64_t seed,
           const std::function<void(const std::string& bytes, const std::string& name)>& parse) {
  Rng rng{seed};
  Tally t;
  const long rss_before = max_rss_kib();
  for (int i = 0; i < cases; ++i) {
    const std::string name = "fuzz/" + kind + "/" + std::to_string(i);
    const std::string bytes = mutate(seeds[static_cast<std::size_t>(i) % seeds.size()], rng);
    const auto t0 = std::chrono::steady_clock::now();
    try {
      parse(bytes, name);
      ++t.accepted;
    } catch (const std::runtime_error& e) {
      ++t.refused;
      const std::string msg = e.what();
      if (msg.rfind(name + ":", 0) != 0 && msg.find("'" + name + "'") == std::string::npos)
        ADD_FAILURE() << name << ": the refusal does not name the file: " << msg;
    } catch (const std::exception& e) {
      ADD_FAILURE() << name << ": not a runtime_error: " << e.what();
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s > 1.0) ADD_FAILURE() << name << ": took " << s << " s";
  }
  EXPECT_LT(max_rss_kib() - rss_before, 256 * 1024) << kind << ": memory grew";
  std::printf("fuzz %s: %d cases, %d accepted, %d refused\n", kind.c_str(), cases, t.accepted, t.refused);
  return t;
}

TEST(FuzzFormats, Npy) {
  const std::vector<float> v = {1.f, -2.f, 3.5f, 0.f, 7.f, 8.f, 9.f, 10.f};
  std::vector<std::string> seeds;
  for (const std::vector<std::int64_t>& shape :
       std::vector<std::vector<std::int64_t>>{{}, {3}, {2, 4}, {2, 0, 4}})
    seeds.push_back(grape::io::encode_npy({shape, v.data()}, "seed.npy"));
  seeds.push_back(grape::testing::npy_v2("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n",
                                         grape::testing::f32_bytes({1.f, 2.f})));
  const Tally t = fuzz("npy", seeds, scaled(2000), 17, [](const std::string& bytes, const std::string& name) {
    const auto npy = grape::io::parse_npy(bytes, name);
    std::uint64_t n = 4;
    for (const auto d : npy.shape) {
      ASSERT_GE(d, 0) << name;
      n *= static_cast<std::uint64_t>(d);
    }
    ASSERT_EQ(npy.data.size(), n) << name;
    ASSERT_GE(npy.data.data(), bytes.data()) << name;
    ASSERT_LE(npy.data.data() + npy.data.size(), bytes.data() + bytes.size()) << name;
  });
  EXPECT_GT(t.accepted, 0);
  EXPECT_GT(t.refused, t.accepted / 4);
}

TEST(FuzzFormats, Safetensors) {
  const std::vector<float> v = {1.f, -2.f, 3.5f, 0.f, 7.f, 8.f};
  std::vector<std::string> seeds = {
      grape::io::encode_safetensors(
          {{"a", {{2, 3}, v.data()}}, {"b.weight", {{4}, v.data()}}, {"s", {{}, v.data()}}},
          {{"pe", "rope"}, {"config", "{\"n_layer\": 1}"}}, "seed.safetensors"),
      grape::io::encode_safetensors({{"e", {{0, 3}, v.data()}}, {"x", {{1}, v.data()}}}, {},
                                    "seed.safetensors"),
  };
  const Tally t =
      fuzz("safetensors", seeds, scaled(3000), 23, [](const std::string& bytes, const std::string& name) {
        const auto st = grape::io::parse_safetensors(bytes, name);
        std::uint64_t covered = 0;
        for (const auto& e : st.entries) {
          ASSERT_LE(e.begin, e.end) << name;
          ASSERT_LE(e.end, st.data.size()) << name;
          covered += e.end - e.begin;
        }
        ASSERT_EQ(covered, st.data.size()) << name << ": bytes no tensor covers were accepted";
      });
  EXPECT_GT(t.accepted, 0);
  EXPECT_GT(t.refused, t.accepted / 4);
}

TEST(FuzzFormats, SentencePieceCharsMaps) {
  using grape::testing::CharsMap;
  using grape::testing::protobuf_field;
  CharsMap two_rules;  // "a" -> "b" and "ab" -> "c"
  two_rules.units[384 ^ 'b'] = (100u << 10) | (1u << 8) | 'b';
  two_rules.units[(384 ^ 'b') ^ 100] = (1u << 31) | 2u;
  two_rules.normalized = std::string("b\0c\0", 4);
  const std::string pieces = protobuf_field(1, protobuf_field(1, "a") + protobuf_field(1, "lamb"));
  const std::vector<std::string> seeds = {
      pieces + grape::testing::sentencepiece_charsmap_field(CharsMap().bytes()),
      pieces + grape::testing::sentencepiece_charsmap_field(two_rules.bytes()) +
          grape::testing::sentencepiece_charsmap_field(CharsMap().bytes(), 5),
  };
  for (const auto& s : seeds) grape::io::check_sentencepiece_model(s, "seed.model");
  const Tally t =
      fuzz("sentencepiece", seeds, scaled(1500), 29, [](const std::string& bytes, const std::string& name) {
        grape::io::check_sentencepiece_model(bytes, name);
      });
  EXPECT_GT(t.accepted, 0);
  EXPECT_GT(t.refused, 0);
}

}  // namespace
