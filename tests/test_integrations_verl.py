"""rlkernels.integrations.patch_verl against the installed verl's own functions on the
same inputs (values and gradients), its registry, fallbacks, and unpatching.  Runs
when verl is importable (verl 0.9.1 here; importing it takes about 2.5 s)."""
from __future__ import annotations

import inspect
import sys
import types
import uuid

import numpy as np
import pytest
import torch

from support import assert_close, import_library, low_precision_bound
from rlkernels.integrations import patch_verl, unpatch_verl
from rlkernels.integrations import verl as integration

core_algos = import_library("verl.trainer.ppo.core_algos", "verl")
verl_F = import_library("verl.utils.torch_functional", "verl")

FUNCTIONAL = ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking")
CORE = ("kl_penalty", "kl_penalty_forward", "compute_gae_advantage_return", "compute_grpo_outcome_advantage",
        "compute_rloo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage",
        "compute_rloo_vectorized_outcome_advantage")
ORIGINAL = {**{n: getattr(verl_F, n) for n in FUNCTIONAL}, **{n: getattr(core_algos, n) for n in CORE}}
REGISTRY = dict(core_algos.ADV_ESTIMATOR_REGISTRY)
COVERED_ESTIMATORS = ("gae", "grpo", "rloo", "grpo_vectorized", "rloo_vectorized")


@pytest.fixture
def patched():
    patch_verl()
    yield types.SimpleNamespace(F=verl_F, core=core_algos)
    unpatch_verl()


@pytest.fixture
def fallbacks(monkeypatch, patched):
    """Names of verl's own functions the replacements called (each call recorded)."""
    calls = []
    for name in ORIGINAL:
        def spy(*args, _name=name, **kwargs):
            calls.append(_name)
            return ORIGINAL[_name](*args, **kwargs)
        monkeypatch.setitem(integration._PATCH._originals, name, spy)
    return calls


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- log-probs and entropy ---------------------------------------------------------------------

LOGIT_SHAPES = [(3, 5, 211), (7, 1), (2, 3, 1), (1, 2, 50257)]


def _logits(shape, dtype, seed=0, scale=3.0):
    gen = _gen(seed)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    return logits, labels


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_logprobs_match_verl(patched, shape, dtype, scale):
    logits, labels = _logits(shape, dtype, scale=scale)
    ours = patched.F.logprobs_from_logits(logits, labels)
    theirs = ORIGINAL["logprobs_from_logits"](logits, labels)
    assert patched.F.logprobs_from_logits is not ORIGINAL["logprobs_from_logits"]
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    assert_close(ours, theirs)
    weights = torch.randn(ours.shape, generator=_gen(1), dtype=dtype)
    g_ours, = torch.autograd.grad((ours * weights).sum(), logits)
    g_theirs, = torch.autograd.grad((theirs * weights).sum(), logits)
    assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_low_precision(patched, dtype):
    logits, labels = _logits((3, 5, 211), dtype, seed=2)
    ours = patched.F.logprobs_from_logits(logits, labels)
    theirs = ORIGINAL["logprobs_from_logits"](logits, labels)
    assert ours.dtype == theirs.dtype == dtype  # verl's PyTorch path returns the logits' dtype
    truth = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    low_precision_bound(ours, theirs, truth, floor=1e-2)


def test_logprobs_dtype_follows_verls_path(patched, monkeypatch):
    logits, labels = _logits((2, 3, 17), torch.bfloat16)
    monkeypatch.setattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True, raising=False)
    assert patched.F.logprobs_from_logits(logits, labels).dtype == torch.float32  # flash-attn's CE
    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")
    assert patched.F.logprobs_from_logits(logits, labels).dtype == torch.bfloat16


