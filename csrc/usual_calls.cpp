// The usual call of the costliest front ends (rlkernels.ppo_loss / grpo_loss through
// ops/policy_loss.py `_policy`, rlkernels.linear_ppo_loss, rlkernels.linear_logprobs and
// rlkernels.gossip_mix), checked and run in one
// compiled call.  Each function returns None unless every argument is of the usual kind
// (plain CPU tensors of matching shapes, dtypes and layouts; numbers inside their ranges;
// no tensor subclass, dispatch or torch-function mode), in which case the Python checks
// would pass as well; then it calls the op through the dispatcher (its C++ autograd
// included) with the arguments the Python path would give it, so results are the same
// bits.  None means "not shown": the caller runs its Python checks, which raise the exact
// error or handle the rarer kinds (CUDA tensors, promotions, packed batches, ...).  An
// error inside the op (a label out of range) also returns None, and the Python path then
// raises its named error.  tests/test_usual_calls.py holds each function to its Python path.
#include "usual_calls.h"

#include "dispatcher.h"

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace rlk::usual {
namespace {

using Opt = std::optional<at::Tensor>;

// No Python mode would see (or change) the calls the Python path makes.
bool no_python_modes() {
  return c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !at::impl::torch_function_mode_enabled();
}

// Keys a plain dense tensor never has besides those host_readable rules out:
// functionalisation, lazy conjugation or negation.
const c10::DispatchKeySet kUnusualKeys{c10::DispatchKey::Functionalize, c10::DispatchKey::Conjugate,
                                       c10::DispatchKey::Negative, c10::DispatchKey::ZeroTensor};

// `h` as a plain CPU tensor (exactly torch.Tensor or nn.Parameter, strided, readable on the
// host: csrc/dispatcher.h), or nullptr.
const at::Tensor* plain(py::handle h) {
  if (!THPVariable_CheckExact(h.ptr())) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(h.ptr());
  if (!t.defined() || t.layout() != at::kStrided || !host_readable(t) || t.key_set().has_any(kUnusualKeys)) {
    return nullptr;
  }
  return &t;
}

// A plain contiguous CPU tensor of `dtype` and exactly `shape`, or nullptr.
const at::Tensor* plain_like(py::handle h, at::ScalarType dtype, at::IntArrayRef shape) {
  const at::Tensor* t = plain(h);
  if (t == nullptr || t->scalar_type() != dtype || t->sizes() != shape || !t->is_contiguous()) return nullptr;
  return t;
}

// None, or a plain contiguous tensor of `dtype` and `shape` (ok is false for anything else).
struct Maybe {
  Opt tensor;
  bool ok = true;
};

Maybe optional_like(py::handle h, at::ScalarType dtype, at::IntArrayRef shape) {
  if (h.is_none()) return {};
  const at::Tensor* t = plain_like(h, dtype, shape);
  if (t == nullptr) return {std::nullopt, false};
  return {*t, true};
}

// A Python int (not a bool) that fits int64.
std::optional<int64_t> integer(py::handle h) {
  PyObject* o = h.ptr();
  if (!PyLong_CheckExact(o)) return std::nullopt;
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0 || (value == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return std::nullopt;
  }
  return static_cast<int64_t>(value);
}

// A Python float or int (not a bool) as a double, or nullopt (other types, huge ints).
std::optional<double> number(py::handle h) {
  if (PyFloat_CheckExact(h.ptr())) return PyFloat_AS_DOUBLE(h.ptr());
  const auto value = integer(h);
  if (!value) return std::nullopt;
  return static_cast<double>(*value);
}

// A finite number in (low, high) (open ends; NaN fails every comparison).
std::optional<double> finite_in(py::handle h, double low, double high) {
  const auto value = number(h);
  if (!value || !std::isfinite(*value) || !(*value > low) || !(*value < high)) return std::nullopt;
  return value;
}

constexpr double kInf = INFINITY;

// An optional number: `absent` for None, else a finite value in (low, inf); nullopt where unusual.
std::optional<double> optional_above(py::handle h, double low, double absent) {
  if (h.is_none()) return absent;
  return finite_in(h, low, kInf);
}

// The string of a Python str (its UTF-8 view lives as long as the object), or nullopt.
std::optional<c10::string_view> str(py::handle h) {
  if (!PyUnicode_CheckExact(h.ptr())) return std::nullopt;
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(h.ptr(), &size);
  if (data == nullptr) {
    PyErr_Clear();
    return std::nullopt;
  }
  return c10::string_view(data, static_cast<size_t>(size));
}

bool is_str(py::handle h, c10::string_view text) {
  const auto value = str(h);
  return value.has_value() && *value == text;
}

bool cpu_backend(py::handle backend) { return is_str(backend, "auto") || is_str(backend, "cpu"); }

bool kl_estimator(py::handle kl) { return is_str(kl, "k1") || is_str(kl, "k2") || is_str(kl, "k3"); }

// The policy op's coefficient list, in csrc/args/policy_loss.h's order, from the Python
// arguments of `_policy` (ops/policy_loss.py) where each is of the usual kind: clip_low in
// (0, 1), clip_high None or > 0, dual_clip None or > 1, log_ratio_clamp None or > 0, the
// normalisers None or > 0, all finite (an infinite one takes the Python path, which gives
// the same coefficient).  kl_coef is the caller's, already checked.
std::optional<std::vector<double>> policy_coefficients(py::handle clip_low, py::handle clip_high,
                                                       py::handle dual_clip, py::handle log_ratio_clamp,
                                                       double kl_coef, py::handle num_tokens, py::handle num_seqs,
                                                       py::handle norm_length) {
  const auto low = finite_in(clip_low, 0.0, 1.0);
  if (!low) return std::nullopt;
  const auto high = clip_high.is_none() ? low : finite_in(clip_high, 0.0, kInf);
  const auto dual = optional_above(dual_clip, 1.0, kInf);
  const auto clamp = optional_above(log_ratio_clamp, 0.0, kInf);
  const auto tokens = optional_above(num_tokens, 0.0, -1.0);
  const auto seqs = optional_above(num_seqs, 0.0, -1.0);
  const auto length = optional_above(norm_length, 0.0, -1.0);
  if (!high || !dual || !clamp || !tokens || !seqs || !length) return std::nullopt;
  return std::vector<double>{*low, *high, *dual, *clamp, kl_coef, *tokens, *seqs, *length};
}

using PolicyOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using PolicySig = PolicyOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&,
                                const Opt&, c10::ArrayRef<double>, c10::string_view, c10::string_view, bool);
using LinearOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LinearSig = LinearOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, c10::ArrayRef<double>,
                                c10::string_view, c10::string_view, double, double, int64_t, int64_t,
                                c10::string_view, const c10::List<bool>&, c10::string_view);

