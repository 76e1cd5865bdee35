// Launchers for the torch-free CUDA kernels: raw pointers and a stream.
// Every .cu file instantiates its launchers for float, double, __half and
// __nv_bfloat16; the *_torch.cpp files map at::Half/at::BFloat16 onto them.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "../core/rows.h"

namespace rlk {
namespace cuda {

template <typename in_t, typename out_t>
cudaError_t launch_gae(const in_t* rewards, const in_t* values, const uint8_t* mask,
                       const uint8_t* dones, const out_t* last_values, int64_t B, int64_t T,
                       double gamma, double lam, out_t* advantages, out_t* returns,
                       cudaStream_t stream);

template <typename in_t, typename out_t>
cudaError_t launch_discounted_returns(const in_t* rewards, const uint8_t* mask, const uint8_t* dones,
                                      int64_t B, int64_t T, double gamma, out_t* returns,
                                      cudaStream_t stream);

// ---- logprobs family (logprobs.cu); T is float, __half or __nv_bfloat16 ------------------------
// Blocks that share one row of the forward pass (split-V for long rows and few of
// them); the forward needs 3 * N * splits floats of workspace when splits > 1.
int logprobs_splits(int64_t N, int64_t V, int sm_count);

template <typename T>
cudaError_t launch_logprobs_forward(const T* logits, RowIndex rows, int64_t N, int64_t V, const int64_t* labels,
                                    int64_t ignore_index, double temperature, bool with_entropy, float* logprobs,
                                    float* entropy, float* saved, float* workspace, int splits,
                                    cudaStream_t stream);

// One vocabulary tile [vocab_start, vocab_start + V) of each row merged into its
// running state (width 4 or, with the arg-max flag, 5 floats a row, core/logprobs.h);
// finish turns the state into outputs.
template <typename T>
cudaError_t launch_logprobs_vocab_tile(const T* logits, RowIndex rows, int64_t N, int64_t V, const int64_t* labels,
                                       int64_t ignore_index, int64_t vocab_start, double temperature,
                                       bool with_entropy, float* state, int width, bool finish,
                                       cudaStream_t stream);

// grad may alias logits (in-place backward); grad_entropy and entropy may be null.
// logits may be a vocabulary tile starting at column vocab_start of the rows.
template <typename T>
cudaError_t launch_logprobs_backward(const T* logits, RowIndex rows, T* grad, RowIndex grad_rows, int64_t N,
                                     int64_t V, const int64_t* labels, int64_t ignore_index, int64_t vocab_start,
                                     const float* grad_logprobs, const float* grad_entropy, const float* entropy,
                                     const float* saved, double temperature, cudaStream_t stream);

// KL(pi || pi_ref): 5 * N * splits floats of workspace when splits > 1.
template <typename T>
cudaError_t launch_kl_forward(const T* logits, RowIndex rows, const T* ref, RowIndex ref_rows, int64_t N, int64_t V,
                              const bool* mask, double temperature, float* kl, float* saved, float* workspace,
                              int splits, cudaStream_t stream);

// grad_logits / grad_ref: dense [N, V] or null.
template <typename T>
cudaError_t launch_kl_backward(const T* logits, RowIndex rows, const T* ref, RowIndex ref_rows, int64_t N, int64_t V,
                               const bool* mask, const float* grad_kl, const float* saved, double temperature,
                               T* grad_logits, T* grad_ref, cudaStream_t stream);

// kl_penalty (kl_penalty.cu): in_t float, double, __half, __nv_bfloat16; out_t float or double.
template <typename in_t, typename out_t>
cudaError_t launch_kl_penalty(const in_t* logprobs, const in_t* ref_logprobs, int64_t n, int kind, double clamp,
                              out_t* value, out_t* slope, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlk

namespace rlk {
namespace cuda {

template <typename in_t, typename out_t>
cudaError_t launch_group_advantages(const in_t* scores, const int64_t* group_index, int64_t N,
                                    int64_t group_size, int64_t num_groups, int baseline, int scale,
                                    double eps, out_t* advantages, bool* all_equal, cudaStream_t stream);

template <typename in_t, typename out_t>
cudaError_t launch_masked_row_mean(const in_t* x, const uint8_t* mask, int64_t R, int64_t C, out_t* out,
                                   cudaStream_t stream);

template <typename in_t, typename out_t>
cudaError_t launch_masked_whiten(const in_t* x, const uint8_t* mask, int64_t N, bool shift_mean, double eps,
                                 out_t* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlk

namespace rlk {
namespace cuda {

// Token-level losses (losses.cu).  Normalisers < 0 mean "count them";
// dual_clip and log_ratio_clamp are +inf when off; kl_kind is rlk::KLKind and
// agg rlk::Agg as int.  `workspace` holds token_loss_workspace(B, T, slots)
// doubles (slots: kPolicySlots or kValueSlots); `grad` may be null.
int64_t token_loss_workspace(int64_t B, int64_t T, int slots);

template <typename in_t, typename acc>
cudaError_t launch_policy_loss(const in_t* logprobs, const in_t* old_logprobs, const in_t* advantages,
                               bool advantages_per_row, const in_t* weights, const in_t* ref_logprobs,
                               const uint8_t* mask, int64_t B, int64_t T, double clip_low, double clip_high,
                               double dual_clip, double log_ratio_clamp, double kl_coef, int kl_kind, int agg,
                               double num_tokens, double num_seqs, double norm_length, acc* grad, acc* row_scale,
                               acc* loss, acc* stats, double* workspace, cudaStream_t stream);

// out[b, t] = grad[b, t] * (*grad_loss * row_scale[b]) in out_t (the token losses' backward).
template <typename out_t, typename acc>
cudaError_t launch_scale_rows(const acc* grad, const acc* row_scale, const acc* grad_loss, int64_t B, int64_t T,
                              out_t* out, cudaStream_t stream);

template <typename in_t, typename acc>
cudaError_t launch_value_loss(const in_t* values, const in_t* old_values, const in_t* returns, const uint8_t* mask,
                              int64_t B, int64_t T, bool has_clip, double clip, int agg, double num_tokens,
                              double num_seqs, double norm_length, acc* grad, acc* row_scale, acc* loss,
                              acc* stats, double* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlk

namespace rlk {
namespace cuda {

// Preference losses (preference.cu); kind is rlk::PreferenceKind as int.
template <typename in_t, typename acc>
cudaError_t launch_dpo_loss(const in_t* policy_chosen, const in_t* policy_rejected, const in_t* ref_chosen,
                            const in_t* ref_rejected, int64_t B, int kind, double beta, double label_smoothing,
                            acc* losses, acc* chosen_rewards, acc* rejected_rewards, acc* dlogits,
                            cudaStream_t stream);

template <typename in_t, typename acc>
cudaError_t launch_sequence_logprobs(const in_t* token_logprobs, const uint8_t* mask, int64_t B, int64_t T,
                                     bool average, acc* out, acc* counts, cudaStream_t stream);
// Parameter averaging: many tensors <-> one flat bucket (scale and cast
// fused), and out = w_self * x + w_left * left + w_right * right.  Host
// arrays of device pointers; any count of tensors.
template <typename src_t, typename dst_t>
cudaError_t launch_pack_tensors(const src_t* const* tensors, const int64_t* numels, int64_t count,
                                dst_t* bucket, double scale, cudaStream_t stream);

template <typename src_t, typename dst_t>
cudaError_t launch_unpack_tensors(const src_t* bucket, dst_t* const* tensors, const int64_t* numels,
                                  int64_t count, double scale, cudaStream_t stream);

template <typename T>
cudaError_t launch_gossip_mix(const T* x, const T* left, const T* right, int64_t n, double w_self,
                              double w_left, double w_right, T* out, cudaStream_t stream);

template <typename out_t, typename acc>
cudaError_t launch_sequence_logprobs_backward(const acc* grad, const uint8_t* mask, const acc* num_tokens,
                                              bool average, int64_t B, int64_t T, out_t* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlk
