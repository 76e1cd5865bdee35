"""No host syncs on CUDA (issue 13): every public op runs on fake CUDA tensors, where any
read of tensor data on the host raises, forward and backward, with the data-dependent
arguments present (0/1 masks in float, labels with ignore_index, group ids).  In the
checked mode (rlkernels.set_checks) the same calls must read data, and on CPU tensors
the checks keep their errors.  The cases are tests/sync_cases.py, which the GPU check also
runs on a real GPU (.ci/gpu_sync_check.py).

A CPU-only torch needs a CUDA device guard for Python indexing of fake CUDA tensors
(tests/fake_cuda.py registers c10's fake one), and autograd's engine cannot run on
them at all, so the backward is driven by hand: every torch.ops.rlkernels
call of the forward is recorded, and its registered setup_context and backward run on
fake gradients.  The bodies of the composite ops (linear_logprobs and its backward, and
linear_policy_loss: C++ over ATen ops and the dispatcher) run as well, not only their fake
kernels."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fake_cuda
import sync_cases as cases
from support import TRITON_ON_CPU
import rlkernels
from rlkernels import _library
from rlkernels.ops import _registry

# (the package's attributes of these names are the functions: import the modules)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUBLIC = sorted(rlkernels.ops.__all__)


def _cuda_kernel(name):
    """The CUDA kernel of the C++ op `name` called directly (below its fake kernel): a
    device-generic body over ATen ops, so on fake tensors every op it runs is faked, and
    a host read of data raises."""
    overload = getattr(torch.ops.rlkernels, name).default
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return lambda *args, **kwargs: overload.redispatch(keyset, *args, **kwargs)


# The composite ops: their bodies, run on the fake tensors too.
BODIES = {"linear_logprobs": _cuda_kernel("linear_logprobs"),
          "linear_logprobs_backward": _cuda_kernel("linear_logprobs_backward"),
          "linear_policy_loss": _cuda_kernel("linear_policy_loss")}


class _LinearLogprobsAutograd:
    """What linear_logprobs' C++ autograd (csrc/autograd/linear_logprobs.cpp) does, as a
    setup_context and backward this test can drive: the backward op on the saved tensors."""

    @staticmethod
    def _setup_context(ctx, inputs, output):
        ctx.inputs, ctx.outputs = inputs, output

    @staticmethod
    def _backward(ctx, grad_logprobs, grad_entropy, _grad_saved, _grad_top1):
        (hidden, weight, labels, bias, temperature, ignore_index, with_entropy, _, tile_tokens, tile_vocab, budget,
         drop_ignored, backend) = ctx.inputs
        _, entropies, saved, _ = ctx.outputs
        return torch.ops.rlkernels.linear_logprobs_backward(
            grad_logprobs, grad_entropy if with_entropy else None, hidden, weight, labels, bias, saved, entropies,
            temperature, ignore_index, tile_tokens, tile_vocab, budget, drop_ignored, backend, True, True,
            bias is not None)


class _LinearPolicyLossAutograd:
    """What linear_policy_loss' C++ autograd (csrc/autograd/linear_policy_loss.cpp) does on
    CUDA, as a setup_context and backward this test can drive: the stored gradients scaled
    out of place."""

    @staticmethod
    def _setup_context(ctx, inputs, output):
        ctx.outputs = output

    @staticmethod
    def _backward(ctx, grad_loss, *_unused):
        return tuple(saved * grad_loss.to(saved.dtype) for saved in ctx.outputs[2:])


CUSTOM_AUTOGRAD = {"linear_logprobs": _LinearLogprobsAutograd, "linear_policy_loss": _LinearPolicyLossAutograd}
SUFFIX = _registry.TWIN_SUFFIX


def test_every_public_op_has_a_case():
    assert sorted(cases.CASES) == PUBLIC
    assert set(cases.CHECKED) <= set(PUBLIC)


@pytest.fixture(scope="module", autouse=True)
def _fake_cuda_guard(tmp_path_factory):
    why = fake_cuda.install(str(tmp_path_factory.mktemp("fake_cuda")))
    if why:
        pytest.skip(why)


@pytest.fixture(autouse=True)
def _checks_off():
    previous = rlkernels.set_checks(False)
    yield
    rlkernels.set_checks(previous)


@pytest.fixture
def compiled_cuda(monkeypatch):
    """backend="cuda" on fake CUDA tensors: the build reports CUDA kernels, so the compiled
    ops (their fake kernels) run."""
    monkeypatch.setattr(_library, "COMPILED_BACKENDS", _library.COMPILED_BACKENDS | {"cuda"})


class _Recorder(TorchDispatchMode):
    """Records each torch.ops.rlkernels call with its inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "rlkernels":
            self.calls.append((func._schema.name.split("::")[1], args, kwargs or {}, out))
        return out


