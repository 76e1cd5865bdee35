"""Per-call cost of every public op on tiny inputs (`rlkernels bench --ops overhead`).

At these sizes the kernels finish in a few microseconds, so what a call costs is
argument checking, dispatch and autograd bookkeeping.  For each op, forward and
(where the op has a gradient) forward+backward, three implementations run on the
same inputs, interleaved so that load falls on all alike:

- `rlkernels`: the public function with backend="auto";
- `composed` (baseline): the pure-PyTorch composition it replaces (rlkernels.reference,
  or for linear_ppo_loss the reference log-probs feeding the reference loss);
- `native` (baseline): one aten op on the op's main input (x * 2, and its backward),
  the floor any op of that size pays; for the lm-head ops the matmul hidden @ weight.t()
  (and its backward), which every implementation of them runs.

Each sample times `calls` back-to-back calls; the row reports the median per call.
Samples are short (10 calls, well under a millisecond) and many: on a loaded machine a
sample that spans a preemption is an outlier the median drops, where 100-call samples
of the fwd+bwd rows (3-7 ms) were preempted so often that their medians doubled (load
average 10 on 2 cores).
Goal (docs/benchmarks): rlkernels within 2x of `composed` and at most 15 us above
`native`; `summary()` lists the rows that miss it.  Runs on one thread, the setting
where a per-call cost is not hidden behind thread wake-ups.

Run alone: python -m rlkernels.benchmarks.overhead [--quick]"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Callable

import torch

import rlkernels
from rlkernels import reference as R

from .harness import timed_rows

GOAL_RATIO = 2.0  # rlkernels may cost at most this multiple of the composed PyTorch
GOAL_EXTRA_US = 15.0  # and at most this many microseconds above one native aten op


@dataclasses.dataclass
class Spec:
    name: str
    shape: str
    make: Callable[[torch.Generator, str], dict]  # inputs; tensors that take gradients have requires_grad
    ours: Callable[[dict], object]
    composed: Callable[[dict], object]
    main: str  # the input whose size the native op matches
    grad: tuple[str, ...] = ()  # inputs that receive gradients (empty: forward only)
    # the one aten op no implementation can undercut: None for `main * 2`; the lm-head
    # ops take their matmul (hidden @ weight.t()), which any version of them must run
    native: Callable[[dict], torch.Tensor] | None = None


def _randn(g, device, *shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)


def _mask(g, device, B, T):
    m = torch.rand(B, T, generator=g) > 0.2
    m[:, 0] = True
    return m.to(device)


def _token_loss_inputs(g, device, B=2, T=8):
    lp = _randn(g, device, B, T, grad=True)
    return {"logprobs": lp, "old": (lp.detach() + 0.05 * _randn(g, device, B, T)), "adv": _randn(g, device, B, T),
            "ref": lp.detach() - 0.1, "mask": _mask(g, device, B, T)}


def _logits_inputs(g, device, N=4, V=64):
    return {"logits": _randn(g, device, N, V, grad=True), "ref_logits": _randn(g, device, N, V),
            "labels": torch.randint(0, V, (N,), generator=g).to(device)}


def _linear_inputs(g, device, B=2, T=8, H=16, V=64):
    return {"hidden": _randn(g, device, B, T, H, grad=True), "weight": _randn(g, device, V, H, grad=True),
            "labels": torch.randint(0, V, (B, T), generator=g).to(device),
            "old": -4.0 + 0.1 * _randn(g, device, B, T), "adv": _randn(g, device, B, T),
            "mask": _mask(g, device, B, T)}


def _composed_linear_ppo(d):
    logits = d["hidden"] @ d["weight"].t()
    lp = R.logprobs(logits, d["labels"])
    return R.ppo_loss(lp, d["old"], d["adv"], d["mask"])[0]


def _tensors(g, device, count=8, numel=64):
    return {"tensors": [_randn(g, device, numel) for _ in range(count)],
            "bucket": torch.empty(count * numel, device=device)}


def _gossip(g, device, n=512):
    return {"x": _randn(g, device, n), "left": _randn(g, device, n), "right": _randn(g, device, n)}


def specs() -> list[Spec]:
    third = (1 / 3, 1 / 3, 1 / 3)
    return [
        Spec("gae", "[2, 8]",
             lambda g, d: {"r": _randn(g, d, 2, 8), "v": _randn(g, d, 2, 8), "mask": _mask(g, d, 2, 8)},
             lambda x: rlkernels.gae(x["r"], x["v"], x["mask"], gamma=0.99, lam=0.95),
             lambda x: R.gae(x["r"], x["v"], x["mask"], gamma=0.99, lam=0.95), "r"),
        Spec("discounted_returns", "[2, 8]",
             lambda g, d: {"r": _randn(g, d, 2, 8), "mask": _mask(g, d, 2, 8)},
             lambda x: rlkernels.discounted_returns(x["r"], x["mask"], gamma=0.99),
             lambda x: R.discounted_returns(x["r"], x["mask"], gamma=0.99), "r"),
        Spec("group_advantages", "[16], groups of 4",
             lambda g, d: {"s": _randn(g, d, 16)},
             lambda x: rlkernels.group_advantages(x["s"], 4),
             lambda x: R.group_advantages(x["s"], 4), "s"),
        Spec("masked_mean", "[4, 64]",
             lambda g, d: {"x": _randn(g, d, 4, 64, grad=True), "mask": _mask(g, d, 4, 64)},
             lambda x: rlkernels.masked_mean(x["x"], x["mask"], dim=-1),
             lambda x: R.masked_mean(x["x"], x["mask"], dim=-1), "x", ("x",)),
        Spec("masked_whiten", "[4, 64]",
             lambda g, d: {"x": _randn(g, d, 4, 64), "mask": _mask(g, d, 4, 64)},
             lambda x: rlkernels.masked_whiten(x["x"], x["mask"]),
             lambda x: R.masked_whiten(x["x"], x["mask"]), "x"),
        Spec("logprobs", "[4, 64]", _logits_inputs,
             lambda x: rlkernels.logprobs(x["logits"], x["labels"]),
             lambda x: R.logprobs(x["logits"], x["labels"]), "logits", ("logits",)),
        Spec("linear_logprobs", "[2, 8, 16] @ [64, 16]", _linear_inputs,
             lambda x: rlkernels.linear_logprobs(x["hidden"], x["weight"], x["labels"]),
             lambda x: R.linear_logprobs(x["hidden"], x["weight"], x["labels"]), "hidden", ("hidden", "weight"),
             native=_lm_head_matmul),
        Spec("kl_from_logits", "[4, 64]", _logits_inputs,
             lambda x: rlkernels.kl_from_logits(x["logits"], x["ref_logits"]),
             lambda x: R.kl_from_logits(x["logits"], x["ref_logits"]), "logits", ("logits",)),
        Spec("kl_penalty", "[2, 8]", _token_loss_inputs,
             lambda x: rlkernels.kl_penalty(x["logprobs"], x["ref"], "k3"),
             lambda x: R.kl_penalty(x["logprobs"], x["ref"], "k3"), "logprobs", ("logprobs",)),
        Spec("ppo_loss", "[2, 8]", _token_loss_inputs,
             lambda x: rlkernels.ppo_loss(x["logprobs"], x["old"], x["adv"], x["mask"])[0],
             lambda x: R.ppo_loss(x["logprobs"], x["old"], x["adv"], x["mask"])[0], "logprobs", ("logprobs",)),
        Spec("grpo_loss", "[2, 8]", _token_loss_inputs,
             lambda x: rlkernels.grpo_loss(x["logprobs"], x["old"], x["adv"], x["mask"], ref_logprobs=x["ref"],
                                           beta=0.04)[0],
             lambda x: R.grpo_loss(x["logprobs"], x["old"], x["adv"], x["mask"], ref_logprobs=x["ref"],
                                   beta=0.04)[0], "logprobs", ("logprobs",)),
        Spec("value_loss", "[2, 8]", _token_loss_inputs,
             lambda x: rlkernels.value_loss(x["logprobs"], x["old"], x["adv"], x["mask"], clip=0.2)[0],
             lambda x: R.value_loss(x["logprobs"], x["old"], x["adv"], x["mask"], clip=0.2)[0], "logprobs",
             ("logprobs",)),
        Spec("dpo_loss", "[4]",
             lambda g, d: {k: _randn(g, d, 4, grad=k.startswith("p")) for k in ("pc", "pr", "rc", "rr")},
             lambda x: rlkernels.dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"])[0],
             lambda x: R.dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"])[0], "pc", ("pc", "pr")),
        Spec("dpo_sequence_loss", "[2, 8]", _token_loss_inputs,
             lambda x: rlkernels.dpo_sequence_loss(x["logprobs"], x["ref"], x["mask"])[0],
             lambda x: R.dpo_sequence_loss(x["logprobs"], x["ref"], x["mask"])[0], "logprobs", ("logprobs",)),
        Spec("sequence_logprobs", "[2, 8]", _token_loss_inputs,
             lambda x: rlkernels.sequence_logprobs(x["logprobs"], x["mask"]),
             lambda x: R.sequence_logprobs(x["logprobs"], x["mask"]), "logprobs", ("logprobs",)),
        Spec("linear_ppo_loss", "[2, 8, 16] @ [64, 16]", _linear_inputs,
             lambda x: rlkernels.linear_ppo_loss(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"],
                                                 x["mask"])[0],
             _composed_linear_ppo, "hidden", ("hidden", "weight"), native=_lm_head_matmul),
        Spec("pack_tensors", "8 x [64]", _tensors,
             lambda x: rlkernels.pack_tensors(x["tensors"], out=x["bucket"]),
             lambda x: R.pack_tensors(x["tensors"], x["bucket"]), "bucket"),
        Spec("unpack_tensors", "8 x [64]", _tensors,
             lambda x: rlkernels.unpack_tensors(x["bucket"], x["tensors"]),
             lambda x: R.unpack_tensors(x["bucket"], x["tensors"]), "bucket"),
        Spec("gossip_mix", "[512]", _gossip,
             lambda x: rlkernels.gossip_mix(x["x"], x["left"], x["right"], third, out=x["x"]),
             lambda x: R.gossip_mix(x["x"], x["left"], x["right"], *third), "x"),
    ]


def _first_tensor(out):
    if out is None or isinstance(out, torch.Tensor):
        return out
    for item in out:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError("no tensor in the op's output")


def _with_backward(fn: Callable[[dict], object], inputs: dict, names: tuple[str, ...]) -> Callable[[], object]:
    wrt = [inputs[n] for n in names]

    def step():
        out = _first_tensor(fn(inputs))
        return torch.autograd.grad(out.sum(), wrt)

    return step


def _forward(fn: Callable[[dict], object], inputs: dict) -> Callable[[], object]:
    def step():
        with torch.no_grad():
            return fn(inputs)

    return step


def _lm_head_matmul(d: dict) -> torch.Tensor:
    return d["hidden"] @ d["weight"].t()


def _native(inputs: dict, spec: Spec, backward: bool) -> Callable[[], object]:
    if spec.native is not None:
        names = spec.grad if backward else ()
        leaves = {n: inputs[n].detach().requires_grad_(True) for n in names}
        plain = {n: (leaves[n] if n in leaves else t.detach() if isinstance(t, torch.Tensor) else t)
                 for n, t in inputs.items()}
        if backward:
            wrt = [leaves[n] for n in names]
            return lambda: torch.autograd.grad(spec.native(plain).sum(), wrt)
        return lambda: spec.native(plain)
    x = inputs[spec.main]
    if backward:
        leaf = x.detach().requires_grad_(True)
        return lambda: torch.autograd.grad((leaf * 2).sum(), leaf)
    return lambda: torch.mul(x.detach(), 2)


def _per_call_seconds(impls: list[tuple[str, Callable[[], object]]], device: str, calls: int, warmup: int,
                      repeats: int) -> list[float]:
    samples: list[list[float]] = [[] for _ in impls]
    for i in range(warmup + repeats):
        for k, (_, step) in enumerate(impls):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= warmup:
                samples[k].append((time.perf_counter() - start) / calls)
    return [statistics.median(s) for s in samples]


def _row(spec: Spec, mode: str, calls: int, labels: list[str], seconds: list[float]) -> dict:
    results = timed_rows([(label, label != "rlkernels", s) for label, s in zip(labels, seconds)])
    ours, composed, native = seconds
    return {"family": "overhead", "name": f"{spec.name} {mode}", "params": {"shape": spec.shape, "calls": calls},
            "bytes_moved": 0, "results": results,
            "overhead": {"per_call_us": ours * 1e6, "vs_composed": ours / composed,
                         "above_native_us": (ours - native) * 1e6,
                         "meets_goal": ours <= GOAL_RATIO * composed and (ours - native) * 1e6 <= GOAL_EXTRA_US}}


def run(device: str, quick: bool) -> list[dict]:
    calls, warmup, repeats = (10, 2, 9) if quick else (10, 20, 301)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for spec in specs():
            g = torch.Generator().manual_seed(0)
            inputs = spec.make(g, device)
            modes = [("fwd", _forward(spec.ours, inputs), _forward(spec.composed, inputs),
                      _native(inputs, spec, False))]
            if spec.grad:
                modes.append(("fwd+bwd", _with_backward(spec.ours, inputs, spec.grad),
                              _with_backward(spec.composed, inputs, spec.grad), _native(inputs, spec, True)))
            for mode, ours, composed, native in modes:
                labels = ["rlkernels", "composed", "native"]
                seconds = _per_call_seconds(list(zip(labels, (ours, composed, native))), device, calls, warmup,
                                            repeats)
                row = _row(spec, mode, calls, labels, seconds)
                rows.append(row)
                o = row["overhead"]
                print(f"overhead/{row['name']}: {o['per_call_us']:.1f} us a call, {o['vs_composed']:.2f}x composed, "
                      f"{o['above_native_us']:+.1f} us above native{'' if o['meets_goal'] else '  (misses goal)'}",
                      flush=True)
    finally:
        torch.set_num_threads(threads)
    return rows


def summary(rows: list[dict]) -> list[str]:
    """The rows that miss the per-call goal, one line each."""
    return [f"{r['name']}: {r['overhead']['per_call_us']:.1f} us, {r['overhead']['vs_composed']:.2f}x composed, "
            f"{r['overhead']['above_native_us']:+.1f} us above native"
            for r in rows if r.get("overhead") and not r["overhead"]["meets_goal"]]


if __name__ == "__main__":
    out = run("cuda" if torch.cuda.is_available() else "cpu", "--quick" in sys.argv)
    missed = summary(out)
    print(f"{len(out) - len(missed)} of {len(out)} rows meet the goal" + ("; missing:" if missed else ""))
    for line in missed:
        print("  " + line)
