#include <torch/library.h>

#include "../args/multi_tensor.h"
#include "torch_launch.h"

namespace rlk {
namespace {

void pack_tensors_cuda(at::TensorList tensors, const at::Tensor& bucket, double scale) {
  MultiTensorCall call;
  multi_tensor_args(tensors, bucket, scale, /*pack=*/true, call);
  if (call.params.total == 0) return;
  c10::cuda::CUDAGuard guard(bucket.device());
  C10_CUDA_CHECK(cuda::launch_pack_tensors(call.params, current_stream()));
}

void unpack_tensors_cuda(const at::Tensor& bucket, at::TensorList tensors, double scale) {
  MultiTensorCall call;
  multi_tensor_args(tensors, bucket, scale, /*pack=*/false, call);
  if (call.params.total == 0) return;
  c10::cuda::CUDAGuard guard(bucket.device());
  C10_CUDA_CHECK(cuda::launch_unpack_tensors(call.params, current_stream()));
}

void gossip_mix_cuda(const at::Tensor& x, const at::Tensor& left, const at::Tensor& right, double w_self,
                     double w_left, double w_right, const at::Tensor& out) {
  const GossipMixParams p = gossip_mix_args(x, left, right, w_self, w_left, w_right, out);
  c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(cuda::launch_gossip_mix(p, current_stream()));
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("pack_tensors", &rlk::pack_tensors_cuda);
  m.impl("unpack_tensors", &rlk::unpack_tensors_cuda);
  m.impl("gossip_mix", &rlk::gossip_mix_cuda);
}
