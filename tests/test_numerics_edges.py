"""Off the happy path: inputs and uses where a kernel could return wrong numbers
without an error.  Each class is checked on every backend (cpu, triton, reference;
cuda where present): NaN in valid positions, extreme temperatures and log-ratios,
constant inputs of the losses, and degenerate shapes.  In-place gradients and outputs
overlapping inputs: test_aliasing.py."""
from __future__ import annotations

import math

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import BACKEND_DEVICE, assert_close

KERNELS = [b for b, d in BACKEND_DEVICE if d == "cpu"]
ALL = KERNELS + ["reference"]


# ---- NaN in a valid position propagates ---------------------------------------------------------

NAN = float("nan")


def _with_nan(t: torch.Tensor, index) -> torch.Tensor:
    t = t.clone()
    t[index] = NAN
    return t


def _bt(scale=0.3):
    return torch.randn(3, 5) * scale


def _flat(result):
    """The tensors of an op's result, stats dicts included, in a fixed order."""
    if isinstance(result, torch.Tensor):
        return [result]
    out = []
    for item in result:
        if isinstance(item, dict):
            out += [item[k] for k in sorted(item)]
        else:
            out.append(item)
    return out


MASK = torch.ones(3, 5, dtype=torch.bool)
MASK[2, 3:] = False
LP, OLD, ADV, REF = _bt(), _bt(), torch.randn(3, 5), _bt()
NAN_AT = (1, 2)  # a valid slot

NAN_CASES = {
    "ppo_loss/logprobs": lambda b: rlkernels.ppo_loss(_with_nan(LP, NAN_AT), OLD, ADV, MASK, backend=b),
    "ppo_loss/old_logprobs": lambda b: rlkernels.ppo_loss(LP, _with_nan(OLD, NAN_AT), ADV, MASK, backend=b),
    "ppo_loss/advantages": lambda b: rlkernels.ppo_loss(LP, OLD, _with_nan(ADV, NAN_AT), MASK, backend=b),
    "ppo_loss/dual_clip": lambda b: rlkernels.ppo_loss(_with_nan(LP, NAN_AT), OLD, ADV, MASK, dual_clip=3.0,
                                                       backend=b),
    "ppo_loss/no_clamp": lambda b: rlkernels.ppo_loss(_with_nan(LP, NAN_AT), OLD, ADV, MASK, log_ratio_clamp=None,
                                                      backend=b),
    "grpo_loss/ref_logprobs": lambda b: rlkernels.grpo_loss(LP, OLD, ADV[:, 0], MASK, beta=0.1,
                                                            ref_logprobs=_with_nan(REF, NAN_AT), backend=b),
    "grpo_loss/logprobs": lambda b: rlkernels.grpo_loss(_with_nan(LP, NAN_AT), OLD, ADV[:, 0], MASK, backend=b),
    "grpo_loss/on_policy": lambda b: rlkernels.grpo_loss(_with_nan(LP, NAN_AT), None, ADV[:, 0], MASK, beta=0.1,
                                                         ref_logprobs=REF, backend=b),
    "value_loss/values": lambda b: rlkernels.value_loss(_with_nan(LP, NAN_AT), OLD, REF, MASK, clip=0.2, backend=b),
    "value_loss/old_values": lambda b: rlkernels.value_loss(LP, _with_nan(OLD, NAN_AT), REF, MASK, clip=0.2,
                                                            backend=b),
    "value_loss/returns": lambda b: rlkernels.value_loss(LP, OLD, _with_nan(REF, NAN_AT), MASK, clip=0.2, backend=b),
    "sequence_logprobs": lambda b: rlkernels.sequence_logprobs(_with_nan(LP, NAN_AT), MASK, backend=b),
    "masked_mean": lambda b: rlkernels.masked_mean(_with_nan(LP, NAN_AT), MASK, dim=1, backend=b),
    "masked_whiten": lambda b: rlkernels.masked_whiten(_with_nan(LP, NAN_AT), MASK, backend=b),
    "gae": lambda b: rlkernels.gae(_with_nan(LP, NAN_AT), OLD, MASK, gamma=0.9, lam=0.8, backend=b),
    "discounted_returns": lambda b: rlkernels.discounted_returns(_with_nan(LP, NAN_AT), MASK, gamma=0.9, backend=b),
    "logprobs": lambda b: rlkernels.logprobs(_with_nan(torch.randn(3, 7), (1, 4)), torch.tensor([1, 2, -100]),
                                             entropy=True, backend=b),
    "kl_from_logits": lambda b: rlkernels.kl_from_logits(_with_nan(torch.randn(3, 7), (1, 4)), torch.randn(3, 7),
                                                         backend=b),
    "kl_from_logits/ref": lambda b: rlkernels.kl_from_logits(torch.randn(3, 7), _with_nan(torch.randn(3, 7), (0, 0)),
                                                             backend=b),
    "linear_logprobs": lambda b: rlkernels.linear_logprobs(_with_nan(torch.randn(3, 4), (1, 2)), torch.randn(5, 4),
                                                           torch.tensor([0, 1, 2]), entropy=True, backend=b),
    "linear_ppo_loss": lambda b: rlkernels.linear_ppo_loss(torch.randn(1, 3, 4), torch.randn(5, 4),
                                                           torch.tensor([[0, 1, 2]]), _with_nan(OLD[:1, :3], (0, 1)),
                                                           ADV[:1, :3], backend=b),
}
for _kind in ("sigmoid", "ipo", "hinge", "robust"):
    for _arg in range(4):
        NAN_CASES[f"dpo_loss/{_kind}/{_arg}"] = (lambda kind, arg: lambda b: rlkernels.dpo_loss(
            *[_with_nan(t, 1) if i == arg else t for i, t in enumerate(DPO)], kind=kind, backend=b))(_kind, _arg)
