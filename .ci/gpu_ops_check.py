"""Every public op x backend x dtype against the reference, with gradients and opcheck,
without pytest (the lent GPU machines have torch and Triton, not our test stack).

Each case builds random inputs with adversarial rows (odd sizes, padding, -inf and
huge logits), runs the op on the chosen backend and device, runs the pure-PyTorch
reference on float64 copies on the CPU, and compares outputs and the gradients of a
random projection of the outputs.  Every `torch.ops.rlkernels` call the op makes is
recorded (a dispatch mode) and checked once per op with `torch.library.opcheck`.

    python .ci/gpu_ops_check.py --device cuda [--backends cuda triton] [--json FILE]
    python .ci/gpu_ops_check.py --device cpu --backends cpu triton    # TRITON_INTERPRET=1
    python .ci/gpu_ops_check.py --list                                # the cases, nothing run
    python .ci/gpu_ops_check.py --smoke ...                           # tiny shapes (sanitizers)

Exit status 1 when any case fails.  Tolerances: float32 outputs within 1e-4 relative
(plus an absolute floor scaled to the output's magnitude); 16-bit outputs within
4 units in the last place of their dtype.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPES = {"float32": F32, "bfloat16": BF16, "float16": F16}


@dataclass
class Case:
    op: str
    dtype: torch.dtype
    build: Callable[[torch.dtype, str, bool], dict]   # (dtype, device, smoke) -> inputs
    call: Callable[..., object]                       # (fn inputs..., backend=) -> outputs
    differentiable: tuple[str, ...] = ()
    note: str = ""


@dataclass
class Result:
    op: str
    backend: str
    dtype: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    opcheck: list = field(default_factory=list)


def _logits(n, v, dtype, device):
    x = torch.randn(n, v, dtype=F32) * 3
    if n > 2:
        x[1] += 1e4                     # huge logits
        x[2, : v // 2] = -float("inf")  # a row with half its vocabulary impossible
    return x.to(dtype).to(device)


def _labels(n, v, device, x=None):
    labels = torch.randint(0, v, (n,))
    if n > 3:
        labels[3] = -100                # an ignored token
    if x is not None and n > 2:
        labels[2] = v - 1               # a possible token in the half -inf row
    return labels.to(device)


def _mask(b, t, device):
    m = torch.rand(b, t) > 0.3
    m[:, 0] = True
    if t > 4:
        m[0, 2:4] = False               # an interior gap
    return m.to(device)


def cases(smoke: bool) -> list[Case]:
    import rlkernels

    n, v = (5, 37) if smoke else (67, 50257)   # odd sizes; a real vocabulary on the GPU
    b, t = (3, 7) if smoke else (16, 1031)
    h = 16 if smoke else 256
    out: list[Case] = []

    def add(op, build, call, differentiable=(), dtypes=(F32, BF16, F16)):
        for dtype in dtypes:
            out.append(Case(op, dtype, build, call, differentiable))

    add("logprobs", lambda d, dev, s: {"logits": _logits(n, v, d, dev), "labels": _labels(n, v, dev, True)},
        lambda logits, labels, backend: rlkernels.logprobs(logits, labels, entropy=True, temperature=0.7,
                                                           backend=backend), ("logits",))
    add("kl_from_logits", lambda d, dev, s: {"logits": _logits(n, v, d, dev), "ref_logits": _logits(n, v, d, dev)},
        lambda logits, ref_logits, backend: rlkernels.kl_from_logits(logits, ref_logits, backend=backend),
        ("logits", "ref_logits"))
    add("linear_logprobs",
        lambda d, dev, s: {"hidden": torch.randn(n, h, dtype=d, device=dev),
                           "weight": (torch.randn(v, h) / math.sqrt(h)).to(d).to(dev),
                           "labels": _labels(n, v, dev)},
        lambda hidden, weight, labels, backend: rlkernels.linear_logprobs(hidden, weight, labels, entropy=True,
                                                                          backend=backend), ("hidden", "weight"))
    add("kl_penalty", lambda d, dev, s: {"logprobs": -torch.rand(b, t, dtype=d, device=dev) * 5,
                                         "ref_logprobs": -torch.rand(b, t, dtype=d, device=dev) * 5},
        lambda logprobs, ref_logprobs, backend: rlkernels.kl_penalty(logprobs, ref_logprobs, "k3", backend=backend),
        ("logprobs",))

    def token_inputs(d, dev, s):
        lp = -torch.rand(b, t) * 3
        return {"logprobs": lp.to(d).to(dev), "old_logprobs": (lp + 0.1 * torch.randn(b, t)).to(d).to(dev),
                "advantages": torch.randn(b, t, dtype=d, device=dev), "mask": _mask(b, t, dev)}

    add("ppo_loss", token_inputs,
        lambda logprobs, old_logprobs, advantages, mask, backend: rlkernels.ppo_loss(
            logprobs, old_logprobs, advantages, mask, clip_high=0.28, dual_clip=3.0, backend=backend),
        ("logprobs",))
    add("grpo_loss", lambda d, dev, s: dict(token_inputs(d, dev, s),
                                            ref_logprobs=(-torch.rand(b, t) * 3).to(d).to(dev)),
        lambda logprobs, old_logprobs, advantages, mask, ref_logprobs, backend: rlkernels.grpo_loss(
            logprobs, old_logprobs, advantages[:, 0].contiguous(), mask, ref_logprobs=ref_logprobs, beta=0.04,
            backend=backend), ("logprobs",))
    add("value_loss", lambda d, dev, s: {"values": torch.randn(b, t, dtype=d, device=dev),
                                         "old_values": torch.randn(b, t, dtype=d, device=dev),
                                         "returns": torch.randn(b, t, dtype=d, device=dev), "mask": _mask(b, t, dev)},
        lambda values, old_values, returns, mask, backend: rlkernels.value_loss(values, old_values, returns, mask,
                                                                                clip=0.2, backend=backend),
        ("values",))
    add("linear_ppo_loss",
        lambda d, dev, s: {"hidden": torch.randn(n, h, dtype=d, device=dev),
                           "weight": (torch.randn(v, h) / math.sqrt(h)).to(d).to(dev),
                           "labels": torch.randint(0, v, (n,), device=dev),
                           "old_logprobs": (-torch.rand(n) * 10).to(dev),
                           "advantages": torch.randn(n, device=dev)},
        lambda hidden, weight, labels, old_logprobs, advantages, backend: rlkernels.linear_ppo_loss(
            hidden.unsqueeze(0), weight, labels.unsqueeze(0), old_logprobs.unsqueeze(0), advantages.unsqueeze(0),
            entropy_coef=0.01, backend=backend), ("hidden", "weight"))
    add("dpo_loss", lambda d, dev, s: {k: (-torch.rand(b * 9) * 50).to(d).to(dev)
                                       for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")},
        lambda policy_chosen, policy_rejected, ref_chosen, ref_rejected, backend: rlkernels.dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, backend=backend),
        ("policy_chosen", "policy_rejected"))
    add("sequence_logprobs", lambda d, dev, s: {"token_logprobs": (-torch.rand(b, t) * 5).to(d).to(dev),
                                                "mask": _mask(b, t, dev)},
        lambda token_logprobs, mask, backend: rlkernels.sequence_logprobs(token_logprobs, mask, average=True,
                                                                          backend=backend), ("token_logprobs",))
    add("dpo_sequence_loss", lambda d, dev, s: {"policy_logprobs": (-torch.rand(2 * b, t) * 5).to(d).to(dev),
                                                "ref_logprobs": (-torch.rand(2 * b, t) * 5).to(d).to(dev),
                                                "mask": _mask(2 * b, t, dev)},
        lambda policy_logprobs, ref_logprobs, mask, backend: rlkernels.dpo_sequence_loss(
            policy_logprobs, ref_logprobs, mask, beta=0.1, label_smoothing=0.1, average=True, backend=backend),
        ("policy_logprobs", "ref_logprobs"))
    add("gae", lambda d, dev, s: {"rewards": torch.randn(b, t, dtype=d, device=dev),
                                  "values": torch.randn(b, t, dtype=d, device=dev), "mask": _mask(b, t, dev)},
        lambda rewards, values, mask, backend: rlkernels.gae(rewards, values, mask, gamma=0.99, lam=0.95,
                                                             backend=backend), dtypes=(F32, BF16))
    add("discounted_returns", lambda d, dev, s: {"rewards": torch.randn(b, t, dtype=d, device=dev),
                                                 "mask": _mask(b, t, dev)},
        lambda rewards, mask, backend: rlkernels.discounted_returns(rewards, mask, gamma=0.99, backend=backend),
        dtypes=(F32, BF16))
    add("group_advantages", lambda d, dev, s: {"scores": torch.randn(b * 8, dtype=d, device=dev)},
        lambda scores, backend: rlkernels.group_advantages(scores, 8, backend=backend), dtypes=(F32, BF16))
    add("masked_mean", lambda d, dev, s: {"x": torch.randn(b, t, dtype=d, device=dev), "mask": _mask(b, t, dev)},
        lambda x, mask, backend: rlkernels.masked_mean(x, mask, dim=1, backend=backend), ("x",))
    add("masked_whiten", lambda d, dev, s: {"x": torch.randn(b, t, dtype=d, device=dev), "mask": _mask(b, t, dev)},
        lambda x, mask, backend: rlkernels.masked_whiten(x, mask, backend=backend), dtypes=(F32, BF16))
    add("pack_tensors", lambda d, dev, s: {"a": torch.randn(3, 5, dtype=d, device=dev),
                                           "c": torch.randn(4099, dtype=d, device=dev)},
        lambda a, c, backend: rlkernels.pack_tensors([a, c], dtype=torch.float32, scale=0.5, backend=backend),
        dtypes=(F32, BF16))
    add("gossip_mix", lambda d, dev, s: {"x": torch.randn(5003, dtype=d, device=dev),
                                         "left": torch.randn(5003, dtype=d, device=dev),
                                         "right": torch.randn(5003, dtype=d, device=dev)},
        lambda x, left, right, backend: rlkernels.gossip_mix(x, left, right, (0.5, 0.25, 0.25), backend=backend),
        dtypes=(F32, BF16))
    return out


class RecordOps(TorchDispatchMode):
    """Records the first call of each torch.ops.rlkernels op (for opcheck)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket._qualified_op_name) if hasattr(func, "overloadpacket") else str(func)
        if name.startswith("rlkernels::") and name not in self.calls:
            clone = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.calls[name] = (func, torch.utils._pytree.tree_map(clone, args),
                                torch.utils._pytree.tree_map(clone, kwargs))
        return func(*args, **kwargs)


