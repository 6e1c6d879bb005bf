// Entry point of the tests without LibTorch: one OpenMP thread per test process (ctest runs processes in
// parallel), as tests/test_main.cpp sets through LibTorch for the others.
#include <gtest/gtest.h>
#include <omp.h>

int main(int argc, char** argv) {
  omp_set_num_threads(1);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
