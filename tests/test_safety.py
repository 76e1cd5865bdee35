"""Off the happy path: what SECURITY.md and docs/numerics.md promise about memory safety.

(a) Every registered op (the compiled ones and their *_triton twins, read from the
    dispatcher, so a new op is probed without anyone adding it here) is called directly
    with broken companions in a child process (tests/safety_probes.py): no signal, and
    a clear error or a flagged (NaN) result where an id is out of range.
(b) torch.compile(dynamic=True, fullgraph=True) of every public op agrees with eager,
    and the kernels keep their memory checks where compiled code skips the Python ones.
(c) The argument checks of the public functions: each bad argument gets a ValueError
    or TypeError naming it."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import rlkernels
import safety_probes
from support import TRITON_ON_CPU, assert_close

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = safety_probes.registered_ops()
CPU_OPS = [op for op in OPS if not op.endswith("_triton")]
TRITON_OPS = [op for op in OPS if op.endswith("_triton")]


def in_child_process(test):
    """Runs the test in a child pytest: were the bug it guards back, its segfault would
    fail this one test instead of ending the whole run."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        if os.environ.get("RLK_SAFETY_CHILD") == "1":
            return test(*args, **kwargs)
        node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                              cwd=os.path.dirname(HERE), env=dict(os.environ, RLK_SAFETY_CHILD="1"),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (f"the child pytest ended with status {proc.returncode} (negative: a signal)\n"
                                      f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")

    return run


def _run_probes(ops: list[str], timeout: float) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "safety_probes.py"), *ops], capture_output=True,
                          text=True, timeout=timeout, env=env)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [r for r in records if r.get("start")]
    finished = [r for r in records if not r.get("start")]
    if proc.returncode != 0:
        last = started[-1] if started else None
        pytest.fail(f"the probe process ended with status {proc.returncode} (a negative status is the signal) "
                    f"during {last}\n{proc.stderr[-3000:]}")
    assert len(started) == len(finished)
    return finished


def _judge(records: list[dict]) -> list[str]:
    wrong = []
    for r in records:
        ok = {"raise": r["outcome"] == "raised", "flag": r["outcome"] in ("raised", "nan"),
              "same": r["outcome"] != "differs", "survive": True}[r["must"]]
        if not ok:
            wrong.append(f"{r['op']} {r['case']}: must {r['must']}, got {r['outcome']} {r['detail']}")
    return wrong


def test_every_registered_op_has_a_sample_call():
    """A new op fails here until tests/safety_probes.py gives it a valid call to break."""
    missing = [op for op in OPS if not safety_probes.samples_for(op)]
    assert not missing, f"no sample call in tests/safety_probes.py for {missing}"
    assert "group_advantages" in OPS and "logprobs" in OPS


@pytest.mark.parametrize("ops", [CPU_OPS], ids=["compiled"])
def test_compiled_ops_called_directly_with_broken_companions(ops):
    records = _run_probes(ops, timeout=600)
    assert {r["op"] for r in records} == set(ops)
    wrong = _judge(records)
    assert not wrong, "\n".join(wrong)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton does not run on CPU tensors here")
@pytest.mark.parametrize("part", [0, 1], ids=["first-half", "second-half"])
def test_triton_ops_called_directly_with_broken_companions(part):
    ops = TRITON_OPS[part::2]
    records = _run_probes(ops, timeout=900)
    assert {r["op"] for r in records} == set(ops)
    wrong = _judge(records)
    assert not wrong, "\n".join(wrong)


# ---- (b) torch.compile with dynamic shapes ---------------------------------------------------------

def _rollout(B, T):
    return torch.randn(B, T), torch.randn(B, T), torch.rand(B, T) > 0.3


def _logits(B, T, V=11):
    return torch.randn(B, T, V), torch.randint(0, V, (B, T))


