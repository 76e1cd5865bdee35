// Full-vocabulary KL(pi || pi_ref) from two rows of logits on the GPU
// (torch-free), and its backward: the block layout of logprobs.cu over both
// rows at once, fixed vocabulary chunks included (statistics: core/kl_from_logits.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../core/kl_from_logits.h"
#include "dispatch.cuh"
#include "logits.cuh"

namespace rlk {
namespace cuda {
namespace {

__device__ __forceinline__ KlStats shfl_kl(const KlStats& st, int offset) {
  return KlStats{__shfl_xor_sync(kFullMask, st.ma, offset), __shfl_xor_sync(kFullMask, st.sa, offset),
                 __shfl_xor_sync(kFullMask, st.w, offset), __shfl_xor_sync(kFullMask, st.mb, offset),
                 __shfl_xor_sync(kFullMask, st.sb, offset)};
}

__device__ KlStats block_merge_kl(KlStats st, float scale, float inv_t) {
  __shared__ KlStats warp_stats[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) st = kl_stats_merge(st, shfl_kl(st, offset), scale, inv_t);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_stats[lane] : kl_stats_empty();
    for (int offset = 16; offset > 0; offset >>= 1) st = kl_stats_merge(st, shfl_kl(st, offset), scale, inv_t);
  }
  return st;
}

__device__ void write_masked_kl(int64_t row, float* kl, float* saved) {
  kl[row] = 0.0f;
  for (int k = 0; k < 5; ++k) saved[5 * row + k] = 0.0f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kl_forward_kernel(const T* __restrict__ logits, RowIndex rows, const T* __restrict__ ref, RowIndex ref_rows,
                      int64_t V, int64_t chunk, const bool* __restrict__ mask, float scale, float inv_t,
                      float* __restrict__ kl, float* __restrict__ saved, float* __restrict__ partial) {
  const int64_t row = blockIdx.x;
  if (mask != nullptr && !mask[row]) {
    if (partial == nullptr && threadIdx.x == 0) write_masked_kl(row, kl, saved);
    return;
  }
  const int64_t begin = int64_t(blockIdx.y) * chunk;
  const int64_t n = begin < V ? (V - begin < chunk ? V - begin : chunk) : 0;
  const T* a = logits + rows.offset(row) + begin;
  const T* b = ref + ref_rows.offset(row) + begin;
  KlStats st = kl_stats_empty();
  for_each<T, true>(a, b, n, [&](int64_t, float va, float vb) { kl_stats_push(st, va, vb, scale, inv_t); });
  st = block_merge_kl(st, scale, inv_t);
  if (threadIdx.x != 0) return;
  if (partial != nullptr) {
    float* out = partial + 5 * (row * gridDim.y + blockIdx.y);
    out[0] = st.ma;
    out[1] = st.sa;
    out[2] = st.w;
    out[3] = st.mb;
    out[4] = st.sb;
    return;
  }
  kl[row] = kl_finish(st, saved + 5 * row);
}

__global__ void kl_finish_kernel(int64_t N, const bool* __restrict__ mask, float scale, float inv_t,
                                 float* __restrict__ kl, float* __restrict__ saved,
                                 const float* __restrict__ partial, int splits) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  if (mask != nullptr && !mask[row]) {
    write_masked_kl(row, kl, saved);
    return;
  }
  KlStats st = kl_stats_empty();
  for (int k = 0; k < splits; ++k) {
    const float* p = partial + 5 * (row * splits + k);
    st = kl_stats_merge(st, KlStats{p[0], p[1], p[2], p[3], p[4]}, scale, inv_t);
  }
  kl[row] = kl_finish(st, saved + 5 * row);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kl_backward_kernel(const T* __restrict__ logits, RowIndex rows, const T* __restrict__ ref, RowIndex ref_rows,
                       int64_t V, const bool* __restrict__ mask, const float* __restrict__ grad_kl,
                       const float* __restrict__ saved, float scale, float inv_t, T* __restrict__ grad_logits,
                       T* __restrict__ grad_ref) {
  const int64_t row = blockIdx.x;
  const int64_t begin = int64_t(blockIdx.y) * kBackwardChunk;
  if (begin >= V) return;
  const int64_t n = V - begin < kBackwardChunk ? V - begin : kBackwardChunk;
  const float g = (mask != nullptr && !mask[row]) ? 0.0f : grad_kl[row];
  const bool masked = mask != nullptr && !mask[row];
  const T* a = logits + rows.offset(row) + begin;
  const T* b = ref + ref_rows.offset(row) + begin;
  T* ga = grad_logits ? grad_logits + row * V + begin : nullptr;
  T* gb = grad_ref ? grad_ref + row * V + begin : nullptr;
  const float* s = saved + 5 * row;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    if (masked) {
      if (ga) ga[j] = cast<T>(0.0f);
      if (gb) gb[j] = cast<T>(0.0f);
      continue;
    }
    const float va = cast<float>(a[j]), vb = cast<float>(b[j]);
    if (ga) ga[j] = cast<T>(kl_grad_logits(va, vb, s, scale, inv_t, g));
    if (gb) gb[j] = cast<T>(kl_grad_ref_logits(va, vb, s, scale, inv_t, g));
  }
}

}  // namespace

cudaError_t launch_kl_from_logits(const KlFromLogitsParams& p, cudaStream_t stream) {
  if (p.N == 0) return cudaSuccess;
  if (!forward_fits(p)) return cudaErrorInvalidValue;
  const ForwardLaunch f = forward_launch(p);
  return launch_logits_typed(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    kl_forward_kernel<T><<<f.grid, kThreads, 0, stream>>>(static_cast<const T*>(p.logits), p.rows,
                                                          static_cast<const T*>(p.ref), p.ref_rows, p.V, f.chunk,
                                                          p.mask, f.scale, f.inv_t, p.kl, p.saved, f.partial);
    if (p.splits > 1)
      kl_finish_kernel<<<blocks_for(p.N, 128), 128, 0, stream>>>(p.N, p.mask, f.scale, f.inv_t, p.kl, p.saved,
                                                                 f.partial, p.splits);
  });
}

