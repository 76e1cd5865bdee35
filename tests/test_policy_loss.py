"""ppo_loss and grpo_loss: every backend against the reference (and against
independent TRL/verl-style formulas), adversarial inputs, gradients, split batches,
opcheck, torch.compile and bad input.  Also scale_rows, the backward kernel that
policy_loss and value_loss share."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from rlkernels.reference._token_loss import AGG_MODES
from rlkernels.reference.policy_loss import POLICY_STATS
from support import TRITON_ON_CPU, close_stats, finite_scaled_close, loss_and_grad, poisoned, token_mask

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def policy_batch(B, T, dtype, device, spread=0.3):
    logprobs = -torch.rand(B, T, device=device) * 3
    old = logprobs + torch.randn(B, T, device=device) * spread
    advantages = torch.randn(B, T, device=device)
    return logprobs.to(dtype), old.to(dtype), advantages.to(dtype)




# ---- ppo_loss ---------------------------------------------------------------------------------

# One long-row case per agg is enough under the interpreter.
@pytest.mark.interpreter_heavy(lambda p: (p["B"], p["T"]) == (6, 1030) and p["dual_clip"] is None)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 37), (6, 1030)])
def test_ppo_every_agg_matches_reference(backend_device, agg, dual_clip, B, T):
    backend, device = backend_device
    lp, old, adv = policy_batch(B, T, torch.float32, device, spread=0.8)
    mask = token_mask(B, T, device)
    kw = dict(agg=agg, dual_clip=dual_clip, clip_high=0.28)
    loss, stats, grad = loss_and_grad(rlkernels.ppo_loss, lp, old, adv, mask, backend=backend, **kw)
    t_loss, t_stats, t_grad = loss_and_grad(reference.ppo_loss, lp.double(), old.double(), adv.double(), mask, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    finite_scaled_close(loss, t_loss, what="loss")
    finite_scaled_close(grad, t_grad, what="grad")
    close_stats(stats, t_stats, torch.float32, POLICY_STATS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "gaps"])
def test_ppo_dtypes(backend_device, dtype, mask_kind):
    backend, device = backend_device
    B, T = 4, 300
    lp, old, adv = policy_batch(B, T, dtype, device, spread=0.5)
    weights = torch.rand(B, T, device=device).to(dtype) + 0.5
    mask = token_mask(B, T, device, mask_kind)
    kw = dict(agg="seq-mean-token-mean", dual_clip=2.5)
    loss, stats, grad = loss_and_grad(rlkernels.ppo_loss, lp, old, adv, mask, weights=weights, backend=backend, **kw)
    t_loss, t_stats, t_grad = loss_and_grad(reference.ppo_loss, lp.double(), old.double(), adv.double(), mask,
                                            weights=weights.double(), **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    finite_scaled_close(loss, t_loss, dtype, "loss")
    # A 16-bit gradient is our float32 gradient rounded once: compare at its precision.
    if dtype in (torch.float32, torch.float64):
        finite_scaled_close(grad, t_grad, dtype, "grad")
    else:
        torch.testing.assert_close(grad.float().cpu(), t_grad.to(dtype).float().cpu(), rtol=1e-2,
                                   atol=1e-2 * t_grad.abs().max().item())
    close_stats(stats, t_stats, dtype, POLICY_STATS)


def test_ppo_adversarial(backend_device):
    """Ratios far from 1 both ways (beyond the log-ratio clamp), both advantage signs,
    every clip branch and the dual clip hit, empty rows and poison in masked slots."""
    backend, device = backend_device
    B, T = 6, 203
    lp = -torch.rand(B, T, device=device) * 5
    log_ratio = torch.randn(B, T, device=device) * 2
    log_ratio[:, ::7] = 30.0   # beyond the clamp of 20
    log_ratio[:, 3::7] = -30.0
    old = lp - log_ratio
    adv = torch.randn(B, T, device=device) * 3
    adv[:, ::2] = adv[:, ::2].abs()
    adv[:, 1::2] = -adv[:, 1::2].abs()
    adv[:, 5::11] = 0.0
    mask = token_mask(B, T, device)
    kw = dict(agg="token-mean", dual_clip=3.0, clip_low=0.2, clip_high=0.3)
    loss, stats, grad = loss_and_grad(rlkernels.ppo_loss, poisoned(lp, mask), poisoned(old, mask),
                                      poisoned(adv, mask), mask, backend=backend, **kw)
    t_loss, t_stats, t_grad = loss_and_grad(reference.ppo_loss, lp.double(), old.double(), adv.double(), mask, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.all(grad[~mask] == 0)
    finite_scaled_close(loss, t_loss, what="loss")
    finite_scaled_close(grad, t_grad, what="grad")
    close_stats(stats, t_stats, torch.float32, POLICY_STATS)
    for name in ("clip_frac_upper", "clip_frac_lower", "clip_frac_dual"):
        assert 0 < stats[name].item() < 0.5, name
    # The clean run gives bit-identical results: masked slots are never read into sums.
    clean, clean_stats, clean_grad = loss_and_grad(rlkernels.ppo_loss, lp, old, adv, mask, backend=backend, **kw)
    assert torch.equal(loss, clean) and torch.equal(grad, clean_grad)


def test_ppo_gradient_branches_by_hand():
    """Each branch of the clipped surrogate, computed by hand (clip 0.2, dual 3)."""
    lp = torch.zeros(1, 6, dtype=torch.float64)
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.9, 5.0, 1.0]], dtype=torch.float64)
    old = -ratios.log()
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0, -1.0, 0.0]], dtype=torch.float64)
    # L: -A r inside the range, -A (1+c) clipped above for A > 0, -A (1-c) clipped
    # below for A < 0, the dual cap -A * 3 for A < 0 and r > 3.
    expected_loss = torch.tensor([-2.2, -2.4, 0.8, 0.9, 3.0, 0.0], dtype=torch.float64)
    expected_grad = torch.tensor([-2.2, 0.0, 0.0, 0.9, 0.0, 0.0], dtype=torch.float64)  # dL/dlp = -A r or 0
    for backend in ("cpu", "reference"):
        loss, stats, grad = loss_and_grad(rlkernels.ppo_loss, lp, old, adv, agg="token-sum", dual_clip=3.0,
                                          backend=backend)
        finite_scaled_close(loss, expected_loss.sum(), torch.float64)
        finite_scaled_close(grad, expected_grad.unsqueeze(0), torch.float64)
        assert stats["clip_frac_upper"].item() == pytest.approx(1 / 6)
        assert stats["clip_frac_lower"].item() == pytest.approx(1 / 6)
        assert stats["clip_frac_dual"].item() == pytest.approx(1 / 6)
        assert stats["ratio_max"].item() == pytest.approx(5.0)


def verl_policy_loss(logprobs, old, adv, mask, clip, dual, agg):
    """verl's vanilla compute_policy_loss + agg_loss, written out with all rows counted
    for the sequence means (its torch.mean over rows)."""
    negative_approx_kl = torch.clamp(logprobs - old, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -adv * dual
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
    m = mask.to(pg_losses.dtype)
    if agg == "token-mean":
        return (pg_losses * m).sum() / m.sum()
    seq = (pg_losses * m).sum(-1)
    if agg == "seq-mean-token-sum":
        return seq.mean()
    if agg == "seq-mean-token-mean":
        return (seq / m.sum(-1)).mean()
    raise AssertionError(agg)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_ppo_matches_verl_formulas(agg):
    B, T = 5, 40
    lp, old, adv = policy_batch(B, T, torch.float64, "cpu", spread=0.6)
    mask = torch.rand(B, T) > 0.2
    mask[:, 0] = True  # verl divides by every row's count: keep them non-empty
    expected = verl_policy_loss(lp, old, adv, mask, 0.2, 3.0, agg)
    loss, _ = rlkernels.ppo_loss(lp, old, adv, mask, dual_clip=3.0, agg=agg, num_seqs=B)
    finite_scaled_close(loss, expected, torch.float64)


def test_ppo_per_sequence_advantages(backend_device):
    backend, device = backend_device
    B, T = 5, 33
    lp, old, _ = policy_batch(B, T, torch.float32, device)
    adv = torch.randn(B, device=device)
    mask = token_mask(B, T, device)
    loss, stats, grad = loss_and_grad(rlkernels.ppo_loss, lp, old, adv, mask, backend=backend)
    for expanded in (adv[:, None], adv[:, None].expand(B, T)):
        loss2, stats2, grad2 = loss_and_grad(rlkernels.ppo_loss, lp, old, expanded, mask, backend=backend)
        finite_scaled_close(loss, loss2)
        finite_scaled_close(grad, grad2)


def test_ppo_no_grad_needed(backend_device):
    backend, device = backend_device
    lp, old, adv = policy_batch(3, 20, torch.float32, device)
    with torch.no_grad():
        loss, stats = rlkernels.ppo_loss(lp.requires_grad_(), old, adv, backend=backend)
    assert not loss.requires_grad
    expected, _ = reference.ppo_loss(lp.detach(), old, adv)
    finite_scaled_close(loss, expected)


@pytest.mark.parametrize("B,T", [(0, 5), (4, 0)])
def test_ppo_empty_batch(backend_device, B, T):
    backend, device = backend_device
    lp, old, adv = policy_batch(B, T, torch.float32, device)
    for agg in AGG_MODES:
        loss, stats, grad = loss_and_grad(rlkernels.ppo_loss, lp, old, adv, agg=agg, backend=backend)
        assert loss.item() == 0 and grad.shape == (B, T)
        assert all(v.item() == 0 for v in stats.values())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_ppo_gradcheck(backend, agg):
    B, T = 3, 9
    lp, old, adv = policy_batch(B, T, torch.float64, "cpu", spread=0.5)
    weights = torch.rand(B, T, dtype=torch.float64) + 0.5
    mask = token_mask(B, T, "cpu")
    lp.requires_grad_()

    def f(x):
        return rlkernels.ppo_loss(x, old, adv, mask, dual_clip=2.0, weights=weights, agg=agg, backend=backend)[0]

    assert torch.autograd.gradcheck(f, (lp,))


def test_ppo_backward_scales_by_incoming_grad():
    lp, old, adv = policy_batch(3, 11, torch.float64, "cpu")
    _, _, grad = loss_and_grad(rlkernels.ppo_loss, lp, old, adv)
    x = lp.clone().requires_grad_()
    loss, _ = rlkernels.ppo_loss(x, old, adv)
    (loss * -2.5).backward()
    finite_scaled_close(x.grad, -2.5 * grad, torch.float64)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_split_batch_gives_whole_batch_gradient(backend_device, agg):
    """Two micro-batches with the global num_tokens / num_seqs add up to the whole
    batch's loss and gradient (gradient accumulation, data parallelism)."""
    backend, device = backend_device
    B, T = 8, 45
    lp, old, adv = policy_batch(B, T, torch.float64, device, spread=0.6)
    mask = token_mask(B, T, device)
    num_tokens = float(mask.sum())
    num_seqs = float(mask.any(-1).sum())
    kw = dict(agg=agg, dual_clip=3.0)
    whole, _, whole_grad = loss_and_grad(rlkernels.ppo_loss, lp, old, adv, mask, backend=backend, **kw)
    x = lp.detach().clone().requires_grad_()
    total = 0
    for rows in (slice(0, 3), slice(3, B)):
        part, _ = rlkernels.ppo_loss(x[rows], old[rows], adv[rows], mask[rows], num_tokens=num_tokens,
                                     num_seqs=num_seqs, backend=backend, **kw)
        part.backward()
        total = total + part.detach()
    finite_scaled_close(total, whole, torch.float64)
    finite_scaled_close(x.grad, whole_grad, torch.float64)
    # value_loss shares the aggregation
    v, ret = torch.randn(B, T, dtype=torch.float64, device=device), torch.randn(B, T, dtype=torch.float64, device=device)
    whole_v, _, whole_v_grad = loss_and_grad(rlkernels.value_loss, v, v * 0.9, ret, mask, clip=0.2, agg=agg,
                                             backend=backend)
    y = v.clone().requires_grad_()
    for rows in (slice(0, 5), slice(5, B)):
        part, _ = rlkernels.value_loss(y[rows], v[rows] * 0.9, ret[rows], mask[rows], clip=0.2, agg=agg,
                                       num_tokens=num_tokens, num_seqs=num_seqs, backend=backend)
        part.backward()
    finite_scaled_close(y.grad, whole_v_grad, torch.float64)