class _OpNames(TorchDispatchMode):
    """The names of every op dispatched inside."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class _Ctx:
    """What a registered setup_context and backward use of autograd's ctx."""

    def __init__(self, inputs, backend):
        self.needs_input_grad = tuple(isinstance(a, torch.Tensor) and a.is_floating_point() for a in inputs)
        self.backend = backend
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def _autograd_of(name):
    """(setup_context, backward) of the op `name` and the ctx.backend it sees, or None."""
    if name in CUSTOM_AUTOGRAD:
        module = CUSTOM_AUTOGRAD[name]
        return module._setup_context, module._backward, None
    base, backend = (name[: -len(SUFFIX)], "triton") if name.endswith(SUFFIX) else (name, "compiled")
    spec = _registry._SPECS.get(base)
    if spec is None or spec.backward is None:
        return None
    return spec.setup_context, spec.backward, backend


def _backward(calls) -> int:
    """Runs the registered backward of every recorded call that has one; returns how many."""
    done = 0
    for name, args, kwargs, out in list(calls):
        found = _autograd_of(name)
        if found is None:
            continue
        setup, backward, backend = found
        outputs = out if isinstance(out, tuple) else (out,)
        ctx = _Ctx(args, backend)
        if setup is not None:
            setup(ctx, args, out)
        grads = [torch.ones_like(o) if isinstance(o, torch.Tensor) and o.is_floating_point() else None
                 for o in outputs]
        with torch.no_grad():
            backward(ctx, *grads)
        done += 1
    return done


def _run_fake(name: str, backend: str) -> tuple[int, list]:
    """The case `name` forward, backward and op bodies on fake CUDA tensors; returns the
    number of backward functions run and (shape, dtype) of each floating output."""
    with FakeTensorMode():
        run, _ = cases.build(name, "cuda", grad=False)
        recorder = _Recorder()
        with recorder:
            outputs = cases.floats(run(backend))
            assert outputs and all(t.device.type == "cuda" for t in outputs)
            backwards = _backward(recorder.calls)
        for op, args, kwargs, _ in recorder.calls:
            if op in BODIES:
                BODIES[op](*args, **kwargs)
    return backwards, [(tuple(t.shape), t.dtype) for t in outputs]


def _backends():
    yield pytest.param("auto", marks=pytest.mark.skipif(not rlkernels.HAS_TRITON, reason="triton not importable"))
    yield "cuda"


@pytest.mark.parametrize("backend", list(_backends()))
@pytest.mark.parametrize("name", PUBLIC)
def test_no_host_read_on_cuda(name, backend, compiled_cuda):
    if backend == "auto":
        # without CUDA kernels in this build, auto would pick Triton: check it does
        _library.COMPILED_BACKENDS = _library.COMPILED_BACKENDS - {"cuda"}
        assert rlkernels._backend.resolve(name, "auto", torch.device("cuda")) == "triton"
    backwards, meta = _run_fake(name, backend)
    run, leaves = cases.build(name, "cpu", grad=True)
    on_cpu = cases.floats(run("cpu"))
    # the same outputs as the CPU op gives, shape and dtype
    assert meta == [(tuple(t.shape), t.dtype) for t in on_cpu]
    if any(t.requires_grad for t in on_cpu):
        assert backwards > 0, f"{name}: no backward was run"


@pytest.mark.parametrize("name", cases.CHECKED)
def test_checked_mode_reads_the_data(name, compiled_cuda):
    with rlkernels.checked():
        with pytest.raises(DataDependentOutputException):
            _run_fake(name, "cuda")
    _run_fake(name, "cuda")  # and off again after the block


