// .safetensors parser and encoder for float32 tensors (no LibTorch: see grape/formats.hpp).
//
// Layout: an 8-byte little-endian uint64 N, N bytes of UTF-8 JSON, then the data section. The JSON object
// maps each tensor name to {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, offsets being
// relative to the start of the data section; an optional "__metadata__" entry maps strings to strings.
#include <algorithm>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "grape/formats.hpp"
#include "io/byte_order.hpp"

namespace grape::io {

namespace {

using nlohmann::json;

constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;  // same limit as the reference implementation
constexpr const char* kMetadataKey = "__metadata__";

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

// A JSON value that must be a non-negative integer (nlohmann stores those as number_unsigned).
std::optional<std::uint64_t> as_unsigned(const json& v) {
  if (!v.is_number_unsigned()) return std::nullopt;
  return v.get<std::uint64_t>();
}

SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const json& info) {
  const std::string where = "tensor '" + name + "'";
  if (!info.is_object()) fail(path, where + ": header entry must be a JSON object");
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!info.contains(field)) fail(path, where + ": missing field '" + field + "'");

  const json& dtype = info["dtype"];
  if (!dtype.is_string()) fail(path, where + ": 'dtype' must be a string");
  if (dtype.get<std::string>() != "F32")
    fail(path, where + " has unsupported dtype '" + dtype.get<std::string>() + "' (grape reads F32 only)");

  SafetensorsEntry e;
  e.name = name;
  const json& shape = info["shape"];
  if (!shape.is_array()) fail(path, where + ": 'shape' must be an array of non-negative integers");
  for (const json& d : shape) {
    const auto v = as_unsigned(d);
    if (!v) fail(path, where + ": 'shape' must be an array of non-negative integers");
    if (*v > static_cast<std::uint64_t>(INT64_MAX)) fail(path, where + ": dimension too large");
    e.shape.push_back(static_cast<std::int64_t>(*v));
  }

  const json& offsets = info["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !as_unsigned(offsets[0]) || !as_unsigned(offsets[1]))
    fail(path, where + ": 'data_offsets' must be an array of two non-negative integers");
  e.begin = offsets[0].get<std::uint64_t>();
  e.end = offsets[1].get<std::uint64_t>();
  return e;
}

// Byte size prod(shape) * 4, or nullopt on overflow.
std::optional<std::uint64_t> checked_nbytes(const std::vector<std::int64_t>& shape) {
  std::uint64_t n = 4;
  for (const std::int64_t d : shape)
    if (__builtin_mul_overflow(n, static_cast<std::uint64_t>(d), &n)) return std::nullopt;
  return n;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

}  // namespace

SafetensorsFile parse_safetensors(std::string_view file, const std::string& path) {
  if (file.size() < 8)
    fail(path, "not a .safetensors file (" + std::to_string(file.size()) +
                   " bytes, shorter than the 8-byte header length)");

  std::uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i)
    header_len |= static_cast<std::uint64_t>(static_cast<unsigned char>(file[i])) << (8 * i);
  if (header_len > kMaxHeaderBytes)
    fail(path, "header length " + std::to_string(header_len) + " exceeds the 100 MB limit");
  if (header_len > file.size() - 8)
    fail(path, "header length " + std::to_string(header_len) + " is larger than the " +
                   std::to_string(file.size() - 8) + " bytes that follow it");