cudaError_t launch_kl_from_logits_backward(const KlFromLogitsParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.V == 0 || (p.grad_logits == nullptr && p.grad_ref == nullptr)) return cudaSuccess;
  const float scale = log2_scale(p.temperature), inv_t = inv_temperature(p.temperature);
  const dim3 grid(static_cast<unsigned int>(p.N), blocks_for(p.V, int(kBackwardChunk)));
  return launch_logits_typed(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    kl_backward_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(p.logits), p.rows, static_cast<const T*>(p.ref), p.ref_rows, p.V, p.mask, p.grad_kl,
        p.saved, scale, inv_t, static_cast<T*>(p.grad_logits), static_cast<T*>(p.grad_ref));
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/kl_from_logits.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
#include "../args/kl_from_logits.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_from_logits_cuda(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                       const c10::optional<at::Tensor>& mask, double temperature) {
  c10::cuda::CUDAGuard guard(logits.device());
  KlFromLogitsTensors t;
  KlFromLogitsParams p = kl_from_logits_args(logits, ref_logits, mask, temperature, t);
  const int64_t chunks = cuda::vocab_chunks(p.V);
  TORCH_CHECK(chunks <= cuda::kMaxVocabChunks, "kl_from_logits: the vocabulary (", p.V, ") exceeds ",
              cuda::kMaxVocabChunks * cuda::kVocabChunk, " logits a row on CUDA");
  p.splits = static_cast<int>(chunks);
  TORCH_CHECK(p.N <= 0x7fffffff, "kl_from_logits: ", p.N, " rows exceed 2^31 - 1 on CUDA");
  const at::Tensor workspace =
      at::empty({p.splits > 1 ? 5 * p.N * p.splits : 0}, logits.options().dtype(at::kFloat));
  p.workspace = p.splits > 1 ? workspace.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(cuda::launch_kl_from_logits(p, current_stream()));
  return {t.first, t.second};
}

std::tuple<at::Tensor, at::Tensor> kl_from_logits_backward_cuda(const at::Tensor& grad_kl, const at::Tensor& logits,
                                                                const at::Tensor& ref_logits,
                                                                const c10::optional<at::Tensor>& mask,
                                                                const at::Tensor& saved, double temperature,
                                                                bool logits_grad, bool ref_grad) {
  c10::cuda::CUDAGuard guard(logits.device());
  KlFromLogitsTensors t;
  const KlFromLogitsParams p =
      kl_from_logits_backward_args(grad_kl, logits, ref_logits, mask, saved, temperature, logits_grad, ref_grad, t);
  C10_CUDA_CHECK(cuda::launch_kl_from_logits_backward(p, current_stream()));
  return {t.first, t.second};
}

// The CUDA kernels have no per-chunk state yet: the shared check refuses it, naming the op.
void kl_vocab_tile_cuda(const at::Tensor& logits, const at::Tensor& ref_logits, const at::Tensor& state,
                        double temperature, int64_t vocab_start, bool finish) {
  c10::cuda::CUDAGuard guard(logits.device());
  KlFromLogitsTensors t;
  kl_vocab_tile_args(logits, ref_logits, state, temperature, vocab_start, finish, t, /*chunk_states=*/false);
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("kl_from_logits", &rlk::kl_from_logits_cuda);
  m.impl("kl_from_logits_backward", &rlk::kl_from_logits_backward_cuda);
  m.impl("kl_vocab_tile", &rlk::kl_vocab_tile_cuda);
}
#endif  // TORCH_EXTENSION_NAME
