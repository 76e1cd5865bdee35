// Unit tests of the torch-free core (csrc/core), run by ctest.  Each core
// routine is checked against a direct transcription of its definition.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/core/gae.h"
#include "../../csrc/core/group_advantages.h"
#include "../../csrc/core/masked.h"

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const char* what, int64_t i) {
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s[%lld]: got %.17g want %.17g\n", what, static_cast<long long>(i), got, want);
    ++failures;
  }
}

// A_t = sum_k (gamma*lam)^k delta_{t+k} over the valid steps of an unmasked row.
void test_gae_matches_definition() {
  std::mt19937 rng(7);
  std::normal_distribution<double> normal;
  for (int64_t T : {1, 2, 17, 300}) {
    std::vector<double> r(T), v(T), adv(T), ret(T);
    for (auto& x : r) x = normal(rng);
    for (auto& x : v) x = normal(rng);
    const double gamma = 0.97, lam = 0.9, last = normal(rng);
    rlk::gae_row<double, double>(r.data(), v.data(), nullptr, nullptr, last, T, gamma, lam, adv.data(), ret.data());
    for (int64_t t = 0; t < T; ++t) {
      double want = 0, w = 1;
      for (int64_t k = t; k < T; ++k) {
        const double next = k + 1 < T ? v[k + 1] : last;
        want += w * (r[k] + gamma * next - v[k]);
        w *= gamma * lam;
      }
      expect_near(adv[t], want, 1e-12, "gae", t);
      expect_near(ret[t], want + v[t], 1e-12, "gae returns", t);
    }
  }
}

// Masked slots hold NaN: they must not reach any output, and a masked slot
// repeats the advantage of the next valid one.
void test_gae_mask_selects() {
  const int64_t T = 6;
  const double nan = std::nan("");
  std::vector<float> r = {1, nan, 2, 3, nan, 4}, v = {0.5f, nan, 0.25f, 1, nan, 2};
  std::vector<uint8_t> mask = {1, 0, 1, 1, 0, 1};
  std::vector<float> adv(T), ret(T);
  rlk::gae_row<float, float>(r.data(), v.data(), mask.data(), nullptr, 0.f, T, 1.f, 1.f, adv.data(), ret.data());
  // Valid steps 0,2,3,5 form the chain 1,2,3,4 with values .5,.25,1,2 (gamma=lam=1):
  // A = sum of rewards ahead minus own value.
  const double want[] = {10 - 0.5, 9 - 0.25, 9 - 0.25, 7 - 1, 4 - 2, 4 - 2};
  for (int64_t t = 0; t < T; ++t) expect_near(adv[t], want[t], 1e-6, "masked gae", t);
}

void test_dones_cut_the_episode() {
  std::vector<double> r = {1, 1, 1, 1}, v = {0, 0, 0, 0}, out(4);
  std::vector<uint8_t> dones = {0, 1, 0, 0};
  rlk::discounted_returns_row<double, double>(r.data(), nullptr, dones.data(), 4, 0.5, out.data());
  const double want[] = {1.5, 1, 1.5, 1};
  for (int i = 0; i < 4; ++i) expect_near(out[i], want[i], 1e-15, "returns with dones", i);
}

void test_group_advantage_formulas() {
  // Group {1, 2, 4}: mean 7/3, unbiased std sqrt(7/3).
  const double mean = 7.0 / 3.0, std = std::sqrt(7.0 / 3.0);
  expect_near(rlk::group_advantage<double>(1.0, mean, std, 0.0, 3, rlk::kBaselineMean, rlk::kScaleGroup, 0.0),
              (1.0 - mean) / std, 1e-14, "grpo", 0);
  expect_near(rlk::group_advantage<double>(1.0, mean, std, 0.0, 3, rlk::kBaselineLeaveOneOut, rlk::kScaleNone, 0.0),
              1.0 - (2.0 + 4.0) / 2.0, 1e-14, "rloo", 0);
  expect_near(rlk::group_advantage<double>(5.0, 5.0, 0.0, 0.0, 1, rlk::kBaselineMean, rlk::kScaleGroup, 1e-6),
              0.0, 0.0, "group of one", 0);
  expect_near(rlk::unbiased_std<double>(14.0 / 3.0, 3), std, 1e-14, "unbiased std", 0);
}

void test_masked_skip_nan() {
  const float nan = std::nanf("");
  std::vector<float> x = {1, nan, 3, nan, 5};
  std::vector<uint8_t> mask = {1, 0, 1, 0, 1};
  const auto sums = rlk::masked_sums<float, float>(x.data(), mask.data(), 5);
  expect_near(sums.sum, 9.0, 0.0, "masked sum", 0);
  expect_near(double(sums.count), 3.0, 0.0, "masked count", 0);
  const float sq = rlk::masked_sq_dev<float, float>(x.data(), mask.data(), 5, 3.0f);
  expect_near(sq, 8.0, 0.0, "masked squared deviations", 0);
  const auto c = rlk::whiten_coefficients<float>(3.0f, sq, 3, true, 0.0f);
  expect_near(rlk::whiten_value<float>(5.0f, true, c), 1.0, 1e-6, "whitened", 0);
  expect_near(rlk::whiten_value<float>(nan, false, c), 0.0, 0.0, "masked whitened", 0);
}

}  // namespace

int main() {
  test_group_advantage_formulas();
  test_masked_skip_nan();
  test_gae_matches_definition();
  test_gae_mask_selects();
  test_dones_cut_the_episode();
  if (failures) {
    std::printf("%d core check(s) failed\n", failures);
    return 1;
  }
  std::printf("core: all checks passed\n");
  return 0;
}