for _kind in ("k1", "k2", "k3", "abs", "k1+", "k3+"):
    NAN_CASES[f"kl_penalty/{_kind}"] = (lambda kind: lambda b: rlkernels.kl_penalty(
        _with_nan(LP, NAN_AT), REF, kind, backend=b))(_kind)
DPO = [torch.randn(3) for _ in range(4)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", sorted(NAN_CASES))
def test_nan_in_a_valid_position_propagates_as_in_the_reference(case, backend):
    torch.manual_seed(1)
    expected = _flat(NAN_CASES[case]("reference"))
    torch.manual_seed(1)
    actual = _flat(NAN_CASES[case](backend))
    assert any(t.isnan().any() for t in expected), "the case must put NaN in a valid slot"
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a.isnan(), e.isnan()), (case, a, e)
        assert_close(a, e, dtype=torch.float32)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("layout", ["group_size", "group_index"])
def test_a_group_holding_nan_is_not_all_equal(backend, where, layout):
    scores = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0])
    scores[where] = NAN
    if layout == "group_size":
        advantages, all_equal = rlkernels.group_advantages(scores, 3, backend=backend)
    else:
        index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
        advantages, all_equal = rlkernels.group_advantages(scores, group_index=index, num_groups=3,
                                                           backend=backend)
    assert all_equal.tolist() == [False, True, False]
    assert advantages[:3].isnan().all() and not advantages[3:].isnan().any()


@pytest.mark.parametrize("backend", ALL)
def test_a_group_of_infinite_scores_is_not_all_equal(backend):
    """inf - inf: such a group's advantages are NaN, so it must not look skippable."""
    inf = float("inf")
    scores = torch.tensor([inf, inf, -inf, -inf, 2.0, 2.0, 1.0, inf])
    advantages, all_equal = rlkernels.group_advantages(scores, 2, backend=backend)
    assert all_equal.tolist() == [False, False, True, False]
    assert advantages[:4].isnan().all() and torch.equal(advantages[4:6], torch.zeros(2))


