"""One call of every public op, for the host-sync checks (a plain module, no pytest, so
that .ci/gpu_sync_check.py can import it too): tests/test_host_syncs.py runs
them on fake CUDA tensors (FakeTensorMode, no GPU), .ci/gpu_sync_check.py on a GPU
under torch.cuda.set_sync_debug_mode("error") and inside a CUDA graph capture.

Each case builds its inputs with the data-dependent arguments present (0/1 masks in
float, labels with ignore_index, group ids, dones) and returns (run, leaves): run(backend)
calls the op and returns its floating outputs; leaves are the inputs that get a gradient
(requires_grad set when `grad` is True).  CHECKED names the cases whose op has a data
check that the checked mode (rlkernels.set_checks) turns on for CUDA tensors."""
from __future__ import annotations

import torch

import rlkernels

B, T, V, H, N = 2, 5, 11, 8, 8


def _floats(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [v for _, v in sorted(out.items()) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _floats(item)]
    return []


class _Inputs:
    def __init__(self, device: str, grad: bool):
        self.device, self.grad, self.leaves = device, grad, []

    def randn(self, *shape, leaf: bool = False, dtype=torch.float32):
        t = torch.randn(*shape, device=self.device, dtype=dtype)
        if leaf:
            if self.grad:
                t.requires_grad_(True)
            self.leaves.append(t)
        return t

    def mask(self, *shape):
        m = (torch.rand(*shape, device=self.device) > 0.3).to(torch.float32)  # 0/1 in float: a data check
        m[..., 0] = 1.0
        return m

    def labels(self, *shape, vocab: int = V):
        labels = torch.randint(0, vocab, shape, device=self.device)
        labels[..., 0] = -100  # ignore_index
        return labels


def _gae(x):
    rewards, values, mask = x.randn(B, T), x.randn(B, T), x.mask(B, T)
    dones = torch.zeros(B, T, device=x.device)
    dones[:, 2] = 1.0
    last = x.randn(B)
    return lambda backend: rlkernels.gae(rewards, values, mask, dones=dones, last_values=last, gamma=0.99, lam=0.95,
                                         backend=backend)


def _discounted_returns(x):
    rewards, mask = x.randn(B, T), x.mask(B, T)
    dones = torch.zeros(B, T, device=x.device)
    dones[:, 3] = 1.0
    return lambda backend: rlkernels.discounted_returns(rewards, mask, dones=dones, gamma=0.9, backend=backend)


def _group_advantages(x):
    scores = x.randn(N)
    index = torch.arange(N, device=x.device) % 3
    return lambda backend: (rlkernels.group_advantages(scores, group_index=index, num_groups=3, backend=backend),
                            rlkernels.group_advantages(scores, 4, baseline="loo", backend=backend))


def _masked_mean(x):
    v, mask = x.randn(B, T, leaf=True), x.mask(B, T)
    return lambda backend: (rlkernels.masked_mean(v, mask, backend=backend),
                            rlkernels.masked_mean(v, mask, dim=-1, backend=backend))


def _masked_whiten(x):
    v, mask = x.randn(B, T, leaf=True), x.mask(B, T)
    return lambda backend: rlkernels.masked_whiten(v, mask, backend=backend)


def _logprobs(x):
    logits, labels = x.randn(B, T, V, leaf=True), x.labels(B, T)
    return lambda backend: rlkernels.logprobs(logits, labels, entropy=True, temperature=0.7, backend=backend)


def _linear_logprobs(x):
    hidden, weight, bias = x.randn(B, T, H, leaf=True), x.randn(V, H, leaf=True), x.randn(V, leaf=True)
    labels = x.labels(B, T)
    return lambda backend: rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, entropy=True, mean_logits=True,
                                                     is_top1=True, backend=backend)


def _kl_from_logits(x):
    logits, ref, mask = x.randn(B, T, V, leaf=True), x.randn(B, T, V, leaf=True), x.mask(B, T)
    return lambda backend: rlkernels.kl_from_logits(logits, ref, mask=mask, backend=backend)


def _kl_penalty(x):
    lp, ref = x.randn(B, T, leaf=True), x.randn(B, T)
    return lambda backend: rlkernels.kl_penalty(lp, ref, "k3", clamp=10.0, backend=backend)


def _ppo_loss(x):
    lp, old, adv, mask, w = x.randn(B, T, leaf=True), x.randn(B, T), x.randn(B), x.mask(B, T), x.randn(B, T)
    return lambda backend: rlkernels.ppo_loss(lp, old, adv, mask, dual_clip=3.0, weights=w,
                                              agg="seq-mean-token-mean", backend=backend)


