"""rlkernels.integrations.patch_trl against the installed TRL's own functions on the
same inputs (values and gradients), fallbacks, and unpatching.  Runs when trl is
importable."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from support import import_library
from rlkernels.integrations import patch_trl, unpatch_trl

trl_utils = import_library("trl.trainer.utils", "trl")

ORIGINAL = {name: getattr(trl_utils, name) for name in
            ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy",
             "_ChunkedLogProbFunction") if hasattr(trl_utils, name)}


@pytest.fixture
def patched():
    patch_trl()
    yield trl_utils
    unpatch_trl()


def _inputs(dtype, B=3, T=5, V=211, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * 3).to(dtype).requires_grad_(True)
    index = torch.randint(0, V, (B, T), generator=gen)
    row_mask = torch.rand(B, T, generator=gen) > 0.3
    return logits, index, row_mask


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_trl(patched, dtype, temperature):
    logits, index, row_mask = _inputs(dtype)
    ours = patched.selective_log_softmax(logits, index, temperature, row_mask)
    theirs = ORIGINAL["selective_log_softmax"](logits, index, temperature, row_mask)
    assert patched.selective_log_softmax is not ORIGINAL["selective_log_softmax"]
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours.float(), theirs.float(), **_tol(dtype))
    if dtype == torch.float32:
        weights = torch.randn(ours.shape)
        g_ours, = torch.autograd.grad((ours * weights).sum(), logits)
        g_theirs, = torch.autograd.grad((theirs * weights).sum(), logits)
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_trl(patched, dtype):
    logits, index, row_mask = _inputs(dtype, seed=1)
    ours = patched.entropy_from_logits(logits)
    theirs = ORIGINAL["entropy_from_logits"](logits)
    torch.testing.assert_close(ours.float(), theirs.float(), **_tol(dtype))
    if "selective_log_softmax_and_entropy" in ORIGINAL:
        lp, ent = patched.selective_log_softmax_and_entropy(logits, index, False, 0.9, row_mask)
        lp_t, ent_t = ORIGINAL["selective_log_softmax_and_entropy"](logits, index, False, 0.9, row_mask)
        torch.testing.assert_close(lp.float(), lp_t.float(), **_tol(dtype))
        torch.testing.assert_close(ent.float(), ent_t.float(), **_tol(dtype))
        assert not ent.requires_grad and lp.requires_grad
    if dtype == torch.float32:
        g_ours, = torch.autograd.grad(ours.sum(), logits)
        g_theirs, = torch.autograd.grad(theirs.sum(), logits)
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-5, rtol=1e-5)


def test_top_k_index_falls_back(patched):
    logits, _, _ = _inputs(torch.float32)
    top = logits.topk(3, dim=-1).indices
    torch.testing.assert_close(patched.selective_log_softmax(logits, top),
                               ORIGINAL["selective_log_softmax"](logits, top))


@pytest.mark.skipif("_ChunkedLogProbFunction" not in ORIGINAL, reason="this trl has no fused LM head")
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
def test_fused_lm_head_matches_trl(patched, outputs):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 24, generator=gen, requires_grad=True)
    weight = torch.randn(301, 24, generator=gen, requires_grad=True)
    targets = torch.randint(0, 301, (37,), generator=gen)
    ours = patched._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.8, 128, None, 1.0, outputs)
    theirs = ORIGINAL["_ChunkedLogProbFunction"].apply(hidden, weight, None, targets, 0.8, 128, None, 1.0, outputs)
    for a, b in zip(ours[:2], theirs[:2]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    loss_ours = ours[0].sum() + (ours[1].sum() if ours[1] is not None else 0)
    loss_theirs = theirs[0].sum() + (theirs[1].sum() if theirs[1] is not None else 0)
    for a, b in zip(torch.autograd.grad(loss_ours, (hidden, weight)), torch.autograd.grad(loss_theirs, (hidden, weight))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # an extra rlkernels does not compute (WPO's log_sum_sq_probs): TRL's own function answers
    extra = patched._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 128, None, 1.0,
                                                  ("log_probs", "log_sum_sq_probs"))
    assert extra[2] is not None


def _spy_linear_logprobs(monkeypatch):
    """Records the keyword arguments of every rlkernels.linear_logprobs call."""
    import rlkernels

    calls = []
    real = rlkernels.linear_logprobs

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(rlkernels, "linear_logprobs", spy)
    return calls


@pytest.mark.skipif("_ChunkedLogProbFunction" not in ORIGINAL, reason="this trl has no fused LM head")
@pytest.mark.parametrize("logits_kind", ["gaussian", "integer ties"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_lm_head_mean_logits_and_is_top1_match_trl(patched, monkeypatch, logits_kind, with_bias):
    """The outputs DPO asks the policy's head for, computed by rlkernels in the same
    call as the log-probs: TRL's values (is_top1 exactly, ties included)."""
    gen = torch.Generator().manual_seed(3)
    N, H, V = 41, 24, 301
    if logits_kind == "gaussian":
        hidden = torch.randn(N, H, generator=gen)
        weight = torch.randn(V, H, generator=gen)
    else:  # integer logits with many exact ties at the maximum, before and after the label
        hidden = torch.randint(-2, 3, (N, H), generator=gen).float()
        weight = torch.randint(-1, 2, (V, H), generator=gen).float()
    bias = torch.randint(-2, 3, (V,), generator=gen).float() if with_bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[:12] = (hidden[:12] @ weight.t() + (bias if with_bias else 0)).argmax(-1)  # first maxima: top-1
    if logits_kind != "gaussian":
        logits = hidden @ weight.t() + (bias if with_bias else 0)
        last_max = V - 1 - logits.flip(-1).argmax(-1)
        targets[12:24] = last_max[12:24]  # a maximum tied with an earlier one wherever there are several
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    calls = _spy_linear_logprobs(monkeypatch)
    ours = patched._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 0.8, 128, None, 1.0, outputs)
    assert calls and calls[0]["mean_logits"] and calls[0]["is_top1"]  # rlkernels answered, in one call
    theirs = ORIGINAL["_ChunkedLogProbFunction"].apply(hidden, weight, bias, targets, 0.8, 128, None, 1.0, outputs)
    assert ours[2] is None and theirs[2] is None
    for name, a, b in zip(("log_probs", "entropy", "mean_logits"), (ours[0], ours[1], ours[3]),
                          (theirs[0], theirs[1], theirs[3])):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert ours[4].dtype == theirs[4].dtype == torch.bool
    assert torch.equal(ours[4], theirs[4])
    assert bool(ours[4][:12].all())
    if logits_kind != "gaussian":
        assert not bool(theirs[4][12:24].all())  # the tie rule is exercised
    assert not ours[3].requires_grad and not ours[4].requires_grad