def test_triton_sources_keep_nan_in_min_max():
    """A GPU's max/min (tl.maximum, tl.minimum, tl.max, tl.min) return the non-NaN
    operand, the interpreter's numpy does not, so the tests above cannot see them drop a
    NaN.  Each use on data must be NaN-safe for a stated reason; new ones must be added
    here with theirs (or written as selects, `tl.where(x < lo, lo, x)`)."""
    import pathlib
    import re

    safe = {  # (file, code) -> why NaN cannot be lost there
        ("group_advantages.py", "tl.maximum(n, 1.0)"): "a count",
        ("group_advantages.py", "tl.maximum(N, 1)"): "a count",
        ("group_advantages.py", "tl.maximum(n - 1.0, 1.0)"): "a count",
        ("group_advantages.py", "tl.maximum(N - 1, 1)"): "a count",
        ("group_advantages.py", "tl.min(lo, axis=0)"): "NaN members are counted separately (nans)",
        ("group_advantages.py", "tl.max(hi, axis=0)"): "NaN members are counted separately (nans)",
        ("masked.py", "tl.maximum(n, 1.0)"): "a count",
        ("masked.py", "tl.maximum(n - 1.0, 1.0)"): "a count",
        ("_vocab.py", "tl.maximum(m, tl.max(x, axis=0))"): "a NaN logit still enters the sums (exp2)",
        ("_vocab.py", "tl.max(ms, axis=0)"): "a chunk holding a NaN logit has a NaN sum, which enters the merge",
        ("kl_from_logits.py", "tl.max(mas, axis=0)"): "a chunk holding a NaN logit has a NaN sum (merged)",
        ("kl_from_logits.py", "tl.max(mbs, axis=0)"): "a chunk holding a NaN logit has a NaN sum (merged)",
        ("kl_from_logits.py", "tl.maximum(ma, tl.max(a, axis=0))"): "a NaN logit still enters the sums (exp2)",
        ("kl_from_logits.py", "tl.maximum(mb, tl.max(b, axis=0))"): "a NaN logit still enters the sums (exp2)",
        ("kl_vocab_tile.py", "tl.maximum(ma, pma)"): "a chunk holding a NaN logit has a NaN sum (folded)",
        ("kl_vocab_tile.py", "tl.maximum(mb, pmb)"): "a chunk holding a NaN logit has a NaN sum (folded)",
        ("policy_loss.py", "tl.max(tl.where(valid, ratio, 0.0).to(ACC), axis=0)"): "ratio_max takes NaN from the ratio sum (_finalize_kernel)",
        ("_token_loss.py", "tl.maximum(tile, x)"): "ratio_max takes NaN from the ratio sum (_finalize_kernel)",
        ("_token_loss.py", "tl.maximum(totals, tl.max(tile, axis=0))"): "ratio_max takes NaN from the ratio sum (_finalize_kernel)",
        ("_token_loss.py", "tl.maximum(counted_tokens, 1.0)"): "a count",
        ("preference.py", "tl.minimum(x, 0.0)"): "log-sigmoid: the log1p(exp(-|x|)) term carries NaN",
        ("preference.py", "tl.maximum(n, 1.0)"): "a count",
        ("preference.py", "tl.maximum(nc, 1.0)"): "a count (dpo_sequence_loss' chosen rows)",
        ("preference.py", "tl.maximum(nr, 1.0)"): "a count (dpo_sequence_loss' rejected rows)",
        ("logprobs.py", "tl.maximum(found, tl.max(((x >= bound) & (cols < n)).to(tl.int32), axis=0))"):
            "integer flags of comparisons (is_top1's scan; a NaN logit compares false)",
    }
    root = pathlib.Path(rlkernels.__file__).parent / "triton"
    unreviewed = []
    for path in sorted(root.glob("*.py")):
        allowed = [code for name, code in safe if name == path.name]
        for line in path.read_text().splitlines():
            code = line.split("#")[0]
            for match in re.finditer(r"tl\.(maximum|minimum|max|min)\(", code):
                depth = 0
                for end in range(match.end() - 1, len(code)):  # the call, parentheses balanced
                    depth += {"(": 1, ")": -1}.get(code[end], 0)
                    if depth == 0:
                        break
                call = code[match.start():end + 1]
                # reviewed itself, or inside a reviewed enclosing call on this line
                if not any(call in ok and ok in code for ok in allowed):
                    unreviewed.append((path.name, call))
    assert not unreviewed, f"unreviewed min/max on data in Triton: {unreviewed}"


# ---- temperatures -------------------------------------------------------------------------------

TINY = 2.0 ** -126  # the smallest accepted temperature


def _temperature_calls(temperature, backend):
    logits, ref = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, -1.0]]), torch.tensor([[2.5, 2.0, 0.5], [0.0, 1.0, -1.0]])
    labels = torch.tensor([1, 0])
    hidden, weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 2.0], [2.0, 1.0], [0.5, 0.5]])
    return {
        "logprobs": lambda: rlkernels.logprobs(logits, labels, temperature=temperature, entropy=True, backend=backend),
        "kl_from_logits": lambda: rlkernels.kl_from_logits(logits, ref, temperature=temperature, backend=backend),
        "linear_logprobs": lambda: rlkernels.linear_logprobs(hidden, weight, labels, temperature=temperature,
                                                             entropy=True, backend=backend),
        "linear_ppo_loss": lambda: rlkernels.linear_ppo_loss(hidden[None], weight, labels[None], torch.zeros(1, 2),
                                                             torch.ones(1, 2), temperature=temperature,
                                                             backend=backend),
        "sequence_logprobs": lambda: rlkernels.sequence_logprobs(logits[None], labels=labels[None],
                                                                 temperature=temperature, backend=backend),
    }


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [TINY / 2, 3e-39, 1e-45, 1e-320])
def test_temperatures_whose_reciprocal_overflows_float32_are_rejected(backend, temperature):
    for name, call in _temperature_calls(temperature, backend).items():
        with pytest.raises(ValueError, match="temperature must be at least"):
            call()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [TINY, 2e-38, 1e-30])
