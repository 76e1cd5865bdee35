// Torch-facing CUDA launches for the logprobs family (logprobs, kl_from_logits,
// kl_penalty): checks, allocation, current stream; the kernels are in
// logprobs.cu and kl_penalty.cu.  Labels are range-checked in Python (a device
// read here would synchronise); the kernels never read outside a row.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>

#include "../args/logprobs.h"
#include "../core/kl_penalty.h"
#include "../core/logprobs.h"
#include "../torch_common.h"
#include "cuda_types.h"
#include "launchers.h"

namespace rlk {
namespace {

template <class T> struct dev { using type = T; };
template <> struct dev<c10::Half> { using type = __half; };
template <> struct dev<c10::BFloat16> { using type = __nv_bfloat16; };

// Runs f(T{}) with T the device type of the logits' dtype.
template <class F>
void dispatch_logits(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    default: TORCH_CHECK(false, op, ": logits must be float32, bfloat16 or float16, got ", dtype);
  }
}

template <class T> const T* ptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <class T> T* mut_ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// Blocks per row: split-V (a few long rows spread over several blocks each) depends on
// the number of rows, so a row's statistics may round differently alone than in a big
// batch.  RLKERNELS_BATCH_INVARIANT=1 keeps one block per row: bitwise the same result
// for a row whatever its batch, at the cost of idle SMs when rows are few.
int row_splits(int64_t N, int64_t V, int sm_count) {
  const char* flag = std::getenv("RLKERNELS_BATCH_INVARIANT");
  if (flag != nullptr && flag[0] == '1') return 1;
  return cuda::logprobs_splits(N, V, sm_count);
}

int sm_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                             double temperature, int64_t ignore_index,
                                                             bool with_entropy, bool /*inplace_backward*/) {
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor logprobs, entropy, saved;
  std::tie(logprobs, entropy, saved) = logprobs_outputs(logits, labels, temperature, with_entropy);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  RowIndex rows;
  const at::Tensor x = rows_readable(logits, &rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  const auto f32 = logits.options().dtype(at::kFloat);
  const int splits = row_splits(N, V, sm_count());
  at::Tensor workspace = at::empty({splits > 1 ? 3 * N * splits : 0}, f32);
  dispatch_logits(x.scalar_type(), "logprobs", [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::launch_logprobs_forward<T>(
        ptr<T>(x), rows, N, V, labels.data_ptr<int64_t>(), ignore_index, temperature, with_entropy,
        logprobs.data_ptr<float>(), with_entropy ? entropy.data_ptr<float>() : nullptr, saved.data_ptr<float>(),
        splits > 1 ? workspace.data_ptr<float>() : nullptr, splits, stream));
  });
  return {logprobs, entropy, saved};
}

void logprobs_vocab_tile_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& state,
                              double temperature, int64_t ignore_index, int64_t vocab_start, bool with_entropy,
                              bool finish) {
  const int width = check_vocab_tile(logits, labels, state, temperature, vocab_start);
  c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  RowIndex rows;
  const at::Tensor x = rows_readable(logits, &rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  dispatch_logits(x.scalar_type(), "logprobs_vocab_tile", [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::launch_logprobs_vocab_tile<T>(ptr<T>(x), rows, N, V, labels.data_ptr<int64_t>(),
                                                       ignore_index, vocab_start, temperature, with_entropy,
                                                       state.data_ptr<float>(), width, finish, stream));
  });
}

void logprobs_backward_into(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                            const at::Tensor& entropy, double temperature, int64_t ignore_index,
                            int64_t vocab_start, const at::Tensor& grad) {
  check_logprobs_backward(grad_logprobs, grad_entropy, logits, labels, saved, entropy, vocab_start);
  const bool with_entropy = grad_entropy.has_value();
  c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  RowIndex rows, grad_rows;
  const at::Tensor x = rows_readable(logits, &rows);
  TORCH_CHECK(row_index_of(grad, &grad_rows) && grad.scalar_type() == x.scalar_type(),
              "internal: gradient layout or dtype");
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  dispatch_logits(x.scalar_type(), "logprobs_backward", [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::launch_logprobs_backward<T>(
        ptr<T>(x), rows, mut_ptr<T>(grad), grad_rows, N, V, labels.data_ptr<int64_t>(), ignore_index, vocab_start,
        grad_logprobs.data_ptr<float>(), with_entropy ? grad_entropy->data_ptr<float>() : nullptr,
        with_entropy ? entropy.data_ptr<float>() : nullptr, saved.data_ptr<float>(), temperature, stream));
  });
}

