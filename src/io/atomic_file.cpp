// Atomic whole-file writes (temp file + fsync + rename) and whole-file reads (no LibTorch).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>

#include "grape/formats.hpp"

namespace grape::io {

namespace {

std::string errno_text(int err) { return std::strerror(err); }

// Closes a FILE* on scope exit unless released; keeps the error paths below simple.
struct FileCloser {
  std::FILE* f = nullptr;
  ~FileCloser() {
    if (f != nullptr) std::fclose(f);
  }
};

// Closes a file descriptor on scope exit.
struct FdCloser {
  int fd = -1;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

// What a non-regular file is, for error messages ("a FIFO").
std::string file_type_name(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a symbolic link";
  return "a special file";
}

// "123 bytes", "64 MiB": the sizes error messages quote.
std::string byte_count(std::uint64_t n) {
  if (n >= (std::uint64_t{1} << 20) && n % (std::uint64_t{1} << 20) == 0)
    return std::to_string(n >> 20) + " MiB";
  return std::to_string(n) + " bytes";
}

// Best effort: make the rename itself durable. A failure here cannot un-write the file, so it is ignored.
void fsync_directory(const std::filesystem::path& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

}  // namespace

void write_file_atomic(const std::string& path, const std::string& bytes) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const std::string name = target.filename().string();
  if (name.empty() || name == "." || name == "..")
    throw std::runtime_error("cannot write '" + path + "': not a file name");

  // Only a regular file may be replaced: renaming over a FIFO, symlink or device node would silently turn
  // it into a regular file (run as root, --out /dev/full replaced the device).
  struct stat st {};
  if (::lstat(target.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
    throw std::runtime_error("cannot write '" + path + "': it is " + file_type_name(st.st_mode) +
                             ", not a regular file; refusing to replace it");

  // The temporary lives in the same directory so that rename() stays within one file system
  // and is atomic. pid + a process-wide counter keep concurrent writers from colliding.
  static std::atomic<unsigned long> counter{0};
  const fs::path dir = target.parent_path();
  const std::string tmp_name =
      "." + name + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
  const fs::path tmp = dir / tmp_name;

  // "x": fail rather than clobber if a stale file with this exact name exists.
  FileCloser file{std::fopen(tmp.c_str(), "wbx")};
  if (file.f == nullptr) {
    const int err = errno;
    throw std::runtime_error("cannot write '" + path + "': cannot create temporary '" + tmp.string() +
                             "': " + errno_text(err));
  }

  auto fail = [&](const std::string& what, int err) {
    if (file.f != nullptr) {
      std::fclose(file.f);
      file.f = nullptr;
    }
    std::remove(tmp.c_str());
    throw std::runtime_error("cannot write '" + path + "': " + what + ": " + errno_text(err));
  };

  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), file.f) != bytes.size())
    fail("write failed", errno);
  if (std::fflush(file.f) != 0) fail("flush failed", errno);
  // fsync before rename: otherwise a crash could leave the new name pointing at empty data.
  if (::fsync(::fileno(file.f)) != 0) fail("fsync failed", errno);
  std::FILE* f = file.f;
  file.f = nullptr;
  if (std::fclose(f) != 0) fail("close failed", errno);
  if (std::rename(tmp.c_str(), target.c_str()) != 0) fail("rename failed", errno);

  fsync_directory(dir);
}

std::uint64_t max_data_bytes() {
  constexpr std::uint64_t kDefault = std::uint64_t{16} << 30;
  const char* env = std::getenv("GRAPE_MAX_FILE_MB");
  if (env == nullptr || *env == '\0') return kDefault;
  char* end = nullptr;
  errno = 0;
  const unsigned long long mb = std::strtoull(env, &end, 10);
  if (*end != '\0' || mb == 0 || errno != 0 || mb > (std::uint64_t{1} << 40) || env[0] == '-')
    throw std::runtime_error(std::string("GRAPE_MAX_FILE_MB='") + env +
                             "' is not a positive whole number of MiB");
  return mb << 20;
}

std::string read_file(const std::string& path, std::uint64_t max_bytes) {
  if (max_bytes == 0) max_bytes = max_data_bytes();
  // O_NONBLOCK: opening a FIFO with no writer must not wait for one; fstat then refuses it.
  FdCloser file{::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  if (file.fd < 0) {
    const int err = errno;
    throw std::runtime_error("cannot open '" + path + "': " + errno_text(err));
  }
  struct stat st {};
  if (::fstat(file.fd, &st) != 0) {
    const int err = errno;
    throw std::runtime_error("cannot open '" + path + "': " + errno_text(err));
  }
  if (!S_ISREG(st.st_mode))
    throw std::runtime_error("cannot open '" + path + "': it is " + file_type_name(st.st_mode) +
                             ", not a regular file");
  auto too_large = [&](std::uint64_t size) {
    return std::runtime_error("cannot read '" + path + "': " + byte_count(size) + ", more than the " +
                              byte_count(max_bytes) + " such a file may hold" +
                              (max_bytes == max_data_bytes() ? " (GRAPE_MAX_FILE_MB raises the cap)" : ""));
  };
  if (static_cast<std::uint64_t>(st.st_size) > max_bytes)
    throw too_large(static_cast<std::uint64_t>(st.st_size));
  std::string out;
  out.reserve(static_cast<std::size_t>(st.st_size));
  // Read to EOF rather than st_size bytes: /proc files say 0 bytes; the cap still holds if a file grows.
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(file.fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      throw std::runtime_error("cannot read '" + path + "': " + errno_text(err));
    }
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
    if (out.size() > max_bytes) throw too_large(out.size());
  }
  return out;
}

}  // namespace grape::io
