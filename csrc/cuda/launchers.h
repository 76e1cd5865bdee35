// Launchers of the torch-free CUDA kernels.  Each takes its family's params
// struct whole (core/<family>.h, filled once by args/<family>.h) and a stream,
// and picks the kernels' template instance from the struct's dtype.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "../core/gae.h"
#include "../core/group_advantages.h"
#include "../core/kl_from_logits.h"
#include "../core/kl_penalty.h"
#include "../core/logprobs.h"
#include "../core/masked.h"
#include "../core/multi_tensor.h"
#include "../core/policy_loss.h"
#include "../core/preference.h"
#include "../core/value_loss.h"

namespace rlk {
namespace cuda {

// gae.cu
cudaError_t launch_gae(const GaeParams& p, cudaStream_t stream);
cudaError_t launch_discounted_returns(const GaeParams& p, cudaStream_t stream);
// group_advantages.cu
cudaError_t launch_group_advantages(const GroupAdvantagesParams& p, cudaStream_t stream);
// masked.cu
cudaError_t launch_masked_row_mean(const MaskedParams& p, cudaStream_t stream);
cudaError_t launch_masked_whiten(const MaskedParams& p, cudaStream_t stream);

// token_loss.cu: the doubles of p.rows.workspace policy_loss / value_loss need
// (slots: kPolicySlots or kValueSlots), and scale_rows, their backward.
int64_t token_loss_workspace(int64_t B, int64_t T, int slots);
cudaError_t launch_scale_rows(const ScaleRowsParams& p, cudaStream_t stream);
// policy_loss.cu, value_loss.cu
cudaError_t launch_policy_loss(const PolicyLossParams& p, cudaStream_t stream);
cudaError_t launch_value_loss(const ValueLossParams& p, cudaStream_t stream);

// preference.cu
cudaError_t launch_dpo_loss(const PreferenceParams& p, cudaStream_t stream);
cudaError_t launch_sequence_logprobs(const SequenceLogprobsParams& p, cudaStream_t stream);
cudaError_t launch_sequence_logprobs_backward(const SequenceLogprobsParams& p, cudaStream_t stream);

// logprobs.cu.  Blocks that share one row of the forward (split-V for few long
// rows): p.splits of logprobs_splits, with 3 * N * splits floats of workspace
// when > 1 (5 * N * splits for kl_from_logits).
int logprobs_splits(int64_t N, int64_t V, int sm_count);
cudaError_t launch_logprobs_forward(const LogprobsParams& p, cudaStream_t stream);
cudaError_t launch_logprobs_vocab_tile(const LogprobsParams& p, cudaStream_t stream);
cudaError_t launch_logprobs_backward(const LogprobsParams& p, cudaStream_t stream);
// kl_from_logits.cu
cudaError_t launch_kl_from_logits(const KlFromLogitsParams& p, cudaStream_t stream);
cudaError_t launch_kl_from_logits_backward(const KlFromLogitsParams& p, cudaStream_t stream);
// kl_penalty.cu
cudaError_t launch_kl_penalty(const KlPenaltyParams& p, cudaStream_t stream);

// multi_tensor.cu: host arrays of device pointers, any count of tensors.
cudaError_t launch_pack_tensors(const MultiTensorParams& p, cudaStream_t stream);
cudaError_t launch_unpack_tensors(const MultiTensorParams& p, cudaStream_t stream);
cudaError_t launch_gossip_mix(const GossipMixParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlk
