"""The compiled front ends of the usual call (csrc/usual_calls.cpp) against the Python
checks they stand in for: on random and adversarial arguments, a compiled call that
answers (not None) gives the Python path's bits (loss, stats, gradients), and it never
answers a call the Python path refuses.  The usual call must take the compiled path."""
from __future__ import annotations

import importlib
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import rlkernels
from rlkernels._library import _C
from rlkernels.reference.policy_loss import POLICY_STATS

# (the ops package exports the functions under their modules' names)
lpl_module = importlib.import_module("rlkernels.ops.linear_ppo_loss")
ll_module = importlib.import_module("rlkernels.ops.linear_logprobs")
policy_module = importlib.import_module("rlkernels.ops.policy_loss")

AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (torch.isnan(a).equal(torch.isnan(b)) and
                                     torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


# Each case draws how often its arguments are of another kind than the usual one: never
# (the usual call), now and then (one or two odd arguments), or often.
RATES = (0.0, 0.04, 0.15, 0.5)


def _odd_tensor(rng, g, shape, dtype, rate):
    """A tensor of `shape`/`dtype`, or (with probability `rate`) of another kind."""
    if rng.random() >= rate:
        return torch.randn(shape, generator=g).to(dtype)
    pick = rng.random() * 0.4 + 0.6
    if pick < 0.6:
        return torch.randn(shape, generator=g).to(dtype)
    if pick < 0.68:
        return torch.randn((*shape, 2), generator=g).to(dtype)[..., 0]  # non-contiguous
    if pick < 0.76:
        return torch.randn(shape, generator=g).to(rng.choice([torch.float64, torch.bfloat16, torch.float16]))
    if pick < 0.82:
        return torch.randn(shape[:1] if len(shape) > 1 else (*shape, 3), generator=g).to(dtype)
    if pick < 0.88:
        return torch.randn((shape[0] + 1, *shape[1:]), generator=g).to(dtype)
    if pick < 0.92:
        return torch.randint(0, 3, shape, generator=g)
    if pick < 0.96:
        return None
    return [1.0]


def _odd_mask(rng, g, shape, rate):
    if rng.random() >= rate:
        return None if rng.random() < 0.3 else torch.rand(shape, generator=g) > 0.3
    pick = rng.random() * 0.25 + 0.75
    if pick < 0.75:
        return torch.rand(shape, generator=g) > 0.3
    if pick < 0.82:
        return (torch.rand(shape, generator=g) > 0.3).float()
    if pick < 0.88:
        return torch.rand((*shape, 2), generator=g)[..., 0] > 0.3  # non-contiguous
    if pick < 0.94:
        return torch.ones((shape[0], shape[1] + 1), dtype=torch.bool)
    return torch.full(shape, 2.0)


def _odd_number(rng, usual, rate, *, none_ok=False):
    if rng.random() >= rate:
        return usual
    options = [0.0, -0.1, 1.0, 1.5, 1e-9, float("inf"), float("-inf"), float("nan"), True, 3, -2, 2 ** 80, "0.2",
               0.999, 1e300]
    if none_ok:
        options += [None, None]
    return rng.choice(options)


def _either(rng, rate, usual, odd):
    """One of `usual` (a list to choose from), or with probability `rate` one of `odd`."""
    return rng.choice(odd) if rng.random() < rate else rng.choice(usual)


def _policy_case(rng, g):
    rate = rng.choice(RATES)
    B, T = rng.choice([(1, 1), (2, 8), (3, 5), (4, 17), (0, 4)])
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
    logprobs = _odd_tensor(rng, g, (B, T), dtype, rate)
    if isinstance(logprobs, torch.Tensor) and logprobs.is_floating_point() and rng.random() < 0.4:
        logprobs.requires_grad_()
    adv_shape = (B,) if rng.random() < 0.3 else (B, T)
    kl_coef = rng.choice([0.0, 0.0, 0.04])
    kwargs = dict(
        weights=_odd_tensor(rng, g, (B, T), dtype, rate) if rng.random() < 0.3 else None,
        ref_logprobs=_odd_tensor(rng, g, (B, T), dtype, rate) if kl_coef > 0 or rng.random() < 0.2 else None,
        clip_low=_odd_number(rng, 0.2, rate), clip_high=_odd_number(rng, rng.choice([None, 0.28]), rate, none_ok=True),
        dual_clip=_odd_number(rng, rng.choice([None, 3.0]), rate, none_ok=True),
        log_ratio_clamp=_odd_number(rng, rng.choice([None, 20.0]), rate, none_ok=True),
        kl_coef=kl_coef,
        kl=_either(rng, rate, ["k1", "k2", "k3"] if kl_coef > 0 else ["none"], ["none", "k3", "k4"]),
        agg=_either(rng, rate, AGGS, ["token_mean"]), num_tokens=_odd_number(rng, None, rate, none_ok=True),
        num_seqs=_odd_number(rng, None, rate, none_ok=True), norm_length=_odd_number(rng, None, rate, none_ok=True),
        backend=_either(rng, rate, ["auto", "cpu"], ["reference", "nope"]))
    args = (logprobs, _odd_tensor(rng, g, (B, T), dtype, rate), _odd_tensor(rng, g, adv_shape, dtype, rate),
            _odd_mask(rng, g, (B, T), rate))
    return args, kwargs


def _outputs_and_grads(fn, tensors):
    loss, stats = fn()
    grads = None
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad])
    return loss, stats, grads


def test_policy_usual_call_takes_the_compiled_path():
    g = torch.Generator().manual_seed(0)
    lp, old, adv = (torch.randn(2, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 8, generator=g) > 0.3
    done = _C.policy_loss_usual(POLICY_STATS, lp, old, adv, mask, None, None, 0.2, None, None, 20.0, 0.0, "none",
                                "token-mean", None, None, None, "auto")
    assert done is not None
    _same(done, policy_module._policy_checked(
        "ppo_loss", lp, old, adv, mask, weights=None, ref_logprobs=None, clip_low=0.2, clip_high=None, dual_clip=None,
        log_ratio_clamp=20.0, kl_coef=0.0, kl="none", agg="token-mean", num_tokens=None, num_seqs=None,
        norm_length=None, backend="auto"))
    torch.testing.assert_close(done[0], rlkernels.ppo_loss(lp, old, adv, mask, backend="reference")[0])
    # grpo_loss's usual call too (per-row advantages, a KL term)
    ref = torch.randn(2, 8, generator=g)
    loss, stats = rlkernels.grpo_loss(lp, old, adv[:, 0], mask, ref_logprobs=ref, beta=0.04)
    expected = rlkernels.grpo_loss(lp, old, adv[:, 0], mask, ref_logprobs=ref, beta=0.04, backend="reference")
    torch.testing.assert_close(loss, expected[0])


def test_policy_usual_agrees_with_the_checked_path():
    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    answered = 0
    for _ in range(600):
        (lp, old, adv, mask), kw = _policy_case(rng, g)
        try:
            expected = _outputs_and_grads(
                lambda: policy_module._policy_checked("ppo_loss", lp, old, adv, mask, **kw), (lp,))
        except (TypeError, ValueError, RuntimeError):
            expected = None
        done = _C.policy_loss_usual(POLICY_STATS, lp, old, adv, mask, kw["weights"], kw["ref_logprobs"],
                                    kw["clip_low"], kw["clip_high"], kw["dual_clip"], kw["log_ratio_clamp"],
                                    kw["kl_coef"], kw["kl"], kw["agg"], kw["num_tokens"], kw["num_seqs"],
                                    kw["norm_length"], kw["backend"])
        if done is None:
            continue
        assert expected is not None, f"the compiled path answered a call the checks refuse: {kw}"
        answered += 1
        got = _outputs_and_grads(lambda: _C.policy_loss_usual(
            POLICY_STATS, lp, old, adv, mask, kw["weights"], kw["ref_logprobs"], kw["clip_low"], kw["clip_high"],
            kw["dual_clip"], kw["log_ratio_clamp"], kw["kl_coef"], kw["kl"], kw["agg"], kw["num_tokens"],
            kw["num_seqs"], kw["norm_length"], kw["backend"]), (lp,))
        if kw["backend"] == "reference":
            pytest.fail("backend='reference' must take the Python path")
        _same(got, expected)
    assert answered > 100  # the generator does reach the usual calls


def _linear_case(rng, g):
    rate = rng.choice(RATES)
    B, T, H, V = rng.choice([(2, 8, 16, 64), (1, 3, 5, 7), (3, 4, 8, 33), (2, 0, 4, 9)])
    dtype = _either(rng, rate, [torch.float32, torch.float32, torch.bfloat16, torch.float16], [torch.float64])
    hidden = _odd_tensor(rng, g, (B, T, H), dtype, rate)
    weight = _odd_tensor(rng, g, (V, H), dtype, rate) if rng.random() >= rate else torch.randn(V, H + 1).to(dtype)
    for t in (hidden, weight):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and rng.random() < 0.4:
            t.requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    if labels.numel() and rng.random() < 0.2:
        labels[-1, -1] = -100  # ignored
    if rng.random() < rate:
        pick = rng.random()
        if pick < 0.4 and labels.numel():
            labels[0, 0] = rng.choice([V, V + 3, -1])  # out of range
        elif pick < 0.6:
            labels = labels.int()
        elif pick < 0.8:
            labels = labels.float()
        else:
            labels = torch.stack([labels, labels], -1)[..., 0]  # non-contiguous
    beta = _either(rng, rate, [0.0, 0.0, 0.04], [-1.0, float("nan"), float("inf"), True])
    kwargs = dict(
        ref_logprobs=(_odd_tensor(rng, g, (B, T), torch.float32, rate)
                      if beta != 0.0 or rng.random() < rate else None),
        beta=beta, kl=_either(rng, rate, ["k1", "k2", "k3"], ["none", "K3"]),
        entropy_coef=_either(rng, rate, [0.0, 0.01], [float("inf"), float("nan"), "0"]),
        temperature=_either(rng, rate, [1.0, 0.7, 2], [0.0, 1e-40, -1.0, float("inf")]),
        bias=(_odd_tensor(rng, g, (V,), dtype, rate) if rng.random() < 0.3 else None),
        clip_low=_odd_number(rng, 0.2, rate), clip_high=_odd_number(rng, None, rate, none_ok=True),
        dual_clip=_odd_number(rng, None, rate, none_ok=True),
        log_ratio_clamp=_odd_number(rng, 20.0, rate, none_ok=True),
        agg=_either(rng, rate, AGGS, ["mean"]), num_tokens=_odd_number(rng, None, rate, none_ok=True),
        num_seqs=_odd_number(rng, None, rate, none_ok=True), norm_length=_odd_number(rng, None, rate, none_ok=True),
        weights=(_odd_tensor(rng, g, (B, T), torch.float32, rate) if rng.random() < 0.3 else None),
        ignore_index=_either(rng, rate, [-100, 0], [True, 2 ** 70, 1.0]),
        chunk_size=_either(rng, rate, [None, 3, 1, 1000], [0, True, -2, 2.0]),
        exact=_either(rng, rate, [False], [True, 0]),
        backend=_either(rng, rate, ["auto", "cpu"], ["reference", "cuda"]))
    token_dtype = _either(rng, rate, [torch.float32], [torch.float64, torch.bfloat16])
    args = (hidden, weight, labels, _odd_tensor(rng, g, (B, T), token_dtype, rate),
            _odd_tensor(rng, g, (B,) if rng.random() < 0.3 else (B, T), torch.float32, rate),
            _odd_mask(rng, g, (B, T), rate))
    return args, kwargs


def _linear_usual(args, kw):
    hidden, weight, labels, old, adv, mask = args
    return _C.linear_ppo_loss_usual(
        lpl_module.STATS, lpl_module._EVERY_TOKEN_MACS, hidden, weight, labels, old, adv, mask, kw["ref_logprobs"],
        kw["beta"], kw["kl"], kw["entropy_coef"], kw["temperature"], kw["bias"], kw["clip_low"], kw["clip_high"],
        kw["dual_clip"], kw["log_ratio_clamp"], kw["agg"], kw["num_tokens"], kw["num_seqs"], kw["norm_length"],
        kw["weights"], kw["ignore_index"], kw["chunk_size"], kw["exact"], kw["backend"])


def test_linear_ppo_usual_call_takes_the_compiled_path():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 8, 16, generator=g, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(64, 16, generator=g))
    labels = torch.randint(0, 64, (2, 8), generator=g)
    old, adv = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    mask = torch.rand(2, 8, generator=g) > 0.3
    kw = dict(ref_logprobs=None, beta=0.0, kl="k3", entropy_coef=0.0, temperature=1.0, bias=None, clip_low=0.2,
              clip_high=None, dual_clip=None, log_ratio_clamp=20.0, agg="token-mean", num_tokens=None,
              num_seqs=None, norm_length=None, weights=None, ignore_index=-100, chunk_size=None, exact=False,
              backend="auto")
    done = _linear_usual((hidden, weight, labels, old, adv, mask), kw)
    assert done is not None
    expected = rlkernels.linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="reference")
    torch.testing.assert_close(done[0], expected[0])
    # a label out of range: not answered, and the public call raises the named error
    labels[1, 2] = 64
    mask[1, 2] = True
    assert _linear_usual((hidden, weight, labels, old, adv, mask), kw) is None
    with pytest.raises(ValueError, match="labels must lie in"):
        rlkernels.linear_ppo_loss(hidden, weight, labels, old, adv, mask)