  // nlohmann silently keeps the last of repeated keys; a repeated tensor name is ambiguous, so the
  // callback records top-level keys (depth 1) and flags repeats instead.
  std::set<std::string> seen;
  std::optional<std::string> duplicate;
  const json::parser_callback_t on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && parsed.is_string() &&
        !seen.insert(parsed.get<std::string>()).second && !duplicate)
      duplicate = parsed.get<std::string>();
    return true;
  };
  const char* header_begin = file.data() + 8;
  const json header =
      json::parse(header_begin, header_begin + header_len, on_event, /*allow_exceptions=*/false);
  if (header.is_discarded()) fail(path, "header is not valid JSON");
  if (!header.is_object()) fail(path, "header must be a JSON object");
  if (duplicate) fail(path, "header lists '" + *duplicate + "' more than once");

  SafetensorsFile out;
  for (const auto& [name, info] : header.items()) {
    if (name == kMetadataKey) {
      if (!info.is_object()) fail(path, "'__metadata__' must be an object of strings");
      for (const auto& [k, v] : info.items()) {
        if (!v.is_string()) fail(path, "'__metadata__' value for '" + k + "' must be a string");
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    out.entries.push_back(parse_entry(path, name, info));
  }

  const std::uint64_t data_len = file.size() - 8 - header_len;
  for (const SafetensorsEntry& e : out.entries) {
    const std::string where = "tensor '" + e.name + "'";
    if (e.end < e.begin)
      fail(path, where + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                     "] end before they begin");
    if (e.end > data_len)
      fail(path, where + ": data_offsets end " + std::to_string(e.end) + " is beyond the " +
                     std::to_string(data_len) + "-byte data section");
    const auto want = checked_nbytes(e.shape);
    if (!want || *want != e.end - e.begin)
      fail(path, where + ": shape " + shape_text(e.shape) + " needs " +
                     (want ? std::to_string(*want) : std::string("too many")) +
                     " bytes but data_offsets span " + std::to_string(e.end - e.begin));
  }

  // Overlap check: sorted by start, each non-empty range must begin at or after every earlier end.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const SafetensorsEntry& e : out.entries)
    if (e.end > e.begin) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return std::pair(a->begin, a->end) < std::pair(b->begin, b->end);
  });
  // The data section must be covered exactly, without holes (as the format's specification requires): a
  // header length one byte short shifts every tensor and leaves a byte over, and trailing junk is damage.
  std::uint64_t covered = 0;  // the end of the tensors so far
  for (const SafetensorsEntry* e : by_offset) {
    if (e->begin < covered)
      fail(path, "tensor '" + e->name + "' overlaps the tensor before it in the data section");
    if (e->begin > covered)
      fail(path, "data section bytes " + std::to_string(covered) + ".." + std::to_string(e->begin) +
                     " belong to no tensor (before '" + e->name + "')");
    covered = e->end;
  }
  if (covered != data_len)
    fail(path, "data section bytes " + std::to_string(covered) + ".." + std::to_string(data_len) +
                   " belong to no tensor (trailing bytes, or a header length that is off)");

  out.data = file.substr(8 + header_len);
  return out;
}

std::string encode_safetensors(const std::map<std::string, F32Array>& tensors,
                               const std::map<std::string, std::string>& metadata, const std::string& path) {
  // ordered_json keeps insertion order, which mirrors the reference writer: "__metadata__" first, then
  // the tensors sorted by name (std::map order), each as dtype, shape, data_offsets.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;

  std::uint64_t offset = 0;
  for (const auto& [name, array] : tensors) {
    if (name == kMetadataKey) fail(path, "'__metadata__' is reserved and cannot name a tensor");
    const std::uint64_t nbytes = array.nbytes();
    header[name] = {{"dtype", "F32"},
                    {"shape", array.shape},
                    {"data_offsets", nlohmann::ordered_json::array({offset, offset + nbytes})}};
    offset += nbytes;
  }

  std::string header_text;
  try {
    header_text = header.dump();  // compact, as the reference writes it; throws on invalid UTF-8
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("cannot encode header: ") + e.what());
  }
  // Pad with spaces so that the data section starts 8-byte aligned, as the reference implementation does.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  std::string bytes;
  bytes.reserve(8 + header_text.size() + offset);
  for (int i = 0; i < 8; ++i)
    bytes += static_cast<char>((static_cast<std::uint64_t>(header_text.size()) >> (8 * i)) & 0xFF);
  bytes += header_text;
  for (const auto& [name, array] : tensors) {
    const std::size_t start = bytes.size();
    const std::size_t n = array.nbytes();
    if (n == 0) continue;
    bytes.append(reinterpret_cast<const char*>(array.data), n);
    detail::to_or_from_little_endian(bytes.data() + start, n);
  }
  return bytes;
}

}  // namespace grape::io
