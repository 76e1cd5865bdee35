"""logprobs: every backend against a float64 reference (values, entropy, gradients),
adversarial logits, ignored and strided rows, in-place backward, opcheck,
torch.compile and bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import TOLERANCES, TRITON_ON_CPU, assert_close, low_precision_bound

# (rows, V): large vocabularies only with a few rows, and only on the C++ backend.
SMALL = [(1, 1), (4, 2), (5, 127), (3, 1000)]
LARGE = [(3, 32000), (2, 50257), (2, 151936)]
LOW = [torch.bfloat16, torch.float16]


def shapes_for(backend):
    return SMALL + (LARGE if backend == "cpu" else [])


def make(rows, V, dtype=torch.float32, scale=3.0, ignore_some=True, device="cpu"):
    logits = (torch.randn(rows, V, device=device) * scale).to(dtype)
    labels = torch.randint(0, V, (rows,), device=device)
    if ignore_some and rows > 2:
        labels[1] = -100
    return logits, labels


def truth(logits, labels, temperature=1.0, entropy=True):
    return reference.logprobs(logits.double(), labels, temperature=temperature, entropy=entropy)


def torch_same_dtype(logits, labels, temperature=1.0):
    """What PyTorch computes without upcasting: log_softmax in the logits' dtype."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    valid = labels != -100
    picked = logp.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, picked, 0), torch.where(valid, entropy, 0)