def test_linear_ppo_usual_agrees_with_the_checked_path():
    rng = random.Random(3)
    g = torch.Generator().manual_seed(3)
    answered = 0
    for _ in range(400):
        args, kw = _linear_case(rng, g)
        leaves = [t for t in (args[0], args[1], kw["bias"]) if isinstance(t, torch.Tensor)]
        try:
            expected = _outputs_and_grads(lambda: lpl_module._checked(*args, group=None, **kw), leaves)
        except (TypeError, ValueError):
            expected = None
        done = _linear_usual(args, kw)
        if done is None:
            continue
        assert expected is not None, f"the compiled path answered a call the checks refuse: {kw}"
        assert kw["backend"] in ("auto", "cpu")
        answered += 1
        _same(_outputs_and_grads(lambda: _linear_usual(args, kw), leaves), expected)
    assert answered > 80


def _linear_logprobs_case(rng, g):
    rate = rng.choice(RATES)
    lead, H, V = rng.choice([((2, 8), 16, 64), ((5,), 3, 7), ((2, 3, 2), 8, 33), ((0,), 4, 9), ((), 4, 5)])
    dtype = _either(rng, rate, [torch.float32, torch.bfloat16, torch.float16], [torch.float64])
    hidden = _odd_tensor(rng, g, (*lead, H), dtype, rate)
    weight = _odd_tensor(rng, g, (V, H), dtype, rate) if rng.random() >= rate else torch.randn(V, H + 1).to(dtype)
    for t in (hidden, weight):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and rng.random() < 0.5:
            t.requires_grad_()
    labels = torch.randint(0, V, lead, generator=g)
    if labels.numel() and rng.random() < 0.3:
        labels.view(-1)[-1] = -100
    if rng.random() < rate:
        pick = rng.random()
        if pick < 0.4 and labels.numel():
            labels.view(-1)[0] = rng.choice([V, -1])
        elif pick < 0.6:
            labels = labels.int()
        elif pick < 0.8:
            labels = labels.float()
        elif labels.dim():
            labels = torch.stack([labels, labels], -1)[..., 0]
    bias = _odd_tensor(rng, g, (V,), dtype, rate) if rng.random() < 0.3 else None
    if isinstance(bias, torch.Tensor) and bias.is_floating_point() and rng.random() < 0.5:
        bias.requires_grad_()
    kwargs = dict(
        bias=bias, temperature=_either(rng, rate, [1.0, 0.7, 2], [0.0, 1e-40, -1.0, float("nan")]),
        ignore_index=_either(rng, rate, [-100, 0], [True, 2 ** 70]),
        entropy=_either(rng, rate, [False, True], [1, None]), mean_logits=_either(rng, rate, [False], [True, 0]),
        is_top1=_either(rng, rate, [False, True], [1]), chunk_size=_either(rng, rate, [None, 1, 3, 1000], [0, (2, 4), True]),
        exact=rng.choice([False, True]), backend=_either(rng, rate, ["auto", "cpu"], ["reference", "cuda"]))
    return (hidden, weight, labels), kwargs


