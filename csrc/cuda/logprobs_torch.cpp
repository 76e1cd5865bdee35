// Torch-facing CUDA launches for the logprobs family (logprobs, kl_from_logits,
// kl_penalty): checks, allocation, current stream; the kernels are in
// logprobs.cu and kl_penalty.cu.  Labels are range-checked in Python (a device
// read here would synchronise); the kernels never read outside a row.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>

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
  check_labels_shape(logits, labels, "logprobs");
  TORCH_CHECK(temperature > 0, "logprobs: temperature must be > 0, got ", temperature);
  c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  RowIndex rows;
  const at::Tensor x = rows_readable(logits, &rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty(leading_shape(logits), f32);
  at::Tensor entropy = at::empty(with_entropy ? leading_shape(logits) : std::vector<int64_t>{0}, f32);
  at::Tensor saved = at::empty(leading_shape(logits, 2), f32);
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

void logprobs_backward_into(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                            const at::Tensor& entropy, double temperature, int64_t ignore_index,
                            int64_t vocab_start, const at::Tensor& grad) {
  TORCH_CHECK(vocab_start >= 0, "logprobs_backward: vocab_start must be >= 0, got ", vocab_start);
  check_labels_shape(logits, labels, "logprobs_backward");
  check_row_floats(grad_logprobs, logits, "grad_logprobs", 1);
  check_row_floats(saved, logits, "saved", 2);
  const bool with_entropy = grad_entropy.has_value();
  if (with_entropy) {
    check_row_floats(*grad_entropy, logits, "grad_entropy", 1);
    check_row_floats(entropy, logits, "entropy", 1);
  }
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
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  logprobs_backward_into(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                         vocab_start, grad);
  return grad;
}

void logprobs_backward_inplace_cuda(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                                    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                                    const at::Tensor& entropy, double temperature, int64_t ignore_index,
                                    int64_t vocab_start) {
  RowIndex rows;
  if (row_index_of(logits, &rows)) {
    logprobs_backward_into(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                           vocab_start, logits);
  } else {
    logits.copy_(logprobs_backward_cuda(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature,
                                        ignore_index, vocab_start));
  }
}

std::tuple<at::Tensor, at::Tensor> kl_from_logits_cuda(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                       const c10::optional<at::Tensor>& mask, double temperature) {
  check_kl_pair(logits, ref_logits);
  TORCH_CHECK(temperature > 0, "kl_from_logits: temperature must be > 0, got ", temperature);
  c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  RowIndex rows, ref_rows;
  const at::Tensor a = rows_readable(logits, &rows), b = rows_readable(ref_logits, &ref_rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor kl = at::empty(leading_shape(logits), f32);
  at::Tensor saved = at::empty(leading_shape(logits, 5), f32);
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
  check_kl_pair(logits, ref_logits);
  check_row_floats(grad_kl, logits, "grad_kl", 1);
  check_row_floats(saved, logits, "saved", 5);
  c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  RowIndex rows, ref_rows;
  const at::Tensor a = rows_readable(logits, &rows), b = rows_readable(ref_logits, &ref_rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  at::Tensor ga = at::empty(logits_grad ? logits.sizes() : at::IntArrayRef{0}, logits.options());
  at::Tensor gb = at::empty(ref_grad ? logits.sizes() : at::IntArrayRef{0}, logits.options());
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
  const int code = kl_kind_code(std::string(kind).c_str());
  TORCH_CHECK(code >= 0, "kl_penalty: unknown kind '", kind, "'");
  TORCH_CHECK(clamp > 0, "kl_penalty: clamp must be > 0, got ", clamp);
  TORCH_CHECK(ref_logprobs.sizes() == logprobs.sizes() && ref_logprobs.scalar_type() == logprobs.scalar_type() &&
                  ref_logprobs.device() == logprobs.device(),
              "kl_penalty: ref_logprobs must have the shape, dtype and device of logprobs");
  c10::cuda::CUDAGuard guard(logprobs.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor lp = logprobs.contiguous(), ref = ref_logprobs.contiguous();
  const auto out_dtype = out_dtype_for(lp.scalar_type());
  at::Tensor value = at::empty(lp.sizes(), lp.options().dtype(out_dtype));
  at::Tensor slope = at::empty(lp.sizes(), lp.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), "kl_penalty_cuda", [&] {
    using acc = acc_t<scalar_t>;
    using T = typename dev<scalar_t>::type;
    const cudaError_t status = cuda::launch_kl_penalty<T, acc>(ptr<T>(lp), ptr<T>(ref), lp.numel(), code, clamp,
                                                               value.data_ptr<acc>(), slope.data_ptr<acc>(), stream);
    C10_CUDA_CHECK(status);
  });
  return {value, slope};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("logprobs", &rlk::logprobs_cuda);
  m.impl("logprobs_backward", &rlk::logprobs_backward_cuda);
  m.impl("logprobs_backward_inplace", &rlk::logprobs_backward_inplace_cuda);
  m.impl("kl_from_logits", &rlk::kl_from_logits_cuda);
  m.impl("kl_from_logits_backward", &rlk::kl_from_logits_backward_cuda);
  m.impl("kl_penalty", &rlk::kl_penalty_cuda);
}