def test_ppo_norm_length_and_counts(backend_device):
    backend, device = backend_device
    B, T = 4, 16
    lp, old, adv = policy_batch(B, T, torch.float64, device)
    mask = token_mask(B, T, device)
    for kw in (dict(agg="seq-mean-token-sum-norm", norm_length=64.0, num_seqs=10.0),
               dict(agg="token-mean", num_tokens=123.0), dict(agg="seq-mean-token-mean", num_seqs=7.0)):
        loss, _, grad = loss_and_grad(rlkernels.ppo_loss, lp, old, adv, mask, backend=backend, **kw)
        t_loss, _, t_grad = loss_and_grad(reference.ppo_loss, lp, old, adv, mask, **kw)
        finite_scaled_close(loss, t_loss, torch.float64)
        finite_scaled_close(grad, t_grad, torch.float64)


# ---- grpo_loss --------------------------------------------------------------------------------

def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, beta,
                  eps_low, eps_high, loss_type, max_completion_length, num_items_in_batch):
    """TRL GRPOTrainer.compute_loss, written out (one process, no accumulation)."""
    per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1)
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    per_token_loss = per_token_loss + beta * per_token_kl
    m = completion_mask.to(per_token_loss.dtype)
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * m).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        return (per_token_loss * m).sum() / num_items_in_batch
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_matches_trl(backend_device, loss_type):
    backend, device = backend_device
    B, T = 6, 29
    lp, old, _ = policy_batch(B, T, torch.float64, device, spread=0.4)
    ref = lp + torch.randn(B, T, dtype=torch.float64, device=device) * 0.3
    adv = torch.randn(B, dtype=torch.float64, device=device)
    mask = token_mask(B, T, device)
    kw = dict(ref_logprobs=ref, beta=0.04, loss_type=loss_type, clip_low=0.2, clip_high=0.28)
    if loss_type == "dr_grpo":
        kw["max_completion_length"] = 40
    if loss_type == "dapo":
        kw["num_tokens"] = 100.0
    loss, stats, grad = loss_and_grad(rlkernels.grpo_loss, poisoned(lp, mask), old, adv, mask, backend=backend, **kw)
    x = lp.clone().requires_grad_()
    expected = trl_grpo_loss(x, old, ref, adv, mask, 0.04, 0.2, 0.28, loss_type, 40, 100.0)
    (expected_grad,) = torch.autograd.grad(expected, x)
    finite_scaled_close(loss, expected, torch.float64)
    finite_scaled_close(grad, expected_grad, torch.float64)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    finite_scaled_close(stats["kl"], kl[mask].mean(), torch.float64)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_grpo_kl_estimators(backend_device, kl):
    backend, device = backend_device
    B, T = 4, 50
    lp, old, adv = policy_batch(B, T, torch.float32, device)
    ref = lp + torch.randn(B, T, device=device) * 0.5
    mask = token_mask(B, T, device)
    kw = dict(ref_logprobs=ref, beta=0.1, kl=kl)
    loss, stats, grad = loss_and_grad(rlkernels.grpo_loss, lp, old, adv, mask, backend=backend, **kw)
    t_loss, t_stats, t_grad = loss_and_grad(reference.grpo_loss, lp.double(), old.double(), adv.double(), mask,
                                            **{**kw, "ref_logprobs": ref.double()})
    finite_scaled_close(loss, t_loss, what="loss")
    finite_scaled_close(grad, t_grad, what="grad")
    close_stats(stats, t_stats, torch.float32, POLICY_STATS)
    assert stats["kl"].item() != 0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_grpo_on_policy_and_unclamped_ratios(backend_device):
    """old_logprobs=None is TRL's detach (ratio 1); without a clamp, huge log ratios give
    inf ratios exactly as exp does (clipped away for A > 0)."""
    backend, device = backend_device
    B, T = 3, 12
    lp, _, adv = policy_batch(B, T, torch.float32, device)
    adv = adv.abs()
    loss, stats, grad = loss_and_grad(rlkernels.grpo_loss, lp, None, adv, backend=backend)
    t_loss, _, t_grad = loss_and_grad(reference.grpo_loss, lp.double(), None, adv.double())
    finite_scaled_close(loss, t_loss)
    finite_scaled_close(grad, t_grad)
    assert stats["ratio_max"].item() == 1.0
    old = lp - 200.0
    loss, stats, grad = loss_and_grad(rlkernels.grpo_loss, lp, old, adv, backend=backend, loss_type="bnpo")
    assert stats["ratio_max"].item() == float("inf")
    assert torch.isfinite(loss) and torch.all(grad == 0)
    finite_scaled_close(loss, -(adv * 1.2).mean())