def _grpo_loss(x):
    lp, old, adv, mask, ref = x.randn(B, T, leaf=True), x.randn(B, T), x.randn(B), x.mask(B, T), x.randn(B, T)
    return lambda backend: rlkernels.grpo_loss(lp, old, adv, mask, ref_logprobs=ref, beta=0.05, backend=backend)


def _value_loss(x):
    v, old, ret, mask = x.randn(B, T, leaf=True), x.randn(B, T), x.randn(B, T), x.mask(B, T)
    return lambda backend: rlkernels.value_loss(v, old, ret, mask, clip=0.2, backend=backend)


def _dpo_loss(x):
    pc, pr, rc, rr = x.randn(B, leaf=True), x.randn(B, leaf=True), x.randn(B), x.randn(B)
    return lambda backend: rlkernels.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1, backend=backend)


def _sequence_logprobs(x):
    tokens, mask = x.randn(B, T, leaf=True), x.mask(B, T)
    logits, labels = x.randn(B, T, V, leaf=True), x.labels(B, T)
    return lambda backend: (rlkernels.sequence_logprobs(tokens, mask, average=True, backend=backend),
                            rlkernels.sequence_logprobs(logits, mask, labels=labels, backend=backend))


def _dpo_sequence_loss(x):
    policy, ref, mask = x.randn(2 * B, T, leaf=True), x.randn(2 * B, T, leaf=True), x.mask(2 * B, T)
    return lambda backend: rlkernels.dpo_sequence_loss(policy, ref, mask, beta=0.1, label_smoothing=0.1, average=True,
                                                       backend=backend)


def _linear_ppo_loss(x):
    hidden, weight = x.randn(B, T, H, leaf=True), x.randn(V, H, leaf=True)
    labels, old, adv, mask, ref = x.labels(B, T), x.randn(B, T) - 2.0, x.randn(B), x.mask(B, T), x.randn(B, T)

    def run(backend):
        outs = []
        for agg, chunk in (("token-mean", None), ("seq-mean-token-mean", 3)):  # whole rows, then row segments
            outs.append(rlkernels.linear_ppo_loss(hidden, weight, labels, old, adv, mask, ref_logprobs=ref, beta=0.05,
                                                  entropy_coef=0.01, agg=agg, chunk_size=chunk, backend=backend))
        return outs
    return run


def _pack_tensors(x):
    a, b = x.randn(3, 4), x.randn(5)
    return lambda backend: rlkernels.pack_tensors([a, b], scale=0.5, backend=backend)


def _unpack_tensors(x):
    a, b = x.randn(3, 4), x.randn(5)
    bucket = x.randn(17)

    def run(backend):
        rlkernels.unpack_tensors(bucket, [a, b], scale=2.0, backend=backend)
        return a, b
    return run


def _gossip_mix(x):
    v, left, right = x.randn(10), x.randn(10), x.randn(10)
    return lambda backend: rlkernels.gossip_mix(v, left, right, (0.5, 0.25, 0.25), backend=backend)


CASES = {
    "gae": _gae, "discounted_returns": _discounted_returns, "group_advantages": _group_advantages,
    "masked_mean": _masked_mean, "masked_whiten": _masked_whiten, "logprobs": _logprobs,
    "linear_logprobs": _linear_logprobs, "kl_from_logits": _kl_from_logits, "kl_penalty": _kl_penalty,
    "ppo_loss": _ppo_loss, "grpo_loss": _grpo_loss, "value_loss": _value_loss, "dpo_loss": _dpo_loss,
    "sequence_logprobs": _sequence_logprobs, "dpo_sequence_loss": _dpo_sequence_loss, "linear_ppo_loss": _linear_ppo_loss, "pack_tensors": _pack_tensors,
    "unpack_tensors": _unpack_tensors, "gossip_mix": _gossip_mix,
}

# The cases whose inputs hold data that a check reads (float 0/1 masks, labels, group ids).
CHECKED = ("gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten", "logprobs",
           "linear_logprobs", "kl_from_logits", "ppo_loss", "grpo_loss", "value_loss", "sequence_logprobs",
           "dpo_sequence_loss",
           "linear_ppo_loss")


def build(name: str, device: str, grad: bool):
    """(run, leaves) of the case `name` on `device`."""
    x = _Inputs(device, grad)
    run = CASES[name](x)
    return run, x.leaves


def floats(out) -> list[torch.Tensor]:
    """The floating tensors of an op's outputs (tensors, tuples, stats dicts)."""
    return _floats(out)