def test_logprobs_fallbacks(fallbacks, monkeypatch):
    logits, labels = _logits((2, 3, 17), torch.float32)
    top = logits.topk(2, dim=-1).indices  # not the leading shape of logits
    torch.testing.assert_close(verl_F.logprobs_from_logits(logits, top[..., 0]),
                               ORIGINAL["logprobs_from_logits"](logits, top[..., 0]))
    assert fallbacks == []
    with pytest.raises(RuntimeError):
        verl_F.logprobs_from_logits(logits, top)
    assert fallbacks == ["logprobs_from_logits"]
    monkeypatch.setattr(verl_F, "NPU_CROSS_ENTROPY_LOSS_AVAILABLE", True)
    monkeypatch.setitem(integration._PATCH._originals, "logprobs_from_logits", lambda *a: "verl's npu path")
    assert verl_F.logprobs_from_logits(logits, labels) == "verl's npu path"


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_entropy_matches_verl(patched, shape, scale):
    logits, _ = _logits(shape, torch.float32, seed=3, scale=scale)
    flat = logits.reshape(-1, shape[-1])
    for name, args in (("entropy_from_logits", (logits,)), ("entropy_from_logits_with_chunking", (flat, 2))):
        ours = getattr(patched.F, name)(*args)
        theirs = ORIGINAL[name](*args)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert_close(ours, theirs, dtype=torch.float32)
        weights = torch.randn(ours.shape, generator=_gen(4))
        g_ours, = torch.autograd.grad((ours * weights).sum(), logits)
        g_theirs, = torch.autograd.grad((theirs * weights).sum(), logits)
        assert_close(g_ours, g_theirs, dtype=torch.float32)


def test_entropy_low_precision(patched):
    logits, _ = _logits((3, 5, 211), torch.bfloat16, seed=5)
    p = torch.softmax(logits.double(), -1)
    truth = -(p * torch.log_softmax(logits.double(), -1)).sum(-1)
    ours = patched.F.entropy_from_logits(logits)
    theirs = ORIGINAL["entropy_from_logits"](logits)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    low_precision_bound(ours, theirs, truth, floor=1e-2)
    # the chunked one computes in float32 and returns float32, as verl's
    chunked = patched.F.entropy_from_logits_with_chunking(logits.reshape(15, 211))
    chunked_theirs = ORIGINAL["entropy_from_logits_with_chunking"](logits.reshape(15, 211))
    assert chunked.dtype == chunked_theirs.dtype == torch.float32
    assert_close(chunked, chunked_theirs)


def test_entropy_fallbacks(fallbacks):
    logits, _ = _logits((2, 3, 17), torch.float32)
    with pytest.raises(ValueError):  # range() with step 0, as verl
        verl_F.entropy_from_logits_with_chunking(logits.reshape(6, 17), 0)
    with pytest.raises(RuntimeError):  # verl's is for [N, V] only
        verl_F.entropy_from_logits_with_chunking(logits)
    vector = torch.randn(17)
    torch.testing.assert_close(verl_F.entropy_from_logits(vector), ORIGINAL["entropy_from_logits"](vector))
    assert fallbacks == ["entropy_from_logits_with_chunking"] * 2 + ["entropy_from_logits"]


# ---- KL penalty --------------------------------------------------------------------------------

def _kl_inputs(dtype=torch.float32, size=(4, 37), seed=6):
    gen = _gen(seed)
    logprob = -torch.rand(size, generator=gen, dtype=torch.float64) * 5
    ref = -torch.rand(size, generator=gen, dtype=torch.float64) * 5
    logprob[0, :6] = torch.tensor([-40.0, -0.1, -25.0, -1e-4, -60.0, -3.0], dtype=torch.float64)
    ref[0, :6] = torch.tensor([-0.1, -40.0, -1.0, -1e-4, -2.0, -60.0], dtype=torch.float64)  # both clamps of k3
    return logprob.to(dtype).requires_grad_(True), ref.to(dtype).requires_grad_(True)


