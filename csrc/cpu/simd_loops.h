// Building blocks of the CPU kernels that stream [B, T] token tensors: chunked
// rows, staging into the accumulation type, lane-parallel reductions the
// compiler vectorises, software prefetch and per-ISA clones.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../core/common.h"
#include "../core/vec_math.h"

// Portable by default; on x86-64 with GCC the arithmetic loops also get
// AVX2+FMA and AVX-512 clones picked at load time by the CPU's features.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define RLK_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define RLK_CPU_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define RLK_PREFETCH(p) __builtin_prefetch(p)
#else
#define RLK_PREFETCH(p) ((void)0)
#endif

namespace rlk {
namespace cpu {

constexpr int64_t kChunk = 512;
constexpr int64_t kPrefetchBytes = 8192;  // the hardware prefetcher stops at 4 KB pages

// Keep small problems on one thread: a task (the work that wakes a thread) is about
// half a millisecond of one thread's work or more (issue 13, goal 3).  Splitting less
// across cores costs more in wake-ups than it saves, and when the other core is busy
// the caller can wait a whole scheduler slice (~4-7 ms) for a chunk that a descheduled
// thread holds.  One-thread rates measured on the 2-core development machine (session
// 10, [256, 2048] and [256, 32000]) set each size:
// the loss kernels take 0.85-2 ns a token, so half a million tokens is 0.45-1 ms;
constexpr int64_t kTokensPerTask = int64_t(1) << 19;
// the advantage scans (GAE, discounted returns) ~1.5 ns an element: 0.8 ms;
constexpr int64_t kScanElementsPerTask = int64_t(1) << 19;
// a pass over rows of logits (log-softmax forward or backward, KL) 0.16-0.22 ns a
// logit: 0.35-0.45 ms;
constexpr int64_t kLogitsPerTask = int64_t(1) << 21;
// vectorised single passes over values (masked sums, elementwise maps: ~0.1 ns a
// value from cache): ~0.4 ms.
constexpr int64_t kValuesPerTask = int64_t(1) << 22;
inline int64_t row_grain(int64_t T, int64_t tokens_per_task = kTokensPerTask) {
  return std::max<int64_t>(1, tokens_per_task / std::max<int64_t>(T, 1));
}

struct Ones {
  alignas(64) uint8_t mask[kChunk];
  Ones() { std::fill(mask, mask + kChunk, uint8_t(1)); }
};

// kChunk ones: the mask of a chunk when there is no mask.
inline const uint8_t* all_valid() {
  static const Ones ones;
  return ones.mask;
}

// Prefetches the n elements kPrefetchBytes past p + n.
template <typename T>
inline void prefetch_ahead(const T* p, int64_t n) {
  if (p == nullptr) return;
  const char* base = reinterpret_cast<const char*>(p + n) + kPrefetchBytes;
  for (int64_t off = 0; off < n * int64_t(sizeof(T)); off += 64) RLK_PREFETCH(base + off);
}

// The chunk [t0, t0 + n) of a row as `acc` values: the data itself when it
// already is, else converted into `buffer`.
template <typename acc, typename scalar_t>
inline const acc* staged(const scalar_t* row, int64_t n, acc* buffer) {
  if constexpr (std::is_same_v<acc, scalar_t>) {
    return row;
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = cast<acc>(row[i]);
    return buffer;
  }
}

// lanes[0] += ... += lanes[2 W - 1] by a tree with compile-time widths (each
// step one vector add).
template <int W, typename acc>
RLK_FORCE_INLINE void fold_lanes(acc* lanes) {
  for (int l = 0; l < W; ++l) lanes[l] += lanes[l + W];
  if constexpr (W > 1) fold_lanes<W / 2>(lanes);
}

// Sum of a[0, n) with kLanes independent partial sums (four 64-byte vectors,
// so the adds do not wait on each other), folded by a fixed tree: an order
// the compiler vectorises without reassociating, the same on every ISA clone.
// Element i always joins lane i % kLanes, the tail included, so zeros appended
// to a row (padding, masked slots) leave its sum bit for bit unchanged.
// lane_sum_by sums value(i) for i in [0, n) in that order; lane_sum sums a[0, n).
template <typename acc, typename F>
RLK_FORCE_INLINE double lane_sum_by(int64_t n, F&& value) {
  constexpr int kLanes = 4 * 64 / int(sizeof(acc));
  acc lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += value(i + l);
  for (int l = 0; i + l < n; ++l) lanes[l] += value(i + l);
  fold_lanes<kLanes / 2>(lanes);
  return double(lanes[0]);
}

template <typename acc>
RLK_FORCE_INLINE double lane_sum(const acc* __restrict__ a, int64_t n) {
  return lane_sum_by<acc>(n, [a](int64_t i) { return a[i]; });
}

// Maximum of a[0, n) >= 0 (NaN wins).  Non-negative floats order like their
// bit patterns, and an integer max reduction vectorises.
RLK_FORCE_INLINE float max_nonnegative(const float* __restrict__ a, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = float_bits(a[i]);
    m = b > m ? b : m;
  }
  return bits_float(m);
}
RLK_FORCE_INLINE double max_nonnegative(const double* __restrict__ a, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = (a[i] > m) | (a[i] != a[i]) ? a[i] : m;
  return m;
}

}  // namespace cpu
}  // namespace rlk
