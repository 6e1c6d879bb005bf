// NumPy .npy parser (little-endian float32 or float64) and encoder (float32), C order (no LibTorch: see
// grape/formats.hpp).
//
// Layout (NumPy "format.rst"): the 6 bytes "\x93NUMPY", a major and a minor version byte, the header
// length (uint16 LE for version 1.x, uint32 LE for 2.x and 3.x), then the header: a Python dict literal
// with the keys 'descr', 'fortran_order' and 'shape', padded with spaces and ended by '\n'. The raw
// array data follows immediately.
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "grape/formats.hpp"
#include "io/byte_order.hpp"

namespace grape::io {

namespace {

constexpr std::string_view kMagic = "\x93NUMPY";
constexpr std::size_t kAlign = 64;  // numpy pads magic + length + header to this many bytes

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

// The values a .npy header may hold that grape cares about.
struct Header {
  std::optional<std::string> descr;
  std::optional<bool> fortran_order;
  std::optional<std::vector<std::int64_t>> shape;
};

// A small recursive-descent parser for the restricted Python literal numpy writes:
// {'key': value, ...} where value is a string, True/False, or a tuple of non-negative integers.
// Anything else (nested dicts, lists, floats) is refused: grape never needs it.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& path) : s_(text), path_(path) {}

  Header parse() {
    Header h;
    skip_space();
    expect('{');
    skip_space();
    while (!at('}')) {
      const std::string key = parse_string();
      skip_space();
      expect(':');
      skip_space();
      if (key == "descr") {
        if (h.descr) error("duplicate key 'descr'");
        if (!at('\'') && !at('"')) error("'descr' must be a string (structured dtypes are not supported)");
        h.descr = parse_string();
      } else if (key == "fortran_order") {
        if (h.fortran_order) error("duplicate key 'fortran_order'");
        h.fortran_order = parse_bool();
      } else if (key == "shape") {
        if (h.shape) error("duplicate key 'shape'");
        h.shape = parse_shape();
      } else {
        error("unexpected key '" + key + "'");
      }
      skip_space();
      if (at(',')) {  // a trailing comma before '}' is legal Python
        ++pos_;
        skip_space();
      } else if (!at('}')) {
        error("expected ',' or '}'");
      }
    }
    ++pos_;
    skip_space();
    if (pos_ != s_.size()) error("unexpected text after the closing '}'");
    if (!h.descr) error("missing key 'descr'");
    if (!h.fortran_order) error("missing key 'fortran_order'");
    if (!h.shape) error("missing key 'shape'");
    return h;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    fail(path_, "malformed .npy header (" + what + " at offset " + std::to_string(pos_) + ")");
  }

  bool at(char c) const { return pos_ < s_.size() && s_[pos_] == c; }

  void expect(char c) {
    if (!at(c)) error(std::string("expected '") + c + "'");
    ++pos_;
  }

  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }

  // Python string literal without escapes; numpy's descr and keys never contain any.
  std::string parse_string() {
    if (!at('\'') && !at('"')) error("expected a quoted string");
    const char quote = s_[pos_++];
    const std::size_t end = s_.find(quote, pos_);
    if (end == std::string_view::npos) error("unterminated string");
    std::string out(s_.substr(pos_, end - pos_));
    if (out.find('\\') != std::string::npos) error("escape sequences are not supported");
    pos_ = end + 1;
    return out;
  }

  bool parse_bool() {
    if (s_.substr(pos_, 4) == "True") {
      pos_ += 4;
      return true;
    }
    if (s_.substr(pos_, 5) == "False") {
      pos_ += 5;
      return false;
    }
    error("expected True or False");
  }

  std::int64_t parse_dim() {
    if (pos_ >= s_.size() || s_[pos_] < '0' || s_[pos_] > '9') error("expected a non-negative integer");
    std::uint64_t v = 0;
    while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
      const auto digit = static_cast<std::uint64_t>(s_[pos_] - '0');
      if (v > (static_cast<std::uint64_t>(INT64_MAX) - digit) / 10) error("dimension too large");
      v = v * 10 + digit;
      ++pos_;
    }
    if (at('L')) ++pos_;  // Python 2 wrote long integers as 5L
    return static_cast<std::int64_t>(v);
  }

  // (), (5,), (3, 4, 5) and (3, 4, 5,) are all valid; (5) is just an int in Python, so refused.
  std::vector<std::int64_t> parse_shape() {
    expect('(');
    std::vector<std::int64_t> dims;
    skip_space();
    bool comma_after_last = false;
    while (!at(')')) {
      dims.push_back(parse_dim());
      skip_space();
      comma_after_last = at(',');
      if (comma_after_last) {
        ++pos_;
        skip_space();
      } else if (!at(')')) {
        error("expected ',' or ')' in shape");
      }
    }
    if (dims.size() == 1 && !comma_after_last) error("a 1-tuple shape needs a trailing comma, as in (5,)");
    ++pos_;
    return dims;
  }

  std::string_view s_;
  const std::string& path_;
  std::size_t pos_ = 0;
};