@pytest.mark.skipif("_ChunkedLogProbFunction" not in ORIGINAL, reason="this trl has no fused LM head")
def test_patched_dpo_first_step_log_ratio_is_exactly_zero(patched, monkeypatch, tmp_path):
    """TRL's DPOTrainer asks the policy's fused head for mean_logits and is_top1 and the
    reference's for log-probs only.  Both must go through the same rlkernels kernel, so
    the first step (policy == reference) sees a log-ratio, hence rewards, of exactly 0."""
    import copy

    trl = import_library("trl", "trl")
    datasets = import_library("datasets", "trl")
    from rlkernels.trainers import toy

    calls = _spy_linear_logprobs(monkeypatch)
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(toy.model_config(n_layer=1, n_embd=32, n_head=2))
    dataset = datasets.Dataset.from_list(toy.preference_pairs(4, seed=0))
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                         logging_steps=1, use_cpu=True, save_strategy="no", bf16=False, seed=0,
                         disable_tqdm=True)
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.train()
    first = trainer.state.log_history[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == 0.0, (key, first[key])
    assert [bool(c.get("mean_logits")) for c in calls] == [True, False]  # policy (with the extras), then reference
    assert first["logps/chosen"] < 0 and first["logits/chosen"] != 0.0


def test_patch_reaches_modules_that_imported_by_name_and_unpatches():
    probe = types.ModuleType("trl._rlkernels_probe")
    probe.selective_log_softmax = ORIGINAL["selective_log_softmax"]  # as `from .utils import ...` leaves it
    sys.modules[probe.__name__] = probe
    try:
        patched_names = patch_trl()
        assert "trl._rlkernels_probe.selective_log_softmax" in patched_names
        assert probe.selective_log_softmax is not ORIGINAL["selective_log_softmax"]
        assert patch_trl() == patched_names  # idempotent
        unpatch_trl()
        assert probe.selective_log_softmax is ORIGINAL["selective_log_softmax"]
        for name, function in ORIGINAL.items():
            assert getattr(trl_utils, name) is function
    finally:
        unpatch_trl()
        del sys.modules[probe.__name__]
