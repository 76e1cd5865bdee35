// Torch-facing argument checks shared by the CPU and CUDA implementations of
// pack_tensors, unpack_tensors and gossip_mix.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace rlk {

// Tensors packed into (or unpacked from) a flat bucket: one dtype, contiguous,
// on the bucket's device, together exactly bucket.numel() elements.  Returns
// their element counts.
inline std::vector<int64_t> bucket_numels(at::TensorList tensors, const at::Tensor& bucket, const char* op) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.is_contiguous(), op, ": tensors[", i, "] must be contiguous");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), op, ": tensors[", i, "] has dtype ",
                t.scalar_type(), " but tensors[0] has ", tensors[0].scalar_type());
    TORCH_CHECK(t.device() == bucket.device(), op, ": tensors[", i, "] is on ", t.device(),
                " but bucket is on ", bucket.device());
    numels.push_back(t.numel());
    total += t.numel();
  }
  TORCH_CHECK(bucket.dim() == 1 && bucket.is_contiguous(), op, ": bucket must be a contiguous 1-D tensor");
  TORCH_CHECK(bucket.numel() == total, op, ": bucket has ", bucket.numel(), " elements but the tensors hold ",
              total);
  return numels;
}

// An elementwise operand that must match x in shape, dtype and device.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace rlk