// Number of elements, or nullopt when the byte count prod(shape) * 4 would not fit in 63 bits.
std::optional<std::uint64_t> checked_numel(const std::vector<std::int64_t>& shape) {
  std::uint64_t n = 1;
  for (const std::int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, static_cast<std::uint64_t>(d), &n)) return std::nullopt;
  }
  std::uint64_t bytes = 0;
  if (__builtin_mul_overflow(n, std::uint64_t{4}, &bytes) || bytes > static_cast<std::uint64_t>(INT64_MAX))
    return std::nullopt;
  return n;
}

std::string shape_literal(const std::vector<std::int64_t>& sizes) {
  std::string out = "(";
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  if (sizes.size() == 1) out += ",";  // Python 1-tuple
  return out + ")";
}

}  // namespace

NpyFile parse_npy(std::string_view file, const std::string& path) {
  if (file.size() < kMagic.size() + 2 || file.substr(0, kMagic.size()) != kMagic)
    fail(path, "not a .npy file (bad magic; expected \\x93NUMPY)");
  const auto major = static_cast<unsigned char>(file[6]);
  const auto minor = static_cast<unsigned char>(file[7]);
  if (major < 1 || major > 3)
    fail(path, "unsupported .npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                   " (grape reads 1.x, 2.x and 3.x)");

  // Version 1.x has a 2-byte header length; 2.x and 3.x (3.0 only changes the encoding to UTF-8) use 4.
  const std::size_t len_bytes = major == 1 ? 2 : 4;
  const std::size_t header_start = 8 + len_bytes;
  if (file.size() < header_start) fail(path, "truncated .npy file (header length missing)");
  std::uint64_t header_len = 0;
  for (std::size_t i = 0; i < len_bytes; ++i)
    header_len |= static_cast<std::uint64_t>(static_cast<unsigned char>(file[8 + i])) << (8 * i);
  if (header_len > file.size() - header_start)
    fail(path, "truncated .npy file (header says " + std::to_string(header_len) + " bytes, only " +
                   std::to_string(file.size() - header_start) + " follow)");

  const std::string_view header_text = file.substr(header_start, header_len);
  const Header h = HeaderParser(header_text, path).parse();

  if (*h.descr != "<f4" && *h.descr != "<f8")
    fail(path, "unsupported dtype '" + *h.descr +
                   "' (grape reads little-endian float32 '<f4', and float64 '<f8' converted to float32)");
  const int item_bytes = *h.descr == "<f8" ? 8 : 4;
  if (*h.fortran_order) fail(path, "unsupported fortran_order True (grape reads C-order arrays only)");

  const std::optional<std::uint64_t> numel = checked_numel(*h.shape);
  if (!numel) fail(path, "shape " + shape_literal(*h.shape) + " is too large");
  const std::uint64_t expected = *numel * std::uint64_t(item_bytes);
  const std::uint64_t actual = file.size() - header_start - header_len;
  if (actual < expected)
    fail(path, "truncated data: expected " + std::to_string(expected) + " bytes for shape " +
                   shape_literal(*h.shape) + ", found " + std::to_string(actual));
  if (actual > expected)
    fail(path, "unexpected trailing data: expected " + std::to_string(expected) + " bytes for shape " +
                   shape_literal(*h.shape) + ", found " + std::to_string(actual));
  return {*h.shape, file.substr(header_start + header_len), item_bytes};
}

std::string encode_npy(const F32Array& array, const std::string& path) {
  // Same text numpy writes: keys in sorted order, a trailing ", " before '}'.
  std::string header =
      "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape_literal(array.shape) + ", }";
  // Pad with spaces and a final '\n' so that data starts on a 64-byte boundary (numpy's padlen formula:
  // always at least one space, a full 64 when already aligned).
  const std::size_t prefix = kMagic.size() + 2 + 2;
  const std::size_t unpadded = prefix + header.size() + 1;
  header.append(kAlign - unpadded % kAlign, ' ');
  header += '\n';
  if (header.size() > 0xFFFF) fail(path, "too many dimensions for a version 1.0 .npy header");

  const std::size_t nbytes = array.nbytes();
  std::string bytes;
  bytes.reserve(prefix + header.size() + nbytes);
  bytes += kMagic;
  bytes += '\x01';  // version 1.0
  bytes += '\x00';
  bytes += static_cast<char>(header.size() & 0xFF);
  bytes += static_cast<char>(header.size() >> 8);
  bytes += header;
  const std::size_t data_start = bytes.size();
  if (nbytes > 0) {
    bytes.append(reinterpret_cast<const char*>(array.data), nbytes);
    detail::to_or_from_little_endian(bytes.data() + data_start, nbytes);
  }
  return bytes;
}

}  // namespace grape::io
