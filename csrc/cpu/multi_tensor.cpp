// Multi-tensor pack/unpack (many tensors <-> one flat bucket, with an optional
// scale and dtype cast) and the gossip mixing step on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "../args/multi_tensor.h"

namespace rlk {
namespace {

// Elements per parallel task: below ~1M elements (a few hundred
// microseconds) the copy stays on one thread.
constexpr int64_t kCopyGrain = int64_t(1) << 20;
constexpr int64_t kMixGrain = int64_t(1) << 18;

// Start offset of every tensor inside the bucket and their total.
struct Layout {
  std::vector<int64_t> offsets;
  int64_t total = 0;
};

Layout layout_of(const MultiTensorParams& p) {
  Layout layout;
  for (int64_t i = 0; i < p.count; ++i) {
    layout.offsets.push_back(layout.total);
    layout.total += p.numels[i];
  }
  return layout;
}

// Copies between the tensors and the bucket over the flat element range,
// split into contiguous ranges across threads; a range may span many small
// tensors or cover part of a large one.
template <typename src_t, typename dst_t, bool kPack>
void copy_all(void* const* pointers, const Layout& layout, char* bucket, double scale) {
  using acc = scale_acc_t<dst_t>;
  const acc s = static_cast<acc>(scale);
  const bool plain = std::is_same<src_t, dst_t>::value && scale == 1.0;
  const auto& offsets = layout.offsets;
  const int64_t count = static_cast<int64_t>(offsets.size());
  rlk::cpu::parallel_for(0, layout.total, kCopyGrain, [&](int64_t lo, int64_t hi) {
    int64_t t = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
    for (; t < count && offsets[t] < hi; ++t) {
      const int64_t end_t = t + 1 < count ? offsets[t + 1] : layout.total;
      const int64_t a = std::max(lo, offsets[t]), b = std::min(hi, end_t);
      if (a >= b) continue;
      const int64_t within = a - offsets[t];
      const src_t* src;
      dst_t* dst;
      if (kPack) {
        src = static_cast<const src_t*>(pointers[t]) + within;
        dst = reinterpret_cast<dst_t*>(bucket) + a;
      } else {
        src = reinterpret_cast<const src_t*>(bucket) + a;
        dst = static_cast<dst_t*>(pointers[t]) + within;
      }
      if (plain) {
        std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), sizeof(dst_t) * (b - a));
      } else {
        scaled_copy<src_t, dst_t>(src, dst, b - a, s);
      }
    }
  });
}

c10::ScalarType scalar_type_of(Dtype dtype) {
  switch (dtype) {
    case Dtype::f64: return at::kDouble;
    case Dtype::f16: return at::kHalf;
    case Dtype::bf16: return at::kBFloat16;
    default: return at::kFloat;
  }
}

// The tensors' and the bucket's dtypes pick the copy (source first).
template <bool kPack>
void copy_tensors(at::TensorList tensors, const at::Tensor& bucket, double scale) {
  MultiTensorCall call;
  multi_tensor_args(tensors, bucket, scale, kPack, call);
  const MultiTensorParams& p = call.params;
  if (p.total == 0) return;
  const Layout layout = layout_of(p);
  const at::ScalarType src_type = scalar_type_of(kPack ? p.tensor_dtype : p.bucket_dtype);
  const at::ScalarType dst_type = scalar_type_of(kPack ? p.bucket_dtype : p.tensor_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src_type, "multi_tensor_copy", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst_type, "multi_tensor_copy", [&] {
      copy_all<src_t, scalar_t, kPack>(p.tensors, layout, static_cast<char*>(p.bucket), p.scale);
    });
  });
}

void pack_tensors_cpu(at::TensorList tensors, const at::Tensor& bucket, double scale) {
  copy_tensors<true>(tensors, bucket, scale);
}

void unpack_tensors_cpu(const at::Tensor& bucket, at::TensorList tensors, double scale) {
  copy_tensors<false>(tensors, bucket, scale);
}

void gossip_mix_cpu(const at::Tensor& x, const at::Tensor& left, const at::Tensor& right, double w_self,
                    double w_left, double w_right, const at::Tensor& out) {
  const GossipMixParams p = gossip_mix_args(x, left, right, w_self, w_left, w_right, out);
  const int64_t n = p.n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gossip_mix", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = static_cast<const scalar_t*>(p.x);
    const scalar_t* lp = static_cast<const scalar_t*>(p.left);
    const scalar_t* rp = static_cast<const scalar_t*>(p.right);
    scalar_t* op = static_cast<scalar_t*>(p.out);
    const acc ws = static_cast<acc>(p.w_self), wl = static_cast<acc>(p.w_left), wr = static_cast<acc>(p.w_right);
    rlk::cpu::parallel_for(0, n, kMixGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) op[i] = gossip_mix_one<scalar_t>(xp[i], lp[i], rp[i], ws, wl, wr);
    });
  });
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("pack_tensors", &rlk::pack_tensors_cpu);
  m.impl("unpack_tensors", &rlk::unpack_tensors_cpu);
  m.impl("gossip_mix", &rlk::gossip_mix_cpu);
}