# Per public op: a function of (B, T, backend) returning (fn, args) for a call of that size.
COMPILE_CASES = {
    "gae": lambda B, T, be: (lambda r, v, m: rlkernels.gae(r, v, m, gamma=0.99, lam=0.95, backend=be),
                             _rollout(B, T)),
    "discounted_returns": lambda B, T, be: (lambda r, m: rlkernels.discounted_returns(r, m, gamma=0.9, backend=be),
                                            _rollout(B, T)[::2]),
    "group_advantages": lambda B, T, be: (lambda s, g: rlkernels.group_advantages(s, g, backend=be),
                                          (torch.randn(B * 4), 4)),
    "masked_mean": lambda B, T, be: (lambda x, m: rlkernels.masked_mean(x, m, 1, backend=be), _rollout(B, T)[::2]),
    "masked_whiten": lambda B, T, be: (lambda x, m: rlkernels.masked_whiten(x, m, backend=be), _rollout(B, T)[::2]),
    "logprobs": lambda B, T, be: (lambda x, y: rlkernels.logprobs(x, y, temperature=0.8, entropy=True, backend=be),
                                  _logits(B, T)),
    "linear_logprobs": lambda B, T, be: (
        lambda h, w, y: rlkernels.linear_logprobs(h, w, y, entropy=True, backend=be),
        (torch.randn(B, T, 6), torch.randn(11, 6), torch.randint(0, 11, (B, T)))),
    "kl_from_logits": lambda B, T, be: (lambda a, b: rlkernels.kl_from_logits(a, b, backend=be),
                                        (torch.randn(B, T, 9), torch.randn(B, T, 9))),
    "kl_penalty": lambda B, T, be: (lambda a, b: rlkernels.kl_penalty(a, b, "k3", backend=be), _rollout(B, T)[:2]),
    "ppo_loss": lambda B, T, be: (
        lambda lp, old, adv, m: rlkernels.ppo_loss(lp, old, adv, m, clip_low=0.2, backend=be),
        (*_rollout(B, T)[:2], torch.randn(B, T), _rollout(B, T)[2])),
    "grpo_loss": lambda B, T, be: (
        lambda lp, old, adv, ref: rlkernels.grpo_loss(lp, old, adv, ref_logprobs=ref, beta=0.04, backend=be),
        (*_rollout(B, T)[:2], torch.randn(B), torch.randn(B, T))),
    "value_loss": lambda B, T, be: (lambda v, old, ret: rlkernels.value_loss(v, old, ret, clip=0.2, backend=be),
                                    (*_rollout(B, T)[:2], torch.randn(B, T))),
    "dpo_loss": lambda B, T, be: (lambda a, b, c, d: rlkernels.dpo_loss(a, b, c, d, beta=0.1, backend=be),
                                  tuple(torch.randn(B * T) for _ in range(4))),
    "sequence_logprobs": lambda B, T, be: (lambda x, m: rlkernels.sequence_logprobs(x, m, average=True, backend=be),
                                           _rollout(B, T)[::2]),
    "dpo_sequence_loss": lambda B, T, be: (
        lambda x, r, m: rlkernels.dpo_sequence_loss(x, r, m, beta=0.1, average=True, backend=be),
        (torch.randn(2 * B, T), torch.randn(2 * B, T), torch.rand(2 * B, T) > 0.3)),
    "linear_ppo_loss": lambda B, T, be: (
        lambda h, w, y, old, adv: rlkernels.linear_ppo_loss(h, w, y, old, adv, entropy_coef=0.01, backend=be),
        (torch.randn(B, T, 6), torch.randn(11, 6), torch.randint(0, 11, (B, T)), torch.randn(B, T) - 2,
         torch.randn(B))),
    "pack_tensors": lambda B, T, be: (lambda a, b: rlkernels.pack_tensors([a, b], scale=0.5, backend=be),
                                      (torch.randn(B, T), torch.randn(T))),
    "unpack_tensors": lambda B, T, be: (functools.partial(_unpack, backend=be),
                                        (torch.randn(B * T + T), torch.empty(B, T), torch.empty(T))),
    "gossip_mix": lambda B, T, be: (lambda x, l, r: rlkernels.gossip_mix(x, l, r, (0.5, 0.25, 0.25), backend=be),
                                    tuple(torch.randn(B * T) for _ in range(3))),
}


def _unpack(bucket, a, b, backend):
    rlkernels.unpack_tensors(bucket, [a, b], scale=2.0, backend=backend)
    return a * 1, b * 1