def test_group_count_from_the_ids_is_the_one_read_left():
    """Without num_groups the output's size is the largest id + 1: read on the host even
    on CUDA (documented; the cases pass num_groups)."""
    with FakeTensorMode():
        scores, index = torch.randn(6, device="cuda"), torch.zeros(6, dtype=torch.int64, device="cuda")
        rlkernels.group_advantages(scores, group_index=index, num_groups=1)
        with pytest.raises(DataDependentOutputException):
            rlkernels.group_advantages(scores, group_index=index)


def test_set_checks_and_checked():
    assert rlkernels.checks_enabled() is False
    assert rlkernels.set_checks(True) is False
    assert rlkernels.checks_enabled() is True
    with rlkernels.checked(False):
        assert rlkernels.checks_enabled() is False
        with rlkernels.checked():
            assert rlkernels.checks_enabled() is True
        assert rlkernels.checks_enabled() is False
    assert rlkernels.set_checks(False) is True
    with pytest.raises(TypeError):
        rlkernels.set_checks(1)


@pytest.mark.parametrize("value, on", [("1", True), ("0", False), ("", False), ("true", True)])
def test_env_variable_read_at_import(value, on):
    code = "import rlkernels; print(rlkernels.checks_enabled())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT, "RLKERNELS_CHECK": value})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(on)


# ---- CPU tensors: the checks and their errors are unchanged, checked mode or not ----------------

@pytest.mark.parametrize("checks", [False, True])
def test_cpu_errors_unchanged(checks):
    with rlkernels.checked(checks):
        logits = torch.randn(2, 3, 5)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\) or equal ignore_index=-100; "
                                             r"got 5 at flat index 1"):
            rlkernels.logprobs(logits, torch.tensor([[0, 5, 1], [2, 3, 4]]))
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\).*got -3 at flat index 0"):
            rlkernels.linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([-3, 1]))
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            rlkernels.masked_mean(torch.randn(2, 3), torch.tensor([[1, 0.5, 0], [1, 1, 1]]))
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            rlkernels.linear_ppo_loss(torch.randn(1, 2, 4), torch.randn(5, 4), torch.tensor([[1, 2]]),
                                      torch.randn(1, 2), torch.randn(1), torch.tensor([[2, 0]]))
        with pytest.raises(ValueError, match=r"group_index values must lie in \[0, 2\), got \[0, 2\]"):
            rlkernels.group_advantages(torch.randn(4), group_index=torch.tensor([0, 1, 2, 0]), num_groups=2)


# ---- the default CUDA path, on CPU tensors: what bad data gives there ----------------------------

@pytest.fixture
def unread(monkeypatch):
    """Runs the ops as on CUDA outside the checked mode: no tensor data read on the host."""
    monkeypatch.setattr(rlkernels._checkmode, "reads_data", lambda t: False)


triton_only = pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
BAD_LABELS = torch.tensor([[0, 7, -100, 3], [-5, 2, 100, 6]])
BAD = BAD_LABELS.ne(-100) & (BAD_LABELS.lt(0) | BAD_LABELS.ge(7))


@triton_only
def test_triton_out_of_range_labels_give_nan(unread):
    logits, hidden, weight = torch.randn(2, 4, 7), torch.randn(2, 4, 5), torch.randn(7, 5)
    good = torch.where(BAD, 0, BAD_LABELS)
    for got, want in ((rlkernels.logprobs(logits, BAD_LABELS, backend="triton"),
                       rlkernels.logprobs(logits, good, backend="triton")),
                      (rlkernels.linear_logprobs(hidden, weight, BAD_LABELS, backend="triton"),
                       rlkernels.linear_logprobs(hidden, weight, good, backend="triton"))):
        assert torch.equal(got.isnan(), BAD)
        assert torch.equal(got[~BAD], want[~BAD])
    assert rlkernels.sequence_logprobs(logits, labels=BAD_LABELS, backend="triton").isnan().all()


