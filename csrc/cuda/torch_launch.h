// What the torch part of every csrc/cuda/<family>.cu needs besides its args/ header (which
// brings the family's params and launchers): the device guard and the current
// stream.  An op fills its params with args/, launches with them whole, and
// turns a failed launch into an error.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace rlk {

// The current stream of the device a CUDAGuard has selected.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace rlk
