"""The compiled ops' autograd, registered in C++ (csrc/autograd/, the ops' Autograd
dispatch key), against the Python autograd the Triton twins keep and against the
reference: the op a backward reaches and with which flags, gradients only for the
inputs that need one, gradient dtypes, no graph without gradients, and opcheck of the
ops with inputs that take gradients (torch.compile's AOT path through the C++ Function)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlkernels
from rlkernels import reference
from rlkernels.ops import _registry
from support import TRITON_ON_CPU, assert_close

# Ops with a backward: all have a C++ autograd kernel, their twins a Python one.
WITH_BACKWARD = ("logprobs", "kl_from_logits", "kl_penalty", "masked_row_mean", "dpo_loss", "sequence_logprobs",
                 "dpo_sequence_loss", "policy_loss", "value_loss")


def test_the_ops_with_a_backward_are_the_ones_given_cpp_autograd():
    assert {name for name, spec in _registry._SPECS.items() if spec.backward is not None} == set(WITH_BACKWARD)


@pytest.mark.parametrize("name", WITH_BACKWARD)
def test_autograd_kernel_is_cpp(name):
    dump = torch._C._dispatch_dump(f"rlkernels::{name}")
    line = next(row for row in dump.splitlines() if row.startswith("Autograd[alias]"))
    assert "csrc/autograd/" in line, line


@pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton twins need triton (TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("name", WITH_BACKWARD)
def test_twin_keeps_the_python_autograd(name):
    dump = torch._C._dispatch_dump(f"rlkernels::{name}_triton")
    line = next(row for row in dump.splitlines() if row.startswith("Autograd"))
    assert "csrc/autograd/" not in line, line


class _Calls(TorchDispatchMode):
    """The rlkernels ops a block runs, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rlkernels":
            self.calls.append((func._opname, args))
        return func(*args, **(kwargs or {}))

    def args_of(self, name):
        found = [args for op, args in self.calls if op == name]
        assert len(found) == 1, (name, [op for op, _ in self.calls])
        return found[0]


@pytest.mark.parametrize("logits_grad, ref_grad", [(True, False), (False, True), (True, True)])
def test_kl_backward_computes_only_the_gradients_needed(logits_grad, ref_grad):
    logits = torch.randn(3, 11, requires_grad=logits_grad)
    ref = torch.randn(3, 11, requires_grad=ref_grad)
    calls = _Calls()
    with calls:
        kl = rlkernels.kl_from_logits(logits, ref, temperature=0.9)
        kl.sum().backward()
    args = calls.args_of("kl_from_logits_backward")
    assert args[-2:] == (logits_grad, ref_grad)
    truth = [t.detach().double().requires_grad_() for t in (logits, ref)]
    reference.kl_from_logits(*truth, temperature=0.9).sum().backward()
    for t, want, needed in zip((logits, ref), truth, (logits_grad, ref_grad)):
        if needed:
            assert t.grad.dtype == t.dtype
            assert_close(t.grad, want.grad, dtype=torch.float32)
        else:
            assert t.grad is None


@pytest.mark.parametrize("needed", [(0,), (1, 2), (0, 1, 2, 3), (3,)])
def test_dpo_gradients_only_where_needed_and_in_each_dtype(needed):
    dtypes = (torch.float32, torch.float32, torch.float64, torch.float64)
    values = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    ours = [v.to(d, copy=True).requires_grad_(i in needed) for i, (v, d) in enumerate(zip(values, dtypes))]
    loss = rlkernels.dpo_loss(*ours, beta=0.3, kind="sigmoid", label_smoothing=0.1)[0]
    (loss * torch.arange(1.0, 6.0, dtype=loss.dtype)).sum().backward()
    truth = [v.clone().requires_grad_() for v in values]
    want = reference.dpo_loss(*truth, beta=0.3, kind="sigmoid", label_smoothing=0.1)[0]
    (want * torch.arange(1.0, 6.0, dtype=want.dtype)).sum().backward()
    for i, (t, w) in enumerate(zip(ours, truth)):
        if i in needed:
            assert t.grad.dtype == t.dtype
            assert_close(t.grad, w.grad, dtype=torch.float32)
        else:
            assert t.grad is None
    # each input holds a gradient of its own (pc and rr get the same values, never one tensor)
    grads = [t.grad for t in ours if t.grad is not None]
    assert len({g.data_ptr() for g in grads}) == len(grads)