def test_tiny_accepted_temperatures_give_the_greedy_limit(backend, temperature):
    """At T -> 0 the softmax is one-hot on the largest logit: log-probs 0 / -inf, entropy 0
    (a tie splits evenly: log 1/2), KL the reference's log-prob gap at the policy's tokens."""
    lp, entropy = _temperature_calls(temperature, backend)["logprobs"]()
    assert lp[0] == 0 and lp[1] == pytest.approx(-math.log(2)) and not lp.isnan().any()
    assert entropy[0] == 0 and entropy[1] == pytest.approx(math.log(2))
    kl = _temperature_calls(temperature, backend)["kl_from_logits"]()
    assert kl[0] == pytest.approx(0.5 / temperature, rel=1e-5)  # p on token 1, log q_1 = (2 - 2.5) / T
    assert kl[1] == pytest.approx(0.5 / temperature - math.log(2), rel=1e-5)  # p = (1/2, 1/2, 0), q on token 1
    values, _ = _temperature_calls(temperature, backend)["linear_logprobs"]()
    assert not values.isnan().any()


@pytest.mark.parametrize("backend", ALL)
def test_tiny_temperature_with_large_logits(backend):
    """logits / T overflows float32 (1e39) although every log-prob fits: the backends
    scale the gaps to the row's maximum, never the logits themselves."""
    logits, labels = torch.tensor([[100.0, 99.0, -50.0]]), torch.tensor([1])
    lp, entropy = rlkernels.logprobs(logits, labels, temperature=1e-37, entropy=True, backend=backend)
    assert lp.item() == pytest.approx(-1e37, rel=1e-5) and entropy.item() == 0
    kl = rlkernels.kl_from_logits(logits, torch.tensor([[99.0, 100.0, -50.0]]), temperature=1e-37, backend=backend)
    assert kl.item() == pytest.approx(1e37, rel=1e-5)  # p on token 0, log q_0 = (99 - 100) / T


# ---- kl_penalty: extreme log-ratios and the k3 formula -------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs", "k1+", "k3+"])
def test_kl_penalty_extreme_log_ratios_match_the_slopes(backend, kind):
    inf = float("inf")
    lp = torch.tensor([-inf, inf, 3e19, -3e19, 1e30, 0.5, 0.0], requires_grad=True)
    ref = torch.zeros(7, requires_grad=True)
    value = rlkernels.kl_penalty(lp, ref, kind, backend=backend)
    grad_lp, grad_ref = torch.autograd.grad(value.sum(), [lp, ref])
    r = lp.detach()
    slope = {"k1": torch.ones(7), "k2": r, "k1+": r, "k3+": r, "abs": torch.sign(r),
             # k3 (clamped at |r| = 20, then at value 10): flat out there, 1 - e^{-r} at r = 0.5 and 0
             "k3": torch.tensor([0, 0, 0, 0, 0, 1 - math.exp(-0.5), 0])}[kind]
    assert torch.equal(grad_lp.isnan(), torch.zeros(7, dtype=torch.bool)), grad_lp
    assert_close(grad_lp, slope, dtype=torch.float32)
    assert_close(grad_ref, -slope, dtype=torch.float32)
    expected = {"k1": r, "k1+": r, "k2": 0.5 * r.double() ** 2, "abs": r.abs()}.get(kind)
    if expected is not None:
        assert_close(value, expected.float(), dtype=torch.float32)
    else:  # k3 and k3+: 10 (the clamp) wherever |r| is large
        assert torch.equal(value[:5], torch.full((5,), 10.0))


@pytest.mark.parametrize("backend", ALL)
def test_k3_is_schulmans_estimator_of_kl_policy_to_reference(backend):
    """k3 = (rho - 1) - log rho with rho = p_ref / p, i.e. e^{-r} + r - 1 (verl's low_var_kl
    exp(kl) - kl - 1 with kl = ref - logprob), not the mirrored e^{r} - r - 1."""
    lp = torch.tensor([-0.1, -2.0, -0.5, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.0, -0.2, -0.5, -2.5], dtype=torch.float64)
    rho = torch.exp(ref - lp)
    value = rlkernels.kl_penalty(lp if backend != "triton" else lp.float(), ref if backend != "triton" else ref.float(),
                                 "k3", backend=backend)
    assert_close(value, (rho - 1) - torch.log(rho), dtype=value.dtype if backend != "triton" else torch.float32)
    assert value[1] > 1.0 > value[0]  # r = -1.8 costs more than r = +0.9