def closed_form_grad(logits, labels, g, gh, temperature):
    """dlogits = (g (onehot - p) - gh p (log p + H)) / T, in float64, 0 on ignored rows."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = logp.exp()
    H = -(p * logp).sum(-1, keepdim=True)
    valid = labels != -100
    onehot = torch.nn.functional.one_hot(torch.where(valid, labels, 0), logits.shape[-1]).double()
    grad = (g.double()[:, None] * (onehot - p) - gh.double()[:, None] * p * (logp + H)) / temperature
    return torch.where(valid[:, None], grad, 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_values_match_reference(backend_device, dtype, temperature):
    backend, device = backend_device
    for rows, V in shapes_for(backend):
        logits, labels = make(rows, V, dtype, device=device)
        lp, H = rlkernels.logprobs(logits, labels, temperature=temperature, entropy=True, backend=backend)
        assert lp.dtype == torch.float32 and H.dtype == torch.float32 and lp.shape == (rows,)
        lp_only = rlkernels.logprobs(logits, labels, temperature=temperature, backend=backend)
        assert torch.equal(lp_only, lp)
        lp_true, H_true = truth(logits, labels, temperature)
        if dtype == torch.float32:
            assert_close(lp, lp_true, msg=f"logprobs V={V}")
            assert_close(H, H_true, msg=f"entropy V={V}")
        else:
            lp_same, H_same = torch_same_dtype(logits, labels, temperature)
            low_precision_bound(lp, lp_same, lp_true)
            low_precision_bound(H, H_same, H_true)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_gradients_match_reference(backend_device, dtype, entropy, temperature):
    backend, device = backend_device
    shapes = [(5, 127), (3, 1000)] + ([(2, 50257)] if backend == "cpu" else [])
    for rows, V in shapes:
        logits, labels = make(rows, V, dtype, device=device)
        g, gh = torch.randn(rows, device=device), torch.randn(rows, device=device)
        x = logits.clone().requires_grad_()
        out = rlkernels.logprobs(x, labels, temperature=temperature, entropy=entropy, backend=backend)
        loss = (out[0] * g + out[1] * gh).sum() if entropy else (out * g).sum()
        loss.backward()
        assert x.grad.dtype == dtype
        expected = closed_form_grad(logits, labels, g, gh if entropy else torch.zeros_like(gh), temperature)
        # the closed form is the reference's autograd gradient
        xr = logits.double().requires_grad_()
        ref = reference.logprobs(xr, labels, temperature=temperature, entropy=entropy)
        ((ref[0] * g + ref[1] * gh).sum() if entropy else (ref * g).sum()).backward()
        assert_close(xr.grad, expected, dtype=torch.float64)
        if dtype == torch.float32:
            assert_close(x.grad, expected, msg=f"V={V}")
        else:
            xs = logits.clone().requires_grad_()
            lp_s, H_s = torch_same_dtype(xs, labels, temperature)
            ((lp_s * g + H_s * gh).sum() if entropy else (lp_s * g).sum()).backward()
            low_precision_bound(x.grad, xs.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_extreme_logits(backend_device, dtype):
    backend, device = backend_device
    V = 300 if backend == "triton" else 5000
    big = float(torch.finfo(dtype).max) / 8 if dtype == torch.float16 else 1e4
    logits = (torch.randint(0, 2, (4, V), device=device).float() * 2 - 1) * big
    logits[1] = torch.randn(V, device=device) * 1e4
    logits[2, : V // 2] = big  # many ties at the maximum
    logits = logits.to(dtype)
    labels = torch.tensor([0, 7, V - 1, 3], device=device)
    x = logits.clone().requires_grad_()
    lp, H = rlkernels.logprobs(x, labels, entropy=True, temperature=0.9, backend=backend)
    lp_true, H_true = truth(logits, labels, 0.9)
    g = torch.randn(4, device=device)
    (lp * g + H).sum().backward()
    expected = closed_form_grad(logits, labels, g, torch.ones(4, device=device), 0.9)
    assert torch.isfinite(lp).all() and torch.isfinite(H).all() and torch.isfinite(x.grad).all()
    if dtype == torch.float32:
        assert_close(lp, lp_true)
        assert_close(H, H_true)
        assert_close(x.grad, expected)
    else:
        lp_same, H_same = torch_same_dtype(logits.float(), labels, 0.9)  # exact inputs: the bound is the floor
        low_precision_bound(lp, lp_same, lp_true, floor=1e-4)
        low_precision_bound(H, H_same, H_true, floor=1e-4)
        low_precision_bound(x.grad, expected.to(dtype), expected, floor=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_minus_inf_everywhere_but_the_label(backend_device, dtype):
    backend, device = backend_device
    V = 200 if backend == "triton" else 40000
    logits = torch.full((3, V), float("-inf"), device=device)
    labels = torch.tensor([0, 123, V - 1], device=device)
    logits[torch.arange(3, device=device), labels] = torch.tensor([0.5, -3.0, 1e4], device=device)
    logits = logits.to(dtype)
    x = logits.clone().requires_grad_()
    lp, H = rlkernels.logprobs(x, labels, entropy=True, temperature=0.5, backend=backend)
    assert torch.equal(lp, torch.zeros(3, device=device))
    assert torch.equal(H, torch.zeros(3, device=device))
    (lp * torch.randn(3, device=device) + H).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_ignored_rows_skip_nan_and_get_no_gradient(backend_device):
    backend, device = backend_device
    logits, labels = make(6, 257, device=device, ignore_some=False)
    labels[[0, 3, 5]] = -1
    logits[[0, 3]] = float("nan")
    logits[5] = float("inf")
    x = logits.clone().requires_grad_()
    lp, H = rlkernels.logprobs(x, labels, entropy=True, ignore_index=-1, backend=backend)
    zeros = torch.zeros(3, device=device)
    assert torch.equal(lp[[0, 3, 5]], zeros) and torch.equal(H[[0, 3, 5]], zeros)
    (lp.sum() + H.sum()).backward()
    assert torch.equal(x.grad[[0, 3, 5]], torch.zeros(3, 257, device=device))
    lp_true, H_true = reference.logprobs(logits.double(), labels, ignore_index=-1, entropy=True)
    assert_close(lp, lp_true)
    assert_close(H, H_true)


def test_nan_in_a_valid_row_gives_nan(backend_device):
    backend, device = backend_device
    logits, labels = make(3, 100, device=device, ignore_some=False)
    logits[1, 50] = float("nan")
    lp, H = rlkernels.logprobs(logits, labels, entropy=True, backend=backend)
    assert torch.isnan(lp[1]) and torch.isnan(H[1])
    assert torch.isfinite(lp[[0, 2]]).all()


@pytest.mark.parametrize("layout", ["shifted", "transposed", "column_stride", "gapped"])
@pytest.mark.parametrize("inplace", [False, True])
def test_strided_logits(backend_device, layout, inplace):
    backend, device = backend_device
    B, T, V = 3, 6, 131
    full = torch.randn(B, T + 1, 2 * V, device=device)
    if layout == "shifted":  # logits[:, :-1]: read in place, no copy
        logits = full[:, :-1, :V]
    elif layout == "transposed":
        logits = full[:, :-1, :V].transpose(0, 1)
    elif layout == "column_stride":  # vocabulary not contiguous: the op copies
        logits = full[:, :-1, ::2]
    else:  # three leading dims that cannot merge
        logits = full[:, :-1, :V].reshape(B, 2, 3, V)[:, :, :2]
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1], device=device)
    labels.view(-1)[::4] = -100
    dense = logits.detach().contiguous()
    x = logits.clone() if not inplace else logits
    leaf = full.clone().requires_grad_() if inplace else None
    if inplace:  # a non-leaf view of a leaf: the gradient is written into the view
        x = {"shifted": lambda f: f[:, :-1, :V], "transposed": lambda f: f[:, :-1, :V].transpose(0, 1),
             "column_stride": lambda f: f[:, :-1, ::2],
             "gapped": lambda f: f[:, :-1, :V].reshape(B, 2, 3, V)[:, :, :2]}[layout](leaf * 1.0)
    else:
        x = x.requires_grad_()
    lp, H = rlkernels.logprobs(x, labels, entropy=True, inplace_backward=inplace, backend=backend)
    lp_true, H_true = truth(dense, labels)
    assert_close(lp, lp_true)
    assert_close(H, H_true)
    g = torch.randn(labels.shape, device=device)
    (lp * g + H).sum().backward()
    xd = dense.double().requires_grad_()
    ref = reference.logprobs(xd, labels, entropy=True)
    (ref[0] * g + ref[1]).sum().backward()
    if inplace:
        grad = {"shifted": lambda f: f[:, :-1, :V], "transposed": lambda f: f[:, :-1, :V].transpose(0, 1),
                "column_stride": lambda f: f[:, :-1, ::2],
                "gapped": lambda f: f[:, :-1, :V].reshape(B, 2, 3, V)[:, :, :2]}[layout](leaf.grad)
    else:
        grad = x.grad
    assert_close(grad, xd.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_into_logits(backend_device, dtype):
    backend, device = backend_device
    logits, labels = make(5, 300, dtype, device=device)
    g = torch.randn(5, device=device)
    fresh = logits.clone().requires_grad_()
    (rlkernels.logprobs(fresh, labels, entropy=True, backend=backend)[0] * g).sum().backward()
    buffer = logits.clone().requires_grad_()
    lp = rlkernels.logprobs(buffer, labels, entropy=True, inplace_backward=True, backend=backend)[0]
    assert torch.equal(buffer.detach(), logits)  # untouched until the backward runs
    (lp * g).sum().backward()
    assert torch.equal(buffer.grad, fresh.grad)
    assert torch.equal(buffer.detach(), fresh.grad)  # the logits buffer now holds the gradient
    # through a non-leaf (an lm-head output), the gradient flows on from the overwritten buffer
    hidden = torch.randn(5, 16, device=device, dtype=dtype, requires_grad=True)
    proj = torch.randn(16, 300, device=device, dtype=dtype)
    (rlkernels.logprobs(hidden @ proj, labels, inplace_backward=True, backend=backend) * g).sum().backward()
    grad_inplace = hidden.grad.clone()
    hidden.grad = None
    (rlkernels.logprobs(hidden @ proj, labels, backend=backend) * g).sum().backward()
    assert torch.equal(grad_inplace, hidden.grad)


def test_leading_shapes_and_int32_labels(backend_device):
    backend, device = backend_device
    for shape in [(7,), (2, 3), (2, 1, 3)]:
        logits = torch.randn(*shape, 50, device=device)
        labels = torch.randint(0, 50, shape, device=device, dtype=torch.int32)
        lp, H = rlkernels.logprobs(logits, labels, entropy=True, backend=backend)
        assert lp.shape == shape and H.shape == shape
        lp_true, H_true = truth(logits.reshape(-1, 50), labels.reshape(-1).long())
        assert_close(lp.reshape(-1), lp_true)
        assert_close(H.reshape(-1), H_true)
    scalar_row = rlkernels.logprobs(torch.randn(9, device=device), torch.tensor(4, device=device), backend=backend)
    assert scalar_row.shape == ()


def test_empty_inputs(backend_device):
    backend, device = backend_device
    x = torch.randn(0, 11, device=device, requires_grad=True)
    lp, H = rlkernels.logprobs(x, torch.zeros(0, dtype=torch.long, device=device), entropy=True, backend=backend)
    assert lp.shape == (0,) and H.shape == (0,)
    (lp.sum() + H.sum()).backward()
    assert x.grad.shape == (0, 11)


def test_unused_entropy_output_and_no_grad(backend_device):
    backend, device = backend_device
    logits, labels = make(4, 64, device=device)
    x = logits.clone().requires_grad_()
    lp, _ = rlkernels.logprobs(x, labels, entropy=True, backend=backend)
    lp.sum().backward()
    y = logits.clone().requires_grad_()
    rlkernels.logprobs(y, labels, backend=backend).sum().backward()
    assert_close(x.grad, y.grad)
    with torch.no_grad():
        assert not rlkernels.logprobs(x, labels, backend=backend).requires_grad


def test_per_row_baseline_matches():
    logits = torch.randn(2, 5, 40)
    labels = torch.randint(0, 40, (2, 5))
    labels[0, 1] = -100
    for entropy in (False, True):
        a = reference.logprobs_per_row(logits, labels, entropy=entropy)
        b = reference.logprobs(logits, labels, entropy=entropy)
        for u, v in zip(a if entropy else [a], b if entropy else [b]):
            assert_close(u, v)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_narrower_cpu_code_paths(isa, tmp_path):
    """The CPU kernels are compiled per x86-64 level; RLKERNELS_CPU_ISA selects a narrower
    one in a fresh process, whose results must pass the same checks."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for V in (1, 3, 37, 5000):
            logits, labels = make(4, V, dtype, scale=4.0)
            cases.append((logits, labels, (torch.randn(4, V) * 4).to(dtype)))
    torch.save(cases, tmp_path / "cases.pt")
    code = (
        "import sys, torch, rlkernels\n"
        "cases = torch.load(sys.argv[1])\n"
        "out = []\n"
        "for x, lab, y in cases:\n"
        "    x = x.clone().requires_grad_()\n"
        "    lp, H = rlkernels.logprobs(x, lab, entropy=True, temperature=0.8, backend='cpu')\n"
        "    (lp + 2 * H).sum().backward()\n"
        "    kl = rlkernels.kl_from_logits(x.detach(), y, temperature=0.8, backend='cpu')\n"
        "    out.append((lp, H, x.grad, kl))\n"
        "torch.save(out, sys.argv[2])\n")
    env = dict(os.environ, RLKERNELS_CPU_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                         env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for (logits, labels, ref_logits), (lp, H, grad, kl) in zip(cases, torch.load(tmp_path / "out.pt")):
        xr = logits.double().requires_grad_()
        lp_true, H_true = reference.logprobs(xr, labels, entropy=True, temperature=0.8)
        (lp_true + 2 * H_true).sum().backward()
        kl_true = reference.kl_from_logits(logits.double(), ref_logits.double(), temperature=0.8)
        if logits.dtype == torch.float32:
            for ours, true in ((lp, lp_true), (H, H_true), (grad, xr.grad), (kl, kl_true)):
                assert_close(ours, true)
        else:
            xs = logits.clone().requires_grad_()
            lp_s, H_s = torch_same_dtype(xs, labels, 0.8)
            (lp_s + 2 * H_s).sum().backward()
            low_precision_bound(lp, lp_s, lp_true)
            low_precision_bound(H, H_s, H_true)
            low_precision_bound(grad, xs.grad, xr.grad)


# ---- torch.library integration ----------------------------------------------------------------

def _samples():
    logits, labels = make(5, 97)
    saved_args = (labels, 0.8, -100)
    yield "f32", (logits, labels, 0.8, -100, True, False)
    yield "f32_no_entropy", (logits, labels, 1.0, -100, False, False)
    yield "bf16", (logits.bfloat16(), labels, 1.0, -100, True, False)
    yield "strided", (torch.randn(2, 4, 97)[:, :-1], torch.randint(0, 97, (2, 3)), 1.0, -100, True, False)
    yield "inplace", (logits, labels, 1.0, -100, True, True)
    del saved_args


@pytest.mark.parametrize("name,args", list(_samples()), ids=[s[0] for s in _samples()])
def test_opcheck(name, args):
    args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    ops = [torch.ops.rlkernels.logprobs.default]
    if TRITON_ON_CPU:
        ops.append(torch.ops.rlkernels.logprobs_triton.default)
    for op in ops:
        torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    logits, labels = make(5, 97)
    lp, H, saved = torch.ops.rlkernels.logprobs(logits, labels, 1.0, -100, True, False)
    g, gh = torch.randn(5), torch.randn(5)
    args = (g, gh, logits, labels, saved, H, 1.0, -100)
    torch.library.opcheck(torch.ops.rlkernels.logprobs_backward.default, args)
    torch.library.opcheck(torch.ops.rlkernels.logprobs_backward_inplace.default,
                          (g, gh, logits.clone(), labels, saved, H, 1.0, -100))
    if TRITON_ON_CPU:
        torch.library.opcheck(torch.ops.rlkernels.logprobs_backward_triton.default, args)
        torch.library.opcheck(torch.ops.rlkernels.logprobs_backward_inplace_triton.default,
                              (g, gh, logits.clone(), labels, saved, H, 1.0, -100))


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph(inplace):
    logits, labels = make(6, 80)
    hidden = torch.randn(6, 8, requires_grad=True)
    proj = torch.randn(8, 80)

    @torch.compile(fullgraph=True, backend="eager")
    def step(h, lab):
        lp, H = rlkernels.logprobs(h @ proj, lab, entropy=True, temperature=0.9, inplace_backward=inplace)
        return (lp * 2).sum() + H.sum(), lp

    loss, lp = step(hidden, labels)
    loss.backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    lp_ref, H_ref = reference.logprobs(hidden @ proj, labels, entropy=True, temperature=0.9)
    ((lp_ref * 2).sum() + H_ref.sum()).backward()
    assert_close(lp, lp_ref)
    assert_close(grad, hidden.grad)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(labels=torch.tensor([0, 5, 1])), ValueError, r"labels must lie in \[0, 5\) or equal ignore_index=-100; got 5"),
    (dict(labels=torch.tensor([0, -3, 1])), ValueError, "got -3 at flat index 1"),
    (dict(labels=torch.tensor([0, -3, 1]), ignore_index=-3), None, None),
    (dict(labels=torch.tensor([0, 1])), ValueError, r"labels must have the leading shape of logits \(3,\)"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels must have dtype"),
    (dict(logits=torch.ones(3, 5, dtype=torch.int64)), TypeError, "logits must have dtype"),
    (dict(logits=torch.tensor(1.0)), ValueError, "logits must have at least 1 dims"),
    (dict(logits="x"), TypeError, "logits must be a torch.Tensor"),
    (dict(labels=torch.tensor([0, 1, 2], device="meta")), ValueError, "labels is on meta but logits is on cpu"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0.0"),
    (dict(temperature=-1), ValueError, "temperature must be > 0.0"),
    (dict(temperature=float("nan")), ValueError, "temperature must not be NaN"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "backend='cuda' is unavailable"),
    (dict(logits=torch.randn(3, 5, dtype=torch.float64), backend="cpu"), TypeError, "float64 runs on backend='reference'"),
])
def test_bad_input(kwargs, error, match):
    args = dict(logits=torch.randn(3, 5), labels=torch.tensor([0, 4, -100]))
    args.update(kwargs)
    if error is None:
        rlkernels.logprobs(args.pop("logits"), args.pop("labels"), **args)
        return
    with pytest.raises(error, match=match):
        rlkernels.logprobs(args.pop("logits"), args.pop("labels"), **args)


def test_out_of_range_label_never_reaches_a_kernel(monkeypatch):
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            raise AssertionError("a kernel was reached")

    monkeypatch.setattr(torch.ops, "rlkernels", Spy(), raising=False)
    with pytest.raises(ValueError, match="labels must lie in"):
        rlkernels.logprobs(torch.randn(2, 4), torch.tensor([4, 0]))
    assert calls == []


def test_float64_auto_uses_reference():
    logits = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (3,))
    lp = rlkernels.logprobs(logits, labels)
    assert lp.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: rlkernels.logprobs(x, labels, entropy=True, temperature=0.7),
                                    (logits,))
    assert TOLERANCES[torch.float64]  # float64 stays on the exact path
