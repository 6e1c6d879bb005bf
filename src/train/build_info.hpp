// Internal: what the build recorded (the generated build_info.cpp, written by cmake/build_info.cmake).
#pragma once

namespace grape::train::detail {
extern const char* const kGitCommit;  // "0123456789ab", "...-dirty" or "unknown"
extern const char* const kVersion;    // the project version of CMakeLists.txt
}  // namespace grape::train::detail
