// Unit tests of the torch-free logprobs core (csrc/core/logprobs.h, csrc/core/kl_from_logits.h,
// csrc/core/kl_penalty.h) and of the portable SIMD layer (csrc/cpu/simd.h),
// each against a direct double-precision transcription of its definition.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/core/kl_from_logits.h"
#include "../../csrc/core/kl_penalty.h"
#include "../../csrc/core/logprobs.h"
#include "../../csrc/cpu/simd.h"

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const char* what, int64_t i) {
  const bool ok = (std::isnan(want) && std::isnan(got)) || (std::isinf(want) && got == want) ||
                  std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
  if (!ok) {
    std::printf("FAIL %s[%lld]: got %.9g want %.9g\n", what, static_cast<long long>(i), got, want);
    ++failures;
  }
}

struct Truth {
  double logprob, entropy;
};

Truth direct(const std::vector<float>& x, int64_t label, double temperature) {
  double m = -INFINITY;
  for (float v : x) m = std::max(m, double(v) / temperature);
  double s = 0;
  for (float v : x) s += std::exp(double(v) / temperature - m);
  const double lse = m + std::log(s);
  double h = 0;
  for (float v : x) {
    const double lp = double(v) / temperature - lse;
    if (std::exp(lp) > 0) h -= std::exp(lp) * lp;
  }
  return {double(x[label]) / temperature - lse, h};
}

// Streaming statistics, pushed one by one or merged from parts, give the
// definition's log-prob and entropy, also with -inf logits and huge ones.
void test_stats_match_definition() {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (int64_t V : {1, 2, 7, 1000}) {
    for (int kind = 0; kind < 3; ++kind) {
      if (kind == 2 && V < 2) continue;  // a row of -inf only has no distribution
      std::vector<float> x(V);
      for (auto& v : x) v = normal(rng) * (kind == 1 ? 1e4f : 3.0f);
      if (kind == 2)
        for (int64_t j = 0; j < V; j += 2) x[j] = -INFINITY;
      const int64_t label = V - 1;
      const double temperature = 0.7;
      const float scale = float(rlk::kLog2e / temperature), inv_t = float(1 / temperature);
      rlk::SoftmaxStats whole = rlk::stats_empty(), left = rlk::stats_empty(), right = rlk::stats_empty();
      for (int64_t j = 0; j < V; ++j) {
        rlk::stats_push<true>(whole, x[j], scale);
        rlk::stats_push<true>(j < V / 3 ? left : right, x[j], scale);
      }
      const rlk::SoftmaxStats merged = rlk::stats_merge<true>(right, left, scale);
      const Truth want = direct(x, label, temperature);
      for (const auto& st : {whole, merged}) {
        const float log_s = rlk::log_f(st.s);
        expect_near(rlk::logprob_of(x[label], st.m, log_s, inv_t), want.logprob, 2e-6, "logprob", V);
        expect_near(rlk::entropy_of(st), want.entropy, 2e-5, "entropy", V);
      }
    }
  }
}

void test_kl_stats_match_definition() {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (int64_t V : {1, 3, 500}) {
    std::vector<float> a(V), b(V);
    for (int64_t j = 0; j < V; ++j) {
      a[j] = normal(rng) * 2;
      b[j] = a[j] + normal(rng);
    }
    if (V > 2) a[1] = -INFINITY;
    const double T = 1.3;
    double ma = -INFINITY, mb = -INFINITY;
    for (int64_t j = 0; j < V; ++j) ma = std::max(ma, a[j] / T), mb = std::max(mb, b[j] / T);
    double sa = 0, sb = 0;
    for (int64_t j = 0; j < V; ++j) sa += std::exp(a[j] / T - ma), sb += std::exp(b[j] / T - mb);
    double want = 0;
    for (int64_t j = 0; j < V; ++j) {
      const double lp = a[j] / T - ma - std::log(sa), lq = b[j] / T - mb - std::log(sb);
      if (std::exp(lp) > 0) want += std::exp(lp) * (lp - lq);
    }
    const float scale = float(rlk::kLog2e / T), inv_t = float(1 / T);
    rlk::KlStats whole = rlk::kl_stats_empty(), left = rlk::kl_stats_empty(), right = rlk::kl_stats_empty();
    for (int64_t j = 0; j < V; ++j) {
      rlk::kl_stats_push(whole, a[j], b[j], scale, inv_t);
      rlk::kl_stats_push(j % 2 ? left : right, a[j], b[j], scale, inv_t);
    }
    float saved[5];
    expect_near(rlk::kl_finish(whole, saved), want, 1e-5, "kl", V);
    expect_near(rlk::kl_finish(rlk::kl_stats_merge(left, right, scale, inv_t), saved), want, 1e-5, "kl merged", V);
  }
}