def _flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [x for k in sorted(outputs) for x in _flat(outputs[k])]
    if isinstance(outputs, (list, tuple)):
        return [x for o in outputs for x in _flat(o)]
    return []


def _tolerance(dtype: torch.dtype) -> float:
    return {F32: 1e-4, F64: 1e-9, BF16: 4 * 2.0 ** -8, F16: 4 * 2.0 ** -11}[dtype]


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, same: torch.Tensor | None = None) -> str | None:
    """got against the float64 truth `want`.  `same` is PyTorch's own result in got's
    input dtype (16-bit cases): the error may be up to twice PyTorch's there."""
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if not got.is_floating_point():
        ok = torch.equal(got.detach().cpu(), want.detach().cpu().to(got.dtype))
        return None if ok else f"{name}: {got.dtype} values differ from the reference"
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.equal(torch.isnan(g), torch.isnan(w)):
        return f"{name}: NaN where the reference has none (or the other way round)"
    finite = torch.isfinite(w) & torch.isfinite(g)
    if not torch.equal(torch.isfinite(g), torch.isfinite(w)) or not torch.equal(g[~finite & ~torch.isnan(g)],
                                                                              w[~finite & ~torch.isnan(w)]):
        return f"{name}: infinities differ from the reference"
    if finite.any():
        tol = _tolerance(got.dtype)
        scale = max(w[finite].abs().max().item(), 1.0)
        err = (g[finite] - w[finite]).abs()
        bound = tol * w[finite].abs() + tol * scale * 1e-2
        if same is not None:
            s_ = same.detach().double().cpu()[finite]
            bound = torch.maximum(bound, torch.full_like(bound, 2 * (s_ - w[finite]).abs().nan_to_num(0.0).max()
                                                         .item()))
        if (err > bound).any():
            return f"{name}: max error {err.max().item():.3e} over the {got.dtype} bound (scale {scale:.3e})"
    return None