# ---- inputs the losses treat as data ------------------------------------------------------------

def _constants_cases():
    lp, old, adv, ref, w = (torch.randn(3, 5) * 0.3 for _ in range(5))
    mask = MASK
    return {
        "ppo_loss": (lambda b, x, o, a, wt: rlkernels.ppo_loss(x, o, a, mask, weights=wt, backend=b)[0],
                     [lp, old, adv, w.abs()]),
        "grpo_loss": (lambda b, x, o, a, r: rlkernels.grpo_loss(x, o, a, mask, ref_logprobs=r, beta=0.2, backend=b)[0],
                      [lp, old, adv[:, 0], ref]),
        "value_loss": (lambda b, v, o, r: rlkernels.value_loss(v, o, r, mask, clip=0.1, backend=b)[0],
                       [lp, old, ref]),
        "linear_ppo_loss": (lambda b, h, wt, o, a: rlkernels.linear_ppo_loss(h, wt, torch.tensor([[0, 1]]), o, a,
                                                                             clip_low=0.9, clip_high=100.0,
                                                                             backend=b)[0],
                            [torch.randn(1, 2, 4), torch.randn(3, 4), torch.randn(1, 2) - 1, torch.randn(1, 2)]),
    }


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", ["ppo_loss", "grpo_loss", "value_loss", "linear_ppo_loss"])
def test_loss_constants_get_no_gradient_on_any_backend(case, backend):
    fn, inputs = _constants_cases()[case]
    inputs = [t.clone().requires_grad_() for t in inputs]
    loss = fn(backend, *inputs)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    differentiated = 2 if case == "linear_ppo_loss" else 1  # (hidden, weight) or the first input
    for i, g in enumerate(grads):
        if i < differentiated:
            assert g is not None and g.abs().sum() > 0
        else:
            assert g is None, f"{case}: input {i} is data but got a gradient on backend {backend}"


# ---- degenerate shapes --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
def test_kl_from_logits_without_vocabulary_is_zero(backend):
    logits = torch.zeros(3, 0, requires_grad=True)
    kl = rlkernels.kl_from_logits(logits, torch.zeros(3, 0), mask=torch.tensor([1, 0, 1]), backend=backend)
    assert torch.equal(kl, torch.zeros(3)) and kl.dtype == torch.float32
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    assert grad.shape == (3, 0)


@pytest.mark.parametrize("backend", [b for b in ALL if b != "triton"])  # Triton's V = 0 is another change's
def test_logprobs_without_vocabulary_all_ignored_is_zero(backend):
    logits = torch.zeros(2, 3, 0, requires_grad=True)
    values, entropy = rlkernels.logprobs(logits, torch.full((2, 3), -100), entropy=True, backend=backend)
    assert torch.equal(values, torch.zeros(2, 3)) and torch.equal(entropy, torch.zeros(2, 3))
    (grad,) = torch.autograd.grad(values.sum() + entropy.sum(), logits)
    assert grad.shape == (2, 3, 0)


@pytest.mark.parametrize("backend", ALL)
def test_linear_logprobs_with_empty_hidden_is_uniform(backend):
    """H = 0: every logit is the empty sum 0 (plus the bias), so log p = -log V."""
    hidden, weight = torch.zeros(2, 3, 0, requires_grad=True), torch.zeros(5, 0, requires_grad=True)
    labels = torch.tensor([[0, 4, -100], [1, 2, 3]])
    values, entropy = rlkernels.linear_logprobs(hidden, weight, labels, entropy=True, backend=backend)
    valid = labels != -100
    assert_close(values, torch.where(valid, -math.log(5), 0.0), dtype=torch.float32)
    assert_close(entropy, torch.where(valid, math.log(5), 0.0), dtype=torch.float32)
    grads = torch.autograd.grad(values.sum(), [hidden, weight])
    assert grads[0].shape == (2, 3, 0) and grads[1].shape == (5, 0)
    bias = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    with_bias = rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, backend=backend)
    assert_close(with_bias, torch.where(valid, reference.logprobs(bias.expand(2, 3, 5), labels), 0.0),
                 dtype=torch.float32)
