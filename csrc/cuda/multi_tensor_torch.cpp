#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../args/multi_tensor.h"
#include "cuda_types.h"
#include "launchers.h"

namespace rlk {
namespace {

template <typename T>
using device_t = typename cuda::device_type<T>::type;

void pack_tensors_cuda(at::TensorList tensors, const at::Tensor& bucket, double scale) {
  const auto numels = bucket_numels(tensors, bucket, "pack_tensors");
  if (bucket.numel() == 0) return;
  c10::cuda::CUDAGuard guard(bucket.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "pack_tensors", [&] {
    using src_t = device_t<scalar_t>;
    std::vector<const src_t*> pointers;
    pointers.reserve(tensors.size());
    for (const auto& t : tensors) pointers.push_back(reinterpret_cast<const src_t*>(t.const_data_ptr()));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bucket.scalar_type(), "pack_tensors", [&] {
      using dst_t = device_t<scalar_t>;
      const cudaError_t err = cuda::launch_pack_tensors<src_t, dst_t>(
          pointers.data(), numels.data(), static_cast<int64_t>(numels.size()),
          reinterpret_cast<dst_t*>(bucket.data_ptr()), scale, stream);
      C10_CUDA_CHECK(err);
    });
  });
}

void unpack_tensors_cuda(const at::Tensor& bucket, at::TensorList tensors, double scale) {
  const auto numels = bucket_numels(tensors, bucket, "unpack_tensors");
  if (bucket.numel() == 0) return;
  c10::cuda::CUDAGuard guard(bucket.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "unpack_tensors", [&] {
    using dst_t = device_t<scalar_t>;
    std::vector<dst_t*> pointers;
    pointers.reserve(tensors.size());
    for (const auto& t : tensors) pointers.push_back(reinterpret_cast<dst_t*>(t.data_ptr()));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bucket.scalar_type(), "unpack_tensors", [&] {
      using src_t = device_t<scalar_t>;
      const cudaError_t err = cuda::launch_unpack_tensors<src_t, dst_t>(
          reinterpret_cast<const src_t*>(bucket.const_data_ptr()), pointers.data(), numels.data(),
          static_cast<int64_t>(numels.size()), scale, stream);
      C10_CUDA_CHECK(err);
    });
  });
}

void gossip_mix_cuda(const at::Tensor& x, const at::Tensor& left, const at::Tensor& right, double w_self,
                     double w_left, double w_right, const at::Tensor& out) {
  check_like(x, "x", x, "gossip_mix");
  check_like(left, "left", x, "gossip_mix");
  check_like(right, "right", x, "gossip_mix");
  check_like(out, "out", x, "gossip_mix");
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gossip_mix", [&] {
    using T = device_t<scalar_t>;
    const cudaError_t err = cuda::launch_gossip_mix<T>(
        reinterpret_cast<const T*>(x.const_data_ptr()), reinterpret_cast<const T*>(left.const_data_ptr()),
        reinterpret_cast<const T*>(right.const_data_ptr()), x.numel(), w_self, w_left, w_right,
        reinterpret_cast<T*>(out.data_ptr()), stream);
    C10_CUDA_CHECK(err);
  });
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("pack_tensors", &rlk::pack_tensors_cuda);
  m.impl("unpack_tensors", &rlk::unpack_tensors_cuda);
  m.impl("gossip_mix", &rlk::gossip_mix_cuda);
}