PUBLIC_OPS = sorted(name for name in rlkernels.__all__ if name not in ("BACKENDS", "info", "distributed"))


def test_compile_cases_cover_every_public_op():
    assert sorted(COMPILE_CASES) == PUBLIC_OPS


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for _, v in sorted(out.items())]
    return [t for item in out for t in _flat(item)]


# Ops whose graphs still depend on the batch size, and why (a recompile, not an error).
RECOMPILES = {
    # loss_type="grpo" normalises by B, passed to the op as a float coefficient
    "grpo_loss": "num_seqs = B in the float[] coefficients",
    # the rows per chunk are a Python int derived from B * T and the vocabulary
    "linear_ppo_loss": "chunk_rows() branches on the token count",
}


def _copies(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if TRITON_ON_CPU else []))
@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_compile_with_dynamic_shapes_matches_eager(name, backend):
    """Each public op traced once with symbolic sizes (RL batches change length every
    step), then run at a second size without recompiling, both against eager.  aot_eager runs the fake kernels and
    the autograd registration as Inductor would, without compiling C++."""
    torch._dynamo.reset()
    compiled = None
    for B, T in ((3, 5), (4, 7)):
        torch.manual_seed(B)
        fn, args = COMPILE_CASES[name](B, T, backend)
        compiled = compiled or torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
        expected = _flat(fn(*_copies(args)))
        # one graph serves both sizes: a new batch length must not recompile
        with torch._dynamo.config.patch(error_on_recompile=B != 3 and name not in RECOMPILES):
            actual = _flat(compiled(*_copies(args)))
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, equal_nan=True, rtol=0, atol=0)


@in_child_process
def test_compiled_group_advantages_keeps_the_id_check():
    """The Python range check is skipped while tracing; the kernels must still refuse
    (CPU) or flag (Triton) a group id outside [0, num_groups): -5 and 10**8 used to
    segfault, an id equal to num_groups wrote past the end of a heap buffer."""
    scores = torch.randn(4)

    def call(s, index, backend):
        return rlkernels.group_advantages(s, group_index=index, num_groups=2, backend=backend)[0]

    for bad in (-5, 2, 10**8):
        index = torch.tensor([0, 1, bad, 0])
        compiled = torch.compile(call, fullgraph=True, dynamic=True, backend="aot_eager")
        with pytest.raises(RuntimeError, match=r"group_index\[2\] = .* is outside \[0, 2\)"):
            compiled(scores, index, "cpu")
        with pytest.raises(RuntimeError, match="is outside"):
            torch.ops.rlkernels.group_advantages(scores, index, 0, 2, 0, 0, 1e-6)
        if TRITON_ON_CPU:
            adv = compiled(scores, index, "triton")
            assert torch.isnan(adv[2]) and not torch.isnan(adv[[0, 1, 3]]).any()
            adv, _ = torch.ops.rlkernels.group_advantages_triton(scores, index, 0, 2, 0, 0, 1e-6)
            assert torch.isnan(adv[2])


@in_child_process
def test_compiled_logprobs_keeps_the_label_check():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[0, 1, 2], [3, 5, -100]])
    compiled = torch.compile(lambda x, y, b: rlkernels.logprobs(x, y, backend=b), fullgraph=True, dynamic=True,
                             backend="aot_eager")
    with pytest.raises(RuntimeError, match="label 5 at flat index 4"):
        compiled(logits, labels, "cpu")
    if TRITON_ON_CPU:
        out = compiled(logits, labels, "triton")
        assert torch.isnan(out[1, 1]) and out[1, 2] == 0 and not torch.isnan(out[0]).any()


def test_num_groups_is_bounded_by_the_number_of_scores():
    with pytest.raises(ValueError, match=r"num_groups must lie in \[0, 4\]"):
        rlkernels.group_advantages(torch.randn(4), group_index=torch.zeros(4, dtype=torch.long), num_groups=10**12)
    ops = [torch.ops.rlkernels.group_advantages] + ([torch.ops.rlkernels.group_advantages_triton]
                                                    if TRITON_ON_CPU else [])
    for op in ops:
        with pytest.raises(RuntimeError, match="num_groups must lie in"):
            op(torch.randn(4), torch.zeros(4, dtype=torch.long), 0, 10**12, 0, 0, 1e-6)
    # empty groups below N stay allowed
    adv, equal = rlkernels.group_advantages(torch.randn(4), group_index=torch.tensor([0, 0, 3, 3]), num_groups=4)
    assert equal.tolist() == [False, True, True, False]


