// Multi-tensor pack/unpack (many tensors <-> one flat bucket, with an optional
// scale and dtype cast) and the gossip mixing step on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../core/multi_tensor.h"
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

Layout layout_of(at::TensorList tensors, const at::Tensor& bucket, const char* op) {
  Layout layout;
  for (int64_t numel : bucket_numels(tensors, bucket, op)) {
    layout.offsets.push_back(layout.total);
    layout.total += numel;
  }
  return layout;
}

// Copies between the tensors and the bucket over the flat element range,
// split into contiguous ranges across threads; a range may span many small
// tensors or cover part of a large one.
template <typename src_t, typename dst_t, bool kPack>
void copy_all(const std::vector<char*>& pointers, const Layout& layout, char* bucket, double scale) {
  using acc = scale_acc_t<dst_t>;
  const acc s = static_cast<acc>(scale);
  const bool plain = std::is_same<src_t, dst_t>::value && scale == 1.0;
  const auto& offsets = layout.offsets;
  const int64_t count = static_cast<int64_t>(offsets.size());
  at::parallel_for(0, layout.total, kCopyGrain, [&](int64_t lo, int64_t hi) {
    int64_t t = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
    for (; t < count && offsets[t] < hi; ++t) {
      const int64_t end_t = t + 1 < count ? offsets[t + 1] : layout.total;
      const int64_t a = std::max(lo, offsets[t]), b = std::min(hi, end_t);
      if (a >= b) continue;
      const int64_t within = a - offsets[t];
      const src_t* src;
      dst_t* dst;
      if (kPack) {
        src = reinterpret_cast<const src_t*>(pointers[t]) + within;
        dst = reinterpret_cast<dst_t*>(bucket) + a;
      } else {
        src = reinterpret_cast<const src_t*>(bucket) + a;
        dst = reinterpret_cast<dst_t*>(pointers[t]) + within;
      }
      if (plain) {
        std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), sizeof(dst_t) * (b - a));
      } else {
        scaled_copy<src_t, dst_t>(src, dst, b - a, s);
      }
    }
  });
}

template <bool kPack>
void dispatch_copy(at::ScalarType src_type, at::ScalarType dst_type, const std::vector<char*>& pointers,
                   const Layout& layout, char* bucket, double scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src_type, "multi_tensor_copy", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst_type, "multi_tensor_copy", [&] {
      copy_all<src_t, scalar_t, kPack>(pointers, layout, bucket, scale);
    });
  });
}

void pack_tensors_cpu(at::TensorList tensors, const at::Tensor& bucket, double scale) {
  const Layout layout = layout_of(tensors, bucket, "pack_tensors");
  if (layout.total == 0) return;
  std::vector<char*> pointers;
  pointers.reserve(tensors.size());
  for (const auto& t : tensors) pointers.push_back(static_cast<char*>(t.data_ptr()));
  dispatch_copy<true>(tensors[0].scalar_type(), bucket.scalar_type(), pointers, layout,
                      static_cast<char*>(bucket.data_ptr()), scale);
}

void unpack_tensors_cpu(const at::Tensor& bucket, at::TensorList tensors, double scale) {
  const Layout layout = layout_of(tensors, bucket, "unpack_tensors");
  if (layout.total == 0) return;
  std::vector<char*> pointers;
  pointers.reserve(tensors.size());
  for (const auto& t : tensors) pointers.push_back(static_cast<char*>(t.data_ptr()));
  dispatch_copy<false>(bucket.scalar_type(), tensors[0].scalar_type(), pointers, layout,
                       static_cast<char*>(bucket.data_ptr()), scale);
}

void gossip_mix_cpu(const at::Tensor& x, const at::Tensor& left, const at::Tensor& right, double w_self,
                    double w_left, double w_right, const at::Tensor& out) {
  check_like(x, "x", x, "gossip_mix");
  check_like(left, "left", x, "gossip_mix");
  check_like(right, "right", x, "gossip_mix");
  check_like(out, "out", x, "gossip_mix");
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gossip_mix", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* lp = left.const_data_ptr<scalar_t>();
    const scalar_t* rp = right.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc ws = static_cast<acc>(w_self), wl = static_cast<acc>(w_left), wr = static_cast<acc>(w_right);
    at::parallel_for(0, n, kMixGrain, [&](int64_t lo, int64_t hi) {
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
