// Element math for parameter averaging: scaled, casting copies between many
// tensors and one flat bucket (pack/unpack), and the gossip mixing step.
#pragma once
#include <type_traits>

#include "common.h"

#if defined(__CUDACC__)
namespace rlk {
// 16-bit -> float64, for scaled copies into 32/64-bit destinations.
template <> RLK_INLINE double cast<double, __half>(__half x) { return double(__half2float(x)); }
template <> RLK_INLINE double cast<double, __nv_bfloat16>(__nv_bfloat16 x) { return double(__bfloat162float(x)); }
}  // namespace rlk
#endif

namespace rlk {

// Precision of the scaled copy.  A 32/64-bit destination multiplies in
// float64: x * fl64(1/n) then rounds to float32 exactly as x / n would, so a
// mean taken as sum * (1/n) matches sum / n bit for bit.  16-bit destinations
// multiply in float32 (the product error stays far below their rounding step).
template <typename dst_t>
using scale_acc_t = typename std::conditional<sizeof(dst_t) == 2, float, double>::type;

template <typename src_t, typename dst_t>
RLK_INLINE dst_t scaled_cast(src_t x, scale_acc_t<dst_t> scale) {
  using acc = scale_acc_t<dst_t>;
  return cast<dst_t>(cast<acc>(x) * scale);
}

template <typename src_t, typename dst_t>
RLK_INLINE void scaled_copy(const src_t* src, dst_t* dst, int64_t n, scale_acc_t<dst_t> scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = scaled_cast<src_t, dst_t>(src[i], scale);
}

// One gossip step: w_self * x + w_left * left + w_right * right, in float32
// for 16/32-bit inputs and float64 for float64.
template <typename T, typename acc = acc_t<T>>
RLK_INLINE T gossip_mix_one(T x, T left, T right, acc w_self, acc w_left, acc w_right) {
  return cast<T>(w_self * cast<acc>(x) + w_left * cast<acc>(left) + w_right * cast<acc>(right));
}

// How the GPU kernel (multi_tensor.cu) shares a copy among its blocks: every
// tensor is cut into tiles of `tile` elements, tile k of tensor t being tile
// first[t] + k of the launch.  first[] holds count + 1 entries, first[count] the
// number of tiles; an empty tensor owns none (its first equals the next one's).
// Returns first[count].
inline int64_t tile_starts(const int64_t* numels, int count, int64_t tile, int64_t* first) {
  int64_t next = 0;
  for (int t = 0; t < count; ++t) {
    first[t] = next;
    next += (numels[t] + tile - 1) / tile;
  }
  first[count] = next;
  return next;
}

// The tensor owning tile `tile` < first[count]: the t with first[t] <= tile <
// first[t + 1], by binary search (the first entries never decrease).
RLK_INLINE int tile_owner(const int64_t* first, int count, int64_t tile) {
  int lo = 0, hi = count;  // first[lo] <= tile < first[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (first[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The arguments of pack_tensors / unpack_tensors, filled once by
// args/multi_tensor.h: `count` host pointers to contiguous tensors of
// tensor_dtype, numels[i] elements each, laid end to end in the bucket.
struct MultiTensorParams {
  void* const* tensors = nullptr;
  const int64_t* numels = nullptr;
  int64_t count = 0, total = 0;
  Dtype tensor_dtype = Dtype::f32;
  void* bucket = nullptr;
  Dtype bucket_dtype = Dtype::f32;
  double scale = 1.0;
};

// The arguments of gossip_mix: out = w_self x + w_left left + w_right right
// over n elements of `dtype` (out may alias an input).
struct GossipMixParams {
  int64_t n = 0;
  Dtype dtype = Dtype::f32;
  const void* x = nullptr;
  const void* left = nullptr;
  const void* right = nullptr;
  double w_self = 0, w_left = 0, w_right = 0;
  void* out = nullptr;
};

// The CUDA launchers (multi_tensor.cu).
RLK_CUDA_LAUNCHER(launch_pack_tensors, MultiTensorParams)
RLK_CUDA_LAUNCHER(launch_unpack_tensors, MultiTensorParams)
RLK_CUDA_LAUNCHER(launch_gossip_mix, GossipMixParams)

}  // namespace rlk
