// Log-probs and entropy from logits on the GPU (torch-free): logprobs, its
// vocabulary tiles and its backward.
//
// Forward: a block per fixed chunk of kVocabChunk logits of a row (logits.cuh);
// a row of several chunks has them write their statistics and a second small
// kernel merge them in chunk order, so a row's result never depends on N.  Each
// thread streams its elements (16-byte loads where the row is aligned), keeping
// running statistics in float32 (core/logprobs.h); warps and then the block
// merge them.
// Backward: a 2-D grid of (row, vocabulary chunk), each element recomputed from
// the row's saved statistics and written in the logits' dtype, possibly over
// the logits themselves.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../core/logprobs.h"
#include "dispatch.cuh"
#include "logits.cuh"

namespace rlk {
namespace cuda {
namespace {

template <bool kEntropy>
__device__ __forceinline__ SoftmaxStats shfl_stats(const SoftmaxStats& st, int offset) {
  return SoftmaxStats{__shfl_xor_sync(kFullMask, st.m, offset), __shfl_xor_sync(kFullMask, st.s, offset),
                      kEntropy ? __shfl_xor_sync(kFullMask, st.t, offset) : 0.0f};
}

// Merged statistics of the whole block, valid in thread 0.
template <bool kEntropy>
__device__ SoftmaxStats block_merge(SoftmaxStats st, float scale) {
  __shared__ SoftmaxStats warp_stats[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) st = stats_merge<kEntropy>(st, shfl_stats<kEntropy>(st, offset), scale);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_stats[lane] : stats_empty();
    for (int offset = 16; offset > 0; offset >>= 1)
      st = stats_merge<kEntropy>(st, shfl_stats<kEntropy>(st, offset), scale);
  }
  return st;
}

// ---- logprobs -----------------------------------------------------------------------------------

template <typename T, bool kEntropy>
__device__ void finish_logprobs_row(const T* x, int64_t V, int64_t label, const SoftmaxStats& st, float inv_t,
                                    int64_t row, float* logprobs, float* entropy, float* saved) {
  const float log_s = log_f(st.s);
  const bool in_range = label >= 0 && label < V;  // validated by the caller; never read outside the row
  logprobs[row] = in_range ? logprob_of(cast<float>(x[in_range ? label : 0]), st.m, log_s, inv_t) : NAN;
  if (kEntropy) entropy[row] = entropy_of(st);
  saved[2 * row] = st.m;
  saved[2 * row + 1] = log_s;
}

template <bool kEntropy>
__device__ void write_ignored_row(int64_t row, float* logprobs, float* entropy, float* saved) {
  logprobs[row] = 0.0f;
  if (kEntropy) entropy[row] = 0.0f;
  saved[2 * row] = 0.0f;
  saved[2 * row + 1] = 0.0f;
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    logprobs_forward_kernel(const T* __restrict__ logits, RowIndex rows, int64_t V, int64_t chunk,
                            const int64_t* __restrict__ labels, int64_t ignore_index, float scale, float inv_t,
                            float* __restrict__ logprobs, float* __restrict__ entropy, float* __restrict__ saved,
                            float* __restrict__ partial) {
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  if (label == ignore_index) {  // the whole block leaves together
    if (partial == nullptr && threadIdx.x == 0) write_ignored_row<kEntropy>(row, logprobs, entropy, saved);
    return;
  }
  const T* x = logits + rows.offset(row);
  const int64_t begin = int64_t(blockIdx.y) * chunk;
  const int64_t n = begin < V ? (V - begin < chunk ? V - begin : chunk) : 0;
  SoftmaxStats st = stats_empty();
  for_each<T, false>(x + begin, x + begin, n,
                     [&](int64_t, float v, float) { stats_push<kEntropy>(st, v, scale); });
  st = block_merge<kEntropy>(st, scale);
  if (threadIdx.x != 0) return;
  if (partial != nullptr) {
    float* out = partial + 3 * (row * gridDim.y + blockIdx.y);
    out[0] = st.m;
    out[1] = st.s;
    out[2] = st.t;
    return;
  }
  finish_logprobs_row<T, kEntropy>(x, V, label, st, inv_t, row, logprobs, entropy, saved);
}

template <typename T, bool kEntropy>
__global__ void logprobs_finish_kernel(const T* __restrict__ logits, RowIndex rows, int64_t N, int64_t V,
                                       const int64_t* __restrict__ labels, int64_t ignore_index, float scale,
                                       float inv_t, float* __restrict__ logprobs, float* __restrict__ entropy,
                                       float* __restrict__ saved, const float* __restrict__ partial, int splits) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  const int64_t label = labels[row];
  if (label == ignore_index) {
    write_ignored_row<kEntropy>(row, logprobs, entropy, saved);
    return;
  }
  SoftmaxStats st = stats_empty();
  for (int k = 0; k < splits; ++k) {
    const float* p = partial + 3 * (row * splits + k);
    st = stats_merge<kEntropy>(st, SoftmaxStats{p[0], p[1], p[2]}, scale);
  }
  finish_logprobs_row<T, kEntropy>(logits + rows.offset(row), V, label, st, inv_t, row, logprobs, entropy, saved);
}

// One vocabulary tile of each row (linear_logprobs): a block per row merges the
// tile's statistics into the row's running state (core/logprobs.h).
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    logprobs_vocab_tile_kernel(const T* __restrict__ logits, RowIndex rows, int64_t V,
                               const int64_t* __restrict__ labels, int64_t ignore_index, int64_t vocab_start,
                               float scale, float inv_t, float* __restrict__ state, int width, bool finish) {
  const int64_t row = blockIdx.x;
  float* out = state + width * row;
  const int64_t label = labels[row];
  if (label == ignore_index) {  // the whole block leaves together
    if (threadIdx.x == 0) tile_stats_ignored(out, width);
    return;
  }
  const T* x = logits + rows.offset(row);
  const int64_t local = label - vocab_start;  // may lie outside this tile
  const bool label_here = local >= 0 && local < V;
  // With the arg-max flag, the block looks for a column before the label whose logit
  // reaches the label's (the same answer for every thread: one row per block).
  bool earlier = false;
  if (width == kTileWidthTop1 && label_here) {
    const float x_label = cast<float>(x[local]);
    bool found = false;
    for (int64_t j = threadIdx.x; j < local; j += blockDim.x) found = found || cast<float>(x[j]) >= x_label;
    earlier = __syncthreads_or(found) != 0;
  }
  SoftmaxStats st = stats_empty();
  for_each<T, false>(x, x, V, [&](int64_t, float v, float) { stats_push<kEntropy>(st, v, scale); });
  st = block_merge<kEntropy>(st, scale);
  if (threadIdx.x != 0) return;
  const SoftmaxStats before = tile_stats_in(out, vocab_start);
  st = stats_merge<kEntropy>(before, st, scale);
  // a label past the vocabulary (seen at the last tile) gives NaN, never an address
  const float x_label = tile_label_lost(label, vocab_start + V, finish) ? NAN
                        : label_here                                   ? cast<float>(x[local])
                                                                       : tile_label_in(out, vocab_start);
  float top1 = 0.0f;
  if (width == kTileWidthTop1)
    top1 = tile_top1_next(tile_top1_in(out, vocab_start), label_here, x_label, before.m, st.m, earlier);
  tile_stats_out<kEntropy>(out, st, x_label, finish, inv_t);
  if (width == kTileWidthTop1) out[4] = top1;
}

template <typename T, bool kEntropyGrad>
__global__ void __launch_bounds__(kThreads)
    logprobs_backward_kernel(const T* logits, RowIndex rows, T* grad, RowIndex grad_rows, int64_t V,
                             const int64_t* __restrict__ labels, int64_t ignore_index, int64_t vocab_start,
                             const float* __restrict__ grad_logprobs, const float* __restrict__ grad_entropy,
                             const float* __restrict__ entropy, const float* __restrict__ saved, float scale,
                             float inv_t) {
  // logits and grad may be one buffer (in-place): each element is read, then
  // written, by the same thread, so no __restrict__ on them.
  const int64_t row = blockIdx.x;
  const int64_t begin = int64_t(blockIdx.y) * kBackwardChunk;
  if (begin >= V) return;
  const int64_t n = V - begin < kBackwardChunk ? V - begin : kBackwardChunk;
  const T* x = logits + rows.offset(row) + begin;
  T* out = grad + grad_rows.offset(row) + begin;
  const int64_t label = labels[row];
  if (label == ignore_index || label < 0) {  // a negative label flags its row with NaN
    const float fill = label == ignore_index ? 0.0f : NAN;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) out[j] = cast<T>(fill);
    return;
  }
  const float g = grad_logprobs[row];
  const float gh = kEntropyGrad ? grad_entropy[row] : 0.0f;
  const float h = kEntropyGrad ? entropy[row] : 0.0f;
  const float m = saved[2 * row], log2_s = saved[2 * row + 1] * kLog2e;
  const int64_t local_label = label - vocab_start - begin;  // may lie outside this chunk or tile
  constexpr int kPack = 16 / sizeof(T);
  int64_t head = n;
  if (misalignment(x) == misalignment(out)) {
    head = ((16 - misalignment(x)) & 15) / int64_t(sizeof(T));
    if (head > n) head = n;
  }
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x)
    out[j] = cast<T>(logprobs_grad(cast<float>(x[j]), j == local_label, m, scale, log2_s, g, gh, h, inv_t));
  const int64_t packs = (n - head) / kPack;
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  uint4* ov = reinterpret_cast<uint4*>(out + head);
  for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
    const uint4 raw = xv[k];
    const T* vals = reinterpret_cast<const T*>(&raw);
    uint4 result;
    T* res = reinterpret_cast<T*>(&result);
#pragma unroll
    for (int e = 0; e < kPack; ++e) {
      const int64_t j = head + k * kPack + e;
      res[e] = cast<T>(logprobs_grad(cast<float>(vals[e]), j == local_label, m, scale, log2_s, g, gh, h, inv_t));
    }
    ov[k] = result;
  }
  for (int64_t j = head + packs * kPack + threadIdx.x; j < n; j += blockDim.x)
    out[j] = cast<T>(logprobs_grad(cast<float>(x[j]), j == local_label, m, scale, log2_s, g, gh, h, inv_t));
}

}  // namespace

