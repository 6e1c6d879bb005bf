// Atomic whole-file writes (temp file + fsync + rename) and whole-file reads (no LibTorch).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
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

std::string read_file(const std::string& path) {
  FileCloser file{std::fopen(path.c_str(), "rb")};
  if (file.f == nullptr) {
    const int err = errno;
    throw std::runtime_error("cannot open '" + path + "': " + errno_text(err));
  }
  std::string out;
  struct stat st {};
  if (::fstat(::fileno(file.f), &st) == 0 && S_ISREG(st.st_mode))
    out.reserve(static_cast<std::size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const std::size_t n = std::fread(buf, 1, sizeof buf, file.f);
    out.append(buf, n);
    if (n < sizeof buf) break;
  }
  // fopen() succeeds on a directory on Linux; the read then fails with EISDIR.
  if (std::ferror(file.f)) {
    const int err = errno;
    throw std::runtime_error("cannot open '" + path + "': " + errno_text(err));
  }
  return out;
}

}  // namespace grape::io