@pytest.mark.parametrize("policy_grad, ref_grad", [(True, False), (False, True), (True, True)])
def test_dpo_sequence_backward_runs_once_per_input_needing_it(policy_grad, ref_grad):
    policy = torch.randn(4, 6, dtype=torch.float32, requires_grad=policy_grad)
    ref = torch.randn(4, 6, dtype=torch.float32, requires_grad=ref_grad)
    mask = torch.rand(4, 6) > 0.3
    calls = _Calls()
    with calls:
        losses, _, _ = rlkernels.dpo_sequence_loss(policy, ref, mask, beta=0.2, average=True)
        losses.mean().backward()
    scales = [args[3] for op, args in calls.calls if op == "dpo_sequence_loss_backward"]
    assert scales == [1.0] * policy_grad + [-1.0] * ref_grad
    truth = [t.detach().double().requires_grad_() for t in (policy, ref)]
    reference.dpo_sequence_loss(*truth, mask, beta=0.2, average=True)[0].mean().backward()
    for t, want, needed in zip((policy, ref), truth, (policy_grad, ref_grad)):
        if needed:
            assert t.grad.dtype == t.dtype
            assert_close(t.grad, want.grad, dtype=torch.float32)
        else:
            assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_gradient_dtype_and_values(dtype):
    logits = (torch.randn(4, 3, 13) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 13, (4, 3))
    labels[1, 2] = -100
    lp, ent = rlkernels.logprobs(logits, labels, temperature=0.8, entropy=True)
    weights = torch.randn(4, 3)
    ((lp * weights).sum() + ent.sum()).backward()
    assert logits.grad.dtype == dtype
    truth = logits.detach().double().requires_grad_()
    t_lp, t_ent = reference.logprobs(truth, labels, temperature=0.8, entropy=True)
    ((t_lp * weights.double()).sum() + t_ent.sum()).backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(logits.grad.double(), truth.grad, **tol)


def test_logprobs_entropy_unused_in_the_loss():
    """An output without a gradient arrives as zeros (materialised), as for the Python twin."""
    logits = torch.randn(3, 9, requires_grad=True)
    labels = torch.randint(0, 9, (3,))
    lp, _ = rlkernels.logprobs(logits, labels, entropy=True)
    lp.sum().backward()
    truth = logits.detach().double().requires_grad_()
    reference.logprobs(truth, labels).sum().backward()
    assert_close(logits.grad, truth.grad, dtype=torch.float32)


def test_kl_penalty_gradients_in_each_input_dtype_only_where_needed():
    lp = torch.randn(3, 4, requires_grad=True)
    ref = torch.randn(3, 4)
    rlkernels.kl_penalty(lp, ref, "k3").sum().backward()
    truth = lp.detach().double().requires_grad_()
    reference.kl_penalty(truth, ref.double(), "k3").sum().backward()
    assert lp.grad.dtype == torch.float32 and ref.grad is None
    assert_close(lp.grad, truth.grad, dtype=torch.float32)


@pytest.mark.parametrize("masked", [False, True])
def test_masked_mean_gradient(masked):
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 6) > 0.4 if masked else None
    if masked:
        mask[2] = False  # a row without a valid entry: no gradient there
    torch.autograd.gradcheck(lambda t: rlkernels.masked_mean(t, mask, dim=1), (x,))
    torch.autograd.gradgradcheck(lambda t: rlkernels.masked_mean(t, mask, dim=1), (x,))


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_gradient(average):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 7) > 0.3
    torch.autograd.gradcheck(lambda t: rlkernels.sequence_logprobs(t, mask, average=average), (x,))
    torch.autograd.gradgradcheck(lambda t: rlkernels.sequence_logprobs(t, mask, average=average), (x,))


def test_token_losses_reach_scale_rows_once():
    lp = torch.randn(2, 5, requires_grad=True)
    old = lp.detach() + 0.1 * torch.randn(2, 5)
    calls = _Calls()
    with calls:
        loss, _ = rlkernels.ppo_loss(lp, old, torch.randn(2, 5))
        loss.backward()
    calls.args_of("scale_rows")
    assert lp.grad.shape == (2, 5) and lp.grad.abs().sum() > 0