@pytest.mark.parametrize("kind", sorted(integration._KL_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_penalty_matches_verl(patched, kind, dtype):
    logprob, ref = _kl_inputs(dtype)
    ours = patched.core.kl_penalty(logprob, ref, kind)
    theirs = ORIGINAL["kl_penalty"](logprob, ref, kind)
    assert ours.dtype == theirs.dtype == dtype
    assert_close(ours, theirs, dtype=torch.float32)
    weights = torch.randn(ours.shape, generator=_gen(7), dtype=dtype)
    for a, b in zip(torch.autograd.grad((ours * weights).sum(), (logprob, ref)),
                    torch.autograd.grad((theirs * weights).sum(), (logprob, ref))):
        assert_close(a, b, dtype=torch.float32)
    if kind in integration._KL_FORWARD_KINDS:
        assert_close(patched.core.kl_penalty_forward(logprob, ref, kind),
                     ORIGINAL["kl_penalty_forward"](logprob, ref, kind), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["kl", "low_var_kl", "k3+"])
def test_kl_penalty_low_precision(patched, kind):
    logprob, ref = _kl_inputs(torch.bfloat16)
    ours = patched.core.kl_penalty(logprob, ref, kind)
    theirs = ORIGINAL["kl_penalty"](logprob, ref, kind)
    truth = ORIGINAL["kl_penalty"](logprob.double(), ref.double(), kind)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    low_precision_bound(ours, theirs, truth, floor=1e-2)


def test_kl_penalty_fallbacks(fallbacks):
    logprob, ref = _kl_inputs()
    ours = core_algos.kl_penalty(logprob, ref, "abs+")  # no rlkernels kind: verl's, with our "abs" inside
    theirs = ORIGINAL["kl_penalty"](logprob, ref, "abs+")
    assert_close(ours, theirs)
    assert_close(torch.autograd.grad(ours.sum(), logprob)[0], torch.autograd.grad(theirs.sum(), logprob)[0])
    assert fallbacks == ["kl_penalty"]
    for call, kind in ((core_algos.kl_penalty, "full"), (core_algos.kl_penalty_forward, "k3+"),
                       (core_algos.kl_penalty, "nope")):
        with pytest.raises(NotImplementedError):
            call(logprob, ref, kind)
    broadcast = core_algos.kl_penalty(logprob, ref[:1], "k1")  # verl broadcasts; so does its fallback
    assert broadcast.shape == logprob.shape
    assert fallbacks[-2:] == ["kl_penalty", "kl_penalty_forward"]


# ---- GAE ---------------------------------------------------------------------------------------

def _rollout(B=5, T=13, dtype=torch.float32, mask_dtype=torch.int64, seed=8):
    gen = _gen(seed)
    rewards = torch.randn(B, T, generator=gen, dtype=dtype)
    values = torch.randn(B, T, generator=gen, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T) < lengths[:, None]).to(mask_dtype)
    mask[1] = 0  # an empty row
    mask[2, 2:5] = 0  # observation tokens inside a multi-turn response
    return rewards, values, mask


@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.int64), (torch.float32, torch.float32),
                                              (torch.float64, torch.int64), (torch.float32, torch.float64)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5)])
def test_gae_matches_verl(patched, dtype, mask_dtype, gamma, lam):
    rewards, values, mask = _rollout(dtype=dtype, mask_dtype=mask_dtype)
    adv, ret = patched.core.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    adv_t, ret_t = ORIGINAL["compute_gae_advantage_return"](rewards, values, mask, gamma, lam)
    assert adv.dtype == adv_t.dtype and ret.dtype == ret_t.dtype and adv.shape == adv_t.shape
    tol = torch.float32 if dtype == torch.float32 or mask_dtype == torch.float32 else torch.float64
    assert_close(ret, ret_t, dtype=tol)
    # verl's whitening is float32-accurate even for float64 input: its masked_mean divides
    # by count + 1e-8, and an integer mask's Bessel factor n / (n - 1) comes out float32
    assert_close(adv, adv_t, dtype=torch.float32, mask=mask)
    valid = mask.bool()
    raw = (ret_t - values)[valid]  # verl's advantages before whitening
    exact = (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8)
    assert_close(adv[valid], exact, dtype=tol)
    # documented difference: 0 at masked positions, where verl leaves whitened carries
    assert (adv[mask == 0] == 0).all() and (adv_t[mask == 0] != 0).any()


def test_gae_odd_shapes_and_tensor_coefficients(patched):
    for B, T in ((1, 2), (3, 1), (2, 127)):
        gen = _gen(B * T)
        rewards, values = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
        mask = torch.ones(B, T, dtype=torch.int64)
        gamma, lam = torch.tensor(0.9), np.float64(0.8)
        ours = patched.core.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
        theirs = ORIGINAL["compute_gae_advantage_return"](rewards, values, mask, gamma, lam)
        for a, b in zip(ours, theirs):
            assert_close(a, b)


def test_gae_bool_mask(patched):
    rewards, values, mask = _rollout()
    adv, ret = patched.core.compute_gae_advantage_return(rewards, values, mask.bool(), 0.9, 0.9)
    adv_t, ret_t = ORIGINAL["compute_gae_advantage_return"](rewards, values, mask, 0.9, 0.9)  # verl: int only
    assert adv.dtype == torch.float32
    assert_close(ret, ret_t)
    assert_close(adv, adv_t, mask=mask)


