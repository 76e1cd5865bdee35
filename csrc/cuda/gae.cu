// GAE and discounted returns on the GPU.  The recurrence runs backwards along
// each row, one lane per row, so a warp owns 32 rows and walks them in chunks of
// 32 time steps from the end: the warp first loads the chunk's [32 rows x 32
// steps] of each input through shared memory, lanes reading consecutive steps
// of one row at a time (coalesced), then each lane runs its row's 32 steps out
// of shared memory, and the warp stores the outputs the way it loaded the
// inputs.  A thread per row reading global memory directly (the obvious
// kernel) has neighbouring lanes T elements apart: every load is a separate
// 32-byte sector.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/gae.h"
#include "dispatch.cuh"

namespace rlk {
namespace cuda {
namespace {

constexpr int kLanes = 32;          // rows per warp, and time steps per chunk
constexpr int kPad = kLanes + 1;    // a value tile's row stride: lane r's reads of column c hit 32 banks
constexpr int kFlagPad = 36;        // the flag tile's, in bytes: 9 words (odd), again 32 banks
constexpr uint8_t kValid = 1, kDone = 2;

// Warps per block: the tiles of a warp take (2 x 32 x 33) accumulators plus the
// flags, under 48 KB of static shared memory a block.
template <typename acc>
__host__ __device__ constexpr int warps_for() { return sizeof(acc) == 8 ? 2 : 4; }

// The rows [row0, row0 + 32) x steps [t0, t0 + width) of x (row stride T) into
// tile[r][c], lane c reading column c of every row: consecutive lanes read
// consecutive addresses.
template <typename in_t, typename acc>
__device__ __forceinline__ void load_tile(const in_t* __restrict__ x, int64_t row0, int64_t B, int64_t T,
                                          int64_t t0, int width, acc (*tile)[kPad]) {
  const int lane = threadIdx.x % kLanes;
  if (lane >= width) return;
#pragma unroll 8
  for (int r = 0; r < kLanes; ++r)
    if (row0 + r < B) tile[r][lane] = cast<acc>(x[(row0 + r) * T + t0 + lane]);
}

template <typename out_t>
__device__ __forceinline__ void store_tile(out_t* __restrict__ x, int64_t row0, int64_t B, int64_t T, int64_t t0,
                                           int width, const out_t (*tile)[kPad]) {
  const int lane = threadIdx.x % kLanes;
  if (lane >= width) return;
#pragma unroll 8
  for (int r = 0; r < kLanes; ++r)
    if (row0 + r < B) x[(row0 + r) * T + t0 + lane] = tile[r][lane];
}

// mask (absent: every step valid) and dones (absent: none) as kValid | kDone bits.
__device__ __forceinline__ void load_flags(const uint8_t* __restrict__ mask, const uint8_t* __restrict__ dones,
                                           int64_t row0, int64_t B, int64_t T, int64_t t0, int width,
                                           uint8_t (*flags)[kFlagPad]) {
  const int lane = threadIdx.x % kLanes;
  if (lane >= width) return;
#pragma unroll 8
  for (int r = 0; r < kLanes; ++r) {
    if (row0 + r >= B) continue;
    const int64_t i = (row0 + r) * T + t0 + lane;
    const bool valid = mask == nullptr || mask[i] != 0, done = dones != nullptr && dones[i] != 0;
    flags[r][lane] = uint8_t((valid ? kValid : 0) | (done ? kDone : 0));
  }
}

// The rows of the calling warp, and its lane's own row.
struct WarpRows {
  int64_t row0, row;
  int warp;
};

template <int kWarps>
__device__ __forceinline__ WarpRows warp_rows() {
  const int warp = threadIdx.x / kLanes;
  const int64_t row0 = (int64_t(blockIdx.x) * kWarps + warp) * kLanes;
  return {row0, row0 + threadIdx.x % kLanes, warp};
}

template <typename in_t, typename acc>
__global__ void __launch_bounds__(warps_for<acc>() * kLanes)
    gae_kernel(const in_t* __restrict__ rewards, const in_t* __restrict__ values, const uint8_t* __restrict__ mask,
               const uint8_t* __restrict__ dones, const acc* __restrict__ last_values, int64_t B, int64_t T,
               acc gamma, acc lam, acc* __restrict__ advantages, acc* __restrict__ returns) {
  constexpr int kWarps = warps_for<acc>();
  __shared__ acc reward_tiles[kWarps][kLanes][kPad];  // rewards, then the advantages
  __shared__ acc value_tiles[kWarps][kLanes][kPad];   // values, then the returns
  __shared__ uint8_t flag_tiles[kWarps][kLanes][kFlagPad];
  const WarpRows w = warp_rows<kWarps>();
  if (w.row0 >= B) return;  // the whole warp: only warp-level barriers below
  acc(*rt)[kPad] = reward_tiles[w.warp];
  acc(*vt)[kPad] = value_tiles[w.warp];
  uint8_t(*ft)[kFlagPad] = flag_tiles[w.warp];
  const int r = threadIdx.x % kLanes;
  const bool mine = w.row < B;
  acc next_value = mine && last_values != nullptr ? last_values[w.row] : acc(0);
  acc carry = acc(0);
  const acc gl = gamma * lam;
  for (int64_t t0 = (T - 1) / kLanes * kLanes; t0 >= 0; t0 -= kLanes) {
    const int width = T - t0 < kLanes ? int(T - t0) : kLanes;
    load_tile(rewards, w.row0, B, T, t0, width, rt);
    load_tile(values, w.row0, B, T, t0, width, vt);
    load_flags(mask, dones, w.row0, B, T, t0, width, ft);
    __syncwarp();
    if (mine) {
      for (int c = width - 1; c >= 0; --c) {
        const acc v = vt[r][c];
        gae_step<acc>(rt[r][c], v, (ft[r][c] & kValid) != 0, (ft[r][c] & kDone) != 0, gamma, gl, next_value, carry);
        rt[r][c] = carry;
        vt[r][c] = carry + v;
      }
    }
    __syncwarp();
    store_tile(advantages, w.row0, B, T, t0, width, rt);
    store_tile(returns, w.row0, B, T, t0, width, vt);
    __syncwarp();  // the next chunk's loads overwrite the tiles
  }
}

template <typename in_t, typename acc>
__global__ void __launch_bounds__(warps_for<acc>() * kLanes)
    discounted_returns_kernel(const in_t* __restrict__ rewards, const uint8_t* __restrict__ mask,
                              const uint8_t* __restrict__ dones, int64_t B, int64_t T, acc gamma,
                              acc* __restrict__ returns) {
  constexpr int kWarps = warps_for<acc>();
  __shared__ acc reward_tiles[kWarps][kLanes][kPad];  // rewards, then the returns
  __shared__ uint8_t flag_tiles[kWarps][kLanes][kFlagPad];
  const WarpRows w = warp_rows<kWarps>();
  if (w.row0 >= B) return;
  acc(*rt)[kPad] = reward_tiles[w.warp];
  uint8_t(*ft)[kFlagPad] = flag_tiles[w.warp];
  const int r = threadIdx.x % kLanes;
  const bool mine = w.row < B;
  acc carry = acc(0);
  for (int64_t t0 = (T - 1) / kLanes * kLanes; t0 >= 0; t0 -= kLanes) {
    const int width = T - t0 < kLanes ? int(T - t0) : kLanes;
    load_tile(rewards, w.row0, B, T, t0, width, rt);
    load_flags(mask, dones, w.row0, B, T, t0, width, ft);
    __syncwarp();
    if (mine) {
      for (int c = width - 1; c >= 0; --c) {
        discounted_step<acc>(rt[r][c], (ft[r][c] & kValid) != 0, (ft[r][c] & kDone) != 0, gamma, carry);
        rt[r][c] = carry;
      }
    }
    __syncwarp();
    store_tile(returns, w.row0, B, T, t0, width, rt);
    __syncwarp();
  }
}

template <typename acc>
unsigned int blocks_for(int64_t rows) {
  constexpr int64_t per_block = int64_t(warps_for<acc>()) * kLanes;
  return static_cast<unsigned int>((rows + per_block - 1) / per_block);
}

}  // namespace

cudaError_t launch_gae(const GaeParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0) return cudaSuccess;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    gae_kernel<in_t, out_t><<<blocks_for<out_t>(p.B), warps_for<out_t>() * kLanes, 0, stream>>>(
        static_cast<const in_t*>(p.rewards), static_cast<const in_t*>(p.values), p.mask, p.dones,
        static_cast<const out_t*>(p.last_values), p.B, p.T, out_t(p.gamma), out_t(p.lam),
        static_cast<out_t*>(p.advantages), static_cast<out_t*>(p.returns));
  });
}

