// Shared by the tests of option and input validation: a call must throw std::invalid_argument whose
// message contains every one of the given parts.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

namespace grape::testing {

inline void expect_invalid(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning " << parts.front();
  } catch (const std::invalid_argument& e) {
    for (const auto& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos)
          << "message: " << e.what() << "\nmissing: " << p;
  }
}
// A braced list of parts picks this one (a list converts to std::initializer_list before anything else)...
inline void expect_invalid(const std::function<void()>& fn, std::initializer_list<std::string> parts) {
  expect_invalid(fn, std::vector<std::string>(parts));
}
// ... and a single part this one.
inline void expect_invalid(const std::function<void()>& fn, const std::string& part) {
  expect_invalid(fn, std::vector<std::string>{part});
}

}  // namespace grape::testing