class _NoUsualCall:
    @staticmethod
    def linear_logprobs_usual(*args):
        return None


def test_linear_logprobs_usual_agrees_with_the_checked_path(monkeypatch):
    rng = random.Random(5)
    g = torch.Generator().manual_seed(5)
    answered = 0
    for _ in range(400):
        args, kw = _linear_logprobs_case(rng, g)
        leaves = [t for t in (args[0], args[1], kw["bias"]) if isinstance(t, torch.Tensor) and t.requires_grad]

        def run():
            out = rlkernels.linear_logprobs(*args, **kw)
            first = out[0] if isinstance(out, tuple) else out
            grads = torch.autograd.grad(first.sum(), leaves) if first.requires_grad and leaves else None
            return out, grads

        with monkeypatch.context() as m:
            m.setattr(ll_module, "_C", _NoUsualCall)
            try:
                expected = run()
            except (TypeError, ValueError):
                expected = None
        done = _C.linear_logprobs_usual(ll_module._chunked.CHUNK_BYTES, *args, kw["bias"], kw["temperature"],
                                        kw["ignore_index"], kw["entropy"], kw["mean_logits"], kw["is_top1"],
                                        kw["chunk_size"], kw["backend"])
        if done is None:
            continue
        assert expected is not None, f"the compiled path answered a call the checks refuse: {kw}"
        answered += 1
        _same(run(), expected)
    assert answered > 80