def test_gae_fallbacks(fallbacks):
    rewards, values, mask = _rollout()
    blended = mask.float() * 0.5  # verl blends with a fractional mask
    for a, b in zip(core_algos.compute_gae_advantage_return(rewards, values, blended, 0.9, 0.9),
                    ORIGINAL["compute_gae_advantage_return"](rewards, values, blended, 0.9, 0.9)):
        assert_close(a, b)
    single = torch.zeros_like(mask)
    single[0, 0] = 1
    with pytest.raises(ValueError, match="sum of the mask is one"):
        core_algos.compute_gae_advantage_return(rewards, values, single, 0.9, 0.9)
    half = rewards.half()
    for a, b in zip(core_algos.compute_gae_advantage_return(half, values.half(), mask, 1.5, 0.9),
                    ORIGINAL["compute_gae_advantage_return"](half, values.half(), mask, 1.5, 0.9)):
        torch.testing.assert_close(a, b)
    assert fallbacks == ["compute_gae_advantage_return"] * 3


# ---- GRPO / RLOO -------------------------------------------------------------------------------

def _outcome(dtype=torch.float32, seed=9, binary=False):
    """Groups of 4, 3, 1, 5, 1, 2 and 3 members, interleaved, under uuid strings; one
    all-equal group, one row whose mask is empty."""
    gen = _gen(seed)
    sizes = [4, 3, 1, 5, 1, 2, 3]
    uids = [str(uuid.UUID(int=int(torch.randint(0, 2**62, (1,), generator=gen)))) for _ in sizes]
    members = [uid for uid, size in zip(uids, sizes) for _ in range(size)]
    order = torch.randperm(len(members), generator=gen).tolist()
    index = np.array([members[i] for i in order], dtype=object)
    T = 7
    if binary:
        rewards = torch.zeros(len(index), T, dtype=dtype)
        rewards[:, -1] = (torch.rand(len(index), generator=gen) > 0.5).to(dtype)
    else:
        rewards = torch.randn(len(index), T, generator=gen, dtype=dtype)
    equal = torch.from_numpy(index == uids[0])
    rewards[equal] = 0.0
    rewards[equal, 0] = 1.0
    mask = (torch.rand(len(index), T, generator=gen) > 0.2).long()
    mask[3] = 0
    return rewards, mask, index


ESTIMATORS = ["compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage",
              "compute_grpo_vectorized_outcome_advantage", "compute_rloo_vectorized_outcome_advantage"]


def _extra_args(name, norm):
    return {"norm_adv_by_std_in_grpo": norm} if "grpo" in name else {}