// (loss, {name: stat}) as the Python path returns it.
py::object loss_and_stats(const py::tuple& names, const at::Tensor& loss, const at::Tensor& stats) {
  return py::make_tuple(py::cast(loss), stat_views(names, stats));
}

// _policy's usual call: logprobs a plain CPU [B, T] float tensor, contiguous; old_logprobs,
// weights and ref_logprobs of its dtype and shape (the latter two or None); advantages of
// its dtype, [B, T] or [B]; mask None or bool [B, T]; all contiguous; backend "auto" or "cpu".
py::object policy_loss(const py::tuple& names, py::handle logprobs, py::handle old_logprobs, py::handle advantages,
                       py::handle mask, py::handle weights, py::handle ref_logprobs, py::handle clip_low,
                       py::handle clip_high, py::handle dual_clip, py::handle log_ratio_clamp, py::handle kl_coef,
                       py::handle kl, py::handle agg, py::handle num_tokens, py::handle num_seqs,
                       py::handle norm_length, py::handle backend) {
  if (!no_python_modes() || !cpu_backend(backend)) return py::none();
  const at::Tensor* x = plain(logprobs);
  if (x == nullptr || x->dim() != 2 || !at::isFloatingType(x->scalar_type()) || !x->is_contiguous()) {
    return py::none();
  }
  const at::ScalarType dtype = x->scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf && dtype != at::kBFloat16) return py::none();
  const at::IntArrayRef shape = x->sizes();
  const at::Tensor* old = plain_like(old_logprobs, dtype, shape);
  const at::Tensor* adv = plain(advantages);
  if (old == nullptr || adv == nullptr || adv->scalar_type() != dtype || !adv->is_contiguous() ||
      !(adv->sizes() == shape || (adv->dim() == 1 && adv->size(0) == shape[0]))) {
    return py::none();
  }
  const Maybe w = optional_like(weights, dtype, shape);
  const Maybe ref = optional_like(ref_logprobs, dtype, shape);
  const Maybe valid = optional_like(mask, at::kBool, shape);
  const auto coef = number(kl_coef);
  const auto kl_name = str(kl);
  const auto agg_name = str(agg);
  if (!w.ok || !ref.ok || !valid.ok || !coef || !kl_name || !agg_name) return py::none();
  const auto coefficients =
      policy_coefficients(clip_low, clip_high, dual_clip, log_ratio_clamp, *coef, num_tokens, num_seqs, norm_length);
  if (!coefficients) return py::none();
  const bool need_grad = at::GradMode::is_enabled() && x->requires_grad();
  static const auto policy = op<PolicySig>("rlkernels::policy_loss");
  PolicyOutputs out;
  try {
    py::gil_scoped_release no_gil;
    out = policy.call(*x, *old, *adv, valid.tensor, w.tensor, ref.tensor, *coefficients, *kl_name, *agg_name, need_grad);
  } catch (const c10::Error&) {
    return py::none();  // the Python path raises the named error
  }
  return loss_and_stats(names, std::get<0>(out), std::get<1>(out));
}

