// Unit tests of the torch-free loss core (csrc/core/{vec_math,token_loss,policy_loss,
// value_loss,preference}.h), run by ctest: each routine against a direct
// transcription of its definition in double precision.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "../../csrc/core/token_loss.h"
#include "../../csrc/core/policy_loss.h"
#include "../../csrc/core/preference.h"
#include "../../csrc/core/value_loss.h"

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const char* what, int64_t i) {
  const bool both_nan = std::isnan(got) && std::isnan(want);
  const bool same_inf = std::isinf(got) && got == want;
  if (!both_nan && !same_inf && !(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s[%lld]: got %.17g want %.17g\n", what, static_cast<long long>(i), got, want);
    ++failures;
  }
}

void test_exp_f32() {
  int64_t i = 0;
  for (float x = -87.0f; x < 88.7f; x += 0.0137f, ++i) {
    const double want = std::exp(double(x));
    const double got = rlk::exp_f32(x);
    if (std::fabs(got - want) > 2.5e-7 * want) expect_near(got, want, 0.0, "exp_f32", i);
  }
  expect_near(rlk::exp_f32(100.0f), std::numeric_limits<double>::infinity(), 0, "exp_f32(100)", 0);
  expect_near(rlk::exp_f32(-std::numeric_limits<float>::infinity()), 0.0, 0, "exp_f32(-inf)", 0);
  expect_near(rlk::exp_f32(std::numeric_limits<float>::quiet_NaN()), std::nan(""), 0, "exp_f32(nan)", 0);
  expect_near(rlk::exp_f32(0.0f), 1.0, 0, "exp_f32(0)", 0);
}

// L = max(-A r, -A clip(r)); dual: min(L, -A c) for A < 0; d/dlp by central differences.
void test_policy_token() {
  std::mt19937 rng(3);
  std::normal_distribution<double> normal;
  rlk::PolicyLossParams p;
  p.clip_low = 0.2;  // ratio in [0.8, 1.28]
  p.clip_high = 0.28;
  p.dual_clip = 3.0;
  p.log_ratio_clamp = 20.0;
  p.kl_coef = 0.1;
  auto definition = [&](double lp, double old, double adv, double w, double ref) {
    double lr = std::min(std::max(lp - old, -20.0), 20.0);
    double r = std::exp(lr);
    double loss = std::max(-adv * r, -adv * std::min(std::max(r, 0.8), 1.28));
    if (adv < 0) loss = std::min(loss, -adv * 3.0);
    const double d = ref - lp;
    return w * loss + 0.1 * (std::exp(d) - d - 1);
  };
  for (int64_t i = 0; i < 2000; ++i) {
    const double lp = normal(rng), old = lp + normal(rng) * 0.8, adv = normal(rng), w = 0.5 + 0.1 * i / 2000.0;
    const double ref = lp + normal(rng) * 0.3;
    const auto tok = rlk::policy_token<3, double>(lp, old, adv, w, ref, p);
    expect_near(tok.loss, definition(lp, old, adv, w, ref), 1e-12, "policy loss", i);
    const double h = 1e-6;
    const double numeric = (definition(lp + h, old, adv, w, ref) - definition(lp - h, old, adv, w, ref)) / (2 * h);
    expect_near(tok.grad, numeric, 1e-5, "policy grad", i);
    const double r = std::exp(lp - old);
    expect_near(tok.clip_upper, adv > 0 && r > 1.28 ? 1.0 : 0.0, 0, "clip upper", i);
    expect_near(tok.clip_lower, adv < 0 && r < 0.8 ? 1.0 : 0.0, 0, "clip lower", i);
    expect_near(tok.k3, r - 1 - (lp - old), 1e-12, "k3", i);
  }
  // A constant branch has slope 0 even where the ratio overflows.
  rlk::PolicyLossParams q;
  q.clip_low = 0.2;
  q.clip_high = 0.2;
  q.dual_clip = std::numeric_limits<double>::infinity();
  q.log_ratio_clamp = std::numeric_limits<double>::infinity();
  q.kl_coef = 0.0;
  const auto tok = rlk::policy_token<0, float>(0.0f, -200.0f, 1.0f, 1.0f, 0.0f, q);
  expect_near(tok.grad, 0.0, 0, "overflowed ratio grad", 0);
  expect_near(tok.loss, -1.2, 1e-6, "overflowed ratio loss", 0);
}

void test_value_token() {
  std::mt19937 rng(5);
  std::normal_distribution<double> normal;
  auto definition = [](double v, double old, double ret) {
    const double vc = old + std::min(std::max(v - old, -0.2), 0.2);
    return 0.5 * std::max((v - ret) * (v - ret), (vc - ret) * (vc - ret));
  };
  for (int64_t i = 0; i < 2000; ++i) {
    const double v = normal(rng), old = v + normal(rng) * 0.4, ret = normal(rng);
    const auto tok = rlk::value_token<true, double>(v, old, ret, 0.2);
    expect_near(tok.loss, definition(v, old, ret), 1e-12, "value loss", i);
    const double h = 1e-7;
    expect_near(tok.grad, (definition(v + h, old, ret) - definition(v - h, old, ret)) / (2 * h), 1e-5, "value grad", i);
  }
}

void test_preference_pair() {
  const double beta = 0.3;
  int64_t i = 0;
  for (double z : {-1e4, -30.0, -1.0, -1e-3, 0.0, 0.5, 20.0, 1e4}) {
    const auto s = rlk::preference_pair<double>(rlk::PreferenceKind::sigmoid, beta, 0.1, z, 0.0, 0.0, 0.0);
    const double x = beta * z;
    const double log_sig = x < 0 ? x - std::log1p(std::exp(x)) : -std::log1p(std::exp(-x));
    const double log_sig_neg = -x < 0 ? -x - std::log1p(std::exp(-x)) : -std::log1p(std::exp(x));
    expect_near(s.loss, -0.9 * log_sig - 0.1 * log_sig_neg, 1e-12, "dpo sigmoid", i);
    const double sig = 1 / (1 + std::exp(-x));
    expect_near(s.dlogits, beta * (-0.9 * (1 - sig) + 0.1 * sig), 1e-12, "dpo sigmoid slope", i);
    const auto ipo = rlk::preference_pair<double>(rlk::PreferenceKind::ipo, beta, 0.0, z, 0.0, 0.0, 0.0);
    expect_near(ipo.loss, (z - 1 / (2 * beta)) * (z - 1 / (2 * beta)), 1e-12, "ipo", i);
    const auto hinge = rlk::preference_pair<double>(rlk::PreferenceKind::hinge, beta, 0.0, z, 0.0, 0.0, 0.0);
    expect_near(hinge.loss, std::max(0.0, 1 - x), 1e-12, "hinge", i);
    ++i;
  }
}

// dpo_sequence_loss' per-row coefficient: the pair's slope with the row's sign, over the
// row's count with average (0 for a row without valid tokens).
void test_sequence_coef() {
  expect_near(rlk::sequence_coef<double>(-0.25, 1.0, false, 0.0), -0.25, 0, "coef sum chosen", 0);
  expect_near(rlk::sequence_coef<double>(-0.25, -1.0, false, 7.0), 0.25, 0, "coef sum rejected", 1);
  expect_near(rlk::sequence_coef<double>(-0.25, 1.0, true, 4.0), -0.0625, 0, "coef mean chosen", 2);
  expect_near(rlk::sequence_coef<double>(-0.25, -1.0, true, 5.0), 0.05, 1e-15, "coef mean rejected", 3);
  expect_near(rlk::sequence_coef<double>(-0.25, -1.0, true, 0.0), 0.0, 0, "coef empty row", 4);
  expect_near(rlk::sequence_coef<float>(std::numeric_limits<float>::quiet_NaN(), 1.0f, true, 3.0f),
              std::numeric_limits<double>::quiet_NaN(), 0, "coef NaN slope", 5);
}

// Each agg mode against its formula over a ragged batch, through finalize_rows.
void test_aggregation() {
  const int K = 3;  // loss, tokens, one statistic
  const std::vector<double> row_loss = {2.0, 0.0, 5.0, -1.0}, row_tokens = {4, 0, 10, 1};
  std::vector<double> rows;
  for (size_t b = 0; b < row_loss.size(); ++b) rows.insert(rows.end(), {row_loss[b], row_tokens[b], row_tokens[b]});
  const int64_t B = 4, T = 16;
  struct Case { rlk::Agg agg; double given_tokens, given_seqs, given_norm, want; };
  const Case cases[] = {
      {rlk::Agg::token_mean, -1, -1, -1, 6.0 / 15},
      {rlk::Agg::token_mean, 30, -1, -1, 6.0 / 30},
      {rlk::Agg::token_sum, -1, -1, -1, 6.0},
      {rlk::Agg::seq_mean_token_sum, -1, -1, -1, 6.0 / 3},
      {rlk::Agg::seq_mean_token_sum, -1, 4, -1, 6.0 / 4},
      {rlk::Agg::seq_mean_token_mean, -1, -1, -1, (2.0 / 4 + 5.0 / 10 - 1.0) / 3},
      {rlk::Agg::seq_mean_token_sum_norm, -1, -1, -1, 6.0 / (3 * 16)},
      {rlk::Agg::seq_mean_token_sum_norm, -1, 8, 64, 6.0 / (8 * 64)},
  };
  int64_t i = 0;
  for (const Case& c : cases) {
    double scale[4], loss, stats[2];
    rlk::finalize_rows<double>(rows.data(), B, K, -1, c.agg, c.given_tokens, c.given_seqs, c.given_norm, T, scale,
                               &loss, stats);
    expect_near(loss, c.want, 1e-14, "agg loss", i);
    expect_near(stats[0], 1.0, 1e-14, "agg stat mean", i);
    expect_near(stats[1], 15.0, 0, "agg tokens", i);
    ++i;
  }
  double scale[1], loss, stats[2];
  const double empty[3] = {0, 0, 0};
  rlk::finalize_rows<double>(empty, 1, K, -1, rlk::Agg::token_mean, -1, -1, -1, T, scale, &loss, stats);
  expect_near(loss, 0.0, 0, "empty batch loss", 0);
  expect_near(scale[0], 0.0, 0, "empty batch scale", 0);
}

}  // namespace

int main() {
  test_exp_f32();
  test_policy_token();
  test_value_token();
  test_preference_pair();
  test_sequence_coef();
  test_aggregation();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("loss core: all tests passed\n");
  return 0;
}
