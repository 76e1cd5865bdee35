// The integer checks of the C++ unit tests run by ctest (test_work_split_core.cpp,
// test_lm_head_core.cpp): expect() prints a failed check with its two values and counts
// it; finish() prints the verdict and gives main's exit status.
#pragma once

#include <cstdint>
#include <cstdio>

namespace rlk_test {

inline int failures = 0;

inline void expect(bool ok, const char* what, int64_t a, int64_t b) {
  if (!ok) {
    std::printf("FAIL %s (%lld, %lld)\n", what, static_cast<long long>(a), static_cast<long long>(b));
    ++failures;
  }
}

inline int finish(const char* suite) {
  if (failures) {
    std::printf("%s: %d failure(s)\n", suite, failures);
    return 1;
  }
  std::printf("%s: all passed\n", suite);
  return 0;
}

}  // namespace rlk_test
