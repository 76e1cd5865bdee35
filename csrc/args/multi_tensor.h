// pack_tensors, unpack_tensors and gossip_mix: the checks both backends share
// and the params they read.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "../core/multi_tensor.h"
#include "../torch_common.h"

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

// pack_tensors / unpack_tensors: the params and the host arrays they point
// into (the table of tensor pointers and their element counts).
struct MultiTensorCall {
  MultiTensorParams params;
  std::vector<void*> pointers;
  std::vector<int64_t> numels;
};

// pack: the tensors are read and the bucket written; unpack the other way round.
inline void multi_tensor_args(at::TensorList tensors, const at::Tensor& bucket, double scale, bool pack,
                              MultiTensorCall& call) {
  const char* op = pack ? "pack_tensors" : "unpack_tensors";
  call.numels = bucket_numels(tensors, bucket, op);
  MultiTensorParams& p = call.params;
  p.count = static_cast<int64_t>(call.numels.size());
  p.total = bucket.numel();
  p.scale = scale;
  if (p.total == 0) return;  // nothing to copy (and nothing to dispatch on)
  call.pointers.reserve(tensors.size());
  for (const auto& t : tensors) call.pointers.push_back(pack ? const_cast<void*>(t.const_data_ptr()) : t.data_ptr());
  p.tensors = call.pointers.data();
  p.numels = call.numels.data();
  p.tensor_dtype = dtype_of(tensors[0].scalar_type(), op);
  p.bucket = pack ? bucket.data_ptr() : const_cast<void*>(bucket.const_data_ptr());
  p.bucket_dtype = dtype_of(bucket.scalar_type(), op);
}

inline GossipMixParams gossip_mix_args(const at::Tensor& x, const at::Tensor& left, const at::Tensor& right,
                                       double w_self, double w_left, double w_right, const at::Tensor& out) {
  check_like(x, "x", x, "gossip_mix");
  check_like(left, "left", x, "gossip_mix");
  check_like(right, "right", x, "gossip_mix");
  check_like(out, "out", x, "gossip_mix");
  GossipMixParams p;
  p.n = x.numel();
  p.dtype = dtype_of(x.scalar_type(), "gossip_mix");
  p.x = x.const_data_ptr();
  p.left = left.const_data_ptr();
  p.right = right.const_data_ptr();
  p.w_self = w_self;
  p.w_left = w_left;
  p.w_right = w_right;
  p.out = out.data_ptr();
  return p;
}

}  // namespace rlk