# ---- the Triton kernels never address memory with a bad label ------------------------------------

needs_triton = pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton does not run on CPU tensors here")


@needs_triton
@in_child_process
def test_triton_logprobs_with_an_empty_vocabulary():
    """V = 0 used to segfault: the kernel loaded logits[label] for ignored tokens too."""
    logits = torch.empty(3, 0)
    labels = torch.tensor([-100, -100, 0])
    values, entropy, _ = torch.ops.rlkernels.logprobs_triton(logits, labels, 1.0, -100, True, False)
    assert values[:2].tolist() == [0.0, 0.0] and entropy[:2].tolist() == [0.0, 0.0]
    assert torch.isnan(values[2])
    out = rlkernels.sequence_logprobs(torch.empty(1, 2, 0), labels=torch.full((1, 2), -100), backend="triton")
    assert out.tolist() == [0.0]


@needs_triton
def test_triton_out_of_range_labels_are_flagged():
    logits = torch.randn(4, 6)
    labels = torch.tensor([0, 6, -7, 10**8])
    values, _, saved = torch.ops.rlkernels.logprobs_triton(logits, labels, 1.0, -100, False, False)
    assert not torch.isnan(values[0]) and torch.isnan(values[1:]).all()
    # the backward sees one vocabulary tile: a negative label is the one it can tell
    grad = torch.ops.rlkernels.logprobs_backward_triton(torch.ones(4), None, logits, labels, saved, torch.empty(0),
                                                        1.0, -100, 0)
    assert torch.isnan(grad[2]).all() and not torch.isnan(grad[0]).any()
    with pytest.raises(RuntimeError, match="label -7"):
        torch.ops.rlkernels.logprobs_backward(torch.ones(4), None, logits, labels, saved, torch.empty(0), 1.0, -100,
                                              0)
    # the last tile knows where the vocabulary ends
    for op in (torch.ops.rlkernels.logprobs_vocab_tile_triton,):
        state = torch.zeros(4, 4)
        op(logits[:, :4], labels, state, 1.0, -100, 0, False, False)
        op(logits[:, 4:], labels, state, 1.0, -100, 4, False, True)
        assert not torch.isnan(state[0, 0]) and torch.isnan(state[1:, 0]).all()
    with pytest.raises(RuntimeError, match="label 6"):
        torch.ops.rlkernels.logprobs_vocab_tile(logits[:, 4:], labels.clamp(min=0, max=6), torch.zeros(4, 4), 1.0,
                                                -100, 4, False, True)


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if TRITON_ON_CPU else []))
def test_linear_logprobs_out_of_range_label_under_compile(backend):
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 5, 4])
    compiled = torch.compile(lambda h, w, y: rlkernels.linear_logprobs(h, w, y, backend=backend), fullgraph=True,
                             dynamic=True, backend="aot_eager")
    if backend == "cpu":
        with pytest.raises(RuntimeError, match="label 5"):
            compiled(hidden, weight, labels)
    else:
        out = compiled(hidden, weight, labels)
        assert torch.isnan(out[1]) and not torch.isnan(out[[0, 2]]).any()


# ---- (c) argument checks of the public functions ---------------------------------------------------

def _tokens():
    return torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)