at::Tensor logprobs_backward_cuda(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                                  const at::Tensor& entropy, double temperature, int64_t ignore_index,
                                  int64_t vocab_start) {
  c10::cuda::CUDAGuard guard(logits.device());
  return logprobs_grad_fresh(logits, [&](const at::Tensor& grad) {
    logprobs_backward_into(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                           vocab_start, grad);
  });
}

void logprobs_backward_inplace_cuda(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                                    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                                    const at::Tensor& entropy, double temperature, int64_t ignore_index,
                                    int64_t vocab_start) {
  c10::cuda::CUDAGuard guard(logits.device());
  logprobs_grad_inplace(logits, [&](const at::Tensor& grad) {
    logprobs_backward_into(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                           vocab_start, grad);
  });
}

std::tuple<at::Tensor, at::Tensor> kl_from_logits_cuda(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                       const c10::optional<at::Tensor>& mask, double temperature) {
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor kl, saved;
  std::tie(kl, saved) = kl_outputs(logits, ref_logits, temperature);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  RowIndex rows, ref_rows;
  const at::Tensor a = rows_readable(logits, &rows), b = rows_readable(ref_logits, &ref_rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  const auto f32 = logits.options().dtype(at::kFloat);
  const int splits = row_splits(N, V, sm_count());
  at::Tensor workspace = at::empty({splits > 1 ? 5 * N * splits : 0}, f32);
  const bool* mask_p = optional_row_mask(mask, logits);
  dispatch_logits(a.scalar_type(), "kl_from_logits", [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::launch_kl_forward<T>(ptr<T>(a), rows, ptr<T>(b), ref_rows, N, V, mask_p, temperature,
                                              kl.data_ptr<float>(), saved.data_ptr<float>(),
                                              splits > 1 ? workspace.data_ptr<float>() : nullptr, splits, stream));
  });
  return {kl, saved};
}

std::tuple<at::Tensor, at::Tensor> kl_from_logits_backward_cuda(const at::Tensor& grad_kl, const at::Tensor& logits,
                                                                const at::Tensor& ref_logits,
                                                                const c10::optional<at::Tensor>& mask,
                                                                const at::Tensor& saved, double temperature,
                                                                bool logits_grad, bool ref_grad) {
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor ga, gb;
  std::tie(ga, gb) = kl_grad_outputs(grad_kl, logits, ref_logits, saved, logits_grad, ref_grad);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  RowIndex rows, ref_rows;
  const at::Tensor a = rows_readable(logits, &rows), b = rows_readable(ref_logits, &ref_rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  const bool* mask_p = optional_row_mask(mask, logits);
  dispatch_logits(a.scalar_type(), "kl_from_logits_backward", [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cuda::launch_kl_backward<T>(ptr<T>(a), rows, ptr<T>(b), ref_rows, N, V, mask_p,
                                               grad_kl.data_ptr<float>(), saved.data_ptr<float>(), temperature,
                                               logits_grad ? mut_ptr<T>(ga) : nullptr,
                                               ref_grad ? mut_ptr<T>(gb) : nullptr, stream));
  });
  return {ga, gb};
}

std::tuple<at::Tensor, at::Tensor> kl_penalty_cuda(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                   c10::string_view kind, double clamp) {
  c10::cuda::CUDAGuard guard(logprobs.device());
  const KlPenaltyArgs k = kl_penalty_args(logprobs, ref_logprobs, kind, clamp);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.lp.scalar_type(), "kl_penalty_cuda", [&] {
    using acc = acc_t<scalar_t>;
    using T = typename dev<scalar_t>::type;
    const cudaError_t status = cuda::launch_kl_penalty<T, acc>(ptr<T>(k.lp), ptr<T>(k.ref), k.lp.numel(), k.code,
                                                               clamp, k.value.data_ptr<acc>(),
                                                               k.slope.data_ptr<acc>(), stream);
    C10_CUDA_CHECK(status);
  });
  return {k.value, k.slope};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("logprobs", &rlk::logprobs_cuda);
  m.impl("logprobs_backward", &rlk::logprobs_backward_cuda);
  m.impl("logprobs_backward_inplace", &rlk::logprobs_backward_inplace_cuda);
  m.impl("logprobs_vocab_tile", &rlk::logprobs_vocab_tile_cuda);
  m.impl("kl_from_logits", &rlk::kl_from_logits_cuda);
  m.impl("kl_from_logits_backward", &rlk::kl_from_logits_backward_cuda);
  m.impl("kl_penalty", &rlk::kl_penalty_cuda);
}