@pytest.mark.parametrize("name,norm", [(name, norm) for name in ESTIMATORS
                                       for norm in ((True, False) if "grpo" in name else (True,))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("binary", [False, True])
def test_outcome_advantages_match_verl(patched, name, dtype, norm, binary):
    rewards, mask, index = _outcome(dtype, binary=binary)
    ours, ours_returns = getattr(patched.core, name)(rewards, mask, index, 1e-6, **_extra_args(name, norm))
    theirs, _ = ORIGINAL[name](rewards.clone(), mask, index, 1e-6, **_extra_args(name, norm))
    assert ours is ours_returns  # verl returns the same tensor twice
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    # verl's vectorised GRPO takes its group statistics in float32
    assert_close(ours, theirs, dtype=torch.float32 if "vectorized" in name else dtype)
    assert (ours[3] == 0).all()
    singles = [i for i, uid in enumerate(index) if (index == uid).sum() == 1]
    assert len(singles) == 2  # verl's rule for a group of one: 0 only in its vectorised RLOO
    assert bool((ours[singles] == 0).all()) == ("rloo_vectorized" in name)


def test_grpo_vectorized_low_precision_rewards(patched):
    rewards, mask, index = _outcome(torch.bfloat16, seed=13)
    name = "compute_grpo_vectorized_outcome_advantage"
    ours, _ = getattr(patched.core, name)(rewards, mask, index)
    theirs, _ = ORIGINAL[name](rewards, mask, index)
    assert ours.dtype == theirs.dtype == torch.float32  # verl's float32 statistics promote
    assert_close(ours, theirs)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_outcome_advantages_through_the_registry(patched, name):
    rewards, mask, index = _outcome(seed=10)
    key = name[len("compute_"):].replace("_outcome_advantage", "")
    estimator = core_algos.get_adv_estimator_fn(key)
    assert estimator is getattr(integration, name)
    ours, _ = estimator(token_level_rewards=rewards, response_mask=mask, index=index, config=None)
    theirs, _ = REGISTRY[key](token_level_rewards=rewards, response_mask=mask, index=index, config=None)
    assert_close(ours, theirs)


@pytest.mark.parametrize("index", [np.arange(6) % 2, [0, 0, 1, 1, 2, 2], np.array(["a", "b"] * 3),
                                   np.array([0.0, 0.0, 1.0, 1.0, 2.0, 2.5])])
def test_outcome_index_kinds(patched, index):
    rewards = torch.randn(6, 3, generator=_gen(11))
    mask = torch.ones(6, 3)
    for name in ESTIMATORS:
        assert_close(getattr(patched.core, name)(rewards, mask, index)[0],
                     ORIGINAL[name](rewards.clone(), mask, index)[0])


def test_outcome_fallbacks(fallbacks):
    rewards = torch.randn(4, 3, generator=_gen(12))
    mask = torch.ones(4, 3)
    nan_ids = np.array([0.0, np.nan, np.nan, 1.0])  # dict keys: every NaN its own group
    mixed = np.array([1, "1", 1, "1"], dtype=object)  # numpy cannot sort these
    with pytest.raises(KeyError):  # verl's GRPO, as verl's
        core_algos.compute_grpo_outcome_advantage(rewards, mask, nan_ids)
    for name, ids in (("compute_grpo_outcome_advantage", mixed), ("compute_rloo_outcome_advantage", nan_ids),
                      ("compute_rloo_outcome_advantage", mixed)):
        assert_close(getattr(core_algos, name)(rewards, mask, ids)[0], ORIGINAL[name](rewards.clone(), mask, ids)[0])
    assert fallbacks == ["compute_grpo_outcome_advantage"] * 2 + ["compute_rloo_outcome_advantage"] * 2
    half = rewards.half()
    for name in ("compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage",
                 "compute_rloo_vectorized_outcome_advantage"):
        fallbacks.clear()
        torch.testing.assert_close(getattr(core_algos, name)(half, mask, np.arange(4) // 2)[0],
                                   ORIGINAL[name](half.clone(), mask, np.arange(4) // 2)[0])
        assert fallbacks == [name]


# ---- patching machinery ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_signatures_are_verls(name):
    # verl calls several of these with keywords (logits=, labels=, inplace_backward=, kl_penalty=)
    ours, theirs = inspect.signature(getattr(integration, name)), inspect.signature(ORIGINAL[name])
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


def test_patch_registry_unpatch_and_by_name_imports():
    probe = types.ModuleType("verl._rlkernels_probe")
    probe.kl_penalty = ORIGINAL["kl_penalty"]  # as `from verl.trainer.ppo.core_algos import kl_penalty` leaves it
    probe.logprobs_from_logits = ORIGINAL["logprobs_from_logits"]
    sys.modules[probe.__name__] = probe
    import verl.workers.utils.losses as worker_losses  # verl's own `from ...core_algos import kl_penalty`
    try:
        names = patch_verl()
        assert "verl.workers.utils.losses.kl_penalty" in names and worker_losses.kl_penalty is integration.kl_penalty
        for name in FUNCTIONAL:
            assert f"verl.utils.torch_functional.{name}" in names
        for name in CORE:
            assert f"verl.trainer.ppo.core_algos.{name}" in names
        for key in COVERED_ESTIMATORS:
            assert f"verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY[{key!r}]" in names
            assert core_algos.ADV_ESTIMATOR_REGISTRY[key] is not REGISTRY[key]
        assert "verl._rlkernels_probe.kl_penalty" in names and probe.kl_penalty is integration.kl_penalty
        assert patch_verl() == names  # idempotent
        for key, fn in REGISTRY.items():
            if key not in COVERED_ESTIMATORS:
                assert core_algos.ADV_ESTIMATOR_REGISTRY[key] is fn
        unpatch_verl()
        assert probe.kl_penalty is ORIGINAL["kl_penalty"] and worker_losses.kl_penalty is ORIGINAL["kl_penalty"]
        assert probe.logprobs_from_logits is ORIGINAL["logprobs_from_logits"]
        for name, fn in ORIGINAL.items():
            assert getattr(verl_F if name in FUNCTIONAL else core_algos, name) is fn
        assert core_algos.ADV_ESTIMATOR_REGISTRY == REGISTRY
        assert all(core_algos.ADV_ESTIMATOR_REGISTRY[k] is REGISTRY[k] for k in REGISTRY)
    finally:
        unpatch_verl()
        del sys.modules[probe.__name__]

