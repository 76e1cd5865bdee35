// What the torch part of every csrc/cuda/<family>.cu needs besides its args/ header (which
// brings the family's params and launchers): the device guard and the current
// stream.  An op fills its params with args/, launches with them whole, and
// turns a failed launch into an error.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>

#include "../core/logprobs.h"

namespace rlk {

// The current stream of the device a CUDAGuard has selected.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Blocks per row of the logprobs and kl_from_logits forwards.  Split-V (a few
// long rows spread over several blocks each) depends on the number of rows, so
// a row's statistics may round differently alone than in a big batch.
// RLKERNELS_BATCH_INVARIANT=1 keeps one block per row: bitwise the same result
// for a row whatever its batch, at the cost of idle SMs when rows are few.
inline int forward_splits(int64_t N, int64_t V) {
  const char* flag = std::getenv("RLKERNELS_BATCH_INVARIANT");
  if (flag != nullptr && flag[0] == '1') return 1;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return cuda::logprobs_splits(N, V, sm_count);
}

}  // namespace rlk
