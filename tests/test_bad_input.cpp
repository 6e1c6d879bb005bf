// Bad input to the library: an exception whose message names the problem, never a crash or garbage.
#include <gtest/gtest.h>

#include "grape/pe.hpp"

namespace {

using grape::HeadShape;
using grape::PeOptions;

template <class F>
void expect_message(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one mentioning '" << needle << "'";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message was: " << e.what();
  }
}

const HeadShape kShape{2, 8, 16};

TEST(BadInput, OddHeadDimForEveryRotation) {
  for (auto name : {"rope", "xpos", "grape-m", "grape-m-planes", "grape-m-mix", "grape-m-ctx"})
    expect_message([&] { grape::make_encoding(name, {2, 7, 16}); }, "head_dim must be even");
}

TEST(BadInput, UnknownEncodingAndParameterNames) {
  expect_message([] { grape::make_encoding("ropee", kShape); },
                 "unknown encoding 'ropee' (did you mean 'rope'? known: learned, nope, sinusoidal,");
  expect_message(
      [] {
        grape::make_encoding("rope", kShape, PeOptions{{"bsae", "10"}});
      },
      "unknown parameter 'bsae' for encoding 'rope' (did you mean 'base'? known: base, fraction, p, pairing, "
      "orientation, extend, "
      "factor,");
  expect_message([] { grape::make_encoding("alibi", kShape, PeOptions{{"x", "1"}}); }, "(known: none)");
  expect_message([] { PeOptions::parse({"base"}); }, "must look like key=value");
}

TEST(BadInput, OptionValuesOutOfRange) {
  expect_message(
      [] {
        grape::make_encoding("rope", kShape, PeOptions{{"fraction", "0.3"}});
      },
      "fraction*head_dim = 2.4 must be a positive even integer");
  expect_message(
      [] {
        grape::make_encoding("rope", kShape, PeOptions{{"p", "1.5"}});
      },
      "p must be in [0, 1]");
  expect_message(
      [] {
        grape::make_encoding("rope", kShape, PeOptions{{"pairing", "odd"}});
      },
      "option pairing: 'odd' is not one of half|interleaved");
  expect_message(
      [] {
        grape::make_encoding("rope", kShape, PeOptions{{"base", "nan"}});
      },
      "not a finite number");
  expect_message(
      [] {
        grape::make_encoding("grape-m-mix", kShape, PeOptions{{"rank", "3"}});
      },
      "rank must be even and in [2, D=8]");
  expect_message(
      [] {
        grape::make_encoding("grape-m", kShape, PeOptions{{"per_head", "maybe"}});
      },
      "'maybe' is not a boolean");
  expect_message(
      [] {
        grape::make_encoding("grape-ap", kShape, PeOptions{{"probe_dim", "5"}});
      },
      "probe_dim must be even");
  expect_message(
      [] {
        grape::make_encoding("xpos", kShape, PeOptions{{"gamma", "0"}});
      },
      "gamma must be > 0");
  expect_message(
      [] {
        grape::make_encoding("learned", kShape, PeOptions{{"max_len", "1.5"}});
      },
      "'1.5' is not an integer");
}

TEST(BadInput, ShapesDtypesAndNonFiniteValues) {
  auto e = grape::make_encoding("fox", kShape);
  auto q = torch::randn({1, 4, 2, 8}), x = torch::randn({1, 4, 16});
  auto st = e->initial_state(1);
  expect_message(
      [&] {
        e->encode(q, torch::randn({1, 5, 2, 8}), x, st);
      },
      "q and k shapes differ: [1,4,2,8] vs [1,5,2,8]");
  expect_message(
      [&] {
        e->encode(torch::randn({1, 4, 3, 8}), torch::randn({1, 4, 3, 8}), x, st);
      },
      "q must be [B,T,H=2,D=8], got [1,4,3,8]");
  expect_message([&] { e->encode(q, q.to(torch::kFloat64), x, st); }, "q and k dtypes differ");
  expect_message([&] { e->encode(q.to(torch::kFloat64), q.to(torch::kFloat64), x.to(torch::kFloat64), st); },
                 "inputs are Double but the encoding's parameters are Float");
  expect_message([&] { e->encode(q, q, {}, st); }, "contextual and needs the layer input x");
  expect_message(
      [&] {
        e->encode(q, q, torch::randn({1, 4, 15}), st);
      },
      "x must be [B=1,T=4,C=16], got [1,4,15]");
  auto nan = q.clone();
  nan[0][2][1][3] = std::numeric_limits<float>::quiet_NaN();
  expect_message([&] { e->encode(nan, q, x, st); }, "q contains NaN or Inf");
  auto inf = x.clone();
  inf[0][1][0] = std::numeric_limits<float>::infinity();
  expect_message([&] { e->encode(q, q, inf, st); }, "x contains NaN or Inf");
  expect_message([&] { e->encode(q.to(torch::kInt64), q.to(torch::kInt64), x, st); },
                 "must be floating point");
  EXPECT_EQ(st.next_pos, 0) << "a refused chunk does not advance the state";
  auto st2 = e->initial_state(2);
  expect_message([&] { e->encode(q, q, x, st2); }, "fox: state is for batch 2, input has batch 1");
}

TEST(BadInput, LearnedTableAndOffsets) {
  auto e = grape::make_encoding("learned", kShape, PeOptions{{"max_len", "8"}});
  expect_message(
      [&] {
        e->embed(torch::zeros({1, 9, 16}), 0);
      },
      "positions 0..8 exceed the table of max_len=8 rows");
  expect_message([&] { e->embed(torch::zeros({1, 2, 16}), 7); }, "positions 7..8 exceed");
  expect_message([&] { e->embed(torch::zeros({1, 2, 15}), 0); }, "embeddings must be [B,T,C=16]");
  expect_message([&] { e->initial_state(1, -1); }, "offset must be >= 0");
}

TEST(BadInput, KeyCacheRefusesAGap) {
  auto e = grape::make_encoding("rope", kShape);
  auto q = torch::randn({1, 3, 2, 8});
  auto st = e->initial_state(1);
  grape::KeyCache cache;
  cache.append(e->encode(q, q, {}, st));
  st.next_pos += 2;  // skip two positions
  auto chunk = e->encode(q, q, {}, st);
  expect_message([&] { cache.append(chunk); }, "chunk starts at position 5 but the cache ends at 3");
}

}  // namespace
