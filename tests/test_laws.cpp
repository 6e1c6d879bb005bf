// Every law `grape check` reports, as one test per encoding: each row must pass within its tolerance.
#include <gtest/gtest.h>

#include "grape/check.hpp"
#include "grape/pe.hpp"

namespace {

class Laws : public ::testing::TestWithParam<std::string> {};

TEST_P(Laws, AllApplicableLawsHold) {
  auto rows = grape::check::run_laws(GetParam());
  ASSERT_GE(rows.size(), 4u) << "causality, streaming, gradient and at least one more law";
  for (const auto& r : rows) EXPECT_LE(r.error, r.tolerance) << r.encoding << ": " << r.law;
}

std::vector<std::string> all_names() {
  std::vector<std::string> v;
  for (const auto& e : grape::encodings()) v.push_back(e.name);
  return v;
}

INSTANTIATE_TEST_SUITE_P(Encodings, Laws, ::testing::ValuesIn(all_names()), [](const auto& info) {
  std::string s = info.param;
  for (auto& c : s)
    if (c == '-') c = '_';
  return s;
});

}  // namespace