cudaError_t launch_logprobs_forward(const LogprobsParams& p, cudaStream_t stream) {
  if (p.N == 0) return cudaSuccess;
  if (!forward_fits(p)) return cudaErrorInvalidValue;
  const ForwardLaunch f = forward_launch(p);
  return launch_logits_typed(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* logits = static_cast<const T*>(p.logits);
    if (p.with_entropy)
      logprobs_forward_kernel<T, true><<<f.grid, kThreads, 0, stream>>>(logits, p.rows, p.V, f.chunk, p.labels,
                                                                        p.ignore_index, f.scale, f.inv_t, p.logprobs,
                                                                        p.entropy, p.saved, f.partial);
    else
      logprobs_forward_kernel<T, false><<<f.grid, kThreads, 0, stream>>>(logits, p.rows, p.V, f.chunk, p.labels,
                                                                         p.ignore_index, f.scale, f.inv_t, p.logprobs,
                                                                         p.entropy, p.saved, f.partial);
    if (p.splits > 1) {
      if (p.with_entropy)
        logprobs_finish_kernel<T, true><<<blocks_for(p.N, 128), 128, 0, stream>>>(
            logits, p.rows, p.N, p.V, p.labels, p.ignore_index, f.scale, f.inv_t, p.logprobs, p.entropy, p.saved,
            f.partial, p.splits);
      else
        logprobs_finish_kernel<T, false><<<blocks_for(p.N, 128), 128, 0, stream>>>(
            logits, p.rows, p.N, p.V, p.labels, p.ignore_index, f.scale, f.inv_t, p.logprobs, p.entropy, p.saved,
            f.partial, p.splits);
    }
  });
}