# ---- torch.library integration ----------------------------------------------------------------

def _policy_samples():
    lp, old, adv = policy_batch(3, 11, torch.float32, "cpu", spread=0.5)
    mask = token_mask(3, 11, "cpu")
    ref = lp + 0.1
    inf = float("inf")
    yield (lp.requires_grad_(), old, adv, mask, torch.rand(3, 11), None, [0.2, 0.28, 3.0, 20.0, 0.0, -1.0, -1.0, -1.0],
           "none", "token-mean", True)
    yield (lp.double().detach().requires_grad_(), old.double(), adv[:, 0].double(), None, None, ref.double(),
           [0.2, 0.2, inf, inf, 0.05, -1.0, 3.0, -1.0], "k3", "seq-mean-token-mean", True)
    yield (lp.bfloat16().detach(), old.bfloat16(), adv.bfloat16(), mask, None, None,
           [0.1, 0.3, inf, 5.0, 0.0, 7.0, 2.0, 40.0], "none", "seq-mean-token-sum-norm", False)


@pytest.mark.parametrize("sample", list(_policy_samples()), ids=["weights-dual", "f64-kl", "bf16-nograd"])
def test_policy_opcheck(sample):
    torch.library.opcheck(torch.ops.rlkernels.policy_loss.default, sample)
    if TRITON_ON_CPU:
        torch.library.opcheck(torch.ops.rlkernels.policy_loss_triton.default, sample)


