"""Log-probs, entropy and KL from logits (and from hidden states): rlkernels
against what RL frameworks run, in the same process.

Baselines: `log_softmax(...).gather(...)` with autograd (in float32, the
accuracy rlkernels returns; for 16-bit logits also in their own dtype), the
memory-saving per-sequence loop of TRL's selective_log_softmax and verl
(rlkernels.reference.logprobs_per_row), and for the lm-head `hidden @ W.T`
followed by those.  Forward+backward cases time torch.autograd.grad of the
logits (or of hidden, weight), so no leaf accumulation copies the gradient;
their peak extra memory includes the returned gradient (params: grad_mb)."""
from __future__ import annotations

import torch

import rlkernels
from rlkernels import reference
from .harness import Case, Impl

_SEQ = 512  # tokens per sequence in the per-row loop baseline


def _backends(device: str) -> list[str]:
    if device == "cpu":
        return ["cpu"]
    found = ["cuda"] if rlkernels._library.has_compiled("cuda") else []
    if rlkernels.HAS_TRITON:
        found.append("triton")
    return found


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def torch_logprobs(logits, labels, upcast=True):
    """log_softmax + gather as most training code writes it."""
    logp = torch.log_softmax(logits.float() if upcast else logits, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def torch_logprobs_entropy(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), entropy


def per_row(logits, labels):
    """TRL / verl: one sequence at a time ([B, T, V] view of the tokens)."""
    N, V = logits.shape
    return reference.logprobs_per_row(logits.view(N // _SEQ, _SEQ, V), labels.view(N // _SEQ, _SEQ)).view(N)


def _grad(fn, inputs, upstream):
    def run():
        out = fn()
        return torch.autograd.grad(out, inputs, upstream)
    return run


def _logits_cases(device, quick):
    shapes = [(512, 32000)] if quick else [(4096, 50257), (1024, 151936)]
    return [case for N, V in shapes for dtype in (torch.float32, torch.bfloat16)
            for case in _logits_cases_for(device, N, V, dtype)]


def _logits_cases_for(device, N, V, dtype):
    # one function call per shape, so that every closure below sees its own tensors
    params = {"N": N, "V": V, "dtype": _name(dtype)}
    nbytes = N * V * dtype.itemsize
    logits = (torch.randn(N, V, device=device) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    upstream = torch.randn(N, device=device)
    backends = _backends(device)

    # forward + backward, fresh gradient
    impls = [Impl(f"rlkernels-{b}", _grad(lambda b=b: rlkernels.logprobs(logits, labels, backend=b), logits,
                                          upstream)) for b in backends]
    # in place: the gradient overwrites a copy of the logits (restored untimed)
    scratch = logits.detach().clone().requires_grad_()
    for b in backends:
        impls.append(Impl(f"rlkernels-{b} inplace_backward",
                          _grad(lambda b=b: rlkernels.logprobs(scratch, labels, inplace_backward=True, backend=b),
                                scratch, upstream),
                          setup=lambda: scratch.data.copy_(logits.data)))
    impls.append(Impl("torch log_softmax+gather", _grad(lambda: torch_logprobs(logits, labels), logits, upstream),
                      baseline=True))
    if dtype != torch.float32:
        impls.append(Impl(f"torch log_softmax+gather ({_name(dtype)})",
                          _grad(lambda: torch_logprobs(logits, labels, upcast=False), logits, upstream),
                          baseline=True))
    impls.append(Impl("per-row loop (TRL/verl)", _grad(lambda: per_row(logits, labels), logits, upstream),
                      baseline=True))
    out = [Case("logprobs", "forward+backward", {**params, "grad_mb": round(nbytes / 2**20)}, 3 * nbytes, impls)]

    # no-grad forward (rollout / reference model passes)
    plain = logits.detach()
    impls = [Impl(f"rlkernels-{b}", lambda b=b: rlkernels.logprobs(plain, labels, backend=b)) for b in backends]
    impls.append(Impl("torch log_softmax+gather", lambda: torch_logprobs(plain, labels), baseline=True))
    impls.append(Impl("per-row loop (TRL/verl)", lambda: per_row(plain, labels), baseline=True))
    out.append(Case("logprobs", "forward (no grad)", params, nbytes, impls))

    # forward with entropy, no grad
    impls = [Impl(f"rlkernels-{b}", lambda b=b: rlkernels.logprobs(plain, labels, entropy=True, backend=b))
             for b in backends]
    impls.append(Impl("torch log_softmax+gather+entropy", lambda: torch_logprobs_entropy(plain, labels),
                      baseline=True))
    out.append(Case("logprobs", "forward+entropy (no grad)", params, nbytes, impls))
    return out


def torch_kl(logits, ref_logits):
    logp = torch.log_softmax(logits.float(), -1)
    logq = torch.log_softmax(ref_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _kl_cases(device, quick):
    N, V = (256, 32000) if quick else (2048, 50257)
    logits = torch.randn(N, V, device=device, requires_grad=True)
    ref_logits = torch.randn(N, V, device=device)
    upstream = torch.randn(N, device=device)
    nbytes = N * V * 4
    impls = [Impl(f"rlkernels-{b}", _grad(lambda b=b: rlkernels.kl_from_logits(logits, ref_logits, backend=b),
                                          logits, upstream)) for b in _backends(device)]
    impls.append(Impl("torch log_softmax x2", _grad(lambda: torch_kl(logits, ref_logits), logits, upstream),
                      baseline=True))
    # forward reads both rows; backward reads both and writes the gradient
    cases = [Case("logprobs", "kl_from_logits forward+backward", {"N": N, "V": V, "dtype": "float32"},
                  5 * nbytes, impls)]

    n = 1 << 16 if quick else 1 << 22
    lp = torch.randn(n, device=device, requires_grad=True)
    ref = torch.randn(n, device=device)
    g = torch.randn(n, device=device)
    impls = [Impl(f"rlkernels-{b}", _grad(lambda b=b: rlkernels.kl_penalty(lp, ref, "k3", backend=b), lp, g))
             for b in _backends(device)]
    impls.append(Impl("torch (verl low_var_kl)", _grad(lambda: reference.kl_penalty(lp, ref, "k3"), lp, g),
                      baseline=True))
    cases.append(Case("logprobs", "kl_penalty k3 forward+backward", {"tokens": n}, 5 * 4 * n, impls))
    return cases


def unfused_linear(hidden, weight, labels):
    return torch_logprobs(hidden @ weight.t(), labels)


def unfused_linear_per_row(hidden, weight, labels):
    return per_row(hidden @ weight.t(), labels)


def _linear_cases(device, quick):
    N, H, V = (512, 256, 32000) if quick else (2048, 1024, 50257)
    return [_linear_case(device, N, H, V, dtype)
            for dtype in ((torch.float32,) if quick else (torch.float32, torch.bfloat16))]


def _linear_case(device, N, H, V, dtype):
    hidden = (torch.randn(N, H, device=device) / H ** 0.5).to(dtype).requires_grad_()
    weight = torch.randn(V, H, device=device).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    upstream = torch.randn(N, device=device)
    inputs = (hidden, weight)
    impls = [Impl(f"rlkernels-{b}", _grad(lambda b=b: rlkernels.linear_logprobs(hidden, weight, labels, backend=b),
                                          inputs, upstream)) for b in _backends(device)]
    impls.append(Impl("hidden@W.T + log_softmax+gather", _grad(lambda: unfused_linear(hidden, weight, labels),
                                                               inputs, upstream), baseline=True))
    impls.append(Impl("hidden@W.T + per-row loop", _grad(lambda: unfused_linear_per_row(hidden, weight, labels),
                                                         inputs, upstream), baseline=True))
    # three matmuls of 2*N*H*V flops unfused (four fused: the backward recomputes the logits)
    params = {"N": N, "H": H, "V": V, "dtype": _name(dtype),
              "grad_mb": round((N * H + V * H) * dtype.itemsize / 2**20)}
    return Case("logprobs", "linear_logprobs forward+backward", params, (N * H + 2 * V * H) * dtype.itemsize, impls,
                repeats=(1, 3))  # seconds per call: three matmuls of 0.2 TFLOP each


def cases(device: str, quick: bool) -> list[Case]:
    return _logits_cases(device, quick) + _kl_cases(device, quick) + _linear_cases(device, quick)