cudaError_t launch_logprobs_vocab_tile(const LogprobsParams& p, cudaStream_t stream) {
  if (p.N == 0) return cudaSuccess;
  const float scale = log2_scale(p.temperature), inv_t = inv_temperature(p.temperature);
  const dim3 grid(static_cast<unsigned int>(p.N));
  return launch_logits_typed(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* logits = static_cast<const T*>(p.logits);
    if (p.with_entropy)
      logprobs_vocab_tile_kernel<T, true><<<grid, kThreads, 0, stream>>>(
          logits, p.rows, p.V, p.labels, p.ignore_index, p.vocab_start, scale, inv_t, p.state, p.width, p.finish);
    else
      logprobs_vocab_tile_kernel<T, false><<<grid, kThreads, 0, stream>>>(
          logits, p.rows, p.V, p.labels, p.ignore_index, p.vocab_start, scale, inv_t, p.state, p.width, p.finish);
  });
}

// p.grad may alias p.logits (in-place backward).
cudaError_t launch_logprobs_backward(const LogprobsParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.V == 0) return cudaSuccess;
  const float scale = log2_scale(p.temperature), inv_t = inv_temperature(p.temperature);
  const dim3 grid(static_cast<unsigned int>(p.N), blocks_for(p.V, int(kBackwardChunk)));
  return launch_logits_typed(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* logits = static_cast<const T*>(p.logits);
    T* grad = static_cast<T*>(p.grad);
    if (p.grad_entropy != nullptr)
      logprobs_backward_kernel<T, true><<<grid, kThreads, 0, stream>>>(
          logits, p.rows, grad, p.grad_rows, p.V, p.labels, p.ignore_index, p.vocab_start, p.grad_logprobs,
          p.grad_entropy, p.entropy, p.saved, scale, inv_t);
    else
      logprobs_backward_kernel<T, false><<<grid, kThreads, 0, stream>>>(
          logits, p.rows, grad, p.grad_rows, p.V, p.labels, p.ignore_index, p.vocab_start, p.grad_logprobs,
          p.grad_entropy, p.entropy, p.saved, scale, inv_t);
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/logprobs.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
// Torch-facing CUDA ops of logprobs (forward, vocabulary tile, backward).
// Labels are range-checked in Python (a device read here would synchronise);
// the kernels never read outside a row.
#include "../args/logprobs.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                             double temperature, int64_t ignore_index,
                                                             bool with_entropy, bool /*inplace_backward*/) {
  c10::cuda::CUDAGuard guard(logits.device());
  LogprobsOutputs out;
  LogprobsParams p = logprobs_args(logits, labels, temperature, ignore_index, with_entropy, out);
  const int64_t chunks = cuda::vocab_chunks(p.V);
  TORCH_CHECK(chunks <= cuda::kMaxVocabChunks, "logprobs: the vocabulary (", p.V, ") exceeds ",
              cuda::kMaxVocabChunks * cuda::kVocabChunk, " logits a row on CUDA");
  p.splits = static_cast<int>(chunks);
  TORCH_CHECK(p.N <= 0x7fffffff, "logprobs: ", p.N, " rows exceed 2^31 - 1 on CUDA");
  const at::Tensor workspace =
      at::empty({p.splits > 1 ? 3 * p.N * p.splits : 0}, logits.options().dtype(at::kFloat));
  p.workspace = p.splits > 1 ? workspace.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(cuda::launch_logprobs_forward(p, current_stream()));
  return {out.logprobs, out.entropy, out.saved};
}

void logprobs_vocab_tile_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& state,
                              double temperature, int64_t ignore_index, int64_t vocab_start, bool with_entropy,
                              bool finish) {
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor x;
  const LogprobsParams p = logprobs_vocab_tile_args(logits, labels, state, temperature, ignore_index, vocab_start,
                                                    with_entropy, finish, x);
  C10_CUDA_CHECK(cuda::launch_logprobs_vocab_tile(p, current_stream()));
}

void logprobs_backward_run(const LogprobsParams& p, const at::Tensor& logits) {
  c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(cuda::launch_logprobs_backward(p, current_stream()));
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("logprobs", &rlk::logprobs_cuda);
  m.impl("logprobs_backward", &rlk::logprobs_backward_op<rlk::logprobs_backward_run>);
  m.impl("logprobs_backward_inplace", &rlk::logprobs_backward_inplace_op<rlk::logprobs_backward_run>);
  m.impl("logprobs_vocab_tile", &rlk::logprobs_vocab_tile_cuda);
}
#endif  // TORCH_EXTENSION_NAME