class _Seen(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _SeenFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [_Seen, _SeenFunction])
def test_usual_calls_decline_under_python_modes(mode):
    g = torch.Generator().manual_seed(4)
    lp, old, adv = (torch.randn(2, 8, generator=g) for _ in range(3))
    with mode():
        assert _C.policy_loss_usual(POLICY_STATS, lp, old, adv, None, None, None, 0.2, None, None, 20.0, 0.0,
                                    "none", "token-mean", None, None, None, "auto") is None
        loss, _ = rlkernels.ppo_loss(lp, old, adv)
    torch.testing.assert_close(loss, rlkernels.ppo_loss(lp, old, adv, backend="reference")[0])


def test_usual_calls_decline_tensor_subclasses():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:
        lp, old, adv = (fake.from_tensor(torch.randn(2, 8)) for _ in range(3))
    assert _C.policy_loss_usual(POLICY_STATS, lp, old, adv, None, None, None, 0.2, None, None, 20.0, 0.0, "none",
                                "token-mean", None, None, None, "auto") is None

    class Sub(torch.Tensor):
        pass

    lp = torch.randn(2, 8).as_subclass(Sub)
    assert _C.policy_loss_usual(POLICY_STATS, lp, torch.randn(2, 8), torch.randn(2, 8), None, None, None, 0.2, None,
                                None, 20.0, 0.0, "none", "token-mean", None, None, None, "auto") is None


mt_module = importlib.import_module("rlkernels.ops.multi_tensor")


class _NoGossipUsualCall:
    @staticmethod
    def gossip_mix_usual(*args):
        return None


def _gossip_case(rng, g):
    """x, left, right, weights, out (None, a fresh tensor, one of the inputs, or a view
    overlapping them), backend; each now and then of another kind."""
    rate = rng.choice(RATES)
    shape = rng.choice([(0,), (1,), (7,), (33,), (3, 5), (2, 3, 4)])
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])
    store = torch.randn(3 * 64 + 8, generator=g).to(dtype)
    numel = int(torch.Size(shape).numel())
    # x, left and right inside one storage, apart; out possibly overlapping one of them
    x, left, right = (store[i * 64: i * 64 + numel].view(shape) for i in range(3))
    x, left, right = (_odd_tensor(rng, g, shape, dtype, rate) if rng.random() < rate else t
                      for t in (x, left, right))
    choice = rng.random()
    if choice < 0.3:
        out = None
    elif choice < 0.5:
        out = torch.empty(shape, dtype=dtype)
    elif choice < 0.7:
        out = rng.choice([x, left, right])
    elif choice < 0.8 and numel > 1:
        out = store[1: 1 + numel].view(shape)  # x shifted by one element: a partial overlap
    else:
        out = _odd_tensor(rng, g, shape, dtype, max(rate, 0.3))
    weights = _either(rng, rate, [(1 / 3, 1 / 3, 1 / 3), (0.5, 0.25, 0.25), [0.2, 0.3, 0.5], (1, 0, 0)],
                      [(0.5, 0.5), (0.5, 0.6, -0.1), (float("nan"), 0.5, 0.5), (0.4, 0.3, 0.3 + 2e-6),
                       (0.4, 0.3, 0.3 + 5e-7), (True, 0, 0), ("0.3", 0.3, 0.4), (float("inf"), 0, 0),
                       torch.tensor([0.3, 0.3, 0.4]), {0.3, 0.7}])
    backend = _either(rng, rate, ["auto", "cpu"], ["reference", "triton", "cuda", "bogus"])
    return x, left, right, weights, out, backend