def _projected_grads(outputs, weights, inputs, names):
    """Gradients of sum_i <outputs_i, weights_i> (NaN/inf outputs left out)."""
    loss = sum((o.double() * w.to(o.device)).nan_to_num(0.0, 0.0, 0.0).sum()
               for o, w in zip(outputs, weights) if o.requires_grad)
    grads = torch.autograd.grad(loss, [inputs[k] for k in names], allow_unused=True)
    return dict(zip(names, grads))


def run_case(case: Case, backend: str, device: str, smoke: bool, opcheck_done: set | None) -> Result:
    """One case; `opcheck_done` holds the ops already opchecked (None: no opcheck)."""
    result = Result(case.op, backend, str(case.dtype).split(".")[1], "passed")
    started = time.perf_counter()
    try:
        torch.manual_seed(zlib.crc32(f"{case.op} {case.dtype}".encode()))
        inputs = case.build(case.dtype, device, smoke)

        def copy(to_device, to_dtype):
            return {k: (x.detach().to(to_device).to(to_dtype if to_dtype and x.is_floating_point() else x.dtype)
                        .requires_grad_(k in case.differentiable) if isinstance(x, torch.Tensor) else x)
                    for k, x in inputs.items()}

        ours, truth = copy(device, None), copy("cpu", F64)
        recorder = RecordOps()
        with recorder:
            got = _flat(case.call(**ours, backend=backend))
        want = _flat(case.call(**truth, backend="reference"))
        same_in, same = None, [None] * len(want)
        if case.dtype in (BF16, F16):
            same_in = copy(device, None)
            same = _flat(case.call(**same_in, backend="reference"))
        problems = [p for i, (g, w, s_) in enumerate(zip(got, want, same)) if (p := _compare(f"output {i}", g, w, s_))]
        if len(got) != len(want):
            problems.append(f"{len(got)} outputs, the reference has {len(want)}")
        if case.differentiable and not problems:
            weights = [torch.randn(w.shape, dtype=F64) for w in want]
            g_ours = _projected_grads(got, weights, ours, case.differentiable)
            g_truth = _projected_grads(want, weights, truth, case.differentiable)
            g_same = (_projected_grads(same, weights, same_in, case.differentiable) if same_in is not None
                      else dict.fromkeys(case.differentiable))
            for k in case.differentiable:
                if (p := _compare(f"grad {k}", g_ours[k], g_truth[k], g_same[k])):
                    problems.append(p)
        for name, (func, args, kwargs) in recorder.calls.items():
            if opcheck_done is None or name in opcheck_done:
                continue
            opcheck_done.add(name)
            try:
                torch.library.opcheck(func, args, kwargs)
                result.opcheck.append(name)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"opcheck {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        if problems:
            result.status, result.detail = "failed", "; ".join(problems)
    except Exception as exc:  # noqa: BLE001
        result.status = "error"
        result.detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backends", nargs="+", default=None, help="default: cuda triton on cuda, cpu on cpu")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES))
    p.add_argument("--ops", nargs="+", help="only these ops")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (for the sanitizers)")
    p.add_argument("--no-opcheck", action="store_true")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    backends = args.backends or (["cuda", "triton"] if args.device == "cuda" else ["cpu"])
    bad = sorted(set(backends) - {"cpu", "cuda", "triton", "reference"})
    if bad:
        p.error(f"--backends: unknown {bad}")

    if args.device == "cpu" and "triton" in backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # decided when triton is first imported
    import rlkernels  # noqa: F401  (after argument errors, which need no build)

    selected = [c for c in cases(args.smoke) if (not args.ops or c.op in args.ops)
                and str(c.dtype).split(".")[1] in args.dtypes]
    if args.ops and not selected:
        p.error(f"--ops: none of {args.ops} is a case here")
    if args.list:
        for c in selected:
            for b in backends:
                print(f"{c.op:20s} {b:8s} {str(c.dtype).split('.')[1]}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_ops_check: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    results = []
    opcheck_done = None if args.no_opcheck else set()
    for backend in backends:
        for case in selected:
            r = run_case(case, backend, args.device, args.smoke, opcheck_done)
            results.append(r)
            print(f"{r.status:7s} {r.op:20s} {r.backend:8s} {r.dtype:9s} {r.seconds:7.2f} s  "
                  f"{r.detail.splitlines()[0][:200] if r.detail else ''}", flush=True)
    failed = [r for r in results if r.status != "passed"]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       "results": [r.__dict__ for r in results]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