def test_scale_rows_opcheck():
    grad, row_scale = torch.randn(3, 7), torch.rand(3)
    ops = [torch.ops.rlkernels.scale_rows.default]
    if TRITON_ON_CPU:
        ops.append(torch.ops.rlkernels.scale_rows_triton.default)
    for op in ops:
        torch.library.opcheck(op, (grad, row_scale, torch.tensor(-2.5), torch.bfloat16))
        torch.library.opcheck(op, (grad.double(), row_scale.double(), torch.tensor(0.5), torch.float64))
        out = op(grad, row_scale, torch.tensor(-2.5), torch.float32)
        finite_scaled_close(out, grad * row_scale[:, None] * -2.5)


def test_torch_compile_fullgraph():
    lp, old, adv = policy_batch(4, 13, torch.float32, "cpu")
    mask = token_mask(4, 13, "cpu")
    values, returns = torch.randn(4, 13), torch.randn(4, 13)

    @torch.compile(fullgraph=True, backend="eager")
    def step(x, v):
        pg, stats = rlkernels.ppo_loss(x, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean")
        grpo, _ = rlkernels.grpo_loss(x, old, adv[:, 0], mask, ref_logprobs=old, beta=0.1)
        vf, _ = rlkernels.value_loss(v, values, returns, mask, clip=0.2)
        return pg + grpo + 0.5 * vf, stats["clip_frac_lower"]

    x, v = lp.clone().requires_grad_(), values.clone().requires_grad_()
    total, frac = step(x, v)
    total.backward()
    y, w = lp.clone().requires_grad_(), values.clone().requires_grad_()
    pg, stats = reference.ppo_loss(y, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean")
    grpo, _ = reference.grpo_loss(y, old, adv[:, 0], mask, ref_logprobs=old, beta=0.1)
    vf, _ = reference.value_loss(w, values, returns, mask, clip=0.2)
    (pg + grpo + 0.5 * vf).backward()
    finite_scaled_close(total, pg + grpo + 0.5 * vf)
    finite_scaled_close(frac, stats["clip_frac_lower"])
    finite_scaled_close(x.grad, y.grad)
    finite_scaled_close(v.grad, w.grad)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(old_logprobs=torch.randn(3, 5)), ValueError, "old_logprobs must have the shape of logprobs"),
    (dict(advantages=torch.randn(4)), ValueError, "advantages must have the shape of logprobs"),
    (dict(weights=torch.randn(4, 3)), ValueError, "weights must have the shape of logprobs"),
    (dict(logprobs=torch.randn(12)), ValueError, "logprobs must be 2-D"),
    (dict(logprobs=torch.ones(3, 4, dtype=torch.int64)), TypeError, "logprobs must have dtype"),
    (dict(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(mask=torch.full((3, 4), 2.0)), ValueError, "mask must hold only 0 and 1"),
    (dict(clip_low=0.0), ValueError, "clip_low must be > 0.0"),
    (dict(clip_low=1.0), ValueError, "clip_low must be < 1.0"),
    (dict(clip_low=-0.1), ValueError, "clip_low must be > 0.0"),
    (dict(clip_high=0.0), ValueError, "clip_high must be > 0.0"),
    (dict(dual_clip=1.0), ValueError, "dual_clip must be > 1.0"),
    (dict(dual_clip=0.5), ValueError, "dual_clip must be > 1.0"),
    (dict(log_ratio_clamp=0.0), ValueError, "log_ratio_clamp must be > 0.0"),
    (dict(agg="mean"), ValueError, "agg must be one of"),
    (dict(num_tokens=0), ValueError, "num_tokens must be > 0.0"),
    (dict(num_seqs=-2.0), ValueError, "num_seqs must be > 0.0"),
    (dict(norm_length="8"), TypeError, "norm_length must be a number"),
    (dict(old_logprobs=torch.randn(3, 4, device="meta")), ValueError, "old_logprobs is on meta but logprobs"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "backend='cuda' is unavailable"),
])
def test_ppo_bad_input(kwargs, error, match):
    args = dict(logprobs=torch.randn(3, 4), old_logprobs=torch.randn(3, 4), advantages=torch.randn(3, 4), mask=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlkernels.ppo_loss(args.pop("logprobs"), args.pop("old_logprobs"), args.pop("advantages"),
                           args.pop("mask"), **args)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(beta=-0.1), ValueError, "beta must be >= 0.0"),
    (dict(beta=0.1), ValueError, "beta > 0 needs ref_logprobs"),
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(kl="k4", beta=0.1, ref_logprobs=torch.randn(3, 4)), ValueError, "kl must be one of"),
    (dict(max_completion_length=0, loss_type="dr_grpo"), ValueError, "max_completion_length must be > 0"),
    (dict(ref_logprobs=torch.randn(3, 5), beta=0.1), ValueError, "ref_logprobs must have the shape of logprobs"),
    (dict(clip_low=1.5), ValueError, "clip_low must be < 1.0"),
])
def test_grpo_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        rlkernels.grpo_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3), **kwargs)