// The lm-head arguments of linear_ppo_loss and linear_logprobs: hidden a plain CPU
// [..., H] tensor of a kernel dtype (float32, bfloat16, float16), weight [V, H] and bias
// (None or [V]) plain and of its dtype; nullopt otherwise.
struct LmHead {
  const at::Tensor* hidden;
  const at::Tensor* weight;
  Opt bias;
};

std::optional<LmHead> lm_head(py::handle hidden, py::handle weight, py::handle bias) {
  const at::Tensor* h = plain(hidden);
  if (h == nullptr || h->dim() < 1) return std::nullopt;
  const at::ScalarType dtype = h->scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return std::nullopt;
  const at::Tensor* w = plain(weight);
  if (w == nullptr || w->dim() != 2 || w->scalar_type() != dtype || w->size(1) != h->size(-1)) return std::nullopt;
  LmHead head{h, w, std::nullopt};
  if (!bias.is_none()) {
    const at::Tensor* b = plain(bias);
    if (b == nullptr || b->dim() != 1 || b->scalar_type() != dtype || b->size(0) != w->size(0)) return std::nullopt;
    head.bias = *b;
  }
  return head;
}

// linear_ppo_loss' usual call (ops/linear_ppo_loss.py): hidden a plain CPU [B, T, H] tensor
// of a kernel dtype (float32, bfloat16, float16), weight [V, H] and bias (None or [V]) of
// its dtype; labels int64 [B, T], contiguous; mask None or bool [B, T]; old_logprobs,
// advantages ([B, T] or [B]), weights and ref_logprobs float32 and contiguous, ref_logprobs
// given exactly when beta > 0; group None, exact False, backend "auto" or "cpu".  Masked
// tokens take ignore_index as their label, and `valid` marks the labels that are not it, in
// one pass (the Python path's where and !=).  every_token_macs: the Python path's
// threshold for sending masked tokens through the lm-head (pieces "counted").
py::object linear_ppo_loss(const py::tuple& names, int64_t every_token_macs, py::handle hidden, py::handle weight,
                           py::handle labels, py::handle old_logprobs, py::handle advantages, py::handle mask,
                           py::handle ref_logprobs, py::handle beta, py::handle kl, py::handle entropy_coef,
                           py::handle temperature, py::handle bias, py::handle clip_low, py::handle clip_high,
                           py::handle dual_clip, py::handle log_ratio_clamp, py::handle agg, py::handle num_tokens,
                           py::handle num_seqs, py::handle norm_length, py::handle weights, py::handle ignore_index,
                           py::handle chunk_size, py::handle exact, py::handle backend) {
  if (!no_python_modes() || !cpu_backend(backend) || exact.ptr() != Py_False || !kl_estimator(kl)) {
    return py::none();
  }
  const auto head = lm_head(hidden, weight, bias);
  if (!head || head->hidden->dim() != 3) return py::none();
  const at::Tensor *h = head->hidden, *w = head->weight;
  const Opt& b = head->bias;
  const int64_t B = h->size(0), T = h->size(1), H = h->size(2), V = w->size(0);
  const std::vector<int64_t> grid{B, T};
  const at::Tensor* lab = plain_like(labels, at::kLong, grid);
  const Maybe valid_in = optional_like(mask, at::kBool, grid);
  const at::Tensor* old = plain_like(old_logprobs, at::kFloat, grid);
  const at::Tensor* adv = plain(advantages);
  if (lab == nullptr || !valid_in.ok || old == nullptr || adv == nullptr || adv->scalar_type() != at::kFloat ||
      !adv->is_contiguous() || !(adv->sizes() == at::IntArrayRef(grid) || (adv->dim() == 1 && adv->size(0) == B))) {
    return py::none();
  }
  const auto beta_value = number(beta);
  if (!beta_value || !std::isfinite(*beta_value) || !(*beta_value >= 0.0)) return py::none();
  const bool use_kl = *beta_value > 0.0;
  const Maybe ref = optional_like(ref_logprobs, at::kFloat, grid);
  const Maybe w_tok = optional_like(weights, at::kFloat, grid);
  if (!ref.ok || !w_tok.ok || ref.tensor.has_value() != use_kl) return py::none();
  const auto kl_name = str(kl);
  const auto entropy = number(entropy_coef);
  const auto temp = number(temperature);
  const auto ignore = integer(ignore_index);
  const auto agg_name = str(agg);
  // linear_ppo_loss' temperature floor (ops/_logits.py MIN_TEMPERATURE): the smallest normal float32
  if (!entropy || !std::isfinite(*entropy) || !temp || !std::isfinite(*temp) || !(*temp >= 0x1p-126) || !ignore ||
      !agg_name || !kl_name) {
    return py::none();
  }
  int64_t chunk = 0;
  if (!chunk_size.is_none()) {
    const auto value = integer(chunk_size);
    if (!value || *value < 1) return py::none();
    chunk = *value;
  }
  const auto coefficients = policy_coefficients(clip_low, clip_high, dual_clip, log_ratio_clamp, *beta_value,
                                                num_tokens, num_seqs, norm_length);
  if (!coefficients) return py::none();

  const bool grad_mode = at::GradMode::is_enabled();
  const c10::List<bool> needs({grad_mode && h->requires_grad(), grad_mode && w->requires_grad(),
                               grad_mode && b.has_value() && b->requires_grad()});
  // B * T * V * H in double: it only decides between two ways of the same result
  const bool small = static_cast<double>(B) * T * V * H <= static_cast<double>(every_token_macs);
  static const auto sweep = op<LinearSig>("rlkernels::linear_policy_loss");
  LinearOutputs out;
  try {
    py::gil_scoped_release no_gil;
    at::Tensor kept_labels = *lab;
    const at::Tensor valid = at::empty(grid, lab->options().dtype(at::kBool));
    {
      const int64_t n = B * T, ignored = *ignore;
      const int64_t* in = lab->data_ptr<int64_t>();
      bool* is_valid = valid.data_ptr<bool>();
      if (valid_in.tensor.has_value()) {
        kept_labels = at::empty(grid, lab->options());
        const bool* keep = valid_in.tensor->data_ptr<bool>();
        int64_t* kept = kept_labels.data_ptr<int64_t>();
        for (int64_t i = 0; i < n; ++i) {
          kept[i] = keep[i] ? in[i] : ignored;
          is_valid[i] = kept[i] != ignored;
        }
      } else {
        for (int64_t i = 0; i < n; ++i) is_valid[i] = in[i] != ignored;
      }
    }
    out = sweep.call(h->contiguous(), w->contiguous(), kept_labels, b, *old, *adv, valid, w_tok.tensor,
                  use_kl ? ref.tensor : Opt(), *coefficients, use_kl ? *kl_name : c10::string_view("none"),
                  *agg_name, *entropy, *temp, *ignore, chunk, "cpu", needs, small ? "counted" : "counted-valid");
  } catch (const c10::Error&) {
    return py::none();  // a label out of range: the Python path raises the named error
  }
  return loss_and_stats(names, std::get<0>(out), std::get<1>(out));
}

using LogprobsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LogprobsSig = LogprobsOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, double,
                                    int64_t, bool, bool, int64_t, int64_t, int64_t, bool, c10::string_view);

// linear_logprobs' usual call (ops/linear_logprobs.py): hidden a plain CPU [..., H] tensor
// of a kernel dtype, weight [V, H] and bias (None or [V]) of its dtype, labels int64 of
// hidden's leading shape and contiguous, temperature and ignore_index in range, entropy and
// is_top1 bools, mean_logits False, chunk_size None or an int >= 1, backend "auto" or
// "cpu"; the caller has seen group None (exact is ignored without group, as in Python).  chunk_bytes: the
// default budget (ops/_chunked.py CHUNK_BYTES).  The op checks the label range itself.
py::object linear_logprobs(int64_t chunk_bytes, py::handle hidden, py::handle weight, py::handle labels,
                           py::handle bias, py::handle temperature, py::handle ignore_index, py::handle entropy,
                           py::handle mean_logits, py::handle is_top1, py::handle chunk_size, py::handle backend) {
  if (!no_python_modes() || !cpu_backend(backend) || mean_logits.ptr() != Py_False ||
      !PyBool_Check(entropy.ptr()) || !PyBool_Check(is_top1.ptr())) {
    return py::none();
  }
  const auto head = lm_head(hidden, weight, bias);
  if (!head) return py::none();
  const at::Tensor *h = head->hidden, *w = head->weight;
  const Opt& b = head->bias;
  const at::Tensor* lab = plain_like(labels, at::kLong, h->sizes().slice(0, h->dim() - 1));
  const auto temp = number(temperature);
  const auto ignore = integer(ignore_index);
  if (lab == nullptr || !temp || !std::isfinite(*temp) || !(*temp >= 0x1p-126) || !ignore) return py::none();
  const int64_t vocab = w->size(0), n = lab->numel();
  int64_t budget = chunk_bytes;
  if (!chunk_size.is_none()) {
    const auto tokens = integer(chunk_size);
    if (!tokens || *tokens < 1) return py::none();
    // ops/linear_logprobs.py _tiling: that many full rows of float32 logits
    budget = std::max<int64_t>(1, std::min<int64_t>(*tokens, std::max<int64_t>(n, 1))) *
             std::max<int64_t>(vocab, 1) * 4;
  }
  const bool with_entropy = entropy.ptr() == Py_True, with_top1 = is_top1.ptr() == Py_True;
  static const auto forward = op<LogprobsSig>("rlkernels::linear_logprobs");
  LogprobsOutputs out;
  try {
    py::gil_scoped_release no_gil;
    out = forward.call(*h, *w, *lab, b, *temp, *ignore, with_entropy, with_top1, 0, 0, budget, true, "cpu");
  } catch (const c10::Error&) {
    return py::none();  // a label out of range: the Python path raises the named error
  }
  if (!with_entropy && !with_top1) return py::cast(std::get<0>(out));
  py::list outputs;
  outputs.append(py::cast(std::get<0>(out)));
  if (with_entropy) outputs.append(py::cast(std::get<1>(out)));
  if (with_top1) outputs.append(py::cast(std::get<3>(out)));
  return py::tuple(outputs);
}

}  // namespace

