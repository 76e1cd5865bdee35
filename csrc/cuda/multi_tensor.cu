// Multi-tensor pack/unpack and the gossip mixing step on the GPU.
//
// Pack/unpack pass a per-tensor table in the kernel parameters: up to
// kMaxTensors tensors a launch, each cut into tiles of kTile elements
// (core/multi_tensor.h tile_starts), and a 1-D grid whose blocks find the tensor
// of each tile by a binary search over the table (tile_owner).  Nothing is
// allocated or copied to the device: the parameters travel with the launch, and a
// CUDA graph captures them with it.  Every block copies whole tiles, so one huge
// tensor and many small ones keep every block equally busy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "../core/multi_tensor.h"
#include "dispatch.cuh"

namespace rlk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kTile = int64_t(kThreads) * kUnroll;
// 128 x 8 + 2 x 129 x 8 bytes (about 3.1 KB) keeps the parameters under CUDA's 4 KB.
constexpr int kMaxTensors = 128;
// Blocks of a launch; each walks its tiles with a grid stride.
constexpr int64_t kMaxBlocks = int64_t(1) << 16;

struct TensorTable {
  void* pointers[kMaxTensors];
  int64_t offsets[kMaxTensors + 1];  // start of each tensor inside the bucket, then its end
  int64_t first[kMaxTensors + 1];    // first tile of each tensor, then the number of tiles
  int count;
};
static_assert(sizeof(TensorTable) + 3 * sizeof(void*) <= 4096, "kernel parameters over 4 KB");

// kPlain (same dtype, scale 1) copies bits: under --use_fast_math a trip
// through arithmetic would flush subnormal values to zero.
template <typename src_t, typename dst_t, bool kPack, bool kPlain>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_copy_kernel(const __grid_constant__ TensorTable table, void* bucket, scale_acc_t<dst_t> scale) {
  const int64_t tiles = table.first[table.count];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int t = tile_owner(table.first, table.count, tile);
    const int64_t n = table.offsets[t + 1] - table.offsets[t];
    const int64_t base = (tile - table.first[t]) * kTile;
    const src_t* src;
    dst_t* dst;
    if (kPack) {
      src = static_cast<const src_t*>(table.pointers[t]);
      dst = static_cast<dst_t*>(bucket) + table.offsets[t];
    } else {
      src = static_cast<const src_t*>(bucket) + table.offsets[t];
      dst = static_cast<dst_t*>(table.pointers[t]);
    }
    // Loads first, then stores: kUnroll independent loads in flight per thread;
    // consecutive threads touch consecutive elements.
    src_t values[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      if (i < n) values[u] = src[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      if (i < n) {
        if constexpr (kPlain) {
          dst[i] = values[u];
        } else {
          dst[i] = scaled_cast<src_t, dst_t>(values[u], scale);
        }
      }
    }
  }
}

template <typename src_t, typename dst_t, bool kPack>
cudaError_t launch_copy(void* const* pointers, const int64_t* numels, int64_t count, void* bucket,
                        double scale, cudaStream_t stream) {
  int64_t offset = 0;
  for (int64_t start = 0; start < count; start += kMaxTensors) {
    TensorTable table;
    table.count = static_cast<int>(std::min<int64_t>(kMaxTensors, count - start));
    for (int k = 0; k < table.count; ++k) {
      table.pointers[k] = pointers[start + k];
      table.offsets[k] = offset;
      offset += numels[start + k];
    }
    table.offsets[table.count] = offset;
    const int64_t tiles = tile_starts(numels + start, table.count, kTile, table.first);
    if (tiles == 0) continue;
    const unsigned int blocks = static_cast<unsigned int>(std::min(tiles, kMaxBlocks));
    const auto s = static_cast<scale_acc_t<dst_t>>(scale);
    if constexpr (std::is_same<src_t, dst_t>::value) {
      if (scale == 1.0) {
        multi_tensor_copy_kernel<src_t, dst_t, kPack, true><<<blocks, kThreads, 0, stream>>>(table, bucket, s);
      } else {
        multi_tensor_copy_kernel<src_t, dst_t, kPack, false><<<blocks, kThreads, 0, stream>>>(table, bucket, s);
      }
    } else {
      multi_tensor_copy_kernel<src_t, dst_t, kPack, false><<<blocks, kThreads, 0, stream>>>(table, bucket, s);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
__global__ void gossip_mix_kernel(const T* __restrict__ x, const T* left, const T* right, int64_t n,
                                  acc_t<T> w_self, acc_t<T> w_left, acc_t<T> w_right, T* out) {
  // out may alias x, left or right: each element is read before it is written
  // by the same thread, so no __restrict__ on the aliased pointers.
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = gossip_mix_one<T>(x[i], left[i], right[i], w_self, w_left, w_right);
}

// Both dtypes of a copy pick its instance: src_t the one read, dst_t the one written.
template <bool kPack>
cudaError_t launch_copy_typed(const MultiTensorParams& p, cudaStream_t stream) {
  if (p.total == 0) return cudaSuccess;
  return launch_typed(kPack ? p.tensor_dtype : p.bucket_dtype, [&](auto src_tag) {
    return launch_typed(kPack ? p.bucket_dtype : p.tensor_dtype, [&](auto dst_tag) {
      return launch_copy<decltype(src_tag), decltype(dst_tag), kPack>(p.tensors, p.numels, p.count, p.bucket,
                                                                      p.scale, stream);
    });
  });
}

}  // namespace

cudaError_t launch_pack_tensors(const MultiTensorParams& p, cudaStream_t stream) {
  return launch_copy_typed<true>(p, stream);
}

cudaError_t launch_unpack_tensors(const MultiTensorParams& p, cudaStream_t stream) {
  return launch_copy_typed<false>(p, stream);
}

cudaError_t launch_gossip_mix(const GossipMixParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((p.n + kThreads - 1) / kThreads, int64_t(1) << 16);
  return launch_typed(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    gossip_mix_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.left), static_cast<const T*>(p.right), p.n,
        acc_t<T>(p.w_self), acc_t<T>(p.w_left), acc_t<T>(p.w_right), static_cast<T*>(p.out));
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/multi_tensor.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
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
#endif  // TORCH_EXTENSION_NAME
