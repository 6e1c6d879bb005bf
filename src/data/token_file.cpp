// Token arrays on disk: llm.c shards (header + uint16/uint32) and nanoGPT .bin (bare uint16), memory-mapped.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "grape/data.hpp"
#include "grape/io.hpp"

namespace grape::data {

namespace {

constexpr int32_t kShardMagic = 20240520;
constexpr int64_t kHeaderInts = 256;
constexpr int64_t kHeaderBytes = kHeaderInts * 4;

// Reads an unsigned little-endian integer of `width` bytes (2 or 4) whatever the host's byte order.
uint32_t load_le(const unsigned char* p, int width) {
  uint32_t v = 0;
  for (int i = width - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void store_le(std::string& out, uint32_t v, int width) {
  for (int i = 0; i < width; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
}

}  // namespace

TokenFile::TokenFile(const std::string& path) : path_(path) {
  // O_NONBLOCK: a FIFO with no writer is refused below, not waited on.
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(fmt::format("cannot open '{}': {}", path, std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw std::runtime_error(fmt::format("cannot read '{}': not a regular file", path));
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ == 0) {
    ::close(fd);
    throw std::runtime_error(fmt::format("'{}': empty token file", path));
  }
  // MAP_PRIVATE + PROT_READ: pages come from the page cache on demand; the mapping outlives the fd.
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw std::runtime_error(fmt::format("cannot map '{}': {}", path, std::strerror(err)));
  }
  const auto* bytes = static_cast<const unsigned char*>(map_);
  const int64_t size = static_cast<int64_t>(map_size_);

  // Any failure below must unmap: the destructor does not run for a throwing constructor.
  auto fail = [&](const std::string& msg) {
    ::munmap(map_, map_size_);
    map_ = nullptr;
    throw std::runtime_error(fmt::format("'{}': {}", path, msg));
  };
  if (size >= 4 && static_cast<int32_t>(load_le(bytes, 4)) == kShardMagic) {
    if (size < kHeaderBytes)
      fail(fmt::format("llm.c shard header is truncated ({} bytes, the header alone is {})", size,
                       kHeaderBytes));
    const uint32_t version = load_le(bytes + 4, 4);
    if (version != 1 && version != 2)
      fail(fmt::format("unsupported llm.c shard version {} (1: uint16 tokens, 2: uint32 tokens)", version));
    width_ = version == 1 ? 2 : 4;
    count_ = load_le(bytes + 8, 4);
    const int64_t want = kHeaderBytes + count_ * width_;
    if (want != size)
      fail(
          fmt::format("llm.c header says {} tokens ({} bytes with the header) but the file has {} bytes ({})",
                      count_, want, size, size < want ? "truncated" : "extra bytes after the tokens"));
    data_ = bytes + kHeaderBytes;
  } else {
    if (size % 2 != 0)
      fail(fmt::format("{} bytes is not a whole number of uint16 tokens (a nanoGPT .bin has an even size)",
                       size));
    width_ = 2;
    count_ = size / 2;
    data_ = bytes;
  }
}

TokenFile::~TokenFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

TokenFile::TokenFile(TokenFile&& o) noexcept { *this = std::move(o); }

TokenFile& TokenFile::operator=(TokenFile&& o) noexcept {
  if (this != &o) {
    std::swap(path_, o.path_);
    std::swap(data_, o.data_);
    std::swap(map_, o.map_);
    std::swap(map_size_, o.map_size_);
    std::swap(count_, o.count_);
    std::swap(width_, o.width_);
  }
  return *this;
}

std::string TokenFile::format() const {
  if (data_ == map_) return "nanoGPT uint16";
  return width_ == 2 ? "llm.c v1" : "llm.c v2";
}

int64_t TokenFile::at(int64_t i) const {
  if (i < 0 || i >= count_)
    throw std::out_of_range(fmt::format("'{}': token index {} is outside 0..{}", path_, i, count_ - 1));
  return load_le(data_ + i * width_, width_);
}

int64_t TokenFile::max_id() const {
  uint32_t best = 0;
  if (width_ == 2) {
    for (int64_t i = 0; i < count_; ++i) best = std::max<uint32_t>(best, load_le(data_ + i * 2, 2));
  } else {
    for (int64_t i = 0; i < count_; ++i) best = std::max(best, load_le(data_ + i * 4, 4));
  }
  return best;
}

void TokenFile::copy(int64_t start, int64_t n, int64_t* out, int64_t vocab) const {
  if (start < 0 || n < 0 || start + n > count_)
    throw std::out_of_range(fmt::format("'{}': tokens [{}, {}) are outside the file's {} tokens", path_,
                                        start, start + n, count_));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = load_le(data_ + (start + i) * width_, width_);
    if (id >= vocab)
      throw std::runtime_error(
          fmt::format("'{}': token ID {} at index {} is >= vocab size {} (wrong tokenizer?)", path_, id,
                      start + i, vocab));
    out[i] = id;
  }
}

void write_token_shard(const std::string& path, const std::vector<int32_t>& tokens) {
  if (tokens.size() > static_cast<size_t>(INT32_MAX))
    throw std::invalid_argument(fmt::format("'{}': {} tokens do not fit an llm.c shard (at most {})", path,
                                            tokens.size(), INT32_MAX));
  int version = 1;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0)
      throw std::invalid_argument(
          fmt::format("'{}': token ID {} at index {} is negative", path, tokens[i], i));
    if (tokens[i] >= 65536) version = 2;
  }
  const int width = version == 1 ? 2 : 4;
  std::string bytes;
  bytes.reserve(kHeaderBytes + tokens.size() * width);
  store_le(bytes, kShardMagic, 4);
  store_le(bytes, version, 4);
  store_le(bytes, static_cast<uint32_t>(tokens.size()), 4);
  bytes.resize(kHeaderBytes, '\0');
  for (int32_t t : tokens) store_le(bytes, static_cast<uint32_t>(t), width);
  io::write_file_atomic(path, bytes);
}

}  // namespace grape::data
