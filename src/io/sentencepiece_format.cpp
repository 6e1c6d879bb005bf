// SentencePiece model files (a protobuf ModelProto), checked where libsentencepiece does not check them:
// the normalizer's precompiled character map holds a double-array trie (darts-clone) that the library walks
// without bounds checks, so a damaged map is accepted at load and crashes the first encode (issue 17).
// No LibTorch and no protobuf library: a small reader of the protobuf wire format.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "grape/formats.hpp"

namespace grape::io {

namespace {

// The fields of ModelProto and NormalizerSpec (sentencepiece_model.proto) this check reads.
constexpr std::uint64_t kNormalizerSpec = 3;    // ModelProto.normalizer_spec
constexpr std::uint64_t kDenormalizerSpec = 5;  // ModelProto.denormalizer_spec
constexpr std::uint64_t kCharsMap = 2;          // NormalizerSpec.precompiled_charsmap
// The normalizer keeps the matches of one prefix search in a fixed array of this size and reads as many as
// the trie reports: more leaves on one path would read past it.
constexpr int kMaxMatchesPerPrefix = 32;

bool read_varint(std::string_view s, std::size_t& pos, std::uint64_t& v) {
  v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (pos >= s.size()) return false;
    const auto b = static_cast<unsigned char>(s[pos++]);
    v |= static_cast<std::uint64_t>(b & 0x7F) << shift;
    if ((b & 0x80) == 0) return true;
  }
  return false;
}

// Calls on_bytes(field, payload) for every length-delimited field of a message and skips the others; gives
// the offset of the first byte that is not valid wire format, or npos.
template <class F>
std::size_t for_each_bytes_field(std::string_view msg, F&& on_bytes) {
  std::size_t pos = 0;
  while (pos < msg.size()) {
    const std::size_t start = pos;
    std::uint64_t key = 0, v = 0;
    if (!read_varint(msg, pos, key) || (key >> 3) == 0) return start;
    switch (key & 7) {
      case 0:
        if (!read_varint(msg, pos, v)) return start;
        break;
      case 1:
        if (msg.size() - pos < 8) return start;
        pos += 8;
        break;
      case 5:
        if (msg.size() - pos < 4) return start;
        pos += 4;
        break;
      case 2:
        if (!read_varint(msg, pos, v) || v > msg.size() - pos) return start;
        on_bytes(key >> 3, msg.substr(pos, v));
        pos += v;
        break;
      default:  // groups (3, 4) are not used by sentencepiece_model.proto; 6 and 7 do not exist
        return start;
    }
  }
  return std::string_view::npos;
}

std::uint32_t le32_at(std::string_view s, std::size_t pos) {
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i)
    v |= static_cast<std::uint32_t>(static_cast<unsigned char>(s[pos + i])) << (8 * i);
  return v;
}

// A precompiled charsmap: a little-endian uint32 trie size, the trie (32-bit darts-clone units), then the
// normalized strings, each ended by a NUL, that the trie's values index. Walks every path of the trie as
// the normalizer would and throws unless each step stays inside the trie, no path (cycles included)
// matches more than kMaxMatchesPerPrefix rules, and every value starts a NUL-ended string inside the blob.
void check_charsmap(std::string_view blob, const std::string& where) {
  auto fail = [&](const std::string& why) {
    throw std::runtime_error(where + " is damaged: " + why + " (the library would crash on it)");
  };
  if (blob.size() <= 4) fail("shorter than its 4-byte size field");
  const std::uint32_t trie_size = le32_at(blob, 0);
  if (trie_size > blob.size() - 4) fail("its trie size exceeds the map");
  const std::string_view normalized = blob.substr(4 + trie_size);
  const std::size_t n_units = trie_size / 4;
  if (n_units == 0) fail("its trie is empty");
  auto unit = [&](std::size_t i) { return le32_at(blob, 4 + 4 * i); };
  auto offset = [](std::uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); };
  auto has_leaf = [](std::uint32_t u) { return ((u >> 8) & 1) != 0; };
  auto label = [](std::uint32_t u) { return u & ((1u << 31) | 0xFFu); };

  struct Node {
    std::size_t pos;  // the base a byte is XORed onto
    int matches;      // rules matched on the path here
  };
  // The most rules matched on a path to each unit: a unit is walked again only with more, so a cycle ends
  // (a cycle without rules is harmless; one with rules exceeds the limit).
  std::vector<int> most_matches(n_units, -1);
  std::vector<Node> todo = {{static_cast<std::size_t>(offset(unit(0))), 0}};
  while (!todo.empty()) {
    const Node node = todo.back();
    todo.pop_back();
    // node.pos ^ byte, for every byte, stays in the 256-unit block of node.pos.
    if ((node.pos | 0xFF) >= n_units) fail("its trie leads outside itself");
    for (std::uint32_t c = 0; c < 256; ++c) {
      const std::size_t child = node.pos ^ c;
      const std::uint32_t u = unit(child);
      if (label(u) != c) continue;
      const std::size_t next = child ^ offset(u);
      int matches = node.matches;
      if (has_leaf(u)) {
        if (next >= n_units) fail("a rule of its trie lies outside it");
        const std::uint32_t value = unit(next) & 0x7FFFFFFFu;
        if (value >= normalized.size() || normalized.find('\0', value) == std::string_view::npos)
          fail("a rule points outside its normalized strings");
        if (++matches > kMaxMatchesPerPrefix) fail("a path of its trie matches too many rules");
      }
      if (matches <= most_matches[child]) continue;
      most_matches[child] = matches;
      todo.push_back({next, matches});
    }
  }
}

}  // namespace

void check_sentencepiece_model(std::string_view file, const std::string& path) {
  std::string_view maps[2];  // the last charsmap of each spec wins, as protobuf merges repeated messages
  const std::size_t bad = for_each_bytes_field(file, [&](std::uint64_t field, std::string_view spec) {
    if (field != kNormalizerSpec && field != kDenormalizerSpec) return;
    std::string_view& map = maps[field == kNormalizerSpec ? 0 : 1];
    const std::size_t bad_spec = for_each_bytes_field(spec, [&](std::uint64_t f, std::string_view bytes) {
      if (f == kCharsMap) map = bytes;
    });
    if (bad_spec != std::string_view::npos)
      throw std::runtime_error(path + ": not a SentencePiece model: its normalizer settings are damaged");
  });
  if (bad != std::string_view::npos)
    throw std::runtime_error(path + ": not a SentencePiece model: damaged protobuf at byte " +
                             std::to_string(bad));
  if (!maps[0].empty()) check_charsmap(maps[0], path + ": the normalizer's character map");
  if (!maps[1].empty()) check_charsmap(maps[1], path + ": the denormalizer's character map");
}

}  // namespace grape::io