void test_kl_penalty_kinds() {
  const double lp[] = {-1.0, 0.5, 25.0, -25.0, 3.0};
  const double ref[] = {-1.5, 0.5, 0.0, 0.0, -9.0};
  for (int i = 0; i < 5; ++i) {
    const double r = lp[i] - ref[i];
    const double c = std::min(20.0, std::max(-20.0, -r));
    const double k3 = std::min(10.0, std::exp(c) - c - 1);
    const bool k3_live = std::fabs(r) <= 20 && std::exp(c) - c - 1 <= 10;
    const double want[][2] = {{r, 1}, {r * r / 2, r}, {k3, k3_live ? 1 - std::exp(c) : 0},
                              {std::fabs(r), double((r > 0) - (r < 0))}, {r, r}, {k3, r}};
    for (int kind = 0; kind < 6; ++kind) {
      double v, d;
      rlk::kl_penalty_element<double>(lp[i], ref[i], kind, kind == 2 || kind == 5 ? 10.0 : INFINITY, &v, &d);
      expect_near(v, want[kind][0], 1e-14, "kl_penalty value", kind * 10 + i);
      expect_near(d, want[kind][1], 1e-14, "kl_penalty slope", kind * 10 + i);
    }
  }
  expect_near(rlk::kl_kind_code("low_var_kl"), rlk::kKlK3, 0, "kind code", 0);
  expect_near(rlk::kl_kind_code("full"), -1, 0, "kind code", 1);
}

// The vector exp2 and the 16-bit conversions, for every width the CPU kernels use.
struct SimdCheck {
  template <int W>
  static void run(int* bad) {
    using namespace rlk::simd;
    for (float y = -130.0f; y <= 0.0f; y += 0.013f) {
      float in[W], out[W];
      for (int l = 0; l < W; ++l) in[l] = y - 0.001f * l;
      store<W>(out, exp2<W>(load<W>(in)));
      for (int l = 0; l < W; ++l) {
        const double want = in[l] < -125.0f ? 0.0 : std::exp2(double(in[l]));
        if (std::fabs(out[l] - want) > 3e-7 * want) ++*bad;
      }
    }
    std::mt19937 rng(11);
    std::uniform_int_distribution<uint32_t> bits;
    for (int k = 0; k < 20000; ++k) {
      float in[W];
      for (int l = 0; l < W; ++l) {
        in[l] = rlk::simd::bit_cast<float>(bits(rng));
        if (k % 3 == 0) in[l] = std::ldexp(in[l] - std::trunc(in[l]), (k % 60) - 30);  // ordinary magnitudes
      }
      bf16 hb[W];
      fp16 hh[W];
      store<W>(hb, load<W>(in));
      store<W>(hh, load<W>(in));
      float back_b[W], back_h[W];
      store<W>(back_b, load<W>(hb));
      store<W>(back_h, load<W>(hh));
      for (int l = 0; l < W; ++l) {
        // vector and scalar paths agree bit for bit, and round trips are exact
        const bf16 sb = from_float<bf16>(in[l]);
        const fp16 sh = from_float<fp16>(in[l]);
        if (sb.bits != hb[l].bits || sh.bits != hh[l].bits) ++*bad;
        if (rlk::simd::bit_cast<uint32_t>(to_float(sb)) != rlk::simd::bit_cast<uint32_t>(back_b[l])) ++*bad;
        if (rlk::simd::bit_cast<uint32_t>(to_float(sh)) != rlk::simd::bit_cast<uint32_t>(back_h[l])) ++*bad;
        // rounding: to nearest, so within half a unit of the last place (finite, in range)
        const float f = in[l];
        if (std::isfinite(f) && std::fabs(f) < 65504.0f && std::fabs(f) > 6.2e-5f &&
            std::fabs(back_h[l] - f) > std::ldexp(std::fabs(f), -11))
          ++*bad;
        if (std::isfinite(f) && std::fabs(f) < 1e38f && std::fabs(f) > 1e-37f &&
            std::fabs(back_b[l] - f) > std::ldexp(std::fabs(f), -8))
          ++*bad;
        if (std::isnan(f) && !(std::isnan(back_b[l]) && std::isnan(back_h[l]))) ++*bad;
      }
    }
  }
};

void test_simd() {
  int bad = 0;
  rlk::simd::run_simd<SimdCheck>(&bad);  // the widest this CPU has
  SimdCheck::run<4>(&bad);               // the baseline width
  if (bad) {
    std::printf("FAIL simd: %d mismatches\n", bad);
    ++failures;
  }
}

// A label no vocabulary tile can hold: negative always; past the end only at the last
// tile, since a label beyond this tile may sit in a later one.
void test_tile_label_lost() {
  struct Case {
    int64_t label, vocab_end;
    bool finish, lost;
  } cases[] = {{0, 4, false, false},  {3, 4, true, false}, {4, 4, false, false}, {4, 4, true, true},
               {-1, 4, false, true},  {-1, 4, true, true}, {INT64_MAX, 4, true, true}, {INT64_MIN, 4, false, true}};
  for (const Case& c : cases) {
    if (rlk::tile_label_lost(c.label, c.vocab_end, c.finish) != c.lost) {
      std::printf("FAIL tile_label_lost(%lld, %lld, %d)\n", static_cast<long long>(c.label),
                  static_cast<long long>(c.vocab_end), int(c.finish));
      ++failures;
    }
  }
}

}  // namespace

int main() {
  test_tile_label_lost();
  test_stats_match_definition();
  test_kl_stats_match_definition();
  test_kl_penalty_kinds();
  test_simd();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("logprobs core OK\n");
  return 0;
}