def test_gossip_mix_usual_call_takes_the_compiled_path():
    g = torch.Generator().manual_seed(8)
    x, left, right = (torch.randn(33, generator=g) for _ in range(3))
    done = _C.gossip_mix_usual(x, left, right, (0.5, 0.25, 0.25), None, "auto")
    assert done is not None
    torch.testing.assert_close(done, 0.5 * x + 0.25 * left + 0.25 * right)
    before = x._version
    assert _C.gossip_mix_usual(x, left, right, (0.5, 0.25, 0.25), x, "auto") is x  # in place
    assert x._version > before
    # parameters mix in place under grad mode, as the Python path's torch.no_grad() lets them
    p = torch.nn.Parameter(left.clone())
    expected = 0.5 * left + 0.25 * right + 0.25 * x
    assert _C.gossip_mix_usual(p, right, x, (0.5, 0.25, 0.25), p, "auto") is p
    torch.testing.assert_close(p.detach(), expected)
    assert p.requires_grad and p.grad_fn is None


def test_gossip_mix_usual_agrees_with_the_checked_path(monkeypatch):
    rng = random.Random(9)
    g = torch.Generator().manual_seed(9)
    answered = 0
    for _ in range(600):
        x, left, right, weights, out, backend = _gossip_case(rng, g)
        snapshot = [t.clone() if isinstance(t, torch.Tensor) else t for t in (x, left, right, out)]
        with monkeypatch.context() as m:
            m.setattr(mt_module, "_C", _NoGossipUsualCall)
            try:
                expected = rlkernels.gossip_mix(x, left, right, weights, out=out, backend=backend).clone()
                expected_version = None if out is None else out._version
            except (TypeError, ValueError):
                expected = None
        if isinstance(out, torch.Tensor):  # put every input back as it was, out included
            for t, s in zip((x, left, right, out), snapshot):
                if isinstance(t, torch.Tensor):
                    t.copy_(s)
        done = _C.gossip_mix_usual(x, left, right, weights, out, backend)
        if done is None:
            continue
        assert expected is not None, f"the compiled path answered a call the checks refuse: {weights}, {backend}"
        answered += 1
        if out is not None:
            assert done is out and out._version > expected_version
        _same(done, expected)
    assert answered > 100


def test_gossip_weights_sum_is_the_same_on_both_paths_at_the_boundary(monkeypatch):
    """The weights' sum is taken left to right on both paths: (0.2, 0.5, 0.300001) sums to
    exactly 1.000001 that way, which is accepted (Python 3.12's compensated sum() gives
    1.0000010000000001, which would not be)."""
    x, left, right = (torch.randn(5) for _ in range(3))
    for weights in [(0.2, 0.5, 0.300001), (0.2, 0.5, 0.3000011), (0.2, 0.5, 0.299999)]:
        done = _C.gossip_mix_usual(x, left, right, weights, None, "auto")
        with monkeypatch.context() as m:
            m.setattr(mt_module, "_C", _NoGossipUsualCall)
            try:
                checked = rlkernels.gossip_mix(x, left, right, weights)
            except ValueError:
                checked = None
        assert (done is None) == (checked is None), weights
        if done is not None:
            _same(done, checked)