py::dict stat_views(const py::tuple& names, const at::Tensor& stats) {
  TORCH_CHECK(stats.dim() == 1 && stats.size(0) == static_cast<int64_t>(names.size()),
              "stat_views: stats must be 1-D with one value per name");
  at::AutoDispatchBelowADInplaceOrView below;
  const int64_t stride = stats.stride(0), offset = stats.storage_offset();
  py::dict out;
  for (int64_t i = 0; i < static_cast<int64_t>(names.size()); ++i) {
    out[names[i]] = py::cast(stats.as_strided({}, {}, offset + i * stride));
  }
  return out;
}

// gossip_mix's usual call (ops/multi_tensor.py): x, left and right (and out, when given)
// plain contiguous CPU tensors of one floating dtype and one shape; out sharing no memory
// with them other than being exactly one of them (in place); weights a tuple or list of
// three finite numbers >= 0 whose sum, taken in the Python check's order, is within 1e-6
// of 1; backend "auto" or "cpu".  Returns out (the caller's object) or a new tensor, its
// version counter bumped as the Python path's _written does.
py::object gossip_mix(py::handle x, py::handle left, py::handle right, py::handle weights, py::handle out,
                      py::handle backend) {
  if (!no_python_modes() || !cpu_backend(backend)) return py::none();
  const at::Tensor* xs = plain(x);
  if (xs == nullptr || !xs->is_contiguous()) return py::none();
  const at::ScalarType dtype = xs->scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf && dtype != at::kBFloat16) {
    return py::none();
  }
  const at::Tensor* l = plain_like(left, dtype, xs->sizes());
  const at::Tensor* r = plain_like(right, dtype, xs->sizes());
  const at::Tensor* o = out.is_none() ? nullptr : plain_like(out, dtype, xs->sizes());
  if (l == nullptr || r == nullptr || (!out.is_none() && o == nullptr)) return py::none();
  const bool sequence = PyTuple_CheckExact(weights.ptr()) || PyList_CheckExact(weights.ptr());
  if (!sequence || PySequence_Fast_GET_SIZE(weights.ptr()) != 3) return py::none();
  double w[3];
  for (int i = 0; i < 3; ++i) {
    const auto value = number(PySequence_Fast_GET_ITEM(weights.ptr(), i));
    if (!value || !std::isfinite(*value) || !(*value >= 0.0)) return py::none();
    w[i] = *value;
  }
  if (std::abs(w[0] + w[1] + w[2] - 1.0) > 1e-6) return py::none();
  if (o != nullptr && xs->numel() > 0) {
    // contiguous, one shape and dtype: shared memory is the same elements only when the
    // starts match; any other overlap is the Python path's error
    const auto begin = [](const at::Tensor* t) { return reinterpret_cast<uintptr_t>(t->const_data_ptr()); };
    const uintptr_t bytes = static_cast<uintptr_t>(xs->numel()) * xs->element_size();
    for (const at::Tensor* t : {xs, l, r}) {
      const bool apart = begin(o) + bytes <= begin(t) || begin(t) + bytes <= begin(o);
      // (the same elements: the same start and strides; contiguity says nothing of the
      // strides of size-1 dimensions, and the Python check compares them)
      if (!apart && (begin(o) != begin(t) || o->strides() != t->strides())) return py::none();
    }
  }
  using MixSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double,
                      const at::Tensor&);
  static const auto mix = op<MixSig>("rlkernels::gossip_mix");
  const at::Tensor target = o != nullptr ? *o : at::empty_like(*xs, at::MemoryFormat::Contiguous);
  {
    py::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;  // as the Python path's torch.no_grad(): parameters mix in place
    mix.call(*xs, *l, *r, w[0], w[1], w[2], target);
  }
  if (!target.is_inference()) torch::autograd::impl::bump_version(target);
  return o != nullptr ? py::reinterpret_borrow<py::object>(out) : py::cast(target);
}

void add_to(py::module_& m) {
  m.def("gossip_mix_usual", &gossip_mix);
  m.def("policy_loss_usual", &policy_loss);
  m.def("linear_ppo_loss_usual", &linear_ppo_loss);
  m.def("linear_logprobs_usual", &linear_logprobs);
}

}  // namespace rlk::usual