@pytest.mark.parametrize("call,error,match", [
    (lambda: rlkernels.gae(*_tokens()[:2], [[1, 1, 1], [1, 1, 0]]), TypeError, "mask must be a torch.Tensor"),
    (lambda: rlkernels.ppo_loss(*_tokens(), mask=[[1, 1, 1], [1, 0, 0]]), TypeError, "mask must be a torch.Tensor"),
    (lambda: rlkernels.gae(*_tokens()[:2], lam=None), TypeError, "lam must be a number"),
    (lambda: rlkernels.gae(_tokens()[0], None), TypeError, "values must be a torch.Tensor"),
    (lambda: rlkernels.ppo_loss(_tokens()[0], None, _tokens()[2]), TypeError, "old_logprobs must be a torch.Tensor"),
    (lambda: rlkernels.ppo_loss(_tokens()[0], _tokens()[1], None), TypeError, "advantages must be a torch.Tensor"),
    (lambda: rlkernels.value_loss(_tokens()[0], None, None), TypeError, "returns must be a torch.Tensor"),
    (lambda: rlkernels.logprobs(torch.randn(2, 5), torch.tensor([0, 1]), ignore_index=2**70), ValueError,
     "ignore_index must lie in"),
    (lambda: rlkernels.ppo_loss(*_tokens(), num_tokens=float("inf")), ValueError, "num_tokens must be finite"),
    (lambda: rlkernels.ppo_loss(*_tokens(), num_seqs=float("inf")), ValueError, "num_seqs must be finite"),
    (lambda: rlkernels.grpo_loss(*_tokens(), beta=float("inf"), ref_logprobs=torch.randn(2, 3)), ValueError,
     "beta must be finite"),
    (lambda: rlkernels.grpo_loss(*_tokens(), beta=0.0, ref_logprobs=torch.randn(2, 4)), ValueError,
     r"ref_logprobs must have the shape of logprobs \(2, 3\)"),
    (lambda: rlkernels.linear_ppo_loss(torch.randn(1, 3, 4), torch.randn(5, 4), torch.zeros(1, 3, dtype=torch.long),
                                       torch.randn(1, 3), torch.randn(1), entropy_coef=float("inf")), ValueError,
     "entropy_coef must be finite"),
    (lambda: rlkernels.linear_ppo_loss(torch.randn(1, 3, 4), torch.randn(5, 4), torch.zeros(1, 3, dtype=torch.long),
                                       torch.randn(1, 3), torch.randn(1), ref_logprobs=torch.randn(3)), ValueError,
     r"ref_logprobs must have the shape of labels \(1, 3\)"),
    (lambda: rlkernels.dpo_loss(*(torch.randn(2) for _ in range(4)), beta=float("inf")), ValueError,
     "beta must be finite"),
    (lambda: rlkernels.masked_mean(torch.randn(2, 3), keepdim="yes"), TypeError, "keepdim must be a bool"),
    (lambda: rlkernels.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),
                                       chunk_size=0, backend="reference"), ValueError, "chunk_size must be >= 1"),
    (lambda: rlkernels.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),
                                       chunk_size="big", backend="reference"), TypeError, "chunk_size must be an int"),
    (lambda: rlkernels.logprobs(torch.randn(2, 5), torch.tensor([0, 1]), temperature=float("inf")), ValueError,
     "temperature must be finite"),
    (lambda: rlkernels.masked_whiten(torch.randn(4), eps=float("inf")), ValueError, "eps must be finite"),
    (lambda: rlkernels.group_advantages(torch.randn(4), 2, eps=float("nan")), ValueError, "eps must not be NaN"),
    (lambda: rlkernels.group_advantages(torch.randn(4), group_index=torch.zeros(4, dtype=torch.long),
                                        num_groups=2.0), TypeError, "num_groups must be an int"),
    (lambda: rlkernels.kl_from_logits(torch.randn(2, 5), torch.randn(2, 5), mask=[1, 0]), TypeError,
     "mask must be a torch.Tensor"),
])
def test_bad_arguments_name_themselves(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_non_tensor_arguments_get_a_named_error(name):
    """Each tensor argument of each public op replaced by None, a list or a NumPy array:
    accepted (an optional one) or a TypeError/ValueError, never an AttributeError from
    deep inside or a kernel reached with it."""
    fn, args = COMPILE_CASES[name](2, 3, "auto")
    for i, value in enumerate(args):
        if not isinstance(value, torch.Tensor):
            continue
        for bad in (None, value.tolist(), value.numpy()):
            broken = _copies(args)
            broken[i] = bad
            try:
                fn(*broken)
            except (TypeError, ValueError):
                continue
            assert bad is None, f"{name}: argument {i} accepted as a {type(bad).__name__}"