def test_no_graph_without_gradients():
    logits = torch.randn(3, 9, requires_grad=True)
    labels = torch.randint(0, 9, (3,))
    with torch.no_grad():
        out = rlkernels.logprobs(logits, labels)
    assert out.grad_fn is None and not out.requires_grad
    out = rlkernels.logprobs(logits.detach(), labels)
    assert out.grad_fn is None
    out = rlkernels.logprobs(logits, labels)
    assert out.requires_grad and "Logprobs" in out.grad_fn.name()


def _samples():
    logits = torch.randn(3, 10, requires_grad=True)
    ref = torch.randn(3, 10, requires_grad=True)
    labels = torch.randint(0, 10, (3,))
    mask2 = torch.rand(2, 5) > 0.3
    lp = torch.randn(2, 5, requires_grad=True)
    f = torch.randn(2, 5)
    op = torch.ops.rlkernels
    return [
        (op.logprobs.default, (logits, labels, 0.9, -100, True, False)),
        (op.kl_from_logits.default, (logits, ref, torch.tensor([True, False, True]), 1.1)),
        (op.kl_penalty.default, (lp, f, "k3", 10.0)),
        (op.masked_row_mean.default, (lp, mask2)),
        (op.dpo_loss.default, (torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True),
                               torch.randn(4), torch.randn(4), 0.1, "sigmoid", 0.0)),
        (op.sequence_logprobs.default, (lp, mask2, True)),
        (op.dpo_sequence_loss.default, (lp, torch.randn(2, 5, requires_grad=True), mask2, 0.1, "sigmoid", 0.0,
                                        False)),
        (op.policy_loss.default, (lp, f, torch.randn(2, 5), mask2, None, None,
                                  [0.2, 0.2, float("inf"), 20.0, 0.0, -1.0, -1.0, -1.0], "none", "token-mean",
                                  True)),
        (op.value_loss.default, (lp, f, torch.randn(2, 5), mask2, [0.2, -1.0, -1.0, -1.0], "token-mean", True)),
    ]


@pytest.mark.parametrize("index", range(len(WITH_BACKWARD)))
def test_opcheck_with_gradients(index):
    fn, args = _samples()[index]
    assert fn._opname == WITH_BACKWARD[index]
    torch.library.opcheck(fn, args)


def test_compiled_backward_matches_eager():
    logits = torch.randn(4, 12, requires_grad=True)
    labels = torch.randint(0, 12, (4,))

    def loss(x):
        return rlkernels.logprobs(x, labels, temperature=0.7).sum() + rlkernels.kl_from_logits(x, x.detach()).sum()

    (eager,) = torch.autograd.grad(loss(logits), logits)
    (compiled,) = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(logits), logits)
    assert_close(compiled, eager, dtype=torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "reference"] + (["triton"] if TRITON_ON_CPU else []))
def test_ratio_max_keeps_a_nan_ratio(backend):
    """The stats' NaN rule: the kernels' finalize step takes NaN from the ratio sum (a max
    reduction skips it); a NaN under the mask reaches neither."""
    lp = torch.randn(2, 5)
    old = lp + 0.1
    lp[1, 2] = float("nan")
    _, stats = rlkernels.ppo_loss(lp, old, torch.randn(2, 5), backend=backend)
    assert stats["ratio_mean"].isnan() and stats["ratio_max"].isnan()
    assert stats["ratio_max"] is not stats["ratio_mean"]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2] = False
    _, masked = rlkernels.ppo_loss(lp, old, torch.randn(2, 5), mask, backend=backend)
    assert not masked["ratio_max"].isnan() and not masked["ratio_mean"].isnan()
    assert masked["ratio_max"] >= masked["ratio_mean"] * (1 - 1e-6)
    _, grpo = rlkernels.grpo_loss(lp, old, torch.randn(2), ref_logprobs=old, beta=0.1, backend=backend)
    assert grpo["ratio_max"].isnan()
    _, clean = rlkernels.ppo_loss(lp.nan_to_num(0.0), old, torch.randn(2, 5), backend=backend)
    assert not clean["ratio_max"].isnan() and clean["ratio_max"] >= clean["ratio_mean"] * (1 - 1e-6)