cudaError_t launch_discounted_returns(const GaeParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0) return cudaSuccess;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    discounted_returns_kernel<in_t, out_t><<<blocks_for<out_t>(p.B), warps_for<out_t>() * kLanes, 0, stream>>>(
        static_cast<const in_t*>(p.rewards), p.mask, p.dones, p.B, p.T, out_t(p.gamma),
        static_cast<out_t*>(p.returns));
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/gae.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
#include "../args/gae.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& dones,
                                            const c10::optional<at::Tensor>& last_values,
                                            double gamma, double lam) {
  c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor advantages, returns;
  const GaeParams p = gae_args(rewards, values, mask, dones, last_values, gamma, lam, advantages, returns);
  C10_CUDA_CHECK(cuda::launch_gae(p, current_stream()));
  return {advantages, returns};
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards, const c10::optional<at::Tensor>& mask,
                                   const c10::optional<at::Tensor>& dones, double gamma) {
  c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor returns;
  const GaeParams p = discounted_returns_args(rewards, mask, dones, gamma, returns);
  C10_CUDA_CHECK(cuda::launch_discounted_returns(p, current_stream()));
  return returns;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("gae", &rlk::gae_cuda);
  m.impl("discounted_returns", &rlk::discounted_returns_cuda);
}
#endif  // TORCH_EXTENSION_NAME