@triton_only
def test_triton_stray_group_ids_give_nan(unread):
    scores, index = torch.randn(6), torch.tensor([0, 1, 5, -1, 1, 0])
    advantages, _ = rlkernels.group_advantages(scores, group_index=index, num_groups=2, backend="triton")
    assert torch.equal(advantages.isnan(), (index < 0) | (index >= 2))
    # no group at all: every id is stray (no kernel runs; still NaN, not uninitialised memory)
    advantages, all_equal = rlkernels.group_advantages(scores, group_index=index, num_groups=0, backend="triton")
    assert advantages.isnan().all() and all_equal.numel() == 0


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=triton_only)])
def test_non_binary_mask_counts_as_true(unread, backend):
    x = torch.randn(3, 4)
    mask = torch.tensor([[1, 0.5, 0, 2], [0, 0, 0, 3], [1, 1, 1, 1.0]])
    got = rlkernels.masked_mean(x, mask, backend=backend)
    assert torch.allclose(got, rlkernels.masked_mean(x, mask != 0, backend=backend))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=triton_only)])
@pytest.mark.parametrize("agg, chunk", [("token-mean", None), ("seq-mean-token-mean", None),
                                        ("seq-mean-token-mean", 3), ("seq-mean-token-sum-norm", 4),
                                        ("token-sum", 2), ("seq-mean-token-sum", None)])
@pytest.mark.parametrize("given", [False, True])
def test_linear_ppo_loss_device_counts_match(monkeypatch, backend, agg, chunk, given):
    """The sync-free pieces (counts on the device, every token through the lm-head) give
    the loss, stats and gradients of the counted ones."""
    torch.manual_seed(1)
    hidden, weight, bias = torch.randn(3, 7, 8), torch.randn(13, 8), torch.randn(13)
    labels = torch.randint(0, 13, (3, 7))
    labels[0, :2] = -100
    mask = torch.rand(3, 7) > 0.3
    mask[2] = False  # a row without a valid token
    old, adv = torch.randn(3, 7) - 2.0, torch.randn(3)
    counts = dict(num_tokens=9.0, num_seqs=2.0, norm_length=8.0) if given else {}
    results = []
    for read in (True, False):
        monkeypatch.setattr(rlkernels._checkmode, "reads_data", lambda t, read=read: read)
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss, stats = rlkernels.linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, mask, bias=leaves[2],
                                                entropy_coef=0.05, agg=agg, chunk_size=chunk, backend=backend,
                                                **counts)
        grads = torch.autograd.grad(loss * 3.0, leaves)
        results.append([loss, *(stats[k] for k in sorted(stats)), *grads])
    for counted, on_device in zip(*results):
        torch.testing.assert_close(on_device, counted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=triton_only)])
def test_linear_logprobs_keeping_every_row_matches(monkeypatch, backend):
    torch.manual_seed(2)
    hidden, weight, bias = torch.randn(3, 5, 8), torch.randn(11, 8), torch.randn(11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :3] = -100
    results = []
    for read in (True, False):
        monkeypatch.setattr(rlkernels._checkmode, "reads_data", lambda t, read=read: read)
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        outs = rlkernels.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], entropy=True,
                                         mean_logits=True, is_top1=True, backend=backend)
        grads = torch.autograd.grad(outs[0].sum() + outs[1].sum(), leaves)
        results.append([*outs, *grads])
    for kept, every in zip(*results):
        torch.testing.assert_close(every, kept, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not rlkernels.HAS_TRITON, reason="triton not importable")
def test_triton_scalars_are_filled_on_a_gpu_not_copied():
    """The Triton ops' scalar tensors: on CUDA written by fills (no host-to-device copy,
    which syncs and cannot be captured in a graph); the values are the same."""
    from rlkernels.triton._common import coef_tensor

    with FakeTensorMode(allow_non_fake_inputs=False):
        with _OpNames() as seen:
            t = coef_tensor("cuda", torch.float64, 0.5, 2.0, float("inf"))
        assert t.device.type == "cuda" and t.dtype == torch.float64 and t.shape == (3,)
    assert seen.names and not any("copy" in name or "lift" in name for name in seen.names), seen.names
    assert torch.equal(coef_tensor("cpu", torch.float64, 0.5, 2.0), torch.tensor([0.5, 2.0], dtype=torch.float64))
